"""Train tiny-cats on Modal GPUs: the trainers of a local run, carried past preemption and the 24 h limit per
attempt by Modal's retries (the long-training pattern of modal-examples `06_gpu_and_ml/long-training.py`).

What this relies on in Modal (1.6.4's source and docs), beyond what is said where it is used: a spawned call is
retried by Modal's servers and, unlike a `.remote()` one, does not expire after 24 h; a sync function runs in the
container's main thread, where the trainer's handler sees a preemption's SIGINT; a KeyboardInterrupt leaving the
function reschedules its input without spending a retry; a child process is not the function (`is_local()`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Literal, NamedTuple, NoReturn

import modal
import torch

from models.classifier import BACKBONES
from models.tiny_dit import DIT_SIZES
from scripts import prepare_data as prepare_data_script, train, train_dit
from scripts.lib.checkpoints import list_complete_states
from scripts.lib.cli import EXIT_DIR_ENV, EXIT_SIGNAL_BASE, EXIT_TIME_LIMIT, EXIT_USER_ERROR, UserError
from scripts.lib.cli import config_to_argv, flag_name, name_problem, parse_config, parse_duration, project_env
from scripts.lib.cli import save_output
from scripts.lib.data import AUGMENTATION_LEVELS
from scripts.lib.run import OWNER_ENV, REPORT_TO, STATE_DIR, append_log_line, default_run_name, format_duration
from scripts.lib.run import heartbeat_is_stale, stale_after_s

PROJECT_DIR = Path(__file__).resolve().parent
# Where a container sees the volumes and its own disk; a fake container (tests/fake_modal.py) sets its own.
DATA_ROOT = Path(os.environ.get("TINY_CATS_DATA_ROOT", "/data"))
OUTPUT_ROOT = Path(os.environ.get("TINY_CATS_OUTPUT_ROOT", "/outputs"))
LOCAL_ROOT = Path(os.environ.get("TINY_CATS_LOCAL_ROOT", "/tmp/tiny-cats"))
CHECKPOINTS_DIR, JOURNAL_NAME = "checkpoints", "attempts.jsonl"  # runs: OUTPUT_ROOT/checkpoints/<run>/, as locally

CLASSIFIER_GPU = "T4"  # a ResNet-18 at 64-224 px is input-bound: a bigger GPU mostly waits for data
DIT_GPU = "A10G"  # 24 GB with bf16 fits the S and B DiTs at batch 256; A100/H100 for larger or faster runs
GPUS_UP_TO_8 = ("T4", "L4", "L40S", "A100", "A100-40GB", "A100-80GB", "H100", "H100!", "H200", "B200", "B200+")
GPU_MAX_COUNT = {"A10": 4, "A10G": 4} | dict.fromkeys(GPUS_UP_TO_8, 8)  # per container; the client checks none
TIMEOUT_S = 24 * 60 * 60  # Modal's per-attempt maximum; every retry gets it afresh
# The DiT saves and stops before this; the rest of the 24 h covers the start, image cache, compile and final commit.
ATTEMPT_TIME_LIMIT_S = TIMEOUT_S - 30 * 60
STARTUP_TIMEOUT_S = 20 * 60  # unset, it would be TIMEOUT_S: a container stuck starting would hold on for a day
RETRIES = modal.Retries(max_retries=10, initial_delay=0.0)  # time limits and crashes spend these, preemptions don't
# torch's elastic agent gives its workers this long after a stop signal before SIGKILL (30 s can cut a final save)
LAUNCHER_SHUTDOWN_TIMEOUT_S = 120
TRACKER_PACKAGES = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0"}
FINISHED, CONTINUED, INTERRUPTED, FAILED, CRASHED = "finished", "continued", "interrupted", "failed", "crashed"

data_volume = modal.Volume.from_name("tiny-cats-data", create_if_missing=True)
outputs_volume = modal.Volume.from_name("tiny-cats-outputs", create_if_missing=True)
leases = modal.Dict.from_name("tiny-cats-leases", create_if_missing=True)  # run name -> its one writer
VOLUMES = {"/data": data_volume, "/outputs": outputs_volume}


class RunContinues(Exception):
    """Raised by an attempt that saved at its --time-limit: Modal's retry continues the run in a fresh container."""


