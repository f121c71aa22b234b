"""Train the class-conditional TinyDiT on an image folder, on 1..N processes (CPU or GPUs).

    python scripts/train_dit.py data/cats --steps 100 --batch-size 8          # local debug run
    accelerate launch --multi_gpu --num_processes 8 scripts/train_dit.py data/cats   # any GPU box

A run lives in <output-dir>/<run-name>/ (config.json, training.log, metrics.jsonl, status.json, samples/,
state/). Re-running the same command continues the newest complete checkpoint (`--resume auto`; the default
run name is the fixed "dit" for exactly that reason), and because every random number of optimizer step s
(batch indices, augmentation, diffusion time and noise, label dropout) is drawn from a generator seeded by
(seed, s) for the whole global batch, a resumed run, or one on another number of processes, trains on exactly
the same numbers as an uninterrupted one. Read `main` -> `train` (set-up, top to bottom) -> `train_loop` (the
loop and its boundaries) -> `optimizer_step` (one step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.diffusion import DDPM, OBJECTIVES, FlowMatching, build_objective, drop_labels
from models.ema import EMA
from models.tiny_dit import DIT_SIZES, build_dit, count_parameters
from scripts.lib import data
from scripts.lib.cli import UserError, option, parse_duration, run_main
import shutil

from scripts.lib.cli import write_atomic
from scripts.lib.run import FirstBadStep, apply_update_only_if_finite, verdict_after_update
from scripts.lib.checkpoints import MAX_IMAGE_SIZE, dit_metadata, save_model, unit_to_dit
from scripts.lib.run import MetricsWindow, next_boundary
from scripts.lib.run import Run, RunSpec, common_problems, open_run, positive_problems
from scripts.lib.run import config_dict, format_duration
from scripts.lib.cli import DEVICES
from scripts.lib.run import PRECISIONS, compile_wanted, compile_with_fallback
from scripts.lib.sampling import write_training_grid
from scripts.lib.run import LR_SCHEDULES, learning_rate
from scripts.lib.run import StopAgreement, TimeBudget, exit_status, stop_on_signals
from scripts.lib.checkpoints import TrainingState, check_same_setup

FINAL_NAME = "tinydit_final.safetensors"
FINAL_RAW_NAME = "tinydit_final_raw.safetensors"
REPORT_TO = ("none", "tensorboard", "wandb")
COMPILE_CHOICES = ("auto", "on", "off")


@dataclass
class TrainDiTConfig:
    data_dir: str | None = option(None, "image folder DATA_DIR/<class>/*.jpg", positional=True)
    steps: int = option(200000, "optimizer steps to train for (in total, counting resumed steps)")
    batch_size: int = option(256, "GLOBAL batch per forward pass, summed over all processes")
    lr: float = option(1e-4, "peak learning rate (AdamW), reached after the warmup")
    gradient_accumulation_steps: int = option(1, "forward passes per optimizer step (effective batch = x this)")
    augmentation_level: str = option("full", "training augmentation", choices=data.AUGMENTATION_LEVELS)
    warmup_steps: int = option(10000, "linear LR warmup (capped to 10%% of --steps when not below it)")
    lr_schedule: str = option(
        "constant", "after the warmup: constant (DiT) or cosine to 0 at --steps", choices=LR_SCHEDULES
    )
    save_interval: int = option(10000, "save the full training state every N steps (and at the end)")
    sample_interval: int = option(5000, "write an EMA sample grid every N steps (and at the end)")
    log_interval: int = option(100, "log loss/lr/grad-norm/img/s every N steps (at most every 10%% of the run)")
    # S/4 at 64 px: 256 tokens, 33M parameters, ~2.6e18 training FLOPs for 200k steps of batch 256.
    model: str = option("S/4", "TinyDiT size (width/depth/heads by letter, patch size)", choices=tuple(DIT_SIZES))
    image_size: int = option(64, "training resolution (must be divisible by the model's patch size)")
    objective: str = option("flow", "diffusion objective: rectified flow or DDPM", choices=OBJECTIVES)
    time_sampling: str = option("logit-normal", "flow: training times t", choices=FlowMatching.time_samplings)
    noise_schedule: str = option("linear", "ddpm: beta schedule (linear: DDPM, cosine: iDDPM)", choices=DDPM.schedules)
    ema_decay: float = option(0.9999, "EMA decay of the weights used for sampling (warmed up from 0)")
    cfg_scale: float = option(4.0, "classifier-free guidance scale of the sample grids")
    sample_steps: int = option(50, "sampling steps of the sample grids (fewer on a CPU if a grid would be slow)")
    label_dropout: float = option(0.1, "fraction of labels replaced by the null class (enables guidance)")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    weight_decay: float = option(0.0, "AdamW weight decay")
    mixed_precision: str = option("auto", "auto: bf16 where the GPU/CPU has it, fp16 on T4", choices=PRECISIONS)
    device: str = option("auto", "where to train", choices=DEVICES)
    compile: str = option("auto", "torch.compile (auto: on CUDA only; failure = eager)", choices=COMPILE_CHOICES)
    seed: int = option(0, "seed of the initial weights, the data order, augmentation and noise")
    run_name: str = option("dit", "run folder under --output-dir; the same name resumes the same run")
    output_dir: str = option("checkpoints", "where run folders and the final weights go")
    resume: str = option("auto", "auto: the run's newest checkpoint; never: fresh only; or a state folder")
    keep_checkpoints: int = option(5, "complete training states to keep (the newest is never deleted)")
    time_limit: str = option("", "budget of this attempt (seconds or 23h30m): save, exit 75 when a save would not fit")
    report_to: str = option("none", "also log to an Accelerate tracker (if installed)", choices=REPORT_TO)
    cache_dir: str = option("", "where the image cache goes (default: DATA_DIR/.tiny-cats-cache, else ~/.cache)")
    tracker_dir: str = option("", "where --report-to writes its files (default: the run folder)")


def validate_config(cfg: TrainDiTConfig, num_processes: int = 1) -> None:
    """Raise one UserError listing every bad flag or combination, before any work is done."""
    counts = ("steps", "batch_size", "save_interval", "gradient_accumulation_steps", "log_interval")
    problems = positive_problems(cfg, *counts, "sample_interval", "sample_steps", "keep_checkpoints", "image_size")
    if not cfg.lr > 0:
        problems.append(f"--lr must be positive (got {cfg.lr})")
    if cfg.warmup_steps < 0:
        problems.append(f"--warmup-steps must be >= 0 (got {cfg.warmup_steps})")
    if not (0 <= cfg.ema_decay < 1 and 0 <= cfg.label_dropout < 1):
        problems.append("--ema-decay and --label-dropout must be in [0, 1)")
    if cfg.cfg_scale < 0 or cfg.weight_decay < 0 or not cfg.max_grad_norm > 0:
        problems.append("--cfg-scale and --weight-decay must be >= 0 and --max-grad-norm > 0")
    patch = DIT_SIZES[cfg.model].patch if cfg.model in DIT_SIZES else 1
    if cfg.image_size > MAX_IMAGE_SIZE:  # the loaders refuse larger ones: the weights would be unusable
        problems.append(f"--image-size {cfg.image_size} is above the supported {MAX_IMAGE_SIZE}")
    elif cfg.image_size >= 1 and cfg.image_size % patch:
        problems.append(f"--image-size {cfg.image_size} is not divisible by the patch size {patch} of {cfg.model}")
    try:
        time_limit_seconds(cfg)
    except UserError as error:
        problems.append(f"--time-limit: {error}")
    if cfg.report_to != "none" and not _tracker_installed(cfg.report_to):
        problems.append(f"--report-to {cfg.report_to}: the {cfg.report_to} package is not installed — pip install it")
    problems += common_problems(cfg.data_dir, cfg.batch_size, num_processes, cfg.resume)
    if problems:
        raise UserError("; ".join(problems))


def _tracker_installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def time_limit_seconds(cfg: TrainDiTConfig) -> float | None:
    return parse_duration(cfg.time_limit) if cfg.time_limit else None


def effective_warmup(cfg: TrainDiTConfig) -> int:
    """--warmup-steps, or 10% of --steps when the warmup would not end before the run does."""
    return cfg.warmup_steps if cfg.warmup_steps < cfg.steps else max(1, cfg.steps // 10)


def step_lr(cfg: TrainDiTConfig, step: int) -> float:
    """The LR of optimizer step `step` (0-based) under this run's warmup and --lr-schedule."""
    return learning_rate(step, cfg.lr, effective_warmup(cfg), cfg.lr_schedule, cfg.steps)


