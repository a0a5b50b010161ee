"""Level and corpus robustness of a finished cross-validation's fold models.

A microphone is not a corpus: this takes the fold models of one ``train.py ... data.fold=all``
run (``<cv-dir>/fold<k>/model``) and measures, through the inference path (``Predictor``):

* **level**: accuracy and UAR of every fold model on its own test speakers with the audio
  played at other gains (``--gains-db``; samples clipped to [-1, 1] like a real converter),
  against the original level;
* **cross-corpus**: UAR on another corpus (``--target``, all of its speakers, none ever seen)
  over the classes both corpora share. The model still scores all of its classes; the
  prediction is the best-scoring *shared* class, so a class the target lacks is never a
  wrong answer that the target could not have had (stated in the result). Reported per fold
  model (mean ± std) and for the average of all fold models' probabilities (a late-fusion
  ensemble). Several ``--cv-dir`` pool their runs' fold models: the level rows cover every fold
  model, the ensemble averages all of them.

Examples::

    python bench/robustness.py --cv-dir outputs/train/2026-12-01_11-03-02 --target ravdess
    python bench/robustness.py --cv-dir <dir> --corpus ravdess --target emodb --name ravdess-cnn
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as `python bench/robustness.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    RESULTS_DIR,
    command_line,
    compose_train_config,
    format_table,
    machine_info,
    mean_std,
    started_at,
    write_result,
)
from ser_pipeline.metrics import label_scores, summarise_folds  # noqa: E402


def read_corpus(name: str, root: str | None) -> Any:
    """The manifest of ``data=<name>`` read by its configured reader (conf/data), at ``root``
    or the config's default folder."""
    import tempfile

    from hydra.utils import instantiate

    overrides = [f"data={name}", *([f"data.root={root}"] if root else [])]
    with tempfile.TemporaryDirectory() as scratch:
        cfg = compose_train_config(overrides, Path(scratch))
    return instantiate(cfg.data.reader)(cfg.data.root)


def fold_models(cv_dir: Path) -> list[Path]:
    folders = sorted(cv_dir.glob("fold*/model"), key=lambda p: int(p.parent.name[4:]))
    if not folders:
        raise SystemExit(f"no fold models under {cv_dir} (expected fold<k>/model)")
    return folders


def scores(truth: list[str], predicted: list[str]) -> dict[str, float]:
    return label_scores(truth, predicted)


def probabilities(predictor: Any, waves: list[Any]) -> np.ndarray:
    """``(n, n_classes)`` class probabilities, one utterance at a time as infer.py sees them."""
    return np.array([[r["scores"][c] for c in predictor.classes]
                     for w in waves for r in [predictor.predict_waveform(w)]])


def level_rows(model_dir: Path, manifest: Any, gains: list[float]) -> dict[str, Any]:
    """Accuracy / UAR of one fold model on its test speakers at every gain."""
    from ser_pipeline.audio import read_audio
    from ser_pipeline.inference import Predictor

    predictor = Predictor.from_dir(model_dir)
    test = set(predictor.spec.info["split"]["test_speakers"])
    rows = manifest[manifest["speaker"].astype(str).isin(test)
                    & manifest["emotion"].isin(predictor.classes)]
    waves = [read_audio(p, predictor.sample_rate) for p in rows["path"]]
    truth = rows["emotion"].tolist()
    out = {}
    for db in gains:
        gained = [(w * 10.0 ** (db / 20.0)).clamp(-1.0, 1.0) for w in waves]
        probs = probabilities(predictor, gained)
        predicted = [predictor.classes[i] for i in probs.argmax(1)]
        out[f"{db:+g}"] = {**scores(truth, predicted),
                           "most_common_share": max(predicted.count(c) for c in set(predicted))
                           / len(predicted)}
    return out


class _Shared:
    """An extractor call computed once per (extractor config, waveform object) across models."""

    def __init__(self, compute: Any, config: dict[str, Any], cache: dict[Any, Any]) -> None:
        self.compute, self.cache = compute, cache
        self.key = json.dumps(config, sort_keys=True, default=str)

    def __call__(self, waveform: Any) -> Any:
        key = (self.key, id(waveform))
        if key not in self.cache:  # the waveform is kept, so that its id is never reused
            self.cache[key] = (waveform, self.compute(waveform))
        return self.cache[key][1]

    def __getattr__(self, name: str) -> Any:  # the wrapped extractor's other attributes
        return getattr(self.compute, name)


def share_extraction(predictors: list[Any]) -> dict[Any, Any]:
    """Let fold models that share a feature config share its features, so scoring a corpus
    with ten fold models extracts each file once instead of ten times (what the models do
    with the features, normalisation included, stays their own). Only for waveforms that
    stay alive while the predictors are used (the cache is keyed by the object); a model
    with test-time augmentation (new views every call) keeps its own extraction. Returns the
    cache."""
    cache: dict[Any, Any] = {}
    for predictor in predictors:
        if predictor.tta_views > 1:
            continue
        model = predictor.model
        model.extractor = _Shared(model.extractor, model.extractor.config(), cache)
        if model.functionals is not None:  # the stream's unnormalised vector
            model.functionals.raw = _Shared(model.functionals.raw, model.functionals.config(),
                                            cache)
    return cache