class AttemptCrashed(RuntimeError):
    """The trainer failed in a way a retry may fix (a CUDA error, a lost GPU, a killed process)."""


def _started_by_modal_cli() -> bool:
    return Path(sys.argv[0]).name == "modal" or Path(sys.argv[0]).parts[-2:] == ("modal", "__main__.py")


def requested_tracker(argv: list[str]) -> str:
    """The `--report-to` of a `modal run ...::dit` command line: the image is defined when this file is imported,
    before the entrypoint's options are parsed, and holds a tracker package only when one is asked for."""
    found = re.search(r"--report-to[= ](\S+)", " ".join(argv)) if _started_by_modal_cli() else None
    return found[1] if found else "none"


# What training needs (export runs on this machine after download: no ONNX packages), and a requested tracker.
image = modal.Image.debian_slim(python_version="3.11").pip_install_from_requirements(
    str(PROJECT_DIR / "requirements-train.txt")
)
if (tracker := requested_tracker(sys.argv)) in TRACKER_PACKAGES:
    image = image.pip_install(TRACKER_PACKAGES[tracker])
# The local packages come last: added at container start, not baked in a layer. A container imports this file again
# and hydrates each function's image with the app's built one (only the count of a function's Modal objects matters).
app = modal.App("tiny-cats", image=image.add_local_python_source("models", "scripts"))


class Trainer(NamedTuple):
    module: ModuleType
    config_cls: type
    kind: str  # the prefix of default run names, and of its Modal function's name (train_<kind>_remote)
    final_name: str  # the final weights in the run folder


TRAINERS = {
    "dit": Trainer(train_dit, train_dit.TrainDiTConfig, "dit", train_dit.FINAL_NAME),
    "classifier": Trainer(train, train.TrainConfig, "classifier", "cats_model.safetensors"),
}
# Set by modal_app for every attempt: where the run's files go, and container-local disk for the files that stay
# open while training (the memory-mapped image cache, tracker event files), which would make commits fail.
PLACED_FIELDS = ("data_dir", "run_name", "output_dir", "output", "resume", "cache_dir", "tracker_dir")


# --- Pre-flight: everything that can be checked before a container (let alone a GPU) is requested ---------------------
def require_modal_auth() -> None:
    """Offline check that a token is configured (MODAL_TOKEN_* or ~/.modal.toml); a wrong one fails later."""
    if not (modal.config.config.get("token_id") and modal.config.config.get("token_secret")):
        profile = os.environ.get("MODAL_PROFILE")
        which = f" for profile {profile!r} (`modal token new --profile {profile}`)" if profile else ""
        raise UserError(
            f"not authenticated{which} — run `modal token new` (or `modal token set` with an existing token id "
            "and secret), check with `modal token info`; `modal profile list` shows the profiles"
        )


def _fail(message: str, status: int = EXIT_USER_ERROR) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    try:
        yield
    except UserError as error:
        _fail(str(error))


def gpu_count(gpu: str) -> int:
    name, _, count = gpu.partition(":")
    limit = GPU_MAX_COUNT.get(name.upper())
    if limit is None:
        raise UserError(f"--gpu {gpu!r} is not a Modal GPU type — use {', '.join(GPU_MAX_COUNT)} (:N for N GPUs)")
    if count and not (count.isdigit() and 1 <= int(count) <= limit):
        raise UserError(f"--gpu {gpu!r}: Modal puts 1 to {limit} {name.upper()} GPUs in one container")
    return int(count or 1)


def trainer_config(trainer: Trainer, run: str, data: str, flags: list[str]) -> Any:
    """The config of an attempt of `run`, placed under this process's roots (the volumes' mounts in a container)."""
    cfg = parse_config(trainer.config_cls, [str(DATA_ROOT / data), *flags], f"{trainer.config_cls.__name__} flags")
    run_dir = OUTPUT_ROOT / CHECKPOINTS_DIR / run
    places = dict(run_name=run, output_dir=run_dir.parent, resume="auto", output=run_dir / trainer.final_name)
    places.update(cache_dir=LOCAL_ROOT / "cache", tracker_dir=LOCAL_ROOT / "tracker")
    return dataclasses.replace(cfg, **{name: str(value) for name, value in places.items() if hasattr(cfg, name)})


