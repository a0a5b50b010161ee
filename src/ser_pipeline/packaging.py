"""Logging a model directory to MLflow as a pyfunc *models from code* model."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import soundfile as sf
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
#: what serving the model imports; listed explicitly because MLflow's automatic
#: inference of requirements runs the model in a subprocess (~30 s per logged model)
SERVING_PACKAGES = ("mlflow", "torch", "torchaudio", "numpy", "pandas", "soundfile",
                    "safetensors", "pyyaml", "scipy")


def serving_requirements() -> list[str]:
    """Pinned requirements of the serving environment (the package itself ships as code)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in SERVING_PACKAGES]


def example_input(sample_rate: int) -> pd.DataFrame:
    """A half-second tone as base64 WAV: the input example stored with the model."""
    t = np.arange(int(0.5 * sample_rate)) / sample_rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sample_rate,
             format="WAV")
    return pd.DataFrame({"path": [""],
                         "audio_base64": [base64.b64encode(buffer.getvalue()).decode()]})


def log_pyfunc_model(model_dir: str | Path, name: str = "model"):
    """Log ``model_dir`` (a model or an ensemble directory) as a pyfunc model of the active
    run; returns MLflow's ModelInfo."""
    from ser_pipeline.inference import EnsemblePredictor

    predictor = EnsemblePredictor.from_dirs([model_dir])
    example = example_input(predictor.sample_rate)
    outputs = Schema([
        ColSpec("string", "emotion"),
        ColSpec("string", "gender", required=False),
        *[ColSpec("double", d, required=False) for d in ("valence", "arousal", "dominance")],
        *[ColSpec("double", f"score_{c}") for c in predictor.classes],
    ])
    inputs = Schema([ColSpec("string", "path", required=False),
                     ColSpec("string", "audio_base64", required=False)])
    signature = ModelSignature(inputs=inputs, outputs=outputs)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(PYFUNC_CODE),
        artifacts={"model_dir": str(model_dir)},
        signature=signature,
        input_example=example,
        pip_requirements=serving_requirements(),
        # the package travels with the model, so serving needs only the pinned packages
        code_paths=[str(Path(__file__).parent)],
    )


def publish_model(model_dir: str | Path, mlflow_cfg: Any, val_uar: float,
                  tested: bool) -> dict[str, str]:
    """Log ``model_dir`` as the active run's pyfunc model and, for a tested run, register it
    (the champion alias moves when ``val_uar`` beats the holder's). Returns ``model_uri`` and
    ``registered`` where done; what every kind of model (deep or SVM) does after training."""
    from ser_pipeline import tracking

    out: dict[str, str] = {}
    if not mlflow_cfg.get("log_model", True):
        return out
    info = log_pyfunc_model(model_dir)
    out["model_uri"] = info.model_uri
    if mlflow_cfg.get("register", True) and tested:
        version = tracking.register_model(info.model_uri, mlflow_cfg.registered_model_name,
                                          "val_uar", val_uar, mlflow_cfg.get("champion_alias"))
        out["registered"] = f"models:/{version.name}/{version.version}"
    return out
