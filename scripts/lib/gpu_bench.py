"""The GPU suite of scripts/benchmark.py: GPU-sized training, the trainer beside a bare loop, and the GPU goal.

TinyDiT S/4 and S/2 at 64 px, batch 256, bf16 autocast, flow loss, fused AdamW, each model
- in a bare loop (random tensors drawn on the device; no data, EMA, clipping or logging), eager and
  torch.compile'd;
- in the trainer's own step: `scripts/train_dit.py` run as a subprocess on toy cats drawn at 64 px,
  eager and compiled, its img/s read from the run's metrics.jsonl (every row after the first, whose
  window is the warm-up);
- with the MFU of each = FLOPs of forward + backward (FlopCounterMode; it counts the CUDA attention
  kernels itself, recompute in the backward included) / step time / the bf16 matmul peak measured in
  the same run (best window of 8192^3 matmuls), the peak memory of each, sampling img/s (CFG, 50 Euler
  steps, batch 256) eager and compiled, and the trainer's img/s over the bare loop's.
The bare loop is timed in the windows the trainer logs (same number of steps, the first one dropped as
warm-up), and each figure is the median of its windows (all are in the report). `gpu_goal` judges the
figures, at full sizes on a CUDA GPU only; GPU_QUICK runs the same code at toy sizes on any device.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.tiny_dit import TinyDiT, build_dit, count_parameters
from scripts.lib.images import scan_image_folder
from scripts.lib.measuring import (
    dit_train_step,
    forward_backward_flops,
    matmul_call,
    peak_memory_mb,
    reset_peak_memory,
    sampling_call,
    timed_calls,
)
from scripts.lib.runtime import cpu_has_native_bf16, synchronize

ROOT = Path(__file__).resolve().parents[2]
TRAINER = "scripts/train_dit.py"  # other commands of the kit, run from ROOT
TOY_CATS = "scripts/make_toy_cats.py"
VARIANTS = {"eager": False, "compiled": True}  # each measurement without and with torch.compile
# Issue 15's goal on an H100/H200-class GPU: the trainer (compiled, as --compile auto does on CUDA) within 3 % of
# a bare loop of the same model, and the trainer's MFU against the bf16 matmul peak.
GPU_GOAL = {
    "S/4": {"trainer_over_bare_loop": 0.97, "trainer_mfu": 0.30},
    "S/2": {"trainer_over_bare_loop": 0.97, "trainer_mfu": 0.45},
}


@dataclass(frozen=True)
class GpuModelSpec:
    """One model of the GPU suite and how many steps each of its timed windows lasts."""

    name: str  # a TinyDiT size of models.tiny_dit.DIT_SIZES
    window_steps: int  # = the trainer's --log-interval: the bare loop is timed in the windows the trainer logs


@dataclass(frozen=True)
class GpuBenchSpec:
    """Sizes of the GPU suite; GPU_FULL is what the GPU goal refers to."""

    models: tuple[GpuModelSpec, ...]
    image_size: int
    batch_size: int
    windows: int  # timed windows of each training variant, after one warm-up window
    matmul_size: int
    matmul_calls: int  # per window; the peak is the best of `windows` windows
    sample_steps: int
    sample_repeats: int  # timed sampling calls, after a one-step warm-up call
    cfg_scale: float
    toy_cats_per_class: int

    def trainer_steps(self, model: GpuModelSpec) -> int:
        """A warm-up window and `windows` timed ones. The trainer logs at most every 10 % of its run, so with
        windows + 1 >= 10 its rows come every `window_steps` steps."""
        return (self.windows + 1) * model.window_steps


# Steps per window chosen so that each window lasts ~1-3 s at the throughputs measured on an H200 (S/4 ~3,500-
# 6,500 img/s, S/2 ~1,000-1,800 img/s at batch 256) and the whole suite fits in about 8 minutes there.
GPU_FULL = GpuBenchSpec(
    models=(GpuModelSpec("S/4", 20), GpuModelSpec("S/2", 10)),
    image_size=64,
    batch_size=256,
    windows=9,
    matmul_size=8192,
    matmul_calls=10,
    sample_steps=50,
    sample_repeats=2,
    cfg_scale=4.0,
    toy_cats_per_class=200,
)
GPU_QUICK = GpuBenchSpec(
    models=(GpuModelSpec("T/8", 1),),
    image_size=16,
    batch_size=4,
    windows=2,
    matmul_size=128,
    matmul_calls=2,
    sample_steps=2,
    sample_repeats=1,
    cfg_scale=4.0,
    toy_cats_per_class=2,
)


class MeasurementFailed(Exception):
    """A measurement of the GPU suite did not produce its figure (the report says why; the others go on)."""


@dataclass
class GpuRun:
    """What all measurements of one GPU-suite run share."""

    spec: GpuBenchSpec
    device: torch.device
    precision: torch.dtype | None  # bf16 autocast, or None for fp32
    data_dir: Path  # the toy cats the trainer reads
    work_dir: Path  # trainer runs and logs
    num_classes: int
    peak_flops: float  # matmul peak in the training precision, measured in this run


def gpu_suite_precision(device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device computes bf16 natively (CUDA Ampere+, AVX512-BF16/AMX CPUs), else fp32."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = device.type == "cpu" and cpu_has_native_bf16()
    return torch.bfloat16 if native else None


def attempt(what: str, measure: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """measure(), or {"failed": why}: on a lent GPU, one variant that fails (a compile error, out of memory)
    must not cost the figures of all the others."""
    print(f"benchmark: {what} ...", file=sys.stderr, flush=True)
    try:
        reset_peak_memory(device)  # also hands what earlier variants cached back to the GPU (a trainer needs it)
        return measure()
    except Exception as error:  # noqa: BLE001 - recorded in the report; the other measurements go on
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        print(f"benchmark: {what} FAILED: {reason}", file=sys.stderr, flush=True)
        return {"failed": reason}
    finally:
        torch._dynamo.reset()  # drop compiled graphs (and the memory they hold) before the next variant


def build_gpu_dit(run: GpuRun, model: GpuModelSpec) -> TinyDiT:
    torch.manual_seed(0)
    return build_dit(model.name, run.spec.image_size, run.num_classes).to(run.device)


def measure_matmul_peak(spec: GpuBenchSpec, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of the best of `windows` windows of matmul_size^3 matmuls in `dtype`."""
    matmul = matmul_call(spec.matmul_size, dtype, device)
    matmul()  # warm-up: kernel selection
    best = min(timed_calls(matmul, device, spec.matmul_calls) for _ in range(spec.windows))
    return 2 * spec.matmul_size**3 / best


