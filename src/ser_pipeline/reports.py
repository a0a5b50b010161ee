"""Test reports people read: UAR per speaker and per gender, and calibration.

Pure functions take what every test stage has: ``truth`` and ``predicted`` labels
``(n,)``, the class probabilities ``(n, n_classes)`` whose columns follow ``classes``, and
the utterances' ``speakers`` and ``genders`` ``(n,)``. :func:`log_test_reports` logs them
all to the active MLflow run as ``reports/<name>_*.png`` + ``.json`` and the metric
``<name>/ece``, so a model that works for one group only, or whose confidence means
little, is visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ser_pipeline.metrics import label_scores

#: the group an utterance without a speaker / gender label is reported under
UNKNOWN = "unknown"


def _groups(values: Sequence[Any]) -> np.ndarray:
    return np.array([UNKNOWN if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                     for v in values], dtype=object)


def uar_by_group(truth: Sequence[str], predicted: Sequence[str],
                 groups: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """``{group: {"uar", "wa", "utterances", "classes"}}`` for every group, sorted by name.

    UAR is over the classes present in that group's truth (a speaker who never sounds
    sad is not penalised for sadness); ``classes`` lists them. Missing groups (None, NaN)
    are reported as ``"unknown"``.
    """
    truth, predicted, groups = np.asarray(truth, dtype=object), np.asarray(predicted,
                                                                          dtype=object), _groups(groups)
    out: dict[str, dict[str, Any]] = {}
    for group in sorted(set(groups)):
        mask = groups == group
        scores = label_scores(truth[mask].tolist(), predicted[mask].tolist())
        out[group] = {"uar": scores["uar"], "wa": scores["wa"], "utterances": int(mask.sum()),
                      "classes": sorted(set(truth[mask].tolist()))}
    return out


def reliability(probabilities: np.ndarray, truth: Sequence[str], classes: Sequence[str],
                n_bins: int = 10) -> dict[str, Any]:
    """Confidence (top probability) against accuracy in ``n_bins`` equal-width bins.

    ``probabilities``: ``(n, n_classes)``, columns in ``classes`` order. Returns
    ``{"ece", "n_bins", "bins": [{"lower", "upper", "count", "confidence", "accuracy"}]}``;
    ``ece`` (expected calibration error) is the count-weighted mean ``|accuracy -
    confidence|`` over the bins (0 = confidence means what it says).
    """
    probabilities = np.asarray(probabilities, dtype=float)
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[t] for t in truth])
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin k holds (edge_k, edge_k+1]; a confidence of exactly 0 goes into the first bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for k in range(n_bins):
        mask = which == k
        count = int(mask.sum())
        mean_conf = float(confidence[mask].mean()) if count else None
        accuracy = float(correct[mask].mean()) if count else None
        if count:
            ece += count / len(labels) * abs(accuracy - mean_conf)
        bins.append({"lower": float(edges[k]), "upper": float(edges[k + 1]), "count": count,
                     "confidence": mean_conf, "accuracy": accuracy})
    return {"ece": float(ece), "n_bins": n_bins, "bins": bins}


def expected_calibration_error(probabilities: np.ndarray, truth: Sequence[str],
                               classes: Sequence[str], n_bins: int = 10) -> float:
    """The ECE of :func:`reliability`."""
    return reliability(probabilities, truth, classes, n_bins)["ece"]


# -- figures -------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def group_uar_figure(by_group: dict[str, dict[str, Any]], title: str):
    """Bars of UAR per group with utterance counts (matplotlib Figure)."""
    plt = _pyplot()
    names = list(by_group)
    figure, axis = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 3.5),
                                constrained_layout=True)
    values = [by_group[n]["uar"] for n in names]
    bars = axis.bar(range(len(names)), values, color="tab:blue")
    for bar, name in zip(bars, names, strict=True):
        axis.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01,
                  f"n={by_group[name]['utterances']}", ha="center", va="bottom", fontsize=7)
    axis.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0, ha="right"
                    if len(names) > 4 else "center")
    axis.set_ylim(0, 1.1)
    axis.set_ylabel("UAR")
    axis.set_title(title)
    return figure


def reliability_figure(report: dict[str, Any], title: str):
    """Accuracy per confidence bin against the diagonal, with counts (matplotlib Figure)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(4.5, 4.5), constrained_layout=True)
    width = 1.0 / report["n_bins"]
    filled = [b for b in report["bins"] if b["count"]]
    axis.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width,
             align="edge", edgecolor="black", color="tab:blue", label="accuracy")
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for b in filled:
        axis.text(b["lower"] + width / 2, min(b["accuracy"] + 0.02, 1.02), str(b["count"]),
                  ha="center", fontsize=7)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.08)
    axis.set_xlabel("confidence (top probability)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"{title}\nECE {report['ece']:.3f}")
    axis.legend(loc="upper left", fontsize=8)
    return figure


# -- MLflow --------------------------------------------------------------------------------------

def build_reports(truth: Sequence[str], predicted: Sequence[str], probabilities: np.ndarray,
                 classes: Sequence[str], speakers: Sequence[Any] | None = None,
                 genders: Sequence[Any] | None = None, n_bins: int = 10) -> dict[str, Any]:
    """Every report as one dict: ``by_speaker``, ``by_gender`` (when given), ``reliability``."""
    out: dict[str, Any] = {"reliability": reliability(probabilities, truth, classes, n_bins)}
    if speakers is not None:
        out["by_speaker"] = uar_by_group(truth, predicted, speakers)
    if genders is not None:
        out["by_gender"] = uar_by_group(truth, predicted, genders)
    return out


def log_test_reports(truth: Sequence[str], predicted: Sequence[str], probabilities: np.ndarray,
                     classes: Sequence[str], speakers: Sequence[Any] | None = None,
                     genders: Sequence[Any] | None = None, name: str = "test",
                     n_bins: int = 10) -> dict[str, Any]:
    """Log :func:`build_reports` to the active MLflow run; returns them.

    Artifacts: ``reports/<name>_uar_by_speaker.png|json``, ``reports/<name>_uar_by_gender.png|json``
    and ``reports/<name>_reliability.png|json``; metrics ``<name>/ece`` and
    ``<name>/uar_min_speaker`` (the worst speaker's UAR).
    """
    import mlflow

    plt = _pyplot()
    reports = build_reports(truth, predicted, probabilities, classes, speakers, genders, n_bins)
    for key, label in (("by_speaker", "speaker"), ("by_gender", "gender")):
        if key in reports:
            figure = group_uar_figure(reports[key], f"{name}: UAR per {label}")
            mlflow.log_figure(figure, f"reports/{name}_uar_{key}.png")
            plt.close(figure)
            mlflow.log_dict(reports[key], f"reports/{name}_uar_{key}.json")
    figure = reliability_figure(reports["reliability"], f"{name}: reliability")
    mlflow.log_figure(figure, f"reports/{name}_reliability.png")
    plt.close(figure)
    mlflow.log_dict(reports["reliability"], f"reports/{name}_reliability.json")
    metrics = {f"{name}/ece": reports["reliability"]["ece"]}
    if reports.get("by_speaker"):
        metrics[f"{name}/uar_min_speaker"] = min(g["uar"] for g in reports["by_speaker"].values())
    mlflow.log_metrics(metrics)
    return reports
