"""Check that a weights file is complete, sane and trained, and that the model it describes runs.

    python scripts/verify_checkpoint.py --checkpoint checkpoints/tinydit_final.safetensors
    python scripts/verify_checkpoint.py --checkpoint checkpoints/cats_model.safetensors --json

Works for DiT and classifier files (the kind is read from the file's metadata) and for `.pt` state dicts
with their `.pt.json` metadata (loaded with `torch.load(weights_only=True)`: a pickle that would run code
is refused, never run). The model is rebuilt from the metadata alone, then every check below is reported
with PASS/FAIL; any failure ends with exit status 2 and the reasons.

"Trained" is defined honestly as: the file records training progress (step or epoch > 0) AND every
tensor that a fresh model initialises to a constant (adaLN-Zero and final layers of a DiT, biases,
BatchNorm weights and running statistics of a classifier) has moved away from that constant. A model
saved before its first optimizer step fails this check.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scripts.lib.checkpoints import load_weights
from scripts.lib.cli import UserError, option, run_main
from scripts.lib.checkpoints import (
    DIT_KIND,
    build_classifier_from_metadata,
    build_dit_from_metadata,
    build_objective_from_metadata,
    classifier_normalize,
    load_strict,
    validate_metadata,
)
from scripts.lib.cli import DEVICES, resolve_device_type
from scripts.lib.sampling import DEFAULT_CFG_SCALE, class_grid_labels, guidance_scale, sample_images, save_grid

SAMPLES_PER_CLASS = 4
# The forward and sampling checks run these many classes at most (spread over all of them): a DiT with thousands
# of classes would otherwise need a batch of thousands of images just to be checked.
MAX_CHECKED_CLASSES = 16


def checked_classes(num_classes: int) -> list[int]:
    """Every class id, or MAX_CHECKED_CLASSES of them spread evenly from the first to the last."""
    if num_classes <= MAX_CHECKED_CLASSES:
        return list(range(num_classes))
    return torch.linspace(0, num_classes - 1, MAX_CHECKED_CLASSES).round().long().tolist()


@dataclass
class VerifyConfig:
    checkpoint: str = option(
        "checkpoints/tinydit_final.safetensors",
        "weights file to check (.safetensors, or .pt with its .pt.json metadata)",
    )
    json: bool = option(False, "print the report as JSON instead of text")
    device: str = option("auto", "device for the forward pass and the sampling run", choices=DEVICES)
    sample_out: str | None = option(
        None,
        "DiT only: PNG for the check samples (one row per class); "
        "default <checkpoint stem>_verify.png next to the checkpoint",
    )
    sample_steps: int = option(8, "DiT only: sampler steps of the check samples (few: this is a smoke test)")
    cfg_scale: float | None = option(
        None, f"DiT only: guidance scale of the check samples; default: the training config's, else {DEFAULT_CFG_SCALE}"
    )
    seed: int = option(0, "seed of the random inputs and sampling noise")


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


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

    def add(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append(Check(name, passed, detail))
        return passed

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


# ---------------------------------------------------------------------------------------------------------
# Checks on the tensors, before any of them is loaded into the model
# ---------------------------------------------------------------------------------------------------------
def _examples(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> Check:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = ([f"missing {len(missing)}: {_examples(missing)}"] if missing else []) + (
        [f"unexpected {len(unexpected)}: {_examples(unexpected)}"] if unexpected else []
    )
    return Check("keys", not problems, "; ".join(problems) or f"all {len(expected)} tensors present, none extra")


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> Check:
    wrong = [
        f"{name} {tuple(state[name].shape)} != {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
    return Check("shapes", not wrong, f"mismatch: {_examples(wrong)}" if wrong else "every shape matches the model")


def check_dtypes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> Check:
    # A float tensor may be stored in another float precision (fp16/bf16 exports); integers must match exactly.
    wrong = [
        f"{name} {state[name].dtype} (model: {tensor.dtype})"
        for name, tensor in expected.items()
        if name in state
        and state[name].dtype != tensor.dtype
        and not (state[name].is_floating_point() and tensor.is_floating_point())
    ]
    dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in state.values()})
    return Check("dtypes", not wrong, f"wrong: {_examples(wrong)}" if wrong else f"dtypes {', '.join(dtypes)}")


def check_finite(state: dict[str, torch.Tensor]) -> Check:
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    return Check(
        "finite", not bad, f"NaN/inf in {len(bad)} tensors: {_examples(bad)}" if bad else "no NaN or inf in any tensor"
    )


def check_parameter_count(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[Check, int]:
    expected = sum(p.numel() for p in model.parameters())
    found = sum(state[name].numel() for name, _ in model.named_parameters() if name in state)
    detail = f"{found:,} parameters" + ("" if found == expected else f", the model needs {expected:,}")
    return Check("parameters", found == expected, detail), found


def check_trained(
    state: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], progress: int, progress_name: str
) -> Check:
    """Training recorded AND no tensor that starts constant (zero-init layers, biases, norms) is still at init."""
    constant_at_init = [
        name
        for name, tensor in fresh.items()
        if tensor.is_floating_point() and tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all())
    ]
    untouched = [
        name
        for name in constant_at_init
        if name in state and torch.equal(state[name].to(fresh[name].dtype), fresh[name])
    ]
    untouched.sort(key=lambda name: fresh[name].dim() < 2)  # name weight matrices first: they tell the most
    problems = ([f"metadata records {progress_name} {progress}"] if progress <= 0 else []) + (
        [f"{len(untouched)} tensors still at their initial value: {_examples(untouched)}"] if untouched else []
    )
    detail = "; ".join(problems) or (
        f"{progress_name} {progress}; all {len(constant_at_init)} constant-initialised tensors have moved"
    )
    return Check("trained", not problems, detail)


# ---------------------------------------------------------------------------------------------------------
# Running the model
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def check_dit_forward(model: nn.Module, generator: torch.Generator, device: torch.device) -> Check:
    """One evaluation per checked class and the null class, at spread-out timesteps: right shape, finite, not zero."""
    labels = torch.tensor([*checked_classes(model.num_classes), model.null_class])
    size = (len(labels), model.in_channels, model.image_size, model.image_size)
    x = torch.randn(size, generator=generator)
    t = torch.linspace(0, 999, len(labels))
    out = model(x.to(device), t.to(device), labels.to(device)).float().cpu()
    problems = (
        ([f"output shape {tuple(out.shape)} != {size}"] if out.shape != size else [])
        + (["output has NaN/inf"] if not torch.isfinite(out).all() else [])
        + (["output is all zero (an untrained DiT)"] if not out.any() else [])
    )
    return Check(
        "forward", not problems, "; ".join(problems) or f"output {tuple(out.shape)}, finite, std {out.std().item():.3g}"
    )


@torch.no_grad()
def check_classifier_forward(
    model: nn.Module, metadata: dict[str, Any], generator: torch.Generator, device: torch.device
) -> Check:
    """Logits for a few random images: right shape, finite, and dependent on the input."""
    size = metadata["image_size"]
    images = torch.rand((4, 3, size, size), generator=generator)
    logits = model(classifier_normalize(images, metadata).to(device)).float().cpu()
    expected = (4, metadata["num_classes"])
    problems = (
        ([f"logits shape {tuple(logits.shape)} != {expected}"] if logits.shape != expected else [])
        + (["logits have NaN/inf"] if not torch.isfinite(logits).all() else [])
        + (["the same logits for different images"] if torch.equal(logits[0], logits[-1]) else [])
    )
    return Check(
        "forward",
        not problems,
        "; ".join(problems) or f"logits {tuple(logits.shape)}, finite; predicted classes {logits.argmax(1).tolist()}",
    )


def sample_check(
    model: nn.Module, metadata: dict[str, Any], cfg: VerifyConfig, out: Path, device: torch.device
) -> Check:
    """A short guided sampling run, SAMPLES_PER_CLASS per checked class, saved as a grid with one row per class."""
    objective = build_objective_from_metadata(metadata)
    cfg_scale = guidance_scale(cfg.cfg_scale, metadata)
    labels = class_grid_labels(checked_classes(model.num_classes), SAMPLES_PER_CLASS, device)
    images = sample_images(
        model,
        objective,
        labels,
        steps=cfg.sample_steps,
        cfg_scale=cfg_scale,
        sampler=None,
        seed=cfg.seed,
    )
    if not torch.isfinite(images).all():
        return Check("sample", False, f"{cfg.sample_steps}-step sampling produced NaN/inf")
    save_grid(images, out, per_row=SAMPLES_PER_CLASS)
    return Check("sample", True, f"{len(labels)} images, {cfg.sample_steps} steps, cfg {cfg_scale:g}, finite -> {out}")


# ---------------------------------------------------------------------------------------------------------
# The whole verification
# ---------------------------------------------------------------------------------------------------------
def describe(metadata: dict[str, Any]) -> tuple[str, str]:
    """(model description, training progress) for the report header."""
    if metadata.get("kind") == DIT_KIND:
        model = (
            f"TinyDiT {metadata.get('model')}, {metadata.get('image_size')} px, "
            f"{metadata.get('in_channels')} channels, objective {metadata.get('objective')}"
        )
        return model, f"step {metadata.get('step')} ({metadata.get('weights', '?')} weights)"
    model = f"{metadata.get('backbone')} classifier, {metadata.get('image_size')} px"
    metrics = {k: v for k, v in (metadata.get("metrics") or {}).items() if k != "epoch"}
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    return model, f"epoch {metadata.get('epoch')}" + (f" ({shown})" if shown else "")


def rebuild(metadata: dict[str, Any], path: Path) -> nn.Module:
    """The untrained model the metadata describes, after every metadata value has passed validation."""
    validate_metadata(metadata, source=path)
    if metadata["kind"] == DIT_KIND:
        return build_dit_from_metadata(metadata)
    return build_classifier_from_metadata(metadata)


def default_sample_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}_verify.png")


def verify(cfg: VerifyConfig) -> Report:
    """Run every check that the file allows; later checks are skipped once an earlier one makes them moot."""
    path = Path(cfg.checkpoint)
    report = Report(checkpoint=str(path))
    try:
        state, metadata = load_weights(path)
    except UserError as error:
        report.add("load", False, str(error))
        return report
    report.file_bytes = path.stat().st_size
    report.add("load", True, f"{path.suffix.lstrip('.')} file, {len(state)} tensors, metadata present")
    try:
        model = rebuild(metadata, path)
    except UserError as error:
        report.add("metadata", False, str(error))
        return report
    report.kind, report.classes = metadata["kind"], list(metadata["class_names"])
    report.model, report.trained_for = describe(metadata)
    report.add("metadata", True, f"kind '{report.kind}', {len(report.classes)} classes; model rebuilt")

    fresh = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    structure = [check_keys(state, fresh), check_shapes(state, fresh), check_dtypes(state, fresh)]
    report.checks += [*structure, check_finite(state)]
    parameters, report.parameters = check_parameter_count(state, model)
    report.checks.append(parameters)
    if not all(check.passed for check in structure):
        return report
    is_dit = report.kind == DIT_KIND
    progress = metadata.get("step" if is_dit else "epoch") or 0
    report.checks.append(check_trained(state, fresh, progress, "step" if is_dit else "epoch"))
    if not report.passed:  # running NaN weights or an untrained net tells nothing more
        return report

    load_strict(model, state, path)
    device = torch.device(resolve_device_type(cfg.device))
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    if not is_dit:
        report.checks.append(check_classifier_forward(model, metadata, generator, device))
        return report
    forward = check_dit_forward(model, generator, device)
    report.checks.append(forward)
    if forward.passed:
        out = Path(cfg.sample_out) if cfg.sample_out else default_sample_path(path)
        sample = sample_check(model, metadata, cfg, out, device)
        report.checks.append(sample)
        report.sample = str(out) if sample.passed else None
    return report


def format_report(report: Report) -> str:
    size = f" ({report.file_bytes / 2**20:.2f} MiB)" if report.file_bytes is not None else ""
    lines = [f"checkpoint  {report.checkpoint}{size}"]
    header = [
        ("kind", report.kind),
        ("model", report.model),
        ("parameters", f"{report.parameters:,}" if report.parameters is not None else None),
        ("trained", report.trained_for),
        ("classes", f"{len(report.classes)}: {_examples(report.classes, 20)}" if report.classes else None),
        ("sample", report.sample),
    ]
    lines += [f"{name:<11} {value}" for name, value in header if value is not None]
    lines.append("checks")
    width = max(len(check.name) for check in report.checks)
    lines += [f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in report.checks]
    failed = [check for check in report.checks if not check.passed]
    lines.append(
        f"result      {'PASSED' if not failed else 'FAILED'} "
        f"({len(report.checks) - len(failed)}/{len(report.checks)} checks passed)"
    )
    return "\n".join(lines)


def main(cfg: VerifyConfig) -> Report:
    """Print the report (text or JSON); raise UserError (exit 2) naming the failed checks."""
    report = verify(cfg)
    print(json.dumps(report.to_json(), indent=2) if cfg.json else format_report(report))
    if not report.passed:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.checks if not c.passed)
        raise UserError(f"{report.checkpoint} failed verification — {failed}")
    return report


if __name__ == "__main__":
    run_main(main, VerifyConfig, "Verify a tiny-cats checkpoint (DiT or classifier) and report every check.")
