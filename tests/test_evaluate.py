"""evaluate.py end to end on tiny untrained checkpoints (plumbing, not quality), plus its helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.classifier import build_classifier
from models.tiny_dit import build_dit
from scripts.lib.cli import UserError
from scripts.lib.data import stratified_split
from scripts.lib.data import load_or_build_cache
from scripts.evaluate import EvaluateConfig, balanced_subset, load_real_images, main
from scripts.evaluate import inception_weights_file
from scripts.make_toy_cats import generate_toy_cats
from scripts.lib.checkpoints import classifier_metadata, dit_metadata, save_model

CLASSES = ["black", "white"]
DIT_SIZE = 16
CLASSIFIER_SIZE = 24  # differs from the DiT's on purpose: samples must be resized for the classifier


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    generate_toy_cats(root / "train", per_class=6, size=DIT_SIZE, seed=0, classes=CLASSES)
    generate_toy_cats(root / "heldout", per_class=4, size=DIT_SIZE, seed=1, classes=CLASSES)
    torch.manual_seed(0)
    dit = build_dit("T/4", DIT_SIZE, len(CLASSES))
    save_model(
        root / "dit.safetensors",
        dit,
        dit_metadata(
            {},
            model_name="T/4",
            image_size=DIT_SIZE,
            in_channels=3,
            class_names=CLASSES,
            objective_name="flow",
            objective_options={},
            step=0,
            weights="ema",
        ),
    )
    classifier = build_classifier("resnet18", len(CLASSES))
    save_model(
        root / "classifier.safetensors",
        classifier,
        classifier_metadata(
            {"val_split": 0.5, "seed": 3},
            backbone="resnet18",
            image_size=CLASSIFIER_SIZE,
            class_names=CLASSES,
            metrics={},
            epoch=0,
        ),
    )
    return root


def _config(root, **overrides) -> EvaluateConfig:
    options = dict(
        dit=str(root / "dit.safetensors"),
        classifier=str(root / "classifier.safetensors"),
        data=str(root / "train"),
        heldout_data=str(root / "heldout"),
        num_per_class=3,
        steps=2,
        out=str(root / "report.json"),
        grid=str(root / "grid.png"),
        device="cpu",
        batch_size=4,
    )
    options.update(overrides)
    return EvaluateConfig(**options)


@pytest.fixture(scope="module")
def evaluated(setup):
    """One evaluation of the untrained DiT (report at setup/report.json), without Inception weights."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(setup / "empty_torch_home"))
        return main(_config(setup))


def test_evaluate_end_to_end_writes_report_and_grid(setup, evaluated):
    report = evaluated
    written = json.loads((setup / "report.json").read_text())
    assert written["class_fidelity"]["per_class"].keys() == set(CLASSES)
    assert (setup / "grid.png").stat().st_size > 0
    fidelity = report["class_fidelity"]
    assert 0.0 <= fidelity["mean"] <= 1.0 and 0.0 <= fidelity["classifier_heldout_accuracy"] <= 1.0
    features = report["classifier_feature_fid"]
    assert "NOT Inception FID" in features["note"]
    assert features["num_samples"] == 6 and features["num_heldout"] == 8 and features["num_baseline_real"] == 6
    assert features["feature_dim"] == 512  # resnet18: the input of its last Linear
    # Even random features tell the untrained DiT's noise from cats better than cats from cats.
    assert features["fid"] > 2 * features["fid_real_vs_real_baseline"] > 0
    assert features["kid"] > features["kid_real_vs_real_baseline"]
    assert features["kid_subset_size"] == 3 and features["kid_std"] > 0  # half of the 6 samples: subsets vary
    # An untrained DiT returns its noise: far from every real image, so nowhere near copying.
    assert report["memorisation"]["pixel"]["ratio"] > 1
    assert math.isfinite(report["memorisation"]["classifier_features"]["ratio"])
    assert report["heldout"] == {
        "source": f"folder {setup / 'heldout'}",
        "count": 8,
        "clean_for_dit": True,
        "training_reference_count": 12,
    }
    assert report["inception_fid"]["available"] is False
    reason = report["inception_fid"]["reason"]  # names where the weights were looked for: $TORCH_HOME
    assert "empty_torch_home" in reason and inception_weights_file().name in reason
    assert report["sampling"]["steps"] == 2 and report["sampling"]["sampler"]


