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
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort
import torch
from torch import nn

from scripts.lib.cli import UserError

# Opset 23 is the first with a fused Attention op; ONNX Runtime's CPU kernel for it (fed tokens by
# `attention_on_tokens`) beats the MatMul/Softmax graph that older opsets decompose attention into.
DEFAULT_OPSET = 23
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


def export_with_dynamic_batch(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_name: str,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
) -> Path:
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
            model,
            example_inputs,
            dynamo=True,
            opset_version=opset,
            optimize=True,
            input_names=list(input_names),
            output_names=[output_name],
            dynamic_shapes=tuple({0: batch} for _ in example_inputs),
            verbose=False,
        )
    attention_on_tokens(program.model)
    program.save(str(path), external_data=parameter_bytes > _MAX_INLINE_PARAMETER_BYTES)
    return path


def attention_on_tokens(model: ir.Model) -> int:
    """Let each Attention read the fused qkv projection's (B, N, 3*D) tokens directly; returns how many do.

    The exporter lowers `qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)`, SDPA and
    `out.transpose(1, 2).flatten(2)` to Reshape, Transpose, 3x(Slice, Squeeze), a 4-D Attention, Transpose,
    Reshape. PyTorch runs those permutes as free views; ONNX Runtime copies every one (~10% of a DiT
    forward on CPU). Attention's 3-D form (q_num_heads = kv_num_heads = heads) takes (B, N, heads*d)
    inputs and returns (B, N, heads*d): the same maths without the copies. A graph not of exactly that
    shape is left as it was.
    """
    rewritten = 0
    for node in list(model.graph):
        match = _head_major_attention(node)
        if match is None:
            continue
        qkv, heads, tokens_out = match
        nodes, q_k_v = _queries_keys_values(model.graph, qkv)
        attention = ir.node("Attention", q_k_v, {**node.attributes, "q_num_heads": heads, "kv_num_heads": heads})
        model.graph.insert_before(node, [*nodes, attention])
        tokens_out.replace_all_uses_with(attention.outputs[0])
        rewritten += 1
    if rewritten:
        ir.passes.common.RemoveUnusedNodesPass()(model)  # the bypassed transposes and their constants
    return rewritten


def _queries_keys_values(graph: ir.Graph, qkv: ir.Value) -> tuple[list[ir.Node], list[ir.Value]]:
    """(new nodes, [q, k, v]) of (B, N, D) each, from the fused projection's (B, N, 3*D) output.

    When qkv = MatMul(x, W) + b with constant W and b and no other use, three MatMul + Add on the thirds of W
    and b replace the 3*D-wide projection and the Split that would copy its output apart (~4% of a DiT
    forward in ONNX Runtime; every output element is the same dot product). Otherwise a Split.
    """
    add = _producer(qkv, "Add")
    matmul = _producer(add.inputs[0], "MatMul") if add else None
    weight = matmul.inputs[1].const_value if matmul else None
    bias = add.inputs[1].const_value if add else None
    if weight is None or bias is None or len(weight.shape) != 2 or len(bias.shape) != 1 or len(list(qkv.uses())) != 1:
        split = ir.node("Split", [qkv], {"axis": -1, "num_outputs": 3}, num_outputs=3)
        return [split], list(split.outputs)
    nodes, outputs = [], []
    # Named after the node: equal constants (an untrained model's zero biases) share one value in the graph.
    prefix = add.name or qkv.name
    thirds = zip(np.split(weight.numpy(), 3, axis=1), np.split(bias.numpy(), 3), strict=True)
    for part, (part_weight, part_bias) in zip("qkv", thirds, strict=True):
        constants = [
            ir.Value(name=f"{prefix}.{part}.{kind}", const_value=ir.tensor(np.ascontiguousarray(array)))
            for kind, array in (("weight", part_weight), ("bias", part_bias))
        ]
        for constant in constants:
            graph.register_initializer(constant)
        product = ir.node("MatMul", [matmul.inputs[0], constants[0]])
        nodes += [product, ir.node("Add", [product.outputs[0], constants[1]])]
        outputs.append(nodes[-1].outputs[0])
    return nodes, outputs


