"""The DiT trainer in-process on a tiny toy-cats set: flags, schedule, files, resume rules, NaN guard."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from scripts import train_dit
from scripts.lib.checkpoints import COMPLETE_MARKER, list_complete_states, load_training_state
from scripts.lib.checkpoints import load_weights
from scripts.lib.cli import UserError, parse_config
from scripts.lib.checkpoints import load_dit
from scripts.lib.run import learning_rate
from scripts.train_dit import TrainDiTConfig, validate_config
from builders import TOY_CLASSES, make_toy_data, tiny_config


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return make_toy_data(tmp_path_factory.mktemp("toy") / "cats")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_weights(path)[0]


def test_cli_defaults_are_the_documented_ones():
    cfg = parse_config(TrainDiTConfig, ["data/cats"], "")
    expected = dict(
        data_dir="data/cats",
        steps=200000,
        batch_size=256,
        lr=1e-4,
        gradient_accumulation_steps=1,
        augmentation_level="full",
        warmup_steps=10000,
        lr_schedule="constant",
        save_interval=10000,
        sample_interval=5000,
        model="S/4",
        image_size=64,
        objective="flow",
        ema_decay=0.9999,
        cfg_scale=4.0,
        label_dropout=0.1,
        max_grad_norm=1.0,
        weight_decay=0.0,
        mixed_precision="auto",
        device="auto",
        seed=0,
        run_name="dit",
        output_dir="checkpoints",
        resume="auto",
        keep_checkpoints=5,
        compile="auto",
        time_limit="",
        report_to="none",
    )
    assert {key: getattr(cfg, key) for key in expected} == expected


def test_bad_flags_fail_together_in_one_message():
    cfg = dataclasses.replace(
        parse_config(TrainDiTConfig, ["data"], ""), model="T/4", image_size=30, steps=0, batch_size=6
    )
    with pytest.raises(UserError) as error:
        validate_config(cfg, num_processes=4)
    message = str(error.value)
    assert "--steps must be positive" in message
    assert "not divisible by the patch size 4" in message
    assert "does not split evenly over 4 processes" in message


def test_batch_only_has_to_split_over_processes_not_accumulation():
    cfg = dataclasses.replace(parse_config(TrainDiTConfig, ["data"], ""), batch_size=6, gradient_accumulation_steps=4)
    validate_config(cfg, num_processes=2)


def test_bad_flags_stop_the_run_before_any_work(tmp_path):
    cfg = tiny_config(tmp_path / "missing-data", tmp_path / "runs", steps=-1, resume=str(tmp_path / "nowhere"))
    with pytest.raises(
        UserError, match="--steps must be positive.*--resume: .*nowhere is not a usable .*no such folder"
    ):
        train_dit.main(cfg)
    assert not (tmp_path / "runs" / "dit" / "training.log").exists()


def test_learning_rate_warms_up_linearly_then_stays():
    assert learning_rate(0, 1e-3, 10) == pytest.approx(1e-4)
    assert learning_rate(4, 1e-3, 10) == pytest.approx(5e-4)
    assert learning_rate(9, 1e-3, 10) == pytest.approx(1e-3)
    assert learning_rate(5000, 1e-3, 10) == pytest.approx(1e-3)
    assert learning_rate(0, 1e-3, 0) == pytest.approx(1e-3)


def test_cosine_learning_rate_warms_up_then_decays_to_zero_at_the_last_step():
    assert learning_rate(4, 1e-3, 10, "cosine", 110) == pytest.approx(5e-4)  # the same warmup
    assert learning_rate(10, 1e-3, 10, "cosine", 110) == pytest.approx(1e-3)
    assert learning_rate(60, 1e-3, 10, "cosine", 110) == pytest.approx(5e-4)  # half way: half the peak
    assert learning_rate(35, 1e-3, 10, "cosine", 110) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert 0 < learning_rate(109, 1e-3, 10, "cosine", 110) < 1e-6
    assert learning_rate(200, 1e-3, 10, "cosine", 110) == 0.0  # a run resumed beyond its planned end


def test_short_run_writes_every_artefact_and_caps_the_warmup(toy_data, tmp_path):
    checkpoints: list[Path] = []
    cfg = tiny_config(toy_data, tmp_path, warmup_steps=10000, log_interval=10, steps=4, save_interval=2)
    summary = train_dit.main(cfg, on_checkpoint=checkpoints.append)

    run = tmp_path / "dit"
    log = (run / "training.log").read_text()
    assert "note: --warmup-steps 10000 adjusted to 1 for --steps 4" in log
    assert "note: --log-interval 10 adjusted to 1 for --steps 4" in log
    recorded = json.loads((run / "config.json").read_text())  # the values the run trained with
    assert (recorded["warmup_steps"], recorded["log_interval"]) == (1, 1)
    assert "starting fresh" in log
    assert [step for step, _ in list_complete_states(run / "state")] == [2, 4]
    assert [path.name for path in checkpoints] == ["step_0000002", "step_0000004"]
    assert (run / "samples" / "step_0000004.png").is_file()  # every run ends with a grid
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["lr"] == pytest.approx(1e-3) for m in metrics)  # warmup capped to one step
    assert all(m["img_per_s"] > 0 and m["loss"] > 0 for m in metrics)

    model, _, metadata = load_dit(summary["final"])
    assert metadata["weights"] == "ema" and metadata["step"] == 4
    assert metadata["class_names"] == sorted(TOY_CLASSES) and metadata["image_size"] == 16
    assert metadata["config"]["model"] == "T/4" and metadata["objective"] == "flow"
    assert metadata["objective_options"] == {"time_sampling": "logit-normal"}
    assert load_weights(summary["final_raw"])[1]["weights"] == "raw"
    shared = tmp_path / "tinydit_final.safetensors"
    assert shared.read_bytes() == summary["final"].read_bytes()
    raw, ema = weights(summary["final_raw"]), weights(summary["final"])
    assert any(not torch.equal(raw[name], ema[name]) for name in raw)  # EMA is not just a copy of the weights


def test_only_the_default_run_name_replaces_the_shared_final_weights(toy_data, tmp_path):
    shared = tmp_path / "tinydit_final.safetensors"
    train_dit.main(tiny_config(toy_data, tmp_path, steps=2))
    before = shared.read_bytes()
    other = train_dit.main(tiny_config(toy_data, tmp_path, steps=3, run_name="quick-test"))
    assert shared.read_bytes() == before and other["final"] == tmp_path / "quick-test" / "tinydit_final.safetensors"
    assert "is the run dit's, not changed" in (tmp_path / "quick-test" / "training.log").read_text()


def test_gradient_accumulation_matches_one_big_batch(toy_data, tmp_path):
    common = dict(steps=2, warmup_steps=0, save_interval=100, augmentation_level="full")
    accumulated = train_dit.main(
        tiny_config(toy_data, tmp_path / "a", batch_size=4, gradient_accumulation_steps=2, **common)
    )
    big = train_dit.main(tiny_config(toy_data, tmp_path / "b", batch_size=8, **common))
    small = train_dit.main(tiny_config(toy_data, tmp_path / "c", batch_size=4, **common))
    first, second, third = (weights(run["final_raw"]) for run in (accumulated, big, small))
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-6)
    # ...and the comparison can tell: half the batch trains differently.
    assert any(not torch.allclose(first[name], third[name], rtol=1e-4, atol=1e-6) for name in first)


def test_keep_last_n_holds_across_resumes_and_foreign_folders_are_ignored(toy_data, tmp_path):
    train_dit.main(tiny_config(toy_data, tmp_path, steps=3, save_interval=1, keep_checkpoints=2))
    state = tmp_path / "dit" / "state"
    (state / "notes").mkdir()
    (state / "notes" / "readme.txt").write_text("mine")
    (state / "step_0000099").mkdir()  # a partial write: no COMPLETE marker
    (state / "step_0000099" / "state.json").write_text("{")

    train_dit.main(tiny_config(toy_data, tmp_path, steps=5, save_interval=1, keep_checkpoints=2))
    assert [step for step, _ in list_complete_states(state)] == [4, 5]
    assert (state / "notes" / "readme.txt").read_text() == "mine"
    assert not (state / "step_0000099" / COMPLETE_MARKER).exists()
    assert "resuming from step 3" in (tmp_path / "dit" / "training.log").read_text()


def test_resume_never_refuses_a_run_that_has_checkpoints(toy_data, tmp_path):
    train_dit.main(tiny_config(toy_data, tmp_path, steps=2))
    with pytest.raises(UserError, match="use another --run-name"):
        train_dit.main(tiny_config(toy_data, tmp_path, steps=2, resume="never"))


def test_resume_refuses_a_different_model(toy_data, tmp_path):
    train_dit.main(tiny_config(toy_data, tmp_path, steps=2))
    with pytest.raises(UserError, match="different setup.*model T/4 -> T/8"):
        train_dit.main(tiny_config(toy_data, tmp_path, steps=4, model="T/8"))


def test_resume_refuses_a_checkpoint_beyond_the_requested_steps(toy_data, tmp_path):
    train_dit.main(tiny_config(toy_data, tmp_path, steps=4))
    with pytest.raises(UserError, match="already at step 4, beyond --steps 2"):
        train_dit.main(tiny_config(toy_data, tmp_path, steps=2))


def test_out_of_memory_becomes_advice(toy_data, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_dit, "build_dit", lambda *args, **kwargs: out_of_memory())
    with pytest.raises(UserError, match="out of GPU memory — lower --batch-size"):
        train_dit.main(tiny_config(toy_data, tmp_path))


def test_resume_from_an_explicit_state_folder(toy_data, tmp_path):
    train_dit.main(tiny_config(toy_data, tmp_path / "first", steps=4, save_interval=2))
    folder = tmp_path / "first" / "dit" / "state" / "step_0000002"
    summary = train_dit.main(tiny_config(toy_data, tmp_path / "second", steps=3, resume=str(folder)))
    assert summary["step"] == 3
    assert "resuming from step 2" in (tmp_path / "second" / "dit" / "training.log").read_text()


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(toy_data, tmp_path, monkeypatch):
    real_build = train_dit.build_objective
    calls = {"n": 0}

    def build_poisoned(name, **options):
        objective = real_build(name, **options)
        real_loss = objective.training_loss

        def poisoned_loss(*args, **kwargs):
            calls["n"] += 1
            loss = real_loss(*args, **kwargs)
            return loss * float("nan") if calls["n"] == 3 else loss

        objective.training_loss = poisoned_loss
        return objective

    monkeypatch.setattr(train_dit, "build_objective", build_poisoned)
    with pytest.raises(UserError, match="loss became NaN/inf at step 3 — lower --lr"):
        train_dit.main(tiny_config(toy_data, tmp_path, steps=6, save_interval=2))

    run = tmp_path / "dit"
    assert [step for step, _ in list_complete_states(run / "state")] == [2]
    step, state = load_training_state(run / "state" / "step_0000002")
    assert step == 2 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run / "tinydit_final.safetensors").exists()
    assert "loss became NaN/inf" in (run / "training.log").read_text()


def test_ddpm_run_records_its_noise_schedule_and_resume_refuses_another(toy_data, tmp_path):
    summary = train_dit.main(tiny_config(toy_data, tmp_path, objective="ddpm", noise_schedule="cosine", steps=2))
    _, objective, metadata = load_dit(summary["final"])
    assert metadata["objective_options"]["schedule"] == "cosine" and objective.schedule == "cosine"
    with pytest.raises(UserError, match="different"):
        train_dit.main(tiny_config(toy_data, tmp_path, objective="ddpm", noise_schedule="linear", steps=4))


@pytest.mark.slow
def test_compiled_training_matches_eager_training(toy_data, tmp_path):
    """--compile on (what auto picks on a GPU) trains the same weights as eager, up to kernel rounding."""
    common = dict(steps=3, warmup_steps=0, save_interval=100, sample_interval=10**6)
    eager = train_dit.main(tiny_config(toy_data, tmp_path / "eager", compile="off", **common))
    compiled = train_dit.main(tiny_config(toy_data, tmp_path / "compiled", compile="on", **common))
    assert "compiled the model in" in (tmp_path / "compiled" / "dit" / "training.log").read_text()
    a, b = weights(eager["final_raw"]), weights(compiled["final_raw"])
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)


def test_a_compile_failure_falls_back_to_eager_with_one_warning(toy_data, tmp_path, monkeypatch):
    def broken_compile(model, **kwargs):
        def fails(*args, **kwargs):
            raise RuntimeError("inductor: no C++ compiler found\nlong details")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    summary = train_dit.main(tiny_config(toy_data, tmp_path, steps=2, compile="on"))
    log = (tmp_path / "dit" / "training.log").read_text()
    assert summary["step"] == 2
    assert log.count("torch.compile failed (RuntimeError: inductor: no C++ compiler found); training eagerly") == 1
