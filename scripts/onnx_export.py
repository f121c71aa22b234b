"""What the DiT and classifier ONNX exports share: export, runtime session, parity, sidecar, int8.

Both exports write one self-contained `.onnx` file (weights inside, no `.onnx.data` beside it) with a
dynamic batch axis on every input, and a JSON sidecar `<name>.json` that tells a runtime everything it
needs besides the graph. `make_ort_session` is the session every consumer (verify, --test sampling,
the benchmark) uses, so what is measured is what ships.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from scripts.cli import UserError

PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 2, 5)
# A file this big still fits a protobuf (2 GiB limit) comfortably; bigger models keep weights outside.
_MAX_INLINE_PARAMETER_BYTES = 1 << 30


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks / container limits)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_ort_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session tuned for latency: all graph optimisations, one intra-op thread per core."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or available_cores()
    # One graph, one request at a time: parallelism inside ops beats running independent ops side by side.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def sidecar_path(onnx_path: str | Path) -> Path:
    """Where the runtime metadata of `model.onnx` lives: `model.json` beside it."""
    return Path(onnx_path).with_suffix(".json")


def write_sidecar(onnx_path: str | Path, data: dict[str, Any]) -> Path:
    path = sidecar_path(onnx_path)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise UserError(f"{path} is missing — it is written by the export next to {Path(onnx_path).name}; re-export")
    return json.loads(path.read_text())


def export_with_dynamic_batch(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], input_names: Sequence[str],
                              output_name: str, path: str | Path, opset: int | None = None) -> Path:
    """Export `model(*example_inputs)` with torch.onnx's dynamo exporter; axis 0 of every input is dynamic.

    The model is exported in eval mode and the exporter's graph optimiser (constant folding, redundant op
    removal) is on, so the file holds the lean inference graph. Returns the written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad(), warnings.catch_warnings():
        # All inputs share the one batch Dim on purpose; the exporter warns that it renames none of them.
        warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used")
        program = torch.onnx.export(
            model, example_inputs, dynamo=True, opset_version=opset, optimize=True,
            input_names=list(input_names), output_names=[output_name],
            dynamic_shapes=tuple({0: batch} for _ in example_inputs), verbose=False)
    program.save(str(path), external_data=parameter_bytes > _MAX_INLINE_PARAMETER_BYTES)
    return path


def check_onnx_file(path: str | Path) -> None:
    """onnx.checker on the saved file (by path, so models with external data work too)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError(f"{path}: the exported graph is not valid ONNX ({error})") from error


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise UserError(f"ONNX output shape {a.shape} differs from PyTorch's {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def parity_with_torch(model: nn.Module, session: ort.InferenceSession,
                      batches: Sequence[dict[str, torch.Tensor]]) -> dict[int, float]:
    """{batch size: max |onnx - torch|} over `batches` (input name -> tensor, all on CPU)."""
    diffs = {}
    with torch.no_grad():
        for inputs in batches:
            expected = model(*inputs.values()).numpy()
            actual = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})[0]
            diffs[len(next(iter(inputs.values())))] = max_abs_diff(actual, expected)
    return diffs


def require_parity(what: str, diffs: dict[int, float], tolerance: float, log=print) -> float:
    """Print the per-batch max differences; UserError when the worst exceeds `tolerance`. Returns the worst."""
    for batch_size, diff in diffs.items():
        log(f"  {what} batch {batch_size}: max |onnx - torch| = {diff:.3g}")
    worst = max(diffs.values())
    if not worst <= tolerance:  # also catches NaN
        raise UserError(f"{what}: ONNX Runtime differs from PyTorch by {worst:.3g} > {tolerance:g} — the export is "
                        "not faithful; report it with the checkpoint and the torch/onnxruntime versions")
    log(f"  {what}: parity OK (max {worst:.3g} <= {tolerance:g})")
    return worst


def check_export(what: str, model: nn.Module, path: str | Path,
                 batches: Sequence[dict[str, torch.Tensor]]) -> tuple[ort.InferenceSession, float]:
    """onnx.checker, then ONNX Runtime vs PyTorch on `batches`: (session, worst diff); UserError above tolerance."""
    check_onnx_file(path)
    print("  onnx.checker: OK")
    session = make_ort_session(path)
    return session, require_parity(what, parity_with_torch(model, session, batches), PARITY_TOLERANCE)


def quantize_int8(path: str | Path) -> Path:
    """Int8 dynamic quantisation (weights int8, activations quantised on the fly) to `<name>.int8.onnx`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    quantized = path.with_name(f"{path.stem}.int8.onnx")
    # The quantiser's shape inference rejects some intermediate shapes the dynamo exporter stores
    # ("Inferred shape and existing shape differ"); they are only hints, so quantise a copy without them.
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    with tempfile.TemporaryDirectory() as tmp:
        stripped = Path(tmp) / path.name
        onnx.save(model, str(stripped))
        quantize_dynamic(str(stripped), str(quantized), weight_type=QuantType.QInt8)
    return quantized


def format_size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


def file_size(path: str | Path) -> int:
    """Size of an ONNX file including its external-data file, if it has one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
