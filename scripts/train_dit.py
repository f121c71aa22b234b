"""Train the class-conditional TinyDiT on an image folder, on 1..N processes (CPU or GPUs).

    python scripts/train_dit.py data/cats --steps 100 --batch-size 8                 # local debug run
    accelerate launch --multi_gpu --num_processes 8 scripts/train_dit.py data/cats   # any GPU box

A run lives in <output-dir>/<run-name>/ (scripts/lib/run.py). Re-running the same command continues its newest
complete checkpoint, and because every random number of optimizer step s (batch indices, augmentation, diffusion time
and noise, label dropout) is drawn for the whole global batch from a generator seeded by (seed, s), a resumed run, or
one on another number of processes, trains on exactly the numbers an uninterrupted one would. Read `main` -> `train`
(set-up, top to bottom) -> `train_loop` -> `optimizer_step` (one step) and `at_boundaries` (log, save, grid, stop).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from torch import nn
from tqdm import tqdm

from models.diffusion import DDPM, OBJECTIVES, FlowMatching, build_objective, drop_labels
from models.tiny_dit import DIT_SIZES, build_dit, count_parameters
from scripts.lib import data
from scripts.lib.checkpoints import MAX_IMAGE_SIZE, TrainingState, dit_metadata, unit_to_dit
from scripts.lib.cli import UserError, option, parse_duration, run_main
from scripts.lib.run import (
    LR_SCHEDULES, NonFiniteGuard, Run, RunSpec, Stopper, TrainerConfig, adamw, common_problems, config_dict,
    exit_status, format_duration, learning_rate, open_run, positive_problems, synchronize,
)  # fmt: skip
from scripts.lib.sampling import SamplingStopped, class_grid_labels, sample_images, save_grid

FINAL_NAME, FINAL_RAW_NAME = "tinydit_final.safetensors", "tinydit_final_raw.safetensors"
SHARED_RUN_NAME = "dit"  # the run whose final weights are also <output-dir>/tinydit_final.safetensors
COMPILE_CHOICES = ("auto", "on", "off")
NAN_ADVICE = "lower --lr, check the data, or use --mixed-precision no/bf16"


@dataclass
class TrainDiTConfig(TrainerConfig):
    batch_size: int = option(256, "GLOBAL batch per forward pass, summed over all processes")
    run_name: str = option(SHARED_RUN_NAME, "run folder under --output-dir; the same name resumes the same run")
    output_dir: str = option("checkpoints", "where run folders go (and the final weights of the run named dit)")
    steps: int = option(200000, "optimizer steps to train for (in total, counting resumed steps)")
    gradient_accumulation_steps: int = option(1, "forward passes per optimizer step (effective batch = x this)")
    warmup_steps: int = option(10000, "linear LR warmup (10%% of --steps when not below it)")
    lr_schedule: str = option("constant", "after the warmup: constant (DiT) or cosine to 0", choices=LR_SCHEDULES)
    save_interval: int = option(10000, "save the full training state every N steps (and at the end)")
    sample_interval: int = option(5000, "write an EMA sample grid every N steps (and at the end)")
    log_interval: int = option(100, "log loss/lr/grad-norm/img/s every N steps (at most every 10%% of the run)")
    model: str = option("S/4", "TinyDiT size (width/depth/heads by letter, patch size)", choices=tuple(DIT_SIZES))
    objective: str = option("flow", "diffusion objective: rectified flow or DDPM", choices=OBJECTIVES)
    time_sampling: str = option("logit-normal", "flow: training times t", choices=FlowMatching.time_samplings)
    noise_schedule: str = option("linear", "ddpm: beta schedule (linear: DDPM, cosine: iDDPM)", choices=DDPM.schedules)
    ema_decay: float = option(0.9999, "EMA decay of the weights used for sampling (warmed up from 0)")
    cfg_scale: float = option(4.0, "classifier-free guidance scale of the sample grids (and the weights' default)")
    sample_steps: int = option(50, "sampling steps of the sample grids (fewer on a CPU if a grid would be slow)")
    label_dropout: float = option(0.1, "fraction of labels replaced by the null class (enables guidance)")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    compile: str = option("auto", "torch.compile (auto: on CUDA only; failure = eager)", choices=COMPILE_CHOICES)
    keep_checkpoints: int = option(5, "complete training states to keep (the newest is never deleted)")
    time_limit: str = option("", "budget of this attempt (seconds or 23h30m): save, exit 75 when a save would not fit")


def validate_config(cfg: TrainDiTConfig, num_processes: int = 1) -> None:
    """Raise one UserError listing every bad flag or combination, before any work is done."""
    patch = DIT_SIZES[cfg.model].patch if cfg.model in DIT_SIZES else 1
    names = ("steps", "save_interval", "gradient_accumulation_steps", "log_interval", "sample_interval")
    problems = common_problems(cfg, num_processes, patch, MAX_IMAGE_SIZE)
    problems += positive_problems(cfg, *names, "sample_steps", "keep_checkpoints")
    if cfg.image_size % patch:
        problems.append(f"--image-size {cfg.image_size} is not divisible by the patch size {patch} of {cfg.model}")
    if cfg.warmup_steps < 0 or not (0 <= cfg.ema_decay < 1 and 0 <= cfg.label_dropout < 1):
        problems.append("--warmup-steps must be >= 0, --ema-decay and --label-dropout in [0, 1)")
    if not (cfg.cfg_scale >= 0 and cfg.max_grad_norm > 0):
        problems.append("--cfg-scale must be >= 0 and --max-grad-norm > 0")
    try:
        time_limit_seconds(cfg)
    except UserError as error:
        problems.append(f"--time-limit: {error}")
    if problems:
        raise UserError("; ".join(problems))


def time_limit_seconds(cfg: TrainDiTConfig) -> float | None:
    return parse_duration(cfg.time_limit) if cfg.time_limit else None


def effective_config(cfg: TrainDiTConfig) -> tuple[TrainDiTConfig, list[str]]:
    """The config as it will train, and a note for each flag a short run adjusts: a warmup not below --steps is
    cut to 10 % of them, and the log interval to at most 10 % (a short run still logs)."""
    warmup = cfg.warmup_steps if cfg.warmup_steps < cfg.steps else max(1, cfg.steps // 10)
    log_interval = min(cfg.log_interval, max(1, cfg.steps // 10))
    adjusted = dataclasses.replace(cfg, warmup_steps=warmup, log_interval=log_interval)
    changed = [name for name in ("warmup_steps", "log_interval") if getattr(cfg, name) != getattr(adjusted, name)]
    notes = [f"--{n.replace('_', '-')} {getattr(cfg, n)} adjusted to {getattr(adjusted, n)} for --steps {cfg.steps}"
             for n in changed]  # fmt: skip
    return adjusted, notes


def step_lr(cfg: TrainDiTConfig, step: int) -> float:
    return learning_rate(step, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.steps)


def training_objective(cfg: TrainDiTConfig):
    """--objective with its own option (the other objective's flag does not apply)."""
    options = {"time_sampling": cfg.time_sampling} if cfg.objective == "flow" else {"schedule": cfg.noise_schedule}
    return build_objective(cfg.objective, **options)


class EMA:
    """A frozen copy of a model whose weights trail it: ema = decay * ema + (1 - decay) * model after every step.
    DiT samples with it (decay 0.9999). The warm-up decay = min(decay, (1 + n) / (10 + n)) (TensorFlow's
    ExponentialMovingAverage with num_updates, timm) lets short runs use recent weights, not the random init."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """`model` is the unwrapped module (no DDP / compile wrapper) of the same architecture; buffers are copied."""
        ema_params, params = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError(f"EMA holds {len(ema_params)} parameters, the model {len(params)}: pass it unwrapped")
        torch._foreach_lerp_(ema_params, params, 1.0 - self.current_decay())
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "warmup": self.warmup,
                "model": self.model.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Tensors are copied into the existing ones, so a CPU state loads into a GPU EMA."""
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        self.model.load_state_dict(state["model"])


# --- Everything random about one optimizer step, drawn for the whole (effective, global) batch, then sliced ------
@dataclass
class StepDraw:
    indices: np.ndarray
    augmentation: data.AugmentationParams
    t: torch.Tensor
    noise: torch.Tensor
    label_drop_mask: torch.Tensor  # bool: the label becomes the null class


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
    offsets = [m * cfg.batch_size for m in range(cfg.gradient_accumulation_steps)]
    return [slice(offset + start, offset + stop) for offset in offsets]


def micro_batch(draw: StepDraw, source: data.ImageSource, part: slice, null_class: int) -> tuple[torch.Tensor, ...]:
    """(x0 in [-1, 1], labels after dropout, t, noise) of one slice of the step's batch."""
    images, labels = source.gather(draw.indices[part])
    x0 = unit_to_dit(data.apply_augmentation(images, draw.augmentation.slice(part.start, part.stop)))
    return x0, drop_labels(labels, draw.label_drop_mask[part], null_class), draw.t[part], draw.noise[part]


def optimizer_step(cfg, model, state: TrainingState, objective, source, step: int, accelerator, guard: NonFiniteGuard):
    """One optimizer step (0-based `step`) over the effective global batch: (loss, grad norm) as device tensors, which
    are read only at log boundaries (reading them would wait for the GPU)."""
    for group in state.optimizer.param_groups:  # the LR is a pure function of the step: no scheduler state
        group["lr"] = step_lr(cfg, step)
    draw = draw_step(cfg, source.num_images, objective, step, accelerator.device)
    parts = micro_slices(cfg, accelerator.process_index, accelerator.num_processes)
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    after_this = data.global_batch_indices(source.num_images, effective, step + 1, cfg.seed)[parts[0]]
    upcoming = [draw.indices[part] for part in parts[1:]] + [after_this]
    loss = torch.zeros((), device=accelerator.device)
    for part, following in zip(parts, upcoming, strict=True):
        batch = micro_batch(draw, source, part, state.model.null_class)
        source.prefetch(following)  # gathered on the host while the device computes (a no-op when on the device)
        with accelerator.accumulate(model):  # DDP syncs gradients on the last part only
            part_loss = objective.training_loss(model, *batch)
            accelerator.backward(part_loss)
        loss += part_loss.detach().float() / len(parts)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    guard.step(state.optimizer, step + 1, loss, grad_norm, state.model.parameters())  # skips a non-finite step
    state.ema.update(state.model)
    return loss, grad_norm


# --- The run -----------------------------------------------------------------------------------------------------
def architecture(cfg: TrainDiTConfig, class_names: list[str]) -> dict[str, Any]:
    """What must match for a state to load into this run's model."""
    options = training_objective(cfg).options()
    return dict(model=cfg.model, image_size=cfg.image_size, objective=cfg.objective, objective_options=options,
                class_names=list(class_names))  # fmt: skip


def training_schedule(cfg: TrainDiTConfig) -> dict[str, Any]:
    """The data order and the LR schedule: a resume with other values trains on, but not exactly as an uninterrupted
    run would have (the LR is a pure function of the step, so this is all its state)."""
    names = ("batch_size", "gradient_accumulation_steps", "seed", "augmentation_level", "label_dropout", "lr")
    schedule = {**{name: getattr(cfg, name) for name in names}, "warmup_steps": cfg.warmup_steps}
    if cfg.lr_schedule != "constant":  # a decay depends on where it ends; a constant LR does not
        schedule.update(lr_schedule=cfg.lr_schedule, lr_decay_end=cfg.steps)
    return schedule


def main(cfg: TrainDiTConfig, on_checkpoint=None) -> dict[str, Any]:
    """Train (or continue) the run; returns {"run_dir", "final", "final_raw", "step", "loss"}.

    `on_checkpoint(folder)` runs on the main process after every complete state save (Modal commits its volume
    there). Stopping early (a signal, --time-limit) raises SystemExit with the status scripts.lib.cli documents,
    after saving.
    """
    cfg, notes = effective_config(cfg)
    shared = [Path(cfg.output_dir) / FINAL_NAME] if cfg.run_name == SHARED_RUN_NAME else []
    spec = RunSpec("dit", validate_config, shared, accumulation=cfg.gradient_accumulation_steps,
                   keep_states=cfg.keep_checkpoints)  # fmt: skip
    with open_run(cfg, spec, on_checkpoint) as run:
        for note in notes:
            run.log.info("note: %s", note)
        return train(run, cfg, shared[0] if shared else None)


def train(run: Run, cfg: TrainDiTConfig, shared: Path | None) -> dict[str, Any]:
    """Model -> optimizer -> EMA -> resume -> loop -> final weights."""
    accelerator, device, class_names = run.accelerator, run.device, run.cache.class_names
    objective = training_objective(cfg)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw_model = build_dit(cfg.model, cfg.image_size, len(class_names)).to(device)
    # No LR scheduler goes through prepare(): a prepared one steps once per process (see API-NOTES).
    model, optimizer = accelerator.prepare(raw_model, adamw(raw_model, cfg))
    ema = EMA(raw_model, decay=cfg.ema_decay)
    state = TrainingState(raw_model, optimizer, ema, accelerator.scaler)
    start, _ = run.restore(state, architecture(cfg, class_names), training_schedule(cfg))
    if start > cfg.steps:
        raise UserError(f"{run.resumed[0]} is already at step {start}, beyond --steps {cfg.steps} — raise it")
    run.begin(start, cfg.steps, f"from step {start}")
    run.log.info(
        "model %s: %.2fM parameters, %s objective", cfg.model, count_parameters(raw_model) / 1e6, cfg.objective
    )
    source = data.ImageSource(run.cache, device)
    run.log.info("training images are gathered on the %s (%s)", source.placement, device)
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):  # a CPU's compile: minutes for little
        part = micro_slices(cfg, accelerator.process_index, accelerator.num_processes)[0]
        first = micro_batch(draw_step(cfg, source.num_images, objective, 0, device), source, part, raw_model.null_class)
        model = compile_with_fallback(
            model, lambda net: accelerator.backward(objective.training_loss(net, *first)), run
        )
    step, loss = train_loop(run, cfg, model, state, objective, source, start)
    final, final_raw = run.run_dir / FINAL_NAME, run.run_dir / FINAL_RAW_NAME
    for weights, network, path in (("raw", raw_model, final_raw), ("ema", ema.model, final)):
        metadata = dit_metadata(config_dict(cfg), model_name=cfg.model, image_size=cfg.image_size, in_channels=3,
                                class_names=class_names, objective_name=cfg.objective,
                                objective_options=objective.options(), step=step, weights=weights)  # fmt: skip
        run.write_weights(path, network, metadata, copy_to=shared if weights == "ema" else None)
    also = (
        f"also at {shared}" if shared else f"{cfg.output_dir}/{FINAL_NAME} is the run {SHARED_RUN_NAME}'s, not changed"
    )
    run.log.info("done: step %d, final EMA weights %s (%s)", step, final, also)
    return {"run_dir": run.run_dir, "final": final, "final_raw": final_raw, "step": step, "loss": loss}


