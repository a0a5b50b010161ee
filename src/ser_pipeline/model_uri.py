"""Which model ``infer.py`` uses: a model URI or folder turned into a local model directory.

Accepted: ``runs:/<run_id>/<path>``, ``models:/<name>/<version>``,
``models:/<name>@<alias>``, ``models:/<model_id>`` (what training prints) and local
folders. A folder may be a model directory itself (``model.yaml`` + safetensors) or
the root of a logged pyfunc model, which keeps the model directory as its
``model_dir`` artifact (``artifacts/<folder name>/`` beside ``MLmodel``).

Without a URI: the newest registered model version in the tracking store, else the
model of the newest finished run; the store is ``$MLFLOW_TRACKING_URI`` or
``sqlite:///<cwd>/mlruns/mlflow.db``. mlflow is only imported when a store is needed.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import yaml

from ser_pipeline.artifact import SPEC_FILE

TRAIN_HINT = ("train one first, e.g. `python train.py` (or `make demo` for a quick synthetic "
              "model), or pass --model runs:/<run_id>/model, models:/<name>/<version>, "
              "models:/<name>@<alias> or a model directory")


class ModelNotFoundError(Exception):
    """No usable model for the given URI or in the store; the message says what to do."""


def find_model_dir(root: str | Path) -> Path:
    """The model directory in ``root``: ``root`` itself, or the pyfunc model's ``model_dir``."""
    root = Path(root)
    if (root / SPEC_FILE).is_file():
        return root
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
        artifacts = flavors.get("python_function", {}).get("artifacts", {})
        relative = artifacts.get("model_dir", {}).get("path")
        if relative and (root / relative / SPEC_FILE).is_file():
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


def _download(uri: str, tracking_uri: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    target = Path(tempfile.mkdtemp(prefix="ser-model-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    # models:/ URIs are looked up in the *global* tracking store whatever tracking_uri
    # download_artifacts is given (MLflow 3), so point it at ours for the call
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri))
    except (MlflowException, OSError) as error:
        raise ModelNotFoundError(f"cannot fetch model {uri} from {tracking_uri}: "
                                 f"{str(error).splitlines()[0]}") from error
    finally:
        mlflow.set_tracking_uri(previous)


def resolve_model(uri: str | None, tracking_uri: str | None = None) -> Path:
    """A local model directory for ``uri`` (or the store's default model); see module doc.

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
    return find_model_dir(_download(uri, tracking_uri))
