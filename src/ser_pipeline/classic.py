"""The classic reference as a pipeline model: utterance functionals + an RBF SVM (``model=svm``).

Per utterance, frame features ``(channels, n_features, frames)`` become one vector
(:func:`utterance_vector`): every feature row and its delta summarised by 8 functionals
(:func:`functionals`; the 34 LLDs of ``feature=lld`` give 544 numbers), or, for a feature with
one frame per utterance (a vector of functionals already, e.g. eGeMAPS), that frame as is.
The vectors are z-scored with the fitting rows' statistics and an RBF SVM (class-balanced) is
trained; ``C`` and ``gamma`` are chosen by UAR on the fold's *validation speakers* (the test
speakers are never looked at), then the SVM is refit on training + validation speakers with
that choice (:func:`fit_with_validation_grid`); ``model.selection=inner_folds`` chooses them by
leave-one-speaker-out folds within the training and validation speakers instead
(:func:`fit_with_inner_folds`). ``bench/baseline.py`` uses the same functions.

:class:`SVMClassifier` predicts from stored arrays only (support vectors, dual coefficients,
intercepts, gamma, the z-scoring statistics): libsvm's one-vs-one decision values and voting,
reimplemented in torch, so a model directory is YAML + safetensors and serving needs no
scikit-learn. It keeps the networks' call contract (``net(features, lengths) -> {"emotion",
"gender", "vad", "embedding"}``), so ``Predictor`` serves it unchanged: the emotion "logits"
are the one-vs-one vote counts divided by a temperature fitted on held-out votes
(``model.calibration=temperature``: the validation speakers' votes, or the inner folds'), so
``Predictor``'s softmax of them gives calibrated scores, and its choice (the first class among
equal votes) is libsvm's prediction.

:func:`train_svm` is what ``training.train`` runs for an svm model config: fit, test, and the
MLflow record of a deep model (params, metrics, confusion matrices, pyfunc model, registry).
Only this module's training half imports scikit-learn or MLflow (when it runs).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ser_pipeline.metrics import label_scores
from ser_pipeline.models.svm import (  # noqa: F401  (re-exported for bench and tests)
    FUNCTIONALS,
    SUMMARIES,
    SVMClassifier,
    fit_temperature,
    functionals,
    ovo_decision_values,
    ovo_votes,
    rbf_kernel,
    utterance_vector,
)

log = logging.getLogger(__name__)

#: the reference's grid (``conf/model/svm.yaml`` repeats it); gamma is a multiple of
#: 1 / n_inputs, scikit-learn's ``gamma="scale"`` on z-scored inputs
C_GRID = (0.1, 1.0, 10.0, 100.0)
GAMMA_SCALES = (0.25, 1.0, 4.0)

def resolve_summary(configured: str, features: list[torch.Tensor]) -> str:
    """``model.summary`` made concrete for the training utterances ``features``."""
    if configured not in SUMMARIES:
        raise ValueError(f"model.summary must be one of {', '.join(SUMMARIES)}, "
                         f"not {configured!r}")
    if configured != "auto":
        return configured
    return "vector" if all(f.shape[-1] == 1 for f in features) else "functionals"


def utterance_table(features: list[torch.Tensor], summary: str) -> np.ndarray:
    """``(utterances, n_inputs)`` float64: :func:`utterance_vector` of each item."""
    return np.stack([utterance_vector(f, summary) for f in features])


# -- fitting (scikit-learn) --------------------------------------------------------------------

@dataclass
class FittedSVM:
    """A trained reference: z-scoring statistics + scikit-learn's ``SVC`` on z-scored rows."""

    mean: np.ndarray  # (n_inputs,)
    std: np.ndarray  # (n_inputs,)
    svc: Any  # sklearn.svm.SVC
    c: float
    gamma_scale: float

    def standardise(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.std

    def predict(self, x: np.ndarray) -> np.ndarray:
        """scikit-learn's prediction for ``(rows, n_inputs)`` unstandardised vectors."""
        return self.svc.predict(self.standardise(x))

    def votes(self, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """``(rows, len(classes))`` one-vs-one vote counts, a column per label of the sorted
        ``classes`` (which hold every label it was fitted on; ``-inf`` for one it never saw):
        with ``classes = arange(n)``, what :class:`SVMClassifier` computes from the arrays."""
        decision = self.svc.decision_function(self.standardise(x))
        if decision.ndim == 1:  # two classes: scikit-learn's sign is positive for the second
            decision = -decision[:, None]
        counts = ovo_votes(torch.from_numpy(np.asarray(decision, dtype=np.float64)),
                           len(self.svc.classes_)).numpy()
        votes = np.full((len(counts), len(classes)), -np.inf)
        votes[:, np.searchsorted(classes, self.svc.classes_)] = counts
        return votes


def fit_svm(x: np.ndarray, y: np.ndarray, c: float, gamma_scale: float,
            class_weight: str | None = "balanced") -> FittedSVM:
    """z-score ``x`` with its own statistics and fit an RBF SVM (``gamma = scale / n_inputs``)."""
    from sklearn.svm import SVC

    x = np.asarray(x, dtype=np.float64)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-8, std, 1.0)  # a constant input is left as is
    svc = SVC(C=c, kernel="rbf", gamma=gamma_scale / x.shape[1], class_weight=class_weight,
              decision_function_shape="ovo")
    return FittedSVM(mean, std, svc.fit((x - mean) / std, y), float(c), float(gamma_scale))


def fit_with_validation_grid(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
    c_grid: tuple[float, ...] = C_GRID, gamma_scales: tuple[float, ...] = GAMMA_SCALES,
    class_weight: str | None = "balanced", refit: bool = True, classes: np.ndarray | None = None,
) -> tuple[FittedSVM, dict[str, Any]]:
    """Choose ``(C, gamma)`` by validation UAR, then refit on training + validation rows.

    Every grid point is fitted on the training rows and scored on the validation rows; ties go
    to the smaller C, then the smaller gamma (the simpler model). The refit sees the training
    rows, then the validation rows; ``refit=False`` returns the chosen grid point's fit on the
    training rows instead, so the validation speakers stay unseen (an ensemble can then be
    judged on them, ``bench/ensemble.py --part val``). Returns the model and ``{"C",
    "gamma_scale", "val_uar", "val_predicted", "val_votes" (of the chosen grid point's
    training-only fit; a column per label of ``classes``, by default the sorted labels of the
    rows), "refit", "grid": [{"C", "gamma_scale", "val_uar"}, ...]}``.
    """
    tried = []
    for c, gamma_scale in itertools.product(c_grid, gamma_scales):
        fitted = fit_svm(x_train, y_train, c, gamma_scale, class_weight)
        predicted = fitted.predict(x_val)
        tried.append((label_scores(y_val, predicted)["uar"], -c, -gamma_scale, predicted, fitted))
    val_uar, neg_c, neg_gamma, val_predicted, fitted = max(tried, key=lambda t: t[:3])
    c, gamma_scale = -neg_c, -neg_gamma
    if classes is None:
        classes = np.unique(np.concatenate([y_train, y_val]))
    val_votes = fitted.votes(x_val, np.asarray(classes))
    if refit:
        fitted = fit_svm(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]),
                         c, gamma_scale, class_weight)
    grid = [{"C": -t[1], "gamma_scale": -t[2], "val_uar": t[0]} for t in tried]
    return fitted, {"C": c, "gamma_scale": gamma_scale, "val_uar": val_uar,
                    "val_predicted": val_predicted, "val_votes": val_votes,
                    "refit": bool(refit), "grid": grid}


