"""evaluate.py's report: its distance and memorisation sections, its printed summary, and the summary of
several reports (`evaluate.py --summarize`: one report per data set, the headline figures — fidelity, worst
class, judge accuracy, feature FID beside its real-vs-real baseline, memorisation — against the bar
`make quality` is held to)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from scripts.lib.cli import UserError
from scripts.lib.files import write_text_atomic
from scripts.lib.metrics import fid, kid, memorisation_ratio, nearest_neighbour_distances

KID_SUBSET_SIZE = 1000  # the usual KID subset size, when there are enough images


def distance_report(
    sample_features: np.ndarray, heldout_features: np.ndarray, baseline_features: np.ndarray, seed: int
) -> dict[str, Any]:
    """FID and KID of samples vs held-out, beside the same for real (training) images vs held-out."""
    # Subsets of half the smaller set: with subsets as big as the sets every draw is identical and the
    # spread over subsets (kid_std) would always read 0.
    smallest = min(len(sample_features), len(baseline_features), len(heldout_features))
    subset = max(2, min(KID_SUBSET_SIZE, smallest // 2))
    sample_kid = kid(sample_features, heldout_features, subset_size=subset, seed=seed)
    baseline_kid = kid(baseline_features, heldout_features, subset_size=subset, seed=seed)
    return {
        "fid": fid(sample_features, heldout_features),
        "fid_real_vs_real_baseline": fid(baseline_features, heldout_features),
        "kid": sample_kid.mean,
        "kid_std": sample_kid.std,
        "kid_real_vs_real_baseline": baseline_kid.mean,
        "kid_real_vs_real_baseline_std": baseline_kid.std,
        "kid_subset_size": sample_kid.subset_size,
        "kid_subsets": sample_kid.num_subsets,
        "num_samples": len(sample_features),
        "num_baseline_real": len(baseline_features),
        "num_heldout": len(heldout_features),
        "feature_dim": int(sample_features.shape[1]),
    }


def memorisation_report(samples: np.ndarray, heldout: np.ndarray, train: np.ndarray) -> dict[str, float]:
    sample_nn = nearest_neighbour_distances(samples, train)
    heldout_nn = nearest_neighbour_distances(heldout, train)
    return {
        "ratio": memorisation_ratio(sample_nn, heldout_nn),
        "sample_nn_median": float(np.median(sample_nn)),
        "heldout_nn_median": float(np.median(heldout_nn)),
        "sample_nn_min": float(sample_nn.min()),
    }


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def write_report_json(path: Path, data: dict[str, Any]) -> None:
    """A report or a summary as indented JSON (NaN/inf as null), written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(_json_safe(data), indent=2) + "\n")


def print_summary(report: dict[str, Any]) -> None:
    fidelity, features, pixel = report["class_fidelity"], report["classifier_feature_fid"], report["memorisation"]
    print(
        f"class fidelity (mean over classes): {fidelity['mean']:.1%}   "
        f"[classifier on held-out real images: {fidelity['classifier_heldout_accuracy']:.1%}]"
    )
    for name, accuracy in fidelity["per_class"].items():
        print(f"  {name:>16}: {accuracy:.1%}")
    print(
        f"classifier-feature FID (not Inception FID): {features['fid']:.2f}   "
        f"real-vs-real baseline: {features['fid_real_vs_real_baseline']:.2f}"
    )
    print(
        f"classifier-feature KID: {features['kid']:.4f} ± {features['kid_std']:.4f}   "
        f"baseline: {features['kid_real_vs_real_baseline']:.4f}"
    )
    inception = report["inception_fid"]
    print(
        f"Inception FID: {inception['fid']:.2f} (baseline {inception['fid_real_vs_real_baseline']:.2f})"
        if inception["available"]
        else f"Inception FID: unavailable — {inception['reason']}"
    )
    print(
        f"memorisation ratio (>1 = not copying): pixel {pixel['pixel']['ratio']:.2f}, "
        f"classifier features {pixel['classifier_features']['ratio']:.2f}"
    )
    if not report["heldout"]["clean_for_dit"]:
        print(
            "warning: held-out images come from the DiT's own data folder — pass --heldout-data for a clean "
            "memorisation and FID check"
        )


