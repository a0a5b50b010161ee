"""Everything MLflow: the store, runs and their status, and what a run logs.

One place for tracking, so models, data and the LightningModule never import
mlflow. The default store is a SQLite database plus an artifact folder, both
under ``mlruns/`` (MLflow 3 rejects plain file stores); ``MLFLOW_TRACKING_URI``
or ``logger.tracking_uri`` point elsewhere, e.g. an ``mlflow server`` over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from ser_pipeline.metrics import confusion_report
from ser_pipeline.splits import Split

log = logging.getLogger(__name__)

#: the package's own folder: its checkout is the code's version, wherever the project root is
PACKAGE_DIR = Path(__file__).resolve().parent


class TrackingUnavailableError(RuntimeError):
    """The tracking store cannot be reached; raised before any training starts."""


def default_tracking_uri(mlruns_dir: str | Path) -> str:
    """``sqlite:///<abs>/mlruns/mlflow.db``; the artifact folder sits beside it."""
    return f"sqlite:///{Path(mlruns_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, mlruns_dir: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI``, else the configured URI, else the default SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or default_tracking_uri(mlruns_dir)


def check_tracking_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming ``uri``, when the store is unreachable or misconfigured."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as reply:
                if reply.status != 200:
                    raise TrackingUnavailableError(
                        f"MLflow tracking server at {uri} answered HTTP {reply.status} on /health")
        except (urllib.error.URLError, OSError) as error:
            raise TrackingUnavailableError(
                f"MLflow tracking server at {uri} is unreachable ({error}). Start it, fix "
                "MLFLOW_TRACKING_URI / logger.mlflow.tracking_uri, or run with logger=none."
            ) from error
        return
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingUnavailableError(
                f"cannot create the tracking folder {folder} for {uri}: {error}") from error
        if not os.access(folder, os.W_OK):
            raise TrackingUnavailableError(f"tracking folder {folder} ({uri}) is not writable")
        return
    if "://" not in uri or uri.startswith("file:"):
        raise TrackingUnavailableError(
            f"tracking URI '{uri}' is a plain file store, which MLflow 3 rejects; use "
            "sqlite:///path/mlflow.db or an http(s):// server")


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An inter-process lock (POSIX ``flock``) on ``path``; a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: no local multi-process safety beyond the database's own
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Serialise the first connection of local processes to a ``sqlite:///`` store.

    Why: MLflow (and Optuna) create and migrate their tables on first use; two
    processes doing that at once on a fresh file break the schema ("duplicate
    column", alembic errors). Other URIs pass through.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri.removeprefix("sqlite:///"))
    with exclusive_lock(path.parent / f".{path.name}.lock"):
        yield


def get_or_create_experiment(name: str, artifact_root: str | Path | None) -> str:
    """Experiment id for ``name``; new local experiments keep artifacts under ``artifact_root``."""
    with first_use_lock(mlflow.get_tracking_uri()):
        experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # another process created it between our lookup and create: use theirs
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_state(root: str | Path) -> dict[str, str]:
    """``{"git_commit": sha, "git_dirty": "true"/"false"}``, or "unknown" outside a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout
        return {"git_commit": commit, "git_dirty": str(bool(dirty.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def code_version() -> dict[str, str]:
    """Git state of the checkout this package runs from (not of ``paths.root_dir``)."""
    return git_state(PACKAGE_DIR)


def sweep_tags() -> dict[str, str]:
    """Tags that group the jobs of one Hydra multirun (empty for a single run)."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    return {"sweep_id": Path(hydra_cfg.sweep.dir).name, "sweep_dir": str(hydra_cfg.sweep.dir),
            "sweep_job": str(hydra_cfg.job.num),
            "sweep_overrides": ",".join(hydra_cfg.overrides.task)}


