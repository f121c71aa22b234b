"""modal_app.py offline: the CLI without an account, the pre-flight, the function specs, and whole runs carried as
chains of attempts in this process. No Modal server is contacted: the volumes are folders under a temp dir and
`modal_app.backend`, the one object that talks to Modal, is replaced by `StandIn`, which records commits and spawns
and runs a spawned attempt here when it is waited for."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import modal_app
from scripts import train_dit
from scripts.lib import attempts
from scripts.lib.attempts import Chain
from scripts.lib.checkpoints import list_complete_states
from scripts.lib.checkpoints import load_weights
from scripts.lib.cli import UserError, parse_config
from scripts.lib.run import RunLock, read_lock_holder
from scripts.lib.run import read_status
from scripts.make_toy_cats import generate_toy_cats

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODAL_CLI = Path(sys.executable).with_name("modal")
TINY_DIT_ARGS = (
    "--device cpu --mixed-precision no --warmup-steps 1 --save-interval 2 --sample-interval 1000 "
    "--log-interval 1 --sample-steps 2"
)
RUN = "dit-test"


# ---------------------------------------------------------------------------------------------------------
# The stand-in for Modal
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Spawn:
    call_id: str
    function_name: str
    chain: Chain
    args: tuple


class StandIn:
    """modal_app.backend for tests: the volumes are folders, and a spawned call runs in this process (once: what
    Modal does with an interrupt or a crash is Modal's business) when someone waits for its result."""

    def __init__(self, data_root: Path, output_root: Path):
        self.data_root, self.output_root = data_root, output_root
        self.commits: list[dict[str, list[int]]] = []  # per commit: each run's complete checkpoints at that moment
        self.spawns: list[Spawn] = []
        self.reloads = self.data_commits = 0
        self.uploads: list[tuple[Path, str]] = []
        self.detach, self.current = True, "fc-local"

    def commit_outputs(self) -> None:
        runs = sorted(p for p in (self.output_root / "checkpoints").glob("*") if p.is_dir())
        self.commits.append({run.name: [step for step, _ in list_complete_states(run / "state")] for run in runs})

    def reload_outputs(self) -> None:
        self.reloads += 1

    def commit_data(self) -> None:
        self.data_commits += 1

    def has_data_set(self, name: str) -> bool:
        return (self.data_root / name).is_dir()

    def upload_data(self, local_dir: Path, name: str) -> None:
        self.uploads.append((local_dir, name))

    def list_outputs(self, folder: str) -> list[str]:
        return sorted(
            p.relative_to(self.output_root).as_posix() for p in (self.output_root / folder).rglob("*") if p.is_file()
        )

    def read_output(self, path: str):
        data = (self.output_root / path).read_bytes()  # FileNotFoundError, as the real backend raises
        yield data[:3]
        yield data[3:]

    def call_id(self) -> str:
        return self.current

    def spawn(self, trainer: modal_app.Trainer, chain: Chain, *args: Any) -> str:
        self.spawns.append(Spawn(f"fc-{len(self.spawns) + 1}", trainer.function_name, chain, args))
        return self.spawns[-1].call_id

    def result(self, call_id: str) -> Any:
        spawn = next(s for s in self.spawns if s.call_id == call_id)
        return self.run(spawn.function_name, *spawn.args, spawn.chain, call_id=call_id)

    def run(self, function_name: str, *args: Any, call_id: str = "fc-local") -> Any:
        """A function body as its container would run it."""
        self.current = call_id
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*executing locally")
            return getattr(modal_app, function_name).local(*args)

    def call(self, function_name: str) -> Any:
        return self.run(function_name)

    def detached(self) -> bool:
        return self.detach

    def app_id(self) -> str:
        return "ap-test"

    def committed_steps(self, run: str = RUN) -> list[list[int]]:
        return [commit.get(run, []) for commit in self.commits]


@pytest.fixture
def no_token(monkeypatch, tmp_path) -> dict[str, str]:
    """No Modal credentials: an empty config file, no token variables. Returns the env for subprocesses."""
    empty_config = tmp_path / "empty.modal.toml"
    empty_config.write_text("")
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(empty_config))
    # In-process the config file was read at import time: empty variables override whatever it held.
    monkeypatch.setenv("MODAL_TOKEN_ID", "")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "")
    env = {k: v for k, v in os.environ.items() if k not in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE")}
    env["MODAL_SERVER_URL"] = "http://127.0.0.1:9"  # were anything sent, it would fail differently
    return env


@pytest.fixture
def fake_token(monkeypatch) -> None:
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")


@pytest.fixture
def modal(monkeypatch, tmp_path, fake_token) -> StandIn:
    """Volume roots in tmp (toy cats as data set `cats`) and the stand-in as modal_app's backend."""
    data_root, output_root = tmp_path / "data", tmp_path / "outputs"
    generate_toy_cats(data_root / "cats", per_class=4, size=16, seed=0, classes=["black", "white", "calico"])
    monkeypatch.setattr(modal_app, "DATA_ROOT", data_root)
    monkeypatch.setattr(modal_app, "OUTPUT_ROOT", output_root)
    stand_in = StandIn(data_root, output_root)
    monkeypatch.setattr(modal_app, "backend", stand_in)
    return stand_in


def modal_run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MODAL_CLI), "run", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def tiny_dit_config(steps: int, run_name: str = RUN, extra: str = TINY_DIT_ARGS, gpu: str = "A10G", **options):
    """The config the `::dit` entrypoint would send for a few steps of T/4 at 16 px on the CPU."""
    settings = dict(
        steps=steps, batch_size=4, lr=1e-3, model="T/4", image_size=16, augmentation_level="basic", report_to="none"
    )
    settings.update(options)
    return modal_app.prepare_run(
        modal_app.TRAINERS["dit"], gpu=gpu, data="cats", run_name=run_name, extra_args=extra, **settings
    )


