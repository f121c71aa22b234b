"""Speed figures of this machine, measured side by side in one run, as one JSON report.

    python scripts/benchmark.py [--quick] [--skip-compile] [--out bench.json]

- DiT training img/s for a fixed config (32 px, width 256, depth 6, heads 4, patch 4, batch 32; one
  step = flow-matching loss, backward, AdamW) in fp32, with bf16 autocast and with torch.compile.
  Achieved GFLOP/s = FLOPs of forward + backward counted by `torch.utils.flop_counter.FlopCounterMode`
  (plus the CPU attention kernels it does not know, registered here), divided by the step time. MFU =
  that over the machine's fp32 matmul peak (best of several 2048^3 matmuls), measured in the same run.
  Beside it, the fp32 step's matrix products replayed alone (same shapes and layouts): their share of
  the step, and the MFU the step would reach if nothing else took time — the ceiling for these layers.
- Sampling img/s with classifier-free guidance, the data pipeline's img/s against what training
  consumes, classifier training img/s, and ONNX Runtime vs PyTorch eager latency for one DiT sampling
  step and one classifier batch (CPU; the same export code and session as scripts/export_*).
- On a GPU: the same, plus the peak memory of each training variant.

Every figure is the best of `--rounds` rounds that visit all measurements in turn, so a burst of other
load on a shared machine hits all of them alike and is filtered out rather than skewing one ratio.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from models.classifier import build_classifier
from models.diffusion import build_objective
from models.tiny_dit import TinyDiT, count_parameters
from scripts.lib.cli import option, run_main
from scripts.lib.batches import ImageSource, training_batch
from scripts.lib.images import ImageCache, synthetic_cache
from scripts.lib.onnx_export import export_with_dynamic_batch, make_ort_session
from scripts.lib.runtime import DEVICES, resolve_device_type, synchronize

aten = torch.ops.aten


def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV: 2 matmuls of 2 B h Nq Nk d FLOPs each (model FLOPs, as in the MFU convention)."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[2], value_shape[3]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


def attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    """Gradients of both matmuls w.r.t. both operands: twice the forward (the kernel's recompute not counted)."""
    return 2 * attention_flops(query_shape, key_shape, value_shape)


# FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU flash-attention ones, so
# attention FLOPs would silently count as zero. The formulas receive shapes, in the ops' argument order.
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops,
}
SPEED_BAR = {"fp32_mfu": 0.72, "bf16_speedup": 1.35, "pipeline_over_training": 20.0, "onnx_dit_step_speedup": 1.0}


@dataclass(frozen=True)
class BenchSpec:
    """Sizes of everything measured; FULL is the fixed config the speed bar refers to."""

    image_size: int
    width: int
    depth: int
    heads: int
    patch: int
    batch_size: int
    num_classes: int
    window_s: float  # seconds each measurement runs per round (at least one call)
    matmul_size: int
    sample_steps: int
    cfg_scale: float
    classifier_backbone: str
    pipeline_steps: int


FULL = BenchSpec(image_size=32, width=256, depth=6, heads=4, patch=4, batch_size=32, num_classes=6, window_s=2.0,
                 matmul_size=2048, sample_steps=20, cfg_scale=4.0, classifier_backbone="resnet18",
                 pipeline_steps=40)
QUICK = BenchSpec(image_size=16, width=32, depth=1, heads=2, patch=4, batch_size=4, num_classes=2, window_s=0.0,
                  matmul_size=128, sample_steps=2, cfg_scale=4.0, classifier_backbone="resnet18", pipeline_steps=2)


@dataclass
class BenchmarkConfig:
    quick: bool = option(False, "tiny sizes, one step per measurement: checks the plumbing in seconds; its "
                                "figures mean nothing")
    out: str = option("", "also write the JSON report to this file")
    skip_compile: bool = option(False, "skip the torch.compile measurement (its compile takes minutes on a CPU)")
    rounds: int = option(5, "measurement rounds; each figure is its best round")
    device: str = option("auto", "where to measure the models (ONNX Runtime is always CPU)", choices=DEVICES)


# ------------------------------------------------------------------------------------------------------
# Counting and timing
# ------------------------------------------------------------------------------------------------------

