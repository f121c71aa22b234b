"""Train tiny-cats on Modal GPUs: the trainers of a local run, carried past preemption and the 24 h limit per
attempt by Modal's retries (the long-training pattern of modal-examples `06_gpu_and_ml/long-training.py`).

    modal run --detach modal_app.py::dit --steps 300000   # pre-flight here, then one call that runs to the end
    python modal_app.py status dit-20261128-213012          # attempt, step, img/s, ETA (reads the volume only)
    python modal_app.py download dit-20261128-213012        # weights, grids, logs; then verify + ONNX export

What this relies on in Modal (modal 1.6.4's source in site-packages/modal/, and Modal's docs):
- A retry runs in a fresh container (`single_use_containers`, app.py) with a fresh timeout (guide "Timeouts"); a
  spawned call is retried by Modal's servers and, unlike a `.remote()` one, does not expire after 24 h.
- A sync function runs in the container's main thread (_container_entrypoint.py), where the trainer's handler sees
  a preemption's SIGINT; a KeyboardInterrupt leaving the function reschedules the input without spending a retry
  (_runtime/container_io_manager.py `handle_input_exception`), any other exception spends one.
- A Volume is last-write-wins without locks (volume.py `_Volume`); `commit()` reloads, and a reload fails while a
  file on the volume is open. A child process is not the function (`is_local()`): this process commits for ranks.
- `Dict.put(key, value, skip_if_exists=True)` creates the key only if absent and says whether it did (dict.py).
- Calls of a `with_options(...)` Function run in a distinct container pool (_functions.py).
- GPUs per container (docs/guide/gpu): A10/A10G up to 4, the other types up to 8; the client checks neither.
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
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Literal, NamedTuple, NoReturn

import modal
from modal.exception import NotFoundError

from models.classifier import BACKBONES
from models.tiny_dit import DIT_SIZES
from scripts import prepare_data as prepare_data_script
from scripts import train, train_dit
from scripts.lib.checkpoints import list_complete_states
from scripts.lib.cli import EXIT_DIR_ENV, EXIT_SIGNAL_BASE, EXIT_TIME_LIMIT, EXIT_USER_ERROR, UserError
from scripts.lib.cli import config_to_argv, flag_name, name_problem, parse_config, parse_duration
from scripts.lib.data import AUGMENTATION_LEVELS
from scripts.lib.run import OWNER_ENV, REPORT_TO, STATE_DIR, append_log_line, default_run_name, format_duration
from scripts.lib.run import heartbeat_is_stale, stale_after_s

PROJECT_DIR = Path(__file__).resolve().parent
# Where a container sees the volumes and its own disk; a fake container (tests/fake_modal.py) sets its own.
DATA_ROOT = Path(os.environ.get("TINY_CATS_DATA_ROOT", "/data"))
OUTPUT_ROOT = Path(os.environ.get("TINY_CATS_OUTPUT_ROOT", "/outputs"))
LOCAL_ROOT = Path(os.environ.get("TINY_CATS_LOCAL_ROOT", "/tmp/tiny-cats"))
CHECKPOINTS_DIR, JOURNAL_NAME = "checkpoints", "attempts.jsonl"  # runs: OUTPUT_ROOT/checkpoints/<run>/, as locally
RUN_ENV = "TINY_CATS_RUN"  # set per run through with_options: it gives each run its own container pool

CLASSIFIER_GPU = "T4"  # a ResNet-18 at 64-224 px is input-bound: a bigger GPU mostly waits for data
DIT_GPU = "A10G"  # 24 GB with bf16 fits the S and B DiTs at batch 256; A100/H100 for larger or faster runs
GPUS_UP_TO_8 = ("T4", "L4", "L40S", "A100", "A100-40GB", "A100-80GB", "H100", "H100!", "H200", "B200", "B200+")
GPU_MAX_COUNT = {"A10": 4, "A10G": 4} | dict.fromkeys(GPUS_UP_TO_8, 8)  # per container (see the docstring)
TIMEOUT_S = 24 * 60 * 60  # Modal's per-attempt maximum; every retry gets it afresh
# The DiT stops (after saving) when its next save would pass this; the rest of the 24 h covers the container start,
# the image cache, torch.compile and the final commit.
ATTEMPT_TIME_LIMIT_S = TIMEOUT_S - 30 * 60
STARTUP_TIMEOUT_S = 20 * 60  # unset, it would be TIMEOUT_S: a container stuck starting would hold on for a day
# Time-limit continuations and crashes spend these (a preemption does not): at most 11 attempts per call.
RETRIES = modal.Retries(max_retries=10, initial_delay=0.0)
# Seconds torch's elastic agent (under `accelerate launch --multi_gpu`) gives its workers after a stop signal before
# SIGKILL (its default, 30 s, can cut a large model's final save short).
LAUNCHER_SHUTDOWN_TIMEOUT_S = 120
TRACKER_PACKAGES = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0"}
WANDB_SECRET = "wandb"  # `modal secret create wandb WANDB_API_KEY=...`
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
    program = Path(sys.argv[0])
    return program.name == "modal" or (program.name == "__main__.py" and program.parent.name == "modal")


def requested_tracker(argv: list[str]) -> str:
    """The `--report-to` of a `modal run ...::dit` command line: the image is defined when this file is imported,
    before the entrypoint's options are parsed, and holds a tracker package only when one is asked for."""
    found = re.search(r"--report-to[= ](\S+)", " ".join(argv)) if _started_by_modal_cli() else None
    return found[1] if found else "none"


