"""modal_app.py offline: the CLI without an account, the pre-flight, the function specs, and the function
bodies run in-process on the CPU with the volumes redirected to a temp dir (no Modal server is contacted)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from modal.exception import NotFoundError
from modal.volume import FileEntryType

import modal_app
from scripts import train_dit
from scripts.lib.checkpoints import list_complete_states
from scripts.lib.cli import UserError, parse_config
from scripts.make_toy_cats import generate_toy_cats

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODAL_CLI = Path(sys.executable).with_name("modal")
TINY_DIT_ARGS = ("--device cpu --mixed-precision no --warmup-steps 1 --save-interval 2 "
                 "--sample-interval 1000 --log-interval 1 --sample-steps 2")


# ---------------------------------------------------------------------------------------------------------
# Fakes for the two volumes
# ---------------------------------------------------------------------------------------------------------
class RecordingOutputsVolume:
    """The outputs volume: each commit records the run's complete checkpoints at that moment."""

    name = "tiny-cats-outputs"

    def __init__(self, run_dir: Path | None = None):
        self.run_dir = run_dir
        self.commits: list[list[int]] = []
        self.files: dict[str, bytes] = {}

    def commit(self) -> None:
        states = list_complete_states(self.run_dir / "state") if self.run_dir else []
        self.commits.append([step for step, _ in states])

    def listdir(self, path: str, recursive: bool = False) -> list[SimpleNamespace]:
        found = [SimpleNamespace(path=name, type=FileEntryType.FILE) for name in self.files
                 if name.startswith(path)]
        if not found:
            raise NotFoundError(f"No such file or directory: {path}")
        return found

    def read_file(self, path: str):
        data = self.files[path]
        yield data[:3]
        yield data[3:]


class FakeDataVolume:
    name = "tiny-cats-data"

    def __init__(self, data_sets: tuple[str, ...] = ()):
        self.data_sets = data_sets
        self.uploads: list[tuple[str, str]] = []

    def listdir(self, path: str, recursive: bool = False) -> list[str]:
        if path.strip("/") not in self.data_sets:
            raise NotFoundError(f"No such file or directory: {path}")
        return ["class_a"]

    def batch_upload(self, force: bool = False):
        volume = self

        class Batch:
            def __enter__(self):
                return self

            def __exit__(self, *exc_info):
                return False

            def put_directory(self, local_path: str, remote_path: str) -> None:
                volume.uploads.append((local_path, remote_path))

        return Batch()


@pytest.fixture
def no_token(monkeypatch, tmp_path) -> dict[str, str]:
    """No Modal credentials: an empty config file, no token variables. Returns the env for subprocesses."""
    empty_config = tmp_path / "empty.modal.toml"
    empty_config.write_text("")
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(empty_config))
    # In-process the config file was read at import time: empty variables override whatever it held.
    monkeypatch.setenv("MODAL_TOKEN_ID", "")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "")
    env = {k: v for k, v in os.environ.items() if k not in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET")}
    env["MODAL_SERVER_URL"] = "http://127.0.0.1:9"  # were anything sent, it would fail differently
    return env


@pytest.fixture
def fake_token(monkeypatch) -> None:
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")


@pytest.fixture
def volumes(monkeypatch, tmp_path, fake_token) -> SimpleNamespace:
    """Volume roots in tmp (toy cats as data set `cats`), fake volume objects recording commits."""
    data_root, output_root = tmp_path / "data", tmp_path / "outputs"
    generate_toy_cats(data_root / "cats", per_class=4, size=16, seed=0, classes=["black", "white", "calico"])
    monkeypatch.setattr(modal_app, "DATA_ROOT", data_root)
    monkeypatch.setattr(modal_app, "OUTPUT_ROOT", output_root)
    outputs = RecordingOutputsVolume()
    monkeypatch.setattr(modal_app, "outputs_volume", outputs)
    monkeypatch.setattr(modal_app, "data_volume", FakeDataVolume(("cats",)))
    return SimpleNamespace(data_root=data_root, output_root=output_root, outputs=outputs)


def modal_run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(MODAL_CLI), "run", *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def tiny_dit_config(steps: int, run_name: str = "dit-test", extra: str = TINY_DIT_ARGS, gpu: str = "A10G"):
    """The config the `::dit` entrypoint would send for a few steps of T/4 at 16 px on the CPU."""
    return modal_app.prepare_run(train_dit, train_dit.TrainDiTConfig, "dit", gpu=gpu, data="cats",
                                 run_name=run_name, extra_args=extra, steps=steps, batch_size=4, lr=1e-3,
                                 model="T/4", image_size=16, augmentation_level="basic")


# ---------------------------------------------------------------------------------------------------------
# The CLI without an account
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("entrypoint, flags", [
    ("dit", ["--steps", "--batch-size", "--gradient-accumulation-steps", "--augmentation-level", "--gpu",
             "--data", "--run-name", "--extra-args", "S/4"]),
    ("classifier", ["--epochs", "--batch-size", "--backbone", "resnet18", "--gpu", "--data"]),
])
def test_help_works_offline_without_a_token(no_token, entrypoint, flags):
    result = modal_run([f"modal_app.py::{entrypoint}", "--help"], no_token)
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert flag in result.stdout


@pytest.mark.slow
def test_run_without_a_token_stops_with_the_login_advice_before_any_remote_call(no_token):
    result = modal_run(["modal_app.py::dit", "--steps", "10"], no_token)
    assert result.returncode == 2
    assert modal_app.AUTH_MESSAGE in result.stderr
    assert "Token missing" not in result.stdout + result.stderr  # Modal's own client never got that far


def test_cli_options_take_extra_flags_and_offer_the_scripts_choices():
    import click
    from modal.cli.run import _get_click_command_for_local_entrypoint

    command = _get_click_command_for_local_entrypoint(modal_app.app, modal_app.dit)
    params = command.make_context("dit", ["--extra-args", "--ema-decay 0.99", "--model", "B/4"]).params
    assert (params["extra_args"], params["model"], params["steps"]) == ("--ema-decay 0.99", "B/4", 200000)
    with pytest.raises(click.BadParameter, match="S/4"):
        command.make_context("dit", ["--model", "Z/9"])


def test_preflight_without_a_token_raises_the_login_advice(no_token):
    with pytest.raises(UserError, match="modal token new"):
        modal_app.require_modal_auth()
    with pytest.raises(UserError, match="modal token info"):
        tiny_dit_config(steps=10)


def test_preflight_accepts_a_configured_token(fake_token):
    modal_app.require_modal_auth()


# ---------------------------------------------------------------------------------------------------------
# Function specs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("function, gpu", [(modal_app.train_dit_remote, "A10G"),
                                           (modal_app.train_classifier_remote, "T4")])