def build_training_objective(cfg: TrainDiTConfig):
    """The objective of --objective with its own option (the other objective's flag does not apply)."""
    if cfg.objective == "flow":
        return build_objective("flow", time_sampling=cfg.time_sampling)
    return build_objective("ddpm", schedule=cfg.noise_schedule)


# ---------------------------------------------------------------------------------------------------------
# Everything random about one optimizer step, drawn for the whole (effective, global) batch, then sliced
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StepDraw:
    """Batch indices, augmentation, diffusion time and noise, label dropout of all samples of step s."""

    indices: np.ndarray
    augmentation: data.AugmentationParams
    t: torch.Tensor
    noise: torch.Tensor
    label_drop_mask: torch.Tensor  # bool: replace the label by the null class


def draw_step(cfg: TrainDiTConfig, num_images: int, objective, step: int, device: torch.device) -> StepDraw:
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    generator = data.step_generator(cfg.seed, step, device)
    indices = data.global_batch_indices(num_images, effective, step, cfg.seed)
    augmentation = data.draw_augmentation(cfg.augmentation_level, effective, cfg.image_size, generator)
    t, noise = objective.draw_training_noise((effective, 3, cfg.image_size, cfg.image_size), generator, device)
    drop = torch.rand(effective, generator=generator, device=device) < cfg.label_dropout
    return StepDraw(indices, augmentation, t, noise, drop)


