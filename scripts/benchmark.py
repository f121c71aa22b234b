"""Speed figures of this machine as one JSON report (`make bench`; the README says what each figure is). What is
compared (vs the matmul peak, eager vs compiled, trainer vs bare loop) is measured in one run: speed swings daily."""

from __future__ import annotations

import functools
import gc
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from models.classifier import build_classifier
from models.diffusion import build_objective
from models.tiny_dit import TinyDiT, build_dit, count_parameters
from scripts.lib.cli import DEVICES, PROJECT_ROOT, UserError, option, project_env, resolve_device_type, run_main
from scripts.lib.cli import write_json
from scripts.lib.data import ImageSource, scan_image_folder, synthetic_cache, training_batch
from scripts.lib.run import allow_tf32, resolve_mixed_precision, synchronize

aten = torch.ops.aten


# --- Measuring: FLOPs, a step's matrix products alone, timing, what is timed -----------------------------------------
def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV: 2 B h Nq Nk d FLOPs each (model FLOPs, as in the MFU convention)."""
    batch, heads, queries, head_dim = query_shape
    return 2 * batch * heads * queries * key_shape[2] * (head_dim + value_shape[3])


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash-attention ones, whose FLOPs would silently
# count as zero. The formulas receive shapes, in the ops' argument order. The backward takes the gradients of both
# matmuls w.r.t. both operands: twice the forward (the kernel's recompute not counted).
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda _grad, *shapes, **_: 2 * attention_flops(*shapes),
}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per aten op) of one call of `fn`; of a training step, forward + backward (AdamW has none)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    by_op = {str(op): int(flops) for op, flops in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), by_op


def matmuls_only_call(fn: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    """Just the matrix products of one `fn()` (same ops, shapes, layouts): the step's time if everything else were
    free, so with the step's FLOPs, the MFU ceiling of these layers on this machine."""
    replay: list[tuple[Any, list[Any]]] = []  # (op, its arguments, each tensor a random one of the same layout)

    def random_in_layout(tensor: torch.Tensor) -> torch.Tensor:  # views and broadcasts included
        storage = 1 + sum((size - 1) * step for size, step in zip(tensor.shape, tensor.stride(), strict=True))
        return torch.randn(storage, device=device).as_strided(tensor.shape, tensor.stride())

    class MatmulRecorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # called with the mode off: randn here is safe
            if func in (aten.mm.default, aten.addmm.default, aten.bmm.default):
                replay.append((func, [random_in_layout(a) if isinstance(a, torch.Tensor) else a for a in args]))
            return func(*args, **(kwargs or {}))

    with MatmulRecorder():
        fn()

    def run() -> None:  # each product's output freed before the next, as in the step
        for op, args in replay:
            op(*args)

    return run


def timed_calls(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - started) / calls


def best_of_rounds(calls: dict[str, Callable[[], Any]], device: torch.device, window_s: float, rounds: int):
    """{name: best seconds per call} of `calls` run in turn for `rounds` rounds. Each window lasts about `window_s`,
    so short calls (a matmul) get no more chances than long ones (a training step) to land in a quiet moment."""
    for fn in calls.values():
        fn()  # warm-up: allocations, kernel selection, lazy init
    per_window = {name: max(1, math.ceil(window_s / timed_calls(fn, device, 1))) for name, fn in calls.items()}
    best = dict.fromkeys(calls, math.inf)
    for _ in tqdm(range(rounds), desc="measuring", unit="round"):
        for name, fn in calls.items():
            best[name] = min(best[name], timed_calls(fn, device, per_window[name]))
    return best


def reset_peak_memory(device: torch.device) -> None:  # peak memory is tracked on CUDA only
    if device.type == "cuda":
        gc.collect()  # a finished variant's tensors go back to the caching allocator, then to the GPU
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def matmul_call(size: int, dtype: torch.dtype, device: torch.device) -> Callable[[], torch.Tensor]:
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    return lambda: torch.mm(a, b)


def optimizer_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # fused, as the trainers run it

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step