def test_gpu_functions_have_the_stated_specs(function, gpu):
    info = function.info()  # static info of a not-yet-deployed function: no network
    assert info.gpus == [(gpu, 1)]
    assert info.timeout == 24 * 60 * 60
    assert info.max_retries == 10
    assert {path: mount.name for path, mount in info.volumes.items()} == {"/data": "tiny-cats-data",
                                                                         "/outputs": "tiny-cats-outputs"}


def test_app_and_data_function():
    assert modal_app.app.name == "tiny-cats"
    info = modal_app.prepare_data_remote.info()
    assert info.gpus == []
    assert set(info.volumes) == {"/data", "/outputs"}


@pytest.mark.parametrize("gpu, count", [("A10G", 1), ("H100:8", 8), ("A100-80GB:4", 4)])
def test_gpu_count(gpu, count):
    assert modal_app.gpu_count(gpu) == count


@pytest.mark.parametrize("gpu", ["", "H100:0", "H100:9", "A100:two", ":2"])
def test_bad_gpu_strings_are_refused(gpu):
    with pytest.raises(UserError, match="Modal GPU string"):
        modal_app.gpu_count(gpu)


# ---------------------------------------------------------------------------------------------------------
# Configs: the scripts' own parser and validation, and the way back to flags
# ---------------------------------------------------------------------------------------------------------
def test_dit_config_takes_options_extra_flags_and_a_fixed_run(volumes):
    cfg = tiny_dit_config(steps=7, run_name="", extra="--ema-decay 0.99 --objective ddpm")
    assert (cfg.steps, cfg.batch_size, cfg.model, cfg.ema_decay, cfg.objective) == (7, 4, "T/4", 0.99, "ddpm")
    assert cfg.data_dir == str(volumes.data_root / "cats")
    assert cfg.output_dir == str(volumes.output_root / "checkpoints")
    assert cfg.run_name.startswith("dit-") and cfg.resume == "auto"


@pytest.mark.parametrize("extra", ["--steps 5", "--run-name=other", "--output-dir /tmp"])
def test_a_flag_given_twice_is_refused(volumes, extra):
    with pytest.raises(UserError, match="--extra-args"):
        tiny_dit_config(steps=7, extra=extra)


def test_validation_uses_the_gpu_count(volumes):
    cfg = tiny_dit_config(steps=7)  # batch 4 splits over 2 GPUs but not over 8
    modal_app.train_dit.validate_config(cfg, num_processes=2)
    with pytest.raises(UserError, match="does not split evenly over 8 processes"):
        tiny_dit_config(steps=7, gpu="H100:8")


def test_missing_data_says_how_to_upload_or_prepare(volumes, monkeypatch):
    monkeypatch.setattr(modal_app, "data_volume", FakeDataVolume(()))
    with pytest.raises(UserError) as error:
        tiny_dit_config(steps=7)
    message = str(error.value)
    assert "modal_app.py::upload_data" in message and "modal_app.py::prepare_data" in message


