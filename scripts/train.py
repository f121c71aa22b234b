"""Train the cat classifier (a torchvision backbone) on an image folder, on 1..N processes (CPU or GPUs).

    python scripts/train.py data/cats --no-pretrained --epochs 1 --batch-size 8       # local debug run
    python scripts/train.py data/cats --no-pretrained --epochs 6 --lr 2e-3            # toy cats: >98%, CPU
    accelerate launch --multi_gpu --num_processes 4 scripts/train.py data/cats         # any GPU box

A run lives in <output-dir>/<run-name>/ (config.json, training.log, metrics.jsonl, status.json, state/,
cats_model_best.safetensors); the final weights go to --output. Every epoch ends with a validation pass and a
complete training state, so an interrupted run continues from its last finished epoch when started again with
the same command (`--resume auto`; the default --run-name is the fixed "classifier"). The batch order and
augmentation of optimizer step s are drawn for the whole global batch from (seed, s), so 1 and N processes
train on the same samples. Reading order: `main` -> `train` (set-up, top to bottom) -> `train_epoch`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.classifier import BACKBONES, PretrainedWeightsUnavailable, build_classifier
from scripts.lib import data
from scripts.lib.checkpoints import (
    MAX_IMAGE_SIZE,
    MIN_CLASSIFIER_IMAGE_SIZE,
    TrainingState,
    check_same_setup,
    classifier_metadata,
    classifier_normalize,
    save_model,
)
from scripts.lib.cli import DEVICES, UserError, option, run_main
from scripts.lib.data import ImageCache, gather_batch, to_unit_float
from scripts.lib.run import (
    PRECISIONS,
    FirstBadStep,
    Run,
    RunSpec,
    StopAgreement,
    apply_update_only_if_finite,
    common_problems,
    config_dict,
    exit_status,
    format_duration,
    learning_rate,
    open_run,
    positive_problems,
    stop_on_signals,
    verdict_after_update,
)

# ====================================================================================================
# The classifier's validation pass: every process classifies its share of the held-out split, and all
# ====================================================================================================


# Images per forward pass in validation (no gradients, so larger than training batches is fine).
EVAL_BATCH = 128


def model_input(images_unit: torch.Tensor) -> torch.Tensor:
    """What the network sees: ImageNet-normalised images, channels-last (faster convolutions)."""
    return classifier_normalize(images_unit).contiguous(memory_format=torch.channels_last)


@dataclass
class Evaluation:
    """Per-image results on the validation split, identical on every process."""

    indices: np.ndarray  # dataset indices, sorted
    labels: np.ndarray
    predictions: np.ndarray
    confidences: np.ndarray  # softmax probability of the predicted class
    losses: np.ndarray

    @property
    def loss(self) -> float:
        return float(self.losses.mean()) if len(self.losses) else math.nan

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).mean()) if len(self.labels) else math.nan

    def records(self) -> list[dict[str, Any]]:
        """One JSON-able dict per validation image: index (into the cache), label, prediction, confidence."""
        columns = (self.indices, self.labels, self.predictions, self.confidences)
        return [
            {"index": int(i), "label": int(y), "prediction": int(p), "confidence": float(c)}
            for i, y, p, c in zip(*columns, strict=True)
        ]

    def confusion_matrix(self, num_classes: int) -> np.ndarray:
        """counts[true, predicted]."""
        counts = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(counts, (self.labels, self.predictions), 1)
        return counts


def share_batchnorm_statistics(raw_model: nn.Module, accelerator) -> None:
    """Give every rank the main process's BatchNorm running statistics.

    DDP sends rank 0's buffers to the others at the start of each forward pass, so after an epoch's last step
    every rank holds statistics of its own shard only; validation on those would not be the saved model's.
    """
    if accelerator.num_processes > 1:
        for buffer in raw_model.buffers():
            torch.distributed.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate(
    raw_model: nn.Module, cache: ImageCache, val_idx: np.ndarray, accelerator, show_progress: bool
) -> Evaluation:
    """Run this process's share of the validation split, then gather every share onto every process.

    Uses the plain module (no DDP wrapper), so ranks with fewer real images need not run the same number
    of forward passes; shares are padded to equal length (index -1) only for the gather.
    """
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    per_rank = math.ceil(len(val_idx) / world)
    mine = val_idx[rank * per_rank : (rank + 1) * per_rank]
    padded = np.full(per_rank, -1, dtype=np.int64)
    padded[: len(mine)] = mine
    unset = torch.full((per_rank,), -1, dtype=torch.int64, device=device)
    results = {
        "index": torch.from_numpy(padded).to(device),
        "label": unset.clone(),
        "prediction": unset.clone(),
        "confidence": torch.zeros(per_rank, device=device),
        "loss": torch.zeros(per_rank, device=device),
    }
    raw_model.eval()
    for start in tqdm(
        range(0, len(mine), EVAL_BATCH), desc="validate", unit="batch", leave=False, disable=not show_progress
    ):
        chunk = mine[start : start + EVAL_BATCH]
        labels = torch.from_numpy(cache.labels[chunk]).to(device)
        with accelerator.autocast():
            logits = raw_model(model_input(to_unit_float(gather_batch(cache.images, chunk).to(device)))).float()
        window = slice(start, start + len(chunk))
        results["label"][window] = labels
        results["confidence"][window], results["prediction"][window] = logits.softmax(dim=1).max(dim=1)
        results["loss"][window] = F.cross_entropy(logits, labels, reduction="none")
    gathered = {name: tensor.cpu().numpy() for name, tensor in accelerator.gather(results).items()}
    keep = gathered["index"] >= 0
    order = np.argsort(gathered["index"][keep])
    return Evaluation(*(gathered[name][keep][order] for name in ("index", "label", "prediction", "confidence", "loss")))


def format_confusion_matrix(counts: np.ndarray, class_names: list[str]) -> str:
    """Rows: true class; columns: predicted class (numbered like the rows); plus per-class accuracy."""
    width = max(5, len(str(counts.max())) + 1)
    name_width = max(len(name) for name in class_names) + 4
    lines = [" " * name_width + "".join(f"{i:>{width}}" for i in range(len(class_names))) + "   accuracy"]
    for i, (name, row) in enumerate(zip(class_names, counts, strict=True)):
        accuracy = row[i] / row.sum() if row.sum() else math.nan
        label = f"{i:>2} {name}"
        lines.append(f"{label:<{name_width}}" + "".join(f"{value:>{width}}" for value in row) + f"   {accuracy:8.1%}")
    return "\n".join(lines)


# ====================================================================================================
# Train the cat classifier (a torchvision backbone) on an image folder, on 1..N processes (CPU or GPUs).
# ====================================================================================================


WEIGHT_SUFFIXES = (".safetensors", ".pt")


BEST_STEM = "cats_model_best"


# Complete training states kept per run: resume needs only the newest, and each holds weights + Adam moments.
KEEP_STATES = 1


LEVELS = data.AUGMENTATION_LEVELS


@dataclass
class TrainConfig:
    data_dir: str | None = option(None, "image folder DATA_DIR/<class>/*.jpg", positional=True)
    epochs: int = option(10, "passes over the training split (in total, counting resumed epochs)")
    batch_size: int = option(32, "GLOBAL batch per optimizer step, summed over all processes")
    lr: float = option(1e-4, "peak AdamW LR (warmup, then cosine to 0); from scratch 1e-3..3e-3 learns faster")
    backbone: str = option("resnet18", "torchvision architecture (head replaced for our classes)", choices=BACKBONES)
    no_pretrained: bool = option(False, "random init instead of ImageNet weights (which need internet or $TORCH_HOME)")
    output: str = option("checkpoints/cats_model.safetensors", "final weights (.safetensors; or .pt + .pt.json)")
    image_size: int = option(64, "training resolution (images are resized + centre-cropped once, then cached)")
    val_split: float = option(0.2, "fraction of every class held out for validation (stratified); 0 = none")
    augmentation_level: str = option("medium", "none, basic (flips), medium (+ crops), full (+ colour)", choices=LEVELS)
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_fraction: float = option(0.05, "fraction of all optimizer steps spent warming the learning rate up")
    device: str = option("auto", "where to train", choices=DEVICES)
    mixed_precision: str = option("auto", "auto: bf16 where the GPU/CPU has it, fp16 on T4", choices=PRECISIONS)
    seed: int = option(0, "seed of the split, the initial head/weights, the batch order and augmentation")
    run_name: str = option("classifier", "run folder under --output-dir; the same name resumes the same run")
    output_dir: str = option("checkpoints", "where run folders go")
    resume: str = option("auto", "auto: the run's newest epoch; never: fresh only; or a state folder to load")
    cache_dir: str = option("", "where the image cache goes (default: DATA_DIR/.tiny-cats-cache, else ~/.cache)")
    tracker_dir: str = option("", "where --report-to writes its files (default: the run folder)")


def validate_config(cfg: TrainConfig, num_processes: int = 1) -> None:
    """Raise one UserError listing every bad flag or combination, before any work is done."""
    problems = positive_problems(cfg, "epochs", "batch_size")
    if not MIN_CLASSIFIER_IMAGE_SIZE <= cfg.image_size <= MAX_IMAGE_SIZE:
        problems.append(f"--image-size must be at least {MIN_CLASSIFIER_IMAGE_SIZE} and at most {MAX_IMAGE_SIZE}")
    if not cfg.lr > 0:
        problems.append(f"--lr must be positive (got {cfg.lr})")
    if cfg.weight_decay < 0:
        problems.append(f"--weight-decay must be >= 0 (got {cfg.weight_decay})")
    if not 0 <= cfg.warmup_fraction < 1:
        problems.append(f"--warmup-fraction must be in [0, 1) (got {cfg.warmup_fraction})")
    if not 0 <= cfg.val_split < 1:
        problems.append(f"--val-split must be in [0, 1) (got {cfg.val_split})")
    if cfg.backbone not in BACKBONES:
        problems.append(f"unknown --backbone {cfg.backbone!r}; choose one of {', '.join(BACKBONES)}")
    if cfg.augmentation_level not in LEVELS:
        problems.append(f"unknown --augmentation-level {cfg.augmentation_level!r}; choose one of {', '.join(LEVELS)}")
    if Path(cfg.output).suffix not in WEIGHT_SUFFIXES:
        problems.append(f"--output {cfg.output} must end in .safetensors or .pt")
    problems += common_problems(cfg.data_dir, cfg.batch_size, num_processes, cfg.resume)
    if problems:
        raise UserError("; ".join(problems))


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The backbone, or one UserError that says how to get going when ImageNet weights are unreachable."""
    try:
        return build_classifier(cfg.backbone, num_classes, pretrained=not cfg.no_pretrained)
    except PretrainedWeightsUnavailable as error:
        raise UserError(
            f"cannot get the pretrained {cfg.backbone} weights ({error.reason}) — pass --no-pretrained "
            f"to train from scratch, or put the file {error.weights_file.name} into "
            f"{error.weights_file.parent} (that is $TORCH_HOME/hub/checkpoints/) and run again"
        ) from error


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """What a training state records besides the weights and the optimizer."""

    epoch: int = 0  # finished epochs
    best_accuracy: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0

    def improved_by(self, evaluation: Evaluation) -> bool:
        """Best = highest validation accuracy; equal accuracy with a lower loss also counts."""
        return (evaluation.accuracy, -evaluation.loss) > (self.best_accuracy, -self.best_loss)