def _const_ints(value: ir.Value | None) -> list[int] | None:
    tensor = None if value is None else value.const_value
    return None if tensor is None else [int(v) for v in tensor.numpy().reshape(-1)]


def _only_use(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and uses[0].node.op_type == op_type else None


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if node is not None and node.op_type == op_type else None


def _head_major_attention(node: ir.Node) -> tuple[ir.Value, int, ir.Value] | None:
    """(qkv tokens, heads, the (B, N, D) output) when `node` is the exported head-major pattern, else None."""
    if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
        return None
    transposes = set()
    for index, value in enumerate(node.inputs):  # q, k, v = rows 0, 1, 2 of the permuted (3, B, h, N, d)
        squeeze = _producer(value, "Squeeze")
        take = _producer(squeeze.inputs[0], "Slice") if squeeze and _const_ints(squeeze.inputs[1]) == [0] else None
        if take is None or [_const_ints(v) for v in take.inputs[1:4]] != [[index], [index + 1], [0]]:
            return None
        if len(take.inputs) > 4 and _const_ints(take.inputs[4]) != [1]:
            return None
        transposes.add(_producer(take.inputs[0], "Transpose"))
    transpose = transposes.pop() if len(transposes) == 1 else None
    if transpose is None or list(transpose.attributes.get_ints("perm", [])) != [2, 0, 3, 1, 4]:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    shape = _const_ints(reshape.inputs[1]) if reshape else None  # (B, N, 3, heads, head_dim)
    if shape is None or len(shape) != 5 or shape[2] != 3:
        return None
    back = _only_use(node.outputs[0], "Transpose")
    if back is None or list(back.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    merge = _only_use(back.outputs[0], "Reshape")  # (B, N, heads * head_dim)
    if merge is None or len(_const_ints(merge.inputs[1]) or []) != 3 or merge.outputs[0].is_graph_output():
        return None
    return reshape.inputs[0], shape[3], merge.outputs[0]


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


def parity_with_torch(
    model: nn.Module, session: ort.InferenceSession, batches: Sequence[dict[str, torch.Tensor]]
) -> dict[int, float]:
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
        raise UserError(
            f"{what}: ONNX Runtime differs from PyTorch by {worst:.3g} > {tolerance:g} — the export is "
            "not faithful; report it with the checkpoint and the torch/onnxruntime versions"
        )
    log(f"  {what}: parity OK (max {worst:.3g} <= {tolerance:g})")
    return worst


def check_export(
    what: str, model: nn.Module, path: str | Path, batches: Sequence[dict[str, torch.Tensor]]
) -> tuple[ort.InferenceSession, float]:
    """onnx.checker, then ONNX Runtime vs PyTorch on `batches`: (session, worst diff); UserError above tolerance."""
    check_onnx_file(path)
    print("  onnx.checker: OK")
    session = make_ort_session(path)
    return session, require_parity(what, parity_with_torch(model, session, batches), PARITY_TOLERANCE)


def quantize_int8(path: str | Path) -> Path:
    """Int8 dynamic quantisation (weights int8, activations quantised on the fly) to `<name>.int8.onnx`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    path = Path(path)
    quantized = path.with_name(f"{path.stem}.int8.onnx")
    # The quantiser's shape inference rejects some intermediate shapes the dynamo exporter stores
    # ("Inferred shape and existing shape differ"); they are only hints, so quantise a copy without them.
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    with tempfile.TemporaryDirectory() as tmp:
        stripped = Path(tmp) / path.name
        onnx.save(model, str(stripped))
        # The quantiser takes every op named Attention for its own com.microsoft Attention and writes a
        # QAttention that cannot load; the standard Attention op has no weights to quantise anyway.
        op_types = [op for op in IntegerOpsRegistry if op != "Attention"]
        quantize_dynamic(str(stripped), str(quantized), weight_type=QuantType.QInt8, op_types_to_quantize=op_types)
    return quantized


def format_size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


def file_size(path: str | Path) -> int:
    """Size of an ONNX file including its external-data file, if it has one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
