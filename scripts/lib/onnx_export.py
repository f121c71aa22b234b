"""What both ONNX exporters share: a self-contained `.onnx` with a dynamic batch axis, its `<name>.json` sidecar, the
parity check, and the one session the checks, the torch-free sampler and the benchmark use, so what is timed ships."""

from __future__ import annotations

import os
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

from scripts.lib.cli import UserError, printable, save_output, write_json

# Opset 23 is the first with a fused Attention op; ONNX Runtime's CPU kernel for it (fed tokens by
# `attention_on_tokens`) beats the MatMul/Softmax graph that older opsets decompose attention into.
DEFAULT_OPSET = 23
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 2, 5)


def make_ort_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; 0 threads: one intra-op thread per core this process may use (affinity, container limits)."""
    options = ort.SessionOptions()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    options.intra_op_num_threads = threads or usable
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def export_with_dynamic_batch(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], input_names: Sequence[str], output_name: str,
    path: str | Path, opset: int = DEFAULT_OPSET,
) -> Path:  # fmt: skip
    """Export `model(*example_inputs)` in eval mode with the dynamo exporter (its graph optimiser on); axis 0 of
    every input is one dynamic batch. Every registry model fits a protobuf's 2 GiB, so the weights stay inside."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        # All inputs share the one batch Dim on purpose; the exporter warns that it renames none of them.
        warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used")
        program = torch.onnx.export(
            model.eval(), example_inputs, dynamo=True, opset_version=opset, optimize=True, verbose=False,
            input_names=list(input_names), output_names=[output_name],
            dynamic_shapes=tuple({0: batch} for _ in example_inputs),
        )  # fmt: skip
    attention_on_tokens(program.model)
    return save_output(Path(path), lambda tmp: program.save(str(tmp)), "the ONNX graph")


def sidecar_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def write_sidecar(onnx_path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Writes `<name>.json` beside the graph, reports both files and returns them: the start of an export's summary."""
    sidecar = write_json(sidecar_path(onnx_path), data, "the ONNX sidecar")
    print(f"  wrote {onnx_path} ({size_text(onnx_path)}) and {sidecar}")
    return {"onnx": str(onnx_path), "sidecar": str(sidecar)}


def max_abs_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))


def verify_export(
    what: str, model: nn.Module, path: Path, batches: Sequence[dict[str, torch.Tensor]], threads: int = 0
) -> tuple[ort.InferenceSession, float]:
    """onnx.checker, then ONNX Runtime vs PyTorch on each batch of named CPU inputs: (session, worst difference)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError(f"{printable(path)}: the exported graph is not valid ONNX ({printable(error)})") from error
    print("  onnx.checker: OK")
    session = make_ort_session(path, threads)
    diffs = []
    for inputs in batches:
        with torch.no_grad():
            expected = model(*inputs.values()).numpy()
        diffs.append(max_abs_diff(session.run(None, {name: t.numpy() for name, t in inputs.items()})[0], expected))
        print(f"  {what} batch {len(expected)}: max |onnx - torch| = {diffs[-1]:.3g}")
    worst = float(np.max(diffs))  # NaN, if any, is the worst
    if not worst <= PARITY_TOLERANCE:
        raise UserError(
            f"{what}: ONNX Runtime differs from PyTorch by {worst:.3g} > {PARITY_TOLERANCE:g}: an export bug, report it"
        )
    print(f"  {what}: parity OK (max {worst:.3g} <= {PARITY_TOLERANCE:g})")
    return session, worst


def size_text(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.2f} MiB"


def attention_on_tokens(model: ir.Model) -> int:
    """Let each Attention read the fused qkv projection's (B, N, 3*D) tokens directly; returns how many do.

    The exporter lowers the head-major permutes around SDPA to Reshape, Transpose, 3x(Slice, Squeeze), a 4-D
    Attention, Transpose, Reshape: free views in PyTorch, copies in ONNX Runtime (~10% of a DiT forward on CPU).
    Attention's 3-D form (q_num_heads = kv_num_heads = heads) takes and returns (B, N, heads*d) without them.
    A graph not of exactly that shape is left as it was."""
    rewritten = 0
    for node in list(model.graph):
        if (match := _head_major_attention(node)) is None:
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
    """(new nodes, [q, k, v]) of (B, N, D) each from the fused projection's (B, N, 3*D) output. When qkv is
    MatMul(x, W) + b with constant W and b and no other use: three MatMul + Add on the thirds of W and b, sparing the
    Split that copies its output apart (~4% of a DiT forward in ONNX Runtime; same dot products); else that Split."""
    add = _producer(qkv, "Add")
    matmul = _producer(add.inputs[0], "MatMul") if add else None
    weight = matmul.inputs[1].const_value if matmul else None
    bias = add.inputs[1].const_value if add else None
    if weight is None or bias is None or len(weight.shape) != 2 or len(bias.shape) != 1 or len(list(qkv.uses())) != 1:
        split = ir.node("Split", [qkv], {"axis": -1, "num_outputs": 3}, num_outputs=3)
        return [split], list(split.outputs)
    nodes, outputs = [], []
    prefix = add.name or qkv.name  # per node: equal constants (zero biases) would otherwise share one value
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
        bounds = [_const_ints(v) for v in take.inputs[1:]] if take else None  # starts, ends, axes[, steps]
        if bounds not in ([[index], [index + 1], [0]], [[index], [index + 1], [0], [1]]):
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
