"""Accuracy: full speaker-independent cross-validation of every model, through ``train.py``.

For each (protocol, model) this runs the real entry point in a subprocess::

    python train.py data=<corpus> [data.root=...] data.fold=all data.split=<protocol> \\
        model=<model> feature=<feature> +tags.bench_id=<id> [overrides...]

``data.fold=all`` trains every fold as an MLflow child run of one parent run
(``ser_pipeline.crossval``); checkpointing and early stopping choose on each fold's
validation speakers, never on its test speakers. This script then finds the parent run by
its ``bench_id`` tag and reads its ``cv/summary.json`` (per-fold UAR, WA, macro-F1,
validation UAR, epochs; mean and sample std) and ``confusion/test_sum_over_folds.json``
(the test confusion matrix summed over folds), and writes
``bench/results/accuracy-<corpus>-<protocol>-<model>.json`` with the exact command, the
machine, the wall time and the child process' peak memory.

Any corpus with a reader works, e.g. ``--corpus ravdess --root /data/RAVDESS --protocols
group_kfold``. Examples::

    python bench/accuracy.py                                     # EMO-DB, LOSO + LTSO, all models
    python bench/accuracy.py --models cnn_blstm_attn --protocols loso --threads 2
    python bench/accuracy.py --models cnn_blstm_attn -- trainer.max_epochs=40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/accuracy.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    MODEL_FEATURES,
    REPO,
    RESULTS_DIR,
    command_line,
    compose_train_config,
    format_table,
    machine_info,
    mean_std,
    split_model_feature,
    started_at,
    write_result,
)

PROTOCOLS = ("loso", "ltso", "group_kfold", "random")
SUMMARY_ARTIFACT = "cv/summary.json"
CONFUSION_ARTIFACT = "confusion/test_sum_over_folds.json"


def train_overrides(corpus: str, root: str | None, protocol: str, model: str, feature: str,
                    bench_id: str, extra: list[str]) -> list[str]:
    """``train.py`` overrides for one cross-validation; the user's ``extra`` come last (win)."""
    overrides = [f"data={corpus}"]
    if root:
        overrides.append(f"data.root={root}")
    overrides += ["data.fold=all", f"data.split={protocol}", f"model={model}",
                  f"feature={feature}", "data.progress=false", "trainer.enable_progress_bar=false",
                  f"+tags.bench_id={bench_id}"]
    return [*overrides, *extra]


def effective_feature(overrides: list[str], feature: str) -> str:
    """The feature config ``train.py`` will use: the last ``feature=`` override wins, as in
    Hydra (a user's ``-- feature=...`` after the model's seed feature)."""
    for override in overrides:
        if override.startswith("feature="):
            feature = override.split("=", 1)[1]
    return feature


def bench_argv(corpus: str, root: str | None, protocol: str, model: str, feature: str,
               threads: int | None, extra: list[str]) -> list[str]:
    """Arguments of this script that rerun exactly one (protocol, model)."""
    argv = ["--corpus", corpus]
    if root:
        argv += ["--root", root]
    argv += ["--protocols", protocol, "--models",
             model if MODEL_FEATURES.get(model) == feature else f"{model}:{feature}"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return [*argv, "--", *extra] if extra else argv


def result_name(corpus: str, protocol: str, model: str, feature: str,
                normalization: str = "global", recipe: str | None = None) -> str:
    name = f"accuracy-{corpus}-{protocol}-{model}"
    if MODEL_FEATURES.get(model) != feature:
        name += f"-{feature}"
    if recipe:
        name += f"-recipe-{recipe}"
    return name if normalization == "global" else f"{name}-{normalization}-norm"


def recipe_of(overrides: list[str]) -> str | None:
    """The ``experiment=<recipe>`` among the user's overrides, if any."""
    found = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] in
             ("experiment", "+experiment")]
    return found[-1] if found else None


def run_settings(overrides: list[str]) -> dict[str, str]:
    """The tracking URI, experiment and feature normalisation ``train.py`` will use.

    Composing the same config here resolves them exactly as the run will (``paths.*``,
    ``logger.mlflow.*``, ``$MLFLOW_TRACKING_URI``) and rejects a bad override before any
    training starts.
    """
    from ser_pipeline.tracking import resolve_tracking_uri

    with tempfile.TemporaryDirectory() as scratch:
        cfg = compose_train_config(overrides, Path(scratch))
    mlflow_cfg = cfg.logger.get("mlflow") if cfg.get("logger") else None
    if mlflow_cfg is None:
        raise ValueError("accuracy.py reads results from MLflow: drop logger=none")
    return {"tracking_uri": resolve_tracking_uri(mlflow_cfg.get("tracking_uri"),
                                                 Path(cfg.paths.mlruns_dir)),
            "experiment": str(mlflow_cfg.experiment_name),
            "normalization": str(cfg.data.get("normalization", "global")),
            "functionals": functionals_name(cfg)}


def functionals_name(cfg: Any) -> str | None:
    """The functionals stream a run fuses (``functionals=``), by its feature set: ``lld``,
    ``ComParE_2016``, ``eGeMAPSv02``; None without one."""
    stream = cfg.get("functionals")
    if not stream:
        return None
    extractor = stream.extractor
    return str(extractor.get("feature_set") or extractor._target_.rsplit(".", 1)[-1]
               .removesuffix("Features").lower())


