"""modal_app.py without Modal's servers: the CLI without an account, the pre-flight, the function specs, and whole
runs on tests/fake_modal.py, a fake of Modal's documented semantics (volumes seen as at mount, last-write-wins
commits that reload, retries in fresh containers with fresh timeouts, preemption as SIGINT then a kill, an atomic
Dict). Every container there is a real subprocess running modal_app's function bodies."""

from __future__ import annotations

import inspect
import json
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from builders import make_toy_data
from fake_modal import FakeFunction, FakeModal, MountedVolume, ServerVolume

import modal_app
from models.tiny_dit import TinyDiT
from scripts import train_dit
from scripts.lib.checkpoints import load_weights
from scripts.lib.cli import UserError, parse_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODAL_CLI = Path(sys.executable).with_name("modal")
TINY = "--device cpu --mixed-precision no --warmup-steps 1 --save-interval 2 --sample-interval 1000 --log-interval 1"
TINY += " --sample-steps 2"
TINY_DIT = dict(batch_size=4, model="T/4", image_size=16, lr=1e-3, augmentation_level="basic", report_to="none")
DIT = modal_app.TRAINERS["dit"]


# ---------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------
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
def fake(monkeypatch, tmp_path) -> Iterator[FakeModal]:
    """modal_app's volumes, lease Dict and functions on the fake, toy cats as data set `cats`, a token set."""
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    server = FakeModal(tmp_path / "modal")
    server.install(modal_app, monkeypatch)
    make_toy_data(server.volume("tiny-cats-data").root / "cats")
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, dict[str, torch.Tensor]]:
    """steps -> the final EMA weights of the same tiny run trained here without interruption (computed once)."""
    root, weights = tmp_path_factory.mktemp("reference"), {}

    def train(steps: int) -> dict[str, torch.Tensor]:
        if steps not in weights:
            flags = [str(make_toy_data(root / "data")), *TINY.split(), "--steps", str(steps), "--run-name", "ref"]
            flags += [f"--{name.replace('_', '-')}={value}" for name, value in TINY_DIT.items()]
            cfg = parse_config(train_dit.TrainDiTConfig, [*flags, "--output-dir", str(root / str(steps))], "")
            weights[steps] = load_weights(train_dit.main(cfg)["final"])[0]
        return weights[steps]

    return train


def launch(run: str, steps: int, extra: str = "", **options) -> tuple:
    """The `::dit` entrypoint's launch of a tiny run; returns (run, owner, call)."""
    settings = dict(TINY_DIT, steps=steps, gpu="A10G", data="cats", run_name=run, extra_args=f"{TINY} {extra}")
    return modal_app.launch(DIT, **{**settings, **options})


def server_run(fake: FakeModal, run: str) -> Path:
    return fake.volume("tiny-cats-outputs").root / "checkpoints" / run


def ends(fake: FakeModal, run: str) -> list[tuple]:
    """(attempt, steps, outcome) of each end record in the run's committed journal."""
    journal = (server_run(fake, run) / "attempts.jsonl").read_text().splitlines()
    return [(e["attempt"], e["steps"], e["outcome"]) for e in map(json.loads, journal) if e["event"] == "end"]