@dataclass
class Schedule:
    """The split, and the optimizer steps per epoch, in all and of warmup: every step's LR comes from these."""

    train_idx: np.ndarray
    val_idx: np.ndarray
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_schedule(cfg: TrainConfig, cache: ImageCache) -> Schedule:
    train_idx, val_idx = data.stratified_split(cache.labels, cfg.val_split, cfg.seed)
    if len(train_idx) == 0:
        raise UserError(f"no training images left after holding out --val-split {cfg.val_split} — lower it")
    per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    return Schedule(train_idx, val_idx, per_epoch, total, round(cfg.warmup_fraction * total))


def architecture(cfg: TrainConfig, class_names: list[str]) -> dict[str, Any]:
    """What must match for a saved state to load into this run's model."""
    return {"backbone": cfg.backbone, "image_size": cfg.image_size, "class_names": list(class_names)}


def main(cfg: TrainConfig, on_checkpoint=None) -> dict[str, Any]:
    """Train (or continue) the run. Returns run_dir, final / best weight paths, the last metrics, the validation
    predictions of the final model and its confusion matrix. A signal stops it (exit status 128 + N), keeping
    the last finished epoch."""
    spec = RunSpec("classifier", validate_config, min_classes=2, outputs=[Path(cfg.output)])
    with open_run(cfg, spec, on_checkpoint, keep_states=KEEP_STATES) as run:
        return train(run, cfg)


