"""Train the cat classifier (a torchvision backbone) on an image folder, on 1..N processes (CPU or GPUs).

    python scripts/train.py data/cats --no-pretrained --epochs 1 --batch-size 8       # local debug run
    python scripts/train.py data/cats --no-pretrained --epochs 6 --lr 2e-3            # toy cats: >98%, CPU
    accelerate launch --multi_gpu --num_processes 4 scripts/train.py data/cats         # any GPU box

A run lives in <output-dir>/<run-name>/ (scripts/lib/run.py) with cats_model_best.safetensors; the final weights go
to --output. Every epoch ends with a validation pass and a complete training state, so the same command continues an
interrupted run from its last finished epoch. The batch order and augmentation of optimizer step s are drawn for the
whole global batch from (seed, s), so 1 and N processes train on the same samples.
Reading order: `main` -> `train` (set-up, top to bottom) -> `train_epoch` -> `train_step`; `evaluate` validates.
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
from scripts.lib.checkpoints import MAX_IMAGE_SIZE, MIN_CLASSIFIER_IMAGE_SIZE, TrainingState, classifier_metadata
from scripts.lib.checkpoints import classifier_normalize
from scripts.lib.cli import UserError, option, run_main
from scripts.lib.run import NonFiniteGuard, Run, RunSpec, Stopper, TrainerConfig, common_problems, config_dict
from scripts.lib.run import adamw, exit_status, format_duration, learning_rate, open_run, positive_problems

BEST_STEM = "cats_model_best"
EVAL_BATCH = 128  # images per validation forward pass (no gradients: larger than training batches is fine)
NAN_ADVICE = "lower --lr, or use --mixed-precision no/bf16"


@dataclass
class TrainConfig(TrainerConfig):
    lr: float = option(1e-4, "peak AdamW LR (warmup, then cosine to 0); from scratch 1e-3..3e-3 learns faster")
    weight_decay: float = option(0.01, "AdamW weight decay")
    augmentation_level: str = option(
        "medium", "none, basic (flips), medium (+ crops), full (+ colour)", choices=data.AUGMENTATION_LEVELS
    )
    run_name: str = option("classifier", "run folder under --output-dir; the same name resumes the same run")
    epochs: int = option(10, "passes over the training split (in total, counting resumed epochs)")
    backbone: str = option("resnet18", "torchvision architecture (head replaced for our classes)", choices=BACKBONES)
    no_pretrained: bool = option(False, "random init instead of ImageNet weights (which need internet or $TORCH_HOME)")
    output: str = option("checkpoints/cats_model.safetensors", "final weights (.safetensors; or .pt + .pt.json)")
    val_split: float = option(0.2, "fraction of every class held out for validation (stratified); 0 = none")
    warmup_fraction: float = option(0.05, "fraction of all optimizer steps spent warming the learning rate up")


def validate_config(cfg: TrainConfig, num_processes: int = 1) -> None:
    """Raise one UserError listing every bad flag or combination, before any work is done."""
    problems = common_problems(cfg, num_processes, MIN_CLASSIFIER_IMAGE_SIZE, MAX_IMAGE_SIZE)
    problems += positive_problems(cfg, "epochs")
    for name in ("warmup_fraction", "val_split"):
        if not 0 <= getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be in [0, 1) (got {getattr(cfg, name)})")
    if cfg.backbone not in BACKBONES:
        problems.append(f"unknown --backbone {cfg.backbone!r}; choose one of {', '.join(BACKBONES)}")
    if Path(cfg.output).suffix not in (".safetensors", ".pt"):
        problems.append(f"--output {cfg.output} must end in .safetensors or .pt")
    if problems:
        raise UserError("; ".join(problems))


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The backbone, or one UserError that says how to get going when ImageNet weights are unreachable."""
    try:
        return build_classifier(cfg.backbone, num_classes, pretrained=not cfg.no_pretrained)
    except PretrainedWeightsUnavailable as error:
        file = error.weights_file
        raise UserError(
            f"cannot get the pretrained {cfg.backbone} weights ({error.reason}) — pass --no-pretrained to train from "
            f"scratch, or put {file.name} into {file.parent} ($TORCH_HOME/hub/checkpoints/)"
        ) from error