# ------------------------------------------------------------------------------------------------------
# Several data sets: one summary of their reports
# ------------------------------------------------------------------------------------------------------


def report_label(path: Path) -> str:
    """A report's name in the summary: its folder (checkpoints/quality/glyphs/report.json -> glyphs)."""
    return path.parent.name or path.stem


def summarize_report(report: dict[str, Any], fidelity_bar: float) -> dict[str, Any]:
    """The headline figures of one report, and whether it meets the bar (fidelity and no copying)."""
    fidelity, features, copying = report["class_fidelity"], report["classifier_feature_fid"], report["memorisation"]
    worst = min(fidelity["per_class"], key=fidelity["per_class"].get)
    ratios = {"pixel": copying["pixel"]["ratio"], "classifier_features": copying["classifier_features"]["ratio"]}
    return {
        "dit": report["dit"],
        "dit_step": report["dit_step"],
        "num_classes": len(fidelity["per_class"]),
        "mean_class_fidelity": fidelity["mean"],
        "worst_class": worst,
        "worst_class_fidelity": fidelity["per_class"][worst],
        "classifier_heldout_accuracy": fidelity["classifier_heldout_accuracy"],
        "feature_fid": features["fid"],
        "feature_fid_real_vs_real_baseline": features["fid_real_vs_real_baseline"],
        "memorisation_ratio": ratios,
        "sampling_seconds": report["sampling"]["seconds"],
        "num_samples": features["num_samples"],
        "clean_for_dit": report["heldout"]["clean_for_dit"],
        "meets_bar": bool(
            fidelity["mean"] >= fidelity_bar and min(ratios.values()) > 1 and report["heldout"]["clean_for_dit"]
        ),
    }


def summarize(paths: list[str], fidelity_bar: float) -> dict[str, Any]:
    """{label: headline figures} of several reports, plus the bar they were judged by."""
    rows: dict[str, Any] = {}
    for path in map(Path, paths):
        try:
            report = json.loads(path.read_text())
            label = report_label(path)
            if label in rows:
                raise UserError(
                    f"two reports are named {label!r} (after their folder) — keep each data set's "
                    "report in its own folder"
                )
            rows[label] = {"report": str(path), **summarize_report(report, fidelity_bar)}
        except FileNotFoundError as error:
            raise UserError(f"--summarize {path}: no such report — run evaluate.py for that data set first") from error
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(f"--summarize {path} is not an evaluate.py report ({error!r})") from error
    return {
        "bar": {
            "mean_class_fidelity_at_least": fidelity_bar,
            "memorisation_ratio_above": 1.0,
            "heldout_unseen_by_dit": True,
        },
        "data_sets": rows,
        "all_meet_bar": all(row["meets_bar"] for row in rows.values()),
    }


def print_combined_summary(summary: dict[str, Any]) -> None:
    print(
        f"{'data set':<10} {'fidelity':>8}  {'worst class':<20} {'judge':>6}  {'feature FID (real-vs-real)':<27} "
        f"{'memorisation px/feat':<21} bar"
    )
    for label, row in summary["data_sets"].items():
        worst = f"{row['worst_class']} {row['worst_class_fidelity']:.0%}"
        fid_text = f"{row['feature_fid']:.1f} ({row['feature_fid_real_vs_real_baseline']:.1f})"
        ratios = f"{row['memorisation_ratio']['pixel']:.2f} / {row['memorisation_ratio']['classifier_features']:.2f}"
        print(
            f"{label:<10} {row['mean_class_fidelity']:>8.1%}  {worst:<20} {row['classifier_heldout_accuracy']:>6.1%}"
            f"  {fid_text:<27} {ratios:<21} {'met' if row['meets_bar'] else 'NOT MET'}"
        )
    bar = summary["bar"]
    print(
        f"bar: mean class fidelity >= {bar['mean_class_fidelity_at_least']:.0%}, memorisation ratios > 1, held-out "
        f"images unseen by the DiT — {'met by every data set' if summary['all_meet_bar'] else 'NOT met by all'}"
    )
