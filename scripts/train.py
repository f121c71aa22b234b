"""Train the cat classifier (a torchvision backbone) on an image folder, on 1..N processes (CPU or GPUs).

    python scripts/train.py data/cats --no-pretrained --epochs 1 --batch-size 8       # local debug run
    python scripts/train.py data/cats --no-pretrained --epochs 6 --lr 2e-3            # toy cats: >98%, CPU
    accelerate launch --multi_gpu --num_processes 4 scripts/train.py data/cats         # any GPU box

A run lives in <output-dir>/<run-name>/ (config.json, training.log, metrics.jsonl, state/,
cats_model_best.safetensors); the final weights go to --output. Every epoch ends with a validation pass
and a complete training state, so an interrupted run continues from its last finished epoch when started
again with the same command (`--resume auto`; the default --run-name is the fixed "classifier"). The batch
order and augmentation of optimizer step s are drawn for the whole global batch from (seed, s), so 1 and N
processes train on the same samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.classifier import BACKBONES, PretrainedWeightsUnavailable, build_classifier
from scripts.lib.checkpoints import (
    find_resume_state,
    load_training_state,
    prune_states,
    save_training_state,
)
from scripts.lib.cli import UserError, option, run_main
from scripts.lib.batches import AUGMENTATION_LEVELS, gather_batch, stratified_split, to_unit_float, training_batch
from scripts.lib.images import ImageCache, load_or_build_cache
from scripts.lib.model_files import classifier_metadata, classifier_normalize, save_model
from scripts.lib.runlog import (
    MetricsWriter,
    config_dict,
    format_duration,
    log_run_header,
    setup_logger,
    write_config,
)
from scripts.lib.runtime import (
    DEVICES,
    PRECISIONS,
    agree_on_resume_state,
    describe_gpu_failure,
    make_accelerator,
    shared_config_problems,
)

WEIGHT_SUFFIXES = (".safetensors", ".pt")
BEST_STEM = "cats_model_best"
MIN_IMAGE_SIZE = 16
# Images per forward pass in validation (no gradients, so larger than training batches is fine).
EVAL_BATCH = 128
# Complete training states kept per run: resume needs only the newest, and each holds weights + Adam moments.
KEEP_STATES = 1


@dataclass
class TrainConfig:
    data_dir: str | None = option(None, "image folder DATA_DIR/<class>/*.jpg", positional=True)
    epochs: int = option(10, "passes over the training split (in total, counting resumed epochs)")
    batch_size: int = option(32, "GLOBAL batch per optimizer step, summed over all processes")
    lr: float = option(
        1e-4,
        "peak learning rate (AdamW): linear warmup, then cosine decay to 0. From scratch "
        "on small data 1e-3..3e-3 learns much faster",
    )
    backbone: str = option(
        "resnet18", "torchvision architecture (its head is replaced for our classes)", choices=BACKBONES
    )
    no_pretrained: bool = option(
        False,
        "start from random weights instead of torchvision's ImageNet weights "
        "(which need internet or a file in $TORCH_HOME/hub/checkpoints)",
    )
    output: str = option(
        "checkpoints/cats_model.safetensors",
        "final weights (.safetensors; or .pt = plain tensor state dict + .pt.json metadata)",
    )
    image_size: int = option(
        64, "training resolution (images are resized + centre-cropped once, then cached)"
    )
    val_split: float = option(
        0.2, "fraction of every class held out for validation (stratified, seeded); 0 = no validation"
    )
    augmentation_level: str = option(
        "medium",
        "training augmentation: basic = flips, medium = + crops, full = + colour jitter",
        choices=AUGMENTATION_LEVELS,
    )
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_fraction: float = option(
        0.05, "fraction of all optimizer steps spent warming the learning rate up"
    )
    device: str = option("auto", "where to train", choices=DEVICES)
    mixed_precision: str = option(
        "auto",
        "auto: bf16 on Ampere+, fp16 on T4/Volta, none on CPU (bf16 also works on CPUs with AMX/AVX512-BF16)",
        choices=PRECISIONS,
    )
    seed: int = option(0, "seed of the split, the initial head/weights, the batch order and augmentation")
    run_name: str = option("classifier", "run folder under --output-dir; the same name resumes the same run")
    output_dir: str = option("checkpoints", "where run folders go")
    resume: str = option(
        "auto",
        "auto: continue the newest complete epoch of --run-name if it has one; "
        "never: start fresh (refused if the run has states); or a state folder to load",
    )


# ---------------------------------------------------------------------------------------------------------
# Configuration checks and the learning-rate schedule
# ---------------------------------------------------------------------------------------------------------
def validate_config(cfg: TrainConfig, num_processes: int = 1) -> None:
    """Raise one UserError listing every bad flag or combination, before any work is done."""
    problems = []
    problems += [
        f"--{name} must be positive (got {value})"
        for name, value in {"epochs": cfg.epochs, "batch-size": cfg.batch_size}.items()
        if value < 1
    ]
    if cfg.image_size < MIN_IMAGE_SIZE:
        problems.append(f"--image-size must be at least {MIN_IMAGE_SIZE} (got {cfg.image_size})")
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
    if cfg.augmentation_level not in AUGMENTATION_LEVELS:
        problems.append(
            f"unknown --augmentation-level {cfg.augmentation_level!r}; choose one of "
            f"{', '.join(AUGMENTATION_LEVELS)}"
        )
    if Path(cfg.output).suffix not in WEIGHT_SUFFIXES:
        problems.append(f"--output {cfg.output} must end in .safetensors or .pt")
    problems += shared_config_problems(cfg.data_dir, cfg.batch_size, num_processes, cfg.resume)
    if problems:
        raise UserError("; ".join(problems))


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup to `peak`, then cosine decay towards 0.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------------------
# Model and evaluation
# ---------------------------------------------------------------------------------------------------------
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


def model_input(images_unit: torch.Tensor) -> torch.Tensor:
    """What the network sees: ImageNet-normalised images, channels-last (faster convolutions)."""
    return classifier_normalize(images_unit).contiguous(memory_format=torch.channels_last)


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
    results = {
        "index": torch.from_numpy(padded).to(device),
        "label": torch.full((per_rank,), -1, dtype=torch.int64, device=device),
        "prediction": torch.full((per_rank,), -1, dtype=torch.int64, device=device),
        "confidence": torch.zeros(per_rank, device=device),
        "loss": torch.zeros(per_rank, device=device),
    }
    raw_model.eval()
    for start in tqdm(
        range(0, len(mine), EVAL_BATCH), desc="validate", unit="batch", leave=False, disable=not show_progress
    ):
        chunk = mine[start : start + EVAL_BATCH]
        labels = torch.from_numpy(cache.labels[chunk]).to(device)
        images = to_unit_float(gather_batch(cache.images, chunk).to(device))
        with accelerator.autocast():
            logits = raw_model(model_input(images)).float()
        probabilities = logits.softmax(dim=1)
        window = slice(start, start + len(chunk))
        results["label"][window] = labels
        results["confidence"][window], results["prediction"][window] = probabilities.max(dim=1)
        results["loss"][window] = F.cross_entropy(logits, labels, reduction="none")
    gathered = {name: tensor.cpu().numpy() for name, tensor in accelerator.gather(results).items()}
    keep = gathered["index"] >= 0
    order = np.argsort(gathered["index"][keep])
    return Evaluation(
        *(gathered[name][keep][order] for name in ("index", "label", "prediction", "confidence", "loss"))
    )


def format_confusion_matrix(counts: np.ndarray, class_names: list[str]) -> str:
    """Rows: true class; columns: predicted class (numbered like the rows); plus per-class accuracy."""
    width = max(5, len(str(counts.max())) + 1)
    name_width = max(len(name) for name in class_names) + 4
    header = " " * name_width + "".join(f"{i:>{width}}" for i in range(len(class_names))) + "   accuracy"
    lines = [header]
    for i, (name, row) in enumerate(zip(class_names, counts, strict=True)):
        accuracy = row[i] / row.sum() if row.sum() else math.nan
        label = f"{i:>2} {name}"
        lines.append(
            f"{label:<{name_width}}" + "".join(f"{value:>{width}}" for value in row) + f"   {accuracy:8.1%}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Training state (epoch-granular resume)
# ---------------------------------------------------------------------------------------------------------
def architecture(cfg: TrainConfig, class_names: list[str]) -> dict[str, Any]:
    """What must match for a saved state to load into this run's model."""
    return {"backbone": cfg.backbone, "image_size": cfg.image_size, "class_names": list(class_names)}


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