def assert_equal_weights(fake: FakeModal, run: str, expected: dict[str, torch.Tensor]) -> None:
    final, _ = load_weights(server_run(fake, run) / train_dit.FINAL_NAME)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def view_step(container, run: str) -> int:
    """The step in status.json as the container sees it (its own view of the outputs volume)."""
    try:
        return json.loads((container.mount("/outputs") / "checkpoints" / run / "status.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def cuda_error_in_attempt_2(attempt: int) -> None:
    """Injected into a container: in attempt 2 the DiT's forward fails as on a broken GPU (inside the loop)."""

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    if attempt == 2:
        TinyDiT.forward = broken


def nan_at_the_3rd_forward(attempt: int) -> None:
    """Injected into a container: the DiT's 3rd forward (the 3rd step's) gives NaN."""
    real_forward, calls = TinyDiT.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        return real_forward(self, *args, **kwargs) * (float("nan") if len(calls) == 3 else 1.0)

    TinyDiT.forward = forward


def modal_run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [str(MODAL_CLI), "run", *args] if args[0] != "python" else [sys.executable, *args[1:]]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


# ---------------------------------------------------------------------------------------------------------
# The fake itself: what the tests below rely on it to model
# ---------------------------------------------------------------------------------------------------------
def test_a_fake_volume_is_seen_as_at_mount_commits_last_write_wins_and_reloads_only_with_nothing_open(tmp_path):
    server = ServerVolume("v", tmp_path / "server")
    (server.root / "old.txt").write_text("old")
    first, second = MountedVolume(server, tmp_path / "a"), MountedVolume(server, tmp_path / "b")
    (first.view / "new.txt").write_text("from a")
    (first.view / "old.txt").unlink()
    assert not (second.view / "new.txt").exists() and not (server.root / "new.txt").exists()
    first.commit()
    assert (server.root / "new.txt").read_text() == "from a" and not (server.root / "old.txt").exists()
    assert (second.view / "old.txt").exists()  # as at its mount, until it reloads
    (second.view / "new.txt").write_text("from b")
    second.commit()  # the last write wins
    assert (server.root / "new.txt").read_text() == "from b" and not (second.view / "old.txt").exists()
    with open(second.view / "new.txt", "rb") as handle:
        with pytest.raises(RuntimeError, match="open files preventing the operation: path .*new.txt"):
            second.reload()
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    with pytest.raises(RuntimeError, match="open files"):  # a memory map holds the file without a descriptor
        second.reload()
    mapped.close()
    second.reload()


def test_a_fake_dict_creates_a_key_only_once(tmp_path):
    leases = FakeModal(tmp_path).dict("d")
    assert leases.put("run", {"owner": "a"}, skip_if_exists=True)
    assert not leases.put("run", {"owner": "b"}, skip_if_exists=True)
    assert leases.get("run") == {"owner": "a"} and leases.pop("run") == {"owner": "a"} and leases.get("run") is None


@pytest.mark.parametrize(
    "plan, retries, timeout_s, grace_s, expected",
    [
        (["raise", "raise", "return"], 2, None, None, 2),  # each raise spends a retry
        (["raise", "raise", "raise"], 2, None, None, "ValueError: run 2 failed"),  # the last error, when none is left
        (["sleep", "return"], 1, 4.0, None, 1),  # a timeout spends a retry; the next container has a fresh timeout
        (["sleep", "return"], 0, None, 20.0, 1),  # a preemption's SIGINT: rerun without spending a retry
        (["deaf", "return"], 0, None, 0.5, 1),  # deaf to SIGINT: killed after the grace period, rerun as well
        (["interrupt", "return"], 0, None, None, 1),  # a KeyboardInterrupt leaving the function is an interruption
    ],
)
def test_a_fake_call_retries_and_reruns_as_modal_does(tmp_path, plan, retries, timeout_s, grace_s, expected):
    server = FakeModal(tmp_path)
    server.timeout_s = timeout_s
    if grace_s is not None:
        server.preempt_when(lambda container: (tmp_path / "runs" / "0").exists(), grace_s)
    (tmp_path / "runs").mkdir()
    call = FakeFunction(server, "fake_modal", "probe", {"timeout": 600, "retries": retries, "volumes": {}}).spawn(
        plan, str(tmp_path / "runs")
    )
    if isinstance(expected, int):
        assert call.get() == expected
    else:
        with pytest.raises(Exception) as error:
            call.get()
        assert f"{type(error.value).__name__}: {error.value}" == expected
    assert len(call.containers) == len(plan)


def test_fake_calls_of_one_pool_take_turns_and_of_two_pools_run_at_once(tmp_path):
    server = FakeModal(tmp_path)
    probe = FakeFunction(server, "fake_modal", "probe", {"timeout": 600, "retries": 0, "volumes": {}})
    calls = {}
    for name, env in (("a", "x"), ("b", "x"), ("c", "y")):
        (tmp_path / name).mkdir()
        calls[name] = probe.with_options(max_containers=1, env={"RUN": env}).spawn(["nap"], str(tmp_path / name))
    [call.get() for call in calls.values()]
    [a], [b], [c] = (calls[name].containers for name in "abc")
    assert not a.overlaps(b) and (a.overlaps(c) or b.overlaps(c))


# ---------------------------------------------------------------------------------------------------------
# The CLI without an account
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_help_works_offline_without_a_token(no_token):
    result = modal_run(["modal_app.py::dit", "--help"], no_token)
    assert result.returncode == 0 and "--extra-args" in result.stdout, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", ["modal_app.py::dit --steps 10", "--profile work modal_app.py::dit", "python modal_app.py status run"]
)
def test_a_command_without_a_token_stops_with_the_login_advice_before_any_remote_call(no_token, tmp_path, command):
    config = tmp_path / "profiles.modal.toml"  # the active profile has a token, `work` has none
    config.write_text('[default]\ntoken_id = "ak-x"\ntoken_secret = "as-x"\nactive = true\n\n[work]\n')
    env = {**no_token, "MODAL_CONFIG_PATH": str(config)} if "--profile" in command else no_token
    started = time.monotonic()
    result = modal_run(command.split(), env)
    assert result.returncode == 2
    which = " for profile 'work' (`modal token new --profile work`)" if "--profile" in command else ""
    assert f"error: not authenticated{which} — run `modal token new` (or `modal token set`" in result.stderr
    assert "`modal profile list`" in result.stderr and "Token missing" not in result.stdout + result.stderr
    assert time.monotonic() - started < 60  # seconds (an import of torch and modal), not a network timeout


@pytest.mark.parametrize(
    "entrypoint, flags",
    [
        ("dit", "--steps --batch-size --gradient-accumulation-steps --augmentation-level --lr --model --image-size"),
        ("dit", "--report-to --gpu --data --run-name --extra-args"),
        ("classifier", "--epochs --batch-size --lr --backbone --image-size --augmentation-level --gpu --data"),
        ("check", "--gpu"),
        ("upload_data", "--local-dir --name"),
    ],
)
def test_the_entrypoints_options(entrypoint, flags):
    from modal.cli.run import _get_click_command_for_local_entrypoint

    command = _get_click_command_for_local_entrypoint(modal_app.app, getattr(modal_app, entrypoint))
    assert set(flags.split()) <= {option for param in command.params for option in param.opts}


def test_cli_options_take_extra_flags_and_offer_the_scripts_choices():
    import click
    from modal.cli.run import _get_click_command_for_local_entrypoint

    command = _get_click_command_for_local_entrypoint(modal_app.app, modal_app.dit)
    params = command.make_context("dit", ["--extra-args", "--ema-decay 0.99", "--model", "B/4"]).params
    assert (params["extra_args"], params["model"], params["steps"]) == ("--ema-decay 0.99", "B/4", 200000)
    for flag, value, choice in (("--model", "Z/9", "S/4"), ("--report-to", "mlflow", "tensorboard")):
        with pytest.raises(click.BadParameter, match=choice):
            command.make_context("dit", [flag, value])
    download = modal_app.cli_parser().parse_args(["download", "r", "--local-dir", "x", "--include-state", "--no-check"])
    assert (download.run, download.local_dir, download.include_state, download.check) == ("r", "x", True, False)


def test_the_token_check_runs_offline(no_token, monkeypatch):
    with pytest.raises(UserError, match="modal token new"):
        modal_app.require_modal_auth()
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    modal_app.require_modal_auth()


# ---------------------------------------------------------------------------------------------------------
# Function specs: what Modal is asked for
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "function, gpu", [(modal_app.train_dit_remote, "A10G"), (modal_app.train_classifier_remote, "T4")]
)
def test_training_functions_follow_modals_long_training_pattern(function, gpu):
    info = function.info()  # static info of a not-yet-deployed function: no network
    assert info.gpus == [(gpu, 1)] and info.startup_timeout == 20 * 60
    assert (info.timeout, info.max_retries, info.single_use_containers) == (24 * 60 * 60, 10, True)
    assert {path: mount.name for path, mount in info.volumes.items()} == {
        "/data": "tiny-cats-data",
        "/outputs": "tiny-cats-outputs",
    }
    # FunctionInfo has no retry-delay or autoscaler fields; the definition the app would send holds them.
    from modal._utils.async_utils import synchronizer

    definition = inspect.getclosurevars(synchronizer._translate_in(function)._load).nonlocals
    assert definition["retry_policy"].initial_delay_ms == 0
    assert definition["autoscaler_settings"].max_containers == 0  # no cap shared by all runs: one pool per run


