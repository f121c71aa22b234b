"""Reliability round 3 (issue 24) and the newcomer's hour (issue 23) on the trainers and loaders: one table of user
mistakes, each ending in one `error:` line and exit 2 with nothing written, then the cases that need a run first."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from builders import make_toy_data, one_error_line, save_classifier, save_dit, tiny_config
from safetensors.torch import load_file, save_file

from scripts import predict, sample, train, train_dit
from scripts.lib import checkpoints
from scripts.lib.checkpoints import list_complete_states
from scripts.lib.cli import UserError
from scripts.lib.data import scan_image_folder

TINY = "--model T/4 --image-size 16 --steps 2 --batch-size 4 --device cpu --mixed-precision no --sample-steps 2"
CLASSIFIER = "--no-pretrained --image-size 16 --batch-size 4 --epochs 1 --device cpu --backbone mobilenet_v3_small"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_data(tmp_path_factory.mktemp("toy") / "cats")


DIT_REFUSALS = [  # (id, extra flags, the words of the one line)
    ("run-name-up", "--run-name ../escaped", "--run-name '../escaped' is a path"),
    ("run-name-absolute", "--run-name /abs/x", "--run-name '/abs/x' is a path"),
    ("run-name-empty", ["--run-name", ""], "--run-name '' is not a name of 1 to 255"),
    ("cfg-scale-nan", "--cfg-scale nan", "--cfg-scale nan: not a finite number"),
    ("cfg-scale-inf", "--cfg-scale inf", "--cfg-scale inf: not a finite number"),
    ("weight-decay-nan", "--weight-decay nan", "--weight-decay nan: not a finite number"),
    ("preset-nan", "PRESET", "--cfg-scale nan: not a finite number"),
    ("batch-cannot-fit", "--batch-size 1000000000", "--batch-size 1000000000 cannot fit"),
    ("output-in-data", "--output-dir DATA/runs", "is inside the data folder"),
    ("tracker-missing", "--report-to wandb", "the wandb package is not installed"),
]


@pytest.mark.parametrize(("flags", "words"), [row[1:] for row in DIT_REFUSALS], ids=[row[0] for row in DIT_REFUSALS])
def test_the_dit_trainer_refuses_at_start_with_one_line_and_writes_nothing(toy, tmp_path, capsys, flags, words):
    preset = tmp_path / "preset.json"
    preset.write_text('{"cfg_scale": NaN}')
    if isinstance(flags, str):
        flags = flags.replace("PRESET", f"--preset {preset}").replace("DATA", str(toy)).split()
    before = sorted(toy.rglob("*"))
    argv = [str(toy), *TINY.split(), "--output-dir", str(tmp_path / "out"), *flags]
    line = one_error_line(train_dit.main, train_dit.TrainDiTConfig, argv, capsys)
    assert words in line
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escaped").exists()
    assert sorted(toy.rglob("*")) == before  # nothing in the data folder either


CLASSIFIER_REFUSALS = [
    ("run-name-up", "--run-name ../escaped", "is a path"),
    ("output-is-a-folder", "--output FOLDER", "is a folder: the weights need a file path"),
    ("weight-decay-nan", "--weight-decay nan", "--weight-decay nan: not a finite number"),
    ("tracker-missing", "--report-to wandb", "the wandb package is not installed"),
]


@pytest.mark.parametrize(
    ("flags", "words"), [r[1:] for r in CLASSIFIER_REFUSALS], ids=[r[0] for r in CLASSIFIER_REFUSALS]
)
def test_the_classifier_trainer_refuses_at_start_with_one_line(toy, tmp_path, capsys, flags, words):
    (tmp_path / "x.safetensors").mkdir()
    extra = flags.replace("FOLDER", str(tmp_path / "x.safetensors")).split()
    argv = [str(toy), *CLASSIFIER.split(), "--output-dir", str(tmp_path / "out"), *extra]
    assert words in one_error_line(train.main, train.TrainConfig, argv, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            lambda t: t.update({"x_embedder.weight": t["x_embedder.weight"] * float("nan")}),
            "x_embedder.weight holds NaN",
        ),
        (lambda t: t.update({"x_embedder.weight": t["x_embedder.weight"].fill_(float("inf"))}), "x_embedder.weight"),
        (lambda t: t.update({"x_embedder.weight": t["x_embedder.weight"].fill_(1e30)}), "x_embedder.weight"),
        (lambda t: t.update({"x_embedder.bias": t["x_embedder.bias"].long()}), "x_embedder.bias torch.int64"),
        (lambda t: t.update({"x_embedder.bias": t["x_embedder.bias"] > 0}), "x_embedder.bias torch.bool"),
    ],
    ids=["nan", "inf", "1e30", "int64", "bool"],
)
def test_sample_refuses_weights_that_are_not_finite_floats_naming_the_tensor(tmp_path, capsys, change, words):
    path = save_dit(tmp_path / "dit.safetensors")
    tensors, header = load_file(path), checkpoints.safe_open(str(path), "pt").metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=header)  # safetensors writes what save_weights would refuse
    argv = ["--checkpoint", str(path), "--out", str(tmp_path / "g.png")]
    line = one_error_line(sample.main, sample.SampleConfig, argv, capsys)
    assert words in line and not (tmp_path / "g.png").exists()


def test_predict_refuses_a_classifier_with_a_nan_tensor(toy, tmp_path, capsys):
    path = save_classifier(tmp_path / "cls.safetensors", data_dir="data")
    tensors, header = load_file(path), checkpoints.safe_open(str(path), "pt").metadata()
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name] * float("nan")
    save_file(tensors, str(path), metadata=header)
    image = scan_image_folder(toy).files[0][0]
    assert name in one_error_line(predict.main, predict.PredictConfig, [str(image), "--checkpoint", str(path)], capsys)


# ---------------------------------------------------------------------------------------------------------
# What needs a run first
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    train_dit.main(tiny_config(toy, out, steps=2, save_interval=1, run_name="done"))
    return out


def _copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "out")
    return tmp_path / "out"


def _rewrite_state(folder: Path, change) -> None:
    tensors, saved = load_file(folder / "state.safetensors"), json.loads((folder / "state.json").read_text())
    change(tensors, saved["state"])
    save_file(tensors, str(folder / "state.safetensors"))
    (folder / "state.json").write_text(json.dumps(saved))


def _set_record(name, value):
    def change(tensors, structure):
        structure["__dict__"] = [[key, value if key == name else item] for key, item in structure["__dict__"]]

    return change


def _poison_ema(tensors, structure):
    name = next(n for n in tensors if n.startswith("state.ema.model."))
    tensors[name] = tensors[name] * float("nan")


@pytest.mark.parametrize(
    ("change", "words"),
    [(_poison_ema, "tensors hold NaN/inf (e.g. state.ema.model."),
     (_set_record("architecture", 5), "record of the setup is damaged"),
     (_set_record("training_schedule", [1]), "record of the setup is damaged")],
    ids=["nan-ema", "architecture-5", "schedule-list"],
)  # fmt: skip
def test_a_damaged_newest_state_is_refused_in_one_line_and_nothing_is_written(toy, finished, tmp_path, change, words):
    out = _copy_run(finished, tmp_path)
    newest = list_complete_states(out / "done" / "state")[-1][1]
    _rewrite_state(newest, change)
    final = (out / "done" / "tinydit_final.safetensors").read_bytes()
    with pytest.raises(UserError) as refused:
        train_dit.main(tiny_config(toy, out, steps=2, save_interval=1, run_name="done"))
    message = str(refused.value)
    assert words in message and str(newest) in message and "lower --lr" not in message  # the file, not the LR
    assert (out / "done" / "tinydit_final.safetensors").read_bytes() == final


def test_files_get_the_permissions_of_the_umask(finished):
    previous = os.umask(0o022)
    os.umask(previous)
    run = finished / "done"
    for path in [
        run / "tinydit_final.safetensors",
        run / "config.json",
        *list_complete_states(run / "state")[-1][1].iterdir(),
    ]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~previous, path


def test_a_full_disk_while_copying_the_final_weights_names_the_copy(toy, tmp_path, monkeypatch):
    real_copy = shutil.copyfile

    def full(source, target, *args, **kwargs):
        if Path(source).name == "tinydit_final.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy(source, target, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full)
    copy = f"could not write the copy of .*dit/tinydit_final.safetensors to {tmp_path}/tinydit_final"
    with pytest.raises(UserError, match=copy):
        train_dit.main(tiny_config(toy, tmp_path, steps=1))
    assert (tmp_path / "dit" / "tinydit_final.safetensors").is_file()  # the run's own file was written fine


def test_cpu_threads_reach_torch_and_the_log(toy, tmp_path):
    before = torch.get_num_threads()
    try:
        train_dit.main(tiny_config(toy, tmp_path, steps=1, cpu_threads=2))
    finally:
        torch.set_num_threads(before)
    assert before != 2 and "threads=2" in (tmp_path / "dit" / "training.log").read_text()