# What training needs (export runs on this machine after download: no ONNX packages), and a requested tracker.
image = modal.Image.debian_slim(python_version="3.11").pip_install_from_requirements(
    str(PROJECT_DIR / "requirements-train.txt")
)
if requested_tracker(sys.argv) in TRACKER_PACKAGES:
    image = image.pip_install(TRACKER_PACKAGES[requested_tracker(sys.argv)])
# The local packages must be the last image steps: they are added at container start, not baked in a layer. A
# container imports this file again and hydrates each function's image with the app's built one: only the number of
# a function's Modal objects must match there (_container_entrypoint.py `hydrate_function`), and an image is one.
app = modal.App("tiny-cats", image=image.add_local_python_source("models", "scripts"))


class Trainer(NamedTuple):
    module: ModuleType
    config_cls: type
    kind: str  # the prefix of default run names
    function_name: str
    final_name: str  # the final weights in the run folder


TRAINERS = {
    "dit": Trainer(train_dit, train_dit.TrainDiTConfig, "dit", "train_dit_remote", train_dit.FINAL_NAME),
    "classifier": Trainer(train, train.TrainConfig, "classifier", "train_classifier_remote", "cats_model.safetensors"),
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
    """How many GPUs a Modal GPU string asks for ("A10G" -> 1, "A100-80GB:4" -> 4), within Modal's limits."""
    name, _, count = gpu.partition(":")
    limit = GPU_MAX_COUNT.get(name.upper())
    if limit is None:
        raise UserError(
            f"--gpu {gpu!r}: {name!r} is not a Modal GPU type — use one of {', '.join(GPU_MAX_COUNT)}, "
            "or NAME:N for N GPUs in one container"
        )
    if count and not (count.isdigit() and 1 <= int(count) <= limit):
        raise UserError(f"--gpu {gpu!r}: Modal puts 1 to {limit} {name.upper()} GPUs in one container")
    return int(count) if count else 1


def require_data_on_volume(name: str) -> None:
    with contextlib.suppress(NotFoundError, FileNotFoundError):
        if data_volume.listdir(f"/{name}"):
            return
    raise UserError(
        f"no data set {name!r} on the Modal volume {data_volume.name} — upload a local ImageFolder with "
        f"`modal run modal_app.py::upload_data --local-dir data/{name} --name {name}`, or download "
        "Oxford-IIIT Pet on Modal with `modal run modal_app.py::prepare_data` (makes `cats` and `cat-vs-other`)"
    )


def trainer_flags(trainer: Trainer, extra_args: str, options: dict[str, Any]) -> list[str]:
    """The trainer flags of every attempt: --extra-args, then the entrypoint's options (a flag given both ways, or
    one that modal_app places itself, is refused, so that no value is silently dropped)."""
    fields = {field.name: field for field in dataclasses.fields(trainer.config_cls)}
    extra = shlex.split(extra_args)
    owned = {flag_name(fields[name]) for name in (*options, *PLACED_FIELDS) if name in fields}
    if given_twice := sorted({token.split("=")[0] for token in extra} & owned):
        raise UserError(
            f"{', '.join(given_twice)} in --extra-args is set by modal_app.py or by one of its "
            "own options — pass it as that option (see --help)"
        )
    return [*extra, *(word for name, value in options.items() for word in (flag_name(fields[name]), str(value)))]


def trainer_config(trainer: Trainer, run: str, data: str, flags: list[str]) -> Any:
    """The config of an attempt of `run`, placed under this process's roots (the volumes' mounts in a container)."""
    cfg = parse_config(trainer.config_cls, [str(DATA_ROOT / data), *flags], f"{trainer.config_cls.__name__} flags")
    run_dir = OUTPUT_ROOT / CHECKPOINTS_DIR / run
    places = dict(run_name=run, output_dir=run_dir.parent, resume="auto", output=run_dir / trainer.final_name)
    places.update(cache_dir=LOCAL_ROOT / "cache", tracker_dir=LOCAL_ROOT / "tracker")
    return dataclasses.replace(cfg, **{name: str(value) for name, value in places.items() if hasattr(cfg, name)})


# --- The run's lease in a modal.Dict: one writer per run across containers (a Volume cannot lock) ---------------------
def claim_lease(run: str, owner: str, attempt: int) -> None:
    """Hold the run's lease for `owner` (a launch and its attempts), or raise the one-line refusal. A free lease is
    created atomically; an earlier attempt's or a stale one is taken over by a get and a put, which is not atomic:
    two launches could both pass, and each attempt's heartbeat re-reads the owner (the loser's container ends)."""
    record = {"owner": owner, "attempt": attempt, "heartbeat": time.time(), "host": socket.gethostname()}
    if leases.put(run, record, skip_if_exists=True):
        return
    holder = leases.get(run) or {}
    if holder.get("owner") != owner and not heartbeat_is_stale(holder.get("heartbeat", 0.0)):
        raise UserError(
            f"run {run} is being written by another run (attempt {holder['attempt']} of {holder['owner']} on "
            f"{holder['host']}, last heartbeat {time.time() - holder['heartbeat']:.0f} s ago) — wait for it, stop "
            f"it, or use another --run-name; a lease whose holder died expires {stale_after_s():.0f} s after its "
            "last heartbeat"
        )
    leases.put(run, record)


def release_lease(run: str, owner: str) -> None:
    if (leases.get(run) or {}).get("owner") == owner:
        leases.pop(run, None)


# --- In the container: one attempt ------------------------------------------------------------------------------------
class Exit(NamedTuple):
    """How an attempt's trainer ended: its exit status (scripts.lib.cli), why it failed, each rank's own status."""

    status: int
    message: str | None = None
    error: BaseException | None = None
    ranks: dict[int, int] | None = None


def newest_step(run_dir: Path) -> int:
    states = list_complete_states(run_dir / STATE_DIR)
    return states[-1][0] if states else 0


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []


class Attempt:
    """One container's attempt at a run: its lease, its commits and its records in <run>/attempts.jsonl."""

    def __init__(self, trainer: Trainer, run: str, data: str, flags: list[str], owner: str, gpu: str):
        self.trainer, self.run, self.owner, self.gpu = trainer, run, owner, gpu
        self.cfg = trainer_config(trainer, run, data, flags)
        self.run_dir = Path(self.cfg.output_dir) / run
        self.journal_path = self.run_dir / JOURNAL_NAME
        self.number = 1 + sum(json.loads(line)["event"] == "start" for line in read_lines(self.journal_path))
        self.name = f"attempt {self.number} ({modal.current_function_call_id()} on {gpu})"
        self.committed_step = -1
        self._commit_lock = threading.RLock()  # the heartbeat's thread and the trainer's both commit

    def note(self, text: str, level: str = "INFO") -> None:
        """A line in the container's log and, once the run has one, in its training.log."""
        print(f"{self.name} {text}", file=sys.stderr, flush=True)
        append_log_line(self.run_dir / "training.log", f"{self.name} {text}", level=level)

    def journal(self, **record: Any) -> None:
        with open(self.journal_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"attempt": self.number, **record, "time": round(time.time(), 3)}) + "\n")

    def commit(self) -> None:
        """Publish the run folder, the tracker's files copied in first. A failure is logged loudly, not raised: the
        next commit carries the same files, and resume only trusts complete checkpoints."""
        with self._commit_lock:
            try:
                if Path(self.cfg.tracker_dir).is_dir():
                    shutil.copytree(self.cfg.tracker_dir, self.run_dir / "tracker", dirs_exist_ok=True)
                outputs_volume.commit()
            except (OSError, RuntimeError, modal.exception.Error) as error:
                self.note(f"COMMIT FAILED of volume {outputs_volume.name} (the next one retries): {error}", "ERROR")

    def commit_new_checkpoint(self, _saved: Path | None = None) -> None:
        """The trainer's on_checkpoint (and, for launched ranks, the heartbeat's): commit a new complete save."""
        with self._commit_lock:
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
        """The trainer on one GPU in this process, or on several under `accelerate launch`."""
        os.environ[OWNER_ENV] = self.owner  # the trainer's run lock: attempts of one launch take it over at once
        num_gpus, stop = gpu_count(self.gpu), threading.Event()
        heartbeat = threading.Thread(target=self.keep_lease, args=(stop, num_gpus > 1), daemon=True)
        heartbeat.start()
        try:
            if num_gpus == 1:
                return run_in_process(self.trainer.module.main, self.cfg, self.commit_new_checkpoint)
            script = Path(self.trainer.module.__file__).resolve()
            ended = run_launched(script, config_to_argv(self.cfg), num_gpus)
            self.commit_new_checkpoint()  # the ranks' last save (at a stop, the only commit of the grace period)
            return ended
        finally:
            stop.set()
            heartbeat.join()

    def __call__(self) -> dict[str, Any]:
        """Take the lease, train, record, commit; returns the run's result, or raises for Modal to go on."""
        summary: dict[str, Any] = {"run": self.run, "attempt": self.number, "gpu": self.gpu}
        try:
            claim_lease(self.run, self.owner, self.number)
        except UserError as refused:  # another launch holds the run: write nothing, commit nothing
            return {**summary, "outcome": FAILED, "message": str(refused)}
        start = newest_step(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        last = json.loads((read_lines(self.journal_path) or ["{}"])[-1])
        if last.get("event") == "start":  # the previous container ended without a word
            gone = "ended without its own record (preempted, timed out or killed)"
            self.journal(
                **{**last, "event": "end", "steps": [last["step"], start], "outcome": INTERRUPTED, "message": gone}
            )
        self.journal(event="start", name=self.name, gpu=self.gpu, owner=self.owner, step=start)
        self.note(f"starts at step {start}")
        self.commit()
        ended = self.train()
        known = {0: FINISHED, EXIT_USER_ERROR: FAILED, EXIT_TIME_LIMIT: CONTINUED}
        outcome = known.get(ended.status) or (INTERRUPTED if ended.status > EXIT_SIGNAL_BASE else CRASHED)
        message, end = ended.message, newest_step(self.run_dir)
        if outcome == INTERRUPTED:  # Modal reschedules the input; the next attempt records this one's end
            raise KeyboardInterrupt
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


def run_in_process(main: Callable[..., Any], cfg: Any, on_checkpoint: Callable[[Path], None]) -> Exit:
    try:
        main(cfg, on_checkpoint=on_checkpoint)
    except UserError as error:
        return Exit(EXIT_USER_ERROR, str(error))
    except SystemExit as stop:  # --time-limit or a signal, after saving
        return Exit(stop.code if isinstance(stop.code, int) else 1)
    except KeyboardInterrupt:  # a signal before the training loop had its own handlers in place
        return Exit(EXIT_SIGNAL_BASE + signal.SIGINT)
    except Exception as error:  # noqa: BLE001 — a crash: the attempt re-raises it so that Modal retries
        return Exit(1, f"{type(error).__name__}: {error}", error)
    return Exit(0)


def run_launched(script: Path, argv: list[str], num_processes: int) -> Exit:
    """`accelerate launch --multi_gpu` of the trainer, each rank writing its exit status (cli.EXIT_DIR_ENV). SIGINT
    and SIGTERM go on to the launcher's whole process group as SIGTERM: the elastic agent passes on what it gets,
    and a worker that gets SIGINT twice stops without saving (a second Ctrl-C), while SIGTERM twice is harmless."""
    with tempfile.TemporaryDirectory() as exit_dir, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # a free port for the ranks' rendezvous (a fixed one collides with others)
        python_path = os.pathsep.join(p for p in (str(script.parents[1]), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": python_path, EXIT_DIR_ENV: exit_dir}
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(LAUNCHER_SHUTDOWN_TIMEOUT_S)
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
        launcher += ["--num_processes", str(num_processes), "--main_process_port", str(probe.getsockname()[1])]
        probe.close()
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
    """Download Oxford-IIIT Pet on Modal and write the ImageFolder data sets onto the data volume."""
    cfg = prepare_data_script.PrepareDataConfig(root=str(DATA_ROOT / "oxford-pets"), out_dir=str(DATA_ROOT))
    try:
        counts = prepare_data_script.main(cfg)
    finally:
        data_volume.commit()
    return {name: dict(counter) for name, counter in counts.items()}


@app.function(gpu=DIT_GPU, timeout=10 * 60)
def check_gpu_remote() -> str:
    """What a training container sees: torch and CUDA, the GPUs, and whether a bf16 matmul computes right."""
    import torch

    report = f"torch {torch.__version__} (CUDA {torch.version.cuda}): cuda available {torch.cuda.is_available()}"
    if torch.cuda.is_available():
        ones = torch.ones(1024, 1024, device="cuda", dtype=torch.bfloat16)
        report += f"\n{torch.cuda.device_count()} x {torch.cuda.get_device_name()}: bf16 matmul right "
        report += str(bool(((ones @ ones) == 1024).all()))
    return report


# --- On this machine: start a run, wait for it, fetch it --------------------------------------------------------------
def preflight(trainer: Trainer, gpu: str, data: str, run: str, extra_args: str, options: dict[str, Any]) -> tuple:
    """Every check of a launch that needs no container; returns the trainer flags of every attempt, and its config."""
    num_gpus = gpu_count(gpu)
    if problem := name_problem(data):  # the run name is the trainer's to check
        raise UserError(f"--data {data!r} {problem}")
    flags = trainer_flags(trainer, extra_args, options)
    cfg = trainer_config(trainer, run, data, flags)
    if hasattr(cfg, "time_limit"):  # the user's --time-limit if shorter, else what fits below the timeout
        limit = min(parse_duration(cfg.time_limit), ATTEMPT_TIME_LIMIT_S) if cfg.time_limit else ATTEMPT_TIME_LIMIT_S
        flags, cfg = [*flags, "--time-limit", f"{limit:.0f}"], dataclasses.replace(cfg, time_limit=f"{limit:.0f}")
    # The tracker package is checked in the container, whose image holds it (not on this machine).
    trainer.module.validate_config(dataclasses.replace(cfg, report_to="none"), num_processes=num_gpus)
    require_data_on_volume(data)
    return flags, cfg


def launch(trainer: Trainer, *, gpu: str, data: str, run_name: str, extra_args: str, **options: Any) -> tuple:
    """The pre-flight, the run's lease, then the run's one call; returns (run, owner, call)."""
    require_modal_auth()
    run = run_name or default_run_name(trainer.kind)
    flags, cfg = preflight(trainer, gpu, data, run, extra_args, options)
    owner = f"{run}/{uuid.uuid4().hex[:12]}"
    claim_lease(run, owner, attempt=0)
    secrets = [modal.Secret.from_name(WANDB_SECRET)] if cfg.report_to == "wandb" else []
    function = globals()[trainer.function_name].with_options(
        gpu=gpu, secrets=secrets, max_containers=1, env={RUN_ENV: run}
    )
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
    """The run's result; a user error, or Modal's retries used up, end this process with one line."""
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
        run, owner, call = launch(trainer, **options)
        wait_for(run, owner, call)
        fetch_run(run, Path(CHECKPOINTS_DIR), include_state=False, check=True)


def fetch_run(run: str, local_dir: Path, include_state: bool, check: bool) -> None:
    """Copy checkpoints/<run>/ from the volume (without state/ unless asked), then verify and export its weights."""
    try:
        entries = outputs_volume.listdir(f"{CHECKPOINTS_DIR}/{run}", recursive=True)
    except (NotFoundError, FileNotFoundError):
        entries = []
    files = [entry.path.lstrip("/") for entry in entries if entry.type == modal.volume.FileEntryType.FILE]
    if not files:
        raise no_such_run(run)
    for remote_path in files:
        if include_state or f"/{STATE_DIR}/" not in remote_path:
            local_path = local_dir / PurePosixPath(remote_path).relative_to(CHECKPOINTS_DIR)
            local_path.parent.mkdir(parents=True, exist_ok=True)
            partial = local_path.with_name(local_path.name + ".part")  # an interrupted download never looks complete
            with open(partial, "wb") as handle:
                for chunk in outputs_volume.read_file(remote_path):
                    handle.write(chunk)
            os.replace(partial, local_path)
            print(local_path)
    finals = [local_dir / run / t.final_name for t in TRAINERS.values() if (local_dir / run / t.final_name).is_file()]
    if not finals:
        print(f"{run} has no final weights yet — see `python modal_app.py status {run}`")
    elif check:
        check_weights(finals[0].resolve())  # the commands run from the project folder


def check_weights(weights: Path) -> None:
    """What `make verify export` does with local weights: the checkpoint report, then ONNX with parity checks."""
    if weights.name == train_dit.FINAL_NAME:
        export = ["scripts/export_dit_onnx.py", "--output", str(weights.with_name("tinydit.onnx")), "--test"]
    else:
        export = ["scripts/export_onnx.py", "--output", str(weights.with_name("cats_model.onnx"))]
    for command in (["scripts/verify_checkpoint.py"], [*export, "--verify"]):
        command += ["--checkpoint", str(weights)]
        print(f"$ {shlex.join(['python', *command])}", flush=True)
        env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
        result = subprocess.run([sys.executable, *command], cwd=PROJECT_DIR, env=env, check=False)
        if result.returncode != 0:
            _fail(f"{command[0]} failed on {weights} (exit status {result.returncode})", result.returncode)


def no_such_run(run: str) -> UserError:
    volume = outputs_volume.name
    return UserError(f"no run {run!r} in volume {volume} — list the runs with `modal volume ls {volume} checkpoints`")


def status_lines(run: str, status: dict[str, Any] | None, journal: list[dict[str, Any]], now: float) -> list[str]:
    """Human lines from a run's status.json and attempts.jsonl: attempt, step, speed, ETA, newest outputs."""
    lines = [f"run {run}: {journal[-1]['name']} " + journal[-1].get("outcome", "running")] if journal else []
    if status:
        speed = f", {status['img_per_s']:.0f} img/s" if status.get("img_per_s") else ""
        eta = (
            f", ETA {format_duration(status['eta_s'])}" if status.get("eta_s") and status["state"] == "training" else ""
        )
        updated = f"updated {format_duration(now - status['updated'])} ago on {status.get('host')}"
        lines.append(f"trainer: {status['state']} at step {status['step']}/{status['steps']}{speed}{eta}, {updated}")
        lines += [f"message: {status['message']}"] if status.get("message") else []
        newest = status.get("newest_checkpoint") or "-", status.get("newest_grid") or "-"
        lines.append("newest checkpoint: {}; newest sample grid: {}".format(*newest))
    ends = [entry for entry in journal if entry["event"] == "end"]
    lines += [
        f"  attempt {end['attempt']}: steps {end['steps'][0]}-{end['steps'][1]}, {end['outcome']}" for end in ends
    ]
    return lines or [f"run {run}: no status yet (not started, or its first attempt is still starting)"]


# --- Local entrypoints (`modal run modal_app.py::NAME --help` lists the options) --------------------------------------
def _default(config_cls: type, name: str) -> Any:
    """A trainer flag's default, so each entrypoint option starts where the script's own flag does."""
    return next(field.default for field in dataclasses.fields(config_cls) if field.name == name)


_DIT, _CLS = train_dit.TrainDiTConfig, train.TrainConfig
# Literal annotations become choices in `--help`, taken from the scripts' own registries.
DIT_MODELS = tuple(DIT_SIZES)


@app.local_entrypoint()
def dit(
    steps: int = _default(_DIT, "steps"),
    batch_size: int = _default(_DIT, "batch_size"),
    gradient_accumulation_steps: int = _default(_DIT, "gradient_accumulation_steps"),
    augmentation_level: Literal[AUGMENTATION_LEVELS] = _default(_DIT, "augmentation_level"),
    lr: float = _default(_DIT, "lr"),
    model: Literal[DIT_MODELS] = _default(_DIT, "model"),
    image_size: int = _default(_DIT, "image_size"),
    report_to: Literal[REPORT_TO] = _default(_DIT, "report_to"),
    gpu: str = DIT_GPU,
    data: str = "cats",
    run_name: str = "",
    extra_args: str = "",
) -> None:
    """TinyDiT on Modal GPUs; flags as scripts/train_dit.py, others in --extra-args "--ema-decay 0.999"."""
    train_on_modal(TRAINERS["dit"], locals())


@app.local_entrypoint()
def classifier(
    epochs: int = _default(_CLS, "epochs"),
    batch_size: int = _default(_CLS, "batch_size"),
    lr: float = _default(_CLS, "lr"),
    backbone: Literal[BACKBONES] = _default(_CLS, "backbone"),
    image_size: int = _default(_CLS, "image_size"),
    augmentation_level: Literal[AUGMENTATION_LEVELS] = _default(_CLS, "augmentation_level"),
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
        report = check_gpu_remote.with_options(gpu=gpu).remote()
        print(report)
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
            with contextlib.suppress(FileNotFoundError, NotFoundError):
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