class MatmulRecorder(TorchDispatchMode):
    """Records every matrix product a call makes (op, operand shapes and strides) so it can be replayed alone."""

    OPS = (aten.mm.default, aten.addmm.default, aten.bmm.default)

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[Any, list[Any]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.calls.append((func, [(a.shape, a.stride()) if isinstance(a, torch.Tensor) else a for a in args]))
        return func(*args, **(kwargs or {}))


def random_strided(shape: torch.Size, stride: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Random values in exactly this layout (transposed, broadcast and sliced views included)."""
    storage = 1 + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))
    return torch.randn(storage, device=device).as_strided(shape, stride)


def matmuls_only_call(fn: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    """A call that runs just the matrix products of one `fn()`: same ops, shapes and memory layouts.

    Its time is what the step would take if everything else (norms, activations, attention, optimizer)
    were free; with the step's FLOPs it bounds the MFU any implementation of these layers can reach here.
    """
    with MatmulRecorder() as recorder:
        fn()
    replay = [(func, [random_strided(*arg, device) if isinstance(arg, tuple) else arg for arg in args])
              for func, args in recorder.calls]

    def run() -> None:
        for func, args in replay:
            func(*args)

    return run


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per aten op) of one call of `fn`, CPU attention kernels included."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    by_op = {str(op): int(flops) for op, flops in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), by_op


class SideBySide:
    """Named measurements run in turn for several rounds; each keeps its best seconds per call.

    Every measurement's window lasts about `window_s` (calls per window set from a timed warm-up call), so
    short ones (a matmul) do not get more chances than long ones (a training step) to land in a quiet moment.
    """

    def __init__(self, device: torch.device, window_s: float):
        self.device = device
        self.window_s = window_s
        self.calls: dict[str, tuple[Callable[[], Any], int]] = {}
        self.best: dict[str, float] = {}

    def _timed(self, fn: Callable[[], Any], calls: int) -> float:
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(self.device)
        return (time.perf_counter() - started) / calls

    def add(self, name: str, fn: Callable[[], Any]) -> None:
        fn()  # warm-up: allocations, kernel selection, lazy init
        seconds = self._timed(fn, 1)
        self.calls[name] = (fn, max(1, math.ceil(self.window_s / seconds)))

    def run(self, rounds: int) -> dict[str, float]:
        for _ in tqdm(range(rounds), desc="measuring", unit="round"):
            for name, (fn, calls) in self.calls.items():
                self.best[name] = min(self.best.get(name, float("inf")), self._timed(fn, calls))
        return self.best


def matmul_call(size: int, dtype: torch.dtype, device: torch.device) -> Callable[[], torch.Tensor]:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return lambda: torch.mm(a, b)


# ------------------------------------------------------------------------------------------------------
# What is measured
# ------------------------------------------------------------------------------------------------------

def build_bench_dit(spec: BenchSpec, device: torch.device) -> TinyDiT:
    torch.manual_seed(0)
    return TinyDiT(spec.image_size, spec.num_classes, spec.width, spec.depth, spec.heads, spec.patch).to(device)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # Fused AdamW: one kernel over all parameters instead of a dozen elementwise passes (CPU and CUDA).
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def dit_train_step(model: nn.Module, spec: BenchSpec, device: torch.device,
                   precision: torch.dtype | None) -> Callable[[], None]:
    """One DiT optimizer step on a fixed batch (data loading excluded; see the pipeline figure)."""
    objective = build_objective("flow")
    optimizer = make_optimizer(model)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.rand(spec.batch_size, 3, spec.image_size, spec.image_size, device=device) * 2 - 1
    y = torch.randint(0, spec.num_classes, (spec.batch_size,), device=device)

    def step() -> None:
        t, noise = objective.draw_training_noise(x0.shape, generator, device)
        with torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None):
            loss = objective.training_loss(model, x0, y, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def dit_forward_backward_flops(spec: BenchSpec, device: torch.device) -> tuple[int, dict[str, int]]:
    """FLOPs of the forward + backward of one training step (the optimizer's elementwise work is not counted)."""
    model = build_bench_dit(spec, device)
    x = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size, device=device)
    t = torch.rand(spec.batch_size, device=device) * 1000
    y = torch.randint(0, spec.num_classes, (spec.batch_size,), device=device)
    return count_flops(lambda: F.mse_loss(model(x, t, y), x).backward())


def sampling_call(model: nn.Module, spec: BenchSpec, device: torch.device) -> Callable[[], torch.Tensor]:
    objective = build_objective("flow")
    noise = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size, device=device)
    y = torch.arange(spec.batch_size, device=device) % spec.num_classes
    return lambda: objective.sample(model, noise, y, steps=spec.sample_steps, cfg_scale=spec.cfg_scale)


def measure_pipeline_throughput(cache: ImageCache, batch_size: int, level: str, steps: int,
                                device: torch.device | str = "cpu") -> float:
    """Images per second of the cached + augmented batch stream (indices -> gather -> augment)."""
    source = ImageSource(cache, device)
    training_batch(source, batch_size, 0, seed=0, level=level)  # warm-up: allocations, kernels
    synchronize(source.device)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        training_batch(source, batch_size, step, seed=0, level=level)
    synchronize(source.device)
    return steps * batch_size / (time.perf_counter() - started)


def classifier_train_step(spec: BenchSpec, device: torch.device) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build_classifier(spec.classifier_backbone, spec.num_classes).to(device).train()
    optimizer = make_optimizer(model)
    images = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size, device=device)
    labels = torch.arange(spec.batch_size, device=device) % spec.num_classes

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def onnx_pairs(spec: BenchSpec, work_dir: Path) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """{name: (PyTorch eager call, ONNX Runtime call)} on CPU for one CFG sampling step and a classifier batch."""
    cpu = torch.device("cpu")
    dit = build_bench_dit(spec, cpu).eval()
    cfg_batch = 2 * spec.batch_size  # one guided sampling step = conditional + unconditional in one batch
    dit_inputs = (torch.randn(cfg_batch, 3, spec.image_size, spec.image_size), torch.rand(cfg_batch) * 1000,
                  torch.arange(cfg_batch) % (spec.num_classes + 1))
    classifier = build_classifier(spec.classifier_backbone, spec.num_classes).eval()
    classifier_inputs = (torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size),)
    pairs = {}
    for name, model, inputs, names in (("dit_step", dit, dit_inputs, ("x", "t", "y")),
                                       ("classifier", classifier, classifier_inputs, ("images",))):
        path = export_with_dynamic_batch(model, inputs, names, "out", work_dir / f"{name}.onnx")
        session = make_ort_session(path)
        feeds = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs, strict=True)}

        def eager(model: nn.Module = model, inputs: tuple[torch.Tensor, ...] = inputs) -> torch.Tensor:
            with torch.inference_mode():
                return model(*inputs)

        pairs[name] = (eager, lambda session=session, feeds=feeds: session.run(None, feeds))
    return pairs


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------

