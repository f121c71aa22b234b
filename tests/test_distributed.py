"""Both trainers under real 2-process CPU launches (gloo): `accelerate launch --multi_gpu` and `torchrun`.

No mocks: every launch starts real processes that rendezvous and all-reduce. tests/ddp_driver.py runs the
trainers' unchanged `main` and then dumps what every rank holds, so ranks can be compared. The launches are
started together once per module (importing torch dominates their time) and the 1-process reference runs
in-process meanwhile.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file
from builders import make_toy_data

from scripts import train, train_dit
from scripts.lib.checkpoints import list_complete_states
from scripts.lib.checkpoints import load_weights
from scripts.lib.cli import parse_config
from scripts.lib.data import stratified_split
from scripts.lib.data import ImageSource, load_or_build_cache
from scripts.train import evaluate
from scripts.lib.checkpoints import load_classifier
from scripts.lib.run import make_accelerator
from scripts.lib.run import learning_rate

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DRIVER = PROJECT_ROOT / "tests" / "ddp_driver.py"
ACCELERATE_CONFIGS = PROJECT_ROOT / "configs" / "accelerate"
STEPS = 4
BATCH = 4
LR = 1e-3
WARMUP = 2
CHECKPOINT_STEP = 2
IMAGE_SIZE = 16
# Two processes each reduce half the batch, then gloo averages: the same sums in another order, so the weights
# agree with one process to fp32 rounding, not bitwise. One wrong sample would move them by ~lr.
FP32_ATOL = 1e-5
CLASSIFIER_EPOCHS = 2
LAUNCH_TIMEOUT_S = 300


_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A port that is free now and not given to another launch of this module (they start together)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port


def accelerate_launch(config_file: Path | None = None) -> list[str]:
    # --multi_gpu with Accelerator(cpu=True) in the trainers gives 2 gloo processes (--cpu would start one).
    # A config file supplies the same settings; the flags after it override its GPU count and precision.
    settings = ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *settings,
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def torchrun() -> list[str]:
    # --standalone: a local rendezvous on a port torchrun picks itself.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def dit_flags(data: Path, output_dir: Path, run_name: str, **overrides: object) -> list[str]:
    settings = {
        "model": "T/4",
        "image-size": IMAGE_SIZE,
        "steps": STEPS,
        "batch-size": BATCH,
        "lr": LR,
        "warmup-steps": WARMUP,
        "save-interval": CHECKPOINT_STEP,
        "sample-interval": 1000,
        "sample-steps": 2,
        "log-interval": 1,
        "device": "cpu",
        "mixed-precision": "no",
        "output-dir": output_dir,
        "run-name": run_name,
    }
    settings.update(overrides)
    return [str(data)] + [token for name, value in settings.items() for token in (f"--{name}", str(value))]


def classifier_flags(data: Path, output_dir: Path) -> list[str]:
    return [
        str(data),
        "--no-pretrained",
        "--backbone",
        "resnet18",
        "--epochs",
        str(CLASSIFIER_EPOCHS),
        "--batch-size",
        str(BATCH),
        "--lr",
        str(LR),
        "--image-size",
        str(IMAGE_SIZE),
        "--val-split",
        "0.25",
        "--device",
        "cpu",
        "--mixed-precision",
        "no",
        "--output-dir",
        str(output_dir),
        "--run-name",
        "classifier",
        "--output",
        str(output_dir / "cats_model.safetensors"),
    ]


@dataclass
class Launch:
    """One launched multi-process job; `finish()` waits for it once and keeps its output."""

    process: subprocess.Popen
    run_dir: Path
    dump_dir: Path
    output: str | None = None

    def finish(self) -> str:
        if self.output is None:
            self.output, _ = self.process.communicate(timeout=LAUNCH_TIMEOUT_S)
        return self.output

    def succeeded(self) -> Launch:
        output = self.finish()
        assert self.process.returncode == 0, output[-12000:]
        return self

    def rank(self, rank: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.dump_dir / f"rank{rank}.safetensors"))

    def local_losses(self, rank: int) -> list[float]:
        return json.loads((self.dump_dir / f"rank{rank}.json").read_text())["local_losses"]

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]


def start(launcher: list[str], script: Path, args: list[str], out: Path, run_name: str) -> Launch:
    """Launch `script` (the driver dumps into out/dump-<run_name>); the run's files land in out/<run_name>."""
    dump_dir = out / f"dump-{run_name}"
    command = [*launcher, str(script)] + ([str(dump_dir)] if script == DRIVER else []) + args
    # One thread per process: two processes share two cores, and fixed reduction orders keep ranks bitwise equal.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return Launch(process, out / run_name, dump_dir)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    data = make_toy_data(tmp_path_factory.mktemp("toy") / "cats")
    load_or_build_cache(data, IMAGE_SIZE, show_progress=False)  # built once, so concurrent launches only read it
    return data


