"""The dataclass -> argparse generator and the user-error exit path."""

from __future__ import annotations

import dataclasses

import pytest

from scripts.lib.cli import EXIT_USER_ERROR, UserError, build_parser, option, parse_config, run_main


@dataclasses.dataclass
class _Config:
    data_dir: str = option(None, "data folder", positional=True)
    batch_size: int = option(32, "images per batch")
    mode: str = option("fast", "mode", choices=("fast", "slow"))
    compile: bool = option(False, "compile the model")
    fused: bool = option(True, "fused optimizer")
    classes: list[str] = option([], "class names", flag="--class")
    scale: float | None = option(None, "optional scale")


def test_defaults_and_kebab_case_flags():
    cfg = parse_config(_Config, ["data", "--batch-size", "8", "--class", "a", "b", "--compile", "--no-fused"], "")
    assert cfg == _Config(data_dir="data", batch_size=8, mode="fast", compile=True, fused=False,
                          classes=["a", "b"], scale=None)
    assert parse_config(_Config, ["data"], "").batch_size == 32


def test_positional_without_default_is_required(capsys):
    with pytest.raises(SystemExit):
        parse_config(_Config, [], "")
    assert "data_dir" in capsys.readouterr().err


def test_help_lists_defaults():
    text = build_parser(_Config, "demo").format_help()
    assert "--batch-size" in text and "(default: 32)" in text and "--class" in text


def test_bad_choice_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(_Config, ["--mode", "warp"], "")
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_user_error_becomes_one_line_and_exit_2(capsys):
    def main(cfg):
        raise UserError("the data folder is empty — add images")

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, _Config, "", ["somewhere"])
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.strip() == "error: the data folder is empty — add images"
