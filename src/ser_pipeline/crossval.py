"""Cross-validation: every fold of a speaker-independent split, one command.

``python train.py data.fold=all`` calls :func:`cross_validate`: one MLflow parent
run (tags ``protocol``, ``speaker_independent``, ``n_folds``) with one child run
per fold (each a normal :func:`ser_pipeline.training.train` run in
``<output_dir>/fold<k>``), and on the parent the fold metrics, their mean and
standard deviation (``cv/uar_mean``, ``cv/uar_std``, ... for UAR, WA, macro-F1 and
the best validation UAR) and the test confusion matrix summed over folds.

The corpus is read once and written to ``<output_dir>/manifest.csv`` (logged on the parent
run as ``data/manifest.csv``); every fold, in this process or a worker, reads that file, never
the corpus folder or a pickled table. Features come from the on-disk cache after the first
fold, so folds after the first skip extraction.
Fold models are logged but not registered: they are evaluation by-products,
not candidates for the model registry.

``cv.workers=N`` trains N folds at a time, each in its own process with
``threads / N`` threads (on 2 cores, two 1-thread folds beat one 2-thread fold by far).
Every fold seeds itself, so the folds' results are those of the sequential run.

Ctrl-C / SIGTERM: the parent holds the signal (:class:`StopOnSignal`) for the whole
cross-validation and tells its workers to stop through a shared event, never by signalling
them; a worker starts with SIGINT / SIGTERM held pending until its own handler is in place,
so a signal at any moment (while it imports, between folds, as a fold starts) is recorded,
never fatal. A fold that has a run ends it KILLED at the next batch boundary (with
``interrupted.ckpt`` once training began), the parent ends KILLED, and a fold run a dead
worker left RUNNING is marked KILLED by the parent. A signal during the parent's final
logging waits until the summary is logged (the run is complete, FINISHED), then stops.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ser_pipeline import tracking
from ser_pipeline.allocator import keep_freed_memory
from ser_pipeline.callbacks import (
    StopOnSignal,
    TerminationRequested,
    release_held_signals,
    signals_held,
)
from ser_pipeline.corpora.manifest import read_manifest, write_manifest
from ser_pipeline.data import SERDataModule
from ser_pipeline.metrics import summarise_folds as summarise_metrics
from ser_pipeline.splits import Split, count_folds, make_split
from ser_pipeline.training import build_datamodule, log_prediction_reports, train

log = logging.getLogger(__name__)

#: metrics averaged over folds: name in the summary -> key in a fold's test results
FOLD_METRICS = ("uar", "wa", "f1", "val_uar")

#: ``fold_callbacks(fold)`` -> extra Lightning callbacks for that fold (e.g. Optuna pruning)
FoldCallbacks = Callable[[int], list[pl.Callback]]
#: ``stop_after_fold(fold, fold_summary)`` -> True to skip the remaining folds
StopAfterFold = Callable[[int, dict[str, Any]], bool]


#: the corpus manifest every fold reads, in the cross-validation's output folder
MANIFEST_FILE = "manifest.csv"


def _datamodule(cfg: DictConfig, manifest: Path) -> SERDataModule:
    """The configured data module, reading the ``manifest`` file instead of the corpus folder."""
    return build_datamodule(cfg, reader=lambda _root: read_manifest(manifest))


def fold_config(cfg: DictConfig, fold: int, output_dir: Path) -> DictConfig:
    """``cfg`` for one fold: ``data.fold=<fold>``, its own output folder, no registration."""
    fold_cfg = copy.deepcopy(cfg)
    OmegaConf.update(fold_cfg, "data.fold", fold)
    OmegaConf.update(fold_cfg, "paths.output_dir", str(output_dir / f"fold{fold}"))
    if OmegaConf.select(fold_cfg, "logger.mlflow.register") is not None:
        OmegaConf.update(fold_cfg, "logger.mlflow.register", False)
    return fold_cfg


def summarise_folds(folds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1; NaN for one fold) of each fold metric."""
    return summarise_metrics(folds, FOLD_METRICS)


def fold_splits(cfg: DictConfig, manifest: Path) -> list[Split]:
    """Every fold's split, as each fold's data module will make it (class selection included)."""
    probe = _datamodule(cfg, manifest)
    selected = probe.load_manifest()
    options = {**probe.split_options}
    n_folds = count_folds(selected, options["protocol"], options["group_by"], options["n_folds"],
                          options["train_only"])
    return [make_split(selected, **{**options, "fold": fold}) for fold in range(n_folds)]


