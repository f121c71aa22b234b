"""Train the class-conditional TinyDiT on an image folder, on 1..N processes (CPU or GPUs).

    python scripts/train_dit.py data/cats --steps 100 --batch-size 8          # local debug run
    accelerate launch --multi_gpu --num_processes 8 scripts/train_dit.py data/cats   # any GPU box

A run lives in <output-dir>/<run-name>/ (config.json, training.log, metrics.jsonl, samples/, state/).
Re-running the same command continues the newest complete checkpoint (`--resume auto`; the default run
name is the fixed "dit" for exactly that reason), and because every random number of optimizer step s
(batch indices, augmentation, diffusion time and noise, label dropout) is drawn from a generator seeded by
(seed, s) for the whole global batch, a resumed run — or one on a different number of processes — trains
on exactly the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models.diffusion import DDPM, OBJECTIVES, FlowMatching, build_objective, drop_labels
from models.ema import EMA
from models.tiny_dit import DIT_SIZES, build_dit, count_parameters
from scripts.lib.checkpoints import (find_resume_state, list_complete_states, load_training_state, prune_states,
                                 remove_unfinished_writes,
                                 save_training_state)
from scripts.lib.cli import UserError, option, run_main
from scripts.lib.batches import AUGMENTATION_LEVELS, apply_augmentation, draw_augmentation, gather_batch, global_batch_indices, shard_bounds, step_generator
from scripts.lib.images import ImageCache, load_or_build_cache
from scripts.lib.model_files import dit_metadata, save_model, unit_to_dit
from scripts.lib.runlog import MetricsWriter, config_dict, format_duration, log_run_header, setup_logger, write_config
from scripts.lib.runtime import (DEVICES, PRECISIONS, agree_on_resume_state, describe_gpu_failure, make_accelerator,
                            shared_config_problems)
from scripts.lib.sampling import class_grid_labels, sample_images, save_grid

REPORT_TO = ("none", "tensorboard", "wandb")
FINAL_NAME = "tinydit_final.safetensors"
FINAL_RAW_NAME = "tinydit_final_raw.safetensors"
# Sample grids: one row per class, this many columns (fewer when there are many classes).
GRID_COLUMNS = 8


@dataclass
class TrainDiTConfig:
    data_dir: str | None = option(None, "image folder DATA_DIR/<class>/*.jpg", positional=True)
    steps: int = option(200000, "optimizer steps to train for (in total, counting resumed steps)")
    batch_size: int = option(256, "GLOBAL batch per forward pass, summed over all processes")
    lr: float = option(1e-4, "peak learning rate (AdamW), reached after the warmup")
    gradient_accumulation_steps: int = option(1, "forward passes per optimizer step; effective batch = "
                                                 "batch-size x this")
    augmentation_level: str = option("full", "training augmentation", choices=AUGMENTATION_LEVELS)
    warmup_steps: int = option(10000, "linear learning-rate warmup (capped to 10%% of --steps when not below it)")
    save_interval: int = option(10000, "save the full training state every N steps (and at the end)")
    sample_interval: int = option(5000, "write an EMA sample grid every N steps (and at the end)")
    log_interval: int = option(100, "log loss/lr/grad-norm/img/s every N steps (at most every 10%% of the run)")
    # S/4 at 64 px: 256 tokens, 33M parameters, ~2.6e18 training FLOPs for 200k steps of batch 256: hours on
    # an A100/H100, under the 24 h limit of one Modal attempt on an A10G (estimated at 40% utilisation).
    model: str = option("S/4", "TinyDiT size (width/depth/heads by letter, patch after the slash)",
                        choices=tuple(DIT_SIZES))
    image_size: int = option(64, "training resolution (must be divisible by the model's patch size)")
    objective: str = option("flow", "diffusion objective: rectified flow or DDPM", choices=OBJECTIVES)
    time_sampling: str = option("logit-normal", "flow only: distribution of the training times t",
                                choices=FlowMatching.time_samplings)
    noise_schedule: str = option("linear", "ddpm only: beta schedule (DDPM linear or iDDPM cosine)",
                                 choices=tuple(DDPM.schedules))
    ema_decay: float = option(0.9999, "EMA decay of the weights used for sampling (warmed up from 0)")
    cfg_scale: float = option(4.0, "classifier-free guidance scale of the sample grids")
    sample_steps: int = option(50, "sampling steps of the sample grids")
    label_dropout: float = option(0.1, "fraction of labels replaced by the null class (enables guidance)")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    weight_decay: float = option(0.0, "AdamW weight decay")
    mixed_precision: str = option("auto", "auto: bf16 on Ampere+, fp16 on T4/Volta, none on CPU",
                                  choices=PRECISIONS)
    device: str = option("auto", "where to train", choices=DEVICES)
    seed: int = option(0, "seed of the initial weights, the data order, augmentation and noise")
    run_name: str = option("dit", "run folder under --output-dir; the same name resumes the same run")
    output_dir: str = option("checkpoints", "where run folders and the final weights go")
    resume: str = option("auto", "auto: continue the newest complete checkpoint of this run; never: start "
                                 "fresh (refused if the run has checkpoints); or a state folder to load")
    keep_checkpoints: int = option(5, "complete training states to keep (the newest is never deleted)")
    compile: bool = option(False, "torch.compile the model (faster on GPUs after a warm-up)")
    report_to: str = option("none", "also log to an Accelerate tracker (if installed)", choices=REPORT_TO)


# ---------------------------------------------------------------------------------------------------------
# Configuration checks and schedules
# ---------------------------------------------------------------------------------------------------------
def validate_config(cfg: TrainDiTConfig, num_processes: int = 1) -> None:
    """Raise one UserError listing every bad flag or combination, before any work is done."""
    problems = []
    positive = {"steps": cfg.steps, "batch-size": cfg.batch_size, "save-interval": cfg.save_interval,
                "gradient-accumulation-steps": cfg.gradient_accumulation_steps, "log-interval": cfg.log_interval,
                "sample-interval": cfg.sample_interval, "sample-steps": cfg.sample_steps,
                "keep-checkpoints": cfg.keep_checkpoints, "image-size": cfg.image_size}
    problems += [f"--{name} must be positive (got {value})" for name, value in positive.items() if value < 1]
    if not cfg.lr > 0:
        problems.append(f"--lr must be positive (got {cfg.lr})")
    if cfg.warmup_steps < 0:
        problems.append(f"--warmup-steps must be >= 0 (got {cfg.warmup_steps})")
    if not 0 <= cfg.ema_decay < 1:
        problems.append(f"--ema-decay must be in [0, 1) (got {cfg.ema_decay})")
    if not 0 <= cfg.label_dropout < 1:
        problems.append(f"--label-dropout must be in [0, 1) (got {cfg.label_dropout})")
    if cfg.cfg_scale < 0 or cfg.weight_decay < 0 or not cfg.max_grad_norm > 0:
        problems.append("--cfg-scale and --weight-decay must be >= 0 and --max-grad-norm > 0")
    if cfg.model not in DIT_SIZES:
        problems.append(f"unknown --model {cfg.model!r}; choose one of {', '.join(DIT_SIZES)}")
    elif cfg.image_size >= 1 and cfg.image_size % DIT_SIZES[cfg.model].patch:
        patch = DIT_SIZES[cfg.model].patch
        problems.append(f"--image-size {cfg.image_size} is not divisible by the patch size {patch} of "
                        f"{cfg.model}; use a multiple of {patch}")
    if cfg.report_to != "none" and not _tracker_installed(cfg.report_to):
        problems.append(f"--report-to {cfg.report_to}: the {cfg.report_to} package is not installed — "
                        f"pip install {cfg.report_to}, or use --report-to none")
    problems += shared_config_problems(cfg.data_dir, cfg.batch_size, num_processes, cfg.resume)
    if problems:
        raise UserError("; ".join(problems))


def _tracker_installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def effective_warmup(cfg: TrainDiTConfig) -> int:
    """--warmup-steps, or 10% of --steps when the warmup would not end before the run does."""
    if cfg.warmup_steps < cfg.steps:
        return cfg.warmup_steps
    return max(1, cfg.steps // 10)


def learning_rate(step: int, peak: float, warmup: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup to `peak`, then constant (as in DiT)."""
    if warmup <= 0:
        return peak
    return peak * min(1.0, (step + 1) / warmup)


