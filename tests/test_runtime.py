"""Device / precision resolution and the Accelerator factory shared by both trainers."""

from __future__ import annotations

import pytest
import torch

from scripts.lib.cli import UserError
from scripts.lib.run import describe_gpu_failure, make_accelerator, precision_warning, resolve_mixed_precision
from scripts.lib.cli import resolve_device_type


def fake_cpu(monkeypatch, **capabilities) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, **capabilities})


def test_auto_precision_on_cpu_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=True)
    assert resolve_mixed_precision("auto", "cpu") == "bf16"
    fake_cpu(monkeypatch, amx_bf16=True)
    assert resolve_mixed_precision("auto", "cpu") == "bf16"
    fake_cpu(monkeypatch)  # AVX2 only: bf16 would be emulated, ~30x slower
    assert resolve_mixed_precision("auto", "cpu") == "no"
    assert resolve_mixed_precision("bf16", "cpu") == "bf16"  # asked for explicitly: honoured, but...
    assert "~30x slower" in precision_warning("bf16", "cpu")
    assert precision_warning("no", "cpu") is None
    fake_cpu(monkeypatch, avx512_bf16=True)
    assert precision_warning("bf16", "cpu") is None
    assert resolve_mixed_precision("auto", "mps") == "no"


def test_fp16_on_cpu_is_refused_instead_of_silently_ignored():
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        resolve_mixed_precision("fp16", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_missing_cuda_says_to_use_the_cpu():
    with pytest.raises(UserError, match="--device cpu"):
        resolve_device_type("cuda")


def test_a_second_run_in_one_process_may_change_precision():
    assert make_accelerator("cpu", "bf16").mixed_precision == "bf16"
    assert make_accelerator("cpu", "no").mixed_precision == "no"


def test_out_of_memory_becomes_advice_and_other_gpu_errors_stay_crashes():
    assert "--batch-size" in describe_gpu_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried..."))
    assert describe_gpu_failure(RuntimeError("CUDA error: device-side assert triggered")) is None
    assert describe_gpu_failure(ValueError("something else")) is None
