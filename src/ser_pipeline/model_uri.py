"""Which model ``infer.py`` uses: a model URI or folder turned into a local model directory.

Accepted: ``runs:/<run_id>/<path>``, ``models:/<name>/<version>``,
``models:/<name>@<alias>``, ``models:/<model_id>`` (what training prints) and local
folders. A folder may be a model directory itself (``model.yaml`` + safetensors, or an
ensemble directory: ``ensemble.yaml`` + its members' model directories) or
the root of a logged pyfunc model, which keeps the model directory as its
``model_dir`` artifact (``artifacts/<folder name>/`` beside ``MLmodel``).

Without a URI: the newest registered model version in the tracking store, else the
model of the newest finished run; the store is ``$MLFLOW_TRACKING_URI`` or
``sqlite:///<cwd>/mlruns/mlflow.db``. mlflow is only imported when a store is needed.

A store's model is fetched once: only its model directory (not the pyfunc's copy of the
source code), into ``<root>/.cache/models/<logged model id>/`` with a ``source.json`` naming
the URI, version and run; later calls resolve the URI (an alias may have moved) and reuse
that folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from ser_pipeline.artifact import SPEC_FILE, is_model_dir

TRAIN_HINT = ("train one first, e.g. `python train.py` (or `make demo` for a quick synthetic "
              "model), or pass --model runs:/<run_id>/model, models:/<name>/<version>, "
              "models:/<name>@<alias> or a model directory")


#: what a cache entry records beside the model directory: the URI, version, run and model id
SOURCE_FILE = "source.json"


class ModelNotFoundError(Exception):
    """No usable model for the given URI or in the store; the message says what to do."""


def model_cache_dir(root: str | Path | None = None) -> Path:
    """``<root>/.cache/models``, beside the feature cache: one folder per fetched model.

    ``root`` defaults to ``$SER_PIPELINE_ROOT``, else the working folder (as ``paths.root_dir``).
    """
    return Path(root or os.environ.get("SER_PIPELINE_ROOT", ".")) / ".cache" / "models"


def _model_dir_artifact(mlmodel: Path) -> str | None:
    """The ``model_dir`` artifact's path inside a pyfunc model, read from its ``MLmodel``."""
    if not mlmodel.is_file():
        return None
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
    artifacts = flavors.get("python_function", {}).get("artifacts", {})
    return artifacts.get("model_dir", {}).get("path") or None


def find_model_dir(root: str | Path) -> Path:
    """The model directory in ``root``: ``root`` itself, or the pyfunc model's ``model_dir``."""
    root = Path(root)
    if is_model_dir(root):
        return root
    relative = _model_dir_artifact(root / "MLmodel")
    if relative and is_model_dir(root / relative):
        return root / relative
    raise ModelNotFoundError(
        f"{root} is neither a model directory (no {SPEC_FILE}) nor an MLflow model logged by "
        "ser_pipeline (no MLmodel with a model_dir artifact)")


def _store_is_empty(tracking_uri: str) -> bool:
    """A local SQLite store whose file does not exist holds nothing (and is not created)."""
    return tracking_uri.startswith("sqlite:///") and not Path(
        tracking_uri.removeprefix("sqlite:///")).exists()


def default_model_uri(tracking_uri: str) -> str | None:
    """Newest registered model version, else the newest finished run's model, else None."""
    if _store_is_empty(tracking_uri):
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    versions = client.search_model_versions(max_results=1, order_by=["creation_timestamp DESC"])
    if versions:
        return f"models:/{versions[0].name}/{versions[0].version}"
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return None
    runs = client.search_runs(experiment_ids, "attributes.status = 'FINISHED'",
                              order_by=["attributes.end_time DESC"], max_results=200)
    for run in runs:
        # MLflow 3 records models a run logged as its outputs (LoggedModel ids)
        outputs = run.outputs.model_outputs if run.outputs else []
        if outputs:
            return f"models:/{outputs[-1].model_id}"
    return None


@dataclass(frozen=True)
class LoggedModelFiles:
    """Where a ``runs:/`` or ``models:/`` URI's pyfunc model lies in the artifact store."""

    root: str  #: artifact URI of the pyfunc model (``MLmodel`` at its top)
    key: str  #: its cache folder: the logged model's id (files never change under one id)
    source: dict[str, str | None]  #: what was asked for and what it resolved to


