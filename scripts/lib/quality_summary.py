"""Several data sets, one verdict: `evaluate.py --summarize` reads one evaluate report per data set and
tabulates the headline figures (fidelity, worst class, judge accuracy, feature FID beside its real-vs-real
baseline, memorisation) against the bar `make quality` is held to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scripts.lib.cli import UserError


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
