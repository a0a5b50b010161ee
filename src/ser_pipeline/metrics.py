"""Every metric the pipeline reports outside the torchmetrics objects, computed in one place.

``module.py`` keeps one torchmetrics object per stage for the per-epoch ``train/``, ``val/``
and ``test/`` metrics; everything else (the TTA evaluation, the per-domain UAR, the SVM
reference, cross-validation's fold mean ± std) calls the functions here.
"""

from __future__ import annotations

from typing import Any


def label_scores(truth: Any, predicted: Any) -> dict[str, float]:
    """UAR, WA and macro-F1 of predicted labels (TTA evaluation, the SVM reference).

    UAR is the mean recall over the classes present in ``truth``, WA the accuracy.
    """
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    return {"uar": float(recall_score(truth, predicted, average="macro", zero_division=0)),
            "wa": float(accuracy_score(truth, predicted)),
            "f1": float(f1_score(truth, predicted, average="macro", zero_division=0))}