def run_dir(modal: StandIn, run: str = RUN) -> Path:
    return modal.output_root / "checkpoints" / run


def journal(modal: StandIn, run: str = RUN) -> list[dict]:
    return attempts.read_journal((run_dir(modal, run) / attempts.JOURNAL_NAME).read_text())


def signal_when_training(run: Path, step: int, signum: int = signal.SIGINT) -> threading.Thread:
    """Send `signum` to this process once the run's status.json shows `step` (its training loop is running)."""

    def wait_then_signal() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if ((read_status(run) or {}).get("step") or 0) >= step:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=wait_then_signal, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------------------
# The CLI without an account
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "entrypoint, flags",
    [
        (
            "dit",
            "--steps --batch-size --gradient-accumulation-steps --augmentation-level --gpu --data --run-name "
            "--extra-args --report-to S/4 wandb",
        ),
        ("classifier", "--epochs --batch-size --backbone resnet18 --gpu --data"),
        ("status", "--run"),
        ("download", "--run --include-state --no-check"),
    ],
)
def test_help_works_offline_without_a_token(no_token, entrypoint, flags):
    result = modal_run([f"modal_app.py::{entrypoint}", "--help"], no_token)
    assert result.returncode == 0, result.stderr
    for flag in flags.split():
        assert flag in result.stdout


@pytest.mark.slow
def test_run_without_a_token_stops_with_the_login_advice_before_any_remote_call(no_token):
    started = time.monotonic()
    result = modal_run(["modal_app.py::dit", "--steps", "10"], no_token)
    assert result.returncode == 2
    assert modal_app.auth_message() in result.stderr
    assert "Token missing" not in result.stdout + result.stderr  # Modal's own client never got that far
    assert time.monotonic() - started < 60  # seconds (an import of torch and modal), not a network timeout


@pytest.mark.slow
def test_the_profile_given_to_modal_run_is_the_one_checked(no_token, tmp_path):
    config = tmp_path / "profiles.modal.toml"  # the active profile has a token, `work` has none
    config.write_text(
        '[default]\ntoken_id = "ak-x"\ntoken_secret = "as-x"\nactive = true\n\n[work]\n'
        'server_url = "http://127.0.0.1:9"\n'
    )
    result = modal_run(
        ["--profile", "work", "modal_app.py::dit", "--steps", "10"], {**no_token, "MODAL_CONFIG_PATH": str(config)}
    )
    assert result.returncode == 2
    assert "not authenticated for profile 'work' (`modal token new --profile work`)" in result.stderr