def train(run: Run, cfg: TrainConfig) -> dict[str, Any]:
    """Split -> model -> optimizer -> resume -> epochs (train, validate, save) -> final weights and report."""
    accelerator, cache = run.accelerator, run.cache
    schedule = make_schedule(cfg, cache)
    run.logger.info("split: %d train, %d validation", len(schedule.train_idx), len(schedule.val_idx))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with accelerator.main_process_first():  # one download into the torch.hub cache, not one per rank
        raw_model = build_model(cfg, cache.num_classes).to(run.device, memory_format=torch.channels_last)
    # Fused AdamW: one kernel for all parameters, and it can skip a non-finite step on the device.
    fused = run.device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    state, progress = TrainingState(raw_model, optimizer), Progress()
    loaded = run.load_resume_state()
    if loaded is not None:
        check_same_setup(run.resume_from, loaded[1].get("architecture"), architecture(cfg, cache.class_names))
        state.load(loaded[1], run.resume_from)
        try:
            progress = Progress(**loaded[1]["progress"])
        except (KeyError, TypeError) as error:
            raise UserError(
                f"{run.resume_from} records no readable epoch progress ({error}) — not this kit's state"
            ) from error
    run.begin(progress.epoch * schedule.steps_per_epoch, schedule.total_steps, f"after epoch {progress.epoch}")
    origin = "from scratch" if cfg.no_pretrained else "ImageNet weights"
    size = sum(p.numel() for p in raw_model.parameters()) / 1e6
    run.logger.info("model %s (%s): %.2fM parameters", cfg.backbone, origin, size)

    source, best_path = data.ImageSource(cache, run.device), run.run_dir / (BEST_STEM + Path(cfg.output).suffix)
    metrics, evaluation = {}, None
    with stop_on_signals() as signals:
        while progress.epoch < cfg.epochs:
            metrics, evaluation = train_epoch(run, cfg, model, state, source, schedule, progress.epoch, signals)
            progress.epoch += 1
            if evaluation is not None and progress.improved_by(evaluation):
                progress.best_accuracy, progress.best_loss = evaluation.accuracy, evaluation.loss
                progress.best_epoch = progress.epoch
                if run.is_main:
                    save_model(best_path, raw_model, weights_metadata(cfg, cache, metrics, progress.epoch))
            record = {"progress": vars(progress).copy(), "architecture": architecture(cfg, cache.class_names)}
            run.save_state(progress.epoch * schedule.steps_per_epoch, state.state_dict(**record))
    return finish(run, cfg, raw_model, schedule.val_idx, metrics, evaluation, progress, best_path)