def train_loop(run: Run, cfg, model, state: TrainingState, objective, source, start: int) -> tuple[int, float]:
    """Optimizer steps from `start` to --steps with their boundaries; returns (steps done, last logged loss)."""
    guard, window = NonFiniteGuard(run.device), MetricsWindow(run.device)
    progress = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not run.is_main)
    step, grad_norm = start, None
    with Stopper(run.accelerator, time_limit_seconds(cfg), start) as stopper, progress:
        if step == cfg.steps:  # a rerun of a finished run: nothing to train, but the end's grid is still owed
            at_boundaries(run, cfg, step, None, state, objective, window, grad_norm, guard, stopper, progress)
        while step < cfg.steps:
            loss, grad_norm = optimizer_step(cfg, model, state, objective, source, step, run.accelerator, guard)
            step += 1
            window.add(loss, first_of_attempt=step == start + 1)
            progress.update()
            next_save = min((step // cfg.save_interval + 1) * cfg.save_interval, cfg.steps)
            stopped = stopper.reason(step, next_save, cfg.steps)
            at_boundaries(run, cfg, step, stopped, state, objective, window, grad_norm, guard, stopper, progress)
    return step, window.last_loss


def at_boundaries(run: Run, cfg, step, stopped, state, objective, window, grad_norm, guard, stopper, progress) -> None:
    """Whatever is due after `step`: a log line, a save, a stop (exit after saving), a sample grid."""
    last = step == cfg.steps
    if window.steps and (step % cfg.log_interval == 0 or last or stopped):
        guard.check(NAN_ADVICE)
        figures = window.close(run.accelerator, cfg.batch_size * cfg.gradient_accumulation_steps)
        metrics = {**figures, "lr": step_lr(cfg, step - 1), "grad_norm": float(grad_norm)}
        metrics["ema_decay"] = state.ema.current_decay()
        eta_s = (cfg.steps - step) * figures["seconds_per_step"]
        run.log.info("step %d/%d loss %.4f lr %.2e grad-norm %.3f %.1f img/s eta %s", step, cfg.steps, metrics["loss"],
                     metrics["lr"], metrics["grad_norm"], metrics["img_per_s"], format_duration(eta_s))  # fmt: skip
        run.record(step, eta_s, **metrics)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
    if step != stopper.start_step and (step % cfg.save_interval == 0 or last or stopped):
        guard.check(NAN_ADVICE)
        setup = {"architecture": architecture(cfg, run.cache.class_names), "training_schedule": training_schedule(cfg)}
        stopper.last_save_s = run.save(step, state.state_dict(step=step, **setup))
    if stopped:
        run.log.info("stopped by %s at step %d after saving its state; run the same command to resume", stopped, step)
        raise SystemExit(exit_status(stopped))
    if step % cfg.sample_interval == 0 or last:
        written = write_grid(run, cfg, state.ema.model, objective, step, stopper, window.seconds_per_step)
        if not written and last:  # a signal during the last grid: the state is saved, the grid owed to a rerun
            raise SystemExit(exit_status(signal.Signals(stopper.signum or signal.SIGTERM).name))


# Off a GPU a grid may take 5 % of the training time so far (at least 20 s): fewer columns, then fewer sampler steps
# keep it there (the 2-core debug run spends ~20 s, not 10 minutes). A forward is a third of a training step.
GRID_COLUMNS, GRID_MIN_COLUMNS, GRID_MIN_STEPS, GRID_TIME_SHARE, GRID_MIN_BUDGET_S = 8, 2, 10, 0.05, 20.0


def write_grid(run: Run, cfg, ema_model: nn.Module, objective, step: int, stopper: Stopper, step_seconds) -> bool:
    """A fixed-seed EMA grid, one row per class, at samples/step_NNNNNNN.png (main process). A signal ends it at the
    next sampler step, unsaved: then False on every rank, so that all stop alike."""
    written = True
    if run.is_main:
        classes = len(run.cache.class_names)
        columns, steps = max(GRID_MIN_COLUMNS, min(GRID_COLUMNS, 64 // classes)), cfg.sample_steps
        started = time.monotonic()
        per_forward = step_seconds / (cfg.batch_size * cfg.gradient_accumulation_steps) / 3 * (1 + (cfg.cfg_scale != 1))
        cost = lambda: columns * steps * classes * per_forward  # noqa: E731 (NaN before any step was timed)
        budget = max(GRID_MIN_BUDGET_S, GRID_TIME_SHARE * (started - stopper.started))
        while run.device.type != "cuda" and cost() > budget and columns > GRID_MIN_COLUMNS:
            columns -= 1
        while run.device.type != "cuda" and cost() > budget and steps > GRID_MIN_STEPS:
            steps = max(GRID_MIN_STEPS, steps * 3 // 4)
        labels = class_grid_labels(list(range(classes)), columns, run.device)
        try:
            with run.accelerator.autocast():
                stop = lambda: stopper.signum is not None  # noqa: E731
                images = sample_images(ema_model, objective, labels, steps=steps, cfg_scale=cfg.cfg_scale,
                                       seed=cfg.seed, progress=f"sample grid {step}", should_stop=stop)  # fmt: skip
            path = save_grid(images, run.run_dir / "samples" / f"step_{step:07d}.png", per_row=columns)
            run.log.info("sample grid %s: %d classes x %d, %d steps, CFG %g (took %.1f s, estimated %.0f s)", path,
                         classes, columns, steps, cfg.cfg_scale, time.monotonic() - started, cost())  # fmt: skip
            run.status.update(newest_grid=str(path.relative_to(run.run_dir)))
        except SamplingStopped:
            run.log.info("sample grid of step %d stopped by a signal", step)
            written = False
    return broadcast_object_list([written])[0] if run.accelerator.num_processes > 1 else written


class MetricsWindow:
    """Loss and time of the steps since the last log line. The loss stays on the device until the window closes (one
    GPU wait per log line, not per step); an attempt's first step (allocations, kernel selection) is timed apart and
    left out of img/s unless it is all the window holds."""

    def __init__(self, device: torch.device):
        self.device, self.seconds_per_step, self.last_loss = device, math.nan, math.nan
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.steps = torch.zeros((), device=self.device), 0
        self.first_step_s, self.started = None, time.perf_counter()

    def add(self, loss: torch.Tensor, first_of_attempt: bool = False) -> None:
        self.loss_sum += loss
        self.steps += 1
        if first_of_attempt:
            synchronize(self.device)  # once per attempt: the warm-up's real end
            self.first_step_s, self.started = time.perf_counter() - self.started, time.perf_counter()

    def close(self, accelerator, images_per_step: int) -> dict[str, float]:
        """{loss (mean over the window and all processes), img_per_s, seconds_per_step}; starts a new window."""
        self.last_loss = accelerator.reduce(self.loss_sum, reduction="mean").item() / self.steps  # waits for the device
        seconds, timed = time.perf_counter() - self.started, self.steps - (self.first_step_s is not None)
        if timed == 0:  # only the warm-up step in this window: report it rather than nothing
            seconds, timed = self.first_step_s, 1
        self.seconds_per_step = seconds / timed
        figures = {"loss": self.last_loss, "img_per_s": images_per_step / self.seconds_per_step,
                   "seconds_per_step": self.seconds_per_step}  # fmt: skip
        if self.device.type == "cuda":
            figures["memory_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self._reset()
        return figures


def compile_with_fallback(model: nn.Module, warm_up, run: Run) -> nn.Module:
    """torch.compile `model` and run `warm_up(compiled)` (a forward + backward of a real batch) once, so the compile
    is spent and logged now, not inside the first timed step; its gradients are dropped. Any compiler failure: one
    warning, and the eager model trains."""
    compiled, started = torch.compile(model), time.perf_counter()
    try:
        warm_up(compiled)
        synchronize(run.device)
    except (UserError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as error:  # noqa: BLE001 — whatever the compiler raises, eager training still works
        first_line = str(error).splitlines()[0] if str(error) else ""
        run.log.warning("torch.compile failed (%s: %s); training eagerly instead", type(error).__name__, first_line)
        return model
    finally:
        model.zero_grad(set_to_none=True)
    run.log.info("compiled the model in %.1f s (a warm-up step, not counted in img/s)", time.perf_counter() - started)
    return compiled


if __name__ == "__main__":
    run_main(main, TrainDiTConfig, "Train the class-conditional TinyDiT diffusion transformer.")
