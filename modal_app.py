"""Train tiny-cats on Modal GPUs: the same trainers as local runs, carried as a chain of attempts past preemption
and Modal's 24 h limit per attempt.

    modal run --detach modal_app.py::dit --steps 300000        # prints the run name and how to follow it
    modal run modal_app.py::status --run dit-20261128-213012   # attempt, step, img/s, ETA, newest outputs
    modal run modal_app.py::download --run dit-20261128-213012 # weights, grids, logs; then verify + ONNX export

Every entrypoint first checks on this machine what it can (credentials, the trainer's own flag checks for the GPU
count, Modal's GPU limits, the data on the volume), so a typo never pays for a GPU. A run is then `.spawn()`ed and
carried by scripts/lib/attempts.py (what each trainer exit status leads to, the lease, the journal): an attempt
that reaches its --time-limit (set below the 24 h function timeout) spawns the next one; a preempted attempt is
restarted by Modal from its last checkpoint; a user error ends the run at once; only a crash is retried.

What this relies on in Modal (modal 1.6.4's source in site-packages/modal/, and Modal's docs):
- `.spawn()` is an ASYNC invocation, retried by Modal's servers; `.remote()` is retried by the local client only
  (_functions.py `run_function`), so nobody retries it once a detached terminal is closed.
- Preemption sends SIGINT (docs/guide/preemption: "restart it on the same input"). A KeyboardInterrupt leaving the
  function is re-raised past the output handler (_runtime/container_io_manager.py `handle_input_exception`): the
  container ends without an output and the input is rescheduled; any other exception is a failure that spends a
  retry.
- `single_use_containers=True`: a container handles one input (app.py), so a retry never inherits a broken CUDA
  context. `max_containers=1`: one container of the function at a time. Retries: delays of 1..60 s (retries.py).
- `modal run --detach` keeps the last triggered function alive after the client leaves (cli/run.py), and the
  entrypoint can read the flag from the click context (`ctx.obj["detach"]`).
- GPU counts per container (docs/guide/gpu, "Specifying GPU count"): A10/A10G up to 4, the other types up to 8;
  the client checks neither type nor count (_utils/function_utils.py `parse_gpu_config`).
- `modal run --profile NAME ...` (before the FUNC_REF) and `modal --profile NAME run ...` select a profile
  (cli/run.py consumes global options ahead of the FUNC_REF); after it the option would reach the entrypoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Literal, NoReturn

import modal
from modal.exception import NotFoundError

from models.classifier import BACKBONES
from models.tiny_dit import DIT_SIZES
from scripts import prepare_data as prepare_data_script
from scripts import train, train_dit
from scripts.lib import attempts
from scripts.lib.attempts import Chain
from scripts.lib.data import AUGMENTATION_LEVELS
from scripts.lib.cli import EXIT_USER_ERROR, UserError, config_to_argv, flag_name, parse_config, parse_duration
from scripts.lib.run import OWNER_ENV
from scripts.lib.run import default_run_name

APP_NAME = "tiny-cats"
PROJECT_DIR = Path(__file__).resolve().parent
# Where the volumes are mounted in the container; tests point these at a temp dir and run the bodies here.
DATA_ROOT = Path("/data")
OUTPUT_ROOT = Path("/outputs")
CHECKPOINTS_DIR = "checkpoints"  # runs land in OUTPUT_ROOT/checkpoints/<run-name>/, like local runs
OXFORD_DIR = "oxford-pets"

CLASSIFIER_GPU = "T4"  # a ResNet-18 at 64-224 px is input-bound: a bigger GPU mostly waits for data
DIT_GPU = "A10G"  # 24 GB with bf16 fits the S and B DiTs at batch 256; A100/H100 for larger or faster runs
GPUS_UP_TO_8 = ("T4", "L4", "L40S", "A100", "A100-40GB", "A100-80GB", "H100", "H100!", "H200", "B200", "B200+")
GPU_MAX_COUNT = {"A10": 4, "A10G": 4} | dict.fromkeys(GPUS_UP_TO_8, 8)  # per container (see the docstring)
TIMEOUT_S = 24 * 60 * 60  # Modal's per-attempt maximum (docs/guide/timeouts)
STARTUP_TIMEOUT_S = 20 * 60  # unset, it would be TIMEOUT_S: a container stuck starting would hold on for 24 h
# The DiT stops (after saving) when its next save would pass this; the rest of the 24 h covers the container start,
# the image cache, torch.compile and the final commit.
ATTEMPT_TIME_LIMIT_S = TIMEOUT_S - 30 * 60
# Only crashes reach these (a user error returns, a preemption restarts without spending one); each retry redoes at
# most one save interval, in a fresh container.
RETRIES = modal.Retries(max_retries=3, initial_delay=10.0, backoff_coefficient=1.0)
TRACKER_PACKAGES = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0"}
WANDB_SECRET = "wandb"  # `modal secret create wandb WANDB_API_KEY=...`

data_volume = modal.Volume.from_name("tiny-cats-data", create_if_missing=True)
outputs_volume = modal.Volume.from_name("tiny-cats-outputs", create_if_missing=True)
VOLUMES = {str(DATA_ROOT): data_volume, str(OUTPUT_ROOT): outputs_volume}
log = logging.getLogger("tiny_cats.modal")  # a child of the trainers' logger: lands in training.log too


def _started_by_modal_cli() -> bool:
    program = Path(sys.argv[0])
    return program.name == "modal" or (program.name == "__main__.py" and program.parent.name == "modal")


def requested_tracker(argv: list[str]) -> str:
    """The `--report-to` of a `modal run ...::dit` command line: the image is defined when this file is imported,
    before the entrypoint's options are parsed, and holds a tracker package only when one is asked for."""
    for index, word in enumerate(argv):
        if word == "--report-to" and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith("--report-to="):
            return word.partition("=")[2]
    return "none"