def test_the_other_functions():
    assert modal_app.app.name == "tiny-cats"
    assert modal_app.prepare_data_remote.info().gpus == [] and modal_app.check_gpu_remote.info().gpus == [("A10G", 1)]


@pytest.mark.parametrize(
    "argv, tracker",
    [
        (["modal", "run", "modal_app.py::dit", "--report-to", "wandb"], "wandb"),
        (["modal", "run", "modal_app.py::dit", "--report-to=tensorboard"], "tensorboard"),
        (["modal", "run", "modal_app.py::dit", "--steps", "5"], "none"),
        (["pytest", "--report-to", "wandb"], "none"),  # only a `modal run` command line builds the image
    ],
)
def test_the_image_gets_the_tracker_of_the_command_line(monkeypatch, argv, tracker):
    monkeypatch.setattr(sys, "argv", argv)
    assert modal_app.requested_tracker(argv) == tracker


def test_the_image_holds_what_training_needs_and_no_export_packages():
    requirements = (PROJECT_ROOT / "requirements-train.txt").read_text()
    assert "torch==" in requirements and "accelerate==" in requirements
    assert not {"onnx", "onnxruntime", "onnxscript", "onnx-ir", "modal"} & {
        line.split("==")[0] for line in requirements.splitlines()
    }


