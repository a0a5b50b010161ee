"""Running the real entry points in a subprocess, in a throw-away project root."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))

#: a small synthetic corpus and a short run: what the end-to-end tests train on
FAST = [
    "data.reader.n_speakers=4",
    "data.reader.utterances_per_class=4",
    "data.val_speakers=1",
    "trainer=debug",
    "trainer.enable_progress_bar=false",
    "model.net.conv_channels=[8,16]",
    "model.net.lstm_hidden=16",
    "model.net.lstm_layers=1",
    "model.net.attention_dim=16",
    "model.net.head_hidden=16",
]


def project_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # as in an activated venv: tools such as `mlflow models serve` start uvicorn from PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(SER_PIPELINE_ROOT=str(root), PYTHONUNBUFFERED="1", **extra)
    return env


def run_script(script: str, args: list[str], root: Path, timeout: float = 600,
               **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=root,
                          env=project_env(root, **env), capture_output=True, text=True,
                          timeout=timeout)


def store_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    """Return once ``url`` answers; fail at once if ``process`` (its server) exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)  # polling a starting server, not waiting for a fixed time
    raise TimeoutError(url)


def served_test_accuracy(client, run_id: str, root: Path, model_dir: Path
                         ) -> tuple[list[Path], float]:
    """The synthetic test speaker's files of a ``train.py`` run in ``root`` and the accuracy
    ``Predictor`` on ``model_dir`` reaches on them (to compare with the logged ``test/wa``)."""
    import json

    import numpy as np

    from ser_pipeline.inference import Predictor

    summary = json.loads(Path(client.download_artifacts(
        run_id, "data/summary.json", str(root))).read_text())
    [speaker] = summary["test"]["speakers"]
    wavs = sorted((root / "data" / "synthetic" / "wav" / speaker).glob("*.wav"))
    predictor = Predictor.from_dir(model_dir)
    correct = [predictor.predict_file(w)["emotion"] == w.stem.split("_")[1] for w in wavs]
    return wavs, float(np.mean(correct))
