"""Breakdowns and calibration: UAR per speaker / gender, reliability diagram and ECE."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ser_pipeline.reports import (
    expected_calibration_error,
    log_test_reports,
    reliability,
    uar_by_group,
)

CLASSES = ["anger", "sadness"]


def test_uar_per_group_shows_a_group_the_model_fails():
    truth = ["anger", "sadness", "anger", "sadness"]
    predicted = ["anger", "sadness", "sadness", "anger"]
    by_speaker = uar_by_group(truth, predicted, ["a", "a", "b", "b"])
    assert by_speaker["a"] == {"uar": 1.0, "wa": 1.0, "utterances": 2,
                               "classes": ["anger", "sadness"]}
    assert by_speaker["b"]["uar"] == 0.0


def test_uar_per_group_counts_only_the_classes_the_group_has():
    by_speaker = uar_by_group(["anger", "anger", "sadness"], ["anger", "anger", "anger"],
                              ["a", "a", "b"])
    assert by_speaker["a"]["uar"] == 1.0 and by_speaker["a"]["classes"] == ["anger"]


def test_missing_gender_is_reported_as_unknown_not_dropped():
    by_gender = uar_by_group(["anger"] * 3, ["anger"] * 3, ["female", None, float("nan")])
    assert by_gender["unknown"]["utterances"] == 2 and by_gender["female"]["utterances"] == 1


def test_perfectly_confident_correct_predictions_have_zero_ece():
    probabilities = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probabilities, ["anger", "sadness"], CLASSES) == 0.0


def test_ece_is_the_count_weighted_gap_between_confidence_and_accuracy():
    # four utterances at confidence 0.9 of which half are right: |0.5 - 0.9| = 0.4
    probabilities = np.array([[0.9, 0.1]] * 4)
    report = reliability(probabilities, ["anger", "sadness", "anger", "sadness"], CLASSES,
                         n_bins=10)
    assert report["ece"] == pytest.approx(0.4)
    filled = [b for b in report["bins"] if b["count"]]
    assert len(filled) == 1 and filled[0]["lower"] == pytest.approx(0.8)
    assert filled[0]["accuracy"] == 0.5 and filled[0]["confidence"] == pytest.approx(0.9)
    assert sum(b["count"] for b in report["bins"]) == 4


def test_reports_are_logged_as_png_and_json_with_the_ece_metric(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("reports", (tmp_path / "artifacts").as_uri())
    truth = ["anger", "sadness", "anger", "sadness"]
    predicted = ["anger", "sadness", "sadness", "sadness"]
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.1, 0.9]])
    with mlflow.start_run(experiment_id=experiment) as run:
        log_test_reports(truth, predicted, probabilities, CLASSES,
                         speakers=["s1", "s1", "s2", "s2"],
                         genders=["female", "female", "male", "male"], name="test")
    client = MlflowClient()
    names = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert names == {f"reports/test_{kind}.{ext}" for ext in ("png", "json")
                     for kind in ("uar_by_speaker", "uar_by_gender", "reliability")}
    local = Path(client.download_artifacts(run.info.run_id, "reports/test_uar_by_gender.json",
                                           str(tmp_path)))
    assert json.loads(local.read_text())["male"]["uar"] == 0.5
    metrics = client.get_run(run.info.run_id).data.metrics
    assert 0 < metrics["test/ece"] < 1 and metrics["test/uar_min_speaker"] == 0.5