def load_state_into(
    folder: Path, raw_model: nn.Module, optimizer, cfg: TrainConfig, class_names: list[str]
) -> Progress:
    _, state = load_training_state(folder)
    wanted = architecture(cfg, class_names)
    differences = [
        f"{key} {state['architecture'].get(key)} -> {value}"
        for key, value in wanted.items()
        if state["architecture"].get(key) != value
    ]
    if differences:
        raise UserError(
            f"{folder} was trained with a different setup ({'; '.join(differences)}) — use the same "
            "flags and data to continue it, or a new --run-name to start another run"
        )
    raw_model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return Progress(**state["progress"])


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def main(cfg: TrainConfig, on_checkpoint: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Train (or continue) the run. Returns run_dir, final / best weight paths, the last metrics, the
    validation predictions of the final model and its confusion matrix."""
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision)
    validate_config(cfg, accelerator.num_processes)
    is_main, device = accelerator.is_main_process, accelerator.device
    run_dir = Path(cfg.output_dir) / cfg.run_name
    state_root = run_dir / "state"
    logger = setup_logger(run_dir / "training.log", is_main)
    resume_from = agree_on_resume_state(find_resume_state(cfg.resume, state_root), accelerator)
    if is_main:
        write_config(run_dir, cfg)
    log_run_header(logger, cfg, str(device), accelerator.mixed_precision, accelerator.num_processes)

    with accelerator.local_main_process_first():  # one process per machine builds the cache, the others read it
        cache = load_or_build_cache(cfg.data_dir, cfg.image_size, log=logger, show_progress=is_main)
    train_idx, val_idx = stratified_split(cache.labels, cfg.val_split, cfg.seed)
    if len(train_idx) == 0:
        raise UserError(
            f"no training images left after holding out --val-split {cfg.val_split} — add images "
            "or lower --val-split"
        )
    logger.info(
        "data: %d images (%d train, %d validation), %d classes (%s) from %s",
        len(cache),
        len(train_idx),
        len(val_idx),
        cache.num_classes,
        ", ".join(cache.class_names),
        cfg.data_dir,
    )

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with accelerator.main_process_first():  # one download into the torch.hub cache, not one per rank
        raw_model = build_model(cfg, cache.num_classes)
    raw_model = raw_model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    logger.info(
        "model %s (%s): %.2fM parameters",
        cfg.backbone,
        "from scratch" if cfg.no_pretrained else "ImageNet weights",
        sum(p.numel() for p in raw_model.parameters()) / 1e6,
    )

    progress = Progress()
    if resume_from is not None:
        progress = load_state_into(resume_from, raw_model, optimizer, cfg, cache.class_names)
        logger.info("resuming after epoch %d (%s)", progress.epoch, resume_from)
    else:
        logger.info("starting fresh in %s", run_dir)

    loop = EpochLoop(
        cfg,
        accelerator,
        model,
        raw_model,
        optimizer,
        cache,
        train_idx,
        val_idx,
        logger,
        MetricsWriter(run_dir / "metrics.jsonl", enabled=is_main),
    )
    best_path = run_dir / (BEST_STEM + Path(cfg.output).suffix)
    metrics: dict[str, Any] = {}
    evaluation = None
    try:
        while progress.epoch < cfg.epochs:
            metrics, evaluation = loop.run_epoch(progress.epoch)
            progress.epoch += 1
            if evaluation is not None and progress.improved_by(evaluation):
                progress.best_accuracy, progress.best_loss = evaluation.accuracy, evaluation.loss
                progress.best_epoch = progress.epoch
                if is_main:
                    save_model(best_path, raw_model, loop.metadata(metrics, progress.epoch))
            save_state(state_root, loop, progress, cfg, cache.class_names, is_main, on_checkpoint, logger)
            accelerator.wait_for_everyone()
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
        advice = describe_gpu_failure(error)
        if advice is None:
            raise
        raise UserError(advice) from error

    if evaluation is None and len(val_idx):  # a finished run started again: report on its final weights
        evaluation = evaluate(raw_model, cache, val_idx, accelerator, show_progress=is_main)
        metrics = {"epoch": progress.epoch, "val_loss": evaluation.loss, "val_acc": evaluation.accuracy}
    summary: dict[str, Any] = {
        "run_dir": run_dir,
        "final": Path(cfg.output),
        "metrics": metrics,
        "best": best_path if best_path.exists() else None,
        "best_epoch": progress.best_epoch,
        "class_names": list(cache.class_names),
    }
    if evaluation is not None:
        confusion = evaluation.confusion_matrix(cache.num_classes)
        summary["confusion_matrix"] = confusion.tolist()
        summary["val_predictions"] = evaluation.records()
        logger.info(
            "validation of the final model: accuracy %.2f%% (%d images); confusion matrix (rows: true, "
            "columns: predicted):\n%s",
            100 * evaluation.accuracy,
            len(evaluation.labels),
            format_confusion_matrix(confusion, cache.class_names),
        )
    if is_main:
        save_model(cfg.output, raw_model, loop.metadata(metrics, progress.epoch))
        best_note = (
            f"; best epoch {progress.best_epoch} ({100 * progress.best_accuracy:.2f}%) in {best_path}"
            if summary["best"]
            else ""
        )
        logger.info("done: final weights %s%s", cfg.output, best_note)
    accelerator.wait_for_everyone()
    return summary


def save_state(
    state_root: Path,
    loop: EpochLoop,
    progress: Progress,
    cfg: TrainConfig,
    class_names: list[str],
    is_main: bool,
    on_checkpoint: Callable[[Path], None] | None,
    logger,
) -> None:
    if not is_main:
        return
    state = {
        "model": loop.raw_model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "progress": vars(progress).copy(),
        "architecture": architecture(cfg, class_names),
    }
    folder = save_training_state(state_root, progress.epoch * loop.steps_per_epoch, state)
    prune_states(state_root, KEEP_STATES)
    if on_checkpoint is not None:
        on_checkpoint(folder)
    logger.debug("saved training state %s", folder)


class EpochLoop:
    """One epoch = ceil(train images / batch) optimizer steps, then a validation pass."""

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator,
        model: nn.Module,
        raw_model: nn.Module,
        optimizer,
        cache: ImageCache,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        logger,
        metrics: MetricsWriter,
    ):
        self.cfg, self.accelerator, self.model, self.raw_model, self.optimizer = (
            cfg,
            accelerator,
            model,
            raw_model,
            optimizer,
        )
        self.cache, self.train_idx, self.val_idx, self.logger, self.metrics = (
            cache,
            train_idx,
            val_idx,
            logger,
            metrics,
        )
        self.steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.warmup_fraction * self.total_steps)

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step on this rank's share of global batch `step`: (loss sum, correct, images)."""
        cfg, accelerator = self.cfg, self.accelerator
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.total_steps, cfg.lr, self.warmup_steps)
        # Dropout and stochastic depth (mobilenet, efficientnet, convnext) use the global RNG: seeding it from
        # (seed, step, rank) makes them, like the batches, continue exactly after a resume.
        torch.manual_seed((((cfg.seed * 1_000_003 + step) << 16) + accelerator.process_index) % (1 << 63))
        images, labels = training_batch(
            self.cache,
            cfg.batch_size,
            step,
            cfg.seed,
            cfg.augmentation_level,
            accelerator.device,
            accelerator.process_index,
            accelerator.num_processes,
            pool=self.train_idx,
        )
        with accelerator.autocast():
            logits = self.model(model_input(images))
            loss = F.cross_entropy(logits.float(), labels)
        accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        correct = (logits.argmax(dim=1) == labels).sum().float()
        seen = torch.tensor(float(len(labels)), device=loss.device)
        return torch.stack([loss.detach() * seen, correct, seen])

    def run_epoch(self, epoch: int) -> tuple[dict[str, Any], Evaluation | None]:
        """Train epoch `epoch` (0-based), validate, log; returns (metrics, evaluation or None)."""
        accelerator, is_main = self.accelerator, self.accelerator.is_main_process
        self.model.train()
        started = time.perf_counter()
        totals = torch.zeros(3, device=accelerator.device)
        first_step = epoch * self.steps_per_epoch
        bar = tqdm(
            range(first_step, first_step + self.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            unit="step",
            disable=not is_main,
            dynamic_ncols=True,
            leave=False,
        )
        for step in bar:
            totals += self.train_step(step)
            if is_main and (step - first_step) % 10 == 0:
                bar.set_postfix(loss=f"{(totals[0] / totals[2]).item():.4f}")
        train_seconds = time.perf_counter() - started
        share_batchnorm_statistics(self.raw_model, accelerator)
        loss_sum, correct, seen = accelerator.reduce(totals, reduction="sum").tolist()
        if not math.isfinite(loss_sum):
            raise UserError(
                f"training loss became NaN/inf in epoch {epoch + 1} — lower --lr, or use "
                "--mixed-precision no/bf16"
            )
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": first_step + self.steps_per_epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "img_per_s": seen / train_seconds,
        }
        evaluation = None
        if len(self.val_idx):
            evaluation = evaluate(
                self.raw_model, self.cache, self.val_idx, accelerator, show_progress=is_main
            )
            metrics.update(val_loss=evaluation.loss, val_acc=evaluation.accuracy)
        metrics["seconds"] = time.perf_counter() - started
        remaining = format_duration(metrics["seconds"] * (self.cfg.epochs - epoch - 1))
        validation = (
            f" | val loss {metrics['val_loss']:.4f} acc {100 * metrics['val_acc']:.2f}%"
            if evaluation is not None
            else ""
        )
        self.logger.info(
            "epoch %d/%d | train loss %.4f acc %.2f%%%s | lr %.2e | %.0f img/s | %.1fs, eta %s",
            epoch + 1,
            self.cfg.epochs,
            metrics["train_loss"],
            100 * metrics["train_acc"],
            validation,
            metrics["lr"],
            metrics["img_per_s"],
            metrics["seconds"],
            remaining,
        )
        self.metrics.write(**metrics)
        return metrics, evaluation

    def metadata(self, metrics: dict[str, Any], epoch: int) -> dict[str, Any]:
        return classifier_metadata(
            config_dict(self.cfg),
            backbone=self.cfg.backbone,
            image_size=self.cfg.image_size,
            class_names=self.cache.class_names,
            metrics=metrics,
            epoch=epoch,
        )


if __name__ == "__main__":
    run_main(main, TrainConfig, "Train the cat image classifier (torchvision backbone).")