def micro_slices(cfg: TrainDiTConfig, rank: int, world_size: int) -> list[slice]:
    """This rank's share of each forward pass within a step's effective batch."""
    start, stop = data.shard_bounds(cfg.batch_size, rank, world_size)
    return [
        slice(m * cfg.batch_size + start, m * cfg.batch_size + stop) for m in range(cfg.gradient_accumulation_steps)
    ]


def micro_batch(draw: StepDraw, source: data.ImageSource, part: slice, null_class: int) -> tuple[torch.Tensor, ...]:
    """(x0 in [-1, 1], labels with dropout applied, t, noise) of one slice of the step's batch."""
    images, labels = source.gather(draw.indices[part])
    x0 = unit_to_dit(data.apply_augmentation(images, draw.augmentation.slice(part.start, part.stop)))
    return x0, drop_labels(labels, draw.label_drop_mask[part], null_class), draw.t[part], draw.noise[part]


# ---------------------------------------------------------------------------------------------------------
# What a checkpoint must match
# ---------------------------------------------------------------------------------------------------------
def architecture(cfg: TrainDiTConfig, class_names: list[str]) -> dict[str, Any]:
    """What must match for a state to load into this run's model."""
    options = build_training_objective(cfg).options()
    names = list(class_names)
    return dict(
        model=cfg.model,
        image_size=cfg.image_size,
        objective=cfg.objective,
        objective_options=options,
        class_names=names,
    )


