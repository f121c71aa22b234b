"""Every command in the README parses: scripts' flags, make targets, Modal entrypoints.

A README command that does not work is a bug. The commands that train run for real in `make local-smoke`
(test_local_smoke_runs_the_whole_chain) and in the trainers' own tests; here each line of every ```bash
block is checked against the real parser that would read it, so a renamed flag fails a test.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.lib.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Commands of other tools the README shows for the reader to run by hand (they need a login or a cluster).
EXTERNAL = ("modal token", "modal volume", "modal shell", "modal profile", "pip ", "srun")


def readme_commands() -> list[str]:
    """Each shell command of the README's ```bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.extend(part.strip() for part in command.split("&&"))
    return commands


def script_config(module_name: str) -> type:
    """The dataclass config a script parses its command line into (one per script)."""
    module = importlib.import_module(module_name)
    configs = [
        value
        for value in vars(module).values()
        if dataclasses.is_dataclass(value)
        and isinstance(value, type)
        and value.__module__ == module.__name__
        and value.__name__.endswith("Config")
    ]
    assert len(configs) == 1, f"{module_name} should define exactly one *Config dataclass, found {configs}"
    return configs[0]


def check_script_command(words: list[str]) -> None:
    script_index = next(i for i, word in enumerate(words) if word.startswith("scripts/") and word.endswith(".py"))
    script = ROOT / words[script_index]
    assert script.is_file(), f"{words[script_index]} does not exist"
    parser = build_parser(script_config(f"scripts.{script.stem}"), "")
    try:
        parser.parse_args(words[script_index + 1 :])
    except SystemExit as error:  # argparse's way of saying the flags are wrong
        raise AssertionError(f"flags do not parse: {shlex.join(words)}") from error


def check_make_command(words: list[str]) -> None:
    result = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{shlex.join(words)}: {result.stderr}"


def check_modal_command(words: list[str]) -> None:
    import click
    import modal
    from modal.cli.run import _get_click_command_for_local_entrypoint

    import modal_app

    target = next(word for word in words if word.startswith("modal_app.py::"))
    name = target.split("::", 1)[1]
    entrypoint = getattr(modal_app, name, None)
    assert isinstance(entrypoint, modal.app.LocalEntrypoint), f"modal_app.py has no local entrypoint {name!r}"
    command = _get_click_command_for_local_entrypoint(modal_app.app, entrypoint)
    try:
        command.make_context(name, words[words.index(target) + 1 :])  # UsageError/BadParameter on a wrong flag
    except click.exceptions.Exit as exit_info:  # --help prints and exits
        assert exit_info.exit_code == 0


def check(command: str) -> None:
    words = shlex.split(command)
    if words[0] == "make":
        check_make_command(words)
    elif words[:2] == ["modal", "run"]:
        check_modal_command(words)
    elif words[:2] == ["python", "modal_app.py"]:
        import modal_app

        try:
            modal_app.cli_parser().parse_args(words[2:])
        except SystemExit as error:
            raise AssertionError(f"flags do not parse: {shlex.join(words)}") from error
    elif any(word.startswith("scripts/") for word in words):
        assert words[0] in ("python", "accelerate", "torchrun"), f"unexpected launcher in: {command}"
        check_script_command(words)
    else:
        raise AssertionError(f"the README test does not know how to check: {command}")


COMMANDS = [command for command in readme_commands() if not command.startswith(EXTERNAL)]


def test_the_readme_has_commands_of_every_kind():
    kinds = {shlex.split(command)[0] for command in COMMANDS}
    assert {"make", "python", "accelerate", "torchrun", "modal"} <= kinds


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-readme-test")  # modal_app checks auth at import for `modal run`
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-readme-test")
    check(command)


def test_a_wrong_flag_is_caught():
    with pytest.raises(AssertionError, match="do not parse"):
        check("python scripts/train_dit.py data/cats --stepz 100")
    with pytest.raises(AssertionError, match="train-ditt"):
        check("make train-ditt")


@pytest.mark.slow
def test_local_smoke_runs_the_whole_chain(tmp_path):
    """`make local-smoke` end to end (into a temp folder, so a developer's checkpoints/ is left alone)."""
    ckpt, data = tmp_path / "checkpoints", tmp_path / "toy-smoke"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        ["make", "--no-print-directory", "local-smoke", f"CKPT={ckpt}", f"SMOKE_DATA={data}", f"PY={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in (
        "cats_model.safetensors",
        "smoke-dit/tinydit_final.safetensors",
        "tinydit.onnx",
        "tinydit.json",
        "cats_model.onnx",
        "tinydit_onnx_grid.png",
        "smoke-dit/sample_grid.png",
    ):
        assert (ckpt / name).is_file(), f"local-smoke did not write {name}"
    assert "local-smoke finished" in result.stdout
    assert "parity OK" in result.stdout and "PASSED" in result.stdout