def training_entry(seconds: float, spec: BenchSpec, flops: int, peak_flops: float) -> dict[str, float]:
    achieved = flops / seconds
    return {"img_per_s": spec.batch_size / seconds, "step_ms": seconds * 1e3, "gflop_per_s": achieved / 1e9,
            "mfu_vs_fp32_matmul_peak": achieved / peak_flops}


def speed_bar(report: dict[str, Any]) -> dict[str, Any]:
    """Each bar figure, its threshold and whether it is met."""
    train = report["dit_training"]
    figures = {"fp32_mfu": train["fp32"]["mfu_vs_fp32_matmul_peak"],
               "bf16_speedup": train["bf16_autocast"]["speedup_vs_fp32"],
               "pipeline_over_training": report["data_pipeline"]["ratio_to_fastest_training"],
               "onnx_dit_step_speedup": report["onnx_runtime"]["dit_step"]["ort_speedup_vs_eager"]}
    return {name: {"value": value, "threshold": SPEED_BAR[name], "met": value >= SPEED_BAR[name]}
            for name, value in figures.items()}


def measure(cfg: BenchmarkConfig, spec: BenchSpec, device: torch.device) -> dict[str, Any]:
    bench = SideBySide(device, spec.window_s)
    bench.add("matmul_fp32", matmul_call(spec.matmul_size, torch.float32, device))
    bench.add("matmul_bf16", matmul_call(spec.matmul_size, torch.bfloat16, device))
    variants: dict[str, tuple[torch.dtype | None, bool]] = {"fp32": (None, False), "bf16_autocast":
                                                             (torch.bfloat16, False)}
    if not cfg.skip_compile:
        variants["compile"] = (None, True)
    compile_seconds = None
    memory_mb = {}
    for name, (precision, compiled) in variants.items():
        model = build_bench_dit(spec, device).train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        step = dit_train_step(torch.compile(model) if compiled else model, spec, device, precision)
        bench.add(f"train_{name}", step)
        if name == "fp32":
            bench.add("train_fp32_matmuls_only", matmuls_only_call(step, device))
        if compiled:
            compile_seconds = time.perf_counter() - started
        if device.type == "cuda":
            memory_mb[name] = torch.cuda.max_memory_allocated(device) / 2**20
    sampler_model = build_bench_dit(spec, device).eval()
    bench.add("sampling", sampling_call(sampler_model, spec, device))
    bench.add("classifier_train", classifier_train_step(spec, device))
    cache = synthetic_cache(max(256, 4 * spec.batch_size), spec.image_size, spec.num_classes)
    bench.add("pipeline", lambda: measure_pipeline_throughput(cache, spec.batch_size, "full", spec.pipeline_steps,
                                                              device))
    with tempfile.TemporaryDirectory() as work_dir:
        for name, (eager, runtime) in onnx_pairs(spec, Path(work_dir)).items():
            bench.add(f"onnx_{name}_eager", eager)
            bench.add(f"onnx_{name}_ort", runtime)
        best = bench.run(cfg.rounds)

    flops, flops_by_op = dit_forward_backward_flops(spec, device)
    peak = 2 * spec.matmul_size**3 / best["matmul_fp32"]
    peak_bf16 = 2 * spec.matmul_size**3 / best["matmul_bf16"]
    training = {name: training_entry(best[f"train_{name}"], spec, flops, peak) for name in variants}
    for name, entry in training.items():
        entry["speedup_vs_fp32"] = best["train_fp32"] / best[f"train_{name}"]
        if name in memory_mb:
            entry["memory_peak_mb"] = memory_mb[name]
    matmuls_only = best["train_fp32_matmuls_only"]
    training["fp32"].update({"matmuls_only_ms": matmuls_only * 1e3,
                             "matmul_share_of_step": matmuls_only / best["train_fp32"],
                             "mfu_if_only_matmuls_took_time": flops / matmuls_only / peak})
    training["bf16_autocast"]["mfu_vs_bf16_matmul_peak"] = flops / best["train_bf16_autocast"] / peak_bf16
    if compile_seconds is not None:
        training["compile"]["compile_seconds"] = compile_seconds
    fastest_training = max(entry["img_per_s"] for entry in training.values())
    pipeline_img_s = spec.pipeline_steps * spec.batch_size / best["pipeline"]
    report = {
        "matmul_peak_gflop_per_s": {"fp32": peak / 1e9, "bf16": peak_bf16 / 1e9, "size": spec.matmul_size},
        "dit_training": {"gflop_per_step": flops / 1e9, "gflop_per_step_by_op": {k: v / 1e9 for k, v in
                                                                                 flops_by_op.items()},
                         "parameters": count_parameters(build_bench_dit(spec, device)), **training},
        "dit_sampling": {"img_per_s": spec.batch_size / best["sampling"], "steps": spec.sample_steps,
                         "cfg_scale": spec.cfg_scale, "batch_size": spec.batch_size, "precision": "fp32"},
        "data_pipeline": {"img_per_s": pipeline_img_s, "augmentation": "full",
                          "fastest_training_img_per_s": fastest_training,
                          "ratio_to_fastest_training": pipeline_img_s / fastest_training},
        "classifier_training": {"img_per_s": spec.batch_size / best["classifier_train"],
                                "backbone": spec.classifier_backbone, "image_size": spec.image_size},
        "onnx_runtime": {name: {"eager_ms": best[f"onnx_{name}_eager"] * 1e3, "ort_ms": best[f"onnx_{name}_ort"] * 1e3,
                                "ort_speedup_vs_eager": best[f"onnx_{name}_eager"] / best[f"onnx_{name}_ort"],
                                "batch_size": 2 * spec.batch_size if name == "dit_step" else spec.batch_size,
                                "device": "cpu"}
                         for name in ("dit_step", "classifier")},
    }
    if cfg.skip_compile:
        report["dit_training"]["compile"] = {"skipped": "--skip-compile"}
    return report


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Measure everything, print the JSON report (and write it to --out); returns the report."""
    spec = QUICK if cfg.quick else FULL
    device = torch.device(resolve_device_type(cfg.device))
    started = time.perf_counter()
    report = {"machine": machine_info(device), "spec": asdict(spec), "quick": cfg.quick, "rounds": cfg.rounds,
              **measure(cfg, spec, device)}
    # The bar's thresholds were set for the fixed config on a CPU; --quick sizes say nothing about them.
    report["speed_bar"] = ({"not_evaluated": "--quick sizes are not the fixed config"} if cfg.quick
                           else {"applies_to": "cpu", **speed_bar(report)})
    report["seconds"] = time.perf_counter() - started
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    run_main(main, BenchmarkConfig, "Measure training, sampling, data and ONNX Runtime speed side by side; "
                                    "prints one JSON report.")
