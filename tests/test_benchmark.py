"""benchmark.py: FLOP counting against hand formulas, and a --quick run that emits every report key."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models.tiny_dit import TinyDiT
from scripts.benchmark import (QUICK, BenchmarkConfig, count_flops, main, matmuls_only_call,
                               measure_pipeline_throughput, speed_bar)
from scripts.lib.images import synthetic_cache

FORWARD_OP = "aten._scaled_dot_product_flash_attention_for_cpu"
BACKWARD_OP = "aten._scaled_dot_product_flash_attention_for_cpu_backward"


def test_flop_count_adds_cpu_attention_by_hand_formula():
    batch, image, patch, width, heads, depth = 3, 16, 4, 32, 2, 2
    model = TinyDiT(image, num_classes=2, width=width, depth=depth, heads=heads, patch=patch)
    x, t, y = torch.randn(batch, 3, image, image), torch.rand(batch) * 1000, torch.tensor([0, 1, 2])

    def step():
        F.mse_loss(model(x, t, y), x).backward()

    total, by_op = count_flops(step)
    tokens, head_dim = (image // patch) ** 2, width // heads
    forward = depth * 4 * batch * heads * tokens**2 * head_dim  # QK^T and AV, 2 FLOPs per multiply-add
    assert by_op[FORWARD_OP] == forward
    assert by_op[BACKWARD_OP] == 2 * forward
    with FlopCounterMode(display=False) as plain:  # torch's own count misses exactly these kernels
        step()
    assert total == plain.get_total_flops() + 3 * forward


def test_flop_count_of_a_linear_layer():
    layer = torch.nn.Linear(8, 5, bias=False)
    total, _ = count_flops(lambda: layer(torch.randn(4, 8)))
    assert total == 2 * 4 * 8 * 5


def test_matmul_replay_repeats_exactly_the_steps_matrix_products():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4, bias=False))
    x = torch.randn(6, 8)

    def step():
        mlp(x).square().mean().backward()

    replay = matmuls_only_call(step, torch.device("cpu"))
    step_flops, step_ops = count_flops(step)
    replay_flops, replay_ops = count_flops(replay)
    assert replay_flops == step_flops > 0  # every FLOP of this step is in a matrix product
    assert replay_ops == step_ops
    with torch.autograd.graph.saved_tensors_hooks(lambda t: pytest.fail("replay ran autograd"), lambda t: t):
        replay()


def test_quick_benchmark_emits_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    report = main(BenchmarkConfig(quick=True, out=str(out), skip_compile=True, rounds=1, device="cpu"))
    assert json.loads(out.read_text())["spec"]["width"] == QUICK.width
    training = report["dit_training"]
    for variant in ("fp32", "bf16_autocast"):
        entry = training[variant]
        assert entry["img_per_s"] > 0 and 0 < entry["mfu_vs_fp32_matmul_peak"]
        assert entry["gflop_per_s"] * 1e9 * entry["step_ms"] / 1e3 == \
            pytest.approx(training["gflop_per_step"] * 1e9)
    assert training["fp32"]["matmuls_only_ms"] > 0 and training["fp32"]["mfu_if_only_matmuls_took_time"] > 0
    assert training["fp32"]["matmul_share_of_step"] == pytest.approx(
        training["fp32"]["matmuls_only_ms"] / training["fp32"]["step_ms"])
    assert training["compile"] == {"skipped": "--skip-compile"}
    assert training["gflop_per_step_by_op"][FORWARD_OP] > 0
    assert report["matmul_peak_gflop_per_s"]["fp32"] > 0
    assert report["dit_sampling"]["img_per_s"] > 0
    assert report["data_pipeline"]["ratio_to_fastest_training"] > 0
    assert report["classifier_training"]["img_per_s"] > 0
    for name in ("dit_step", "classifier"):
        assert report["onnx_runtime"][name]["ort_speedup_vs_eager"] > 0
    assert "not_evaluated" in report["speed_bar"]


def test_speed_bar_compares_each_figure_with_its_threshold():
    report = {"dit_training": {"fp32": {"mfu_vs_fp32_matmul_peak": 0.75}, "bf16_autocast": {"speedup_vs_fp32": 1.2}},
              "data_pipeline": {"ratio_to_fastest_training": 25.0},
              "onnx_runtime": {"dit_step": {"ort_speedup_vs_eager": 1.0}}}
    bar = speed_bar(report)
    assert {name: entry["met"] for name, entry in bar.items()} == {
        "fp32_mfu": True, "bf16_speedup": False, "pipeline_over_training": True, "onnx_dit_step_speedup": True}


def test_pipeline_throughput_is_measured():
    rate = measure_pipeline_throughput(synthetic_cache(32, 8), batch_size=8, level="full", steps=2)
    assert math.isfinite(rate) and rate > 0