def run_tags(cfg: DictConfig, split: Split | Sequence[Split] | None = None,
             extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The tags every run carries: code version, corpus, and what its split promises.

    ``split`` is a training run's fold (adds ``fold`` and ``test_speakers``) or every fold of
    a cross-validation (its parent: speaker-independent only if every fold is); a study
    parent has none. Speaker independence is always the :class:`Split`'s own flag, never
    re-derived from the protocol's name. ``cfg.tags`` and ``extra`` come last.
    """
    tags = {**code_version(), "corpus": str(cfg.data.name)}
    if split is not None:
        folds = [split] if isinstance(split, Split) else list(split)
        independent = all(fold.speaker_independent for fold in folds)
        tags.update({
            "model": str(cfg.model.name),
            "split_protocol": folds[0].protocol,
            "speaker_independent": str(independent).lower(),
            "evaluation": ("speaker-independent" if independent
                           else "SPEAKER-DEPENDENT (same speakers in train and test)"),
            "normalization": str(cfg.data.get("normalization", "global")),
            "n_folds": str(folds[0].n_folds),
        })
        if isinstance(split, Split):
            tags.update(fold=str(split.fold), test_speakers=",".join(split.test_speakers))
    return {**tags, **sweep_tags(), **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()},
            **{str(k): str(v) for k, v in (extra or {}).items()}}


def tracking_config(cfg: DictConfig) -> DictConfig | None:
    """``cfg.logger.mlflow``, or None when the run is not tracked (``logger=none``)."""
    return cfg.logger.get("mlflow") if cfg.get("logger") else None


def setup_tracking(cfg: DictConfig) -> str | None:
    """Point MLflow at the configured store (checked now, before any training); experiment id."""
    mlflow_cfg = tracking_config(cfg)
    if mlflow_cfg is None:
        return None
    mlruns = Path(cfg.paths.mlruns_dir)
    uri = resolve_tracking_uri(mlflow_cfg.get("tracking_uri"), mlruns)
    check_tracking_store(uri)
    mlflow.set_tracking_uri(uri)
    artifact_root = mlruns / "artifacts" if uri.startswith("sqlite:") else None
    return get_or_create_experiment(mlflow_cfg.experiment_name, artifact_root)


def flatten_config(cfg: DictConfig | dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"model.net.lstm_hidden": "128", ...}`` (MLflow params are strings)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


def log_params(params: dict[str, str]) -> None:
    """Log params in batches (the REST API limits a batch to 100), values cut to 6000 chars."""
    items = [(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start : start + 100]))


@contextlib.contextmanager
def tracked_run(
    experiment_id: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run whose status tells what happened.

    FINISHED on success; KILLED on Ctrl-C / SIGTERM (KeyboardInterrupt, or the
    SystemExit Lightning raises after it shuts down on one); FAILED on any other
    exception. Whatever was logged before stays.
    """
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags,
                           parent_run_id=parent_run_id, nested=parent_run_id is not None)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield run
        status = RunStatus.to_string(RunStatus.FINISHED)
    except (KeyboardInterrupt, SystemExit) as error:
        status = RunStatus.to_string(RunStatus.KILLED)
        if isinstance(error, SystemExit) and error.code in (0, None):
            status = RunStatus.to_string(RunStatus.FINISHED)
        raise
    finally:
        try:
            mlflow.end_run(status=status)
        except Exception:  # e.g. a signal broke the store session mid-write: a fresh client
            log.exception("could not end run %s; retrying with a new client", run.info.run_id)
            MlflowClient(mlflow.get_tracking_uri()).set_terminated(run.info.run_id, status)


def end_unfinished_children(parent_run_id: str, status: str) -> list[str]:
    """End every child run of ``parent_run_id`` still RUNNING with ``status``; their ids.

    For a parent whose worker processes are gone: a worker killed mid-run (or one whose last
    write to the store failed) cannot end its own run, and a run must never stay RUNNING.
    """
    tracking = MlflowClient(mlflow.get_tracking_uri())
    experiment_id = tracking.get_run(parent_run_id).info.experiment_id
    stale = tracking.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' "
                         "and attributes.status = 'RUNNING'")
    for run in stale:
        log.warning("run %s was left RUNNING by its worker: marking it %s", run.info.run_id,
                    status)
        tracking.set_terminated(run.info.run_id, status)
    return [run.info.run_id for run in stale]


# -- figures and reports ------------------------------------------------------------------------

def confusion_figure(confusion: np.ndarray, labels: list[str], title: str):
    """Counts and row-normalised confusion matrices side by side (matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float),
                           where=rows > 0)
    size = max(4.0, 0.6 * len(labels) + 2)
    figure, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), constrained_layout=True)
    for axis, matrix, name, fmt in ((axes[0], confusion, "counts", "d"),
                                    (axes[1], normalised, "row-normalised (recall)", ".2f")):
        image = axis.imshow(matrix, cmap="Blues", vmin=0, vmax=max(matrix.max(), 1e-9))
        axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        axis.set_yticks(range(len(labels)), labels)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(name)
        threshold = matrix.max() / 2
        for (r, c), value in np.ndenumerate(matrix):
            axis.text(c, r, format(value, fmt), ha="center", va="center",
                      color="white" if value > threshold else "black", fontsize=8)
        figure.colorbar(image, ax=axis, shrink=0.8)
    figure.suptitle(title)
    return figure


def log_confusion(confusion: np.ndarray, labels: list[str], name: str, title: str) -> None:
    """``confusion/<name>.png`` (counts + row-normalised) and ``confusion/<name>.json``."""
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion).astype(int)
    figure = confusion_figure(confusion, labels, title)
    mlflow.log_figure(figure, f"confusion/{name}.png")
    plt.close(figure)
    mlflow.log_dict({"labels": labels, "counts": confusion.tolist(),
                     "report": confusion_report(confusion, labels)},
                    f"confusion/{name}.json")


def client() -> MlflowClient:
    return MlflowClient()


def register_model(
    model_uri: str, name: str, metric: str, value: float, alias: str | None
) -> Any:
    """Register ``model_uri`` under ``name``; move ``alias`` to it if it beats the holder."""
    version = mlflow.register_model(model_uri, name)
    tracking = client()
    tracking.set_model_version_tag(name, version.version, metric, str(value))
    if alias:
        try:
            holder = tracking.get_model_version_by_alias(name, alias)
            holder_value = float(holder.tags.get(metric, "-inf"))
        except mlflow.exceptions.MlflowException:
            holder_value = float("-inf")
        if value > holder_value:
            tracking.set_registered_model_alias(name, alias, version.version)
            log.info("model %s version %s is the new '%s' (%s %.4f > %.4f)", name,
                     version.version, alias, metric, value, holder_value)
    return version
