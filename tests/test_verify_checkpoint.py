"""verify_checkpoint: good DiT/classifier files pass; every kind of broken or unsafe file fails with a reason.

The models come from tests/builders.py: small ones that look trained, without running a trainer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.classifier import build_classifier
from models.tiny_dit import build_dit
from scripts.lib.cli import EXIT_USER_ERROR, UserError, parse_config, run_main
from scripts.verify_checkpoint import VerifyConfig, checked_classes, format_report, main, verify
from builders import (
    CLASSIFIER_BACKBONE,
    CLASS_NAMES,
    DIT_NAME,
    DIT_SIZE,
    look_trained,
    save_classifier,
    save_dit,
    trained_classifier,
    trained_dit,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def failed_checks(path: Path) -> dict[str, str]:
    """Verify `path`, which must fail; {failed check name: detail}."""
    report = verify(VerifyConfig(checkpoint=str(path), device="cpu"))
    assert not report.passed
    return {check.name: check.detail for check in report.checks if not check.passed}


@pytest.fixture(scope="module")
def dit_path(tmp_path_factory) -> Path:
    return save_dit(tmp_path_factory.mktemp("dit") / "tinydit_final.safetensors")


def test_trained_dit_passes_every_check_and_writes_a_sample_grid(dit_path, capsys):
    report = main(VerifyConfig(checkpoint=str(dit_path), device="cpu", sample_steps=2))
    names = [check.name for check in report.checks]
    assert names == [
        "load",
        "metadata",
        "keys",
        "shapes",
        "dtypes",
        "finite",
        "parameters",
        "trained",
        "forward",
        "sample",
    ]
    assert report.passed and report.kind == "dit" and report.classes == CLASS_NAMES
    assert report.parameters == sum(p.numel() for p in trained_dit().parameters())
    sample = dit_path.with_name("tinydit_final_verify.png")
    assert report.sample == str(sample) and sample.stat().st_size > 0
    assert "euler 2 steps, cfg 2 ->" in report.checks[-1].detail  # the guidance the DiT was trained with
    captured = capsys.readouterr()
    assert "PASSED (10/10 checks passed)" in captured.out and "step 100" in captured.out
    assert "tabby, black, ginger" in captured.out and re.search(r"sample check: +\d+%.*<", captured.err)
    assert parse_config(VerifyConfig, ["--cpu-threads", "2"], "").cpu_threads == 2


def test_json_report_parses(dit_path, tmp_path, capsys):
    main(
        VerifyConfig(
            checkpoint=str(dit_path), json=True, device="cpu", sample_steps=1, sample_out=str(tmp_path / "s.png")
        )
    )
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True and report["kind"] == "dit" and report["sample"] == str(tmp_path / "s.png")
    assert {check["name"] for check in report["checks"]} >= {"keys", "finite", "trained", "sample"}


def test_trained_classifier_passes_and_pt_files_load_without_pickle(tmp_path):
    model = trained_classifier()
    for path in (tmp_path / "cats.safetensors", tmp_path / "cats.pt"):
        report = main(VerifyConfig(checkpoint=str(save_classifier(path, model)), device="cpu"))
        assert report.passed and report.kind == "classifier" and report.sample is None
        assert [c.name for c in report.checks][-2:] == ["trained", "forward"]


def test_untrained_dit_fails_the_trained_check(tmp_path):
    path = save_dit(tmp_path / "fresh.safetensors", build_dit(DIT_NAME, DIT_SIZE, len(CLASS_NAMES)), step=0)
    failed = failed_checks(path)
    assert set(failed) == {"trained"}
    assert "step 0" in failed["trained"] and "adaLN_modulation.weight" in failed["trained"]


def test_classifier_before_its_first_step_fails_the_trained_check(tmp_path):
    fresh = build_classifier(CLASSIFIER_BACKBONE, len(CLASS_NAMES))
    failed = failed_checks(save_classifier(tmp_path / "fresh.safetensors", fresh, epoch=0))
    assert set(failed) == {"trained"} and "running_mean" in failed["trained"]


def damaged(path: Path, damage) -> Path:
    """`path` saved again with `damage(tensors)` and its header kept: a file no trainer writes (they refuse NaN)."""
    with safe_open(str(path), framework="pt") as weights:
        header = weights.metadata()
    save_file(damage(load_file(str(path))), str(path), metadata=header)
    return path


def with_nan(state: dict) -> dict:
    state["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    return state


def with_int(state: dict) -> dict:
    state["blocks.1.mlp.fc1.weight"] = state["blocks.1.mlp.fc1.weight"].long()
    return state


def without(state: dict) -> dict:
    del state["final_layer.linear.weight"]
    return state


@pytest.mark.parametrize(
    ("damage", "metadata", "failed", "named"),
    [
        (with_nan, {}, ("finite",), "blocks.1.mlp.fc1.weight"),
        (with_int, {}, ("dtypes",), "blocks.1.mlp.fc1.weight torch.int64"),
        (without, {}, ("keys", "parameters"), "missing final_layer.linear.weight"),
        (dict, {"class_names": [*CLASS_NAMES, "siamese"]}, ("shapes", "parameters"), "y_embedder.embedding_table"),
    ],
    ids=["nan", "int", "missing", "shape"],
)
def test_damaged_tensors_fail_their_check_with_the_tensor_named(tmp_path, damage, metadata, failed, named):
    found = failed_checks(damaged(save_dit(tmp_path / "bad.safetensors", **metadata), damage))
    assert set(found) == set(failed) and named in found[failed[0]]


def truncated(path: Path) -> Path:
    data = save_dit(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def without_metadata(path: Path) -> Path:
    save_file(trained_dit().state_dict(), str(path))
    return path


def garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    return path


def pt_without_sidecar(path: Path) -> Path:
    torch.save(trained_dit().state_dict(), path)
    return path


@pytest.mark.parametrize(
    "make_file, name, reason",
    [
        (lambda tmp: tmp / "nowhere.safetensors", "nowhere.safetensors", "checkpoint not found"),
        (lambda tmp: truncated(tmp / "cut.safetensors"), "cut.safetensors", "truncated or corrupt"),
        (lambda tmp: garbage(tmp / "junk.safetensors"), "junk.safetensors", "truncated or corrupt"),
        (lambda tmp: garbage(tmp / "weights.ckpt"), "weights.ckpt", "unknown checkpoint format"),
        (lambda tmp: without_metadata(tmp / "bare.safetensors"), "bare.safetensors", "no tiny-cats metadata"),
        (lambda tmp: pt_without_sidecar(tmp / "bare.pt"), "bare.pt", "metadata file bare.pt.json is missing"),
    ],
    ids=["missing", "truncated", "garbage", "wrong-format", "no-metadata", "pt-no-metadata"],
)
def test_unloadable_files_fail_with_a_clear_reason(tmp_path, make_file, name, reason):
    failed = failed_checks(make_file(tmp_path))
    assert list(failed) == ["load"]
    assert name in failed["load"] and reason in failed["load"]


def test_main_raises_a_user_error_naming_the_failure(tmp_path, capsys):
    with pytest.raises(UserError, match="failed verification — load: checkpoint not found"):
        main(VerifyConfig(checkpoint=str(tmp_path / "nowhere.safetensors")))
    assert "FAIL  load" in capsys.readouterr().out


class CreatesFileWhenUnpickled:
    """A pickle payload that, if ever unpickled, creates `target`: the code path verify must never take."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_malicious_pickle_is_refused_and_never_run(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": CreatesFileWhenUnpickled(target)}, path)
    save_dit(tmp_path / "evil_twin.pt")  # a valid sidecar for the evil file, so only the pickle can stop it
    (tmp_path / "evil_twin.pt.json").rename(tmp_path / "evil.pt.json")
    failed = failed_checks(path)
    assert "refused" in failed["load"]
    assert not target.exists()