def train_epoch(
    run: Run, cfg: TrainConfig, model, state: TrainingState, source, schedule: Schedule, epoch: int, signals
):
    """Train epoch `epoch` (0-based), validate, log; returns (metrics, evaluation or None).

    A signal stops the run at the next step (exit status 128 + N); the last finished epoch's state is kept.
    """
    accelerator, first_step = run.accelerator, epoch * schedule.steps_per_epoch
    model.train()
    started = time.perf_counter()
    totals = torch.zeros(3, device=run.device)  # loss sum, correct, images
    health, agreement = FirstBadStep(run.device), StopAgreement(accelerator)
    steps = range(first_step, first_step + schedule.steps_per_epoch)
    bar = tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", disable=not run.is_main, leave=False)
    for step in bar:
        totals += train_step(cfg, model, state, source, schedule, step, health, accelerator)
        stopped = agreement.reason(signals.signum, False)
        if stopped:
            run.logger.info("stopped by %s in epoch %d; the state after epoch %d is kept", stopped, epoch + 1, epoch)
            raise SystemExit(exit_status(stopped))
        if run.is_main and (step - first_step) % 10 == 0:
            bar.set_postfix(loss=f"{(totals[0] / totals[2]).item():.4f}")
    share_batchnorm_statistics(state.model, accelerator)
    bad = health.first()
    if bad is not None:
        raise UserError(
            f"training {bad[1]} became NaN/inf at step {bad[0]} (epoch {epoch + 1}) — lower --lr, or use "
            "--mixed-precision no/bf16; the last finished epoch's state is kept"
        )
    loss_sum, correct, seen = accelerator.reduce(totals, reduction="sum").tolist()
    metrics: dict[str, Any] = {"epoch": epoch + 1, "step": first_step + schedule.steps_per_epoch}
    metrics.update(lr=state.optimizer.param_groups[0]["lr"], train_loss=loss_sum / seen, train_acc=correct / seen)
    metrics["img_per_s"] = seen / (time.perf_counter() - started)
    evaluation = None
    if len(schedule.val_idx):
        evaluation = evaluate(state.model, run.cache, schedule.val_idx, accelerator, show_progress=run.is_main)
        metrics.update(val_loss=evaluation.loss, val_acc=evaluation.accuracy)
    metrics["seconds"] = time.perf_counter() - started
    log_epoch(run, cfg, metrics, epoch)
    return metrics, evaluation