def dit_train_step(model: TinyDiT, batch_size: int, device: torch.device, precision=torch.float32):
    """One flow-loss step on a fixed batch, the noise drawn on `device`: on a GPU no host work but kernel launches."""
    objective, generator = build_objective("flow"), torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch_size, model.in_channels, model.image_size, model.image_size, device=device) * 2 - 1
    y = torch.randint(0, model.null_class, (batch_size,), device=device)

    @torch.autocast(device.type, precision, enabled=precision != torch.float32)
    def loss() -> torch.Tensor:
        return objective.training_loss(model, x0, y, *objective.draw_training_noise(x0.shape, generator, device))

    return optimizer_step(model, loss)


def sampling_call(model: TinyDiT, batch_size: int, steps: int, cfg_scale: float, device: torch.device, precision):
    noise = torch.randn(batch_size, model.in_channels, model.image_size, model.image_size, device=device)
    y = torch.arange(batch_size, device=device) % model.num_classes
    sample = functools.partial(build_objective("flow").sample, model, noise, y, steps=steps, cfg_scale=cfg_scale)
    return torch.autocast(device.type, precision, enabled=precision != torch.float32)(sample)


def judge(report: dict[str, Any], bar: dict[str, tuple[tuple[str, ...], float]]) -> dict[str, Any]:
    judged = {}
    for name, (path, threshold) in bar.items():
        value = functools.reduce(lambda node, key: node.get(key) if isinstance(node, dict) else None, path, report)
        judged[name] = {"value": value, "threshold": threshold, "met": value is not None and value >= threshold}
    return judged


# --- CPU suite: every measurement side by side, and the CPU speed bar -------------------------------------------------
SPEED_BAR = {  # figure: (its place in the report, threshold)
    "fp32_mfu": (("dit_training", "fp32", "mfu_vs_fp32_matmul_peak"), 0.72),
    "bf16_speedup": (("dit_training", "bf16_autocast", "speedup_vs_fp32"), 1.35),
    "pipeline_over_training": (("data_pipeline", "ratio_to_fastest_training"), 20.0),
    "onnx_dit_step_speedup": (("onnx_runtime", "dit_step", "ort_speedup_vs_eager"), 1.0),
}


@dataclass(frozen=True)
class BenchSpec:  # the defaults are the fixed config of the speed bar
    image_size: int = 32
    width: int = 256
    depth: int = 6
    heads: int = 4
    patch: int = 4
    batch_size: int = 32
    num_classes: int = 6
    window_s: float = 2.0  # seconds each measurement runs per round (at least one call)
    matmul_size: int = 2048
    sample_steps: int = 20
    cfg_scale: float = 4.0
    classifier_backbone: str = "resnet18"
    pipeline_steps: int = 40


QUICK = BenchSpec(image_size=16, width=32, depth=1, heads=2, batch_size=4, num_classes=2, window_s=0.0,
                  matmul_size=128, sample_steps=2, pipeline_steps=2)  # fmt: skip


def build_bench_dit(spec: BenchSpec, device: torch.device, compiled: bool = False) -> TinyDiT:
    torch.manual_seed(0)
    model = TinyDiT(spec.image_size, spec.num_classes, spec.width, spec.depth, spec.heads, spec.patch).to(device)
    return torch.compile(model) if compiled else model