def training_schedule(cfg: TrainDiTConfig) -> dict[str, Any]:
    """The data order and the LR schedule: a resume with other values trains on, but no longer exactly as an
    uninterrupted run would have (the LR is a pure function of the step, so this is all its state)."""
    names = ("batch_size", "gradient_accumulation_steps", "seed", "augmentation_level", "label_dropout", "lr")
    schedule = {**{name: getattr(cfg, name) for name in names}, "warmup_steps": effective_warmup(cfg)}
    if cfg.lr_schedule != "constant":  # a decay depends on where it ends; a constant LR (older states) does not
        schedule.update(lr_schedule=cfg.lr_schedule, lr_decay_end=cfg.steps)
    return schedule


def resume(run: Run, state: TrainingState, cfg: TrainDiTConfig) -> int:
    """Load the run's checkpoint into `state` (after checking it fits this setup); returns its step (0: fresh)."""
    loaded = run.load_resume_state()
    if loaded is None:
        return 0
    step, saved = loaded
    check_same_setup(run.resume_from, saved.get("architecture"), architecture(cfg, run.cache.class_names))
    if step > cfg.steps:
        raise UserError(f"{run.resume_from} is already at step {step}, beyond --steps {cfg.steps} — raise it")
    recorded, wanted = saved.get("training_schedule") or {}, training_schedule(cfg)
    changed = [key for key in {**recorded, **wanted} if recorded.get(key) != wanted.get(key)]
    if changed:
        run.logger.info("note: %s changed since the checkpoint; no longer an exact continuation", ", ".join(changed))
    state.load(saved, run.resume_from)
    return step


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def main(cfg: TrainDiTConfig, on_checkpoint=None) -> dict[str, Any]:
    """Train (or continue) the run; returns {"run_dir", "final", "final_raw", "step", "loss"}.

    `on_checkpoint(folder)` runs on the main process after every complete state save (Modal commits its volume
    there). Stopping early (a signal, --time-limit) raises SystemExit with the status scripts.lib.cli documents,
    after saving.
    """
    tracker = None if cfg.report_to == "none" else cfg.report_to
    outputs = [Path(cfg.output_dir) / FINAL_NAME]
    spec = RunSpec(
        "dit", validate_config, outputs=outputs, accumulation=cfg.gradient_accumulation_steps, log_with=tracker
    )
    with open_run(cfg, spec, on_checkpoint, keep_states=cfg.keep_checkpoints) as run:
        return train(run, cfg)


def train(run: Run, cfg: TrainDiTConfig) -> dict[str, Any]:
    """Set-up -> model -> EMA -> optimizer -> resume -> loop -> final weights."""
    accelerator, device, logger = run.accelerator, run.device, run.logger
    objective = build_training_objective(cfg)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw_model = build_dit(cfg.model, cfg.image_size, run.cache.num_classes).to(device)
    # Fused AdamW (CPU and GPU): one kernel over all parameters instead of a dozen elementwise passes, and one
    # that can skip a non-finite step on the device (scripts.lib.guard) without waiting for the GPU.
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    # No LR scheduler goes through prepare(): a prepared one steps once per process (see API-NOTES).
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    ema = EMA(raw_model, decay=cfg.ema_decay, warmup=True)
    state = TrainingState(raw_model, optimizer, ema, accelerator.scaler)
    start_step = resume(run, state, cfg)
    run.begin(start_step, cfg.steps, f"from step {start_step}")
    logger.info("model %s: %.2fM parameters, %s objective", cfg.model, count_parameters(raw_model) / 1e6, cfg.objective)
    if effective_warmup(cfg) != cfg.warmup_steps:
        logger.info("warmup capped: --warmup-steps is not below --steps, using %d warmup steps", effective_warmup(cfg))
    source = data.ImageSource(run.cache, device)
    logger.info("training images are gathered on the %s (%s)", source.placement, device)
    if compile_wanted(cfg.compile, device):
        first_part = micro_slices(cfg, accelerator.process_index, accelerator.num_processes)[0]
        first = micro_batch(
            draw_step(cfg, source.num_images, objective, 0, device), source, first_part, raw_model.null_class
        )
        warm_up = lambda compiled: accelerator.backward(objective.training_loss(compiled, *first))  # noqa: E731
        model = compile_with_fallback(model, warm_up, logger)

    step, stopped, last_loss = train_loop(run, cfg, model, state, objective, source, start_step)
    if stopped:
        logger.info("stopped by %s at step %d after saving its state; run the same command to resume", stopped, step)
        raise SystemExit(exit_status(stopped))
    if step == start_step:  # a rerun of a finished run: the loop wrote no final grid this time
        write_training_grid(run, cfg, ema.model, objective, step, lambda: False, None, 0.0)
    final, final_raw = run.run_dir / FINAL_NAME, run.run_dir / FINAL_RAW_NAME
    if run.is_main:
        write_final_weights(cfg, state, objective, run.cache.class_names, step, final, final_raw)
        logger.info("done: step %d, final EMA weights %s (also in %s)", step, final, cfg.output_dir)
    accelerator.wait_for_everyone()
    return {"run_dir": run.run_dir, "final": final, "final_raw": final_raw, "step": step, "loss": last_loss}