def cross_corpus(models: list[Path], target: Any) -> dict[str, Any]:
    """Per-model and ensemble UAR on ``target`` over the shared classes."""
    from ser_pipeline.audio import read_audio
    from ser_pipeline.inference import Predictor

    predictors = [Predictor.from_dir(m) for m in models]
    share_extraction(predictors)
    classes = predictors[0].classes
    shared = [c for c in classes if c in set(target["emotion"])]
    rows = target[target["emotion"].isin(shared)]
    truth = rows["emotion"].tolist()
    waves = [read_audio(p, predictors[0].sample_rate) for p in rows["path"]]
    columns = [classes.index(c) for c in shared]
    per_model, total = [], None
    for predictor in predictors:
        probs = probabilities(predictor, waves)[:, columns]
        total = probs if total is None else total + probs
        per_model.append(scores(truth, [shared[i] for i in probs.argmax(1)]))
    ensemble = scores(truth, [shared[i] for i in total.argmax(1)])
    return {"shared_classes": shared, "utterances": len(rows),
            "speakers": int(rows["speaker"].nunique()), "per_model": per_model,
            **summarise_folds(per_model, list(ensemble)),
            "ensemble": ensemble, "chance_uar": 1.0 / len(shared)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/robustness.py", description=__doc__.split("\n")[0])
    parser.add_argument("--cv-dir", type=Path, action="append", required=True,
                        help="output folder of a data.fold=all run (holds fold<k>/model); "
                             "repeat it to pool several runs' fold models (e.g. the deep recipe "
                             "and model=svm on the same folds) into one ensemble")
    parser.add_argument("--corpus", default="emodb", help="the corpus the folds were trained on")
    parser.add_argument("--root", help="its folder (default: the data config's root)")
    parser.add_argument("--target", help="another corpus for cross-corpus UAR, e.g. ravdess")
    parser.add_argument("--target-root", help="its folder (default: the data config's root)")
    parser.add_argument("--gains-db", type=float, nargs="+", default=[0.0, -20.0, -10.0, 10.0])
    parser.add_argument("--name", help="result file suffix (default: the corpus and cv folder)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    begun, started = started_at(), time.perf_counter()
    models = [m for cv_dir in args.cv_dir for m in fold_models(cv_dir)]
    manifest = read_corpus(args.corpus, args.root)
    gains = [0.0, *[g for g in args.gains_db if g != 0.0]]
    levels = [level_rows(m, manifest, gains) for m in models]
    level = {}
    for gain in levels[0]:
        summary = summarise_folds([fold[gain] for fold in levels], list(levels[0][gain]))
        level[gain] = {k: {"mean": summary["mean"][k], "std": summary["std"][k]}
                       for k in levels[0][gain]}
    from ser_pipeline.artifact import load_model_dir

    specs = [load_model_dir(fold_models(cv_dir)[0]).spec for cv_dir in args.cv_dir]
    result: dict[str, Any] = {
        "benchmark": "robustness", "corpus": args.corpus,
        "cv_dir": ", ".join(str(d) for d in args.cv_dir),
        "model": "+".join(str(s.info.get("model")) for s in specs),
        "normalization": "+".join(str(s.normalization) for s in specs),
        "folds": len(models), "level": level, "level_per_fold": levels,
        "command": command_line("bench/robustness.py", argv), "started_at": begun,
        "machine": machine_info()}
    print(format_table(["gain dB", "accuracy", "UAR", "share of the most frequent answer"],
                       [[g, mean_std(v["wa"]["mean"], v["wa"]["std"]),
                         mean_std(v["uar"]["mean"], v["uar"]["std"]),
                         f"{v['most_common_share']['mean']:.2f}"] for g, v in level.items()]))
    if args.target:
        result["target"] = args.target
        result["cross_corpus"] = cross_corpus(models, read_corpus(args.target, args.target_root))
        cc = result["cross_corpus"]
        print(f"\n{args.corpus} -> {args.target} ({len(cc['shared_classes'])} shared classes, "
              f"{cc['utterances']} utterances): UAR per fold model "
              f"{mean_std(cc['mean']['uar'], cc['std']['uar'])}, ensemble of {len(models)} "
              f"{cc['ensemble']['uar']:.3f} (chance {cc['chance_uar']:.3f})")
    result["wall_seconds"] = time.perf_counter() - started
    name = args.name or f"{args.corpus}-{result['model']}-{result['normalization']}"
    path = write_result(result, f"robustness-{name}", args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