def train_step(cfg: TrainConfig, model, state: TrainingState, source, schedule, step: int, health, accelerator):
    """One optimizer step on this rank's share of global batch `step`; returns (loss sum, correct, images)."""
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(step, cfg.lr, schedule.warmup_steps, "cosine", schedule.total_steps)
    # Dropout and stochastic depth (mobilenet, efficientnet, convnext) use the global RNG: seeding it from
    # (seed, step, rank) makes them, like the batches, continue exactly after a resume.
    torch.manual_seed((((cfg.seed * 1_000_003 + step) << 16) + accelerator.process_index) % (1 << 63))
    rank, world = accelerator.process_index, accelerator.num_processes
    level, pool = cfg.augmentation_level, schedule.train_idx
    images, labels = data.training_batch(source, cfg.batch_size, step, cfg.seed, level, rank, world, pool=pool)
    logits = model(model_input(images))
    loss = F.cross_entropy(logits.float(), labels)
    accelerator.backward(loss)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in state.model.parameters() if p.grad is not None])
    # A NaN/inf loss or gradient must not reach the weights: the fused optimizer then skips this step.
    verdict = apply_update_only_if_finite(state.optimizer, loss.detach(), grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    health.record(step + 1, verdict_after_update(verdict, state.model.parameters()))
    correct = (logits.argmax(dim=1) == labels).sum().float()
    return torch.stack([loss.detach() * len(labels), correct, torch.full_like(correct, len(labels))])


def log_epoch(run: Run, cfg: TrainConfig, metrics: dict[str, Any], epoch: int) -> None:
    eta_s = metrics["seconds"] * (cfg.epochs - epoch - 1)
    validation = f" | val loss {metrics['val_loss']:.4f} acc {metrics['val_acc']:.2%}" if "val_acc" in metrics else ""
    run.logger.info(
        "epoch %d/%d | train loss %.4f acc %.2f%%%s | lr %.2e | %.0f img/s | %.1fs, eta %s",
        *(epoch + 1, cfg.epochs, metrics["train_loss"], 100 * metrics["train_acc"], validation, metrics["lr"]),
        *(metrics["img_per_s"], metrics["seconds"], format_duration(eta_s)),
    )
    run.log_metrics(metrics["step"], eta_s, **{k: v for k, v in metrics.items() if k != "step"})


def weights_metadata(cfg: TrainConfig, cache: ImageCache, metrics: dict[str, Any], epoch: int) -> dict[str, Any]:
    names, size = cache.class_names, cfg.image_size
    return classifier_metadata(
        config_dict(cfg), backbone=cfg.backbone, image_size=size, class_names=names, metrics=metrics, epoch=epoch
    )


def finish(run: Run, cfg: TrainConfig, raw_model, val_idx, metrics, evaluation, progress: Progress, best_path: Path):
    """The final report (confusion matrix) and weights; returns the run's summary."""
    cache = run.cache
    if evaluation is None and len(val_idx):  # a finished run started again: report on its final weights
        evaluation = evaluate(raw_model, cache, val_idx, run.accelerator, show_progress=run.is_main)
        metrics = {"epoch": progress.epoch, "val_loss": evaluation.loss, "val_acc": evaluation.accuracy}
    best = best_path if best_path.exists() else None
    summary = {"run_dir": run.run_dir, "final": Path(cfg.output), "metrics": metrics, "best": best}
    summary.update(best_epoch=progress.best_epoch, class_names=list(cache.class_names))
    if evaluation is not None:
        confusion = evaluation.confusion_matrix(cache.num_classes)
        summary.update(confusion_matrix=confusion.tolist(), val_predictions=evaluation.records())
        table = format_confusion_matrix(confusion, cache.class_names)
        run.logger.info(
            "validation of the final model: accuracy %.2f%% (%d images); confusion matrix (rows: true, columns: "
            "predicted):\n%s",
            100 * evaluation.accuracy,
            len(evaluation.labels),
            table,
        )
    if run.is_main:
        save_model(cfg.output, raw_model, weights_metadata(cfg, cache, metrics, progress.epoch))
        best_note = f"; best epoch {progress.best_epoch} ({progress.best_accuracy:.2%}) in {best}" if best else ""
        run.logger.info("done: final weights %s%s", cfg.output, best_note)
    run.accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    run_main(main, TrainConfig, "Train the cat image classifier (torchvision backbone).")