def run_train(overrides: list[str], threads: int | None) -> tuple[int, float, float]:
    """``train.py overrides`` in a subprocess: ``(exit status, wall seconds, peak RSS MiB)``.

    Output goes straight to this terminal; ``os.wait4`` gives the child's own peak memory.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides], env=env)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024


def read_cross_validation(tracking_uri: str, experiment: str, bench_id: str) -> dict[str, Any]:
    """The parent run tagged ``bench_id``: its id, summary and summed confusion matrix."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # two small files
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs(
        [found.experiment_id],
        f"tags.bench_id = '{bench_id}' and tags.cross_validation = 'true'")
    if not runs:
        raise LookupError(f"no cross-validation run tagged bench_id={bench_id} in "
                          f"{tracking_uri} (experiment {experiment})")
    run_id = runs[0].info.run_id
    with tempfile.TemporaryDirectory() as scratch:
        summary = json.loads(Path(client.download_artifacts(run_id, SUMMARY_ARTIFACT, scratch))
                             .read_text())
        confusion = json.loads(Path(client.download_artifacts(run_id, CONFUSION_ARTIFACT,
                                                              scratch)).read_text())
    return {"run_id": run_id, "summary": summary, "confusion": confusion}


def accuracy_result(cv: dict[str, Any]) -> dict[str, Any]:
    """The metrics part of a result file, from :func:`read_cross_validation`'s answer."""
    summary, confusion = cv["summary"], cv["confusion"]
    folds = summary["folds"]
    return {
        "run_id": cv["run_id"],
        "n_folds": summary["n_folds"],
        "folds_run": len(folds),
        "complete": summary["complete"],
        "mean": summary["mean"],
        "std": summary["std"],
        "epochs_mean": sum(f["epochs"] for f in folds) / len(folds),
        "folds": folds,
        "classes": confusion["labels"],
        "confusion": confusion["counts"],
        "per_class": confusion.get("report"),
    }


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["corpus"], r["protocol"], r["model"], f"{r['folds_run']}/{r['n_folds']}",
             mean_std(r["mean"]["uar"], r["std"]["uar"]),
             mean_std(r["mean"]["wa"], r["std"]["wa"]),
             mean_std(r["mean"]["f1"], r["std"]["f1"]),
             f"{r['epochs_mean']:.1f}", f"{r['wall_seconds'] / 60:.1f}"] for r in results]


TABLE_HEADERS = ["corpus", "protocol", "model", "folds", "UAR", "WA", "macro-F1", "epochs",
                 "wall min"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/accuracy.py",
        description="Speaker-independent cross-validation of every model through train.py; "
        "UAR, WA, macro-F1 (mean ± std over folds), summed confusion, epochs, wall time.")
    parser.add_argument("--corpus", default="emodb", help="data config (conf/data/<name>.yaml)")
    parser.add_argument("--root", help="corpus folder (data.root); default: the config's")
    parser.add_argument("--protocols", nargs="+", default=["loso", "ltso"], choices=PROTOCOLS,
                        help="split protocols (default: loso ltso)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_FEATURES),
                        metavar="MODEL[:FEATURE]",
                        help="models, each with its seed feature unless given (default: all)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for training (OMP_NUM_THREADS; default: PyTorch's)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--label", help="what this run changes (ablations: the lever), stored "
                        "in the result and shown by report.py")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the train.py commands and exit")
    parser.add_argument("overrides", nargs="*",
                        help="further train.py overrides, after --, e.g. -- trainer.max_epochs=40")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        specs = [split_model_feature(spec) for spec in args.models]
    except ValueError as error:
        parser.error(str(error))
    machine = None
    results, failed = [], []
    for protocol in args.protocols:
        for model, feature in specs:
            bench_id = uuid.uuid4().hex[:12]
            # a recipe sets its own model and feature: name them only when asked for
            overrides = train_overrides(args.corpus, args.root, protocol, model, feature,
                                        bench_id, args.overrides)
            command = command_line("train.py", overrides)
            if args.dry_run:
                print(command)
                continue
            settings = run_settings(overrides)
            machine = machine or machine_info()
            begun = started_at()
            print(f"\n=== {protocol} / {model} ({feature}) ===\n{command}", flush=True)
            status, wall, peak = run_train(overrides, args.threads)
            if status != 0:
                print(f"{protocol} / {model}: train.py failed (exit {status})", file=sys.stderr)
                failed.append(f"{protocol}/{model}")
                continue
            used = effective_feature(overrides, feature)
            result = {
                "benchmark": "accuracy",
                "corpus": args.corpus,
                "protocol": protocol,
                "model": model,
                "feature": used,
                "command": command,
                "bench_command": command_line(
                    "bench/accuracy.py",
                    bench_argv(args.corpus, args.root, protocol, model, feature, args.threads,
                               args.overrides)),
                "overrides": overrides,
                "threads": args.threads,
                "started_at": begun,
                "machine": machine,
                "load_average_after": machine_info()["load_average"],
                "wall_seconds": wall,
                "peak_rss_mb": peak,
                "tracking_uri": settings["tracking_uri"],
                "normalization": settings["normalization"],
                "functionals": settings["functionals"],
                "recipe": recipe_of(args.overrides),
                "label": args.label,
                **accuracy_result(read_cross_validation(settings["tracking_uri"],
                                                        settings["experiment"], bench_id)),
            }
            name = result_name(args.corpus, protocol, model, used, settings["normalization"],
                               recipe_of(args.overrides))
            path = write_result(result, name, args.results_dir)
            print(f"wrote {path}", flush=True)
            results.append(result)
    if results:
        print("\n" + format_table(TABLE_HEADERS, table_rows(results)))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