# ---------------------------------------------------------------------------------------------------------
# The pre-flight: refusals before a container starts
# ---------------------------------------------------------------------------------------------------------
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


def test_every_attempt_gets_the_options_the_extra_flags_its_places_and_a_time_limit_below_the_timeout(fake):
    flags, cfg = modal_app.preflight(
        DIT, "A10G", "cats", "r", "--ema-decay 0.99 --objective ddpm", dict(TINY_DIT, steps=7)
    )
    assert modal_app.trainer_config(DIT, "r", "cats", flags) == cfg  # what every attempt will parse
    assert (cfg.steps, cfg.model, cfg.ema_decay, cfg.objective, cfg.resume) == (7, "T/4", 0.99, "ddpm", "auto")
    assert (cfg.data_dir, cfg.output_dir, cfg.run_name) == ("/data/cats", "/outputs/checkpoints", "r")
    assert cfg.cache_dir.startswith(str(modal_app.LOCAL_ROOT)) and cfg.tracker_dir.startswith(str(modal_app.LOCAL_ROOT))
    assert float(cfg.time_limit) == 24 * 3600 - 30 * 60
    assert float(modal_app.preflight(DIT, "A10G", "cats", "r", "--time-limit 2h", {})[1].time_limit) == 7200
    classifier = modal_app.TRAINERS["classifier"]
    cfg = modal_app.preflight(classifier, "T4", "cats", "c", "", {})[1]
    assert cfg.output == "/outputs/checkpoints/c/cats_model.safetensors"  # in the run folder: downloaded with it


@pytest.mark.parametrize(
    "gpu, data, run, extra, problem",
    [
        ("A10G", "cats", "r", "--steps 5", "--steps in --extra-args is set by modal_app.py"),
        ("A10G", "cats", "r", "--run-name=other", "--run-name in --extra-args"),
        ("A10G", "cats", "r", "--output-dir /tmp", "--output-dir in --extra-args"),
        ("A10G", "cats", "r", "--cache-dir /tmp", "--cache-dir in --extra-args"),
        ("A10G", "cats", "r", "--report-to wandb", "--report-to in --extra-args"),
        ("H100:8", "cats", "r", "", "does not split evenly over 8 processes"),  # batch 4: the trainer's own check
        ("A10G", "dogs", "r", "", "no data set 'dogs' on the Modal volume tiny-cats-data — upload a local"),
        ("A10G", "cats", "a/b", "", "--run-name 'a/b' is a path"),
        ("A10G", "../x", "r", "", "--data '../x' is a path"),
    ],
)
def test_the_preflight_refuses_before_a_container_starts(fake, gpu, data, run, extra, problem):
    with pytest.raises(UserError, match=problem.replace("(", r"\(")):
        launch(run, steps=7, extra=extra, gpu=gpu, data=data)
    assert fake.containers == [] and fake.dict("tiny-cats-leases").get(run) is None


@pytest.mark.parametrize(
    "holder, heartbeat_age_s, taken",
    [
        (None, 0, True),
        ("r/mine", 9999, True),  # an earlier attempt of this launch
        ("r/other", 601, True),  # stale: no heartbeat for more than 10 minutes
        ("r/other", 30, False),
    ],
)
def test_a_lease_is_created_taken_over_or_refused_naming_its_holder(fake, holder, heartbeat_age_s, taken):
    leases = fake.dict("tiny-cats-leases")
    if holder:
        leases.put("r", {"owner": holder, "attempt": 2, "heartbeat": time.time() - heartbeat_age_s, "host": "box"})
    if taken:
        modal_app.claim_lease("r", "r/mine", attempt=4)
        assert leases.get("r")["owner"] == "r/mine" and leases.get("r")["attempt"] == 4
    else:
        message = r"run r is being written by another run \(attempt 2 of r/other on box, last heartbeat 3\d s ago\)"
        with pytest.raises(UserError, match=message + ".* expires 600 s after its last heartbeat"):
            modal_app.claim_lease("r", "r/mine", attempt=1)


