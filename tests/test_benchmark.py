"""benchmark.py: FLOP counting against hand formulas, --quick runs of both suites that emit every report key
(the GPU suite's with the real trainer as a subprocess), and the CPU bar and GPU goal judged on each side of
their thresholds."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models.tiny_dit import TinyDiT, build_dit, count_parameters
from scripts.benchmark import (
    GPU_GOAL,
    GPU_QUICK,
    QUICK,
    BenchmarkConfig,
    GpuBenchSpec,
    GpuRun,
    MeasurementFailed,
    attempt,
    count_flops,
    dit_train_step,
    gpu_goal,
    main,
    matmuls_only_call,
    resolve_suite,
    run_command,
    speed_bar,
    trainer_over_bare_loop,
    trainer_windows,
)
from scripts.lib.cli import UserError, parse_config
from scripts.make_toy_cats import TOY_CAT_CLASSES
from scripts.train_dit import TrainDiTConfig

GPU_FULL = GpuBenchSpec()  # the defaults are the GPU goal's sizes
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
    assert report["suite"] == "cpu"
    assert json.loads(out.read_text())["spec"]["width"] == QUICK.width
    training = report["dit_training"]
    for variant in ("fp32", "bf16_autocast"):
        entry = training[variant]
        assert entry["img_per_s"] > 0 and 0 < entry["mfu_vs_fp32_matmul_peak"]
        assert entry["gflop_per_s"] * 1e9 * entry["step_ms"] / 1e3 == pytest.approx(training["gflop_per_step"] * 1e9)
    assert training["fp32"]["matmuls_only_ms"] > 0 and training["fp32"]["mfu_if_only_matmuls_took_time"] > 0
    assert training["fp32"]["matmul_share_of_step"] == pytest.approx(
        training["fp32"]["matmuls_only_ms"] / training["fp32"]["step_ms"]
    )
    assert training["compile"] == {"skipped": "--skip-compile"}
    assert training["gflop_per_step_by_op"][FORWARD_OP] > 0
    assert report["matmul_peak_gflop_per_s"]["fp32"] > 0
    assert report["dit_sampling"]["img_per_s"] > 0
    assert report["data_pipeline"]["ratio_to_fastest_training"] > 0
    assert report["classifier_training"]["img_per_s"] > 0
    for name in ("dit_step", "classifier"):
        assert report["onnx_runtime"][name]["ort_speedup_vs_eager"] > 0
    assert "not_evaluated" in report["speed_bar"]


def bar_report(mfu: float, bf16: float, pipeline: float, onnx: float) -> dict:
    return {
        "dit_training": {"fp32": {"mfu_vs_fp32_matmul_peak": mfu}, "bf16_autocast": {"speedup_vs_fp32": bf16}},
        "data_pipeline": {"ratio_to_fastest_training": pipeline},
        "onnx_runtime": {"dit_step": {"ort_speedup_vs_eager": onnx}},
    }


@pytest.mark.parametrize(
    "figures, met",
    [((0.75, 1.2, 25.0, 1.0), [True, False, True, True]), ((0.5, 1.7, 19.9, 0.98), [False, True, False, False])],
)
def test_speed_bar_compares_each_figure_with_its_threshold(figures, met):
    bar = speed_bar(bar_report(*figures), torch.device("cpu"), quick=False)
    assert bar.pop("applies_to") == "cpu"
    assert list(bar) == ["fp32_mfu", "bf16_speedup", "pipeline_over_training", "onnx_dit_step_speedup"]
    assert [(entry["value"], entry["met"]) for entry in bar.values()] == list(zip(figures, met, strict=True))
    assert [entry["threshold"] for entry in bar.values()] == [0.72, 1.35, 20.0, 1.0]


def test_the_speed_bar_is_judged_on_a_cpu_at_full_size_only():
    report = bar_report(0.9, 1.7, 250.0, 1.02)
    assert set(speed_bar(report, torch.device("cuda"), quick=False)) == {"not_evaluated"}
    assert set(speed_bar(report, torch.device("cpu"), quick=True)) == {"not_evaluated"}


def test_the_suite_follows_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_suite("auto", cuda, quick=False) == "gpu"
    assert resolve_suite("auto", cpu, quick=False) == "cpu"
    assert resolve_suite("cpu", cuda, quick=False) == "cpu"
    assert resolve_suite("gpu", cpu, quick=True) == "gpu"  # its code path at toy sizes
    with pytest.raises(UserError, match="--quick"):
        resolve_suite("gpu", cpu, quick=False)


# ------------------------------------------------------------------------------------------------------
# GPU suite
# ------------------------------------------------------------------------------------------------------


def failures(report) -> list[str]:
    """Every {"failed": ...} entry anywhere in the report."""
    if not isinstance(report, dict):
        return []
    return [report["failed"]] if "failed" in report else [f for value in report.values() for f in failures(value)]


def test_quick_gpu_suite_runs_the_trainer_beside_a_bare_loop(tmp_path):
    """The GPU suite's code path at toy sizes on this CPU: the real trainer as a subprocess, every report key."""
    out = tmp_path / "bench.json"
    report = main(BenchmarkConfig(suite="gpu", quick=True, skip_compile=True, device="cpu", out=str(out)))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert failures(report) == []
    assert set(report) == {
        "suite",
        "machine",
        "quick",
        "spec",
        "complete",
        "precision",
        "data",
        "matmul_peak",
        "models",
        "gpu_goal",
        "seconds",
    }
    assert report["suite"] == "gpu" and report["complete"] is True
    assert set(report["gpu_goal"]) == {"not_evaluated"}
    data = dict(report["data"])
    assert data.pop("seconds") > 0
    assert data == {
        "classes": len(TOY_CAT_CLASSES),
        "per_class": GPU_QUICK.toy_cats_per_class,
        "image_size": GPU_QUICK.image_size,
    }
    assert report["matmul_peak"]["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[report["precision"]]
    assert report["matmul_peak"]["size"] == GPU_QUICK.matmul_size
    peak = report["matmul_peak"]["tflop_per_s"] * 1e12
    assert peak > 0
    ((name, model),) = report["models"].items()
    assert name == GPU_QUICK.models[0].name
    assert set(model) == {
        "parameters",
        "gflop_per_step",
        "gflop_per_image",
        "gflop_per_step_by_op",
        "bare_loop",
        "trainer",
        "sampling",
        "trainer_over_bare_loop",
    }
    figures = {"img_per_s", "step_ms", "tflop_per_s", "mfu", "img_per_s_windows", "memory_peak_mb"}
    assert set(model["bare_loop"]["eager"]) == figures | {"first_step_seconds"}
    assert set(model["trainer"]["eager"]) == figures | {"run_seconds", "command"}
    assert set(model["sampling"]["eager"]) == {"img_per_s", "img_per_s_repeats", "first_call_seconds", "memory_peak_mb"}
    assert model["parameters"] == count_parameters(build_dit(name, GPU_QUICK.image_size, len(TOY_CAT_CLASSES)))
    assert model["gflop_per_image"] * GPU_QUICK.batch_size == pytest.approx(model["gflop_per_step"])
    assert model["gflop_per_step_by_op"][FORWARD_OP] > 0  # attention counted
    for kind in ("bare_loop", "trainer"):
        entry = model[kind]["eager"]
        assert len(entry["img_per_s_windows"]) == GPU_QUICK.windows and min(entry["img_per_s_windows"]) > 0
        assert entry["img_per_s"] == statistics.median(entry["img_per_s_windows"])
        assert entry["step_ms"] == pytest.approx(GPU_QUICK.batch_size / entry["img_per_s"] * 1e3)
        flop_per_s = model["gflop_per_step"] * 1e9 * entry["img_per_s"] / GPU_QUICK.batch_size
        assert entry["tflop_per_s"] * 1e12 == pytest.approx(flop_per_s)
        assert entry["mfu"] == pytest.approx(flop_per_s / peak)
        assert entry["memory_peak_mb"] is None  # tracked on CUDA only
    assert model["bare_loop"]["eager"]["first_step_seconds"] > 0
    trainer = model["trainer"]["eager"]
    assert trainer["command"].startswith("python scripts/train_dit.py ") and trainer["run_seconds"] > 0
    sampling = model["sampling"]["eager"]
    assert len(sampling["img_per_s_repeats"]) == GPU_QUICK.sample_repeats and sampling["img_per_s"] > 0
    for kind in ("bare_loop", "trainer", "sampling"):
        assert model[kind]["compiled"] == {"skipped": "--skip-compile"}
    assert model["trainer_over_bare_loop"] == {
        "eager": pytest.approx(trainer["img_per_s"] / model["bare_loop"]["eager"]["img_per_s"]),
        "compiled": None,
    }


def goal_models(over_bare_loop: float, mfu: dict[str, float]) -> dict:
    """A report's "models" section, built by the suite's own functions, with these compiled-trainer figures."""
    flops, batch = 2e11, GPU_FULL.batch_size
    run = GpuRun(GPU_FULL, torch.device("cuda"), torch.bfloat16, Path("data"), Path("work"), 6, peak_flops=8e14)
    figures = run.training_figures
    models = {}
    for name, target in mfu.items():
        trainer_img_per_s = target * run.peak_flops * batch / flops
        entry = {
            "trainer": {
                "eager": {"failed": "not part of the goal"},
                "compiled": figures([trainer_img_per_s], flops),
            },
            "bare_loop": {
                "eager": {"skipped": "--skip-compile"},
                "compiled": figures([trainer_img_per_s / over_bare_loop], flops),
            },
        }
        entry["trainer_over_bare_loop"] = trainer_over_bare_loop(entry)
        models[name] = entry
    return models


@pytest.mark.parametrize(
    "over_bare_loop, mfu, met",
    [
        (0.98, {"S/4": 0.31, "S/2": 0.46}, {"S/4": (True, True), "S/2": (True, True)}),
        (0.96, {"S/4": 0.29, "S/2": 0.44}, {"S/4": (False, False), "S/2": (False, False)}),
        (1.05, {"S/4": 0.44, "S/2": 0.31}, {"S/4": (True, True), "S/2": (True, False)}),  # each model its own bar
    ],
)
def test_gpu_goal_compares_each_figure_with_its_threshold(over_bare_loop, mfu, met):
    goal = gpu_goal({"precision": "bf16", "models": goal_models(over_bare_loop, mfu)}, quick=False)
    assert goal["applies_to"] == "cuda"
    for name, (ratio_met, mfu_met) in met.items():
        assert goal[name]["trainer_over_bare_loop"] == {
            "value": pytest.approx(over_bare_loop),
            "threshold": GPU_GOAL[name]["trainer_over_bare_loop"][1],
            "met": ratio_met,
        }
        assert goal[name]["trainer_mfu"] == {
            "value": pytest.approx(mfu[name]),
            "threshold": GPU_GOAL[name]["trainer_mfu"][1],
            "met": mfu_met,
        }
    assert goal["all_met"] is all(all(pair) for pair in met.values())


def test_gpu_goal_counts_a_missing_figure_as_not_met():
    models = goal_models(0.99, {"S/4": 0.5, "S/2": 0.5})
    models["S/2"]["trainer"]["compiled"] = {"failed": "RuntimeError: out of memory"}
    models["S/2"]["trainer_over_bare_loop"] = trainer_over_bare_loop(models["S/2"])
    goal = gpu_goal({"precision": "bf16", "models": models}, quick=False)
    assert goal["S/4"]["trainer_mfu"]["met"] is True
    assert goal["S/2"]["trainer_mfu"] == {"value": None, "threshold": 0.45, "met": False}
    assert goal["S/2"]["trainer_over_bare_loop"]["value"] is None and goal["all_met"] is False
    del models["S/4"]  # not measured at all
    assert gpu_goal({"precision": "bf16", "models": models}, quick=False)["S/4"]["trainer_mfu"]["met"] is False


def test_gpu_goal_is_judged_at_full_size_in_bf16_only():
    models = goal_models(0.99, {"S/4": 0.5, "S/2": 0.5})
    assert gpu_goal({"precision": "bf16", "models": models}, quick=False)["all_met"] is True
    assert set(gpu_goal({"precision": "bf16", "models": models}, quick=True)) == {"not_evaluated"}
    assert set(gpu_goal({"precision": "fp32", "models": models}, quick=False)) == {"not_evaluated"}


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("model", GPU_FULL.models)
def test_trainer_command_speaks_the_trainers_own_flags(model, compiled, tmp_path):
    run = GpuRun(GPU_FULL, torch.device("cuda"), torch.bfloat16, tmp_path / "cats", tmp_path, 6, peak_flops=1.0)
    argv = run.trainer_command(model, "S2-run", compiled)
    assert argv[:2] == [sys.executable, "scripts/train_dit.py"]
    cfg = parse_config(TrainDiTConfig, argv[2:], "")
    assert (cfg.data_dir, cfg.model, cfg.image_size, cfg.batch_size) == (str(tmp_path / "cats"), model.name, 64, 256)
    assert (cfg.device, cfg.mixed_precision, cfg.run_name) == ("cuda", "bf16", "S2-run")
    assert Path(cfg.output_dir).parent == tmp_path
    assert cfg.compile in ((True, "on") if compiled else (False, "off"))
    assert cfg.steps == (GPU_FULL.windows + 1) * model.window_steps and cfg.log_interval == model.window_steps
    # The trainer logs at most every 10 % of its run: its windows must still be the bare loop's.
    assert min(model.window_steps, max(1, cfg.steps // 10)) == model.window_steps
    assert cfg.save_interval >= cfg.steps and cfg.sample_interval >= cfg.steps  # nothing saved inside a window


def test_trainer_windows_skip_the_warm_up_row(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 10, "img_per_s": 100.0, "memory_peak_mb": 900.0},
        {"step": 20, "img_per_s": 1500.0},
        {"step": 30, "img_per_s": 1400.0, "memory_peak_mb": 1200.0},
    ]
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert trainer_windows(metrics) == ([1500.0, 1400.0], 1200.0)
    metrics.write_text("".join(json.dumps({"step": row["step"], "img_per_s": 7.0}) + "\n" for row in rows))
    assert trainer_windows(metrics) == ([7.0, 7.0], None)  # a trainer that does not log memory (or a CPU run)
    metrics.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(MeasurementFailed, match="1 row"):
        trainer_windows(metrics)


@pytest.mark.parametrize(
    "message, reason",
    [
        ("CUDA out of memory.\nmore details", "RuntimeError: CUDA out of memory."),
        ("\n  first line after a blank one\n", "RuntimeError: first line after a blank one"),
        ("", "RuntimeError"),
    ],
)
def test_a_failing_measurement_is_recorded_in_one_line_and_the_others_go_on(message, reason):
    def failing():
        raise RuntimeError(message)

    assert attempt("S/2 trainer compiled", failing, torch.device("cpu")) == {"failed": reason}
    assert attempt("S/2 bare loop eager", lambda: {"img_per_s": 1.0}, torch.device("cpu")) == {"img_per_s": 1.0}


def test_a_failing_command_reports_its_status_and_last_lines(tmp_path):
    with pytest.raises(MeasurementFailed, match=r"status 3: .*step 7 went wrong"):
        run_command([sys.executable, "-c", "print('step 7 went wrong'); raise SystemExit(3)"], tmp_path / "log")


def test_flops_are_the_same_under_bf16_autocast():
    torch.manual_seed(0)
    model = TinyDiT(16, num_classes=2, width=32, depth=1, heads=2, patch=4)
    cpu = torch.device("cpu")
    fp32 = count_flops(dit_train_step(model, 3, cpu))
    assert count_flops(dit_train_step(model, 3, cpu, torch.bfloat16)) == fp32
    assert fp32[1][FORWARD_OP] > 0


@pytest.mark.parametrize(
    "flags, message", [({"rounds": 0}, "--rounds 0: "), ({"out": "file/bench.json"}, "could not write")]
)
def test_a_mistake_is_refused_before_measuring(flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("file").write_text("a file where --out needs a folder")
    with pytest.raises(UserError, match=message):
        main(BenchmarkConfig(suite="gpu", quick=True, device="cpu", **flags))