def measure_cpu_suite(spec: BenchSpec, device: torch.device, rounds: int, skip_compile: bool) -> dict[str, Any]:
    from scripts.lib.onnx_export import export_with_dynamic_batch, make_ort_session  # not needed by the GPU suite

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    calls = {f"matmul_{name}": matmul_call(spec.matmul_size, dtype, device) for name, dtype in dtypes.items()}
    variants = {"fp32": (torch.float32, False), "bf16_autocast": (torch.bfloat16, False)}
    if not skip_compile:
        variants["compile"] = (torch.float32, True)
    training: dict[str, dict[str, Any]] = {}
    for name, (precision, compiled) in variants.items():
        reset_peak_memory(device)
        step = dit_train_step(build_bench_dit(spec, device, compiled).train(), spec.batch_size, device, precision)
        first_step_seconds = timed_calls(step, device, 1)  # a compiled model compiles here
        training[name] = {"compile_seconds": first_step_seconds} if compiled else {}
        if device.type == "cuda":
            training[name]["memory_peak_mb"] = peak_memory_mb(device)
        calls[f"train_{name}"] = step
    calls["train_fp32_matmuls_only"] = matmuls_only_call(calls["train_fp32"], device)
    dit = build_bench_dit(spec, device).eval()
    calls["sampling"] = sampling_call(dit, spec.batch_size, spec.sample_steps, spec.cfg_scale, device, torch.float32)
    torch.manual_seed(0)
    classifier = build_classifier(spec.classifier_backbone, spec.num_classes).to(device).train()
    images = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size, device=device)
    labels = torch.arange(spec.batch_size, device=device) % spec.num_classes
    calls["classifier_train"] = optimizer_step(classifier, lambda: F.cross_entropy(classifier(images), labels))
    source = ImageSource(synthetic_cache(max(256, 4 * spec.batch_size), spec.image_size, spec.num_classes), device)

    def pipeline() -> None:  # the training batch stream: cached uint8 images -> indices -> gather -> augmentation
        for index in range(spec.pipeline_steps):
            training_batch(source, spec.batch_size, index, seed=0, level="full")

    calls["pipeline"] = pipeline
    # ONNX Runtime beside eager PyTorch on the CPU, by the exporters' own code: a guided DiT step, a classifier batch.
    cfg_batch = 2 * spec.batch_size
    x = torch.randn(cfg_batch, 3, spec.image_size, spec.image_size)
    dit_inputs = (x, torch.rand(cfg_batch) * 1000, torch.arange(cfg_batch) % (spec.num_classes + 1))  # null class too
    with tempfile.TemporaryDirectory() as work_dir:
        for name, model, inputs, names in (
            ("dit_step", build_bench_dit(spec, torch.device("cpu")), dit_inputs, ("x", "t", "y")),
            ("classifier", build_classifier(spec.classifier_backbone, spec.num_classes), (images.cpu(),), ("images",)),
        ):
            path = export_with_dynamic_batch(model.eval(), inputs, names, "out", Path(work_dir, f"{name}.onnx"))
            session = make_ort_session(path)
            feeds = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs, strict=True)}
            calls[f"onnx_{name}_eager"] = functools.partial(torch.inference_mode()(model), *inputs)
            calls[f"onnx_{name}_ort"] = functools.partial(session.run, None, feeds)
        best = best_of_rounds(calls, device, spec.window_s, rounds)

    flops, flops_by_op = count_flops(dit_train_step(dit, spec.batch_size, device))
    peak = {dtype: 2 * spec.matmul_size**3 / best[f"matmul_{dtype}"] for dtype in dtypes}
    for name, entry in training.items():
        seconds = best[f"train_{name}"]
        entry.update(img_per_s=spec.batch_size / seconds, step_ms=seconds * 1e3, gflop_per_s=flops / seconds / 1e9)
        entry.update(mfu_vs_fp32_matmul_peak=flops / seconds / peak["fp32"])
        entry["speedup_vs_fp32"] = best["train_fp32"] / seconds
    matmuls_only = best["train_fp32_matmuls_only"]
    training["fp32"].update(matmuls_only_ms=matmuls_only * 1e3, matmul_share_of_step=matmuls_only / best["train_fp32"])
    training["fp32"]["mfu_if_only_matmuls_took_time"] = flops / matmuls_only / peak["fp32"]
    training["bf16_autocast"]["mfu_vs_bf16_matmul_peak"] = flops / best["train_bf16_autocast"] / peak["bf16"]
    fastest_training = max(entry["img_per_s"] for entry in training.values())
    if skip_compile:
        training["compile"] = {"skipped": "--skip-compile"}
    pipeline = spec.pipeline_steps * spec.batch_size / best["pipeline"]
    onnx = {}
    for name, batch_size in (("dit_step", cfg_batch), ("classifier", spec.batch_size)):
        eager, ort = best[f"onnx_{name}_eager"], best[f"onnx_{name}_ort"]
        onnx[name] = {"eager_ms": eager * 1e3, "ort_ms": ort * 1e3, "ort_speedup_vs_eager": eager / ort}
        onnx[name].update(batch_size=batch_size, device="cpu")
    return {
        "matmul_peak_gflop_per_s": {"fp32": peak["fp32"] / 1e9, "bf16": peak["bf16"] / 1e9, "size": spec.matmul_size},
        "dit_training": {"gflop_per_step": flops / 1e9, "parameters": count_parameters(dit),
                         "gflop_per_step_by_op": {op: n / 1e9 for op, n in flops_by_op.items()}, **training},
        "dit_sampling": {"img_per_s": spec.batch_size / best["sampling"], "steps": spec.sample_steps,
                         "cfg_scale": spec.cfg_scale, "batch_size": spec.batch_size, "precision": "fp32"},
        "data_pipeline": {"img_per_s": pipeline, "augmentation": "full", "fastest_training_img_per_s": fastest_training,
                          "ratio_to_fastest_training": pipeline / fastest_training},
        "classifier_training": {"img_per_s": spec.batch_size / best["classifier_train"],
                                "backbone": spec.classifier_backbone, "image_size": spec.image_size},
        "onnx_runtime": onnx,
    }  # fmt: skip