def build_image(tracker: str) -> modal.Image:
    requirements = str(PROJECT_DIR / "requirements.txt")
    image = modal.Image.debian_slim(python_version="3.11").pip_install_from_requirements(requirements)
    if tracker in TRACKER_PACKAGES:
        image = image.pip_install(TRACKER_PACKAGES[tracker])
    # The local packages must be the last image steps: they are added at container start, not baked in a layer.
    return image.add_local_python_source("models", "scripts")


# A container imports this file again and hydrates each function's image with the app's built one: only the number
# of a function's Modal objects must match there (_container_entrypoint.py `hydrate_function`), and an image is one.
app = modal.App(APP_NAME, image=build_image(requested_tracker(sys.argv) if _started_by_modal_cli() else "none"))


@dataclasses.dataclass(frozen=True)
class Trainer:
    module: ModuleType
    config_cls: type
    prefix: str  # of default run names
    function_name: str
    default_gpu: str
    final_name: str  # the final weights in the run folder


TRAINERS = {
    "dit": Trainer(train_dit, train_dit.TrainDiTConfig, "dit", "train_dit_remote", DIT_GPU, train_dit.FINAL_NAME),
    "classifier": Trainer(
        train, train.TrainConfig, "classifier", "train_classifier_remote", CLASSIFIER_GPU, "cats_model.safetensors"
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Every call to Modal's servers, in one object
# ---------------------------------------------------------------------------------------------------------
class ModalBackend:
    """What this app asks of Modal: volumes, function calls, the CLI's mode. Tests replace this one object with an
    in-process stand-in that records commits and spawns and runs the spawned attempts itself."""

    def __init__(self) -> None:
        self._commit_lock = threading.Lock()  # the periodic commit and the checkpoint hook run in two threads

    def commit_outputs(self) -> None:
        """Make /outputs durable now (a preempted container loses what is not committed). A failed commit is logged,
        not raised: the next one carries the same files, and resume only trusts complete checkpoints anyway."""
        with self._commit_lock:
            _commit_quietly(outputs_volume)

    def reload_outputs(self) -> None:
        outputs_volume.reload()

    def commit_data(self) -> None:
        _commit_quietly(data_volume)  # the image cache the trainer built, for the next attempt

    def has_data_set(self, name: str) -> bool:
        with contextlib.suppress(NotFoundError):
            return bool(data_volume.listdir(f"/{name}"))
        return False

    def upload_data(self, local_dir: Path, name: str) -> None:
        with data_volume.batch_upload(force=True) as batch:
            batch.put_directory(str(local_dir), f"/{name}")

    def list_outputs(self, folder: str) -> list[str]:
        with contextlib.suppress(NotFoundError):
            entries = outputs_volume.listdir(folder, recursive=True)
            return [entry.path for entry in entries if entry.type == modal.volume.FileEntryType.FILE]
        return []

    def read_output(self, path: str) -> Iterator[bytes]:
        try:
            yield from outputs_volume.read_file(path)
        except NotFoundError as error:
            raise FileNotFoundError(path) from error

    def call_id(self) -> str:
        return modal.current_function_call_id() or "local"

    def spawn(self, trainer: Trainer, chain: Chain, *args: Any) -> str:
        function = globals()[trainer.function_name]
        options: dict[str, Any] = {}
        if chain.gpu != trainer.default_gpu:
            options["gpu"] = chain.gpu
        if chain.secrets:
            options["secrets"] = [modal.Secret.from_name(name) for name in chain.secrets]
        if options:  # with_options makes a variant with its own container pool: one container there too
            function = function.with_options(max_containers=1, **options)
        return function.spawn(*args, chain).object_id

    def result(self, call_id: str) -> Any:
        return modal.FunctionCall.from_id(call_id).get()

    def call(self, function_name: str) -> Any:
        return globals()[function_name].remote()

    def detached(self) -> bool:
        import click

        context = click.get_current_context(silent=True)  # the entrypoint's, whose obj `modal run` filled
        return bool(context and isinstance(context.obj, dict) and context.obj.get("detach"))

    def app_id(self) -> str:
        return app.app_id or "<app id>"


def _commit_quietly(volume: modal.Volume) -> None:
    try:
        volume.commit()
    except (RuntimeError, modal.exception.Error) as error:
        log.warning("committing volume %s failed (the next commit retries): %s", volume.name, error)


backend = ModalBackend()


# ---------------------------------------------------------------------------------------------------------
# Pre-flight: everything that can be checked before a container (let alone a GPU) is requested
# ---------------------------------------------------------------------------------------------------------
def auth_message() -> str:
    profile = os.environ.get("MODAL_PROFILE")
    which = f" for profile {profile!r} (`modal token new --profile {profile}`)" if profile else ""
    return (
        f"not authenticated{which} — run `modal token new` (Modal 1.0+; `modal token set` is the old command), "
        "check with `modal token info`"
    )


def require_modal_auth() -> None:
    """Offline check that a token is configured (MODAL_TOKEN_* or ~/.modal.toml); a wrong one fails later."""
    if not (modal.config.config.get("token_id") and modal.config.config.get("token_secret")):
        raise UserError(auth_message())


def _fail(message: str, status: int = EXIT_USER_ERROR) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """In a local entrypoint: a UserError becomes one line on stderr and exit status 2, not a traceback."""
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
    if not backend.has_data_set(name):
        raise UserError(
            f"no data set {name!r} on the Modal volume {data_volume.name} — upload a local ImageFolder with "
            f"`modal run modal_app.py::upload_data --local-dir data/{name} --name {name}`, or download "
            "Oxford-IIIT Pet on Modal with `modal run modal_app.py::prepare_data` (makes `cats` and "
            "`cat-vs-other`)"
        )


def build_config(config_cls: type, data_dir: str, extra_args: str, options: dict[str, Any]) -> Any:
    """A trainer config: `extra_args` parsed by the script's own parser, the entrypoint's options on top.

    A flag given both ways is refused, so no value is silently dropped.
    """
    extra = shlex.split(extra_args)
    owned = {flag_name(field) for field in dataclasses.fields(config_cls) if field.name in options}
    given_twice = sorted({token.split("=")[0] for token in extra} & owned)
    if given_twice:
        raise UserError(
            f"{', '.join(given_twice)} in --extra-args is set by modal_app.py or by one of its "
            "own options — pass it as that option (see --help)"
        )
    cfg = parse_config(config_cls, [data_dir, *extra], f"{config_cls.__name__} (--extra-args)")
    return dataclasses.replace(cfg, **options)


def attempt_time_limit(requested: str) -> str:
    """Each attempt's --time-limit: the user's if shorter, else what leaves room below the function timeout."""
    limit = min(parse_duration(requested), ATTEMPT_TIME_LIMIT_S) if requested else ATTEMPT_TIME_LIMIT_S
    return f"{limit:.0f}"


def prepare_run(trainer: Trainer, *, gpu: str, data: str, run_name: str, extra_args: str, **options: Any) -> Any:
    """The pre-flight of a training entrypoint; returns the config every attempt of the run will use.

    The run name is fixed here, outputs go to the volume, resume is auto. The trainer's own `validate_config` runs
    for this GPU count; the tracker package is checked in the container, whose image holds it (not this machine).
    """
    require_modal_auth()
    num_gpus = gpu_count(gpu)
    run_name = run_name or default_run_name(trainer.prefix)
    run_dir = OUTPUT_ROOT / CHECKPOINTS_DIR / run_name
    fields = {field.name for field in dataclasses.fields(trainer.config_cls)}
    options.update(run_name=run_name, output_dir=str(run_dir.parent), resume="auto")
    if "output" in fields:  # the classifier's final weights: in the run folder, so `download` gets them
        options["output"] = str(run_dir / trainer.final_name)
    cfg = build_config(trainer.config_cls, str(DATA_ROOT / data), extra_args, options)
    if "time_limit" in fields:
        cfg = dataclasses.replace(cfg, time_limit=attempt_time_limit(cfg.time_limit))
    local_view = dataclasses.replace(cfg, report_to="none") if "report_to" in fields else cfg
    trainer.module.validate_config(local_view, num_processes=num_gpus)
    require_data_on_volume(data)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# In the container: one attempt
# ---------------------------------------------------------------------------------------------------------
def train_attempt(trainer: Trainer, cfg: Any, chain: Chain) -> dict[str, Any]:
    """One attempt of the run (scripts.lib.attempts.run_attempt), on one GPU in this process or on several under
    `accelerate launch`."""
    backend.reload_outputs()  # what the previous attempt committed
    num_gpus = gpu_count(chain.gpu)

    def train() -> attempts.Exit:
        if num_gpus == 1:
            ended = attempts.run_in_process(trainer.module.main, cfg, chain.owner, backend.commit_outputs)
        else:
            script = Path(trainer.module.__file__).resolve()
            ended = attempts.run_launched(
                script, config_to_argv(cfg), num_gpus, launcher_env(script, chain.owner), backend.commit_outputs
            )
        backend.commit_data()
        return ended

    def continue_run(next_chain: Chain) -> str:
        return backend.spawn(trainer, next_chain, cfg)

    return attempts.run_attempt(
        cfg, chain, train, call_id=backend.call_id(), commit=backend.commit_outputs, continue_run=continue_run
    )


def launcher_env(script: Path, owner: str) -> dict[str, str]:
    project_root = str(script.parents[1])  # `python scripts/x.py` imports `scripts`
    python_path = os.pathsep.join(p for p in (project_root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": python_path, OWNER_ENV: owner}


TRAINING_OPTIONS = dict(
    volumes=VOLUMES,
    timeout=TIMEOUT_S,
    startup_timeout=STARTUP_TIMEOUT_S,
    retries=RETRIES,
    single_use_containers=True,
    max_containers=1,
)


@app.function(gpu=DIT_GPU, **TRAINING_OPTIONS)
def train_dit_remote(cfg: train_dit.TrainDiTConfig, chain: Chain) -> dict[str, Any]:
    return train_attempt(TRAINERS["dit"], cfg, chain)


@app.function(gpu=CLASSIFIER_GPU, **TRAINING_OPTIONS)
def train_classifier_remote(cfg: train.TrainConfig, chain: Chain) -> dict[str, Any]:
    return train_attempt(TRAINERS["classifier"], cfg, chain)


@app.function(volumes=VOLUMES, timeout=2 * 60 * 60, retries=RETRIES)
def prepare_data_remote() -> dict[str, dict[str, int]]:
    """Download Oxford-IIIT Pet on Modal and write the ImageFolder data sets onto the data volume."""
    cfg = prepare_data_script.PrepareDataConfig(root=str(DATA_ROOT / OXFORD_DIR), out_dir=str(DATA_ROOT))
    try:
        counts = prepare_data_script.main(cfg)
    finally:
        backend.commit_data()
    return {name: dict(counter) for name, counter in counts.items()}


# ---------------------------------------------------------------------------------------------------------
# On this machine: start, follow, fetch
# ---------------------------------------------------------------------------------------------------------
def launch(trainer: Trainer, cfg: Any, gpu: str, secrets: tuple[str, ...] = ()) -> None:
    """Spawn the run's first attempt and say how to follow it; attached, follow it to the end and fetch it."""
    call_id = backend.spawn(trainer, Chain.start(cfg.run_name, gpu, secrets), cfg)
    run = cfg.run_name
    print(
        f"run {run} on {gpu}: first attempt {call_id}\n"
        f"  outputs:  volume {outputs_volume.name}, folder {CHECKPOINTS_DIR}/{run}/\n"
        f"  status:   make modal-status RUN={run}   (modal run modal_app.py::status --run {run})\n"
        f"  logs:     modal app logs {backend.app_id()}\n"
        f"  results:  make modal-download RUN={run}   (weights, grids, logs; then verify and ONNX export)\n"
        f"  continue: the same command with --run-name {run} (e.g. more --steps)"
    )
    if backend.detached():
        return
    follow(call_id)
    fetch_run(run, Path(CHECKPOINTS_DIR), include_state=False, check=True)


def follow(call_id: str) -> dict[str, Any]:
    """Wait for each attempt of the chain in turn; returns the finishing attempt's summary."""
    while True:
        try:
            result = backend.result(call_id)
        except Exception as error:  # noqa: BLE001 — a crash after the retries, or Modal's own failure
            _fail(f"the run stopped: {type(error).__name__}: {error}", status=1)
        steps = "steps {}-{}, ".format(*result["steps"]) if "steps" in result else ""
        print(f"attempt {result['attempt']} ({call_id}): {steps}{result['outcome']}")
        if result["outcome"] == attempts.FAILED:
            _fail(result["message"])
        if result["outcome"] != attempts.CONTINUED:
            return result
        call_id = result["next_call_id"]
        print(f"  continues in {call_id}")


def fetch_run(run: str, local_dir: Path, include_state: bool, check: bool) -> None:
    """Copy checkpoints/<run>/ from the volume (without state/ unless asked), then verify and export its weights."""
    files = backend.list_outputs(f"{CHECKPOINTS_DIR}/{run}")
    if not files:
        raise no_such_run(run)
    for remote_path in files:
        if include_state or "/state/" not in remote_path:
            local_path = local_dir / PurePosixPath(remote_path).relative_to(CHECKPOINTS_DIR)
            _download_file(remote_path, local_path)
            print(local_path)
    finals = [local_dir / run / t.final_name for t in TRAINERS.values() if (local_dir / run / t.final_name).is_file()]
    if not finals:
        print(f"{run} has no final weights yet — see `modal run modal_app.py::status --run {run}`")
    elif check:
        check_weights(finals[0])


def _download_file(remote_path: str, local_path: Path) -> None:
    local_path.parent.mkdir(parents=True, exist_ok=True)
    partial = local_path.with_name(local_path.name + ".part")  # an interrupted download never looks complete
    with open(partial, "wb") as handle:
        for chunk in backend.read_output(remote_path):
            handle.write(chunk)
    os.replace(partial, local_path)


def check_weights(weights: Path) -> None:
    """What `make verify export` does with local weights: the checkpoint report, then ONNX with parity checks."""
    weights = weights.resolve()  # the commands run from the project folder
    if weights.name == train_dit.FINAL_NAME:
        export = ["scripts/export_dit_onnx.py", "--output", str(weights.with_name("tinydit.onnx")), "--test"]
    else:
        export = ["scripts/export_onnx.py", "--output", str(weights.with_name("cats_model.onnx"))]
    for command in (
        ["scripts/verify_checkpoint.py", "--checkpoint", str(weights)],
        [*export, "--checkpoint", str(weights), "--verify"],
    ):
        print(f"$ {shlex.join(['python', *command])}", flush=True)
        env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
        result = subprocess.run([sys.executable, *command], cwd=PROJECT_DIR, env=env, check=False)
        if result.returncode != 0:
            _fail(f"{command[0]} failed on {weights} (exit status {result.returncode})", result.returncode)


def no_such_run(run: str) -> UserError:
    return UserError(
        f"no run {run!r} in volume {outputs_volume.name} — list the runs with "
        f"`modal volume ls {outputs_volume.name} {CHECKPOINTS_DIR}`"
    )


def read_output_text(path: str) -> str | None:
    try:
        return b"".join(backend.read_output(path)).decode()
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------
# Local entrypoints (`modal run modal_app.py::NAME --help` lists the options)
# ---------------------------------------------------------------------------------------------------------
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
    report_to: Literal[train_dit.REPORT_TO] = _default(_DIT, "report_to"),
    gpu: str = DIT_GPU,
    data: str = "cats",
    run_name: str = "",
    extra_args: str = "",
) -> None:
    """TinyDiT on Modal GPUs; flags as scripts/train_dit.py, others in --extra-args "--ema-decay 0.999"."""
    options = locals()  # every parameter: gpu, data, run_name, extra_args, and the trainer flags of the same names
    secrets = (WANDB_SECRET,) if report_to == "wandb" else ()
    with exit_on_user_error():
        launch(TRAINERS["dit"], prepare_run(TRAINERS["dit"], **options), gpu, secrets)


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
    options = locals()  # every parameter: gpu, data, run_name, extra_args, and the trainer flags of the same names
    with exit_on_user_error():
        launch(TRAINERS["classifier"], prepare_run(TRAINERS["classifier"], **options), gpu)


@app.local_entrypoint()
def status(run: str) -> None:
    """Where a run stands: attempt, step, img/s, ETA, newest checkpoint and sample grid, and each attempt's steps."""
    with exit_on_user_error():
        require_modal_auth()
        status_text = read_output_text(f"{CHECKPOINTS_DIR}/{run}/status.json")
        journal_text = read_output_text(f"{CHECKPOINTS_DIR}/{run}/{attempts.JOURNAL_NAME}")
        if status_text is None and journal_text is None:
            raise no_such_run(run)
        journal = attempts.read_journal(journal_text or "")
        for line in attempts.status_lines(run, status_text and json.loads(status_text), journal, time.time()):
            print(line)


@app.local_entrypoint()
def prepare_data() -> None:
    """Download Oxford-IIIT Pet on Modal into the data volume (`cats` = 12 breeds, `cat-vs-other`)."""
    with exit_on_user_error():
        require_modal_auth()
        for name, counts in backend.call("prepare_data_remote").items():
            print(f"{name}: {sum(counts.values())} images in {len(counts)} classes")


@app.local_entrypoint()
def upload_data(local_dir: str = "data/cats", name: str = "") -> None:
    """Upload a local ImageFolder (<class>/<images>) to the data volume as /<name> (default: folder name)."""
    with exit_on_user_error():
        require_modal_auth()
        source = Path(local_dir)
        if not source.is_dir() or not any(p.is_dir() for p in source.iterdir()):
            raise UserError(
                f"{source} is not a folder of class subfolders — make one with `make data` or "
                "`python scripts/prepare_data.py`"
            )
        target = name or source.resolve().name
        backend.upload_data(source, target)
        print(f"uploaded {source} to volume {data_volume.name} as /{target}: train with --data {target}")


@app.local_entrypoint()
def download(run: str, local_dir: str = CHECKPOINTS_DIR, include_state: bool = False, check: bool = True) -> None:
    """Copy a run (weights, samples, logs; --include-state adds the resumable state) to LOCAL_DIR/<run>/, then
    verify its final weights and export them to ONNX (--no-check skips that)."""
    with exit_on_user_error():
        require_modal_auth()
        fetch_run(run, Path(local_dir), include_state, check)


# `modal run` creates the app on Modal's servers before an entrypoint's body runs, so the credentials check
# has to happen while the CLI imports this file; `--help` stays available without an account.
if modal.is_local() and _started_by_modal_cli() and not {"--help", "-h"} & set(sys.argv):
    with exit_on_user_error():
        require_modal_auth()
