"""Every metric the pipeline reports outside the torchmetrics objects, computed in one place.

``module.py`` keeps one torchmetrics object per stage for the per-epoch ``train/``, ``val/``
and ``test/`` metrics; everything else (the per-corpus test UAR, the TTA evaluation, the SVM
reference, the per-class report beside a confusion matrix, cross-validation's fold
mean ± std) calls the functions here, which agree with torchmetrics' definitions:

* **UAR** (unweighted average recall): the mean recall over the classes that occur in the
  truth or the predictions (a class predicted but absent from the truth counts as recall 0;
  one in neither is left out), as ``MulticlassRecall(average="macro")`` computes it;
* **WA**: accuracy; **F1**: macro F1 over the same classes;
* **fold mean ± std**: the mean and the *sample* standard deviation (ddof=1) over folds;
  for a single fold the spread is undefined and reported as NaN, never as 0.

No torch, Lightning or MLflow here: a leaf every other module may import.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def uar(truth: Any, predicted: Any) -> float:
    """Unweighted average recall of predicted labels (see the module docstring)."""
    from sklearn.metrics import recall_score

    return float(recall_score(truth, predicted, average="macro", zero_division=0))


def label_scores(truth: Any, predicted: Any) -> dict[str, float]:
    """UAR, WA and macro-F1 of predicted labels (TTA evaluation, the SVM reference)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"uar": uar(truth, predicted),
            "wa": float(accuracy_score(truth, predicted)),
            "f1": float(f1_score(truth, predicted, average="macro", zero_division=0))}


def confusion_report(confusion: Any, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows = truth).

    A class with no support has recall 0 here; :func:`uar` leaves it out unless predicted.
    """
    confusion = np.asarray(confusion, dtype=float)
    report = {}
    for i, label in enumerate(labels):
        true_pos = confusion[i, i]
        predicted, support = confusion[:, i].sum(), confusion[i].sum()
        precision = true_pos / predicted if predicted else 0.0
        recall = true_pos / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[label] = {"precision": float(precision), "recall": float(recall),
                         "f1": float(f1), "support": int(support)}
    return report


def mean_and_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over folds; the std of one fold is NaN."""
    array = np.asarray(list(values), dtype=float)
    if array.size == 0:
        raise ValueError("no fold values to summarise")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else math.nan


def summarise_folds(folds: Sequence[Mapping[str, Any]],
                    names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{"mean": {name: ...}, "std": {name: ...}}`` of each metric in ``names`` over folds."""
    mean, std = {}, {}
    for name in names:
        mean[name], std[name] = mean_and_std(fold[name] for fold in folds)
    return {"mean": mean, "std": std}