def test_cli_options_take_extra_flags_and_offer_the_scripts_choices():
    import click
    from modal.cli.run import _get_click_command_for_local_entrypoint

    command = _get_click_command_for_local_entrypoint(modal_app.app, modal_app.dit)
    params = command.make_context("dit", ["--extra-args", "--ema-decay 0.99", "--model", "B/4"]).params
    assert (params["extra_args"], params["model"], params["steps"]) == ("--ema-decay 0.99", "B/4", 200000)
    with pytest.raises(click.BadParameter, match="S/4"):
        command.make_context("dit", ["--model", "Z/9"])
    with pytest.raises(click.BadParameter, match="tensorboard"):
        command.make_context("dit", ["--report-to", "mlflow"])


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
@pytest.mark.parametrize(
    "function, gpu", [(modal_app.train_dit_remote, "A10G"), (modal_app.train_classifier_remote, "T4")]
)
def test_training_functions_have_the_stated_specs(function, gpu):
    info = function.info()  # static info of a not-yet-deployed function: no network
    assert info.gpus == [(gpu, 1)]
    assert (info.timeout, info.max_retries, info.single_use_containers) == (24 * 60 * 60, 3, True)
    assert {path: mount.name for path, mount in info.volumes.items()} == {
        "/data": "tiny-cats-data",
        "/outputs": "tiny-cats-outputs",
    }
    # FunctionInfo has no autoscaler or retry-delay fields; the definition the app would send holds them.
    from modal._utils.async_utils import synchronizer

    definition = inspect.getclosurevars(synchronizer._translate_in(function)._load).nonlocals
    assert definition["autoscaler_settings"].max_containers == 1
    assert definition["retry_policy"].initial_delay_ms == 10_000


def test_app_and_data_function():
    assert modal_app.app.name == "tiny-cats"
    info = modal_app.prepare_data_remote.info()
    assert info.gpus == []
    assert set(info.volumes) == {"/data", "/outputs"}


@pytest.mark.parametrize("gpu, count", [("A10G", 1), ("a10g:4", 4), ("H100:8", 8), ("A100-80GB:2", 2)])
def test_gpu_count(gpu, count):
    assert modal_app.gpu_count(gpu) == count


@pytest.mark.parametrize(
    "gpu, problem",
    [
        ("A10G:5", "1 to 4 A10G"),
        ("H100:9", "1 to 8 H100"),
        ("H100:0", "1 to 8"),
        ("A100:two", "1 to 8"),
        ("", "not a Modal GPU"),
        (":2", "not a Modal GPU"),
        ("RTX4090", "not a Modal GPU"),
    ],
)
def test_gpu_strings_beyond_modals_limits_are_refused(gpu, problem):
    with pytest.raises(UserError, match=problem):
        modal_app.gpu_count(gpu)


# ---------------------------------------------------------------------------------------------------------
# Configs: the scripts' own parser and validation, and the way back to flags
# ---------------------------------------------------------------------------------------------------------
def test_dit_config_takes_options_extra_flags_a_fixed_run_and_an_attempt_budget(modal):
    cfg = tiny_dit_config(steps=7, run_name="", extra="--ema-decay 0.99 --objective ddpm")
    assert (cfg.steps, cfg.batch_size, cfg.model, cfg.ema_decay, cfg.objective) == (7, 4, "T/4", 0.99, "ddpm")
    assert cfg.data_dir == str(modal.data_root / "cats")
    assert cfg.output_dir == str(modal.output_root / "checkpoints")
    assert cfg.run_name.startswith("dit-") and cfg.resume == "auto"
    assert float(cfg.time_limit) == 24 * 3600 - 30 * 60  # below the 24 h function timeout
    assert float(tiny_dit_config(steps=7, extra="--time-limit 2h").time_limit) == 7200  # a shorter one is kept