def preflight(trainer: Trainer, gpu: str, data: str, run: str, extra_args: str, options: dict[str, Any]) -> tuple:
    """Every check of a launch that needs no container; returns the trainer flags of every attempt, and its config.
    A flag given both in --extra-args and as an option, or one that modal_app places, is refused: no value is lost."""
    num_gpus = gpu_count(gpu)
    if problem := name_problem(data):  # the run name is the trainer's to check
        raise UserError(f"--data {data!r} {problem}")
    fields = {field.name: field for field in dataclasses.fields(trainer.config_cls)}
    extra = shlex.split(extra_args)
    owned = {flag_name(fields[name]) for name in (*options, *PLACED_FIELDS) if name in fields}
    if given_twice := ", ".join(sorted({token.split("=")[0] for token in extra} & owned)):
        raise UserError(f"{given_twice} in --extra-args is set by modal_app.py or by one of its options (see --help)")
    flags = [*extra, *(word for name, value in options.items() for word in (flag_name(fields[name]), str(value)))]
    cfg = trainer_config(trainer, run, data, flags)
    if hasattr(cfg, "time_limit"):  # the user's --time-limit if shorter, else what fits below the timeout
        limit = min(parse_duration(cfg.time_limit), ATTEMPT_TIME_LIMIT_S) if cfg.time_limit else ATTEMPT_TIME_LIMIT_S
        flags, cfg = [*flags, "--time-limit", f"{limit:.0f}"], dataclasses.replace(cfg, time_limit=f"{limit:.0f}")
    # The tracker package is checked in the container, whose image holds it (not on this machine).
    trainer.module.validate_config(dataclasses.replace(cfg, report_to="none"), num_processes=num_gpus)
    with contextlib.suppress(modal.exception.NotFoundError, FileNotFoundError):
        if data_volume.listdir(f"/{data}"):
            return flags, cfg
    raise UserError(
        f"no data set {data!r} on the Modal volume {data_volume.name} — upload a local ImageFolder with "
        f"`modal run modal_app.py::upload_data --local-dir data/{data} --name {data}`, or download "
        "Oxford-IIIT Pet on Modal with `modal run modal_app.py::prepare_data` (makes `cats` and `cat-vs-other`)"
    )


# --- The run's lease in a modal.Dict: one writer per run across containers (a Volume cannot lock) ---------------------
def claim_lease(run: str, owner: str, attempt: int) -> None:
    """Hold the run's lease for `owner` (a launch and its attempts), or raise the one-line refusal. A free lease is
    created atomically; an earlier attempt's or a stale one is taken over by a get and a put, which is not atomic:
    two launches could both pass, and each attempt's heartbeat re-reads the owner (the loser's container ends)."""
    record = {"owner": owner, "attempt": attempt, "heartbeat": time.time(), "host": os.uname().nodename}
    if leases.put(run, record, skip_if_exists=True):
        return
    holder = leases.get(run) or {}
    if holder.get("owner") != owner and not heartbeat_is_stale(holder.get("heartbeat", 0.0)):
        raise UserError(
            f"run {run} is being written by another run (attempt {holder['attempt']} of {holder['owner']} on "
            f"{holder['host']}, last heartbeat {time.time() - holder['heartbeat']:.0f} s ago) — wait, stop it or use "
            f"another --run-name; a lease whose holder died expires {stale_after_s():.0f} s after its last heartbeat"
        )
    leases.put(run, record)


def release_lease(run: str, owner: str) -> None:
    if (leases.get(run) or {}).get("owner") == owner:
        leases.pop(run, None)


# --- In the container: one attempt ------------------------------------------------------------------------------------
class Exit(NamedTuple):  # how an attempt's trainer ended: its exit status (scripts.lib.cli), why, each rank's own
    status: int
    message: str | None = None
    error: BaseException | None = None
    ranks: dict[int, int] | None = None


def newest_step(run_dir: Path) -> int:
    return max((step for step, _ in list_complete_states(run_dir / STATE_DIR)), default=0)


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


