"""evaluate.py: its metrics against closed forms and hand counts, then the command end to end on tiny untrained
checkpoints (plumbing, not quality), its refusals and --summarize."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from models.classifier import build_classifier
from models.tiny_dit import build_dit
from scripts import evaluate
from scripts.evaluate import (
    EvaluateConfig,
    balanced_subset,
    class_fidelity,
    fid,
    frechet_distance,
    gaussian_fit,
    inception_weights_file,
    kid,
    load_inception,
    load_real_images,
    main,
    memorisation,
    mmd2_unbiased,
    nearest_neighbour_distances,
)
from scripts.lib import sampling
from scripts.lib.checkpoints import classifier_metadata, classifier_normalize, dit_metadata, save_model
from scripts.lib.cli import UserError, parse_config
from scripts.lib.data import load_or_build_cache, stratified_split
from scripts.make_toy_cats import generate_toy_cats

CLASSES = ["black", "white"]
DIT_SIZE = 16
CLASSIFIER_SIZE = 24  # differs from the DiT's on purpose: samples must be resized for the classifier
TRAINED_CFG_SCALE = 1.5  # the DiT's training guidance: what evaluate samples with when --cfg-scale is not given


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------
def test_fid_of_identical_sets_is_zero():
    features = np.random.default_rng(0).normal(size=(200, 16))
    assert fid(features, features) == pytest.approx(0.0, abs=1e-8)
    assert fid(torch.from_numpy(features).float(), features) == pytest.approx(0.0, abs=1e-4)


def test_frechet_distance_matches_closed_forms():
    d, s1, s2 = 8, 0.5, 2.0  # isotropic: ||mu1 - mu2||^2 + d (std1 - std2)^2
    got = frechet_distance(np.zeros(d), s1**2 * np.eye(d), np.full(d, 0.3), s2**2 * np.eye(d))
    assert got == pytest.approx(d * 0.3**2 + d * (s1 - s2) ** 2, rel=1e-10)
    # Non-commuting 2x2 covariances: tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)) for positive eigenvalues.
    s1, s2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.4], [-0.4, 3.0]])
    mu1, mu2 = np.array([1.0, -1.0]), np.array([0.5, 2.0])
    trace_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1 @ s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_fid_of_sampled_shifted_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    d, n, shift, s1, s2 = 4, 20000, 1.5, 1.0, 1.5
    a = rng.normal(scale=s1, size=(n, d))
    b = rng.normal(scale=s2, size=(n, d)) + shift / math.sqrt(d)  # total mean shift has norm `shift`
    assert fid(a, b) == pytest.approx(shift**2 + d * (s1 - s2) ** 2, rel=0.05)


def test_gaussian_fit_uses_unbiased_covariance():
    mean, cov = gaussian_fit(np.array([[0.0, 0.0], [2.0, 0.0]]))
    np.testing.assert_allclose(mean, [1.0, 0.0])
    np.testing.assert_allclose(cov, [[2.0, 0.0], [0.0, 0.0]])


def test_mmd2_unbiased_matches_hand_computation():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))

    def k(x, y):
        return (x @ y / 3 + 1) ** 3

    within_a = sum(k(a[i], a[j]) for i in range(4) for j in range(4) if i != j) / 12
    within_b = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
    cross = sum(k(x, y) for x in a for y in b) / 20
    assert mmd2_unbiased(a, b) == pytest.approx(within_a + within_b - 2 * cross, rel=1e-12)


def test_kid_is_unbiased_for_one_distribution_and_large_for_two():
    rng = np.random.default_rng(3)
    trials = [mmd2_unbiased(rng.normal(size=(10, 4)), rng.normal(size=(10, 4))) for _ in range(400)]
    biased = []
    for _ in range(400):  # the V-statistic (diagonal kept) is positive on average: what "unbiased" removes
        x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
        kxx, kyy, kxy = ((x @ x.T / 4 + 1) ** 3, (y @ y.T / 4 + 1) ** 3, (x @ y.T / 4 + 1) ** 3)
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    assert min(trials) < 0  # an unbiased estimate of 0 must sometimes be negative
    assert abs(np.mean(trials)) < 0.1 * np.mean(biased)

    same_mean, same_std = kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), 100, num_subsets=20)
    shifted_mean, _ = kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 1.0, 100, num_subsets=20)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 20 * abs(same_mean) + 10 * same_std


def test_nearest_neighbour_distances():
    references = np.array([[0.0, 0.0], [10.0, 0.0]])
    queries = np.array([[1.0, 0.0], [10.0, 3.0], [4.0, 3.0]])
    np.testing.assert_allclose(nearest_neighbour_distances(queries, references, chunk=2), [1.0, 3.0, 5.0])


def test_memorisation_flags_copies():
    rng = np.random.default_rng(5)
    train, heldout = rng.normal(size=(200, 10)), rng.normal(size=(50, 10))
    copies = train[:50] + 1e-3 * rng.normal(size=(50, 10))
    assert memorisation(copies, heldout, train)["ratio"] < 0.01
    fresh = memorisation(rng.normal(size=(50, 10)), heldout, train)
    assert 0.7 < fresh["ratio"] < 1.4 and fresh["sample_nn_min"] <= fresh["sample_nn_median"]


@pytest.mark.parametrize("samples, expected", [([[5.0]], math.inf), ([[0.0]], math.nan)])
def test_memorisation_when_held_out_images_are_training_images(samples, expected):
    ratio = memorisation(np.array(samples), np.zeros((2, 1)), np.zeros((3, 1)))["ratio"]
    assert ratio == expected or (math.isnan(expected) and math.isnan(ratio))


def test_class_fidelity_counts_per_class():
    result = class_fidelity([0, 0, 1, 0, 1, 0, 2, 2], [0, 0, 0, 0, 1, 1, 2, 2], ["a", "b", "c", "d"])
    assert [result["per_class"][name] for name in "abc"] == [0.75, 0.5, 1.0]
    assert math.isnan(result["per_class"]["d"])  # no sample asked for it: not a zero in the mean
    assert result["mean"] == pytest.approx((0.75 + 0.5 + 1.0) / 3) and result["overall"] == pytest.approx(6 / 8)


def test_json_files_write_non_finite_numbers_as_null(tmp_path):
    evaluate.write_json(tmp_path / "r.json", {"a": math.nan, "b": [math.inf, -math.inf, 1.5]}, "the report")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "b": [None, None, 1.5]}


def test_inception_is_built_as_torchvision_builds_it_for_its_imagenet_weights(tmp_path, monkeypatch):
    """Issue 23.1: the weights expect (x - 0.5) / 0.5 inputs, which transform_input=True derives from the
    ImageNet-normalised images evaluate feeds. A random-weights file stands in for the real one (no download)."""
    from torchvision.models import inception_v3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict()
    inception_weights_file().parent.mkdir(parents=True)
    torch.save(state, inception_weights_file())
    model = load_inception(torch.device("cpu"))
    assert model.transform_input
    reference = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    reference.load_state_dict(state)
    reference.fc = torch.nn.Identity()
    images = torch.rand(2, 3, 96, 96)  # the smallest input Inception-v3 takes is 75 px: fast, and the same maths
    with torch.no_grad():
        got, expected = model(classifier_normalize(images)), reference.eval()((images - 0.5) / 0.5)
    # Random weights with eval-mode batch norm grow activations to ~1e11: compare relative to the features' size.
    assert torch.linalg.vector_norm(got - expected) < 1e-4 * torch.linalg.vector_norm(expected)

    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    for foreign in (b"not a weights file", (tmp_path / "foreign.pth").read_bytes()):
        inception_weights_file().write_bytes(foreign)
        with pytest.raises(UserError, match="is not torchvision's Inception-v3 weights"):
            load_inception(torch.device("cpu"))

    # With the weights file there, the report has Inception FID (a cheap stand-in network: FID of 2048-d is slow).
    monkeypatch.setattr(
        evaluate,
        "load_inception",
        lambda device: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()),
    )
    small = torch.rand(6, 3, DIT_SIZE, DIT_SIZE)
    report = evaluate.inception_report(small[:2], small[2:4], small[4:], 2, torch.device("cpu"), seed=0)
    assert report["available"] and report["feature_dim"] == 12 and report["fid"] > 0


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    generate_toy_cats(root / "train", per_class=6, size=DIT_SIZE, seed=0, classes=CLASSES)
    generate_toy_cats(root / "heldout", per_class=4, size=DIT_SIZE, seed=1, classes=CLASSES)
    torch.manual_seed(0)
    dit_meta = dit_metadata(
        {"cfg_scale": TRAINED_CFG_SCALE}, model_name="T/4", image_size=DIT_SIZE, in_channels=3, class_names=CLASSES,
        objective_name="flow", objective_options={}, step=0, weights="ema",
    )  # fmt: skip
    save_model(root / "dit.safetensors", build_dit("T/4", DIT_SIZE, len(CLASSES)), dit_meta)
    classifier_meta = classifier_metadata(
        {"val_split": 0.5, "seed": 3}, backbone="resnet18", image_size=CLASSIFIER_SIZE, class_names=CLASSES,
        metrics={}, epoch=0,
    )  # fmt: skip
    save_model(root / "classifier.safetensors", build_classifier("resnet18", len(CLASSES)), classifier_meta)
    return root


def _config(root, **overrides) -> EvaluateConfig:
    options = dict(
        dit=str(root / "dit.safetensors"), classifier=str(root / "classifier.safetensors"), data=str(root / "train"),
        heldout_data=str(root / "heldout"), num_per_class=3, steps=2, out=str(root / "report.json"),
        grid=str(root / "grid.png"), device="cpu", batch_size=4,
    )  # fmt: skip
    return EvaluateConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def evaluated(setup):
    """One evaluation of the untrained DiT (report at setup/report.json), without Inception weights."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(setup / "empty_torch_home"))
        return main(_config(setup))