def training_figures(run: GpuRun, img_per_s_windows: list[float], flops_per_step: int) -> dict[str, Any]:
    """img/s (the median of the windows), step time, achieved TFLOP/s and MFU of one training variant."""
    img_per_s = statistics.median(img_per_s_windows)
    achieved = flops_per_step * img_per_s / run.spec.batch_size
    return {
        "img_per_s": img_per_s,
        "step_ms": run.spec.batch_size / img_per_s * 1e3,
        "tflop_per_s": achieved / 1e12,
        "mfu": achieved / run.peak_flops,
        "img_per_s_windows": img_per_s_windows,
    }


def measure_bare_loop(run: GpuRun, model: GpuModelSpec, flops_per_step: int, compiled: bool) -> dict[str, Any]:
    """The bare loop, timed as the trainer logs: a warm-up window, then `windows` windows of `window_steps` steps."""
    network = build_gpu_dit(run, model).train()
    started = time.perf_counter()
    step = dit_train_step(
        torch.compile(network) if compiled else network, run.spec.batch_size, run.device, run.precision
    )
    step()
    synchronize(run.device)
    first_step_seconds = time.perf_counter() - started  # the compile included, for a compiled model
    seconds = [timed_calls(step, run.device, model.window_steps) for _ in range(run.spec.windows + 1)][1:]
    figures = training_figures(run, [run.spec.batch_size / s for s in seconds], flops_per_step)
    return {**figures, "first_step_seconds": first_step_seconds, "memory_peak_mb": peak_memory_mb(run.device)}


def trainer_command(run: GpuRun, model: GpuModelSpec, run_name: str, compiled: bool) -> list[str]:
    """The command line of one timed trainer run: the benchmark's whole interface to scripts/train_dit.py.

    The run logs every `window_steps` steps, and saves and samples only once, at the end, after its last window.
    """
    steps = run.spec.trainer_steps(model)
    return [
        sys.executable,
        TRAINER,
        str(run.data_dir),
        "--model",
        model.name,
        "--image-size",
        str(run.spec.image_size),
        "--batch-size",
        str(run.spec.batch_size),
        "--steps",
        str(steps),
        "--log-interval",
        str(model.window_steps),
        "--save-interval",
        str(steps),
        "--sample-interval",
        str(steps),
        "--device",
        run.device.type,
        "--mixed-precision",
        "bf16" if run.precision == torch.bfloat16 else "no",
        "--run-name",
        run_name,
        "--output-dir",
        str(run.work_dir / "runs"),
        "--compile",
        "on" if compiled else "off",
    ]


