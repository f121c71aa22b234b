"""Exact resume of `python scripts/train_dit.py` killed for real (SIGKILL, SIGTERM), as a user would see it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from builders import make_toy_data, read_status

from scripts.lib.checkpoints import COMPLETE_MARKER, list_complete_states
from scripts.lib.checkpoints import load_weights

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STEPS = 120
SAVE_INTERVAL = 10
KEEP = 3


def trainer_command(data: Path, output_dir: Path, steps: int = STEPS, save_interval: int = SAVE_INTERVAL) -> list[str]:
    flags = f"--model T/4 --image-size 16 --steps {steps} --batch-size 4 --lr 1e-3 --warmup-steps 5 --save-interval "
    flags += f"{save_interval} --sample-interval 100000 --sample-steps 2 --log-interval 1 --keep-checkpoints {KEEP} "
    flags += "--device cpu --mixed-precision no"
    script = str(PROJECT_ROOT / "scripts" / "train_dit.py")
    return [sys.executable, script, str(data), "--output-dir", str(output_dir), *flags.split()]


def start(command: list[str]) -> subprocess.Popen:
    # One thread: bitwise reproducibility needs the same reduction order in every run, and it is faster here.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"trainer exited early:\n{process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "trainer made no progress"
        time.sleep(0.01)


def sigterm_once_shown(process: subprocess.Popen, text: str) -> tuple[str, float]:
    """SIGTERM as soon as `text` shows in the output (a grid is sized to the measured step time and may last under
    2 s, so a fixed sleep can miss it); the whole output and the seconds from the signal to the trainer's exit."""
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: process.stdout.read(1), "")), daemon=True)
    reader.start()
    wait_for(lambda: text in "".join(chunks), process)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    process.wait(timeout=120)
    reader.join(timeout=10)
    return "".join(chunks), time.monotonic() - signalled


def assert_same_files(first: Path, second: Path) -> None:
    a, b = load_weights(first)[0], load_weights(second)[0]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return make_toy_data(tmp_path_factory.mktemp("toy") / "cats")


def test_sigkill_then_rerun_gives_bitwise_the_uninterrupted_weights(toy_data, tmp_path):
    uninterrupted = start(trainer_command(toy_data, tmp_path / "straight"))
    killed_dir = tmp_path / "killed"
    state = killed_dir / "dit" / "state"
    victim = start(trainer_command(toy_data, killed_dir))
    wait_for(lambda: (state / f"step_{SAVE_INTERVAL:07d}" / COMPLETE_MARKER).is_file(), victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    newest = list_complete_states(state)[-1][0]
    assert newest < STEPS, "the kill should land mid-run"
    # What a kill during the next save leaves: its temp folder, or the renamed folder before its marker.
    next_save = newest + SAVE_INTERVAL
    partial = state / f"step_{next_save:07d}"
    partial.mkdir(exist_ok=True)
    (partial / "state.safetensors").write_bytes(b"truncated")
    (state / f".tmp-step_{next_save:07d}-999999").mkdir()

    output = finish(start(trainer_command(toy_data, killed_dir)))
    finish(uninterrupted)

    assert f"resuming from step {newest}" in output
    for name in ("tinydit_final.safetensors", "tinydit_final_raw.safetensors"):
        assert_same_files(tmp_path / "straight" / "dit" / name, killed_dir / "dit" / name)
    assert not list(state.glob(".tmp-*"))
    assert [step for step, _ in list_complete_states(state)] == [
        STEPS - 2 * SAVE_INTERVAL,
        STEPS - SAVE_INTERVAL,
        STEPS,
    ]


def test_sigterm_saves_a_checkpoint_and_exits_143(toy_data, tmp_path):
    process = start(trainer_command(toy_data, tmp_path, steps=100000, save_interval=100000))
    metrics = tmp_path / "dit" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)

    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    states = list_complete_states(tmp_path / "dit" / "state")
    assert len(states) == 1 and states[0][0] >= 2
    assert f"stopped by SIGTERM at step {states[0][0]}" in output
    assert not (tmp_path / "dit" / "tinydit_final.safetensors").exists()


def test_sigterm_during_a_sample_grid_stops_it_at_the_next_sampler_step(toy_data, tmp_path):
    # A grid after step 1 with far more sampler steps than it needs: on a CPU the trainer trims it to its budget.
    command = trainer_command(toy_data, tmp_path, steps=3, save_interval=100000)
    command[command.index("--sample-interval") + 1] = "1"
    command[command.index("--sample-steps") + 1] = "100000"
    process = start(command)
    output, seconds_to_exit = sigterm_once_shown(process, "sample grid 1")

    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert seconds_to_exit < 15  # not the minutes a whole grid at 100000 steps would take
    assert "sample grid of step 1 stopped by a signal" in output
    assert "stopped by SIGTERM at step 2" in output  # one more training step, then the save
    assert [step for step, _ in list_complete_states(tmp_path / "dit" / "state")] == [2]


def test_sigterm_during_the_last_grid_exits_143_and_the_same_command_draws_it(toy_data, tmp_path):
    command = trainer_command(toy_data, tmp_path, steps=1, save_interval=100000)
    command[command.index("--sample-steps") + 1] = "100000"
    process, run = start(command), tmp_path / "dit"
    output, _ = sigterm_once_shown(process, "sample grid 1")
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert read_status(run)["state"] == "stopped" and not (run / "tinydit_final.safetensors").exists()
    command[command.index("--sample-steps") + 1] = "2"
    finish(start(command))
    assert (run / "samples" / "step_0000001.png").is_file() and (run / "tinydit_final.safetensors").is_file()


def test_a_second_trainer_on_the_same_run_exits_2_naming_the_first(toy_data, tmp_path):
    first = start(trainer_command(toy_data, tmp_path, steps=100000, save_interval=100000))
    metrics = tmp_path / "dit" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().strip(), first)
    second = subprocess.run(
        trainer_command(toy_data, tmp_path, steps=5),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)

    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by another trainer (pid {first.pid} on " in second.stderr
    assert "Traceback" not in second.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == sorted({row["step"] for row in rows})  # one writer: no step twice