def speed_bar(report: dict[str, Any], device: torch.device, quick: bool) -> dict[str, Any]:
    if quick or device.type != "cpu":
        why = "--quick sizes are not the fixed config" if quick else f"the bar is for a CPU, not {device.type}"
        return {"not_evaluated": why}
    return {"applies_to": "cpu", **judge(report, SPEED_BAR)}


# --- GPU suite: the trainer (run as a subprocess) beside a bare loop of the same model, and the GPU goal --------------
TRAINER, TOY_CATS = "scripts/train_dit.py", "scripts/make_toy_cats.py"  # other commands, run from PROJECT_ROOT
VARIANTS = {"eager": False, "compiled": True}  # each measurement without and with torch.compile

# Issue 15's goal on an H100/H200-class GPU, per model, for the compiled trainer (what --compile auto runs on CUDA).
GPU_GOAL = {
    model: {
        "trainer_over_bare_loop": (("trainer_over_bare_loop", "compiled"), 0.97),
        "trainer_mfu": (("trainer", "compiled", "mfu"), mfu),
    }
    for model, mfu in (("S/4", 0.30), ("S/2", 0.45))
}


@dataclass(frozen=True)
class GpuModelSpec:
    name: str  # a TinyDiT size of models.tiny_dit.DIT_SIZES
    window_steps: int  # = the trainer's --log-interval: the bare loop is timed in the windows the trainer logs


@dataclass(frozen=True)
class GpuBenchSpec:  # the defaults are what the GPU goal refers to (windows of ~1-3 s on an H200)
    models: tuple[GpuModelSpec, ...] = (GpuModelSpec("S/4", 20), GpuModelSpec("S/2", 10))
    image_size: int = 64
    batch_size: int = 256
    windows: int = 9  # timed windows of each training variant after a warm-up one; >= 9: the trainer logs every window
    matmul_size: int = 8192
    matmul_calls: int = 10  # per window; the peak is the best of `windows` windows
    sample_steps: int = 50
    sample_repeats: int = 2  # timed sampling calls, after a one-step warm-up call
    cfg_scale: float = 4.0
    toy_cats_per_class: int = 200


GPU_QUICK = GpuBenchSpec(models=(GpuModelSpec("T/8", 1),), image_size=16, batch_size=4, windows=2, matmul_size=128,
                         matmul_calls=2, sample_steps=2, sample_repeats=1, toy_cats_per_class=2)  # fmt: skip


class MeasurementFailed(Exception):
    """A GPU-suite measurement did not produce its figure (the report says why; the others go on)."""


def attempt(what: str, measure: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """measure(), or {"failed": why}: one variant that fails (a compile error, out of memory) must not cost the rest."""
    print(f"benchmark: {what} ...", file=sys.stderr, flush=True)
    try:
        reset_peak_memory(device)  # also hands what earlier variants cached back to the GPU (a trainer needs it)
        return measure()
    except Exception as error:  # noqa: BLE001 - recorded in the report; the other measurements go on
        reason = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0].rstrip(": ")
        print(f"benchmark: {what} FAILED: {reason}", file=sys.stderr, flush=True)
        return {"failed": reason}
    finally:
        torch._dynamo.reset()  # drop compiled graphs (and the memory they hold) before the next variant


