"""Opening and running a training run, as both trainers share it (scripts/lib/run.py and friends).

Checked on the real trainers in-process: nothing is written before every check passed, one writer per run
folder, errors end as one line that is also in training.log, nothing non-finite is ever saved, status.json
says where a run stands, and --time-limit stops after saving so the same command continues exactly.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from builders import make_toy_data, read_status, tiny_config

from scripts import train, train_dit
from scripts.lib import checkpoints
from scripts.lib.checkpoints import list_complete_states, load_training_state
from scripts.lib.checkpoints import load_weights
from scripts.lib.cli import EXIT_TIME_LIMIT, UserError, parse_config
from scripts.lib.run import RunLock
from scripts.lib.checkpoints import TrainingState
from scripts.make_toy_cats import generate_toy_cats


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return make_toy_data(tmp_path_factory.mktemp("toy") / "cats")


def classifier_config(data: Path, out: Path, *extra: str) -> train.TrainConfig:
    flags = [str(data), "--no-pretrained", "--device", "cpu", "--mixed-precision", "no", "--image-size", "16"]
    flags += ["--backbone", "mobilenet_v3_small", "--epochs", "1", "--batch-size", "4", "--output-dir", str(out)]
    return parse_config(train.TrainConfig, [*flags, "--output", str(out / "model.safetensors"), *extra], "test")


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# Nothing is written before every check passed
# ---------------------------------------------------------------------------------------------------------
def test_a_failed_start_changes_nothing_of_a_finished_run_but_says_why_in_its_log(toy_data, tmp_path):
    train_dit.main(tiny_config(toy_data, tmp_path, steps=2))
    run_dir = tmp_path / "dit"
    before = run_files(run_dir)
    with pytest.raises(UserError, match="does not exist"):
        train_dit.main(tiny_config(tmp_path / "typo", tmp_path, steps=2, lr=3e-4))
    after = run_files(run_dir)
    assert after.pop("training.log").startswith(before.pop("training.log"))
    assert after == before  # config.json still the finished run's, no new folders
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 1e-3
    last_line = (run_dir / "training.log").read_text().splitlines()[-1]
    assert "ERROR refused to start:" in last_line and "typo" in last_line


def test_a_bad_start_into_a_new_run_leaves_no_folder_behind(toy_data, tmp_path):
    with pytest.raises(UserError, match="--steps must be positive"):
        train_dit.main(tiny_config(toy_data, tmp_path, steps=0))
    assert not (tmp_path / "dit").exists()


def test_unwritable_outputs_are_refused_before_training(toy_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write the run's outputs.*a-file is a file"):
        train_dit.main(tiny_config(toy_data, blocker / "runs", steps=2))
    cfg = classifier_config(toy_data, tmp_path, "--output", str(blocker / "model.safetensors"))
    with pytest.raises(UserError, match="cannot write the run's outputs"):
        train.main(cfg)
    assert not (tmp_path / "classifier").exists()  # refused before the run folder, not after training


def test_a_classifier_needs_two_classes_a_dit_does_not(tmp_path):
    one_class = tmp_path / "one"
    generate_toy_cats(one_class, per_class=4, size=16, seed=0, classes=["black"])
    with pytest.raises(UserError, match="1 class folder.*at least 2"):
        train.main(classifier_config(one_class, tmp_path / "cls"))
    assert train_dit.main(tiny_config(one_class, tmp_path / "dit", steps=1))["step"] == 1


def test_resume_from_a_folder_that_is_not_a_state_says_what_to_pass(toy_data, tmp_path):
    (tmp_path / "some-run").mkdir()
    with pytest.raises(
        UserError, match="not a usable training-state checkpoint: no COMPLETE .* like <run>/state/step_0010000"
    ):
        train_dit.main(tiny_config(toy_data, tmp_path, resume=str(tmp_path / "some-run")))


# ---------------------------------------------------------------------------------------------------------
# One writer per run folder
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["dit", "classifier"])
def test_a_second_trainer_on_a_live_run_is_refused_naming_the_holder(toy_data, tmp_path, trainer):
    run_dir = tmp_path / ("dit" if trainer == "dit" else "classifier")
    with RunLock(run_dir, owner="someone-else"):
        with pytest.raises(UserError, match=f"in use by another trainer \\(pid {os.getpid()} on .*someone-else"):
            if trainer == "dit":
                train_dit.main(tiny_config(toy_data, tmp_path, steps=2))
            else:
                train.main(classifier_config(toy_data, tmp_path))
    assert sorted(p.name for p in run_dir.iterdir()) == []  # neither config.json nor a log was written
    assert train_dit.main(tiny_config(toy_data, tmp_path, steps=1))["step"] == 1  # released: free again


# ---------------------------------------------------------------------------------------------------------
# Failures end as one line in training.log, with the last checkpoint intact
# ---------------------------------------------------------------------------------------------------------
def test_a_full_disk_during_a_save_is_one_line_in_the_log_and_the_last_checkpoint_stays(
    toy_data, tmp_path, monkeypatch
):
    real_save = checkpoints.save_file

    def disk_full_at_step_4(tensors, path, *args, **kwargs):
        if "step_0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", disk_full_at_step_4)
    with pytest.raises(UserError, match="No space left on device"):
        train_dit.main(tiny_config(toy_data, tmp_path, steps=6, save_interval=2))
    run_dir = tmp_path / "dit"
    assert [step for step, _ in list_complete_states(run_dir / "state")] == [2]
    assert load_training_state(run_dir / "state" / "step_0000002")[0] == 2
    assert "No space left on device" in (run_dir / "training.log").read_text()
    assert read_status(run_dir)["state"] == "failed"


@pytest.mark.parametrize("steps", [1, 3])
def test_an_exploding_dit_saves_nothing_non_finite(toy_data, tmp_path, steps):
    cfg = tiny_config(toy_data, tmp_path, steps=steps, save_interval=1, warmup_steps=0, lr=1e39)
    with pytest.raises(UserError, match="became NaN/inf at step 1 — lower --lr"):
        train_dit.main(cfg)
    run_dir = tmp_path / "dit"
    assert list_complete_states(run_dir / "state") == []  # step 1 itself went bad: nothing to keep
    assert (
        not (run_dir / "tinydit_final.safetensors").exists() and not (tmp_path / "tinydit_final.safetensors").exists()
    )
    assert "became NaN/inf" in (run_dir / "training.log").read_text()


def test_an_exploding_dit_keeps_its_last_good_checkpoint_and_it_is_finite(toy_data, tmp_path):
    train_dit.main(tiny_config(toy_data, tmp_path, steps=2, save_interval=1))
    with pytest.raises(UserError, match="became NaN/inf at step 3"):
        train_dit.main(tiny_config(toy_data, tmp_path, steps=4, save_interval=1, lr=1e39, warmup_steps=0))
    states = list_complete_states(tmp_path / "dit" / "state")
    assert [step for step, _ in states] == [1, 2]
    tensors, _ = checkpoints.flatten_state(load_training_state(states[-1][1])[1])
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_an_exploding_classifier_ends_in_advice_not_a_traceback(toy_data, tmp_path):
    with pytest.raises(UserError, match="became NaN/inf"):
        train.main(classifier_config(toy_data, tmp_path, "--lr", "1e39"))
    assert list_complete_states(tmp_path / "classifier" / "state") == []
    assert not (tmp_path / "model.safetensors").exists()


def test_the_guard_reads_the_device_at_boundaries_not_every_step(toy_data, tmp_path, monkeypatch):
    """Each host read of a device value (item/tolist/float/bool) would stall a GPU's queue; count them."""
    reads = {"n": 0}
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            reads["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    steps = 100
    cfg = tiny_config(toy_data, tmp_path, steps=steps, log_interval=10, save_interval=100, sample_interval=10**6)
    train_dit.main(cfg)
    # ~3 reads for each of 10 log lines, 2 for the save; a per-step read would add `steps` on its own.
    assert reads["n"] < steps // 2, reads


# ---------------------------------------------------------------------------------------------------------
# Where a run stands, and stopping at a time limit
# ---------------------------------------------------------------------------------------------------------
def test_status_json_says_where_the_run_stands(toy_data, tmp_path):
    train_dit.main(tiny_config(toy_data, tmp_path, steps=4, save_interval=2, sample_interval=2))
    status = read_status(tmp_path / "dit")
    assert (status["state"], status["step"], status["steps"], status["kind"]) == ("finished", 4, 4, "dit")
    assert status["newest_checkpoint"] == "state/step_0000004" and status["newest_grid"] == "samples/step_0000004.png"
    assert status["img_per_s"] > 0 and status["eta_s"] == 0 and status["pid"] == os.getpid()


def test_a_time_limited_run_continues_to_exactly_the_uninterrupted_weights(toy_data, tmp_path):
    common = dict(steps=5, save_interval=100, sample_interval=10**6)
    straight = train_dit.main(tiny_config(toy_data, tmp_path / "straight", **common))
    attempts = 0
    while True:  # a budget below the save margin: every attempt trains one step, saves, and stops
        attempts += 1
        try:
            chained = train_dit.main(tiny_config(toy_data, tmp_path / "chained", time_limit="1", **common))
            break
        except SystemExit as stop:
            assert stop.code == EXIT_TIME_LIMIT
            assert read_status(tmp_path / "chained" / "dit")["state"] == "stopped"
    assert attempts == 5 and chained["step"] == 5
    for name in ("final", "final_raw"):
        a, b = load_weights(straight[name])[0], load_weights(chained[name])[0]
        assert all(torch.equal(a[key], b[key]) for key in a), name
    assert "stopped by time limit at step 1" in (tmp_path / "chained" / "dit" / "training.log").read_text()


def test_optimizer_moments_come_back_in_their_parameters_memory_layout():
    """Fused AdamW pairs parameter, gradient and moments as flat memory: a contiguous moment of a channels-last
    parameter (as a checkpoint stores it) would silently update the wrong elements."""
    torch.manual_seed(0)
    weights = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    grads = [torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    runs = []
    for reload in (False, True):
        holder = torch.nn.Module()
        holder.param = param = torch.nn.Parameter(weights.clone(memory_format=torch.preserve_format))
        optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
        for index, grad in enumerate(grads):
            param.grad = grad.clone(memory_format=torch.preserve_format)
            optimizer.step()
            if reload and index == 0:
                saved = optimizer.state_dict()
                saved["state"][0] = {key: value.contiguous() for key, value in saved["state"][0].items()}
                TrainingState(holder, optimizer).load({"model": holder.state_dict(), "optimizer": saved}, Path("x"))
        runs.append(param.detach().clone())
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)


def test_a_precision_this_cpu_emulates_is_warned_about_and_never_picked_by_auto(toy_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})  # an AVX2-only CPU
    train_dit.main(tiny_config(toy_data, tmp_path / "asked", steps=1, mixed_precision="bf16"))
    log = (tmp_path / "asked" / "dit" / "training.log").read_text()
    assert "precision=bf16" in log and "WARNING --mixed-precision bf16 on a CPU without AVX512-BF16/AMX" in log
    train_dit.main(tiny_config(toy_data, tmp_path / "auto", steps=1, mixed_precision="auto"))
    log = (tmp_path / "auto" / "dit" / "training.log").read_text()
    assert "precision=no" in log and "WARNING" not in log