# ---------------------------------------------------------------------------------------------------------
# Function bodies, in-process on the CPU
# ---------------------------------------------------------------------------------------------------------
def test_dit_body_trains_then_a_second_attempt_resumes_committing_after_every_checkpoint(volumes):
    cfg = tiny_dit_config(steps=4)
    run_dir = volumes.output_root / "checkpoints" / cfg.run_name
    volumes.outputs.run_dir = run_dir
    with pytest.warns(UserWarning, match="executing locally"):
        summary = modal_app.train_dit_remote.local(cfg)
    assert summary["step"] == 4 and Path(summary["final"]).is_file()
    # one commit right after each checkpoint, then the final one after success
    assert volumes.outputs.commits == [[2], [2, 4], [2, 4]]

    volumes.outputs.commits.clear()
    longer = tiny_dit_config(steps=6, run_name=cfg.run_name)
    with pytest.warns(UserWarning, match="executing locally"):
        summary = modal_app.train_dit_remote.local(longer)
    assert summary["step"] == 6
    assert "resuming from step 4" in (run_dir / "training.log").read_text()
    assert volumes.outputs.commits == [[2, 4, 6], [2, 4, 6]]


def test_an_error_after_a_checkpoint_is_committed_and_still_raised(volumes, monkeypatch):
    def crash_after_one_checkpoint(cfg, on_checkpoint=None):
        on_checkpoint(Path(cfg.output_dir) / cfg.run_name / "state" / "step_0000002")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train_dit, "main", crash_after_one_checkpoint)
    cfg = tiny_dit_config(steps=4)
    with pytest.warns(UserWarning, match="executing locally"), pytest.raises(RuntimeError, match="illegal"):
        modal_app.train_dit_remote.local(cfg)
    assert len(volumes.outputs.commits) == 2  # after the checkpoint, and on the error


def test_a_failing_commit_does_not_kill_the_run(volumes, monkeypatch, caplog):
    def refuse():
        raise RuntimeError("there are open files preventing the operation")

    monkeypatch.setattr(volumes.outputs, "commit", refuse)
    modal_app.commit_outputs()
    assert "open files" in caplog.text


def test_periodic_commit_commits_until_stopped(volumes):
    with modal_app.PeriodicCommit(interval_s=0.01):
        deadline = time.monotonic() + 10
        while len(volumes.outputs.commits) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    stopped_at = len(volumes.outputs.commits)
    time.sleep(0.05)
    assert stopped_at >= 2 and len(volumes.outputs.commits) == stopped_at


def test_multi_gpu_command_hands_every_option_to_accelerate(volumes):
    cfg = tiny_dit_config(steps=4)
    command = modal_app.multi_gpu_command(train_dit, cfg, 4)
    assert command[1:6] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4"]
    assert Path(command[6]) == PROJECT_ROOT / "scripts" / "train_dit.py"
    assert parse_config(train_dit.TrainDiTConfig, command[7:], "") == cfg


@pytest.mark.slow
def test_multi_gpu_body_runs_the_trainer_under_accelerate_launch(volumes):
    cfg = tiny_dit_config(steps=2, gpu="A10G:2")  # two CPU processes (gloo) stand in for two GPUs
    volumes.outputs.run_dir = volumes.output_root / "checkpoints" / cfg.run_name
    with pytest.warns(UserWarning, match="executing locally"):
        summary = modal_app.train_dit_remote.local(cfg, 2)
    log = (Path(summary["run_dir"]) / "training.log").read_text()
    assert "processes=2" in log and "done: step 2" in log
    assert volumes.outputs.commits[-1] == [2]  # the commit after the subprocess sees its checkpoint


def test_a_failed_multi_gpu_trainer_is_committed_and_raised(volumes, monkeypatch):
    crashing_launcher = [sys.executable, "-c", "raise SystemExit(3)"]
    monkeypatch.setattr(modal_app, "multi_gpu_command", lambda *args: crashing_launcher)
    with pytest.raises(RuntimeError, match="exited with status 3"):
        modal_app.run_trainer(train_dit, tiny_dit_config(steps=2, gpu="A10G:2"), 2)
    assert len(volumes.outputs.commits) == 1


def test_download_copies_a_run_without_its_training_state(volumes, tmp_path):
    volumes.outputs.files = {"checkpoints/dit-1/tinydit_final.safetensors": b"weights",
                             "checkpoints/dit-1/samples/step_0000004.png": b"png",
                             "checkpoints/dit-1/state/step_0000004/state.safetensors": b"big"}
    modal_app.download(run="dit-1", local_dir=str(tmp_path / "local"))
    copied = sorted(p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*")
                    if p.is_file())
    assert copied == ["dit-1/samples/step_0000004.png", "dit-1/tinydit_final.safetensors"]
    assert (tmp_path / "local" / "dit-1" / "tinydit_final.safetensors").read_bytes() == b"weights"
    with pytest.raises(SystemExit) as exit_info:
        modal_app.download(run="nope", local_dir=str(tmp_path / "local"))
    assert exit_info.value.code == 2


def test_upload_data_puts_the_folder_under_its_name(volumes, tmp_path):
    modal_app.upload_data(local_dir=str(volumes.data_root / "cats"), name="")
    assert modal_app.data_volume.uploads == [(str(volumes.data_root / "cats"), "/cats")]
    with pytest.raises(SystemExit):
        modal_app.upload_data(local_dir=str(tmp_path / "missing"), name="x")