def run_command(argv: list[str], log_path: Path) -> float:
    started = time.perf_counter()
    with log_path.open("w") as log:
        status = subprocess.run(
            argv, cwd=PROJECT_ROOT, env=project_env(), stdout=log, stderr=subprocess.STDOUT, check=False
        ).returncode
    if status:
        tail = " | ".join(line for line in log_path.read_text(errors="replace").splitlines()[-6:] if line.strip())
        raise MeasurementFailed(f"{Path(argv[1]).name} exited with status {status}: {tail[-1500:]}")
    return time.perf_counter() - started


def trainer_windows(metrics_path: Path) -> tuple[list[float], float | None]:
    """img/s of a trainer run's windows (metrics.jsonl rows after the warm-up one) and its peak memory, if logged."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if len(rows) < 2:
        raise MeasurementFailed(f"{metrics_path} has {len(rows)} row(s); the benchmark needs 2: warm-up and a window")
    memory = [row["memory_peak_mb"] for row in rows if row.get("memory_peak_mb") is not None]
    return [row["img_per_s"] for row in rows[1:]], max(memory, default=None)


@dataclass
class GpuRun:  # what the measurements of one GPU-suite run share, and those measurements
    spec: GpuBenchSpec
    device: torch.device
    precision: torch.dtype  # bf16 (autocast) or fp32
    data_dir: Path  # the toy cats the trainer reads
    work_dir: Path  # trainer runs and logs
    num_classes: int
    peak_flops: float  # matmul peak in the training precision, measured in this run

    def new_dit(self, model: GpuModelSpec, compiled: bool = False) -> TinyDiT:
        torch.manual_seed(0)
        network = build_dit(model.name, self.spec.image_size, self.num_classes).to(self.device)
        return torch.compile(network) if compiled else network

    def training_figures(self, img_per_s_windows: list[float], flops_per_step: int) -> dict[str, Any]:
        img_per_s, batch_size = statistics.median(img_per_s_windows), self.spec.batch_size
        achieved = flops_per_step * img_per_s / batch_size
        return {"img_per_s": img_per_s, "step_ms": batch_size / img_per_s * 1e3, "tflop_per_s": achieved / 1e12,
                "mfu": achieved / self.peak_flops, "img_per_s_windows": img_per_s_windows}  # fmt: skip

    def bare_loop(self, model: GpuModelSpec, flops_per_step: int, compiled: bool) -> dict[str, Any]:
        """Timed as the trainer logs: a warm-up window, then `windows` windows of `window_steps` steps."""
        step = dit_train_step(self.new_dit(model, compiled).train(), self.spec.batch_size, self.device, self.precision)
        first_step_seconds = timed_calls(step, self.device, 1)  # the compile included, for a compiled model
        seconds = [timed_calls(step, self.device, model.window_steps) for _ in range(self.spec.windows + 1)][1:]
        figures = self.training_figures([self.spec.batch_size / s for s in seconds], flops_per_step)
        return {**figures, "first_step_seconds": first_step_seconds, "memory_peak_mb": peak_memory_mb(self.device)}

    def trainer_command(self, model: GpuModelSpec, run_name: str, compiled: bool) -> list[str]:
        """The benchmark's whole interface to the trainer: a run that logs every window, and saves and samples once."""
        spec, steps = self.spec, (self.spec.windows + 1) * model.window_steps  # a warm-up window, then `windows`
        flags = (
            f"--model {model.name} --image-size {spec.image_size} --batch-size {spec.batch_size} --steps {steps} "
            f"--log-interval {model.window_steps} --save-interval {steps} --sample-interval {steps} "
            f"--device {self.device.type} --mixed-precision {'bf16' if self.precision == torch.bfloat16 else 'no'} "
            f"--run-name {run_name} --compile {'on' if compiled else 'off'}"
        )
        argv = [sys.executable, TRAINER, str(self.data_dir), "--output-dir", str(self.work_dir / "runs")]
        return argv + flags.split()

    def trainer(self, model: GpuModelSpec, flops_per_step: int, compiled: bool) -> dict[str, Any]:
        """The real trainer on the toy cats: img/s from its own log, FLOPs per step from the bare loop's count."""
        run_name = f"{model.name.replace('/', '')}-{'compiled' if compiled else 'eager'}"
        argv = self.trainer_command(model, run_name, compiled)
        seconds = run_command(argv, self.work_dir / f"{run_name}.log")
        windows, memory = trainer_windows(self.work_dir / "runs" / run_name / "metrics.jsonl")
        figures, command = self.training_figures(windows, flops_per_step), shlex.join(["python", *argv[1:]])
        return {**figures, "memory_peak_mb": memory, "run_seconds": seconds, "command": command}

    def sampling(self, model: GpuModelSpec, compiled: bool) -> dict[str, Any]:
        network, spec = self.new_dit(model, compiled).eval(), self.spec
        first = sampling_call(network, spec.batch_size, 1, spec.cfg_scale, self.device, self.precision)
        full = sampling_call(network, spec.batch_size, spec.sample_steps, spec.cfg_scale, self.device, self.precision)
        first_call_seconds = timed_calls(first, self.device, 1)  # the compile included, for a compiled model
        img_per_s = [spec.batch_size / timed_calls(full, self.device, 1) for _ in range(spec.sample_repeats)]
        figures = {"img_per_s": statistics.median(img_per_s), "img_per_s_repeats": img_per_s}
        return {**figures, "first_call_seconds": first_call_seconds, "memory_peak_mb": peak_memory_mb(self.device)}