def train_loop(
    run: Run, cfg, model, state: TrainingState, objective, source, start_step: int
) -> tuple[int, str | None, float]:
    """Optimizer steps from `start_step` to --steps, with logging, saving and sample grids at their intervals.

    Returns (completed steps, why it stopped early or None, last logged loss). Nothing here waits for the GPU
    between boundaries: the loss is summed and the guard's verdict kept on the device, read when logging or
    saving (a bad step raises there, before anything is written).
    """
    log_every = min(cfg.log_interval, max(1, cfg.steps // 10))  # short runs log too
    health, window = FirstBadStep(run.device), MetricsWindow(run.device, start_step)
    budget, agreement = TimeBudget(time_limit_seconds(cfg), start_step), StopAgreement(run.accelerator)
    images_per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    step, stopped, started = start_step, None, time.monotonic()
    progress = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not run.is_main)
    with stop_on_signals() as signals, progress:
        while step < cfg.steps and stopped is None:
            loss, grad_norm, verdict = optimizer_step(cfg, model, state, objective, source, step, run.accelerator)
            step += 1
            health.record(step, verdict)
            window.add(loss, first_of_attempt=step == start_step + 1)
            progress.update()
            # At the last step the run is done anyway: finishing beats stopping there.
            over_time = step < cfg.steps and budget.exhausted(step, next_boundary(step, cfg.save_interval, cfg.steps))
            stopped = agreement.reason(signals.signum, over_time)
            if step % log_every == 0 or step == cfg.steps or stopped:
                log_progress(run, cfg, step, window, grad_norm, health, state.ema, progress)
            if step % cfg.save_interval == 0 or step == cfg.steps or stopped:
                stop_if_broken(health, step)
                budget.saved(run.save_state(step, state.state_dict(step=step, **saved_setup(cfg, run))))
            if stopped is None and (step % cfg.sample_interval == 0 or step == cfg.steps):
                seconds_per_image = window.seconds_per_step / images_per_step
                training_seconds = time.monotonic() - started
                interrupted = lambda: signals.signum is not None  # noqa: E731
                write_training_grid(
                    run, cfg, state.ema.model, objective, step, interrupted, seconds_per_image, training_seconds
                )
    return step, stopped, window.last_loss


def optimizer_step(cfg: TrainDiTConfig, model, state: TrainingState, objective, source, step: int, accelerator):
    """One optimizer step over the effective global batch; returns (loss, grad norm, the guard's verdict), all
    device tensors (reading them would wait for the GPU)."""
    for group in state.optimizer.param_groups:  # the LR is a pure function of the step: no scheduler state
        group["lr"] = step_lr(cfg, step)
    draw = draw_step(cfg, source.num_images, objective, step, accelerator.device)
    parts = micro_slices(cfg, accelerator.process_index, accelerator.num_processes)
    next_indices = [draw.indices[part] for part in parts[1:]] + [next_step_indices(cfg, source, step + 1, parts[0])]
    loss = torch.zeros((), device=accelerator.device)
    for part, upcoming in zip(parts, next_indices, strict=True):
        batch = micro_batch(draw, source, part, state.model.null_class)
        source.prefetch(upcoming)  # gathered on the host while the device computes (a no-op when on the device)
        with accelerator.accumulate(model):  # DDP syncs gradients on the last part only
            part_loss = objective.training_loss(model, *batch)
            accelerator.backward(part_loss)
        loss += part_loss.detach().float() / len(parts)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    # A NaN/inf loss or gradient must not reach the weights: the fused optimizer then skips this step.
    verdict = apply_update_only_if_finite(state.optimizer, loss, grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.update(state.model)
    return loss, grad_norm, verdict_after_update(verdict, state.model.parameters())


def next_step_indices(cfg: TrainDiTConfig, source, step: int, part: slice) -> np.ndarray:
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    return data.global_batch_indices(source.num_images, effective, step, cfg.seed)[part]


def saved_setup(cfg: TrainDiTConfig, run: Run) -> dict[str, Any]:
    """What a checkpoint records besides the weights, for `resume` to check."""
    return {"architecture": architecture(cfg, run.cache.class_names), "training_schedule": training_schedule(cfg)}


def stop_if_broken(health: FirstBadStep, step: int) -> None:
    """Raise the advice when a step since the start went non-finite (nothing of it has been saved)."""
    bad = health.first()
    if bad is not None:
        raise UserError(
            f"{bad[1]} became NaN/inf at step {bad[0]} — lower --lr, check the data, or use --mixed-precision no/bf16; "
            f"nothing was saved after it, the last complete checkpoint is kept (noticed at step {step})"
        )


def log_progress(run: Run, cfg, step: int, window: MetricsWindow, grad_norm, health, ema: EMA, progress: tqdm) -> None:
    """One log line, metrics.jsonl row and status update for the steps since the last one."""
    stop_if_broken(health, step)
    figures = window.close(run.accelerator, cfg.batch_size * cfg.gradient_accumulation_steps)
    lr = step_lr(cfg, step - 1)
    metrics = {**figures, "lr": lr, "grad_norm": float(grad_norm), "ema_decay": ema.current_decay()}
    eta_s = (cfg.steps - step) * figures["seconds_per_step"]
    run.logger.info(
        "step %d/%d loss %.4f lr %.2e grad-norm %.3f %.1f img/s eta %s",
        *(step, cfg.steps, metrics["loss"], lr, metrics["grad_norm"], metrics["img_per_s"], format_duration(eta_s)),
    )
    run.log_metrics(step, eta_s, **metrics)
    progress.set_postfix(loss=f"{metrics['loss']:.4f}")


def write_final_weights(
    cfg, state: TrainingState, objective, class_names, step: int, final: Path, final_raw: Path
) -> None:
    """EMA and raw weights with full metadata in the run dir; the EMA file also at <output-dir>/ (atomically)."""
    for weights, model, path in (("ema", state.ema.model, final), ("raw", state.model, final_raw)):
        architecture = dict(model_name=cfg.model, image_size=cfg.image_size, in_channels=3, class_names=class_names)
        training = dict(objective_name=cfg.objective, objective_options=objective.options(), step=step)
        save_model(path, model, dit_metadata(config_dict(cfg), **architecture, **training, weights=weights))
    write_atomic(Path(cfg.output_dir) / FINAL_NAME, lambda tmp: shutil.copyfile(final, tmp))


if __name__ == "__main__":
    run_main(main, TrainDiTConfig, "Train the class-conditional TinyDiT diffusion transformer.")