def test_command_line_exits_2_and_still_prints_a_json_report(tmp_path):
    path = damaged(
        save_dit(tmp_path / "inf.safetensors"),
        lambda state: {**state, "final_layer.linear.bias": state["final_layer.linear.bias"] + float("inf")},
    )
    result = subprocess.run(
        [sys.executable, "scripts/verify_checkpoint.py", "--checkpoint", str(path), "--json", "--device", "cpu"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["passed"] is False
    assert [c["name"] for c in report["checks"] if not c["passed"]] == ["finite"]
    assert "failed verification" in result.stderr and "final_layer.linear.bias" in result.stderr


def test_a_dit_with_many_classes_is_checked_on_a_spread_of_them(tmp_path):
    names = [f"breed_{i:02d}" for i in range(40)]
    model = look_trained(build_dit(DIT_NAME, DIT_SIZE, len(names)))
    path = save_dit(tmp_path / "many.safetensors", model, class_names=names)
    report = main(VerifyConfig(checkpoint=str(path), device="cpu", sample_steps=1))
    assert report.passed and checked_classes(40) == [round(i * 39 / 15) for i in range(16)]
    width, height = Image.open(report.sample).size
    assert height > width * 3  # 16 rows of 4 samples, not 40
    assert "breed_19 (+20 more)" in format_report(report)


def test_an_unwritable_sample_out_is_a_failed_check_in_one_line(dit_path, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    argv = ["--checkpoint", str(dit_path), "--device", "cpu", "--sample-steps", "1"]
    with pytest.raises(SystemExit) as exited:
        run_main(main, VerifyConfig, "", [*argv, "--sample-out", str(tmp_path / "notes.txt" / "s.png")])
    assert exited.value.code == EXIT_USER_ERROR
    error = capsys.readouterr().err.split("\r")[-1].strip()
    assert "\n" not in error and re.match(r"error: .* failed verification — sample: could not write the check", error)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--sample-steps", "0"), "--sample-steps must be positive"),
        (("--cfg-scale", "-1"), "--cfg-scale must be >= 0"),
        (("--sample-out", "grid.txt"), "--sample-out must end in .png, .jpg, .jpeg, .webp"),
        (("--sample-out", "{tmp}"), "is a folder — pass e.g. "),
    ],
)
def test_bad_flags_are_refused_before_any_check(dit_path, tmp_path, args, message):
    cfg = parse_config(VerifyConfig, ["--checkpoint", str(dit_path), *(a.format(tmp=tmp_path) for a in args)], "")
    with pytest.raises(UserError, match=message):
        verify(cfg)


def test_a_folder_where_the_default_sample_goes_is_refused_before_any_check(tmp_path):
    dit = save_dit(tmp_path / "tinydit_final.safetensors")
    (tmp_path / "tinydit_final_verify.png").mkdir()  # not verify.png in the working folder: the real default
    with pytest.raises(UserError, match="tinydit_final_verify.png is a folder — pass e.g. "):
        verify(parse_config(VerifyConfig, ["--checkpoint", str(dit)], ""))