@dataclass
class Schedule:
    """The split, and the optimizer steps per epoch, in all and of warmup: every step's LR comes from these."""

    train_idx: np.ndarray
    val_idx: np.ndarray
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_schedule(cfg: TrainConfig, labels: np.ndarray) -> Schedule:
    train_idx, val_idx = data.stratified_split(labels, cfg.val_split, cfg.seed)
    if len(train_idx) == 0:
        raise UserError(f"no training images left after holding out --val-split {cfg.val_split} — lower it")
    per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    return Schedule(train_idx, val_idx, per_epoch, total, round(cfg.warmup_fraction * total))


@dataclass
class Progress:
    """What a training state records besides the weights and the optimizer."""

    epoch: int = 0  # finished epochs
    best_accuracy: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0


def main(cfg: TrainConfig, on_checkpoint=None) -> dict[str, Any]:
    """Train (or continue) the run. Returns run_dir, final / best weight paths, the last metrics, the validation
    predictions of the final model and its confusion matrix. A signal stops it (exit status 128 + N), keeping the last
    finished epoch."""
    spec = RunSpec("classifier", validate_config, [Path(cfg.output)], min_classes=2)
    with open_run(cfg, spec, on_checkpoint) as run:
        return train(run, cfg)


def train(run: Run, cfg: TrainConfig) -> dict[str, Any]:
    """Split -> model -> optimizer -> resume -> epochs (train, validate, save) -> final weights and report."""
    accelerator, cache = run.accelerator, run.cache
    schedule = make_schedule(cfg, cache.labels)
    run.log.info("split: %d train, %d validation", len(schedule.train_idx), len(schedule.val_idx))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with accelerator.main_process_first():  # one download into the torch.hub cache, not one per rank
        raw_model = build_model(cfg, len(cache.class_names)).to(run.device, memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(raw_model, adamw(raw_model, cfg))
    state = TrainingState(raw_model, optimizer)
    architecture = {"backbone": cfg.backbone, "image_size": cfg.image_size, "class_names": list(cache.class_names)}
    _, saved = run.restore(state, architecture)
    try:
        progress = Progress(**saved["progress"]) if saved else Progress()
    except (KeyError, TypeError) as error:
        raise UserError(f"{run.resumed[0]}: its record 'progress' is damaged ({error}) — use another state") from None
    run.begin(progress.epoch * schedule.steps_per_epoch, schedule.total_steps, f"after epoch {progress.epoch}")
    origin = "from scratch" if cfg.no_pretrained else "ImageNet weights"
    size = sum(p.numel() for p in raw_model.parameters()) / 1e6
    run.log.info("model %s (%s): %.2fM parameters", cfg.backbone, origin, size)
    source, best = data.ImageSource(cache, run.device), run.run_dir / (BEST_STEM + Path(cfg.output).suffix)
    metrics, evaluation = {}, None
    with Stopper(accelerator) as stopper:
        while progress.epoch < cfg.epochs:
            metrics, evaluation = train_epoch(run, cfg, model, state, source, schedule, progress.epoch, stopper)
            progress.epoch += 1
            # Best = highest validation accuracy; equal accuracy with a lower loss also counts.
            if evaluation and (evaluation.accuracy, -evaluation.loss) > (progress.best_accuracy, -progress.best_loss):
                progress.best_accuracy, progress.best_loss = evaluation.accuracy, evaluation.loss
                progress.best_epoch = progress.epoch
                run.write_weights(best, raw_model, weights_metadata(cfg, cache.class_names, metrics, progress.epoch))
            record = {"progress": vars(progress).copy(), "architecture": architecture}
            run.save(progress.epoch * schedule.steps_per_epoch, state.state_dict(**record))
    if evaluation is None and len(schedule.val_idx):  # a finished run started again: report on its final weights
        evaluation = evaluate(raw_model, source, schedule.val_idx, accelerator, show_progress=run.is_main)
        metrics = {"epoch": progress.epoch, "val_loss": evaluation.loss, "val_acc": evaluation.accuracy}
    summary = {"run_dir": run.run_dir, "final": Path(cfg.output), "metrics": metrics, "best_epoch": progress.best_epoch,
               "best": best if best.exists() else None, "class_names": list(cache.class_names)}  # fmt: skip
    if evaluation is not None:
        confusion = evaluation.confusion_matrix(len(cache.class_names))
        summary.update(confusion_matrix=confusion.tolist(), val_predictions=evaluation.records())
        run.log.info("validation of the final model: accuracy %.2f%% (%d images); confusion matrix (rows: true, "
                     "columns: predicted):\n%s", 100 * evaluation.accuracy, len(evaluation.labels),
                     format_confusion_matrix(confusion, cache.class_names))  # fmt: skip
    run.write_weights(Path(cfg.output), raw_model, weights_metadata(cfg, cache.class_names, metrics, progress.epoch))
    note = f"; best epoch {progress.best_epoch} ({progress.best_accuracy:.2%}) in {best}" if summary["best"] else ""
    run.log.info("done: final weights %s%s", cfg.output, note)
    return summary


def train_epoch(
    run: Run, cfg: TrainConfig, model, state: TrainingState, source, schedule: Schedule, epoch: int, stopper
):
    """Train epoch `epoch` (0-based), validate, log; returns (metrics, evaluation or None). A signal stops the run at
    the next step (exit status 128 + N); the last finished epoch's state is kept."""
    accelerator, first_step = run.accelerator, epoch * schedule.steps_per_epoch
    model.train()
    started, totals = time.perf_counter(), torch.zeros(3, device=run.device)  # loss sum, correct, images
    guard = NonFiniteGuard(run.device)
    steps = range(first_step, first_step + schedule.steps_per_epoch)
    bar = tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", disable=not run.is_main, leave=False)
    for step in bar:
        totals += train_step(cfg, model, state, source, schedule, step, guard, accelerator)
        if stopped := stopper.reason(step + 1, step + 1, schedule.total_steps):
            run.log.info("stopped by %s in epoch %d; the state after epoch %d is kept", stopped, epoch + 1, epoch)
            raise SystemExit(exit_status(stopped))
        if run.is_main and (step - first_step) % 10 == 0:
            bar.set_postfix(loss=f"{(totals[0] / totals[2]).item():.4f}")
    if accelerator.num_processes > 1:  # DDP hands out rank 0's BatchNorm statistics only at the next forward
        for buffer in state.model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    guard.check(NAN_ADVICE)
    loss_sum, correct, seen = accelerator.reduce(totals, reduction="sum").tolist()
    metrics: dict[str, Any] = {"epoch": epoch + 1, "lr": state.optimizer.param_groups[0]["lr"],
                               "train_loss": loss_sum / seen, "train_acc": correct / seen,
                               "img_per_s": seen / (time.perf_counter() - started)}  # fmt: skip
    evaluation = None
    if len(schedule.val_idx):
        evaluation = evaluate(state.model, source, schedule.val_idx, accelerator, show_progress=run.is_main)
        metrics.update(val_loss=evaluation.loss, val_acc=evaluation.accuracy)
    metrics["seconds"] = time.perf_counter() - started
    eta_s = metrics["seconds"] * (cfg.epochs - epoch - 1)
    validation = f" | val loss {metrics['val_loss']:.4f} acc {metrics['val_acc']:.2%}" if evaluation else ""
    run.log.info("epoch %d/%d | train loss %.4f acc %.2f%%%s | lr %.2e | %.0f img/s | %.1fs, eta %s", epoch + 1,
                 cfg.epochs, metrics["train_loss"], 100 * metrics["train_acc"], validation, metrics["lr"],
                 metrics["img_per_s"], metrics["seconds"], format_duration(eta_s))  # fmt: skip
    run.record(first_step + schedule.steps_per_epoch, eta_s, **metrics)
    return metrics, evaluation


def train_step(
    cfg: TrainConfig, model, state: TrainingState, source, schedule: Schedule, step: int, guard, accelerator
):
    """One optimizer step on this rank's share of global batch `step`; returns (loss sum, correct, images)."""
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(step, cfg.lr, schedule.warmup_steps, "cosine", schedule.total_steps)
    # Dropout and stochastic depth (mobilenet, efficientnet, convnext) use the global RNG: seeding it per (step, rank)
    # makes them, like the batches, continue exactly after a resume.
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(data.step_seed(cfg.seed, step, rank))
    images, labels = data.training_batch(source, cfg.batch_size, step, cfg.seed, cfg.augmentation_level, rank, world,
                                         pool=schedule.train_idx)  # fmt: skip
    logits = model(model_input(images))
    loss = F.cross_entropy(logits.float(), labels)
    accelerator.backward(loss)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in state.model.parameters() if p.grad is not None])
    guard.step(state.optimizer, step + 1, loss.detach(), grad_norm, state.model.parameters())
    correct = (logits.argmax(dim=1) == labels).sum().float()
    return torch.stack([loss.detach() * len(labels), correct, torch.full_like(correct, len(labels))])


