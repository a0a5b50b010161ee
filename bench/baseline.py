"""A classic reference on the very same folds: utterance functionals + an RBF SVM.

Why: the seeds' and the literature's EMO-DB figures (openSMILE + SVM, about 73-77 % LOSO)
come from other splits and tools. This rebuilds that kind of baseline from the project's own
parts - corpus reader, speaker-independent splits (``ser_pipeline.splits``), the 34 LLDs of
``feature=lld`` and the feature cache - so the deep models' lines in the README can be read
against it fold for fold. The functionals and the SVM fit are ``ser_pipeline.classic``'s, the
code of ``model=svm``: ``python train.py model=svm data.fold=all`` runs the same reference as a
pipeline model (MLflow runs, a registered model ``infer.py`` loads) and gives the same global
fold figures; this script adds the transductive *speaker* normalisation of the functionals
and writes the benchmark results.

Per utterance: the 34 LLDs and their deltas, each summarised by 8 functionals (mean, std,
min, max, 10th/50th/90th percentile, linear slope) = 544 numbers. Per fold: features are
standardised, ``C`` and ``gamma`` are chosen by UAR on the fold's *validation speakers* (the
test speakers are never looked at), and the SVM is refit on training + validation speakers
with that choice. Two normalisations:

* ``global`` - z-scores with the training speakers' statistics (what a deployed model does);
* ``speaker`` - every speaker's utterances z-scored with that speaker's own statistics, the
  classic "speaker normalisation". It needs unlabelled audio of the test speaker (its
  statistics, not its labels) before predicting: a transductive setting, labelled as such.

Examples::

    python bench/baseline.py                                   # EMO-DB, LOSO + LTSO, both norms
    python bench/baseline.py --corpus ravdess --root /data/RAVDESS --protocols group_kfold
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as `python bench/baseline.py`: make `bench` importable
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
from ser_pipeline.classic import (
    C_GRID,
    FUNCTIONALS,
    GAMMA_SCALES,
    fit_with_validation_grid,
    functionals,  # noqa: F401 - bench.baseline.functionals, the one implementation
    utterance_vector,
)

NORMALIZATIONS = ("global", "speaker")
PROTOCOLS = ("loso", "ltso", "group_kfold")


def utterance_table(overrides: list[str]) -> tuple[Any, np.ndarray, dict[str, str], Any]:
    """``(manifest, functionals per row, skipped files, config)`` for the composed data config."""
    from ser_pipeline.audio import read_audio
    from ser_pipeline.features.cache import FeatureCache, extract_features
    from ser_pipeline.training import build_datamodule

    with tempfile.TemporaryDirectory() as scratch:
        cfg = compose_train_config([*overrides, "feature=lld"], Path(scratch))
    datamodule = build_datamodule(cfg)
    manifest = datamodule.load_manifest()
    extractor = datamodule.extractor
    cache = FeatureCache(datamodule.cache_dir, extractor.config()) if datamodule.cache_dir else None
    features, skipped = extract_features(
        manifest["path"].tolist(),
        lambda path: extractor(read_audio(path, extractor.sample_rate)),
        cache, f"{datamodule.name} LLDs", progress=False)
    keep = np.array([f is not None for f in features])
    table = np.stack([utterance_vector(f, "functionals") for f in features if f is not None])
    return manifest[keep].reset_index(drop=True), table, skipped, cfg


def speaker_normalized(table: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    """Each speaker's rows z-scored with that speaker's own mean and std (labels unused)."""
    out = np.empty_like(table)
    for speaker in np.unique(speakers):
        rows = speakers == speaker
        mean, std = table[rows].mean(0), table[rows].std(0)
        out[rows] = (table[rows] - mean) / np.where(std > 1e-8, std, 1.0)
    return out


def run_fold(table: np.ndarray, labels: np.ndarray, parts: dict[str, np.ndarray]
             ) -> dict[str, Any]:
    """Choose (C, gamma) on validation speakers, refit on train + val, score the test speakers."""
    from ser_pipeline.metrics import label_scores

    train, val, test = parts["train"], parts["val"], parts["test"]
    model, chosen = fit_with_validation_grid(table[train], labels[train], table[val],
                                             labels[val], C_GRID, GAMMA_SCALES)
    predicted = model.predict(table[test])
    return {"val_uar": chosen["val_uar"], "C": chosen["C"], "gamma_scale": chosen["gamma_scale"],
            "predicted": predicted, **label_scores(labels[test], predicted)}


def cross_validate(manifest: Any, table: np.ndarray, cfg: Any, protocol: str,
                   normalisation: str) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix

    from ser_pipeline.metrics import summarise_folds
    from ser_pipeline.splits import count_folds, make_split

    classes = list(cfg.data.classes)
    labels = manifest["emotion"].to_numpy()
    if normalisation == "speaker":
        table = speaker_normalized(table, manifest["speaker"].to_numpy())
    options = dict(group_by=cfg.data.group_by, n_folds=cfg.data.n_folds,
                   val_speakers=cfg.data.val_speakers, seed=cfg.seed)
    n_folds = count_folds(manifest, protocol, cfg.data.group_by, cfg.data.n_folds)
    folds, confusion = [], np.zeros((len(classes), len(classes)), dtype=int)
    for fold in range(n_folds):
        split = make_split(manifest, protocol, fold, **options)
        ids = manifest["id"]
        parts = {name: ids.isin(getattr(split, name)).to_numpy()
                 for name in ("train", "val", "test")}
        result = run_fold(table, labels, parts)
        confusion += confusion_matrix(labels[parts["test"]], result.pop("predicted"),
                                      labels=classes)
        folds.append({"fold": fold, "test_speakers": split.test_speakers,
                      "val_speakers": split.val_speakers, **result})
    # mean and sample std over folds: the one summary train.py's cross-validation reports too
    return {"n_folds": n_folds, "folds": folds, "classes": classes,
            "confusion": confusion.tolist(), **summarise_folds(folds, ("uar", "wa", "f1"))}


TABLE_HEADERS = ["corpus", "protocol", "normalisation", "folds", "UAR", "WA", "macro-F1",
                 "seconds"]


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["corpus"], r["protocol"], r["normalisation"], str(r["n_folds"]),
             mean_std(r["mean"]["uar"], r["std"]["uar"]), mean_std(r["mean"]["wa"], r["std"]["wa"]),
             mean_std(r["mean"]["f1"], r["std"]["f1"]), f"{r['wall_seconds']:.0f}"]
            for r in results]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/baseline.py",
        description="Reference baseline on the pipeline's own folds: LLD functionals + RBF SVM "
        "(C and gamma chosen on validation speakers).")
    parser.add_argument("--corpus", default="emodb", help="data config (conf/data/<name>.yaml)")
    parser.add_argument("--root", help="corpus folder (data.root); default: the config's")
    parser.add_argument("--protocols", nargs="+", default=["loso", "ltso"], choices=PROTOCOLS)
    # --normalisations: the spelling of earlier result files' reproduce lines
    parser.add_argument("--normalizations", "--normalisations", dest="normalizations",
                        nargs="+", default=list(NORMALIZATIONS),
                        choices=NORMALIZATIONS)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("overrides", nargs="*", help="further train.py data overrides, after --")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    overrides = [f"data={args.corpus}", *([f"data.root={args.root}"] if args.root else []),
                 *args.overrides]
    began = time.perf_counter()
    manifest, table, skipped, cfg = utterance_table(overrides)
    extract_seconds = time.perf_counter() - began
    print(f"{len(manifest)} utterances, {table.shape[1]} functionals each, "
          f"{len(skipped)} skipped, features in {extract_seconds:.1f} s", flush=True)
    machine, results = machine_info(), []
    for protocol, normalisation in itertools.product(args.protocols, args.normalizations):
        begun, started = started_at(), time.perf_counter()
        cv = cross_validate(manifest, table, cfg, protocol, normalisation)
        argv_one = ["--corpus", args.corpus, *(["--root", args.root] if args.root else []),
                    "--protocols", protocol, "--normalizations", normalisation,
                    *(["--", *args.overrides] if args.overrides else [])]
        result = {
            "benchmark": "baseline",
            "corpus": args.corpus,
            "protocol": protocol,
            "normalisation": normalisation,
            "transductive": normalisation == "speaker",
            "model": "RBF SVM (class-balanced)",
            "feature": f"34 LLDs + deltas x {len(FUNCTIONALS)} functionals ({table.shape[1]})",
            "grid": {"C": list(C_GRID), "gamma_times_1_over_d": list(GAMMA_SCALES)},
            "selection": "validation speakers' UAR; refit on train + validation speakers",
            "command": command_line("bench/baseline.py", argv_one),
            "started_at": begun,
            "machine": machine,
            "utterances": len(manifest),
            "skipped_files": len(skipped),
            "feature_seconds": extract_seconds,
            "wall_seconds": time.perf_counter() - started,
            **cv,
        }
        path = write_result(result, f"baseline-{args.corpus}-{protocol}-{normalisation}",
                            args.results_dir)
        print(f"{protocol} / {normalisation}: UAR {mean_std(cv['mean']['uar'], cv['std']['uar'])}"
              f"  -> {path}", flush=True)
        results.append(result)
    print("\n" + format_table(TABLE_HEADERS, table_rows(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