@pytest.fixture(scope="module")
def launches(toy_data, tmp_path_factory):
    """All 2-process jobs of this module, started at once."""
    out = tmp_path_factory.mktemp("launches")
    eight_gpu_config = ACCELERATE_CONFIGS / "multi_gpu_8.yaml"  # the shipped file, cut down to 2 processes
    # Batch 2 x 2 accumulation steps: the same 4 samples per optimizer step as the reference, through no_sync.
    accumulation = dit_flags(
        toy_data, out, "accumulation", **{"batch-size": BATCH // 2, "gradient-accumulation-steps": 2}
    )
    jobs = {
        "dit": start(
            accelerate_launch(eight_gpu_config), DRIVER, ["dit", *dit_flags(toy_data, out, "dit")], out, "dit"
        ),
        "accumulation": start(torchrun(), DRIVER, ["dit", *accumulation], out, "accumulation"),
        "uneven": start(
            accelerate_launch(),
            PROJECT_ROOT / "scripts" / "train_dit.py",
            dit_flags(toy_data, out, "uneven", **{"batch-size": 5}),
            out,
            "uneven",
        ),
        "classifier": start(torchrun(), DRIVER, ["classifier", *classifier_flags(toy_data, out)], out, "classifier"),
    }
    yield jobs
    for job in jobs.values():
        if job.process.poll() is None:
            job.process.kill()
            job.process.communicate()


@pytest.fixture(scope="module")
def reference(launches, toy_data, tmp_path_factory) -> dict:
    """The same DiT run on 1 process, in this process (the launches run meanwhile)."""
    out = tmp_path_factory.mktemp("reference")
    cfg = parse_config(train_dit.TrainDiTConfig, dit_flags(toy_data, out, "reference"), "")
    summary = train_dit.main(cfg)
    return {
        "raw": load_weights(summary["final_raw"])[0],
        "ema": load_weights(summary["final"])[0],
        "metrics": [json.loads(line) for line in (summary["run_dir"] / "metrics.jsonl").read_text().splitlines()],
    }


def split_ema(dump: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    raw = {name: value for name, value in dump.items() if not name.startswith("ema.")}
    ema = {name.removeprefix("ema."): value for name, value in dump.items() if name.startswith("ema.")}
    return raw, ema


def assert_bitwise_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys() and first
    differing = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differing, f"ranks differ in {differing[:5]} ({len(differing)} tensors)"


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys() and actual
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=FP32_ATOL, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------
# DiT
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("job", ["dit", "accumulation"])
def test_dit_weights_and_ema_are_bitwise_equal_on_every_rank(launches, job):
    launch = launches[job].succeeded()
    rank0, rank1 = launch.rank(0), launch.rank(1)
    assert any(name.startswith("ema.") for name in rank0)
    assert_bitwise_equal(rank0, rank1)
    saved_raw = load_weights(launch.run_dir / train_dit.FINAL_RAW_NAME)[0]
    assert_bitwise_equal(split_ema(rank0)[0], saved_raw)  # the main process saved what every rank holds


@pytest.mark.parametrize("job", ["dit", "accumulation"])
def test_dit_on_two_processes_reaches_the_one_process_weights(launches, reference, job):
    raw, ema = split_ema(launches[job].succeeded().rank(1))
    assert_close(raw, reference["raw"])
    assert_close(ema, reference["ema"])


def test_logged_loss_is_the_mean_of_the_ranks_losses(launches, reference):
    launch = launches["dit"].succeeded()
    rank0, rank1 = launch.local_losses(0), launch.local_losses(1)
    assert len(rank0) == len(rank1) == STEPS
    assert rank0 != rank1  # each rank saw its own half of the batch
    logged = [record["loss"] for record in launch.metrics()]
    np.testing.assert_allclose(logged, (np.array(rank0) + np.array(rank1)) / 2, rtol=1e-6)
    np.testing.assert_allclose(logged, [record["loss"] for record in reference["metrics"]], rtol=1e-5)


@pytest.mark.parametrize("job", ["dit", "accumulation"])
def test_step_counter_and_lr_advance_once_per_optimizer_step(launches, reference, job):
    metrics = launches[job].succeeded().metrics()
    expected_lr = [learning_rate(step, LR, WARMUP) for step in range(STEPS)]
    assert [record["step"] for record in metrics] == list(range(1, STEPS + 1))
    assert [record["lr"] for record in metrics] == expected_lr == [record["lr"] for record in reference["metrics"]]
    assert [record["ema_decay"] for record in metrics] == [record["ema_decay"] for record in reference["metrics"]]


def test_only_the_main_process_writes_the_run_files(launches):
    launch = launches["dit"].succeeded()
    log = (launch.run_dir / "training.log").read_text()
    assert log.count("processes=2") == 1 and log.count(" INFO config {") == 1
    for step in range(1, STEPS + 1):
        assert log.count(f"step {step}/{STEPS} loss") == 1
    assert len(launch.metrics()) == STEPS
    assert [step for step, _ in list_complete_states(launch.run_dir / "state")] == [CHECKPOINT_STEP, STEPS]
    assert [path.name for path in (launch.run_dir / "samples").iterdir()] == [f"step_{STEPS:07d}.png"]


def test_a_two_process_checkpoint_resumes_on_one_process(launches, reference, toy_data, tmp_path):
    state = launches["dit"].succeeded().run_dir / "state" / f"step_{CHECKPOINT_STEP:07d}"
    cfg = parse_config(train_dit.TrainDiTConfig, dit_flags(toy_data, tmp_path, "resumed", resume=state), "")
    summary = train_dit.main(cfg)
    assert summary["step"] == STEPS
    assert_close(load_weights(summary["final_raw"])[0], reference["raw"])
    assert_close(load_weights(summary["final"])[0], reference["ema"])
    resumed = [json.loads(line) for line in (summary["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in resumed] == list(range(CHECKPOINT_STEP + 1, STEPS + 1))
    np.testing.assert_allclose(
        [record["loss"] for record in resumed],
        [record["loss"] for record in reference["metrics"][CHECKPOINT_STEP:]],
        rtol=1e-5,
    )


def test_a_batch_that_does_not_split_over_the_processes_fails_clearly(launches):
    launch = launches["uneven"]
    output = launch.finish()
    assert launch.process.returncode != 0
    assert "error: --batch-size 5 does not split evenly over 2 processes; use a multiple of 2" in output
    assert not (launch.run_dir / "training.log").exists()


# ---------------------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------------------
def test_classifier_ranks_end_with_identical_weights_and_batchnorm_statistics(launches):
    launch = launches["classifier"].succeeded()
    rank0, rank1 = launch.rank(0), launch.rank(1)
    assert any(name.endswith("running_mean") for name in rank0)
    assert_bitwise_equal(rank0, rank1)


def test_classifier_writes_once_and_logs_the_lr_of_the_last_step(launches):
    launch = launches["classifier"].succeeded()
    log = (launch.run_dir / "training.log").read_text()
    assert log.count("processes=2") == 1
    for epoch in range(1, CLASSIFIER_EPOCHS + 1):
        assert log.count(f"epoch {epoch}/{CLASSIFIER_EPOCHS} |") == 1
    metrics = launch.metrics()
    assert [record["epoch"] for record in metrics] == list(range(1, CLASSIFIER_EPOCHS + 1))
    total_steps = metrics[-1]["step"]
    warmup = round(train.TrainConfig().warmup_fraction * total_steps)
    assert metrics[-1]["lr"] == learning_rate(total_steps - 1, LR, warmup, "cosine", total_steps)


def test_classifier_validation_figures_are_those_of_the_saved_model(launches, toy_data):
    """Each rank validates its share of the split; the gathered figures must be the saved model's own."""
    launch = launches["classifier"].succeeded()
    model, metadata = load_classifier(launch.run_dir.parent / "cats_model.safetensors")
    cache = load_or_build_cache(toy_data, IMAGE_SIZE, show_progress=False)
    _, val_idx = stratified_split(cache.labels, 0.25, seed=0)
    evaluation = evaluate(model, ImageSource(cache, "cpu"), val_idx, make_accelerator("cpu", "no"), show_progress=False)
    last = launch.metrics()[-1]
    assert len(evaluation.labels) == len(val_idx) > 2  # more than one rank's share
    assert evaluation.accuracy == pytest.approx(last["val_acc"])
    assert evaluation.loss == pytest.approx(last["val_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The accelerate config files of the README
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "distributed_type", "processes", "machines"),
    [("single_gpu_bf16", "NO", 1, 1), ("multi_gpu_8", "MULTI_GPU", 8, 1), ("two_nodes", "MULTI_GPU", 16, 2)],
)
def test_accelerate_config_files_load_with_the_documented_setup(name, distributed_type, processes, machines):
    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))  # unknown keys raise here
    assert (config.distributed_type, config.num_processes, config.num_machines) == (
        distributed_type,
        processes,
        machines,
    )
    assert config.mixed_precision == "bf16" and not config.use_cpu
