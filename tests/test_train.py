"""scripts/train.py: flags, a real 1-epoch CPU run, its checkpoint, exact resume, the errors users meet."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from scripts import predict
from scripts.lib.checkpoints import list_complete_states
from scripts.lib.checkpoints import load_weights
from scripts.lib.cli import UserError, parse_config
from scripts.lib.data import scan_image_folder
from scripts.make_toy_cats import generate_toy_cats
from scripts.lib.checkpoints import load_classifier
from scripts.train import format_confusion_matrix
from scripts.lib.run import learning_rate
from scripts.train import TrainConfig, main, validate_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def config(data_dir: Path, out: Path, *extra: str) -> TrainConfig:
    """A small from-scratch CPU run writing into `out`."""
    return parse_config(
        TrainConfig,
        [
            str(data_dir),
            "--no-pretrained",
            "--device",
            "cpu",
            # fp32 on every CPU (auto picks bf16 where the CPU has it), so predict.py's fp32 figures match.
            "--mixed-precision",
            "no",
            "--image-size",
            "32",
            "--lr",
            "1e-3",
            "--output-dir",
            str(out),
            *extra,
        ],
        "test",
    )


@pytest.fixture(scope="module")
def toy_cats(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("toy") / "cats"
    generate_toy_cats(data_dir, per_class=16, size=32, seed=0)
    return data_dir


@pytest.fixture(scope="module")
def one_epoch(toy_cats, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run")
    cfg = config(
        toy_cats,
        out,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--run-name",
        "smoke",
        "--output",
        str(out / "cats_model.safetensors"),
    )
    return main(cfg)


def test_cli_defaults_are_the_agreed_ones():
    cfg = parse_config(TrainConfig, ["data/cats"], "test")
    assert (cfg.data_dir, cfg.epochs, cfg.batch_size, cfg.lr, cfg.backbone) == (
        "data/cats",
        10,
        32,
        1e-4,
        "resnet18",
    )
    assert cfg.no_pretrained is False
    assert cfg.output == "checkpoints/cats_model.safetensors"
    assert (cfg.val_split, cfg.augmentation_level, cfg.device, cfg.resume) == (0.2, "medium", "auto", "auto")
    assert parse_config(TrainConfig, ["d", "--no-pretrained"], "test").no_pretrained is True


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs must be positive"),
        (["--batch-size", "-1"], "--batch-size must be positive"),
        (["--lr", "0"], "--lr must be positive"),
        (["--val-split", "1"], "--val-split must be in [0, 1)"),
        (["--image-size", "8"], "--image-size must be from 16"),
        (["--output", "model.bin"], "must end in .safetensors or .pt"),
    ],
)
def test_bad_flags_are_refused_before_any_work(flags, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        validate_config(parse_config(TrainConfig, ["data", *flags], "test"))


def test_global_batch_must_split_over_the_processes():
    cfg = parse_config(TrainConfig, ["data", "--batch-size", "32"], "test")
    validate_config(cfg, num_processes=4)
    with pytest.raises(UserError, match="does not split evenly over 3 processes"):
        validate_config(cfg, num_processes=3)
    with pytest.raises(UserError, match="DATA_DIR is required"):
        validate_config(TrainConfig())


def test_learning_rate_warms_up_then_decays_to_zero():
    rates = [learning_rate(step, 1e-3, 10, "cosine", 100) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert rates[-1] < 1e-6
    assert learning_rate(0, 1e-3, 0, "cosine", 10) == pytest.approx(1e-3)


def test_confusion_matrix_text_shows_counts_and_per_class_accuracy():
    text = format_confusion_matrix(torch.tensor([[3, 1], [0, 4]]).numpy(), ["black", "white"])
    lines = text.splitlines()
    assert lines[1].split() == ["0", "black", "3", "1", "75.0%"]
    assert lines[2].split() == ["1", "white", "0", "4", "100.0%"]


def test_one_epoch_run_writes_a_checkpoint_that_rebuilds_the_model(one_epoch, toy_cats):
    model, metadata = load_classifier(one_epoch["final"])  # strict: every tensor matches the rebuilt model
    assert metadata["backbone"] == "resnet18" and metadata["image_size"] == 32
    assert metadata["class_names"] == scan_image_folder(toy_cats).class_names == one_epoch["class_names"]
    assert metadata["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert metadata["epoch"] == 1 and metadata["config"]["epochs"] == 1
    assert 0 <= metadata["metrics"]["val_acc"] <= 1 and metadata["metrics"]["train_loss"] > 0
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 6)
    assert load_classifier(one_epoch["best"])[1]["epoch"] == 1

    run_dir = one_epoch["run_dir"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(records[0])
    log = (run_dir / "training.log").read_text()
    assert "torch=" in log and "epoch 1/1 | train loss" in log and "confusion matrix" in log
    assert json.loads((run_dir / "config.json").read_text())["run_name"] == "smoke"
    assert len(list_complete_states(run_dir / "state")) == 1


def test_confusion_matrix_matches_the_validation_predictions(one_epoch):
    predictions = one_epoch["val_predictions"]
    confusion = torch.tensor(one_epoch["confusion_matrix"])
    assert confusion.shape == (6, 6) and confusion.sum() == len(predictions) == 18  # 3 of 16 per class held out
    correct = sum(p["prediction"] == p["label"] for p in predictions)
    assert confusion.diagonal().sum() == correct
    assert one_epoch["metrics"]["val_acc"] == pytest.approx(correct / len(predictions))


def test_predict_agrees_with_the_training_time_validation(one_epoch, toy_cats, capsys):
    files = scan_image_folder(toy_cats).files
    val = one_epoch["val_predictions"]
    cfg = predict.PredictConfig(
        images=[str(files[p["index"]][0]) for p in val],
        checkpoint=str(one_epoch["final"]),
        top_k=1,
        device="cpu",
    )
    results = predict.main(cfg)
    names = one_epoch["class_names"]
    assert [r.top[0][0] for r in results] == [names[p["prediction"]] for p in val]
    assert [r.top[0][1] for r in results] == pytest.approx([p["confidence"] for p in val], abs=1e-4)
    assert [files[p["index"]][1] for p in val] == [p["label"] for p in val]
    assert str(files[val[0]["index"]][0]) in capsys.readouterr().out


def test_resume_never_refuses_a_run_that_has_saved_epochs(one_epoch, toy_cats):
    cfg = config(toy_cats, one_epoch["run_dir"].parent, "--run-name", "smoke", "--resume", "never")
    with pytest.raises(UserError, match="already has checkpoints"):
        main(cfg)


class Killed(Exception):
    """Stands in for a kill right after a training state was written."""


@pytest.mark.slow
def test_an_interrupted_run_resumes_exactly_and_writes_pt(tmp_path):
    data_dir = tmp_path / "cats"
    generate_toy_cats(data_dir, per_class=6, size=16, seed=1)
    common = ["--epochs", "2", "--batch-size", "10", "--image-size", "16", "--backbone", "mobilenet_v3_small"]
    straight = main(
        config(
            data_dir,
            tmp_path,
            *common,
            "--run-name",
            "straight",
            "--output",
            str(tmp_path / "straight.safetensors"),
        )
    )

    def kill_after_first_epoch(folder: Path) -> None:
        raise Killed(folder)

    resumed_cfg = config(data_dir, tmp_path, *common, "--run-name", "resumed", "--output", str(tmp_path / "r.pt"))
    with pytest.raises(Killed):
        main(resumed_cfg, on_checkpoint=kill_after_first_epoch)
    assert not (tmp_path / "r.pt").exists()
    resumed = main(config(data_dir, tmp_path, *common, "--run-name", "resumed", "--output", str(tmp_path / "r.pt")))

    assert "resuming after epoch 1" in (resumed["run_dir"] / "training.log").read_text()
    plain = torch.load(tmp_path / "r.pt", map_location="cpu", weights_only=True)
    expected, _ = load_weights(straight["final"])
    assert plain.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(plain[name], tensor, msg=name)
    assert load_classifier(tmp_path / "r.pt")[1]["epoch"] == 2  # metadata from the .pt.json sidecar
    assert resumed["metrics"]["val_acc"] == pytest.approx(straight["metrics"]["val_acc"])


def test_offline_pretrained_stops_with_one_clear_message(toy_cats, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    cfg = parse_config(
        TrainConfig,
        [str(toy_cats), "--device", "cpu", "--image-size", "32", "--output-dir", str(tmp_path / "out")],
        "test",
    )
    with pytest.raises(UserError) as caught:
        main(cfg)
    message = str(caught.value)
    assert "--no-pretrained" in message and "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    run_dir = tmp_path / "out" / "classifier"
    assert f"nothing was trained: {run_dir} keeps only this start's log" in message  # the message names the folder
    # ...and a rerun does not take that folder for a run to resume: it starts fresh.
    main(dataclasses.replace(cfg, no_pretrained=True, epochs=1, output=str(tmp_path / "model.safetensors")))
    log = (run_dir / "training.log").read_text()
    assert log.count("starting fresh") == 1 and "resuming" not in log


@pytest.mark.slow
def test_missing_data_folder_exits_with_status_2_and_says_what_to_do(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "scripts" / "train.py"),
            str(tmp_path / "nope"),
            "--no-pretrained",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "make_toy_cats.py" in result.stderr
    assert "Traceback" not in result.stderr