def test_classifier_weights_go_into_the_run_folder(modal):
    cfg = modal_app.prepare_run(
        modal_app.TRAINERS["classifier"], gpu="T4", data="cats", run_name="cls", extra_args="", epochs=1
    )
    assert Path(cfg.output) == modal.output_root / "checkpoints" / "cls" / "cats_model.safetensors"


@pytest.mark.parametrize("extra", ["--steps 5", "--run-name=other", "--output-dir /tmp", "--report-to wandb"])
def test_a_flag_given_twice_is_refused(modal, extra):
    with pytest.raises(UserError, match="--extra-args"):
        tiny_dit_config(steps=7, extra=extra)


def test_validation_uses_the_gpu_count(modal):
    cfg = tiny_dit_config(steps=7)  # batch 4 splits over 2 GPUs but not over 8
    train_dit.validate_config(cfg, num_processes=2)
    with pytest.raises(UserError, match="does not split evenly over 8 processes"):
        tiny_dit_config(steps=7, gpu="H100:8")


def test_a_tracker_is_not_checked_on_this_machine_and_wandb_gets_its_secret(modal, monkeypatch):
    monkeypatch.setattr(train_dit, "_tracker_installed", lambda name: False)  # whatever is installed here
    modal_app.dit(
        steps=2, batch_size=4, model="T/4", image_size=16, report_to="wandb", run_name=RUN, extra_args=TINY_DIT_ARGS
    )
    assert modal.spawns[0].chain.secrets == (modal_app.WANDB_SECRET,)
    assert modal.spawns[0].args[0].report_to == "wandb"


@pytest.mark.parametrize(
    "argv, tracker",
    [
        (["modal", "run", "modal_app.py::dit", "--report-to", "wandb"], "wandb"),
        (["modal", "run", "modal_app.py::dit", "--report-to=tensorboard"], "tensorboard"),
        (["modal", "run", "modal_app.py::dit", "--steps", "5"], "none"),
    ],
)
def test_the_image_gets_the_tracker_of_the_command_line(argv, tracker):
    assert modal_app.requested_tracker(argv) == tracker


def test_missing_data_says_how_to_upload_or_prepare(modal):
    with pytest.raises(UserError) as error:
        modal_app.prepare_run(modal_app.TRAINERS["dit"], gpu="A10G", data="dogs", run_name="", extra_args="")
    assert "modal_app.py::upload_data" in str(error.value) and "modal_app.py::prepare_data" in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# Starting and following a run
# ---------------------------------------------------------------------------------------------------------
def test_a_detached_start_spawns_one_attempt_says_how_to_follow_it_and_returns(modal, capsys):
    modal_app.dit(steps=2, batch_size=4, model="T/4", image_size=16, run_name=RUN, extra_args=TINY_DIT_ARGS)
    out = capsys.readouterr().out
    assert [(s.call_id, s.function_name, s.chain.index) for s in modal.spawns] == [("fc-1", "train_dit_remote", 1)]
    assert modal.spawns[0].chain.owner.startswith(f"{RUN}/") and modal.commits == []  # nothing ran
    for expected in (
        f"run {RUN} on A10G: first attempt fc-1",
        f"make modal-status RUN={RUN}",
        "modal app logs ap-test",
        f"make modal-download RUN={RUN}",
    ):
        assert expected in out


