"""Check that a weights file is complete, sane and trained, and that the model it describes runs.

    python scripts/verify_checkpoint.py --checkpoint checkpoints/cats_model.safetensors --json

The model is rebuilt from the metadata alone. Where the other commands refuse a damaged file outright, verify reads
it to report all that is wrong. "Trained": the file records progress (step or epoch > 0) AND every tensor a fresh
model initialises to a constant (adaLN-Zero and final layers of a DiT, biases, BatchNorm statistics) has moved off it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scripts.lib import checkpoints, sampling
from scripts.lib.cli import DEVICES, UserError, cpu_threads_option, option, printable, resolve_device_type, run_main
from scripts.lib.cli import refuse

SAMPLES_PER_CLASS = 4
# The forward and sample checks run at most these many classes (spread over all of them): a DiT with thousands of
# classes would otherwise need a batch of thousands of images just to be checked.
MAX_CHECKED_CLASSES = 16
# The checks of `weight_problems`, and what each says when it passes.
WEIGHT_CHECKS = {"keys": "every tensor of the model present, none extra", "shapes": "every shape matches the model",
                 "dtypes": "every dtype fits the model", "finite": "no NaN or inf in any tensor"}  # fmt: skip


def checked_classes(num_classes: int) -> list[int]:
    """Every class id, or MAX_CHECKED_CLASSES of them spread evenly from the first to the last."""
    return torch.linspace(0, num_classes - 1, min(num_classes, MAX_CHECKED_CLASSES)).round().long().tolist()


@dataclass
class VerifyConfig:
    checkpoint: str = option("checkpoints/tinydit_final.safetensors", "weights file (.safetensors, or .pt + .pt.json)")
    json: bool = option(False, "print the report as JSON instead of text")
    device: str = option("auto", "device for the forward pass and the sampling run", choices=DEVICES)
    sample_out: str | None = option(None, "DiT only: grid of the check samples; default: <checkpoint stem>_verify.png")
    sample_steps: int = option(8, "DiT only: sampler steps of the check samples (few: this is a smoke test)")
    cfg_scale: float | None = option(None, f"DiT only: guidance; default as trained, else {sampling.DEFAULT_CFG_SCALE}")
    seed: int = option(0, "seed of the random inputs and sampling noise")
    cpu_threads: int = cpu_threads_option()


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def _examples(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _check(name: str, problems: dict[str, bool], detail_when_passed: str) -> Check:
    """A check from a table of {problem: whether it applies}."""
    found = [problem for problem, applies in problems.items() if applies]
    return Check(name, not found, "; ".join(found) or detail_when_passed)


@dataclass
class Report:
    checkpoint: str
    kind: str | None = None
    model: str | None = None
    file_bytes: int | None = None
    parameters: int | None = None
    trained_for: str | None = None
    classes: list[str] = field(default_factory=list)
    sample: str | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)


def check_trained(state: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], unit: str, progress: int) -> Check:
    """Training recorded AND no tensor that starts constant (zero-init layers, biases, norms) is still at init."""
    constant = [n for n, t in fresh.items() if t.is_floating_point() and t.numel() > 1 and (t == t.flatten()[0]).all()]
    untouched = [name for name in constant if torch.equal(state[name].to(fresh[name].dtype), fresh[name])]
    untouched.sort(key=lambda name: fresh[name].dim() < 2)  # weight matrices first: they tell the most
    problems = {
        f"metadata records {unit} {progress}": progress <= 0,
        f"{len(untouched)} tensors still at their initial value: {_examples(untouched)}": bool(untouched),
    }
    return _check("trained", problems, f"{unit} {progress}; all {len(constant)} constant-initialised tensors moved")


@torch.no_grad()
def check_forward(model: nn.Module, metadata: dict[str, Any], generator: torch.Generator, device: str) -> Check:
    """A DiT on each checked class and the null class, a classifier on 4 random images: right shape, finite, alive."""
    if metadata["kind"] == checkpoints.DIT_KIND:
        labels = torch.tensor([*checked_classes(model.num_classes), model.null_class])
        size = (len(labels), model.in_channels, model.image_size, model.image_size)
        x, t = torch.randn(size, generator=generator), torch.linspace(0, 999, len(labels))
        out = model(x.to(device), t.to(device), labels.to(device)).float().cpu()
        what, ok = "output", f"std {out.std():.3g}"
        inert = {"output is all zero (an untrained DiT)": not out.any()}
    else:
        size = (4, metadata["num_classes"])
        images = torch.rand((4, 3, metadata["image_size"], metadata["image_size"]), generator=generator)
        out = model(checkpoints.classifier_normalize(images, metadata).to(device)).float().cpu()
        what, ok = "logits", f"predicted classes {out.argmax(1).tolist()}"
        inert = {"the same logits for different images": torch.equal(out[0], out[-1])}
    problems = {
        f"{what} shape {tuple(out.shape)} != {size}": out.shape != size,
        f"{what} has NaN/inf": not out.isfinite().all(),
        **inert,
    }
    return _check("forward", problems, f"{what} {tuple(out.shape)}, finite; {ok}")


def check_sample(model: nn.Module, metadata: dict[str, Any], cfg: VerifyConfig, out: Path, device: str) -> Check:
    objective = checkpoints.build_objective_from_metadata(metadata)
    sampler, cfg_scale = sampling.resolve_sampler(objective, None), sampling.guidance_scale(cfg.cfg_scale, metadata)
    labels = sampling.class_grid_labels(checked_classes(model.num_classes), SAMPLES_PER_CLASS, device)
    images = sampling.sample_images(
        model, objective, labels, steps=cfg.sample_steps, cfg_scale=cfg_scale, sampler=sampler, seed=cfg.seed,
        progress="sample check",
    )  # fmt: skip
    if not images.isfinite().all():
        return Check("sample", False, f"{cfg.sample_steps}-step sampling produced NaN/inf")
    try:
        sampling.save_grid(images, out, per_row=SAMPLES_PER_CLASS, what="the check samples")
    except UserError as error:
        return Check("sample", False, str(error))
    how = f"{sampler} {cfg.sample_steps} steps, cfg {cfg_scale:g}"
    return Check("sample", True, f"{len(labels)} images, {how} -> {out}")


def describe(m: dict[str, Any]) -> tuple[str, str]:
    """(model description, training progress) of the metadata, for the report header."""
    if m["kind"] == checkpoints.DIT_KIND:
        model = f"TinyDiT {m['model']}, {m['image_size']} px, {m['in_channels']} channels, objective {m['objective']}"
        return model, f"step {m['step']} ({m['weights']} weights)"
    metrics = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m["metrics"].items() if k != "epoch"]
    progress = f"epoch {m['epoch']}" + (f" ({', '.join(metrics)})" if metrics else "")
    return f"{m['backbone']} classifier, {m['image_size']} px", progress


def verify(cfg: VerifyConfig) -> Report:
    """Run every check that the file allows; later checks are skipped once an earlier one makes them moot."""
    path = Path(cfg.checkpoint)
    out = Path(cfg.sample_out) if cfg.sample_out else path.with_name(f"{path.stem}_verify.png")
    suffixes = sampling.GRID_SUFFIXES
    refuse({
        f"--sample-steps must be positive (got {cfg.sample_steps})": cfg.sample_steps < 1,
        f"--cfg-scale must be >= 0 (got {cfg.cfg_scale})": cfg.cfg_scale is not None and cfg.cfg_scale < 0,
        f"--sample-out must end in {', '.join(suffixes)}": out.suffix.lower() not in suffixes,
        f"--sample-out {printable(out)} is a folder — pass e.g. {printable(out / 'verify.png')}": out.is_dir(),
    })  # fmt: skip
    device, report = resolve_device_type(cfg.device), Report(checkpoint=str(path))
    try:
        state, metadata = checkpoints.load_weights(path)
        report.file_bytes = path.stat().st_size
        report.checks.append(Check("load", True, f"{path.suffix[1:]} file, {len(state)} tensors, metadata present"))
        checkpoints.validate_metadata(metadata, source=path)
    except UserError as error:
        report.checks.append(Check("metadata" if report.checks else "load", False, str(error)))  # the one that failed
        return report
    is_dit = metadata["kind"] == checkpoints.DIT_KIND
    build = checkpoints.build_dit_from_metadata if is_dit else checkpoints.build_classifier_from_metadata
    model, report.kind, report.classes = build(metadata), metadata["kind"], list(metadata["class_names"])
    report.model, report.trained_for = describe(metadata)
    report.checks.append(Check("metadata", True, f"kind '{report.kind}', {len(report.classes)} classes; model rebuilt"))

    fresh = model.state_dict()
    problems = checkpoints.weight_problems(state, fresh)
    for name, detail_when_passed in WEIGHT_CHECKS.items():
        report.checks.append(_check(name, {_examples(problems[name]): bool(problems[name])}, detail_when_passed))
    needed = sum(p.numel() for p in model.parameters())
    report.parameters = sum(state[name].numel() for name, _ in model.named_parameters() if name in state)
    count, short = f"{report.parameters:,} parameters", report.parameters != needed
    report.checks.append(_check("parameters", {f"{count}, the model needs {needed:,}": short}, count))
    if any(problems[name] for name in ("keys", "shapes", "dtypes")):  # the tensors cannot be compared or loaded
        return report
    unit = "step" if is_dit else "epoch"
    report.checks.append(check_trained(state, fresh, unit, metadata[unit]))
    if not report.passed:  # running NaN weights or an untrained net tells nothing more
        return report

    model.load_state_dict(state, strict=True)  # every check of checkpoints.load_strict has passed above
    model = model.to(device).eval()
    report.checks.append(check_forward(model, metadata, torch.Generator().manual_seed(cfg.seed), device))
    if is_dit and report.passed:
        report.checks.append(check_sample(model, metadata, cfg, out, device))
        report.sample = str(out) if report.passed else None
    return report


def format_report(report: Report) -> str:
    size = f" ({report.file_bytes / 2**20:.2f} MiB)" if report.file_bytes is not None else ""
    header = {
        "checkpoint": f"{printable(report.checkpoint)}{size}", "kind": report.kind, "model": report.model,
        "parameters": None if report.parameters is None else f"{report.parameters:,}", "trained": report.trained_for,
        "classes": f"{len(report.classes)}: {_examples(report.classes, 20)}" if report.classes else None,
        "sample": report.sample,
    }  # fmt: skip
    width, passed = max(len(check.name) for check in report.checks), sum(check.passed for check in report.checks)
    return "\n".join(
        [f"{name:<11} {value}" for name, value in header.items() if value is not None]
        + ["checks", *(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in report.checks)]
        + [f"result      {'PASSED' if report.passed else 'FAILED'} ({passed}/{len(report.checks)} checks passed)"]
    )


def main(cfg: VerifyConfig) -> Report:
    report = verify(cfg)
    as_json = json.dumps({**dataclasses.asdict(report), "passed": report.passed}, indent=2)
    print(as_json if cfg.json else format_report(report))
    if not report.passed:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.checks if not c.passed)
        raise UserError(f"{printable(report.checkpoint)} failed verification — {failed}")
    return report


if __name__ == "__main__":
    run_main(main, VerifyConfig, "Verify a tiny-cats checkpoint (DiT or classifier) and report every check.")
