"""Test a packaged model on any corpus: ``python eval.py model_uri=... data=<corpus>``.

The model directory is run through the same :class:`~ser_pipeline.inference.Predictor`
as ``infer.py``, one file at a time, over a whole corpus or one split of it. The
model's classes are mapped onto the corpus's (:class:`ClassMapping`): a model class
without a counterpart is left out of the scores (the remaining probabilities are
renormalised) and a corpus class without one is left out of the evaluation; both are
reported, never merged into another class.

One MLflow run per evaluation, tagged ``evaluation=cross-corpus`` (or ``same-corpus``
with ``eval_split``) and ``source_run`` (the run that trained the model). It logs
``eval/uar|wa|f1|recall_<class>``, ``confusion/eval.*``, ``eval/report.json`` (metrics,
per-class report, the mapping and what it left out), ``eval/predictions.csv`` (one row
per utterance with every score) and the speaker / gender / calibration reports.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ser_pipeline import tracking
from ser_pipeline.audio import AudioError, read_audio
from ser_pipeline.inference import EnsemblePredictor, Predictor
from ser_pipeline.metrics import confusion_report, label_scores
from ser_pipeline.model_uri import model_cache_dir, resolve_model
from ser_pipeline.reports import build_reports
from ser_pipeline.splits import make_split

log = logging.getLogger(__name__)

#: ``eval.split``: the whole corpus, or one part of its ``data.split`` / ``data.fold``
EVAL_SPLITS = ("all", "train", "val", "test")


@dataclass(frozen=True)
class ClassMapping:
    """How a model's classes meet a corpus's classes.

    ``model_to_corpus``: model class -> corpus class, for the model classes that have one
    (several model classes may map to one corpus class only when ``eval.label_map`` says
    so); ``classes``: the corpus classes evaluated, in corpus order.
    """

    model_classes: list[str]
    model_to_corpus: dict[str, str]
    classes: list[str]
    unmapped_model_classes: list[str]
    unmapped_corpus_classes: list[str]

    @classmethod
    def build(cls, model_classes: list[str], corpus_classes: list[str],
              label_map: dict[str, str] | None = None) -> ClassMapping:
        """Identity for equal names, then ``label_map`` (model class -> corpus class).

        Raises ValueError for a ``label_map`` key that is not a model class or a value that
        is not a corpus class (a typo would otherwise drop a class silently), and when no
        class maps at all.
        """
        label_map = dict(label_map or {})
        unknown_keys = sorted(set(label_map) - set(model_classes))
        if unknown_keys:
            raise ValueError(f"eval.label_map keys {unknown_keys} are not classes of the model "
                             f"({model_classes})")
        unknown_values = sorted(set(label_map.values()) - set(corpus_classes))
        if unknown_values:
            raise ValueError(f"eval.label_map values {unknown_values} are not classes of the "
                             f"corpus ({corpus_classes}); set data.classes or fix the map")
        target = {m: label_map.get(m, m) for m in model_classes}
        mapped = {m: c for m, c in target.items() if c in corpus_classes}
        classes = [c for c in corpus_classes if c in mapped.values()]
        if not classes:
            raise ValueError(f"no model class ({model_classes}) has a counterpart among the "
                             f"corpus classes ({corpus_classes}); give eval.label_map")
        return cls(list(model_classes), mapped, classes,
                   [m for m in model_classes if m not in mapped],
                   [c for c in corpus_classes if c not in classes])

    def project(self, probabilities: np.ndarray) -> np.ndarray:
        """``(n, n_model_classes)`` -> ``(n, len(classes))``: summed per corpus class, renormalised."""
        probabilities = np.asarray(probabilities, dtype=float)
        out = np.zeros((len(probabilities), len(self.classes)))
        column = {c: i for i, c in enumerate(self.classes)}
        for j, model_class in enumerate(self.model_classes):
            if model_class in self.model_to_corpus:
                out[:, column[self.model_to_corpus[model_class]]] += probabilities[:, j]
        total = out.sum(axis=1, keepdims=True)
        return np.divide(out, total, out=np.full_like(out, 1.0 / len(self.classes)),
                         where=total > 0)

    def summary(self) -> dict[str, Any]:
        return {"model_to_corpus": self.model_to_corpus, "classes": self.classes,
                "unmapped_model_classes": self.unmapped_model_classes,
                "unmapped_corpus_classes": self.unmapped_corpus_classes}


def select_utterances(cfg: DictConfig) -> tuple[pd.DataFrame, list[str], dict[str, Any]]:
    """The corpus rows to evaluate, its classes, and what the selection was.

    ``eval.split=all`` takes every utterance of ``data.classes``; ``train|val|test`` the
    part of ``data.split`` / ``data.fold`` (the split the model was trained with, for a
    same-corpus test).
    """
    part = str(cfg.eval.split)
    if part not in EVAL_SPLITS:
        raise ValueError(f"eval.split must be one of {', '.join(EVAL_SPLITS)}, not {part!r}")
    datamodule = instantiate(cfg.data, features=None, _convert_="partial")
    manifest = datamodule.load_manifest()
    selection: dict[str, Any] = {"eval_split": part}
    if part != "all":
        split = make_split(manifest, **datamodule.split_options)
        manifest = manifest[manifest["id"].isin(getattr(split, part))].reset_index(drop=True)
        selection.update(split.summary())
    return manifest, list(datamodule.classes), selection


def predict_rows(predictor: Predictor, rows: pd.DataFrame
                 ) -> tuple[pd.DataFrame, np.ndarray, dict[str, str]]:
    """Model probabilities ``(n, n_model_classes)`` for the decodable rows; skipped files.

    One file at a time, as ``infer.py`` sees it; a speaker-normalised model first gathers
    the statistics of all of that speaker's utterances (:meth:`Predictor.adapt`).
    """
    kept, probabilities, skipped = [], [], {}
    for _, group in rows.groupby(["corpus", "speaker"], sort=False):
        waveforms, indices = [], []
        for index, path in zip(group.index, group["path"], strict=True):
            try:
                waveforms.append(read_audio(path, predictor.sample_rate))
                indices.append(index)
            except AudioError as error:
                skipped[str(path)] = error.reason
        if predictor.speaker_normalized:
            predictor.reset_speaker()
            for waveform in waveforms:
                predictor.adapt(waveform)
        results = [predictor.predict_waveform(w) for w in waveforms]
        kept += indices
        probabilities += [[r["scores"][c] for c in predictor.classes] for r in results]
    if skipped:
        log.warning("skipped %d undecodable file(s):\n%s", len(skipped),
                    "\n".join(f"  {p}: {r}" for p, r in skipped.items()))
    return (rows.loc[kept].reset_index(drop=True),
            np.asarray(probabilities, dtype=float).reshape(len(kept), len(predictor.classes)),
            skipped)


def score(truth: list[str], predicted: list[str], classes: list[str]) -> dict[str, Any]:
    """Metrics, confusion counts (rows = truth, in ``classes`` order) and per-class report."""
    from sklearn.metrics import confusion_matrix

    confusion = confusion_matrix(truth, predicted, labels=classes)
    report = confusion_report(confusion, classes)
    metrics = label_scores(truth, predicted)
    metrics.update({f"recall_{c}": report[c]["recall"] for c in classes})
    return {"metrics": metrics, "confusion": confusion, "report": report}


def _tracking_uri(cfg: DictConfig) -> str | None:
    mlflow_cfg = OmegaConf.select(cfg, "logger.mlflow")
    if mlflow_cfg is None:
        return None
    return tracking.resolve_tracking_uri(mlflow_cfg.get("tracking_uri"), cfg.paths.mlruns_dir)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation ``cfg`` describes (see ``conf/eval.yaml``); returns its summary."""
    tracking_uri = _tracking_uri(cfg)
    if tracking_uri is not None:
        tracking.check_tracking_store(tracking_uri)
    uri = cfg.get("model_uri")
    model_dir = resolve_model(str(uri) if uri else None, tracking_uri,
                              model_cache_dir(cfg.paths.root_dir))
    # a model or an ensemble directory (its members' probabilities averaged)
    predictor = EnsemblePredictor.from_dirs([model_dir],
                                            tta_views=int(cfg.eval.get("tta_views") or 1))
    info = dict(predictor.spec.info or {})
    source_corpus = str(info.get("corpus", "unknown"))

    manifest, corpus_classes, selection = select_utterances(cfg)
    label_map = cfg.eval.get("label_map")
    label_map = OmegaConf.to_container(label_map, resolve=True) if label_map else {}
    mapping = ClassMapping.build(predictor.classes, corpus_classes, label_map)
    outside = manifest["emotion"].isin(mapping.unmapped_corpus_classes)
    left_out = {str(k): int(v) for k, v in manifest.loc[outside, "emotion"].value_counts()
                .sort_index().items()}
    if mapping.unmapped_model_classes:
        log.warning("model classes without a counterpart in %s (left out of the scores): %s",
                    cfg.data.name, mapping.unmapped_model_classes)
    if left_out:
        log.warning("corpus classes the model cannot predict (utterances left out): %s", left_out)
    rows, model_probabilities, skipped = predict_rows(predictor, manifest[~outside])
    if rows.empty:
        raise ValueError(f"nothing to evaluate: no decodable utterance of {mapping.classes} in "
                         f"{cfg.data.name} (eval.split={selection['eval_split']})")

    probabilities = mapping.project(model_probabilities)
    predicted = [mapping.classes[i] for i in probabilities.argmax(axis=1)]
    model_predicted = [predictor.classes[i] for i in model_probabilities.argmax(axis=1)]
    truth = rows["emotion"].tolist()
    scored = score(truth, predicted, mapping.classes)
    out_of_map = float(np.mean([m in mapping.unmapped_model_classes for m in model_predicted]))
    metrics = {**scored["metrics"], "utterances": float(len(rows)),
               "out_of_map_rate": out_of_map}

    same = source_corpus == str(cfg.data.name)
    evaluation = str(cfg.eval.get("evaluation") or "auto")
    if evaluation not in ("auto", "same-corpus", "cross-corpus"):
        raise ValueError(f"eval.evaluation must be auto, same-corpus or cross-corpus, not "
                         f"{evaluation!r}")
    if evaluation == "auto":
        evaluation = "same-corpus" if same else "cross-corpus"
    part = selection["eval_split"]
    if evaluation == "same-corpus" and part != "test":
        log.warning("same-corpus evaluation on eval.split=%s: it may hold utterances the model "
                    "was trained or checkpointed on", part)

    predictions = rows[["id", "path", "corpus", "speaker", "gender", "emotion"]].copy()
    predictions["predicted"] = predicted
    predictions["model_predicted"] = model_predicted  # the model's own top class, unmapped
    predictions["correct"] = predictions["emotion"] == predictions["predicted"]
    for j, name in enumerate(mapping.classes):
        predictions[f"score_{name}"] = probabilities[:, j]
    for j, name in enumerate(predictor.classes):
        predictions[f"model_score_{name}"] = model_probabilities[:, j]
    genders = rows["gender"].tolist()
    reports = build_reports(truth, predicted, probabilities, mapping.classes,
                            rows["speaker"].tolist(), genders)
    metrics["ece"] = reports["reliability"]["ece"]
    report = {
        "model_uri": str(uri) if uri else None, "model_dir": str(model_dir),
        "source_run": info.get("run_id"), "source_corpus": source_corpus,
        "corpus": str(cfg.data.name), "evaluation": evaluation, **selection,
        "metrics": metrics, "mapping": mapping.summary(),
        "left_out_utterances": left_out, "skipped_files": skipped,
        "per_class": scored["report"], "confusion": scored["confusion"].tolist(),
    }
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(output_dir / "predictions.csv", index=False)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))

    if tracking_uri is not None:
        report["run_id"] = _log(cfg, tracking_uri, report, predictions, reports, truth,
                                predicted, probabilities, mapping.classes, rows, genders)
    print(format_report(report), flush=True)
    return report


