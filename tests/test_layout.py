"""The house rules of the layout, read from the code itself: commands in scripts/ never import each other, the
shared modules in scripts/lib/ never import a command, models/ knows nothing of scripts/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(path for path in (ROOT / "scripts").glob("*.py") if path.name != "__init__.py")
LIBRARY = sorted((ROOT / "scripts" / "lib").glob("*.py"))
MODELS = sorted((ROOT / "models").glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, as dotted names (`from scripts import train` gives scripts.train)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def command_modules() -> set[str]:
    return {f"scripts.{path.stem}" for path in COMMANDS}


def test_the_layout_has_commands_and_a_library():
    assert {"train", "train_dit", "sample", "evaluate", "benchmark"} <= {path.stem for path in COMMANDS}
    assert {"cli", "run", "checkpoints", "data", "sampling"} <= {path.stem for path in LIBRARY}


@pytest.mark.parametrize("path", COMMANDS + LIBRARY, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_command_imports_another_command(path):
    own = f"scripts.{path.stem}" if path.parent.name == "scripts" else None
    borrowed = sorted((imported_modules(path) & command_modules()) - {own})
    assert not borrowed, (
        f"{path.relative_to(ROOT)} imports the command(s) {borrowed}: move what they share to scripts/lib/"
    )


@pytest.mark.parametrize("path", MODELS, ids=lambda path: path.name)
def test_the_networks_know_nothing_of_the_scripts(path):
    assert not [name for name in imported_modules(path) if name.startswith("scripts")]


def test_the_import_check_can_fail(tmp_path):
    offender = tmp_path / "offender.py"
    offender.write_text("from scripts import train_dit\nfrom scripts.sample import main\nimport scripts.lib.cli\n")
    assert {"scripts.train_dit", "scripts.sample"} <= imported_modules(offender) & command_modules()


@pytest.mark.parametrize("command", ["make_toy_cats", "make_toy_glyphs", "prepare_data"])
def test_the_data_making_commands_start_without_torch(command):
    """They only write image files: importing torch would add seconds to each start (ten times their own)."""
    check = f"import sys, scripts.{command}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT, timeout=120).returncode == 0
