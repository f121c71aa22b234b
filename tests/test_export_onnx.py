"""ONNX export of the DiT and the classifier: files, sidecars, parity checks that pass and that can fail.

Each export costs seconds, so the main export runs once per module (a fixture) and the tests inspect it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from builders import CLASS_NAMES, DIT_NAME, dit_test_metadata, save_classifier, save_dit, trained_dit
from safetensors import safe_open
from safetensors.torch import save_file

from models.tiny_dit import DIT_SIZES
from scripts import export_dit_onnx, export_onnx
from scripts.export_dit_onnx import ExportDiTConfig, compare_sampling, onnx_sample, random_inputs
from scripts.export_onnx import ExportClassifierConfig, top1_disagreements
from scripts.lib.checkpoints import build_objective_from_metadata, load_dit
from scripts.lib.cli import EXIT_USER_ERROR, UserError, parse_config, run_main
from scripts.lib.onnx_export import (
    DEFAULT_OPSET, PARITY_TOLERANCE, attention_on_tokens, export_with_dynamic_batch, make_ort_session, sidecar_path,
    verify_export,
)  # fmt: skip
from scripts.make_toy_cats import generate_toy_cats

STEPS = 3


def read_sidecar(onnx_path) -> dict:
    return json.loads(sidecar_path(onnx_path).read_text())


@pytest.fixture(scope="module")
def flow_export(tmp_path_factory) -> tuple[dict, Path]:
    """A flow-objective DiT exported with --verify --test: (summary, checkpoint path)."""
    folder = tmp_path_factory.mktemp("flow")
    checkpoint = save_dit(folder / "tinydit_final.safetensors", objective="flow")
    output = str(folder / "tinydit.onnx")
    cfg = ExportDiTConfig(str(checkpoint), output, verify=True, test=True, steps=STEPS, test_per_class=1)
    return export_dit_onnx.main(cfg), checkpoint


def test_dit_export_writes_graph_sidecar_and_onnx_grid_and_passes_both_checks(flow_export):
    summary, _ = flow_export
    assert Path(summary["onnx"]).stat().st_size > 0 and Path(summary["onnx_grid"]).stat().st_size > 0
    assert not Path(summary["onnx"] + ".data").exists()  # one self-contained file
    assert summary["max_abs_diff"] <= PARITY_TOLERANCE
    assert summary["sampling_max_abs_diff"] <= 1e-3


def test_dit_sidecar_holds_what_a_runtime_needs(flow_export):
    summary, _ = flow_export
    sidecar = read_sidecar(summary["onnx"])
    assert Path(summary["sidecar"]).name == "tinydit.json"
    assert sidecar["class_names"] == CLASS_NAMES and sidecar["null_class"] == len(CLASS_NAMES)
    assert (sidecar["image_size"], sidecar["in_channels"], sidecar["pixel_range"]) == (16, 3, [-1.0, 1.0])
    assert sidecar["objective"]["prediction"] == "velocity" and sidecar["objective"]["time_scale"] == 1000.0
    # No --cfg-scale: the scale the checkpoint was trained with (2.0), by sampling.guidance_scale.
    assert sidecar["sampling"] == {**sidecar["sampling"], "sampler": "euler", "steps": STEPS, "cfg_scale": 2.0}


def test_dit_graph_has_a_dynamic_batch_axis(flow_export):
    inputs = {node.name: node.shape for node in make_ort_session(flow_export[0]["onnx"], threads=1).get_inputs()}
    assert set(inputs) == {"x", "t", "y"}
    assert all(isinstance(shape[0], str) for shape in inputs.values())
    assert inputs["x"][1:] == [3, 16, 16]


def test_parity_check_fails_for_a_graph_of_other_weights(flow_export):
    other = trained_dit(seed=1)
    batches = [random_inputs(other, 2, torch.Generator().manual_seed(0))]
    with pytest.raises(UserError, match="differs from PyTorch"):
        verify_export("denoiser", other, Path(flow_export[0]["onnx"]), batches, threads=1)


def test_heun_sampling_from_the_sidecar_matches_pytorch(flow_export):
    summary, checkpoint = flow_export
    model, objective, _ = load_dit(checkpoint)
    noise = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([2, 0])
    expected = objective.sample(model, noise, labels, steps=2, cfg_scale=3.0, sampler="heun").numpy()
    session, sidecar = make_ort_session(summary["onnx"]), read_sidecar(summary["onnx"])
    actual = onnx_sample(session, sidecar, noise.numpy(), labels.numpy(), steps=2, cfg_scale=3.0, sampler="heun")
    assert np.abs(actual - expected).max() <= 1e-4


def test_test_sampling_shows_a_progress_bar_for_pytorch_and_for_onnx_runtime(flow_export, capsys):
    summary, checkpoint = flow_export
    model, objective, _ = load_dit(checkpoint)
    cfg = ExportDiTConfig(checkpoint=str(checkpoint), output=summary["onnx"], test_per_class=1)
    compare_sampling(model, objective, Path(summary["onnx"]), cfg)
    err = capsys.readouterr().err
    for name in ("PyTorch sampling", "ONNX Runtime sampling"):
        assert f"{name}:   0%|" in err and f"| 0/{STEPS} [" in err  # a total, so tqdm shows an ETA


def test_sampling_check_fails_when_the_sidecar_is_wrong(flow_export, tmp_path):
    summary, checkpoint = flow_export
    onnx_path = tmp_path / "copy.onnx"
    onnx_path.write_bytes(Path(summary["onnx"]).read_bytes())
    sidecar = read_sidecar(summary["onnx"])
    sidecar["objective"]["time_scale"] = 1.0  # a runtime that feeds the network the wrong time
    sidecar_path(onnx_path).write_text(json.dumps(sidecar))
    model, objective, _ = load_dit(checkpoint)
    cfg = ExportDiTConfig(checkpoint=str(checkpoint), output=str(onnx_path), test_per_class=1)
    with pytest.raises(UserError, match="ONNX sampling differs from PyTorch"):
        compare_sampling(model, objective, onnx_path, cfg)


def test_ddpm_export_with_ddim_sampling_and_int8_copy(tmp_path):
    checkpoint = save_dit(tmp_path / "ddpm.safetensors", objective="ddpm")
    output = str(tmp_path / "ddpm.onnx")
    summary = export_dit_onnx.main(
        ExportDiTConfig(str(checkpoint), output, test=True, quantize=True, steps=STEPS, test_per_class=1)
    )
    objective = build_objective_from_metadata(dit_test_metadata(objective="ddpm"))
    assert read_sidecar(summary["onnx"])["objective"]["alphas_cumprod"] == objective.alphas_cumprod.tolist()
    assert summary["sampling_max_abs_diff"] <= 1e-3
    assert Path(summary["int8"]).is_file() and summary["int8_bytes"] < summary["fp32_bytes"] / 2
    assert 0 < summary["int8_max_abs_diff"] < 1.0  # int8 is lossy but close


def with_nan(path: Path, tensor: str) -> Path:
    """`path` with one NaN in `tensor`, written by safetensors itself: save_weights refuses NaN."""
    with safe_open(path, "pt") as weights:
        metadata, tensors = weights.metadata(), {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118
    tensors[tensor].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata)
    return path


CHECKPOINTS = {
    "none": lambda path: path,
    "dit": save_dit,
    "ddpm dit": lambda path: save_dit(path, objective="ddpm"),
    "NaN dit": lambda path: with_nan(save_dit(path), "x_embedder.weight"),
    "classifier": lambda path: save_classifier(path, data_dir=str(path.parent)),
    "NaN classifier": lambda path: with_nan(CHECKPOINTS["classifier"](path), "features.0.0.weight"),
}
REFUSALS = [  # exporter, checkpoint, extra flags, words of the one error line
    ("dit", "none", [], "checkpoint not found"),
    ("dit", "NaN dit", [], "x_embedder.weight"),
    ("dit", "dit", ["--sampler", "ddim"], "is not a sampler of the flow objective"),
    ("dit", "dit", ["--sampler", "x\x1b[2J"], "x1b[2J' is not a sampler of the flow objective"),
    ("dit", "ddpm dit", ["--test", "--sampler", "ddpm"], "--test compares deterministic samplers"),
    ("dit", "dit", ["--output", "{tmp}/file/x.onnx"], "could not write the ONNX graph"),
    ("classifier", "none", [], "checkpoint not found"),
    ("classifier", "NaN classifier", [], "features.0.0.weight"),
    ("classifier", "classifier", ["--verify", "--images", "{tmp}/none"], "--images"),
]
EXPORTERS = {"dit": (export_dit_onnx.main, ExportDiTConfig), "classifier": (export_onnx.main, ExportClassifierConfig)}


@pytest.mark.parametrize(("exporter", "checkpoint", "flags", "words"), REFUSALS)
def test_a_refused_export_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, exporter, checkpoint, flags, words):
    (tmp_path / "file").write_text("")
    path = CHECKPOINTS[checkpoint](tmp_path / "model.safetensors")
    argv = ["--checkpoint", str(path), "--output", str(tmp_path / "out.onnx")]
    with pytest.raises(SystemExit) as exited:
        run_main(*EXPORTERS[exporter], "test", [*argv, *(flag.format(tmp=tmp_path) for flag in flags)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == EXIT_USER_ERROR and len(lines) == 1 and words in lines[0], lines
    assert "\x1b" not in lines[0] and {path.name for path in tmp_path.iterdir()} <= {"file", "model.safetensors"}


@pytest.mark.parametrize("config_cls", [ExportDiTConfig, ExportClassifierConfig])
def test_both_exporters_take_cpu_threads(config_cls):
    assert parse_config(config_cls, ["--cpu-threads", "3"], "test").cpu_threads == 3


def test_classifier_export_matches_pytorch_and_agrees_on_real_images(tmp_path):
    data_dir = tmp_path / "cats"
    generate_toy_cats(data_dir, per_class=2, size=40, seed=0, classes=["black", "white", "calico"])
    checkpoint = save_classifier(tmp_path / "cats_model.safetensors", data_dir=str(data_dir))
    summary = export_onnx.main(ExportClassifierConfig(str(checkpoint), str(tmp_path / "cats_model.onnx"), verify=True))
    assert summary["max_abs_diff"] <= PARITY_TOLERANCE
    assert summary["top1_agreement"] == 1.0  # found the images through the checkpoint's training data_dir
    sidecar = read_sidecar(summary["onnx"])
    assert sidecar["class_names"] == CLASS_NAMES and sidecar["image_size"] == 32
    assert sidecar["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    inputs = make_ort_session(summary["onnx"], threads=1).get_inputs()
    assert [node.name for node in inputs] == ["images"] and isinstance(inputs[0].shape[0], str)


def test_the_top1_images_leave_out_hidden_files(tmp_path, capsys):
    generate_toy_cats(tmp_path / "cats", per_class=1, size=40, seed=0, classes=["black", "white"])
    (tmp_path / "cats" / "black" / "._black_0000.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (tmp_path / "cats" / ".tiny-cats-cache").mkdir()
    (tmp_path / "cats" / ".tiny-cats-cache" / "x.png").write_bytes(b"not a png")
    images = export_onnx.real_images(ExportClassifierConfig(images=str(tmp_path / "cats")), {"image_size": 32})
    assert images.shape == (2, 3, 32, 32) and "skipping" not in capsys.readouterr().out


def test_top1_disagreements_excuse_only_near_ties():
    torch_logits = np.array([[2.0, 1.0, 0.0], [1.0, 1.0 + 1e-6, 0.0]])
    assert top1_disagreements(torch_logits, torch_logits.copy(), 1e-4) == 0
    swapped = torch_logits[:, [1, 0, 2]]
    assert top1_disagreements(torch_logits, swapped, 1e-4) == 1  # row 0 is a real disagreement, row 1 a tie


def test_ort_session_uses_the_requested_threads(flow_export):
    session = make_ort_session(flow_export[0]["onnx"], threads=1)
    assert session.get_session_options().intra_op_num_threads == 1


def test_dit_attention_reads_the_qkv_tokens_without_transposes(flow_export):
    size = DIT_SIZES[DIT_NAME]
    nodes = onnx.load(flow_export[0]["onnx"]).graph.node
    attention = [node for node in nodes if node.op_type == "Attention"]
    assert len(attention) == size.depth
    for node in attention:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["q_num_heads"] == attributes["kv_num_heads"] == size.heads
    # What is left: the patch embedding's (B, D, N) -> (B, N, D) and the unpatchify.
    assert sum(node.op_type == "Transpose" for node in nodes) == 2
    # q, k and v each come from their own projection (MatMul + bias Add), not from a Split of one.
    producer = {output: node for node in nodes for output in node.output}
    for node in attention:
        assert [producer[name].op_type for name in node.input] == ["Add"] * 3
        assert {producer[producer[name].input[0]].op_type for name in node.input} == {"MatMul"}


class _AttentionOnHeads(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_attention_rewrite_leaves_other_layouts_alone(tmp_path):
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)  # head-major inputs: no fused qkv projection to read from
    program = torch.onnx.export(
        _AttentionOnHeads().eval(), (q, k, v), dynamo=True, opset_version=DEFAULT_OPSET, verbose=False
    )
    assert attention_on_tokens(program.model) == 0
    path = tmp_path / "attention.onnx"
    program.save(str(path))
    outputs = make_ort_session(path, threads=1).run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
    np.testing.assert_allclose(outputs[0], _AttentionOnHeads()(q, k, v).numpy(), atol=1e-5)


def test_older_opset_exports_attention_as_plain_ops_with_parity(tmp_path):
    model = trained_dit(seed=2)
    inputs = random_inputs(model, 3, torch.Generator().manual_seed(0))
    path = export_with_dynamic_batch(model, tuple(inputs.values()), list(inputs), "out", tmp_path / "d.onnx", opset=20)
    assert not any(node.op_type == "Attention" for node in onnx.load(str(path)).graph.node)
    assert verify_export("denoiser", model, path, [inputs], threads=1)[1] <= PARITY_TOLERANCE