def run_command(argv: list[str], log_path: Path) -> float:
    """Run another command of the kit from this checkout, its output to `log_path`; its wall-clock seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with log_path.open("w") as log:
        status = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if status:
        tail = " | ".join(line for line in log_path.read_text(errors="replace").splitlines()[-6:] if line.strip())
        raise MeasurementFailed(f"{Path(argv[1]).name} exited with status {status}: {tail[-1500:]}")
    return time.perf_counter() - started


def trainer_windows(metrics_path: Path) -> tuple[list[float], float | None]:
    """img/s of the timed windows of a trainer run (every metrics.jsonl row after the first, whose window is
    the warm-up) and the peak memory its rows report (None where the trainer does not log it)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if len(rows) < 2:
        raise MeasurementFailed(
            f"{metrics_path} has {len(rows)} row(s); the benchmark needs the warm-up row and at least one timed window"
        )
    memory = [row["memory_peak_mb"] for row in rows if row.get("memory_peak_mb") is not None]
    return [row["img_per_s"] for row in rows[1:]], max(memory, default=None)


def measure_trainer(run: GpuRun, model: GpuModelSpec, flops_per_step: int, compiled: bool) -> dict[str, Any]:
    """The real trainer, as a subprocess, on the toy cats: img/s from its own log, the bare loop's FLOPs per step."""
    run_name = f"{model.name.replace('/', '')}-{'compiled' if compiled else 'eager'}"
    argv = trainer_command(run, model, run_name, compiled)
    seconds = run_command(argv, run.work_dir / f"{run_name}.log")
    windows, memory = trainer_windows(run.work_dir / "runs" / run_name / "metrics.jsonl")
    return {
        **training_figures(run, windows, flops_per_step),
        "memory_peak_mb": memory,
        "run_seconds": seconds,
        "command": shlex.join(["python", *argv[1:]]),
    }


def measure_sampling(run: GpuRun, model: GpuModelSpec, compiled: bool) -> dict[str, Any]:
    """Guided sampling of one batch: a one-step warm-up call (the compile, for a compiled model), then timed calls."""
    network = build_gpu_dit(run, model).eval()
    runnable = torch.compile(network) if compiled else network
    spec = run.spec
    started = time.perf_counter()
    sampling_call(runnable, spec.batch_size, 1, spec.cfg_scale, run.device, run.precision)()
    synchronize(run.device)
    first_call_seconds = time.perf_counter() - started
    sample = sampling_call(runnable, spec.batch_size, spec.sample_steps, spec.cfg_scale, run.device, run.precision)
    seconds = [timed_calls(sample, run.device, 1) for _ in range(spec.sample_repeats)]
    return {
        "img_per_s": spec.batch_size / statistics.median(seconds),
        "img_per_s_repeats": [spec.batch_size / s for s in seconds],
        "first_call_seconds": first_call_seconds,
        "memory_peak_mb": peak_memory_mb(run.device),
    }


def make_toy_data(data_dir: Path, spec: GpuBenchSpec, work_dir: Path) -> dict[str, Any]:
    """Toy cats at the suite's image size, drawn by scripts/make_toy_cats.py (a command, so run as one)."""
    seconds = run_command(
        [
            sys.executable,
            TOY_CATS,
            "--out",
            str(data_dir),
            "--per-class",
            str(spec.toy_cats_per_class),
            "--size",
            str(spec.image_size),
            "--seed",
            "0",
        ],
        work_dir / "make_toy_cats.log",
    )
    return {
        "classes": len(scan_image_folder(data_dir).class_names),
        "per_class": spec.toy_cats_per_class,
        "image_size": spec.image_size,
        "seconds": seconds,
    }


def trainer_over_bare_loop(entry: dict[str, Any]) -> dict[str, float | None]:
    """The trainer's img/s over the bare loop's, eager and compiled; None where either was not measured."""
    ratios = {}
    for variant in VARIANTS:
        trainer, bare = entry["trainer"][variant], entry["bare_loop"][variant]
        both = "img_per_s" in trainer and "img_per_s" in bare  # neither failed nor skipped
        ratios[variant] = trainer["img_per_s"] / bare["img_per_s"] if both else None
    return ratios