def trainer_over_bare_loop(entry: dict[str, Any]) -> dict[str, float | None]:  # None: either failed or was skipped
    trainer, bare = ({v: entry[kind][v].get("img_per_s") for v in VARIANTS} for kind in ("trainer", "bare_loop"))
    return {v: trainer[v] / bare[v] if trainer[v] and bare[v] else None for v in VARIANTS}


def measure_gpu_suite(spec: GpuBenchSpec, device: torch.device, skip_compile: bool, report: dict, publish) -> None:
    # bf16 where the trainer's `auto` picks it (the device computes it natively), else fp32; TF32 as the trainer sets it
    report["precision"] = "bf16" if resolve_mixed_precision("auto", device.type) == "bf16" else "fp32"
    precision = torch.bfloat16 if report["precision"] == "bf16" else torch.float32
    allow_tf32()
    with tempfile.TemporaryDirectory(prefix="tiny-cats-bench-") as temp:
        work_dir, data_dir = Path(temp), Path(temp, "toy-cats")
        print("benchmark: drawing the toy cats ...", file=sys.stderr, flush=True)
        draw = f"--per-class {spec.toy_cats_per_class} --size {spec.image_size} --seed 0".split()
        seconds = run_command([sys.executable, TOY_CATS, "--out", str(data_dir), *draw], work_dir / "make_toy_cats.log")
        report["data"] = {"classes": len(scan_image_folder(data_dir).class_names), "per_class": spec.toy_cats_per_class}
        report["data"].update(image_size=spec.image_size, seconds=seconds)
        matmul = matmul_call(spec.matmul_size, precision, device)
        matmul()  # warm-up: kernel selection
        best = min(timed_calls(matmul, device, spec.matmul_calls) for _ in range(spec.windows))
        peak_flops = 2 * spec.matmul_size**3 / best
        report["matmul_peak"] = {"dtype": str(precision).removeprefix("torch."), "size": spec.matmul_size}
        report["matmul_peak"]["tflop_per_s"] = peak_flops / 1e12
        report["models"] = {model.name: {} for model in spec.models}
        publish()
        run = GpuRun(spec, device, precision, data_dir, work_dir, report["data"]["classes"], peak_flops)

        def measure_variants(model: GpuModelSpec, kind: str, measure: Callable[..., dict[str, Any]]) -> None:
            entry = report["models"][model.name][kind] = {}
            for variant, compiled in VARIANTS.items():
                if compiled and skip_compile:
                    entry[variant] = {"skipped": "--skip-compile"}
                else:
                    what = f"{model.name} {kind.replace('_', ' ')} {variant}"
                    entry[variant] = attempt(what, functools.partial(measure, model, compiled=compiled), device)
                publish()

        # All training (what the goal judges) before any sampling: a run cut short still has the goal's figures.
        for model in spec.models:
            entry = report["models"][model.name]
            network = run.new_dit(model)
            entry["parameters"] = count_parameters(network)
            flops, flops_by_op = count_flops(dit_train_step(network, spec.batch_size, device, precision))
            entry.update(gflop_per_step=flops / 1e9, gflop_per_image=flops / spec.batch_size / 1e9)
            entry["gflop_per_step_by_op"] = {op: n / 1e9 for op, n in flops_by_op.items()}
            measure_variants(model, "bare_loop", functools.partial(run.bare_loop, flops_per_step=flops))
            measure_variants(model, "trainer", functools.partial(run.trainer, flops_per_step=flops))
            entry["trainer_over_bare_loop"] = trainer_over_bare_loop(entry)
            publish()
        for model in spec.models:
            measure_variants(model, "sampling", run.sampling)