def weights_metadata(cfg: TrainConfig, class_names: list[str], metrics: dict[str, Any], epoch: int) -> dict[str, Any]:
    return classifier_metadata(config_dict(cfg), backbone=cfg.backbone, image_size=cfg.image_size,
                               class_names=class_names, metrics=metrics, epoch=epoch)  # fmt: skip


# --- Validation: every process classifies its share of the held-out split; all end with the same results ---------
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
        columns = zip(self.indices, self.labels, self.predictions, self.confidences, strict=True)
        keys = ("index", "label", "prediction", "confidence")
        return [dict(zip(keys, (int(i), int(y), int(p), float(c)), strict=True)) for i, y, p, c in columns]

    def confusion_matrix(self, num_classes: int) -> np.ndarray:
        """counts[true, predicted]."""
        counts = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(counts, (self.labels, self.predictions), 1)
        return counts


@torch.no_grad()
def evaluate(raw_model: nn.Module, source: data.ImageSource, val_idx: np.ndarray, accelerator, show_progress: bool):
    """This process's share of the validation split, then every share gathered onto every process. The plain module
    (no DDP wrapper) runs, so ranks with fewer images need not run as many forward passes; shares are padded to one
    length (index -1) only for the gather."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    per_rank = math.ceil(len(val_idx) / world)
    mine = val_idx[rank * per_rank : (rank + 1) * per_rank]
    unset = torch.full((per_rank,), -1, dtype=torch.int64, device=device)
    columns = {name: unset.clone() for name in ("index", "label", "prediction")}
    columns.update(confidence=torch.zeros(per_rank, device=device), loss=torch.zeros(per_rank, device=device))
    columns["index"][: len(mine)] = torch.from_numpy(mine).to(device)
    raw_model.eval()
    for start in tqdm(range(0, len(mine), EVAL_BATCH), desc="validate", leave=False, disable=not show_progress):
        chunk, window = mine[start : start + EVAL_BATCH], slice(start, start + EVAL_BATCH)
        images, labels = source.gather(chunk)  # where the training batches come from: on the GPU when they fit
        with accelerator.autocast():
            logits = raw_model(model_input(data.to_unit_float(images))).float()
        columns["label"][window] = labels
        columns["confidence"][window], columns["prediction"][window] = logits.softmax(dim=1).max(dim=1)
        columns["loss"][window] = F.cross_entropy(logits, labels, reduction="none")
    gathered = {name: tensor.cpu().numpy() for name, tensor in accelerator.gather(columns).items()}
    keep = gathered["index"] >= 0
    order = np.argsort(gathered["index"][keep])
    return Evaluation(*(gathered[name][keep][order] for name in ("index", "label", "prediction", "confidence", "loss")))


def format_confusion_matrix(counts: np.ndarray, class_names: list[str]) -> str:
    """Rows: true class; columns: predicted class (numbered like the rows); plus per-class accuracy."""
    width, name_width = max(5, len(str(counts.max())) + 1), max(len(name) for name in class_names) + 4
    lines = [" " * name_width + "".join(f"{i:>{width}}" for i in range(len(class_names))) + "   accuracy"]
    for i, (name, row) in enumerate(zip(class_names, counts, strict=True)):
        accuracy = row[i] / row.sum() if row.sum() else math.nan
        cells = "".join(f"{value:>{width}}" for value in row)
        lines.append(f"{f'{i:>2} {name}':<{name_width}}{cells}   {accuracy:8.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main, TrainConfig, "Train the cat image classifier (torchvision backbone).")