class Attempt:
    """One container's attempt at a run: its lease, its commits and its records in <run>/attempts.jsonl."""

    def __init__(self, trainer: Trainer, run: str, data: str, flags: list[str], owner: str, gpu: str):
        self.trainer, self.run, self.owner, self.gpu = trainer, run, owner, gpu
        self.cfg = trainer_config(trainer, run, data, flags)
        self.run_dir = Path(self.cfg.output_dir) / run
        self.number = 1 + sum(json.loads(line)["event"] == "start" for line in read_lines(self.run_dir / JOURNAL_NAME))
        self.name = f"attempt {self.number} ({modal.current_function_call_id()} on {gpu})"
        self.committed_step = -1  # commits never overlap: the heartbeat thread commits only while the ranks run

    def note(self, text: str, level: str = "INFO") -> None:  # in the container's log and the run's training.log
        print(f"{self.name} {text}", file=sys.stderr, flush=True)
        append_log_line(self.run_dir / "training.log", f"{self.name} {text}", level=level)

    def journal(self, **record: Any) -> None:
        with open(self.run_dir / JOURNAL_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"attempt": self.number, **record, "time": round(time.time(), 3)}) + "\n")

    def commit(self) -> None:
        """Publish the run folder, the tracker's files copied in first. A failure is logged loudly, not raised: the
        next commit carries the same files, and resume only trusts complete checkpoints."""
        try:
            if Path(self.cfg.tracker_dir).is_dir():
                shutil.copytree(self.cfg.tracker_dir, self.run_dir / "tracker", dirs_exist_ok=True)
            outputs_volume.commit()
        except (OSError, RuntimeError, modal.exception.Error) as error:
            self.note(f"COMMIT FAILED of volume {outputs_volume.name} (the next one retries): {error}", "ERROR")

    def commit_new_checkpoint(self, _saved: Path | None = None) -> None:
        """The trainer's on_checkpoint (and, for launched ranks, the heartbeat's): commit a new complete save."""
        if (step := newest_step(self.run_dir)) > self.committed_step:
            self.commit()
            self.committed_step = step

    def keep_lease(self, stop: threading.Event, launched: bool) -> None:
        """The heartbeat thread: renew the lease every stale/8 s (and commit each new save of launched ranks). A lost
        lease ends the container at once; Modal's retry then finds the lease taken and ends the call naming it."""
        while not stop.wait(stale_after_s() / 8):
            with contextlib.suppress(modal.exception.Error):  # Modal unreachable just now: the next beat retries
                holder = leases.get(self.run)
                if (holder or {}).get("owner") != self.owner:
                    self.note(f"lost the lease of run {self.run} to another launch: ending this container", "ERROR")
                    os.kill(os.getpid(), signal.SIGKILL)
                leases.put(self.run, {**holder, "heartbeat": time.time()})
            if launched:
                self.commit_new_checkpoint()

    def train(self) -> Exit:
        os.environ[OWNER_ENV] = self.owner  # the trainer's run lock: attempts of one launch take it over at once
        num_gpus, stopping = gpu_count(self.gpu), threading.Event()
        heartbeat = threading.Thread(target=self.keep_lease, args=(stopping, num_gpus > 1), daemon=True)
        heartbeat.start()
        try:
            if num_gpus > 1:
                return run_launched(Path(self.trainer.module.__file__).resolve(), config_to_argv(self.cfg), num_gpus)
            self.trainer.module.main(self.cfg, on_checkpoint=self.commit_new_checkpoint)
            return Exit(0)
        except UserError as error:
            return Exit(EXIT_USER_ERROR, str(error))
        except SystemExit as stop:  # --time-limit or a signal, after saving
            return Exit(stop.code if isinstance(stop.code, int) else 1)
        except KeyboardInterrupt:  # a signal before the training loop had its own handlers in place
            return Exit(EXIT_SIGNAL_BASE + signal.SIGINT)
        except Exception as error:  # noqa: BLE001 — a crash: the attempt re-raises it so that Modal retries
            return Exit(1, f"{type(error).__name__}: {error}", error)
        finally:
            stopping.set()
            heartbeat.join()

    def __call__(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"run": self.run, "attempt": self.number, "gpu": self.gpu}
        try:
            claim_lease(self.run, self.owner, self.number)
        except UserError as refused:  # another launch holds the run: write nothing, commit nothing
            return {**summary, "outcome": FAILED, "message": str(refused)}
        start = newest_step(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        last = json.loads((read_lines(self.run_dir / JOURNAL_NAME) or ["{}"])[-1])
        if last.get("event") == "start":  # the previous container ended without a word
            gone = "ended without its own record (preempted, timed out or killed)"
            self.journal(**(last | dict(event="end", steps=[last["step"], start], outcome=INTERRUPTED, message=gone)))
        self.journal(event="start", name=self.name, gpu=self.gpu, owner=self.owner, step=start)
        self.note(f"starts at step {start}")
        self.commit()
        ended = self.train()
        self.commit_new_checkpoint()  # launched ranks' last save (at a stop, the only commit of the grace period)
        if ended.status > EXIT_SIGNAL_BASE:  # Modal reschedules the input; the next attempt records this one's end
            raise KeyboardInterrupt
        outcome = {0: FINISHED, EXIT_USER_ERROR: FAILED, EXIT_TIME_LIMIT: CONTINUED}.get(ended.status, CRASHED)
        message, end = ended.message, newest_step(self.run_dir)
        if outcome == CONTINUED and end <= start:
            outcome, message = FAILED, f"stopped at its --time-limit without a new checkpoint (still step {end})"
        if outcome in (FAILED, CRASHED) and not message:  # a launcher's workers: their error is in training.log
            message = (read_lines(self.run_dir / "training.log") or [None])[-1]
        summary.update(outcome=outcome, message=message, steps=[start, end], ranks=ended.ranks)
        self.journal(event="end", name=self.name, **summary)
        self.note(f"covered steps {start}-{end}: {outcome}" + (f": {message}" if message else ""))
        self.commit()
        if outcome in (FINISHED, FAILED):
            release_lease(self.run, self.owner)
        if outcome == CONTINUED:
            raise RunContinues(f"{self.name} of {self.run} saved step {end} at its --time-limit")
        if outcome == CRASHED:
            raise AttemptCrashed(f"{self.name} of {self.run} crashed: {message}") from ended.error
        return summary


def run_launched(script: Path, argv: list[str], num_processes: int) -> Exit:
    """`accelerate launch --multi_gpu` of the trainer, each rank writing its exit status (cli.EXIT_DIR_ENV). SIGINT
    and SIGTERM go on to the launcher's whole process group as SIGTERM: the elastic agent passes on what it gets,
    and a worker that gets SIGINT twice stops without saving (a second Ctrl-C), while SIGTERM twice is harmless."""
    with tempfile.TemporaryDirectory() as exit_dir:
        env = project_env() | {EXIT_DIR_ENV: exit_dir}
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(LAUNCHER_SHUTDOWN_TIMEOUT_S)
        # Port 0: accelerate picks a free port for the ranks' rendezvous (a fixed one collides with other runs).
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
        launcher += ["--num_processes", str(num_processes), "--main_process_port", "0"]
        process = subprocess.Popen([*launcher, str(script), *argv], env=env, start_new_session=True)
        received: list[int] = []

        def forward(signum: int, _frame: Any) -> None:
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            process.wait()  # the agent waits for its workers (SIGKILL after the shutdown timeout) before it exits
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        statuses = {int(path.name[4:]): int(path.read_text()) for path in Path(exit_dir).glob("rank*")}
    return Exit(launched_exit_status(statuses, received[0] if received else None), ranks=statuses)


def launched_exit_status(statuses: dict[int, int], signalled: int | None) -> int:
    """One exit status from each rank's own (a killed rank has none). Rank 0 saves, so its word decides once it
    finished or saved at the time limit; a rank's signal status is a stop only if this process got a signal (else
    the launcher tore the group down because another rank failed: a crash)."""
    if EXIT_USER_ERROR in statuses.values():
        return EXIT_USER_ERROR
    if statuses.get(0) in (0, EXIT_TIME_LIMIT):
        return statuses[0]
    return EXIT_SIGNAL_BASE + signalled if signalled else 1


TRAINING_OPTIONS = dict(volumes=VOLUMES, timeout=TIMEOUT_S, retries=RETRIES, single_use_containers=True)


@app.function(gpu=DIT_GPU, startup_timeout=STARTUP_TIMEOUT_S, **TRAINING_OPTIONS)
def train_dit_remote(run: str, data: str, flags: list[str], owner: str, gpu: str) -> dict[str, Any]:
    return Attempt(TRAINERS["dit"], run, data, flags, owner, gpu)()


@app.function(gpu=CLASSIFIER_GPU, startup_timeout=STARTUP_TIMEOUT_S, **TRAINING_OPTIONS)
def train_classifier_remote(run: str, data: str, flags: list[str], owner: str, gpu: str) -> dict[str, Any]:
    return Attempt(TRAINERS["classifier"], run, data, flags, owner, gpu)()


@app.function(volumes=VOLUMES, timeout=2 * 60 * 60, retries=3)
def prepare_data_remote() -> dict[str, dict[str, int]]:
    cfg = prepare_data_script.PrepareDataConfig(root=str(DATA_ROOT / "oxford-pets"), out_dir=str(DATA_ROOT))
    try:
        counts = prepare_data_script.main(cfg)
    finally:
        data_volume.commit()
    return {name: dict(counter) for name, counter in counts.items()}


@app.function(gpu=DIT_GPU, timeout=10 * 60)
def check_gpu_remote() -> str:
    report = f"torch {torch.__version__} (CUDA {torch.version.cuda}): cuda available {torch.cuda.is_available()}"
    if torch.cuda.is_available():
        ones = torch.ones(1024, 1024, device="cuda", dtype=torch.bfloat16)
        report += f"\n{torch.cuda.device_count()} x {torch.cuda.get_device_name()}: bf16 matmul right "
        report += str(bool(((ones @ ones) == 1024).all()))
    return report


# --- On this machine: start a run, wait for it, fetch it --------------------------------------------------------------
def launch(trainer: Trainer, *, gpu: str, data: str, run_name: str, extra_args: str, **options: Any) -> tuple:
    require_modal_auth()
    run = run_name or default_run_name(trainer.kind)
    flags, cfg = preflight(trainer, gpu, data, run, extra_args, options)
    owner = f"{run}/{os.urandom(6).hex()}"
    claim_lease(run, owner, attempt=0)
    secrets = [modal.Secret.from_name("wandb")] if cfg.report_to == "wandb" else []
    function = globals()[f"train_{trainer.kind}_remote"]  # the env makes a container pool of its own for each run
    function = function.with_options(gpu=gpu, secrets=secrets, max_containers=1, env={"TINY_CATS_RUN": run})
    try:
        call = function.spawn(run, data, flags, owner, gpu)
    except BaseException:
        release_lease(run, owner)
        raise
    print(
        f"run {run} on {gpu}: call {call.object_id}\n"
        f"  outputs:  volume {outputs_volume.name}, folder {CHECKPOINTS_DIR}/{run}/\n"
        f"  status:   make modal-status RUN={run}   (python modal_app.py status {run})\n"
        f"  logs:     modal app logs {app.app_id or '<app id>'}\n"
        f"  results:  make modal-download RUN={run}   (weights, grids, logs; then verify and ONNX export)\n"
        f"  continue: the same command with --run-name {run} (e.g. more --steps)",
        flush=True,
    )
    return run, owner, call


def wait_for(run: str, owner: str, call: Any) -> dict[str, Any]:
    try:
        result = call.get()
    except (RunContinues, AttemptCrashed, modal.exception.FunctionTimeoutError) as error:
        release_lease(run, owner)  # the call is over: no container of it writes any more
        more = f"Modal's {RETRIES.max_retries} retries are used up; the same command with --run-name {run} continues"
        _fail(f"{error} — {more}", EXIT_TIME_LIMIT if isinstance(error, RunContinues) else 1)
    except Exception as error:  # noqa: BLE001 — Modal's own failure: the call may still be running
        _fail(f"lost the call ({type(error).__name__}: {error}) — see `python modal_app.py status {run}`", 1)
    if result["outcome"] == FAILED:
        _fail(result["message"])
    print(f"run {run}: attempt {result['attempt']} finished at step {result['steps'][1]}", flush=True)
    return result


def train_on_modal(trainer: Trainer, options: dict[str, Any]) -> None:
    with exit_on_user_error():
        run = wait_for(*launch(trainer, **options))["run"]
        fetch_run(run, Path(CHECKPOINTS_DIR), include_state=False, check=True)


def no_such_run(run: str) -> UserError:
    volume = outputs_volume.name
    return UserError(f"no run {run!r} in volume {volume} — list the runs with `modal volume ls {volume} checkpoints`")


def fetch_run(run: str, local_dir: Path, include_state: bool, check: bool) -> None:
    """Copy checkpoints/<run>/ from the volume (without state/ unless asked), then verify and export its weights."""
    entries = []
    with contextlib.suppress(modal.exception.NotFoundError, FileNotFoundError):
        entries = outputs_volume.listdir(f"{CHECKPOINTS_DIR}/{run}", recursive=True)
    files = [entry.path.lstrip("/") for entry in entries if entry.type == modal.volume.FileEntryType.FILE]
    if not files:
        raise no_such_run(run)
    for remote_path in files:
        if include_state or f"/{STATE_DIR}/" not in remote_path:
            local_path = local_dir / PurePosixPath(remote_path).relative_to(CHECKPOINTS_DIR)
            chunks = outputs_volume.read_file(remote_path)
            save_output(local_path, chunks, f"the download of {remote_path}")  # chunk by chunk, whole or not at all
            print(local_path)
    finals = [local_dir / run / t.final_name for t in TRAINERS.values() if (local_dir / run / t.final_name).is_file()]
    if not finals:
        print(f"{run} has no final weights yet — see `python modal_app.py status {run}`")
    elif check:  # what `make verify export` does with local weights: the checkpoint report, then ONNX with parity
        weights, dit = finals[0].resolve(), finals[0].name == train_dit.FINAL_NAME  # the commands run from PROJECT_DIR
        export = ["scripts/export_dit_onnx.py", "--test"] if dit else ["scripts/export_onnx.py"]
        onnx = weights.with_name("tinydit.onnx" if dit else "cats_model.onnx")
        for command in (["scripts/verify_checkpoint.py"], [*export, "--output", str(onnx), "--verify"]):
            command += ["--checkpoint", str(weights)]
            print(f"$ {shlex.join(['python', *command])}", flush=True)
            ran = subprocess.run([sys.executable, *command], cwd=PROJECT_DIR, env=project_env())
            if ran.returncode != 0:
                _fail(f"{command[0]} failed on {weights} (exit status {ran.returncode})", ran.returncode)


def status_lines(run: str, status: dict[str, Any] | None, journal: list[dict[str, Any]], now: float) -> list[str]:
    lines = [f"run {run}: {journal[-1]['name']} " + journal[-1].get("outcome", "running")] if journal else []
    if status:
        speed = f", {status['img_per_s']:.0f} img/s" if status.get("img_per_s") else ""
        training = status.get("eta_s") and status["state"] == "training"
        eta = f", ETA {format_duration(status['eta_s'])}" if training else ""
        updated = f"updated {format_duration(now - status['updated'])} ago on {status.get('host')}"
        lines.append(f"trainer: {status['state']} at step {status['step']}/{status['steps']}{speed}{eta}, {updated}")
        lines += [f"message: {status['message']}"] if status.get("message") else []
        newest = status.get("newest_checkpoint") or "-", status.get("newest_grid") or "-"
        lines.append("newest checkpoint: {}; newest sample grid: {}".format(*newest))
    ends = [entry for entry in journal if entry["event"] == "end"]
    lines += ["  attempt {attempt}: steps {steps[0]}-{steps[1]}, {outcome}".format(**end) for end in ends]
    return lines or [f"run {run}: no status yet (not started, or its first attempt is still starting)"]


# --- Local entrypoints (`modal run modal_app.py::NAME --help` lists the options) --------------------------------------
# Each option starts where the script's own flag does; Literal annotations become `--help` choices from the registries.
_DIT = {field.name: field.default for field in dataclasses.fields(train_dit.TrainDiTConfig)}
_CLS = {field.name: field.default for field in dataclasses.fields(train.TrainConfig)}


@app.local_entrypoint()
def dit(
    steps: int = _DIT["steps"],
    batch_size: int = _DIT["batch_size"],
    gradient_accumulation_steps: int = _DIT["gradient_accumulation_steps"],
    augmentation_level: Literal[AUGMENTATION_LEVELS] = _DIT["augmentation_level"],
    lr: float = _DIT["lr"],
    model: Literal[tuple(DIT_SIZES)] = _DIT["model"],
    image_size: int = _DIT["image_size"],
    report_to: Literal[REPORT_TO] = _DIT["report_to"],
    gpu: str = DIT_GPU,
    data: str = "cats",
    run_name: str = "",
    extra_args: str = "",
) -> None:
    """TinyDiT on Modal GPUs; flags as scripts/train_dit.py, others in --extra-args "--ema-decay 0.999"."""
    train_on_modal(TRAINERS["dit"], locals())


@app.local_entrypoint()
def classifier(
    epochs: int = _CLS["epochs"],
    batch_size: int = _CLS["batch_size"],
    lr: float = _CLS["lr"],
    backbone: Literal[BACKBONES] = _CLS["backbone"],
    image_size: int = _CLS["image_size"],
    augmentation_level: Literal[AUGMENTATION_LEVELS] = _CLS["augmentation_level"],
    gpu: str = CLASSIFIER_GPU,
    data: str = "cats",
    run_name: str = "",
    extra_args: str = "",
) -> None:
    """The classifier on Modal GPUs; flags as scripts/train.py, others in --extra-args."""
    train_on_modal(TRAINERS["classifier"], locals())


@app.local_entrypoint()
def check(gpu: str = DIT_GPU) -> None:
    """Start GPU once: torch sees CUDA, the device, a bf16 matmul (a driver/torch mismatch shows here, not later)."""
    with exit_on_user_error():
        gpu_count(gpu)
        print(report := check_gpu_remote.with_options(gpu=gpu).remote())
        if not report.endswith("bf16 matmul right True"):
            _fail(f"the GPU check on {gpu} failed (above) — the image's torch may not match Modal's driver", 1)


@app.local_entrypoint()
def prepare_data() -> None:
    """Download Oxford-IIIT Pet on Modal into the data volume (`cats` = 12 breeds, `cat-vs-other`)."""
    with exit_on_user_error():
        for name, counts in prepare_data_remote.remote().items():
            print(f"{name}: {sum(counts.values())} images in {len(counts)} classes")


@app.local_entrypoint()
def upload_data(local_dir: str = "data/cats", name: str = "") -> None:
    """Upload a local ImageFolder (<class>/<images>) to the data volume as /<name> (default: folder name)."""
    with exit_on_user_error():
        source, target = Path(local_dir), name or Path(local_dir).resolve().name
        if not source.is_dir() or not any(p.is_dir() for p in source.iterdir()):
            raise UserError(f"{source} is not a folder of class subfolders — make one with `make data`")
        if problem := name_problem(target):
            raise UserError(f"--name {target!r} {problem}")
        with data_volume.batch_upload(force=True) as batch:
            batch.put_directory(str(source), f"/{target}")
        print(f"uploaded {source} to volume {data_volume.name} as /{target}: train with --data {target}")


# --- `python modal_app.py status|download RUN`: the volume read from this machine, with no app, image or container ----
def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python modal_app.py", description="Read a Modal run from this machine.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="attempt, step, img/s, ETA, newest checkpoint and grid").add_argument("run")
    download = commands.add_parser("download", help="copy a run to LOCAL_DIR/<run>/, then verify and export it")
    download.add_argument("run")
    download.add_argument("--local-dir", default=CHECKPOINTS_DIR)
    download.add_argument("--include-state", action="store_true", help="also the resumable state/ folders")
    download.add_argument("--check", action=argparse.BooleanOptionalAction, default=True, help="verify, export")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = cli_parser().parse_args(argv)
    with exit_on_user_error():
        require_modal_auth()
        if args.command == "download":
            return fetch_run(args.run, Path(args.local_dir), args.include_state, args.check)
        texts = {}
        for name in ("status.json", JOURNAL_NAME):
            with contextlib.suppress(FileNotFoundError, modal.exception.NotFoundError):
                texts[name] = b"".join(outputs_volume.read_file(f"{CHECKPOINTS_DIR}/{args.run}/{name}")).decode()
        if not texts:
            raise no_such_run(args.run)
        status, journal = json.loads(texts.get("status.json", "null")), texts.get(JOURNAL_NAME, "").splitlines()
        print("\n".join(status_lines(args.run, status, [json.loads(line) for line in journal], time.time())))


# `modal run` creates the app on Modal's servers before an entrypoint's body runs, so the credentials check
# has to happen while the CLI imports this file; `--help` stays available without an account.
if modal.is_local() and _started_by_modal_cli() and not {"--help", "-h"} & set(sys.argv):
    with exit_on_user_error():
        require_modal_auth()

if __name__ == "__main__":
    main()