def _log(cfg: DictConfig, tracking_uri: str, report: dict[str, Any], predictions: pd.DataFrame,
         reports: dict[str, Any], truth: list[str], predicted: list[str],
         probabilities: np.ndarray, classes: list[str], rows: pd.DataFrame,
         genders: list | None) -> str:
    import mlflow

    from ser_pipeline.reports import log_test_reports

    mlflow.set_tracking_uri(tracking_uri)
    mlflow_cfg = cfg.logger.mlflow
    artifact_root = Path(cfg.paths.mlruns_dir) / "artifacts" if tracking_uri.startswith(
        "sqlite:") else None
    experiment_id = tracking.get_or_create_experiment(mlflow_cfg.experiment_name, artifact_root)
    tags = {
        **tracking.git_state(Path(__file__).resolve().parent),
        "evaluation": report["evaluation"],
        "eval_split": report["eval_split"],
        "corpus": report["corpus"],
        "source_corpus": report["source_corpus"],
        "source_run": str(report["source_run"] or "unknown"),
        "model_uri": str(report["model_uri"] or report["model_dir"]),
        **({"speaker_independent": str(report["speaker_independent"]).lower(),
            "split_protocol": report["protocol"], "fold": str(report["fold"])}
           if "protocol" in report else {}),
        **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()},
    }
    name = f"eval-{report['source_corpus']}-on-{report['corpus']}-{report['eval_split']}"
    with tracking.tracked_run(experiment_id, name, tags) as run:
        # what was evaluated, on what (the logger group's registry keys mean nothing here)
        logged = {"model_uri": cfg.get("model_uri"), "seed": cfg.get("seed"),
                  **{key: OmegaConf.to_container(cfg[key], resolve=True)
                     for key in ("eval", "data", "tags") if cfg.get(key) is not None}}
        tracking.log_params(tracking.flatten_config(logged))
        mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(logged)), "config/eval.yaml")
        mlflow.log_metrics({f"eval/{k}": v for k, v in report["metrics"].items()})
        tracking.log_confusion(np.asarray(report["confusion"]), classes, "eval",
                               f"{report['source_corpus']} model on {report['corpus']} "
                               f"({report['evaluation']}, {report['eval_split']}; "
                               f"UAR {report['metrics']['uar']:.3f})")
        mlflow.log_dict({k: v for k, v in report.items() if k != "confusion"},
                        "eval/report.json")
        mlflow.log_text(predictions.to_csv(index=False), "eval/predictions.csv")
        log_test_reports(truth, predicted, probabilities, classes, rows["speaker"].tolist(),
                         genders, name="eval")
        return run.info.run_id


def format_report(report: dict[str, Any]) -> str:
    """The console summary of an evaluation."""
    metrics, mapping = report["metrics"], report["mapping"]
    lines = ["", f"=== evaluation: {report['source_corpus']} model on {report['corpus']} "
                 f"({report['evaluation']}, eval.split={report['eval_split']}) ===",
             f"utterances:  {int(metrics['utterances'])} of classes {mapping['classes']}",
             f"UAR:         {metrics['uar']:.4f}",
             f"WA:          {metrics['wa']:.4f}",
             f"macro-F1:    {metrics['f1']:.4f}",
             f"ECE:         {metrics['ece']:.4f}"]
    if mapping["unmapped_model_classes"]:
        lines.append(f"model classes without counterpart (not scored): "
                     f"{mapping['unmapped_model_classes']} - the model's top class was one of "
                     f"them for {metrics['out_of_map_rate']:.1%} of utterances")
    if report["left_out_utterances"]:
        lines.append(f"corpus classes without counterpart (left out): "
                     f"{report['left_out_utterances']}")
    if report["skipped_files"]:
        lines.append(f"skipped files: {len(report['skipped_files'])}")
    if report.get("run_id"):
        lines.append(f"run id:      {report['run_id']}")
    return "\n".join(lines)