def test_a_time_limited_run_chains_attempts_to_the_end_bitwise_equal_to_one_local_run(modal, capsys):
    # --time-limit 1 is below the trainer's own 30 s margin, so every attempt saves after exactly one step.
    cfg = tiny_dit_config(steps=4, extra=f"{TINY_DIT_ARGS} --time-limit 1")
    modal_app.launch(modal_app.TRAINERS["dit"], cfg, "A10G")
    summary = modal_app.follow("fc-1")

    assert summary["outcome"] == attempts.FINISHED
    # Three attempts stop at their time limit after one step each; the fourth trains the last step and finishes
    # (at the last step the trainer finishes rather than stopping).
    assert [(s.call_id, s.chain.index) for s in modal.spawns] == [(f"fc-{i}", i) for i in range(1, 5)]
    assert len({s.chain.owner for s in modal.spawns}) == 1 and all(s.args == (cfg,) for s in modal.spawns)
    ends = [entry for entry in journal(modal) if entry["event"] == "end"]
    assert [(e["attempt"], e["steps"], e["outcome"]) for e in ends] == [
        (1, [0, 1], "continued"),
        (2, [1, 2], "continued"),
        (3, [2, 3], "continued"),
        (4, [3, 4], "finished"),
    ]
    assert modal.reloads == 4
    # Each attempt committed its lease (before training), every checkpoint, and its end.
    assert modal.committed_steps()[-1] == [1, 2, 3, 4]
    assert "attempt 3 (fc-3 on A10G) covered steps 2-3: continued" in (run_dir(modal) / "training.log").read_text()
    assert read_lock_holder(run_dir(modal)) is None  # released: a rerun may continue it at once

    reference = train_dit.main(dataclasses.replace(cfg, time_limit="", run_name="uninterrupted"))
    for name in (train_dit.FINAL_NAME, train_dit.FINAL_RAW_NAME):
        chained, _ = load_weights(run_dir(modal) / name)
        uninterrupted, _ = load_weights(Path(reference["run_dir"]) / name)
        assert chained.keys() == uninterrupted.keys()
        assert all(torch.equal(chained[key], uninterrupted[key]) for key in chained)

    capsys.readouterr()
    modal_app.status(run=RUN)
    out = capsys.readouterr().out
    assert f"run {RUN}: attempt 4 (fc-4 on A10G) finished" in out
    assert "trainer: finished at step 4/4" in out
    assert "newest checkpoint: state/step_0000004; newest sample grid: samples/step_0000004.png" in out
    assert "attempt 2 fc-2: steps 1-2, continued" in out


def test_a_sigint_commits_a_checkpoint_then_raises_an_interrupt_and_the_restart_resumes(modal):
    cfg = tiny_dit_config(steps=60, extra=TINY_DIT_ARGS.replace("--save-interval 2", "--save-interval 1000"))
    chain = Chain.start(RUN, "A10G")
    signal_when_training(run_dir(modal), step=3)
    with pytest.raises(KeyboardInterrupt):  # Modal restarts the input without spending a retry
        modal.run("train_dit_remote", cfg, chain, call_id="fc-1")
    [stopped_at] = [step for step, _ in list_complete_states(run_dir(modal) / "state")]
    assert 3 <= stopped_at < 60
    assert modal.committed_steps()[-1] == [stopped_at]  # the stop's checkpoint was committed before the raise
    assert journal(modal)[-1]["outcome"] == attempts.INTERRUPTED

    summary = modal.run("train_dit_remote", cfg, chain, call_id="fc-1")  # Modal's restart: the same input
    assert summary["outcome"] == attempts.FINISHED and summary["steps"] == [stopped_at, 60]
    assert f"resuming from step {stopped_at}" in (run_dir(modal) / "training.log").read_text()


def test_a_nan_ends_the_run_without_a_retry_committed_with_its_message(modal, monkeypatch):
    real_build = train_dit.build_objective

    def build_poisoned(name, **options):  # the loss of the 3rd step is NaN
        objective = real_build(name, **options)
        real_loss, calls = objective.training_loss, []

        def poisoned_loss(*args, **kwargs):
            calls.append(1)
            loss = real_loss(*args, **kwargs)
            return loss * float("nan") if len(calls) == 3 else loss

        objective.training_loss = poisoned_loss
        return objective

    monkeypatch.setattr(train_dit, "build_objective", build_poisoned)
    summary = modal.run("train_dit_remote", tiny_dit_config(steps=6), Chain.start(RUN, "A10G"))
    assert summary["outcome"] == attempts.FAILED  # returned, not raised: Modal does not retry it
    assert "loss became NaN/inf at step 3" in summary["message"]
    assert modal.committed_steps()[-1] == [2]  # the last good checkpoint, committed at the end
    log = (run_dir(modal) / "training.log").read_text()
    assert "error: loss became NaN/inf at step 3" in log and "covered steps 0-2: failed" in log