def test_evaluate_end_to_end_writes_report_and_grid(setup, evaluated):
    report = evaluated
    assert json.loads((setup / "report.json").read_text()) == json.loads(json.dumps(report))
    assert (setup / "grid.png").stat().st_size > 0
    fidelity = report["class_fidelity"]
    assert fidelity["per_class"].keys() == set(CLASSES)
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
        "source": f"folder {setup / 'heldout'}", "count": 8, "clean_for_dit": True, "training_reference_count": 12,
    }  # fmt: skip
    assert report["inception_fid"]["available"] is False
    reason = report["inception_fid"]["reason"]  # names where the weights were looked for: $TORCH_HOME
    assert "empty_torch_home" in reason and inception_weights_file().name in reason
    sampling_section = report["sampling"]
    assert sampling_section["steps"] == 2 and sampling_section["sampler"] == "euler"
    assert sampling_section["cfg_scale"] == TRAINED_CFG_SCALE  # issue 23.6: the checkpoint's, not a fixed 4


def test_sampling_shows_one_progress_bar_over_all_chunks_and_steps(setup, tmp_path, monkeypatch, capsys):
    """Issue 23.3: 6 samples in chunks of 2 with 2 steps are one bar of 6 sampler steps, not a bar per chunk."""
    monkeypatch.setattr(sampling, "SAMPLE_CHUNK", 2)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    report = main(_config(setup, out=str(tmp_path / "r.json"), grid=str(tmp_path / "g.png"), cfg_scale=2.0))
    assert report["sampling"]["cfg_scale"] == 2.0  # --cfg-scale given: it wins over the checkpoint's
    # Every tqdm bar first draws "<desc>: 0%| | 0/<total>": collect (desc, total) of the sampling ones.
    bars = set(re.findall(r"(sampling[^\r\n:]*):\s+0%\|[^|]*\| 0/(\d+)", capsys.readouterr().err))
    assert bars == {("sampling 6 images", "6")}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_per_class": 1}, "--num-per-class must be >= 2"),
        ({"steps": 0}, "--steps must be positive"),
        ({"batch_size": 0}, "--batch-size must be positive"),
        ({"cfg_scale": -1.0}, "--cfg-scale must be >= 0"),
        ({"dit": "nope.safetensors"}, "--dit nope.safetensors does not exist"),
        ({"classifier": "nope.safetensors"}, "--classifier nope.safetensors does not exist"),
        ({"steps": 0, "batch_size": 0}, "--steps must be positive (got 0); --batch-size must be positive (got 0)"),
        ({"sampler": "ddim"}, "--sampler 'ddim' is not a sampler of the flow objective"),
        ({"grid": "grid.txt"}, "--grid must end in .png, .jpg, .jpeg, .webp"),  # not after minutes of sampling
    ],
)
def test_bad_flags_are_one_line_user_errors(setup, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        main(_config(setup, out=str(setup / "refused.json"), **overrides))
    assert not (setup / "refused.json").exists()


def test_flags_parse_with_their_defaults():
    cfg = parse_config(EvaluateConfig, ["--cpu-threads", "2", "--cache-dir", "caches"], "evaluate")
    assert (cfg.cpu_threads, cfg.cache_dir, cfg.cfg_scale) == (2, "caches", None)


def test_cache_dir_holds_the_image_caches(setup, tmp_path):
    load_real_images(_config(setup, heldout_data="", cache_dir=str(tmp_path)), DIT_SIZE, CLASSES, {"val_split": 0.5})
    assert [path.suffix for path in tmp_path.iterdir()].count(".npy") == 1


def test_without_heldout_folder_uses_the_classifiers_validation_split(setup):
    real = load_real_images(_config(setup, heldout_data=""), DIT_SIZE, CLASSES, {"val_split": 0.5, "seed": 3})
    labels = load_or_build_cache(setup / "train", DIT_SIZE).labels
    train_idx, val_idx = stratified_split(labels, 0.5, 3)
    assert not real.clean_for_dit
    assert len(real.heldout) == len(val_idx) and len(real.train) == len(train_idx)
    np.testing.assert_array_equal(real.heldout_labels, labels[val_idx])


@pytest.mark.parametrize(
    "overrides, class_names, classifier_config, message",
    [
        ({"heldout_data": ""}, CLASSES, {"seed": 0}, "--heldout-data DIR"),
        ({}, ["black", "calico"], {}, "same class subfolders"),
    ],
)
def test_real_image_refusals(setup, overrides, class_names, classifier_config, message):
    with pytest.raises(UserError, match=message):
        load_real_images(_config(setup, **overrides), DIT_SIZE, class_names, classifier_config)


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


def test_summary_refusals_are_user_errors(setup, evaluated, tmp_path):
    report = str(setup / "report.json")
    (tmp_path / "other.json").write_text("{}")
    (tmp_path / "a_file").write_text("")
    out = str(tmp_path / "s.json")
    refusals = [
        (dict(summarize=[report]), "needs --out"),
        (dict(summarize=[report], out=out, fidelity_bar=90), "fidelity-bar"),
        (dict(summarize=[str(tmp_path / "missing.json")], out=out), "No such file"),
        (dict(summarize=[str(tmp_path)], out=out), "Is a directory"),
        (dict(summarize=[str(tmp_path / "other.json")], out=out), "not an evaluate.py report"),
        (
            dict(summarize=[report, _report_copy(setup / "report.json", tmp_path / "x" / setup.name)], out=out),
            "two reports",
        ),
        (dict(summarize=[report], out=str(tmp_path / "a_file" / "s.json")), "could not write the summary"),
    ]
    for options, message in refusals:
        with pytest.raises(UserError, match=message):
            main(EvaluateConfig(**options))
    assert not (tmp_path / "s.json").exists()