def measure_gpu_model(
    run: GpuRun,
    model: GpuModelSpec,
    skip_compile: bool,
    entry: dict[str, Any],
    publish: Callable[[], None],
    kinds: tuple[str, ...] = ("bare_loop", "trainer", "sampling"),
) -> None:
    """Fill `entry` with one model's figures: FLOPs, then the `kinds` of measurement, eager and compiled."""
    network = build_gpu_dit(run, model)
    flops, flops_by_op = forward_backward_flops(network, run.spec.batch_size, run.device, run.precision)
    entry.update(
        parameters=count_parameters(network),
        gflop_per_step=flops / 1e9,
        gflop_per_image=flops / run.spec.batch_size / 1e9,
        gflop_per_step_by_op={op: op_flops / 1e9 for op, op_flops in flops_by_op.items()},
    )
    del network
    measurements = {
        "bare_loop": functools.partial(measure_bare_loop, run, model, flops),
        "trainer": functools.partial(measure_trainer, run, model, flops),
        "sampling": functools.partial(measure_sampling, run, model),
    }
    for kind in kinds:
        measure = measurements[kind]
        entry[kind] = {}
        for variant, compiled in VARIANTS.items():
            if compiled and skip_compile:
                entry[kind][variant] = {"skipped": "--skip-compile"}
            else:
                entry[kind][variant] = attempt(
                    f"{model.name} {kind.replace('_', ' ')} {variant}",
                    functools.partial(measure, compiled=compiled),
                    run.device,
                )
            publish()
    if "trainer" in entry and "bare_loop" in entry:
        entry["trainer_over_bare_loop"] = trainer_over_bare_loop(entry)


def measure_gpu_suite(
    skip_compile: bool, spec: GpuBenchSpec, device: torch.device, report: dict[str, Any], publish: Callable[[], None]
) -> None:
    """Fill `report` with the GPU suite's figures, publishing it after every measurement."""
    precision = gpu_suite_precision(device)
    if device.type == "cuda":  # as the trainer sets them (scripts/lib/runtime.make_accelerator)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report["precision"] = "bf16" if precision == torch.bfloat16 else "fp32"
    with tempfile.TemporaryDirectory(prefix="tiny-cats-bench-") as temp:
        work_dir = Path(temp)
        print("benchmark: drawing the toy cats ...", file=sys.stderr, flush=True)
        report["data"] = make_toy_data(work_dir / "toy-cats", spec, work_dir)
        matmul_dtype = precision or torch.float32
        peak_flops = measure_matmul_peak(spec, matmul_dtype, device)
        report["matmul_peak"] = {
            "dtype": str(matmul_dtype).removeprefix("torch."),
            "size": spec.matmul_size,
            "tflop_per_s": peak_flops / 1e12,
        }
        report["models"] = {}
        publish()
        run = GpuRun(spec, device, precision, work_dir / "toy-cats", work_dir, report["data"]["classes"], peak_flops)
        # Training (what the goal judges) for every model first, sampling after: a run cut short by a time limit
        # still brings back the goal's figures.
        for model in spec.models:
            report["models"][model.name] = {}
            measure_gpu_model(run, model, skip_compile, report["models"][model.name], publish, ("bare_loop", "trainer"))
        for model in spec.models:
            measure_gpu_model(run, model, skip_compile, report["models"][model.name], publish, ("sampling",))
            publish()


def gpu_goal(models: dict[str, Any]) -> dict[str, Any]:
    """Per model, each goal figure (the compiled trainer's img/s over the compiled bare loop's, the compiled
    trainer's MFU), its threshold and whether it is met; a figure that was not measured is not met."""
    goal: dict[str, Any] = {}
    for name, thresholds in GPU_GOAL.items():
        entry = models.get(name, {})
        figures = {
            "trainer_over_bare_loop": entry.get("trainer_over_bare_loop", {}).get("compiled"),
            "trainer_mfu": entry.get("trainer", {}).get("compiled", {}).get("mfu"),
        }
        goal[name] = {
            figure: {
                "value": value,
                "threshold": thresholds[figure],
                "met": value is not None and value >= thresholds[figure],
            }
            for figure, value in figures.items()
        }
    goal["all_met"] = all(check["met"] for name in GPU_GOAL for check in goal[name].values())
    return goal


def gpu_goal_section(report: dict[str, Any], quick: bool) -> dict[str, Any]:
    # The goal is for S/4 and S/2 at batch 256 in bf16 on an H100/H200-class GPU; the suite's full sizes run
    # only on CUDA (resolve_suite), so --quick is the one other case.
    if quick:
        return {"not_evaluated": "--quick sizes are not S/4 and S/2 at batch 256"}
    if report["precision"] != "bf16":
        return {"not_evaluated": "the goal is for bf16, which this GPU does not compute natively"}
    return {"applies_to": "cuda", **gpu_goal(report["models"])}