def test_without_heldout_folder_uses_the_classifiers_validation_split(setup):
    cfg = _config(setup, heldout_data="")
    real = load_real_images(cfg, DIT_SIZE, CLASSES, {"val_split": 0.5, "seed": 3})
    labels = load_or_build_cache(setup / "train", DIT_SIZE).labels
    train_idx, val_idx = stratified_split(labels, 0.5, 3)
    assert not real.clean_for_dit
    assert len(real.heldout) == len(val_idx) and len(real.train) == len(train_idx)
    np.testing.assert_array_equal(real.heldout_labels, labels[val_idx])


def test_without_any_heldout_images_is_a_user_error(setup):
    with pytest.raises(UserError, match="--heldout-data"):
        load_real_images(_config(setup, heldout_data=""), DIT_SIZE, CLASSES, {"seed": 0})


def test_class_mismatch_is_a_user_error(setup):
    with pytest.raises(UserError, match="same class"):
        load_real_images(_config(setup), DIT_SIZE, ["black", "calico"], {})


def test_missing_checkpoint_is_a_user_error(setup):
    with pytest.raises(UserError, match="does not exist"):
        main(_config(setup, dit=str(setup / "nope.safetensors")))


def test_balanced_subset_takes_up_to_n_per_class():
    labels = np.array([0, 0, 0, 1, 1, 2])
    chosen = balanced_subset(labels, per_class=2, num_classes=3, seed=0)
    assert np.bincount(labels[chosen], minlength=3).tolist() == [2, 2, 1]
    assert len(set(chosen.tolist())) == len(chosen)


def _report_copy(source, folder, **fidelity_changes):
    report = json.loads(source.read_text())
    report["class_fidelity"].update(fidelity_changes)
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    return str(folder / "report.json")


def test_summary_combines_reports_by_folder_and_judges_each_against_the_bar(setup, evaluated, tmp_path, capsys):
    good = _report_copy(setup / "report.json", tmp_path / "cats", mean=0.95, per_class={"black": 1.0, "white": 0.9})
    poor = _report_copy(setup / "report.json", tmp_path / "glyphs", mean=0.5, per_class={"black": 0.2, "white": 0.8})
    out = tmp_path / "summary.json"
    summary = main(EvaluateConfig(summarize=[good, poor], out=str(out), fidelity_bar=0.9))

    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    assert list(summary["data_sets"]) == ["cats", "glyphs"]
    cats, glyphs = summary["data_sets"]["cats"], summary["data_sets"]["glyphs"]
    assert cats["mean_class_fidelity"] == 0.95 and (cats["worst_class"], cats["worst_class_fidelity"]) == ("white", 0.9)
    assert (glyphs["worst_class"], glyphs["worst_class_fidelity"]) == ("black", 0.2)
    assert cats["feature_fid"] == evaluated["classifier_feature_fid"]["fid"]
    assert cats["memorisation_ratio"]["pixel"] == evaluated["memorisation"]["pixel"]["ratio"] > 1
    features_ratio = evaluated["memorisation"]["classifier_features"]["ratio"]
    assert cats["meets_bar"] is (features_ratio > 1)  # fidelity is enough; copying decides
    assert glyphs["meets_bar"] is False and summary["all_meet_bar"] is False
    printed = capsys.readouterr().out
    assert "glyphs" in printed and "NOT MET" in printed and "white 90%" in printed


def test_summary_errors_are_user_errors(setup, evaluated, tmp_path):
    report = str(setup / "report.json")
    with pytest.raises(UserError, match="needs --out"):
        main(EvaluateConfig(summarize=[report]))
    with pytest.raises(UserError, match="fidelity-bar"):
        main(EvaluateConfig(summarize=[report], out=str(tmp_path / "s.json"), fidelity_bar=90))
    with pytest.raises(UserError, match="no such report"):
        main(EvaluateConfig(summarize=[str(tmp_path / "missing.json")], out=str(tmp_path / "s.json")))
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UserError, match="not an evaluate.py report"):
        main(EvaluateConfig(summarize=[str(tmp_path / "other.json")], out=str(tmp_path / "s.json")))
    twin = _report_copy(setup / "report.json", tmp_path / "x" / setup.name)
    with pytest.raises(UserError, match="two reports are named"):
        main(EvaluateConfig(summarize=[report, twin], out=str(tmp_path / "s.json")))