# ---------------------------------------------------------------------------------------------------------
# Batches: every random number of a step drawn for the whole (effective, global) batch, then sliced
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StepDraw:
    """Everything random about optimizer step s, for all batch-size x accumulation samples of all ranks."""

    indices: Any  # np.ndarray of dataset indices
    augmentation: Any  # scripts.data.AugmentationParams
    t: torch.Tensor
    noise: torch.Tensor
    label_drop_mask: torch.Tensor  # bool: replace the label by the null class


def draw_step(cfg: TrainDiTConfig, cache: ImageCache, objective, step: int, device: torch.device) -> StepDraw:
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    generator = step_generator(cfg.seed, step, device)
    indices = global_batch_indices(len(cache), effective, step, cfg.seed)
    augmentation = draw_augmentation(cfg.augmentation_level, effective, cfg.image_size, generator)
    t, noise = objective.draw_training_noise((effective, 3, cfg.image_size, cfg.image_size), generator, device)
    drop = torch.rand(effective, generator=generator, device=device) < cfg.label_dropout
    return StepDraw(indices, augmentation, t, noise, drop)


def micro_batch(draw: StepDraw, cache: ImageCache, micro: int, batch_size: int, rank: int,
                world_size: int, null_class: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(x0 in [-1, 1], labels, t, noise) of this rank's share of forward pass `micro` of the step."""
    start, stop = shard_bounds(batch_size, rank, world_size)
    start, stop = micro * batch_size + start, micro * batch_size + stop
    local = draw.indices[start:stop]
    images = gather_batch(cache.images, local).to(device, non_blocking=True)
    x0 = unit_to_dit(apply_augmentation(images, draw.augmentation.slice(start, stop)))
    labels = torch.from_numpy(cache.labels[local]).to(device)
    labels = drop_labels(labels, draw.label_drop_mask[start:stop], null_class)
    return x0, labels, draw.t[start:stop], draw.noise[start:stop]


# ---------------------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT at a step boundary
# ---------------------------------------------------------------------------------------------------------
class StopRequest:
    """Set by SIGTERM (preemption) or SIGINT (Ctrl-C); the loop saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the checkpoint
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield request
        return
    previous = {sig: signal.signal(sig, request.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------
# Training state
# ---------------------------------------------------------------------------------------------------------
def build_training_objective(cfg: TrainDiTConfig):
    """The objective of --objective with its own option (the other objective's flag does not apply)."""
    if cfg.objective == "flow":
        return build_objective("flow", time_sampling=cfg.time_sampling)
    return build_objective("ddpm", schedule=cfg.noise_schedule)


def architecture(cfg: TrainDiTConfig, class_names: list[str]) -> dict[str, Any]:
    """What must match for a state to load into this run's model."""
    return {"model": cfg.model, "image_size": cfg.image_size, "objective": cfg.objective,
            "objective_options": build_training_objective(cfg).options(), "class_names": list(class_names)}


def training_schedule(cfg: TrainDiTConfig) -> dict[str, Any]:
    """The data order and the LR schedule (a pure function of the step, so this is all its state).

    A resume with other values trains on, but no longer as an uninterrupted run would have.
    """
    return {"batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "seed": cfg.seed, "augmentation_level": cfg.augmentation_level, "label_dropout": cfg.label_dropout,
            "lr": cfg.lr, "warmup_steps": effective_warmup(cfg)}


def rng_states() -> dict[str, Any]:
    # Training draws all its randomness from per-step generators; these are kept for completeness only.
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


@dataclass
class Trainer:
    """The objects a checkpoint captures."""

    raw_model: nn.Module  # the plain module (no DDP / compile wrapper)
    ema: EMA
    optimizer: Any  # the prepared optimizer
    accelerator: Any

    def state(self, step: int, cfg: TrainDiTConfig, class_names: list[str]) -> dict[str, Any]:
        state = {"step": step, "model": self.raw_model.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "rng": rng_states(),
                 "architecture": architecture(cfg, class_names), "training_schedule": training_schedule(cfg)}
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def load(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])


def check_resumable(state: dict[str, Any], folder: Path, cfg: TrainDiTConfig, class_names: list[str],
                    log: Callable[[str], None]) -> None:
    saved, wanted = state["architecture"], architecture(cfg, class_names)
    differences = [f"{key} {saved.get(key, '(not recorded)')} -> {wanted[key]}" for key in wanted
                   if saved.get(key) != wanted[key]]
    if differences:
        raise UserError(f"{folder} was trained with a different setup ({'; '.join(differences)}) — use the same "
                        "flags and data to continue it, or a new --run-name to start another run")
    saved_schedule = state["training_schedule"]
    changed = [key for key, value in training_schedule(cfg).items() if saved_schedule.get(key) != value]
    if changed:
        log(f"note: {', '.join(changed)} changed since the checkpoint; training continues, but no longer "
            "exactly as an uninterrupted run would")


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def main(cfg: TrainDiTConfig, on_checkpoint: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Train (or continue) the run; returns {"run_dir", "final", "final_raw", "step", "loss"}.

    `on_checkpoint(folder)` runs on the main process after every complete state save (Modal commits its
    volume there).
    """
    try:
        return train(cfg, on_checkpoint)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
        advice = describe_gpu_failure(error)  # OOM: what to lower; other CUDA errors: try --device cpu
        if advice is None:
            raise
        raise UserError(advice) from error


def train(cfg: TrainDiTConfig, on_checkpoint: Callable[[Path], None] | None) -> dict[str, Any]:
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision, cfg.gradient_accumulation_steps,
                                   log_with=None if cfg.report_to == "none" else cfg.report_to,
                                   project_dir=str(Path(cfg.output_dir) / cfg.run_name))
    validate_config(cfg, accelerator.num_processes)
    is_main, device = accelerator.is_main_process, accelerator.device
    run_dir = Path(cfg.output_dir) / cfg.run_name
    state_root = run_dir / "state"
    logger = setup_logger(run_dir / "training.log", is_main)
    resume_from = agree_on_resume_state(find_resume_state(cfg.resume, state_root), accelerator)
    if is_main:
        write_config(run_dir, cfg)
        removed = remove_unfinished_writes(state_root)
        if removed:
            logger.info("removed %d unfinished checkpoint write(s) left by a killed run", removed)
    log_run_header(logger, cfg, str(device), accelerator.mixed_precision, accelerator.num_processes)
    warmup = effective_warmup(cfg)
    if warmup != cfg.warmup_steps:
        logger.info("warmup capped: --warmup-steps %d is not below --steps %d, using %d warmup steps",
                    cfg.warmup_steps, cfg.steps, warmup)

    with accelerator.local_main_process_first():  # one process per machine builds the cache, the others read it
        cache = load_or_build_cache(cfg.data_dir, cfg.image_size, log=logger, show_progress=is_main)
    logger.info("data: %d images, %d classes (%s) from %s", len(cache), cache.num_classes,
                ", ".join(cache.class_names), cfg.data_dir)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw_model = build_dit(cfg.model, cfg.image_size, cache.num_classes).to(device)
    objective = build_training_objective(cfg)
    # Fused AdamW (CPU and GPU): one kernel over all parameters instead of a dozen elementwise passes.
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cuda", "cpu"))
    model = torch.compile(raw_model) if cfg.compile else raw_model
    # No LR scheduler goes through prepare(): a prepared one steps once per process (see API-NOTES).
    model, optimizer = accelerator.prepare(model, optimizer)
    trainer = Trainer(raw_model, EMA(raw_model, decay=cfg.ema_decay, warmup=True), optimizer, accelerator)
    logger.info("model %s: %.2fM parameters, %s objective", cfg.model, count_parameters(raw_model) / 1e6,
                cfg.objective)

    start_step = 0
    if resume_from is not None:
        start_step, state = load_training_state(resume_from)
        check_resumable(state, resume_from, cfg, cache.class_names, logger.info)
        if start_step > cfg.steps:
            raise UserError(f"{resume_from} is already at step {start_step}, beyond --steps {cfg.steps} — raise "
                            "--steps to train on, or use a new --run-name")
        trainer.load(state)
        logger.info("resuming from step %d (%s)", start_step, resume_from)
    else:
        logger.info("starting fresh in %s", run_dir)
    if cfg.report_to != "none":
        accelerator.init_trackers("tiny-cats-dit", config={k: v for k, v in config_dict(cfg).items() if v is not None})

    def save_checkpoint(step: int) -> None:
        if is_main:
            folder = save_training_state(state_root, step, trainer.state(step, cfg, cache.class_names))
            prune_states(state_root, cfg.keep_checkpoints)
            logger.info("saved training state %s", folder)
            if on_checkpoint is not None:
                on_checkpoint(folder)
        accelerator.wait_for_everyone()

    def write_samples(step: int) -> None:
        if is_main:
            path = sample_grid(trainer.ema.model, objective, cfg, cache.class_names, run_dir, step, accelerator)
            logger.info("sample grid %s", path)
        accelerator.wait_for_everyone()

    loop = TrainingLoop(cfg, accelerator, model, trainer, objective, cache, warmup, logger,
                        MetricsWriter(run_dir / "metrics.jsonl", enabled=is_main), save_checkpoint, write_samples)
    with stop_on_signals() as stop:
        step = loop.run(start_step, stop)
    if stop.signum is not None and step < cfg.steps:
        logger.info("stopped by %s at step %d after saving its state; run the same command to resume",
                    signal.Signals(stop.signum).name, step)
        raise SystemExit(128 + stop.signum)

    if step == start_step:  # a rerun of a finished run: the loop wrote no final grid this time
        write_samples(step)
    summary = {"run_dir": run_dir, "final": run_dir / FINAL_NAME, "final_raw": run_dir / FINAL_RAW_NAME,
               "step": step, "loss": loop.last_loss}
    if is_main:
        write_final_weights(cfg, trainer, objective, cache.class_names, step, summary)
        logger.info("done: step %d, final EMA weights %s (also %s)", step, summary["final"],
                    Path(cfg.output_dir) / FINAL_NAME)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


class TrainingLoop:
    """The optimizer-step loop with its periodic logging, sampling and saving."""

    def __init__(self, cfg: TrainDiTConfig, accelerator, model: nn.Module, trainer: Trainer, objective,
                 cache: ImageCache, warmup: int, logger, metrics: MetricsWriter,
                 save_checkpoint: Callable[[int], None], write_samples: Callable[[int], None]):
        self.cfg, self.accelerator, self.model, self.trainer = cfg, accelerator, model, trainer
        self.objective, self.cache, self.warmup, self.logger, self.metrics = objective, cache, warmup, logger, metrics
        self.save_checkpoint, self.write_samples = save_checkpoint, write_samples
        self.log_every = min(cfg.log_interval, max(1, cfg.steps // 10))  # short runs log too
        self.last_loss = math.nan

    def train_step(self, step: int) -> tuple[float, bool, torch.Tensor]:
        """One optimizer step: (loss averaged over the effective global batch, stop requested, grad norm)."""
        cfg, accelerator, optimizer = self.cfg, self.accelerator, self.trainer.optimizer
        device = accelerator.device
        lr = learning_rate(step, cfg.lr, self.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        draw = draw_step(cfg, self.cache, self.objective, step, device)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.gradient_accumulation_steps):
            x0, labels, t, noise = micro_batch(draw, self.cache, micro, cfg.batch_size,
                                               accelerator.process_index, accelerator.num_processes,
                                               self.trainer.raw_model.null_class, device)
            with accelerator.accumulate(self.model):
                loss = self.objective.training_loss(self.model, x0, labels, t, noise)
                accelerator.backward(loss)
            loss_sum += loss.detach().float()
        # One all-reduce per step carries the loss (for the NaN guard and the log) and any rank's stop signal,
        # so every rank takes the same decision.
        signals = torch.stack([loss_sum / cfg.gradient_accumulation_steps,
                               torch.tensor(float(self.stop.signum is not None), device=device)])
        signals = accelerator.reduce(signals, reduction="sum")
        loss_value = signals[0].item() / accelerator.num_processes
        if not math.isfinite(loss_value):
            raise self.non_finite_loss(step + 1)
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.trainer.ema.update(self.trainer.raw_model)
        return loss_value, signals[1].item() > 0, grad_norm

    def non_finite_loss(self, step: int) -> UserError:
        newest = list_complete_states(Path(self.cfg.output_dir) / self.cfg.run_name / "state")
        kept = f"the last good checkpoint ({newest[-1][1]}) is kept" if newest else "no checkpoint was saved yet"
        message = (f"loss became NaN/inf at step {step} — lower --lr, check the data, or use --mixed-precision "
                   f"no/bf16; nothing was saved from this step and {kept}")
        self.logger.error(message)
        return UserError(message)

    def run(self, start_step: int, stop: StopRequest) -> int:
        """Train from `start_step` to --steps (or to a stop request); returns the number of completed steps."""
        cfg, is_main = self.cfg, self.accelerator.is_main_process
        self.stop = stop
        images_per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        window = {"loss": 0.0, "steps": 0, "seconds": 0.0}
        step = start_step
        progress = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not is_main,
                        dynamic_ncols=True)
        with progress:
            while step < cfg.steps:
                started = time.perf_counter()
                loss, stop_requested, grad_norm = self.train_step(step)
                step += 1
                window["loss"] += loss
                window["steps"] += 1
                window["seconds"] += time.perf_counter() - started
                self.last_loss = loss
                progress.update()
                if step % self.log_every == 0 or step == cfg.steps:
                    self.log(step, window, float(grad_norm), images_per_step, progress)
                    window = {"loss": 0.0, "steps": 0, "seconds": 0.0}
                if step % cfg.save_interval == 0 or step == cfg.steps or stop_requested:
                    self.save_checkpoint(step)
                if stop_requested:
                    break
                if step % cfg.sample_interval == 0 or step == cfg.steps:
                    self.write_samples(step)
        return step

    def log(self, step: int, window: dict[str, float], grad_norm: float, images_per_step: int, progress) -> None:
        seconds_per_step = window["seconds"] / window["steps"]
        metrics = {"step": step, "loss": window["loss"] / window["steps"],
                   "lr": self.trainer.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                   "img_per_s": images_per_step / seconds_per_step, "ema_decay": self.trainer.ema.current_decay()}
        eta = format_duration((self.cfg.steps - step) * seconds_per_step)
        self.logger.info("step %d/%d loss %.4f lr %.2e grad-norm %.3f %.1f img/s eta %s", step, self.cfg.steps,
                         metrics["loss"], metrics["lr"], grad_norm, metrics["img_per_s"], eta)
        self.metrics.write(**metrics)
        if self.cfg.report_to != "none":
            self.accelerator.log(metrics, step=step)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")


def sample_grid(ema_model: nn.Module, objective, cfg: TrainDiTConfig, class_names: list[str], run_dir: Path,
                step: int, accelerator) -> Path:
    """A fixed-seed EMA sample grid, one row per class, at samples/step_NNNNNNN.png."""
    columns = max(2, min(GRID_COLUMNS, 64 // len(class_names)))
    labels = class_grid_labels(list(range(len(class_names))), columns, accelerator.device)
    with accelerator.autocast():
        images = sample_images(ema_model, objective, labels, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                               sampler=None, seed=cfg.seed, image_size=cfg.image_size, in_channels=3)
    return save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", per_row=columns)


def write_final_weights(cfg: TrainDiTConfig, trainer: Trainer, objective, class_names: list[str], step: int,
                        summary: dict[str, Any]) -> None:
    """EMA and raw weights with full metadata in the run dir; the EMA file also at <output-dir>/."""
    for weights, model, path in (("ema", trainer.ema.model, summary["final"]),
                                 ("raw", trainer.raw_model, summary["final_raw"])):
        metadata = dit_metadata(config_dict(cfg), model_name=cfg.model, image_size=cfg.image_size, in_channels=3,
                                class_names=class_names, objective_name=cfg.objective,
                                objective_options=objective.options(), step=step, weights=weights)
        save_model(path, model, metadata)
    shared = Path(cfg.output_dir) / FINAL_NAME
    tmp = shared.with_name(shared.name + ".tmp")
    shutil.copyfile(summary["final"], tmp)
    os.replace(tmp, shared)


if __name__ == "__main__":
    run_main(main, TrainDiTConfig, "Train the class-conditional TinyDiT diffusion transformer.")
