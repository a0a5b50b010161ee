"""Two training processes sharing one feature cache and one tracking store."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.e2e import FAST, REPO, project_env, store_uri

pytestmark = pytest.mark.slow


def test_two_concurrent_runs_both_finish_with_a_valid_cache(tmp_path):
    args = [*FAST, "logger.mlflow.log_model=false"]
    processes = [
        subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, f"seed={seed}"],
                         cwd=tmp_path, env=project_env(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for seed in (0, 1)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    client = MlflowClient(tracking_uri=store_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("ser-pipeline").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    entries = list((tmp_path / ".cache" / "features").rglob("*.safetensors"))
    assert len(entries) == 4 * 4 * 4  # one per utterance of the shared synthetic corpus
    for entry in entries:
        assert load_file(entry)["features"].ndim == 3
    assert not list((tmp_path / ".cache" / "features").rglob(".tmp-*"))
