"""Device, precision, compilation and the Accelerator both trainers run on, and GPU errors turned into advice."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from scripts.lib.cli import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "no", "fp16", "bf16")


def resolve_device_type(requested: str) -> str:
    """'auto' becomes cuda > mps > cpu; an explicit device that is not there is a user error."""
    cuda_ok = torch.cuda.is_available()
    mps_ok = torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda_ok else "mps" if mps_ok else "cpu"
    if requested == "cuda" and not cuda_ok:
        raise UserError("--device cuda was asked for but no CUDA GPU is visible — use --device cpu (or auto)")
    if requested == "mps" and not mps_ok:
        raise UserError("--device mps was asked for but Apple MPS is not available — use --device cpu (or auto)")
    return requested


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX).

    Measured on 2-core machines of one kind: bf16 autocast trained the DiT 1.7x faster than fp32 with
    AVX512-BF16, and about 30x SLOWER on an AVX2-only one, where bf16 is emulated.
    """
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """'auto': bf16 on Ampere and newer, fp16 (with loss scaling) on T4/Volta, bf16 on CPUs that compute it in
    hardware, full fp32 ('no') elsewhere."""
    if requested == "auto":
        if device_type == "cpu":
            return "bf16" if cpu_has_native_bf16() else "no"
        if device_type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if requested == "fp16" and device_type == "cpu":
        # Accelerate would silently train in fp32; say so instead of pretending.
        raise UserError("--mixed-precision fp16 needs a GPU; on CPU use --mixed-precision bf16 or no")
    return requested


def precision_warning(precision: str, device_type: str) -> str | None:
    """Why an explicitly chosen precision will run badly on this device (None when it is fine)."""
    if precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
        return (
            f"--mixed-precision bf16 on a CPU without AVX512-BF16/AMX ({torch.backends.cpu.get_cpu_capability()}): "
            "bf16 is emulated there and ran ~30x slower than fp32 — use --mixed-precision no (or auto)"
        )
    return None


def make_accelerator(
    device: str,
    mixed_precision: str,
    gradient_accumulation_steps: int = 1,
    log_with: str | None = None,
    project_dir: str | None = None,
) -> Accelerator:
    """One Accelerator for the whole run (DDP, mixed precision, gradient accumulation)."""
    device_type = resolve_device_type(device)
    precision = resolve_mixed_precision(mixed_precision, device_type)
    # TF32 matmuls are ~8x faster than fp32 on Ampere+ and accurate enough for training.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # Accelerate keeps the first run's precision process-wide and refuses another; a second run in the same
    # process (a notebook, tests, in-process Modal calls) may rightly ask for a different one.
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state()
    return Accelerator(
        cpu=device_type == "cpu",
        mixed_precision=precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_dir=project_dir,
    )


def compile_wanted(choice: str, device: torch.device) -> bool:
    """--compile auto|on|off: auto compiles on CUDA GPUs only, where it pays (measured on an H200: 1.54x for S/2);
    on a CPU its warm-up takes minutes for ~1.1x."""
    if choice == "auto":
        return device.type == "cuda"
    return choice == "on"


def compile_with_fallback(model: nn.Module, warm_up: Callable[[nn.Module], None], logger: logging.Logger) -> nn.Module:
    """torch.compile `model` and call `warm_up(compiled)` once (a forward + backward of a real batch), so the
    compile time is spent and logged now, not inside the first timed step. Gradients the warm-up leaves are
    dropped, so training is unchanged. Any compiler failure: one warning, and the eager `model` is returned."""
    compiled = torch.compile(model)
    started = time.perf_counter()
    try:
        warm_up(compiled)
        synchronize(next(model.parameters()).device)
    except (UserError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as error:  # noqa: BLE001 — whatever the compiler raises, eager training still works
        first_line = str(error).splitlines()[0] if str(error) else ""
        logger.warning("torch.compile failed (%s: %s); training eagerly instead", type(error).__name__, first_line)
        return model
    finally:
        model.zero_grad(set_to_none=True)
    logger.info("compiled the model in %.1f s (a warm-up step, not counted in img/s)", time.perf_counter() - started)
    return compiled


def describe_gpu_failure(error: BaseException) -> str | None:
    """An actionable message for CUDA out-of-memory and other CUDA errors, else None."""
    text = str(error)
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return (
            "out of GPU memory — lower --batch-size (and raise --gradient-accumulation-steps to keep the "
            "effective batch), choose a smaller --model or --image-size, or use --mixed-precision bf16/fp16"
        )
    if isinstance(error, RuntimeError) and ("CUDA" in text or "cuDNN" in text or "NCCL" in text):
        return f"CUDA error: {text.splitlines()[0]} — check the driver/GPU, or run on the CPU with --device cpu"
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings measure it (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