@pytest.mark.parametrize("problem", ["another model", "tracker missing in the image"])
def test_a_setup_error_ends_the_run_without_a_retry(modal, monkeypatch, problem):
    chain = Chain.start(RUN, "A10G")
    assert modal.run("train_dit_remote", tiny_dit_config(steps=2), chain)["outcome"] == attempts.FINISHED
    if problem == "another model":
        cfg, expected = tiny_dit_config(steps=4, model="T/8"), "was trained with a different setup"
    else:  # the container checks the tracker before training, whatever is installed on this machine
        monkeypatch.setattr(train_dit, "_tracker_installed", lambda name: False)
        cfg, expected = tiny_dit_config(steps=4, report_to="tensorboard"), "the tensorboard package is not installed"
    commits = len(modal.commits)
    summary = modal.run("train_dit_remote", cfg, chain.next())
    assert summary["outcome"] == attempts.FAILED and expected in summary["message"]
    assert len(modal.commits) == commits + 2  # its lease, then its end (the journal and the log line)
    assert expected in (run_dir(modal) / "training.log").read_text()


def test_a_crash_is_committed_and_raised_for_a_retry(modal, monkeypatch):
    def crash_after_one_checkpoint(cfg, on_checkpoint=None):
        on_checkpoint(run_dir(modal) / "state" / "step_0000002")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train_dit, "main", crash_after_one_checkpoint)
    with pytest.raises(attempts.AttemptCrashed, match="illegal memory access"):
        modal.run("train_dit_remote", tiny_dit_config(steps=4), Chain.start(RUN, "A10G"))
    assert len(modal.commits) == 3  # the lease, the checkpoint, the end
    assert journal(modal)[-1]["outcome"] == attempts.CRASHED


# ---------------------------------------------------------------------------------------------------------
# One writer per run
# ---------------------------------------------------------------------------------------------------------
def test_a_live_lease_of_another_run_is_refused_naming_its_holder(modal):
    with RunLock(run_dir(modal), owner="dit-test/another-run"):  # e.g. a rerun of the same name, still training
        before = sorted(p.name for p in run_dir(modal).iterdir())
        summary = modal.run("train_dit_remote", tiny_dit_config(steps=2), Chain.start(RUN, "A10G"))
        assert sorted(p.name for p in run_dir(modal).iterdir()) == before  # nothing written
    assert summary["outcome"] == attempts.FAILED
    assert f"pid {os.getpid()}" in summary["message"] and "run owner dit-test/another-run" in summary["message"]
    assert modal.commits == []  # committing our view could overwrite the holder's newer files


@pytest.mark.parametrize("holder", ["another run, silent for 11 minutes", "an earlier attempt of this run"])
def test_a_stale_lease_or_one_of_the_same_run_is_taken_over(modal, holder):
    chain = Chain.start(RUN, "A10G")
    stale = holder.startswith("another")
    run_dir(modal).mkdir(parents=True)
    now, owner = time.time(), "dit-test/another-run" if stale else chain.owner
    lock = dict(owner=owner, host="gone", pid=4_000_000, started=now - 3600, heartbeat=now - (660 if stale else 5))
    (run_dir(modal) / ".lock").write_text(json.dumps({**lock, "token": "t"}))
    summary = modal.run("train_dit_remote", tiny_dit_config(steps=2), chain)
    assert summary["outcome"] == attempts.FINISHED and summary["steps"] == [0, 2]
    assert read_lock_holder(run_dir(modal)) is None


# ---------------------------------------------------------------------------------------------------------
# Several GPUs
# ---------------------------------------------------------------------------------------------------------
def test_the_launch_command_hands_every_option_to_accelerate(modal, tmp_path):
    cfg = tiny_dit_config(steps=4)
    script = Path(train_dit.__file__).resolve()
    command = attempts.launch_command(script, modal_app.config_to_argv(cfg), 4, tmp_path)
    assert command[1:6] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4"]
    wrapped = command.index("scripts.lib.attempts")
    assert command[wrapped - 1] == "-m" and command[wrapped + 1 : wrapped + 3] == [str(tmp_path), str(script)]
    assert parse_config(train_dit.TrainDiTConfig, command[wrapped + 3 :], "") == cfg