def gpu_goal(report: dict[str, Any], quick: bool) -> dict[str, Any]:
    # The goal is for S/4 and S/2 at batch 256 in bf16; the suite's full sizes run only on CUDA (resolve_suite).
    if quick or report["precision"] != "bf16":
        why = "--quick sizes are not S/4 and S/2 at batch 256" if quick else "the goal is for bf16; this GPU lacks it"
        return {"not_evaluated": why}
    goal = {name: judge(report["models"].get(name, {}), bar) for name, bar in GPU_GOAL.items()}
    all_met = all(check["met"] for figures in goal.values() for check in figures.values())
    return {"applies_to": "cuda", **goal, "all_met": all_met}


# --- The command ------------------------------------------------------------------------------------------------------
@dataclass
class BenchmarkConfig:  # no --cpu-threads: the benchmark measures the machine as it is
    suite: str = option(
        "auto", "cpu: the CPU speed bar; gpu: the GPU goal; auto: gpu on CUDA, else cpu", choices=("auto", "cpu", "gpu")
    )
    quick: bool = option(False, "toy sizes: checks a suite's code in seconds, on any device; its figures mean nothing")
    out: str = option("", "also write the report here (the GPU suite rewrites it after every measurement)")
    skip_compile: bool = option(False, "skip the torch.compile'd variants (their compile takes minutes on a CPU)")
    rounds: int = option(5, "CPU suite: measurement rounds; each figure is its best round")
    device: str = option("auto", "where to measure the models (ONNX Runtime is always CPU)", choices=DEVICES)


def resolve_suite(requested: str, device: torch.device, quick: bool) -> str:
    suite = requested if requested != "auto" else "gpu" if device.type == "cuda" else "cpu"
    if suite == "gpu" and device.type != "cuda" and not quick:
        raise UserError(f"the GPU suite needs CUDA, not {device.type} — add --quick for toy sizes, or use --suite cpu")
    return suite


def main(cfg: BenchmarkConfig) -> dict[str, Any]:
    if cfg.rounds < 1:
        raise UserError(f"--rounds {cfg.rounds}: each figure is the best of its rounds — use --rounds 1 or more")
    device = torch.device(resolve_device_type(cfg.device))
    suite = resolve_suite(cfg.suite, device, cfg.quick)
    started = time.perf_counter()
    machine = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    machine.update(cpu=platform.processor() or platform.machine(), python=platform.python_version())
    machine["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        machine.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    report: dict[str, Any] = {"suite": suite, "machine": machine, "quick": cfg.quick}
    publish = functools.partial(write_json, Path(cfg.out), report, "the benchmark report") if cfg.out else lambda: None
    if suite == "cpu":
        spec = QUICK if cfg.quick else BenchSpec()
        report.update(spec=asdict(spec), rounds=cfg.rounds)
        report.update(measure_cpu_suite(spec, device, cfg.rounds, cfg.skip_compile))
        report["speed_bar"] = speed_bar(report, device, cfg.quick)
    else:
        gpu_spec = GPU_QUICK if cfg.quick else GpuBenchSpec()
        report.update(spec=asdict(gpu_spec), complete=False)
        publish()  # before minutes of measuring: an --out that cannot be written is refused now
        measure_gpu_suite(gpu_spec, device, cfg.skip_compile, report, publish)
        report.update(gpu_goal=gpu_goal(report, cfg.quick), complete=True)
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report, indent=2, default=float), flush=True)  # first, so that a failed write loses no figure
    publish()
    return report


if __name__ == "__main__":
    run_main(main, BenchmarkConfig, "Measure training, sampling, data and ONNX speed; print one JSON report.")