# ---------------------------------------------------------------------------------------------------------
# Whole runs on the fake
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_goes_on_past_its_time_limit_and_a_cuda_error_by_modals_retries_bitwise_as_one_run(
    fake, reference, capsys
):
    fake.inject = "test_modal_app:cuda_error_in_attempt_2"
    run, owner, call = launch("chain", steps=2, extra="--time-limit 1")  # 1 s: every attempt saves after one step
    assert modal_app.wait_for(run, owner, call)["outcome"] == "finished"
    assert len(call.containers) == 3 and not any(container.preempted for container in call.containers)
    assert ends(fake, run) == [(1, [0, 1], "continued"), (2, [1, 1], "crashed"), (3, [1, 2], "finished")]
    assert_equal_weights(fake, run, reference(2))
    log = (server_run(fake, run) / "training.log").read_text()
    assert "attempt 2 (fc-" in log and "crashed: RuntimeError: CUDA error: an illegal memory access" in log
    assert "COMMIT FAILED" not in log + "".join(container.log() for container in call.containers)
    assert fake.dict("tiny-cats-leases").get(run) is None  # released: the same command may continue it at once
    capsys.readouterr()
    modal_app.main(["status", run])
    out = capsys.readouterr().out
    assert f"run {run}: attempt 3 ({call.object_id} on A10G) finished" in out
    assert "trainer: finished at step 2/2" in out and "newest checkpoint: state/step_0000002" in out
    assert "  attempt 1: steps 0-1, continued\n  attempt 2: steps 1-1, crashed\n" in out


@pytest.mark.slow
def test_a_preemption_saves_and_resumes_and_a_kill_after_the_grace_period_loses_at_most_one_save(fake, reference):
    killed_at: list[int] = []

    def at_step(number: int, step: int, seen: list | None = None):
        def condition(container) -> bool:
            now = view_step(container, "preempted") if container.number == number else 0
            if now >= step and seen is not None:
                seen.append(now)
            return now >= step

        return condition

    fake.preempt_when(at_step(1, 3), grace_s=60)  # time to finish the step, save and commit
    fake.preempt_when(at_step(2, 25, killed_at), grace_s=0)  # killed at once: no save
    run, owner, call = launch("preempted", steps=60, extra="--save-interval 5")
    assert modal_app.wait_for(run, owner, call)["outcome"] == "finished"
    assert [container.preempted for container in call.containers] == [True, True, False]
    (first, stop), (second, kill) = ends(fake, run)[0][:2], ends(fake, run)[1][:2]
    assert (first, second) == (1, 2) and 3 <= stop[1] < 25 <= killed_at[0]  # all three attempts are recorded
    assert stop[0] == 0 and kill[0] == stop[1]  # attempt 2 resumed where attempt 1 saved at its SIGINT
    assert killed_at[0] - 5 <= kill[1] <= killed_at[0]  # attempt 3 lost at most one save interval
    assert ends(fake, run)[2] == (3, [kill[1], 60], "finished") and len(ends(fake, run)) == 3
    assert_equal_weights(fake, run, reference(60))


@pytest.mark.slow
@pytest.mark.parametrize(
    "report_to, inject, message",
    [
        ("wandb", None, "--report-to wandb: the wandb package is not installed"),  # a tracker missing in the image
        ("none", "test_modal_app:nan_at_the_3rd_forward", "loss became NaN/inf at step 3"),
    ],
)
def test_a_user_error_ends_the_run_after_one_attempt_with_its_one_line(fake, capsys, report_to, inject, message):
    fake.inject = inject
    run, owner, call = launch("failed", steps=6, report_to=report_to)
    if report_to == "wandb":
        assert [secret.name for secret in call.function.options["secrets"]] == ["wandb"]
    with pytest.raises(SystemExit) as stop:
        modal_app.wait_for(run, owner, call)
    assert stop.value.code == 2 and len(call.containers) == 1  # no retry
    assert message in capsys.readouterr().err.splitlines()[-1]
    outcome, end_step = ends(fake, run)[0][2], ends(fake, run)[0][1][1]
    assert outcome == "failed" and end_step == (2 if inject else 0)  # the last good checkpoint is committed
    assert fake.dict("tiny-cats-leases").get(run) is None