def locate_model(uri: str, tracking_uri: str) -> LoggedModelFiles:
    """Resolve ``uri`` in the store (an alias to its current version) without downloading."""
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source: dict[str, str | None] = {"uri": uri, "tracking_uri": tracking_uri}
    if uri.startswith("models:"):
        found = get_model_name_and_version(client, uri)  # every models:/ form MLflow reads
        if len(found) == 1:
            model_id = found[0]
        else:
            version = client.get_model_version(*found)
            source.update(name=version.name, version=str(version.version), run_id=version.run_id)
            # a version registered from models:/<model_id> may carry the id in its source only
            model_id = version.model_id or (version.source.removeprefix("models:/")
                                            if version.source.startswith("models:/m-") else None)
            if not model_id:  # registered from a run's artifacts (MLflow 2)
                key = f"{version.name}-v{version.version}-{version.run_id}"
                return LoggedModelFiles(
                    client.get_model_version_download_uri(*found), key, source)
        model = client.get_logged_model(model_id)
        source.update(model_id=model_id, run_id=model.source_run_id)
        return LoggedModelFiles(model.artifact_location, model_id, source)
    run_id, path = RunsArtifactRepository.parse_runs_uri(uri)
    source["run_id"] = run_id
    run = client.get_run(run_id)
    name, _, below = (path or "").partition("/")
    for output in run.outputs.model_outputs if run.outputs else []:  # MLflow 3: LoggedModels
        model = client.get_logged_model(output.model_id)
        if model.name == name:
            source["model_id"] = model.model_id
            return LoggedModelFiles(f"{model.artifact_location}/{below}".rstrip("/"),
                                    model.model_id + (f"-{below}" if below else ""), source)
    return LoggedModelFiles(f"{run.info.artifact_uri}/{path}".rstrip("/"),
                            f"{run_id}-{path}".replace("/", "-").rstrip("-"), source)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar per download on stderr; infer.py keeps stderr for errors."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _cached_model_dir(entry: Path) -> Path | None:
    try:
        relative = json.loads((entry / SOURCE_FILE).read_text())["model_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    model_dir = entry / relative
    return model_dir if is_model_dir(model_dir) else None


def _fetch(files: LoggedModelFiles, staging: Path, tracking_uri: str) -> Path:
    """Download only the model directory of ``files`` into ``staging``; returns its path."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        relative = _model_dir_artifact(Path(download_artifacts(
            artifact_uri=f"{files.root}/MLmodel", dst_path=str(staging),
            tracking_uri=tracking_uri)))
    except MlflowException:
        relative = None  # not a pyfunc model: perhaps a model directory itself
    if not relative:
        return find_model_dir(Path(download_artifacts(
            artifact_uri=files.root, dst_path=str(staging / "files"), tracking_uri=tracking_uri)))
    local = Path(download_artifacts(artifact_uri=f"{files.root}/{relative}",
                                    dst_path=str(staging), tracking_uri=tracking_uri))
    return find_model_dir(local)


def fetch_model_dir(uri: str, tracking_uri: str, cache_dir: Path) -> Path:
    """The model directory of a ``runs:/`` or ``models:/`` URI, in ``cache_dir``.

    Only the model directory is downloaded (not the pyfunc's copy of the source code), once
    per logged model, with no progress bars; later calls reuse it and download nothing.
    """
    from mlflow.exceptions import MlflowException

    try:
        files = locate_model(uri, tracking_uri)
        cache_dir = cache_dir.resolve()  # MLflow answers with absolute paths
        entry = cache_dir / files.key
        cached = _cached_model_dir(entry)
        if cached is not None:
            return cached
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{files.key}.", dir=cache_dir))
        try:
            with _no_progress_bars():
                model_dir = _fetch(files, staging, tracking_uri)
            record = {**files.source, "model_dir": str(model_dir.relative_to(staging))}
            (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
            shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry (no model) goes
            try:
                os.rename(staging, entry)
            except OSError as error:  # another process cached the same files first: keep those
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        cached = _cached_model_dir(entry)
        if cached is None:
            raise ModelNotFoundError(f"model {uri} could not be cached in {entry}")
        return cached
    except (MlflowException, OSError) as error:
        raise ModelNotFoundError(f"cannot fetch model {uri} from {tracking_uri}: "
                                 f"{str(error).splitlines()[0]}") from error


def resolve_model(uri: str | None, tracking_uri: str | None = None,
                  cache_dir: str | Path | None = None) -> Path:
    """A local model directory for ``uri`` (or the store's default model); see module doc.

    ``runs:/`` and ``models:/`` models are fetched into ``cache_dir`` (default
    :func:`model_cache_dir`) and reused from there.

    Raises :class:`ModelNotFoundError` with a message fit for the user.
    """
    if uri is not None and not uri.startswith(("runs:", "models:")):
        if "://" in uri:
            raise ModelNotFoundError(f"unsupported model URI {uri!r}; {TRAIN_HINT}")
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(f"model {uri} not found (no such folder); {TRAIN_HINT}")
        return find_model_dir(path)
    from ser_pipeline.tracking import resolve_tracking_uri  # imports mlflow: only when needed

    tracking_uri = tracking_uri or resolve_tracking_uri(None, Path("mlruns"))
    if uri is None:
        from mlflow.exceptions import MlflowException

        try:
            uri = default_model_uri(tracking_uri)
        except MlflowException as error:
            raise ModelNotFoundError(f"cannot search {tracking_uri} for a model: "
                                     f"{str(error).splitlines()[0]}") from error
        if uri is None:
            raise ModelNotFoundError(f"no trained model found in {tracking_uri}; {TRAIN_HINT}")
    return fetch_model_dir(uri, tracking_uri, Path(cache_dir or model_cache_dir()))
