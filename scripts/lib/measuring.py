"""Counting and timing for scripts/benchmark.py, shared by its CPU and GPU suites.

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` plus the CPU flash-attention kernels it has no formula for
  (registered here), so attention is not silently counted as zero on a CPU.
- Timing: `timed_calls` (queued GPU work included) and `SideBySide`, which visits named measurements in turn
  for several rounds so that a burst of other load hits them all alike.
- The matrix products of a step replayed alone (`matmuls_only_call`): the ceiling for these layers.
- Peak GPU memory per variant (`reset_peak_memory`, `peak_memory_mb`).
- The DiT training step and guided sampling call both suites time, and their forward + backward FLOPs.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from models.diffusion import build_objective
from models.tiny_dit import TinyDiT
from scripts.lib.runtime import synchronize

aten = torch.ops.aten


def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV: 2 matmuls of 2 B h Nq Nk d FLOPs each (model FLOPs, as in the MFU convention)."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[2], value_shape[3]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


def attention_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    """Gradients of both matmuls w.r.t. both operands: twice the forward (the kernel's recompute not counted)."""
    return 2 * attention_flops(query_shape, key_shape, value_shape)


# FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU flash-attention ones, so
# attention FLOPs would silently count as zero. The formulas receive shapes, in the ops' argument order.
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops,
}


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
    replay = [
        (func, [random_strided(*arg, device) if isinstance(arg, tuple) else arg for arg in args])
        for func, args in recorder.calls
    ]

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


def timed_calls(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Seconds per call of `calls` calls in a row, queued GPU work included."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - started) / calls


def autocast(device: torch.device, precision: torch.dtype | None):
    """Autocast to `precision` (None: full fp32, autocast off)."""
    return torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None)


def reset_peak_memory(device: torch.device) -> None:
    """Start a variant's peak-memory count from what is really still in use (a no-op off CUDA)."""
    if device.type == "cuda":
        gc.collect()  # a finished variant's tensors go back to the caching allocator, then to the GPU
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset_peak_memory (None off CUDA, where it is not tracked)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


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

    def add(self, name: str, fn: Callable[[], Any]) -> None:
        fn()  # warm-up: allocations, kernel selection, lazy init
        seconds = timed_calls(fn, self.device, 1)
        self.calls[name] = (fn, max(1, math.ceil(self.window_s / seconds)))

    def run(self, rounds: int) -> dict[str, float]:
        for _ in tqdm(range(rounds), desc="measuring", unit="round"):
            for name, (fn, calls) in self.calls.items():
                self.best[name] = min(self.best.get(name, float("inf")), timed_calls(fn, self.device, calls))
        return self.best


def matmul_call(size: int, dtype: torch.dtype, device: torch.device) -> Callable[[], torch.Tensor]:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return lambda: torch.mm(a, b)


# ------------------------------------------------------------------------------------------------------
# The DiT workloads both suites time
# ------------------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # Fused AdamW: one kernel over all parameters instead of a dozen elementwise passes (CPU and CUDA).
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def image_shape(model: TinyDiT, batch_size: int) -> tuple[int, int, int, int]:
    return (batch_size, model.in_channels, model.image_size, model.image_size)


def dit_train_step(
    model: nn.Module, batch_size: int, device: torch.device, precision: torch.dtype | None
) -> Callable[[], None]:
    """One DiT optimizer step on a fixed batch (data loading excluded; see the pipeline figure).

    `model` is a TinyDiT, possibly compiled. The noise is drawn on `device`, so on a GPU the loop has no host
    work but launching kernels.
    """
    objective = build_objective("flow")
    optimizer = make_optimizer(model)
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(image_shape(model, batch_size), device=device) * 2 - 1
    y = torch.randint(0, model.null_class, (batch_size,), device=device)

    def step() -> None:
        t, noise = objective.draw_training_noise(x0.shape, generator, device)
        with autocast(device, precision):
            loss = objective.training_loss(model, x0, y, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def forward_backward_flops(
    model: TinyDiT, batch_size: int, device: torch.device, precision: torch.dtype | None = None
) -> tuple[int, dict[str, int]]:
    """FLOPs of the forward + backward of one training step (the optimizer's elementwise work is not counted)."""
    x = torch.randn(image_shape(model, batch_size), device=device)
    t = torch.rand(batch_size, device=device) * 1000
    y = torch.randint(0, model.null_class, (batch_size,), device=device)

    def step() -> None:
        with autocast(device, precision):
            loss = F.mse_loss(model(x, t, y).float(), x)
        loss.backward()

    return count_flops(step)


def sampling_call(
    model: nn.Module,
    batch_size: int,
    steps: int,
    cfg_scale: float,
    device: torch.device,
    precision: torch.dtype | None = None,
) -> Callable[[], torch.Tensor]:
    """Guided flow sampling of one batch (one label per image, cycling through the classes) from fixed noise."""
    objective = build_objective("flow")
    noise = torch.randn(image_shape(model, batch_size), device=device)
    y = torch.arange(batch_size, device=device) % model.num_classes

    def sample() -> torch.Tensor:
        with autocast(device, precision):
            return objective.sample(model, noise, y, steps=steps, cfg_scale=cfg_scale)

    return sample