@pytest.mark.slow
def test_one_writer_per_run_and_runs_of_other_names_train_at_the_same_time(fake, tmp_path, capfd):
    shared = launch("shared", steps=20, extra="--save-interval 10")
    with pytest.raises(UserError, match=r"run shared is being written by another run \(attempt 0 of shared/"):
        launch("shared", steps=20)
    other = launch("other", steps=2)
    assert [modal_app.wait_for(*started)["outcome"] for started in (shared, other)] == ["finished", "finished"]
    assert len(fake.containers) == 2 and fake.containers[0].overlaps(fake.containers[1])
    modal_app.main(["download", "shared", "--local-dir", str(tmp_path / "local")])
    local = tmp_path / "local" / "shared"
    for name in (train_dit.FINAL_NAME, "samples/step_0000020.png", "training.log", "tinydit.onnx", "attempts.jsonl"):
        assert (local / name).is_file(), name
    assert not (local / "state").exists() and "parity OK" in capfd.readouterr().out
    with pytest.raises(SystemExit) as stop:
        modal_app.main(["status", "nope"])
    assert stop.value.code == 2 and "modal volume ls tiny-cats-outputs checkpoints" in capfd.readouterr().err


@pytest.mark.slow
def test_when_modals_retries_are_used_up_the_same_command_with_the_run_name_continues(fake, reference, capsys):
    fake.max_retries = 0
    with pytest.raises(SystemExit) as stop:  # the entrypoint itself: `modal run modal_app.py::dit ...`
        modal_app.dit(steps=2, run_name="long", extra_args=f"{TINY} --time-limit 1", **TINY_DIT)
    assert stop.value.code == 75 and "the same command with --run-name long continues" in capsys.readouterr().err
    assert modal_app.wait_for(*launch("long", steps=2, extra="--time-limit 1"))["steps"] == [1, 2]
    assert ends(fake, "long") == [(1, [0, 1], "continued"), (2, [1, 2], "finished")]
    assert_equal_weights(fake, "long", reference(2))


