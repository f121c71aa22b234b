"""The dataclass -> argparse generator and the user-error exit path."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from scripts import train, train_dit
from scripts.lib.cli import (
    EXIT_USER_ERROR,
    UserError,
    build_parser,
    config_to_argv,
    option,
    parse_config,
    parse_duration,
    run_main,
)


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
    assert cfg == _Config(
        data_dir="data", batch_size=8, mode="fast", compile=True, fused=False, classes=["a", "b"], scale=None
    )
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


def test_config_to_argv_round_trips_every_field():
    dit = dataclasses.replace(
        parse_config(train_dit.TrainDiTConfig, ["/data/cats"], ""),
        compile="on",
        lr=3e-4,
        model="B/2",
        run_name="dit-x",
        resume="never",
        ema_decay=0.999,
    )
    assert parse_config(train_dit.TrainDiTConfig, config_to_argv(dit), "") == dit
    classifier = dataclasses.replace(parse_config(train.TrainConfig, ["/data/cats"], ""), epochs=3)
    flipped = {
        f.name: not getattr(classifier, f.name)
        for f in dataclasses.fields(classifier)
        if isinstance(getattr(classifier, f.name), bool)
    }
    classifier = dataclasses.replace(classifier, **flipped)  # both --x and --no-x spellings
    assert parse_config(train.TrainConfig, config_to_argv(classifier), "") == classifier


@pytest.mark.parametrize(
    "text, seconds",
    [("5400", 5400), ("2.5", 2.5), ("23h30m", 84600), ("90m", 5400), ("45s", 45), ("1h30m15s", 5415), ("2h", 7200)],
)
def test_durations_read_as_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1d", "h", "30m1h", "-5"])
def test_unreadable_durations_say_how_to_write_them(text):
    with pytest.raises(UserError, match="23h30m"):
        parse_duration(text)


def test_a_preset_file_supplies_defaults_that_the_command_line_still_overrides(tmp_path, capsys):
    preset = tmp_path / "small.json"
    preset.write_text(json.dumps({"batch_size": 8, "mode": "slow", "classes": ["a"], "scale": 0.5}))
    cfg = parse_config(_Config, ["data", "--preset", str(preset), "--mode", "fast"], "")
    assert (cfg.batch_size, cfg.mode, cfg.classes, cfg.scale) == (8, "fast", ["a"], 0.5)
    assert parse_config(_Config, ["data"], "").batch_size == 32  # no preset, no change
    assert "--preset FILE.json" in build_parser(_Config, "").format_help()
    with pytest.raises(SystemExit):  # --help shows the preset's values as the defaults
        parse_config(_Config, ["--preset", str(preset), "--help"], "")
    assert "images per batch (default: 8)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"batch_sise": 8}', "'batch_sise' is not an option"),
        ('{"batch_size": "8"}', "batch_size must be of type int"),
        ('{"batch_size": true}', "batch_size must be of type int"),
        ('{"mode": "medium"}', "mode must be one of fast, slow"),
        ('{"classes": "a"}', "classes must be a list of str"),
        ("[1, 2]", "expected a JSON object"),
        ("{not json", "not a readable JSON file"),
        ("[" * 100_000 + "]" * 100_000, "maximum recursion depth"),
        ('{"scale": NaN}', "--scale nan: not a finite number"),
        ("/dev/zero", "larger than 1024 KiB"),
    ],
)
def test_a_bad_preset_is_one_line_naming_the_option(tmp_path, capsys, content, message):
    preset = Path(content) if content == "/dev/zero" else tmp_path / "bad.json"
    if content != "/dev/zero":
        preset.write_text(content)
    with pytest.raises(SystemExit) as stop:
        run_main(lambda cfg: None, _Config, "", ["data", "--preset", str(preset)])
    assert stop.value.code == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_a_runs_config_json_is_a_preset_that_gives_back_its_config(tmp_path):
    from scripts.lib.run import config_dict

    cfg = dataclasses.replace(
        parse_config(train_dit.TrainDiTConfig, ["data/glyphs"], ""),
        lr=3e-4,
        model="T/4",
        augmentation_level="none",
        time_limit="23h30m",
    )
    preset = tmp_path / "config.json"
    preset.write_text(json.dumps(config_dict(cfg)))
    assert parse_config(train_dit.TrainDiTConfig, ["data/glyphs", "--preset", str(preset)], "") == cfg