def cross_validate(
    cfg: DictConfig,
    parent_run_id: str | None = None,
    fold_callbacks: FoldCallbacks | None = None,
    stop_after_fold: StopAfterFold | None = None,
    extra_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train and test every fold of ``cfg.data.split``; returns the aggregate.

    Returns ``{"run_id", "protocol", "n_folds", "classes", "complete", "folds": [{"fold",
    "run_id", "test_speakers", "uar", "wa", "f1", "val_uar", "epochs"}, ...], "mean": {...},
    "std": {...}, "confusion": counts summed over folds (n_classes x n_classes)}``.
    ``parent_run_id`` nests the cross-validation run (an Optuna trial, say) and
    ``stop_after_fold`` may end it early (``complete`` is then False).
    """
    if not cfg.get("test", True):
        raise ValueError("cross-validation needs test=true: it aggregates each fold's test metrics")
    # held from here to the end: no moment at which a signal kills this process by default
    # with the parent run (or a fold's) left RUNNING
    with StopOnSignal() as stop:
        summary = _cross_validate(cfg, stop, parent_run_id, fold_callbacks, stop_after_fold,
                                  extra_tags)
        print(format_summary(summary), flush=True)
        stop.check()  # a signal during the final logging: the complete run is kept, then stop
    return summary


def _cross_validate(cfg: DictConfig, stop: StopOnSignal, parent_run_id: str | None,
                    fold_callbacks: FoldCallbacks | None, stop_after_fold: StopAfterFold | None,
                    extra_tags: dict[str, str] | None) -> dict[str, Any]:
    experiment_id = tracking.setup_tracking(cfg)
    reader = instantiate(cfg.data.reader)
    output_dir = Path(cfg.paths.output_dir)
    manifest = write_manifest(reader(cfg.data.root), output_dir / MANIFEST_FILE)
    splits = fold_splits(cfg, manifest)
    n_folds, protocol = len(splits), splits[0].protocol
    if not all(split.speaker_independent for split in splits):
        log.warning("cross-validating the SPEAKER-DEPENDENT split '%s'", protocol)
    log.info("cross-validation: %d folds of '%s' on %s", n_folds, protocol, cfg.data.name)
    stop.check()
    if experiment_id is None:
        return _run_folds(cfg, manifest, n_folds, output_dir, None, stop, fold_callbacks,
                          stop_after_fold)
    tags = tracking.run_tags(cfg, splits, {"cross_validation": "true", "protocol": protocol,
                                           **(extra_tags or {})})
    run_name = f"{cfg.model.name}-{cfg.data.name}-cv{n_folds}"
    with tracking.tracked_run(experiment_id, run_name, tags, parent_run_id) as run:
        tracking.log_params(tracking.flatten_config(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/train.yaml")
        mlflow.log_artifact(str(manifest), "data")
        summary = _run_folds(cfg, manifest, n_folds, output_dir, run.info.run_id, stop,
                             fold_callbacks, stop_after_fold)
        _log_summary(summary)
    return summary


def _train_fold(cfg: DictConfig, fold: int, output_dir: Path, manifest: Path,
                run_id: str | None, callbacks: list[pl.Callback] | None,
                stop: StopOnSignal) -> dict[str, Any]:
    """Train and test one fold: its summary row, test confusion counts and class names."""
    fold_cfg = fold_config(cfg, fold, output_dir)
    datamodule = _datamodule(fold_cfg, manifest)
    result = train(fold_cfg, parent_run_id=run_id, datamodule=datamodule,
                   extra_callbacks=callbacks, extra_tags={"cv_fold": str(fold)}, stop=stop)
    test = result["test"]
    return {"row": {"fold": fold, "run_id": result.get("run_id"),
                    "test_speakers": list(datamodule.split.test_speakers),
                    "uar": test["uar"], "wa": test["wa"], "f1": test["f1"],
                    "val_uar": result["best_val_uar"], "epochs": result["epochs"]},
            "confusion": result["module"].test_confusion.tolist(),
            "classes": list(datamodule.classes),
            "predictions": result.get("predictions")}


def _run_folds(cfg: DictConfig, manifest: Path, n_folds: int, output_dir: Path,
               run_id: str | None, stop: StopOnSignal, fold_callbacks: FoldCallbacks | None,
               stop_after_fold: StopAfterFold | None) -> dict[str, Any]:
    workers = min(int(OmegaConf.select(cfg, "cv.workers", default=1) or 1), n_folds)
    if workers > 1 and (fold_callbacks or stop_after_fold):
        # pruning callbacks and early stops act between folds of one process (tune.py)
        log.warning("cv.workers=%d ignored: this cross-validation reports each fold as it "
                    "ends (e.g. to a tuning trial), so its folds run one after another", workers)
        workers = 1
    if workers > 1:
        trained = iter(_parallel_folds(cfg, manifest, n_folds, output_dir, run_id, workers,
                                       stop))
    else:
        trained = (_train_fold(cfg, fold, output_dir, manifest, run_id,
                               fold_callbacks(fold) if fold_callbacks else None, stop)
                   for fold in range(n_folds))
    folds: list[dict[str, Any]] = []
    confusion: np.ndarray | None = None
    classes: list[str] = list(cfg.data.classes)
    pooled: dict[str, list] = {}  # every fold's test predictions, for the summed-over reports
    for fold_result in trained:
        row, classes = fold_result["row"], fold_result["classes"]
        folds.append(row)
        for key, values in (fold_result.get("predictions") or {}).items():
            pooled.setdefault(key, []).extend(values)
        fold_confusion = np.asarray(fold_result["confusion"], dtype=np.int64)
        confusion = fold_confusion if confusion is None else confusion + fold_confusion
        log.info("fold %d/%d (test %s): UAR %.4f  WA %.4f  F1 %.4f", row["fold"] + 1, n_folds,
                 ",".join(row["test_speakers"]), row["uar"], row["wa"], row["f1"])
        if run_id is not None:
            mlflow.log_metrics({f"cv/fold_{name}": row[name] for name in FOLD_METRICS},
                               step=row["fold"])
        if stop_after_fold is not None and stop_after_fold(row["fold"], row):
            break
    return {"run_id": run_id, "protocol": str(cfg.data.split), "n_folds": n_folds,
            "classes": classes, "complete": len(folds) == n_folds, "folds": folds,
            **summarise_folds(folds), "confusion": confusion.tolist(),
            "predictions": pooled or None}


def _parallel_folds(cfg: DictConfig, manifest: Path, n_folds: int, output_dir: Path,
                    run_id: str | None, workers: int, stop: StopOnSignal) -> list[dict[str, Any]]:
    """Every fold's result (in fold order), trained by ``workers`` processes.

    Why not ``concurrent.futures``: on Ctrl-C / SIGTERM the workers must be told to stop
    (their folds then end KILLED with a checkpoint, like a sequential run's), and a process
    pool does not hand out its processes. A fold that fails stops the others and raises here.
    """
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch/MLflow
    jobs: Any = context.Queue()
    results: Any = context.Queue()
    stop_workers = context.Event()
    for fold in range(n_folds):
        jobs.put(fold)
    for _ in range(workers):
        jobs.put(None)  # one "no more folds" per worker
    threads = max(1, torch.get_num_threads() // workers)
    # ${hydra:...} (paths.output_dir) only resolves in this process; everything else stays an
    # interpolation, so that ${paths.output_dir}/checkpoints follows each fold's folder
    resolved = OmegaConf.to_container(cfg, resolve=False)
    resolved["paths"] = OmegaConf.to_container(cfg.paths, resolve=True)
    processes = [context.Process(
        target=_fold_worker, name=f"cv-worker-{i}",
        args=(resolved, str(manifest), str(output_dir), run_id, threads, jobs, results,
              stop_workers))
        for i in range(workers)]
    log.info("cross-validation: %d worker processes, %d thread(s) each", workers, threads)
    done: dict[int, dict[str, Any]] = {}
    try:
        with signals_held():  # each worker starts with SIGINT / SIGTERM pending, not fatal
            for process in processes:
                process.start()
        while len(done) < n_folds:
            stop.check()
            try:
                fold, kind, outcome = results.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in processes) and results.empty():
                    raise RuntimeError("cross-validation workers exited before every fold "
                                       f"was trained ({len(done)}/{n_folds} done)") from None
                continue
            if kind == "interrupted":  # a signal reached the worker itself (e.g. its pid)
                raise TerminationRequested(f"a cross-validation worker stopped: {outcome}")
            if kind == "failed":
                raise RuntimeError(f"fold {fold} failed:\n{outcome}")
            done[fold] = outcome
    except BaseException:
        stop_workers.set()  # each fold stops at its next batch boundary, KILLED
        _wait_for(processes)
        if run_id is not None:
            tracking.end_unfinished_children(run_id, "KILLED")
        raise
    for process in processes:
        process.join()
    return [done[fold] for fold in range(n_folds)]


def _wait_for(processes: list[Any], grace_s: float = 300.0) -> None:
    """Join workers that were told to stop; one still alive after ``grace_s`` is stuck inside
    a step and is killed (the caller then ends the fold run it leaves RUNNING)."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("%s has not stopped after %.0f s: killing it", process.name, grace_s)
            process.kill()
            process.join()


def _fold_worker(resolved: dict, manifest: str, output_dir: str, run_id: str | None,
                 threads: int, jobs: Any, results: Any, stop_workers: Any) -> None:
    """A worker process: train folds from ``jobs`` until told to stop; report to ``results``.

    It receives the config and the path of the cross-validation's ``manifest.csv`` (plain
    values, nothing pickled beyond them); each fold's data module reads that file.

    Results are ``(fold, "done" | "failed" | "interrupted", summary | traceback | reason)``.
    """
    # SIGINT / SIGTERM have been held since this process was spawned (the parent's
    # signals_held): from here on they are recorded, and delivered now if they came already
    with StopOnSignal(requested=stop_workers) as stop:
        release_held_signals()
        logging.basicConfig(level=logging.INFO,
                            format="[%(asctime)s][%(processName)s][%(name)s] - %(message)s")
        torch.set_num_threads(threads)
        keep_freed_memory()  # a spawned process starts with glibc's defaults (allocator.py)
        cfg = OmegaConf.create(resolved)
        while True:
            try:
                stop.check()  # between folds: do not start another
            except TerminationRequested as stopped:
                results.put((None, "interrupted", str(stopped)))
                return
            if (fold := jobs.get()) is None:
                return
            try:
                results.put((fold, "done", _train_fold(cfg, fold, Path(output_dir),
                                                       Path(manifest), run_id, None, stop)))
            except (KeyboardInterrupt, SystemExit) as stopped:  # its run ended KILLED
                results.put((fold, "interrupted", repr(stopped)))
                return
            except Exception:
                results.put((fold, "failed", traceback.format_exc()))
                return


def _log_summary(summary: dict[str, Any]) -> None:
    """Mean/std metrics, the summed confusion matrix and the per-fold table on the active run."""
    metrics = {f"cv/{name}_{stat}": summary[stat][name]
               for name in FOLD_METRICS for stat in ("mean", "std")}
    metrics["cv/folds_run"] = len(summary["folds"])
    mlflow.log_metrics(metrics)
    mlflow.set_tag("cv_complete", str(summary["complete"]).lower())
    mean, std = summary["mean"], summary["std"]
    tracking.log_confusion(
        np.asarray(summary["confusion"]), summary["classes"], "test_sum_over_folds",
        f"test, summed over {len(summary['folds'])} folds of {summary['protocol']} "
        f"(UAR {mean['uar']:.3f} ± {std['uar']:.3f})")
    mlflow.log_dict({k: summary[k] for k in ("protocol", "n_folds", "complete", "folds",
                                             "mean", "std")}, "cv/summary.json")
    if summary.get("predictions"):  # per speaker / gender and calibration over every fold
        log_prediction_reports(summary["predictions"], summary["classes"], "test_over_folds")


def format_summary(summary: dict[str, Any]) -> str:
    """A fold table plus mean ± std lines, for the console."""
    lines = ["", f"=== cross-validation: {summary['protocol']}, "
                 f"{len(summary['folds'])}/{summary['n_folds']} folds ===",
             "fold  test speakers         UAR     WA      F1      val UAR"]
    for fold in summary["folds"]:
        speakers = ",".join(fold["test_speakers"])[:20]
        lines.append(f"{fold['fold']:>4}  {speakers:<20}  {fold['uar']:.4f}  {fold['wa']:.4f}  "
                     f"{fold['f1']:.4f}  {fold['val_uar']:.4f}")
    for name, label in (("uar", "UAR"), ("wa", "WA"), ("f1", "macro-F1"),
                        ("val_uar", "val UAR")):
        lines.append(f"{label + ':':<10}{summary['mean'][name]:.4f} ± {summary['std'][name]:.4f}")
    if summary.get("run_id"):
        lines.append(f"run id:   {summary['run_id']}")
    return "\n".join(lines)