@pytest.mark.slow
def test_a_sigint_reaches_every_rank_of_a_multi_gpu_attempt_which_saves_once_and_is_interrupted(modal):
    # Two CPU processes (gloo) under a real `accelerate launch` stand in for two GPUs.
    cfg = tiny_dit_config(
        steps=5000, gpu="A10G:2", extra=TINY_DIT_ARGS.replace("--save-interval 2", "--save-interval 5000")
    )
    signal_when_training(run_dir(modal), step=3)
    with pytest.raises(KeyboardInterrupt):
        modal.run("train_dit_remote", cfg, Chain.start(RUN, "A10G:2"))
    [saved] = [step for step, _ in list_complete_states(run_dir(modal) / "state")]
    log = (run_dir(modal) / "training.log").read_text()
    assert "processes=2" in log and f"stopped by SIGTERM at step {saved}" in log
    end = journal(modal)[-1]
    assert end["outcome"] == attempts.INTERRUPTED and end["ranks"] == {"0": 143, "1": 143}  # both were stopped
    assert modal.committed_steps()[-1] == [saved]  # committed after the launcher ended


# ---------------------------------------------------------------------------------------------------------
# Results on this machine
# ---------------------------------------------------------------------------------------------------------
def test_a_failing_commit_does_not_kill_the_run(monkeypatch, caplog):
    def refuse():
        raise RuntimeError("there are open files preventing the operation")

    monkeypatch.setattr(modal_app, "outputs_volume", SimpleNamespace(name="tiny-cats-outputs", commit=refuse))
    modal_app.ModalBackend().commit_outputs()
    assert "open files" in caplog.text


def test_download_copies_a_run_without_its_training_state(modal, tmp_path, capsys):
    for name, data in {
        "dit-1/samples/step_0000004.png": b"png",
        "dit-1/training.log": b"log",
        "dit-1/state/step_0000004/state.safetensors": b"big",
    }.items():
        (modal.output_root / "checkpoints" / name).parent.mkdir(parents=True, exist_ok=True)
        (modal.output_root / "checkpoints" / name).write_bytes(data)
    modal_app.download(run="dit-1", local_dir=str(tmp_path / "local"))
    copied = sorted(p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*"))
    assert copied == ["dit-1", "dit-1/samples", "dit-1/samples/step_0000004.png", "dit-1/training.log"]
    assert "dit-1 has no final weights yet" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        modal_app.download(run="nope", local_dir=str(tmp_path / "local"))
    assert exit_info.value.code == 2


def test_status_of_an_unknown_run_says_how_to_list_the_runs(modal, capsys):
    with pytest.raises(SystemExit) as exit_info:
        modal_app.status(run="nope")
    assert exit_info.value.code == 2 and "modal volume ls tiny-cats-outputs checkpoints" in capsys.readouterr().err


@pytest.mark.slow
def test_an_attached_run_ends_with_verified_weights_and_an_onnx_model_here(modal, monkeypatch, tmp_path, capfd):
    monkeypatch.chdir(tmp_path)  # the results land in ./checkpoints/<run>/
    modal.detach = False
    # Enough steps for the verifier to see every tensor moved away from its initial value.
    extra = TINY_DIT_ARGS.replace("--save-interval 2", "--save-interval 10")
    modal_app.dit(steps=20, batch_size=4, model="T/4", image_size=16, run_name=RUN, extra_args=extra)
    local = tmp_path / "checkpoints" / RUN
    for name in (train_dit.FINAL_NAME, "samples/step_0000020.png", "training.log", "tinydit.onnx", "tinydit.json"):
        assert (local / name).is_file(), name
    assert not (local / "state").exists()
    assert "parity OK" in capfd.readouterr().out


def test_upload_data_puts_the_folder_under_its_name(modal, tmp_path):
    modal_app.upload_data(local_dir=str(modal.data_root / "cats"), name="")
    assert modal.uploads == [(modal.data_root / "cats", "cats")]
    with pytest.raises(SystemExit):
        modal_app.upload_data(local_dir=str(tmp_path / "missing"), name="x")
