"""Train tiny-cats on Modal GPUs: the same `main(cfg)` as local runs, in containers that survive preemption.

    modal run modal_app.py::prepare_data                       # Oxford-IIIT Pet -> volume tiny-cats-data
    modal run modal_app.py::upload_data --local-dir data/cats  # or your own ImageFolder
    modal run modal_app.py::classifier --epochs 20 --batch-size 64
    modal run --detach modal_app.py::dit --steps 300000 --batch-size 256 --gpu A100
    modal run modal_app.py::download --run dit-20261128-213012

Every local entrypoint first checks, on this machine, that Modal credentials exist, that the arguments pass
the script's own `validate_config` for the GPU count, and that the data is on the volume — so a typo never
pays for a GPU. The run name is fixed here, before the first attempt: every retry (preemption, crash, the
24 h limit) resumes the newest complete checkpoint of that run from the outputs volume, which is committed
after each checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import subprocess
import sys
import threading
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
from scripts.lib.cli import EXIT_USER_ERROR, UserError, config_to_argv, flag_name, parse_config
from scripts.lib.batches import AUGMENTATION_LEVELS
from scripts.lib.runlog import default_run_name

APP_NAME = "tiny-cats"
PROJECT_DIR = Path(__file__).resolve().parent
# Where the volumes are mounted in the container; tests point these at a temp dir and run the bodies here.
DATA_ROOT = Path("/data")
OUTPUT_ROOT = Path("/outputs")
CHECKPOINTS_DIR = "checkpoints"  # runs land in OUTPUT_ROOT/checkpoints/<run-name>/, like local runs
OXFORD_DIR = "oxford-pets"

CLASSIFIER_GPU = "T4"  # a ResNet-18 at 64-224 px is input-bound: a bigger GPU mostly waits for data
DIT_GPU = "A10G"  # 24 GB with bf16 fits the S and B DiTs at batch 256; A100/H100 for larger or faster runs
TIMEOUT_S = 24 * 60 * 60  # Modal's per-attempt maximum; a longer run continues in the next attempt
RETRIES = modal.Retries(max_retries=10, initial_delay=10.0, backoff_coefficient=2.0, max_delay=60.0)
MULTI_GPU_COMMIT_INTERVAL_S = 300

AUTH_MESSAGE = ("not authenticated — run `modal token new` (Modal 1.0+; `modal token set` is the old "
                "command), check with `modal token info`")

data_volume = modal.Volume.from_name("tiny-cats-data", create_if_missing=True)
outputs_volume = modal.Volume.from_name("tiny-cats-outputs", create_if_missing=True)
VOLUMES = {str(DATA_ROOT): data_volume, str(OUTPUT_ROOT): outputs_volume}

# The local packages must be the last image steps: they are added at container start, not baked in a layer.
image = (modal.Image.debian_slim(python_version="3.11")
         .pip_install_from_requirements(str(PROJECT_DIR / "requirements.txt"))
         .add_local_python_source("models", "scripts"))

app = modal.App(APP_NAME, image=image)
log = logging.getLogger("tiny_cats.modal")  # a child of the trainers' logger: lands in training.log too


# ---------------------------------------------------------------------------------------------------------
# Pre-flight: everything that can be checked before a container (let alone a GPU) is requested
# ---------------------------------------------------------------------------------------------------------
def require_modal_auth() -> None:
    """Offline check that a token is configured (MODAL_TOKEN_* or ~/.modal.toml); a wrong one fails later."""
    if not (modal.config.config.get("token_id") and modal.config.config.get("token_secret")):
        raise UserError(AUTH_MESSAGE)


def _started_by_modal_cli() -> bool:
    program = Path(sys.argv[0])
    return program.name == "modal" or (program.name == "__main__.py" and program.parent.name == "modal")


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """In a local entrypoint: a UserError becomes one line on stderr and exit status 2, not a traceback."""
    try:
        yield
    except UserError as error:
        _fail(str(error))


def gpu_count(gpu: str) -> int:
    """How many GPUs a Modal GPU string asks for: "A10G" -> 1, "A100-80GB:4" -> 4."""
    name, _, count = gpu.partition(":")
    if not name or (count and not (count.isdigit() and 1 <= int(count) <= 8)):
        raise UserError(f"--gpu {gpu!r} is not a Modal GPU string — use e.g. T4, A10G, A100, A100-80GB, "
                        "H100, or NAME:N for N GPUs on one machine (N = 1..8)")
    return int(count) if count else 1


def require_data_on_volume(name: str) -> None:
    """Stop before training when DATA_ROOT/<name> is missing or empty on the data volume."""
    try:
        entries = data_volume.listdir(f"/{name}")
    except NotFoundError:
        entries = []
    if not entries:
        raise UserError(
            f"no data set {name!r} on the Modal volume {data_volume.name} — upload a local ImageFolder with "
            f"`modal run modal_app.py::upload_data --local-dir data/{name} --name {name}`, or download "
            "Oxford-IIIT Pet on Modal with `modal run modal_app.py::prepare_data` (makes `cats` and "
            "`cat-vs-other`)")


# ---------------------------------------------------------------------------------------------------------
# Configs: built from the entrypoint's options by the script's own parser, and turned back into flags
# ---------------------------------------------------------------------------------------------------------
def build_config(config_cls: type, data_dir: str, extra_args: str, options: dict[str, Any]) -> Any:
    """A trainer config: `extra_args` parsed by the script's own parser, the entrypoint's options on top.

    A flag given both ways is refused, so no value is silently dropped.
    """
    extra = shlex.split(extra_args)
    owned = {flag_name(field) for field in dataclasses.fields(config_cls) if field.name in options}
    given_twice = sorted({token.split("=")[0] for token in extra} & owned)
    if given_twice:
        raise UserError(f"{', '.join(given_twice)} in --extra-args is set by modal_app.py or by one of its "
                        "own options — pass it as that option (see --help)")
    cfg = parse_config(config_cls, [data_dir, *extra], f"{config_cls.__name__} (--extra-args)")
    return dataclasses.replace(cfg, **options)


def prepare_run(trainer: ModuleType, config_cls: type, run_prefix: str, *, gpu: str, data: str, run_name: str,
                extra_args: str, **options: Any) -> Any:
    """The pre-flight of a training entrypoint; returns the config every attempt of the run will use.

    Checks auth, builds the config (run name fixed now, outputs on the volume, resume auto), validates it
    with the trainer's own `validate_config` for this GPU count, and checks the data is on the volume.
    """
    require_modal_auth()
    options.update(run_name=run_name or default_run_name(run_prefix),
                   output_dir=str(OUTPUT_ROOT / CHECKPOINTS_DIR), resume="auto")
    cfg = build_config(config_cls, str(DATA_ROOT / data), extra_args, options)
    trainer.validate_config(cfg, num_processes=gpu_count(gpu))
    require_data_on_volume(data)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# In the container
# ---------------------------------------------------------------------------------------------------------
def commit_outputs(_checkpoint: Path | None = None) -> None:
    """Make what is on /outputs durable now: a preempted container loses everything not committed.

    A failed commit is logged, not raised: it must not kill a healthy run, the next commit (or Modal's own
    at container exit) carries the same files, and resume only trusts complete checkpoints anyway.
    """
    try:
        outputs_volume.commit()
    except (RuntimeError, modal.exception.Error) as error:
        log.warning("committing volume %s failed (the next commit retries): %s", outputs_volume.name, error)


class PeriodicCommit:
    """Commits the outputs volume every `interval_s` seconds while a trainer runs in a subprocess.

    The trainers' `on_checkpoint` hook cannot reach across `accelerate launch` into this process, so a
    timer stands in for it. A half-written checkpoint it may commit is harmless: it lacks the COMPLETE
    marker, and resume skips it.
    """

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="periodic-commit", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            commit_outputs()

    def __enter__(self) -> PeriodicCommit:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def multi_gpu_command(trainer: ModuleType, cfg: Any, num_gpus: int) -> list[str]:
    script = str(Path(trainer.__file__).resolve())
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(num_gpus), script, *config_to_argv(cfg)]


def _run_multi_gpu(trainer: ModuleType, cfg: Any, num_gpus: int) -> dict[str, Any]:
    project_root = str(Path(trainer.__file__).resolve().parents[1])  # `python scripts/x.py` imports `scripts`
    python_path = os.pathsep.join(p for p in (project_root, os.environ.get("PYTHONPATH")) if p)
    with PeriodicCommit(MULTI_GPU_COMMIT_INTERVAL_S):
        result = subprocess.run(multi_gpu_command(trainer, cfg, num_gpus),
                                env={**os.environ, "PYTHONPATH": python_path}, check=False)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if result.returncode != 0:
        raise RuntimeError(f"the {num_gpus}-GPU trainer exited with status {result.returncode} — see "
                           f"{run_dir / 'training.log'}; a retry resumes from the newest complete checkpoint")
    return {"run_dir": run_dir, "num_gpus": num_gpus}


def run_trainer(trainer: ModuleType, cfg: Any, num_gpus: int) -> dict[str, Any]:
    """One attempt: train (resuming the run if it has checkpoints), committing the outputs volume throughout.

    The last commit runs on success and on error alike; the error still propagates, so Modal retries the
    attempt and the run shows as failed once the retries are spent.
    """
    try:
        if num_gpus > 1:
            return _run_multi_gpu(trainer, cfg, num_gpus)
        return trainer.main(cfg, on_checkpoint=commit_outputs)
    finally:
        commit_outputs()


GPU_FUNCTION_OPTIONS: dict[str, Any] = {"volumes": VOLUMES, "timeout": TIMEOUT_S, "retries": RETRIES}


@app.function(gpu=DIT_GPU, **GPU_FUNCTION_OPTIONS)
def train_dit_remote(cfg: train_dit.TrainDiTConfig, num_gpus: int = 1) -> dict[str, Any]:
    return run_trainer(train_dit, cfg, num_gpus)


@app.function(gpu=CLASSIFIER_GPU, **GPU_FUNCTION_OPTIONS)
def train_classifier_remote(cfg: train.TrainConfig, num_gpus: int = 1) -> dict[str, Any]:
    return run_trainer(train, cfg, num_gpus)


@app.function(volumes=VOLUMES, timeout=2 * 60 * 60, retries=RETRIES)
def prepare_data_remote() -> dict[str, dict[str, int]]:
    """Download Oxford-IIIT Pet on Modal and write the ImageFolder data sets onto the data volume."""
    cfg = prepare_data_script.Config(root=str(DATA_ROOT / OXFORD_DIR), out_dir=str(DATA_ROOT))
    try:
        counts = prepare_data_script.main(cfg)
    finally:
        data_volume.commit()
    return {name: dict(counter) for name, counter in counts.items()}


# ---------------------------------------------------------------------------------------------------------
# Local entrypoints (`modal run modal_app.py::NAME --help` lists the options)
# ---------------------------------------------------------------------------------------------------------
def _train(function: modal.Function, default_gpu: str, gpu: str, cfg: Any) -> None:
    print(f"run {cfg.run_name} on {gpu}: outputs in volume {outputs_volume.name} under "
          f"{CHECKPOINTS_DIR}/{cfg.run_name}/ — the same command with --run-name {cfg.run_name} continues it")
    remote = function if gpu == default_gpu else function.with_options(gpu=gpu)
    summary = remote.remote(cfg, gpu_count(gpu))
    print(f"done: {summary.get('run_dir')}\n"
          f"fetch it with: modal run modal_app.py::download --run {cfg.run_name}")


def _default(config_cls: type, name: str) -> Any:
    """A trainer flag's default, so each entrypoint option starts where the script's own flag does."""
    return next(field.default for field in dataclasses.fields(config_cls) if field.name == name)


_DIT, _CLS = train_dit.TrainDiTConfig, train.TrainConfig
# Literal annotations become choices in `--help`, taken from the scripts' own registries.
DIT_MODELS = tuple(DIT_SIZES)


@app.local_entrypoint()
def dit(steps: int = _default(_DIT, "steps"), batch_size: int = _default(_DIT, "batch_size"),
        gradient_accumulation_steps: int = _default(_DIT, "gradient_accumulation_steps"),
        augmentation_level: Literal[AUGMENTATION_LEVELS] = _default(_DIT, "augmentation_level"),
        lr: float = _default(_DIT, "lr"), model: Literal[DIT_MODELS] = _default(_DIT, "model"),
        image_size: int = _default(_DIT, "image_size"), gpu: str = DIT_GPU, data: str = "cats",
        run_name: str = "", extra_args: str = "") -> None:
    """TinyDiT on a Modal GPU; flags as scripts/train_dit.py, others in --extra-args "--ema-decay 0.999"."""
    with exit_on_user_error():
        cfg = prepare_run(train_dit, _DIT, "dit", gpu=gpu, data=data, run_name=run_name,
                          extra_args=extra_args, steps=steps, batch_size=batch_size, lr=lr, model=model,
                          image_size=image_size, gradient_accumulation_steps=gradient_accumulation_steps,
                          augmentation_level=augmentation_level)
        _train(train_dit_remote, DIT_GPU, gpu, cfg)


@app.local_entrypoint()
def classifier(epochs: int = _default(_CLS, "epochs"), batch_size: int = _default(_CLS, "batch_size"),
               lr: float = _default(_CLS, "lr"), backbone: Literal[BACKBONES] = _default(_CLS, "backbone"),
               image_size: int = _default(_CLS, "image_size"),
               augmentation_level: Literal[AUGMENTATION_LEVELS] = _default(_CLS, "augmentation_level"),
               gpu: str = CLASSIFIER_GPU, data: str = "cats", run_name: str = "",
               extra_args: str = "") -> None:
    """The classifier on a Modal GPU; flags as scripts/train.py, others in --extra-args."""
    with exit_on_user_error():
        cfg = prepare_run(train, _CLS, "classifier", gpu=gpu, data=data, run_name=run_name,
                          extra_args=extra_args, epochs=epochs, batch_size=batch_size, lr=lr,
                          backbone=backbone, image_size=image_size, augmentation_level=augmentation_level,
                          output=str(OUTPUT_ROOT / CHECKPOINTS_DIR / "cats_model.safetensors"))
        _train(train_classifier_remote, CLASSIFIER_GPU, gpu, cfg)


@app.local_entrypoint()
def prepare_data() -> None:
    """Download Oxford-IIIT Pet on Modal into the data volume (`cats` = 12 breeds, `cat-vs-other`)."""
    with exit_on_user_error():
        require_modal_auth()
        for name, counts in prepare_data_remote.remote().items():
            print(f"{name}: {sum(counts.values())} images in {len(counts)} classes")


@app.local_entrypoint()
def upload_data(local_dir: str = "data/cats", name: str = "") -> None:
    """Upload a local ImageFolder (<class>/<images>) to the data volume as /<name> (default: folder name)."""
    with exit_on_user_error():
        require_modal_auth()
        source = Path(local_dir)
        if not source.is_dir() or not any(p.is_dir() for p in source.iterdir()):
            raise UserError(f"{source} is not a folder of class subfolders — make one with `make data` or "
                            "`python scripts/prepare_data.py`")
        target = name or source.resolve().name
        with data_volume.batch_upload(force=True) as batch:
            batch.put_directory(str(source), f"/{target}")
        print(f"uploaded {source} to volume {data_volume.name} as /{target}: train with --data {target}")


def run_files(run: str, include_state: bool) -> list[str]:
    """The files of checkpoints/<run>/ on the outputs volume (the state/ folders only if asked)."""
    try:
        entries = outputs_volume.listdir(f"{CHECKPOINTS_DIR}/{run}", recursive=True)
    except NotFoundError:
        entries = []
    files = [entry.path for entry in entries if entry.type == modal.volume.FileEntryType.FILE]
    if not files:
        raise UserError(f"no run {run!r} in volume {outputs_volume.name} — list the runs with "
                        f"`modal volume ls {outputs_volume.name} {CHECKPOINTS_DIR}`")
    return [path for path in files if include_state or "/state/" not in path]


def _download_file(remote_path: str, local_path: Path) -> None:
    local_path.parent.mkdir(parents=True, exist_ok=True)
    partial = local_path.with_name(local_path.name + ".part")  # an interrupted download never looks complete
    with open(partial, "wb") as handle:
        for chunk in outputs_volume.read_file(remote_path):
            handle.write(chunk)
    os.replace(partial, local_path)


@app.local_entrypoint()
def download(run: str, local_dir: str = "checkpoints", include_state: bool = False) -> None:
    """Copy a run (weights, samples, logs; --include-state adds the resumable state) to LOCAL_DIR/<run>/."""
    with exit_on_user_error():
        require_modal_auth()
        for remote_path in run_files(run, include_state):
            local_path = Path(local_dir) / PurePosixPath(remote_path).relative_to(CHECKPOINTS_DIR)
            _download_file(remote_path, local_path)
            print(local_path)


# `modal run` creates the app on Modal's servers before an entrypoint's body runs, so the credentials check
# has to happen while the CLI imports this file; `--help` stays available without an account.
if modal.is_local() and _started_by_modal_cli() and not {"--help", "-h"} & set(sys.argv):
    with exit_on_user_error():
        require_modal_auth()
