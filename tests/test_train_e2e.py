"""train.py end to end: real Hydra composition, Lightning training, a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.e2e import FAST, run_script, store_uri

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short synthetic-corpus training run shared by the tests below."""
    root = tmp_path_factory.mktemp("project")
    result = run_script("train.py", FAST, root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=store_uri(root))
    experiment = client.get_experiment_by_name("ser-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    return root, result, client, runs


def test_train_prints_config_and_summary(trained):
    _, result, _, runs = trained
    assert "model:" in result.stdout and "data:" in result.stdout  # composed config printed
    assert "=== summary ===" in result.stdout
    assert f"run id:      {runs[0].info.run_id}" in result.stdout
    assert "test UAR:" in result.stdout


def test_run_is_finished_with_metrics_params_and_tags(trained):
    _, _, _, runs = trained
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    for metric in ("val/uar", "test/uar", "test/wa", "test/f1", "train/loss", "val/loss"):
        assert metric in run.data.metrics, metric
    assert run.data.params["model.net.lstm_hidden"] == "16"
    assert run.data.params["data.name"] == "synthetic"
    assert run.data.tags["speaker_independent"] == "true"
    assert run.data.tags["corpus"] == "synthetic"
    assert run.data.tags["model"] == "cnn_blstm_attn"
    assert run.data.tags["fold"] == "0"
    assert "git_commit" in run.data.tags


def test_run_logs_confusion_matrices_config_and_data_summary(trained):
    root, _, client, runs = trained
    run_id = runs[0].info.run_id
    names = {a.path for a in client.list_artifacts(run_id, "confusion")}
    assert names == {"confusion/test.png", "confusion/test.json",
                     "confusion/val_best.png", "confusion/val_best.json"}
    local = Path(client.download_artifacts(run_id, "confusion/test.json", str(root)))
    confusion = json.loads(local.read_text())
    assert confusion["labels"] == ["anger", "happiness", "neutral", "sadness"]
    assert sum(map(sum, confusion["counts"])) == 16  # 1 test speaker x 4 classes x 4
    assert set(confusion["report"]["anger"]) == {"precision", "recall", "f1", "support"}
    summary = json.loads(Path(client.download_artifacts(run_id, "data/summary.json",
                                                        str(root))).read_text())
    assert summary["split"]["speaker_independent"] is True
    assert not set(summary["train"]["speakers"]) & set(summary["test"]["speakers"])
    assert client.list_artifacts(run_id, "config")[0].path == "config/train.yaml"


def test_model_is_registered_with_champion_alias(trained):
    _, _, client, runs = trained
    version = client.get_model_version_by_alias("ser-synthetic-cnn_blstm_attn", "champion")
    assert version.run_id == runs[0].info.run_id


def test_pyfunc_model_loads_and_matches_the_project_predictor(trained, tmp_path):
    import numpy as np
    import pandas as pd
    import soundfile as sf

    from ser_pipeline.inference import Predictor

    root, _, _, runs = trained
    mlflow.set_tracking_uri(store_uri(root))
    wav = sorted((root / "data" / "synthetic" / "wav").rglob("*.wav"))[0]
    model = mlflow.pyfunc.load_model("models:/ser-synthetic-cnn_blstm_attn/1")
    frame = model.predict(pd.DataFrame({"path": [str(wav)], "audio_base64": [""]}))
    model_dir = next((root / "outputs").rglob("model/model.yaml")).parent
    own = Predictor.from_dir(model_dir).predict_file(wav)
    assert frame.loc[0, "emotion"] == own["emotion"]
    for name, score in own["scores"].items():
        assert frame.loc[0, f"score_{name}"] == pytest.approx(score, abs=1e-6)
    assert sf.info(str(wav)).samplerate == 16000 and np.isfinite(frame.filter(like="score_")).all().all()


def test_a_crash_inside_the_run_marks_it_failed(tmp_path):
    # fails inside fit (configure_optimizers calls the optimizer factory), after the run exists
    result = run_script("train.py", [*FAST, "+model.optimizer.no_such_argument=1",
                                     "logger.mlflow.register=false"],
                        tmp_path)
    assert result.returncode != 0
    client = MlflowClient(tracking_uri=store_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("ser-pipeline").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "data.name" in runs[0].data.params  # what was logged before the crash is kept


def test_missing_corpus_fails_at_once_naming_layout_and_override(tmp_path):
    result = run_script("train.py", ["data=emodb", f"data.root={tmp_path / 'nowhere'}"], tmp_path)
    assert result.returncode != 0
    assert "data.root=" in result.stderr and "wav" in result.stderr


def test_unreachable_tracking_server_fails_before_training(tmp_path):
    result = run_script("train.py", [*FAST, "logger.mlflow.tracking_uri=http://127.0.0.1:9"],
                        tmp_path)
    assert result.returncode != 0
    assert "http://127.0.0.1:9" in result.stderr and "unreachable" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing was generated or trained


def test_speaker_normalized_training_is_tagged_recorded_and_predicts(tmp_path):
    result = run_script("train.py", [*FAST, "data.normalization=speaker",
                                     "logger.mlflow.log_model=false"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=store_uri(tmp_path))
    experiment = client.get_experiment_by_name("ser-pipeline")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.tags["normalization"] == "speaker"
    model_dir = next((tmp_path / "outputs").rglob("model/model.yaml")).parent
    assert "normalization: speaker" in (model_dir / "model.yaml").read_text()
    wavs = sorted((tmp_path / "data" / "synthetic" / "wav").rglob("*.wav"))[:2]
    predicted = run_script("infer.py", ["--model", str(model_dir), "--json", *map(str, wavs)],
                           tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len(predicted.stdout.splitlines()) == 2
    assert "normalises features per speaker" in predicted.stderr


def test_run_logs_per_speaker_per_gender_and_calibration_reports(trained):
    root, _, client, runs = trained
    run_id = runs[0].info.run_id
    names = {a.path for a in client.list_artifacts(run_id, "reports")}
    assert {"reports/test_uar_by_speaker.png", "reports/test_uar_by_speaker.json",
            "reports/test_uar_by_gender.json", "reports/test_reliability.png",
            "reports/test_reliability.json"} <= names
    by_speaker = json.loads(Path(client.download_artifacts(
        run_id, "reports/test_uar_by_speaker.json", str(root))).read_text())
    test_speakers = runs[0].data.tags["test_speakers"].split(",")
    assert sorted(by_speaker) == sorted(test_speakers)
    only = by_speaker[test_speakers[0]]
    # one test speaker: its UAR is the run's test UAR
    assert only["uar"] == pytest.approx(runs[0].data.metrics["test/uar"], abs=1e-6)
    assert 0.0 <= runs[0].data.metrics["test/ece"] <= 1.0


@pytest.mark.slow
def test_output_to_a_log_file_is_one_line_per_epoch_not_a_progress_bar(tmp_path):
    # FAST turns the bar off; here the defaults (bar and feature progress on) meet a pipe
    options = [o for o in FAST if not o.startswith("trainer.enable_progress_bar")]
    result = run_script("train.py", [*options, "logger=none", "trainer.max_epochs=2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "\r" not in output
    epochs = [line for line in output.splitlines() if "val/uar" in line and " epoch " in line]
    assert len(epochs) == 2


def test_run_writes_and_logs_its_manifest_and_split(trained):
    import pandas as pd

    root, _, client, runs = trained
    run_id = runs[0].info.run_id
    names = {a.path for a in client.list_artifacts(run_id, "data")}
    assert {"data/manifest.csv", "data/split.json"} <= names
    manifest = pd.read_csv(client.download_artifacts(run_id, "data/manifest.csv", str(root)))
    split = json.loads(Path(client.download_artifacts(run_id, "data/split.json",
                                                      str(root))).read_text())
    assert sorted(manifest.loc[manifest["part"] == "test", "id"]) == sorted(split["test"])
    assert set(manifest.loc[manifest["part"] == "test", "speaker"]) == set(split["test_speakers"])
    assert not set(split["train"]) & set(split["test"])