def speaker_folds(groups: np.ndarray, max_folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(fit rows, held-out rows)`` index pairs, every speaker held out in exactly one fold:
    leave-one-speaker-out up to ``max_folds`` speakers, speakers grouped into ``max_folds``
    folds beyond (scikit-learn's ``GroupKFold``)."""
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError("inner folds need at least two speakers")
    folds = GroupKFold(n_splits=min(n_groups, max_folds))
    return list(folds.split(np.zeros(len(groups)), groups=groups))


def fit_with_inner_folds(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray,
    c_grid: tuple[float, ...] = C_GRID, gamma_scales: tuple[float, ...] = GAMMA_SCALES,
    class_weight: str | None = "balanced", max_folds: int = 10, classes: np.ndarray | None = None,
) -> tuple[FittedSVM, dict[str, Any]]:
    """Choose ``(C, gamma)`` by speaker-independent folds *within* the given rows, then fit
    on all of them.

    Every grid point predicts each speaker's rows from an SVM fitted on the other speakers'
    (:func:`speaker_folds`); its UAR is that of the pooled held-out predictions. Choosing on
    every training speaker in turn, rather than on one or two validation speakers, makes the
    choice much less noisy; the price is ``folds x grid`` fits. Ties as in
    :func:`fit_with_validation_grid`; the returned dict has the same keys, with ``val_uar``
    the inner folds' UAR and ``val_truth`` / ``val_predicted`` / ``val_votes`` their rows
    (``classes`` as there).
    """
    splits = speaker_folds(np.asarray(groups), max_folds)
    classes = np.unique(y) if classes is None else np.asarray(classes)
    tried = []
    for c, gamma_scale in itertools.product(c_grid, gamma_scales):
        predicted = np.empty_like(y)
        votes = np.empty((len(y), len(classes)))
        for fit_rows, held_out in splits:
            votes[held_out] = fit_svm(x[fit_rows], y[fit_rows], c, gamma_scale,
                                      class_weight).votes(x[held_out], classes)
            # the most votes, the first class among equals: libsvm's prediction, without a
            # second pass over the kernel
            predicted[held_out] = classes[votes[held_out].argmax(1)]
        tried.append((label_scores(y, predicted)["uar"], -c, -gamma_scale, predicted, votes))
    val_uar, neg_c, neg_gamma, val_predicted, val_votes = max(tried, key=lambda t: t[:3])
    c, gamma_scale = -neg_c, -neg_gamma
    grid = [{"C": -t[1], "gamma_scale": -t[2], "val_uar": t[0]} for t in tried]
    return fit_svm(x, y, c, gamma_scale, class_weight), {
        "C": c, "gamma_scale": gamma_scale, "val_uar": val_uar, "val_truth": y,
        "val_predicted": val_predicted, "val_votes": val_votes, "refit": True,
        "inner_folds": len(splits),
        "grid": grid}


# -- one run: fit, test, log -----------------------------------------------------------------------

@dataclass
class SVMRun:
    """What a fold's summary reads from ``result["module"]`` (the deep runs' ``SERModule``)."""

    net: SVMClassifier
    best_val_uar: float
    best_val_confusion: np.ndarray  # (n_classes, n_classes), rows = truth
    test_confusion: np.ndarray | None


def confusion_counts(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts of class indices, rows = truth."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(truth, dtype=int), np.asarray(predicted, dtype=int)), 1)
    return counts


def fit_and_test(cfg: Any, datamodule: Any) -> dict[str, Any]:
    """Fit on the datamodule's (normalised) train/val features, test on its test features."""
    started = time.time()
    settings = cfg.model
    sets = datamodule.datasets
    if datamodule.augment:
        log.warning("svm: data.augment is ignored; the SVM fits the unaugmented features")
    summary = resolve_summary(str(settings.get("summary", "auto")), sets["train"].features)
    x = {part: utterance_table(sets[part].features, summary) for part in sets}
    y = {part: sets[part].emotion.numpy() for part in sets}
    grid = (tuple(float(c) for c in settings.C), tuple(float(g) for g in settings.gamma_scale),
            settings.get("class_weight"))
    selection_by = str(settings.get("selection", "validation"))
    if selection_by == "inner_folds":  # every training and validation speaker held out in turn
        fitting = [part for part in ("train", "val") if part in sets]  # no val: a refit
        speakers = [f"{corpus}/{speaker}" for part in fitting for corpus, speaker in zip(
            sets[part].rows["corpus"], sets[part].rows["speaker"].astype(str), strict=True)]
        fitted, selection = fit_with_inner_folds(
            np.concatenate([x[p] for p in fitting]), np.concatenate([y[p] for p in fitting]),
            np.array(speakers), *grid,
            int(settings.get("inner_folds", 10)), np.arange(len(datamodule.classes)))
    elif selection_by == "validation":
        fitted, selection = fit_with_validation_grid(
            x["train"], y["train"], x["val"], y["val"], *grid,
            bool(settings.get("refit", True)), np.arange(len(datamodule.classes)))
        selection["val_truth"] = y["val"]
    else:
        raise ValueError(f"model.selection must be validation or inner_folds, not {selection_by!r}")
    calibration = str(settings.get("calibration", "none"))
    if calibration == "temperature":  # fitted on votes of speakers the chosen fit never saw
        selection["temperature"] = fit_temperature(selection["val_votes"], selection["val_truth"])
    elif calibration == "none":
        selection["temperature"] = 1.0
    else:
        raise ValueError(f"model.calibration must be temperature or none, not {calibration!r}")
    net, kwargs = SVMClassifier.from_fitted(fitted, len(datamodule.classes), summary,
                                            selection["temperature"])
    n_classes = len(datamodule.classes)
    log.info("svm: C=%g, gamma=%g/%d (validation UAR %.4f), %d support vectors, %s of %d "
             "inputs, score temperature %.3g", selection["C"], selection["gamma_scale"],
             kwargs["n_inputs"], selection["val_uar"], sum(kwargs["n_support"]), summary,
             kwargs["n_inputs"], selection["temperature"])
    result: dict[str, Any] = {
        "run_id": None, "best_checkpoint": None, "best_val_uar": selection["val_uar"],
        "epochs": 0, "selection": selection, "kwargs": kwargs}
    test_confusion = None
    if cfg.get("test", True):
        # what is logged is what serves: the stored arrays predict, not scikit-learn
        predicted = net.predict_vectors(x["test"])
        test_confusion = confusion_counts(y["test"], predicted, n_classes)
        scores = label_scores(y["test"], predicted)
        recalls = test_confusion.diagonal() / np.maximum(test_confusion.sum(1), 1)
        result["test"] = {**scores, **{f"recall_{c}": float(r)
                                       for c, r in zip(datamodule.classes, recalls, strict=True)}}
        result["confusion"] = test_confusion.tolist()
    result["module"] = SVMRun(net, selection["val_uar"],
                              confusion_counts(selection["val_truth"], selection["val_predicted"],
                                               n_classes),
                              test_confusion)
    result["train_seconds"] = time.time() - started
    return result


def train_svm(cfg: Any, datamodule: Any, experiment_id: str | None = None,
              parent_run_id: str | None = None, tags: dict[str, str] | None = None
              ) -> dict[str, Any]:
    """Fit, test and (with ``experiment_id``) log one fold of an svm model config.

    ``datamodule`` is set up; ``tags`` are the run's tags (``training`` builds them as for a
    deep run). Returns the summary ``training.train`` returns (run id, metrics, confusion,
    model dir, registered version; ``result["module"]`` is an :class:`SVMRun`).
    """
    if experiment_id is None:
        return fit_and_test(cfg, datamodule)
    import mlflow
    from omegaconf import OmegaConf

    from ser_pipeline import tracking

    output_dir = Path(cfg.paths.output_dir)
    run_name = f"{cfg.model.name}-{datamodule.name}-fold{datamodule.split.fold}"
    summary = datamodule.summary()
    with tracking.tracked_run(experiment_id, run_name, tags, parent_run_id) as run:
        tracking.log_params(tracking.flatten_config(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/train.yaml")
        mlflow.log_dict(summary, "data/summary.json")
        mlflow.log_params({f"data.{part}_utterances": n
                           for part, n in datamodule.part_utterances().items()})
        mlflow.log_param("data.skipped_files", len(datamodule.skipped))
        result = fit_and_test(cfg, datamodule)
        result["run_id"] = run.info.run_id
        _log_results(cfg, datamodule, result, output_dir)
    return result


def _log_results(cfg: Any, datamodule: Any, result: dict[str, Any], output_dir: Path) -> None:
    """Metrics, confusion matrices, the model directory, its pyfunc model and registration."""
    import mlflow

    from ser_pipeline import tracking
    from ser_pipeline.artifact import save_model_dir
    from ser_pipeline.corpora.manifest import DIMENSIONS, GENDERS

    selection, kwargs, fit = result["selection"], result["kwargs"], result["module"]
    classes = datamodule.classes
    mlflow.log_params({"svm.C_chosen": selection["C"],
                       "svm.gamma_scale_chosen": selection["gamma_scale"],
                       "svm.gamma": kwargs["gamma"], "svm.summary": kwargs["summary"],
                       "svm.n_inputs": kwargs["n_inputs"], "svm.refit": selection["refit"],
                       "svm.selection": "inner_folds" if "inner_folds" in selection
                       else "validation",
                       "svm.support_vectors": sum(kwargs["n_support"]),
                       "svm.temperature": selection["temperature"]})
    for step, point in enumerate(selection["grid"]):
        mlflow.log_metric("val/uar_grid", point["val_uar"], step=step)
    mlflow.log_text(json.dumps(selection["grid"], indent=1), "svm/grid.json")
    mlflow.log_metric("val/uar", selection["val_uar"])
    tracking.log_confusion(fit.best_val_confusion, classes, "val_best",
                           f"validation (C={selection['C']:g}, gamma={selection['gamma_scale']:g}"
                           f"/d, UAR {selection['val_uar']:.3f})")
    if "test" in result:
        mlflow.log_metrics({f"test/{k}": v for k, v in result["test"].items()})
        protocol = ("speaker-independent" if datamodule.split.speaker_independent
                    else "SPEAKER-DEPENDENT")
        tracking.log_confusion(fit.test_confusion, classes, "test",
                               f"test, {protocol} (UAR {result['test']['uar']:.3f})")
    mlflow.log_metric("train_seconds", result["train_seconds"])
    model_dir = output_dir / "model"
    save_model_dir(model_dir, fit.net, kwargs, {
        "features": datamodule.extractor.config(),
        "classes": classes,
        "genders": list(GENDERS),
        "dimensions": list(DIMENSIONS),
        "has_gender": False,  # the SVM predicts emotion only
        "has_dimensions": False,
        "normalization": datamodule.normalization,
        "info": {"corpus": datamodule.name, "model": str(cfg.model.name),
                 "run_id": result["run_id"], "split": datamodule.split.summary(),
                 "test_metrics": result.get("test", {}),
                 "svm": {"C": selection["C"], "gamma_scale": selection["gamma_scale"],
                         "val_uar": selection["val_uar"],
                         "temperature": selection["temperature"],
                         # the validation speakers are in its training rows (bench/ensemble.py
                         # --part val refuses such a member)
                         "refit": selection["refit"]}},
    }, datamodule.stats)
    result["model_dir"] = str(model_dir)
    mlflow_cfg = cfg.logger.mlflow
    from ser_pipeline.packaging import publish_model

    result.update(publish_model(model_dir, mlflow_cfg, selection["val_uar"], "test" in result))
