"""A real `mlflow server` on loopback: training through it, the REST API, the UI, serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.e2e import FAST, MLFLOW, free_port, project_env, run_script, wait_for

pytestmark = pytest.mark.slow


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    process = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        cwd=root, env=project_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", process)
        yield url, root
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def remote_run(server, tmp_path_factory):
    url, _ = server
    root = tmp_path_factory.mktemp("project")
    result = run_script("train.py", FAST, root, MLFLOW_TRACKING_URI=url)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = get_json(f"{url}/api/2.0/mlflow/experiments/get-by-name"
                          "?experiment_name=ser-pipeline")["experiment"]
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/runs/search", method="POST",
        data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        runs = json.loads(reply.read())["runs"]
    return url, root, experiment, runs


def test_training_through_a_remote_server_logs_metrics_tags_and_confusion(remote_run):
    url, _, _, runs = remote_run
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
    run_id = runs[0]["info"]["run_id"]
    metrics = {m["key"] for m in runs[0]["data"]["metrics"]}
    assert {"test/uar", "test/wa", "test/f1", "val/uar"} <= metrics
    tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
    assert tags["speaker_independent"] == "true" and tags["corpus"] == "synthetic"
    listing = get_json(f"{url}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=confusion")
    assert {f["path"] for f in listing["files"]} >= {"confusion/test.png", "confusion/val_best.png"}


def test_ui_run_page_renders_in_headless_chromium(remote_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'); .ci/run installs it")
    url, root, experiment, runs = remote_run
    run_id = runs[0]["info"]["run_id"]
    shot = root / "mlflow-run-page.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
         "--window-size=1400,1000", "--virtual-time-budget=15000", f"--screenshot={shot}",
         f"{url}/#/experiments/{experiment['experiment_id']}/runs/{run_id}"],
        capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 10_000  # a rendered page, not a blank one
    keep = Path(__file__).resolve().parents[1] / "outputs" / "screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / shot.name)


def test_models_serve_answers_a_prediction_request(remote_run):
    url, root, _, _ = remote_run
    port = free_port()
    wav = sorted((root / "data" / "synthetic" / "wav").rglob("*.wav"))[0]
    process = subprocess.Popen(
        [MLFLOW, "models", "serve", "-m", "models:/ser-synthetic-cnn_blstm_attn/1",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=root, env=project_env(root, MLFLOW_TRACKING_URI=url),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process, timeout_s=180)
        body = {"dataframe_split": {"columns": ["path", "audio_base64"],
                                    "data": [[str(wav), ""]]}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=60) as reply:
            predictions = json.loads(reply.read())["predictions"]
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert len(predictions) == 1
    scores = {k: v for k, v in predictions[0].items() if k.startswith("score_")}
    assert set(scores) == {f"score_{c}" for c in ("anger", "happiness", "neutral", "sadness")}
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-4)
    assert predictions[0]["emotion"] in {"anger", "happiness", "neutral", "sadness"}