@pytest.mark.slow
def test_an_attempt_that_lost_its_lease_ends_at_once_and_the_call_ends_naming_the_holder(fake, monkeypatch, capsys):
    monkeypatch.setenv("TINY_CATS_LOCK_STALE_S", "4")  # a heartbeat every 0.5 s
    run, owner, call = launch("lost", steps=100000, extra="--save-interval 100000")
    deadline = time.monotonic() + 120
    while not (call.containers and view_step(call.containers[0], run) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    taker = {"owner": "lost/taker", "attempt": 0, "heartbeat": time.time() + 3600, "host": "elsewhere"}
    fake.dict("tiny-cats-leases").put(run, taker)  # as if another launch had judged this one stale
    with pytest.raises(SystemExit) as stop:
        modal_app.wait_for(run, owner, call)
    assert stop.value.code == 2 and "run lost is being written by another run (attempt 0 of lost/taker" in (
        capsys.readouterr().err
    )
    assert len(call.containers) == 2 and "lost the lease of run lost" in call.containers[0].log()
    assert ends(fake, run) == []  # the first wrote nothing more, the retry nothing at all


def test_a_failed_commit_is_loud_and_the_tracker_files_go_with_each_commit(fake, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(modal_app, "OUTPUT_ROOT", tmp_path / "view")
    monkeypatch.setattr(modal_app, "LOCAL_ROOT", tmp_path / "local")
    volume = MountedVolume(fake.volume("tiny-cats-outputs"), tmp_path / "view")
    monkeypatch.setattr(modal_app, "outputs_volume", volume)
    attempt = modal_app.Attempt(DIT, "r", "cats", modal_app.preflight(DIT, "A10G", "cats", "r", "", {})[0], "o", "A10G")
    (tmp_path / "local" / "tracker").mkdir(parents=True)
    (tmp_path / "local" / "tracker" / "events.out").write_text("tensorboard")
    attempt.run_dir.mkdir(parents=True)
    (attempt.run_dir / "training.log").write_text("")
    with open(attempt.run_dir / "held.txt", "w"):
        attempt.commit()
    assert "COMMIT FAILED of volume tiny-cats-outputs (the next one retries)" in capsys.readouterr().err
    assert "ERROR attempt 1 (None on A10G) COMMIT FAILED" in (attempt.run_dir / "training.log").read_text()
    attempt.commit()
    assert (server_run(fake, "r") / "tracker" / "events.out").read_text() == "tensorboard"


# ---------------------------------------------------------------------------------------------------------
# Several GPUs: `accelerate launch` inside the container
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "statuses, signalled, expected",
    [
        ({0: 0, 1: 0}, None, 0),
        ({0: 75, 1: 75}, None, 75),
        ({0: 2, 1: 2}, None, 2),
        ({0: 143, 1: 2}, None, 2),  # rank 1's user error; rank 0 was stopped by the launcher
        ({0: 143, 1: 1}, None, 1),  # the launcher stopped rank 0 after rank 1 crashed: not a preemption
        ({0: 143, 1: 143}, 2, 130),
        ({1: 143}, 15, 143),
        ({}, None, 1),
        ({0: 0, 1: 143}, 2, 0),  # finished just as the signal came
    ],
)
def test_one_exit_status_from_every_ranks_own(statuses, signalled, expected):
    assert modal_app.launched_exit_status(statuses, signalled) == expected


@pytest.mark.slow
def test_a_preemption_reaches_every_rank_of_a_multi_gpu_attempt_which_saves_once_and_is_rerun(fake):
    # Two CPU processes (gloo) under a real `accelerate launch` stand in for two GPUs.
    fake.preempt_when(lambda container: view_step(container, "ddp") >= 3, grace_s=120)
    run, owner, call = launch("ddp", steps=12, gpu="A10G:2", extra="--save-interval 1000")
    assert modal_app.wait_for(run, owner, call)["ranks"] == {"0": 0, "1": 0}
    [(attempt, (start, stop), outcome), finished] = ends(fake, run)
    assert (attempt, start, outcome) == (1, 0, "interrupted") and finished == (2, [stop, 12], "finished")
    log = (server_run(fake, run) / "training.log").read_text()
    assert "processes=2" in log and f"stopped by SIGTERM at step {stop}" in log  # saved once, by every rank's stop
    assert [container.preempted for container in call.containers] == [True, False]  # rerun, no retry spent


# ---------------------------------------------------------------------------------------------------------
# What `python modal_app.py status` prints
# ---------------------------------------------------------------------------------------------------------
def test_status_lines_of_a_run_in_its_second_attempt():
    now = 1_000_000.0
    journal = [
        {"event": "start", "attempt": 1, "name": "attempt 1 (fc-1 on A10G)", "step": 0},
        {"event": "end", "attempt": 1, "name": "attempt 1 (fc-1 on A10G)", "steps": [0, 80000], "outcome": "continued"},
        {"event": "start", "attempt": 2, "name": "attempt 2 (fc-1 on A10G)", "step": 80000},
    ]
    status = dict(state="training", step=80500, steps=300000, img_per_s=431.7, eta_s=3 * 3600 + 60, updated=now - 42)
    status.update(host="modal-1", message=None, newest_checkpoint="state/step_0080000", newest_grid=None)
    assert modal_app.status_lines("dit-1", status, journal, now) == [
        "run dit-1: attempt 2 (fc-1 on A10G) running",
        "trainer: training at step 80500/300000, 432 img/s, ETA 3h01m, updated 42s ago on modal-1",
        "newest checkpoint: state/step_0080000; newest sample grid: -",
        "  attempt 1: steps 0-80000, continued",
    ]
    assert modal_app.status_lines("dit-1", None, [], now) == [
        "run dit-1: no status yet (not started, or its first attempt is still starting)"
    ]


def test_upload_data_puts_a_folder_of_classes_under_its_name(fake, tmp_path):
    make_toy_data(tmp_path / "pets")
    modal_app.upload_data(local_dir=str(tmp_path / "pets"), name="")
    assert sorted(p.name for p in (fake.volume("tiny-cats-data").root / "pets").iterdir()) == sorted(
        p.name for p in (tmp_path / "pets").iterdir()
    )
    for local_dir, name in ((tmp_path / "missing", "x"), (tmp_path / "pets", "a/b")):
        with pytest.raises(SystemExit):
            modal_app.upload_data(local_dir=str(local_dir), name=name)
