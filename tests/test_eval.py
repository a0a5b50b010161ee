"""eval.py: a logged model tested on another corpus (or a split of its own), as MLflow runs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from ser_pipeline.corpora import generate_synthetic_corpus
from ser_pipeline.evaluation import ClassMapping
from tests.e2e import FAST, REPO, run_script, store_uri

MODEL_CLASSES = ["anger", "happiness", "neutral", "sadness"]
#: the other corpus names its classes its own way; it has no neutral, and boredom the model lacks
OTHER_NAMES = {"anger": "angry", "happiness": "happy", "sadness": "sad", "boredom": "bored"}
LABEL_MAP = {"anger": "angry", "happiness": "happy", "sadness": "sad"}


# --------------------------------------------------------------------------- class mapping

def test_equal_names_map_to_themselves_and_the_rest_is_reported():
    mapping = ClassMapping.build(MODEL_CLASSES, ["anger", "sadness", "boredom"])
    assert mapping.model_to_corpus == {"anger": "anger", "sadness": "sadness"}
    assert mapping.classes == ["anger", "sadness"]
    assert mapping.unmapped_model_classes == ["happiness", "neutral"]
    assert mapping.unmapped_corpus_classes == ["boredom"]


def test_label_map_renames_model_classes_onto_corpus_classes():
    mapping = ClassMapping.build(MODEL_CLASSES, ["angry", "happy", "sad", "bored"], LABEL_MAP)
    assert mapping.classes == ["angry", "happy", "sad"]
    assert mapping.unmapped_model_classes == ["neutral"]
    assert mapping.unmapped_corpus_classes == ["bored"]


def test_scores_of_unmapped_model_classes_are_left_out_and_the_rest_renormalised():
    mapping = ClassMapping.build(MODEL_CLASSES, ["anger", "sadness"])
    projected = mapping.project(np.array([[0.2, 0.1, 0.5, 0.2]]))
    np.testing.assert_allclose(projected, [[0.5, 0.5]])


def test_explicitly_merged_classes_sum_their_scores():
    mapping = ClassMapping.build(MODEL_CLASSES, ["negative", "positive"],
                                 {"anger": "negative", "sadness": "negative",
                                  "happiness": "positive"})
    np.testing.assert_allclose(mapping.project(np.array([[0.3, 0.2, 0.1, 0.4]])),
                               [[0.7 / 0.9, 0.2 / 0.9]])


def test_label_map_typos_are_refused_instead_of_dropping_a_class():
    with pytest.raises(ValueError, match=r"keys \['angr'\] are not classes of the model"):
        ClassMapping.build(MODEL_CLASSES, ["angry"], {"angr": "angry"})
    with pytest.raises(ValueError, match=r"values \['angri'\] are not classes of the corpus"):
        ClassMapping.build(MODEL_CLASSES, ["angry"], {"anger": "angri"})


def test_no_shared_class_at_all_asks_for_a_label_map():
    with pytest.raises(ValueError, match="give eval.label_map"):
        ClassMapping.build(MODEL_CLASSES, ["angry", "sad"])


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A model trained on the synthetic corpus, and another corpus given as a table."""
    root = tmp_path_factory.mktemp("eval_project")
    trained = run_script("train.py", FAST, root)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    corpus = generate_synthetic_corpus(root / "other", n_speakers=2, utterances_per_class=3,
                                       emotions=list(OTHER_NAMES), seed=1)
    table = pd.read_csv(corpus / "labels.csv").drop(columns="id")
    table["emotion"] = table["emotion"].map(OTHER_NAMES)
    table.to_csv(corpus / "table.csv", index=False)
    client = MlflowClient(tracking_uri=store_uri(root))
    source = client.get_model_version_by_alias("ser-synthetic-cnn_blstm_attn", "champion")
    return root, corpus / "table.csv", client, source.run_id


def _eval_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("ser-pipeline")
    return client.search_runs([experiment.experiment_id], "tags.evaluation != ''")


@pytest.mark.slow
def test_cross_corpus_eval_logs_a_tagged_run_with_metrics_confusion_reports_and_predictions(
        project):
    root, table, client, source_run = project
    result = run_script("eval.py", [
        "model_uri=models:/ser-synthetic-cnn_blstm_attn@champion", "data=manifest",
        f"data.manifest={table}", "data.name=other",
        "eval.label_map={anger: angry, happiness: happy, sadness: sad}"], root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "=== evaluation: synthetic model on other (cross-corpus" in result.stdout
    assert "not scored): ['neutral']" in result.stdout and "{'bored': 6}" in result.stdout
    (run,) = [r for r in _eval_runs(client) if r.data.tags["corpus"] == "other"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["evaluation"] == "cross-corpus"
    assert run.data.tags["source_run"] == source_run
    assert run.data.tags["eval_split"] == "all"
    for metric in ("uar", "wa", "f1", "ece", "recall_angry", "recall_happy", "recall_sad"):
        assert 0 <= run.data.metrics[f"eval/{metric}"] <= 1, metric
    assert run.data.metrics["eval/utterances"] == 18  # 2 speakers x 3 classes x 3; bored left out
    artifacts = {a.path for d in ("confusion", "eval", "reports")
                 for a in client.list_artifacts(run.info.run_id, d)}
    assert {"confusion/eval.png", "confusion/eval.json", "eval/report.json",
            "eval/predictions.csv", "reports/eval_uar_by_speaker.png",
            "reports/eval_uar_by_gender.json", "reports/eval_reliability.png"} <= artifacts
    (root / "dl").mkdir(exist_ok=True)
    confusion = json.loads(Path(client.download_artifacts(run.info.run_id, "confusion/eval.json",
                                                          str(root / "dl"))).read_text())
    assert confusion["labels"] == ["angry", "happy", "sad"]
    assert set(confusion["report"]["sad"]) == {"precision", "recall", "f1", "support"}
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/report.json",
                                                       str(root / "dl"))).read_text())
    assert report["mapping"]["unmapped_model_classes"] == ["neutral"]
    assert report["left_out_utterances"] == {"bored": 6}
    csv = Path(client.download_artifacts(run.info.run_id, "eval/predictions.csv",
                                         str(root / "dl"))).read_text()
    predictions = pd.read_csv(io.StringIO(csv))
    assert len(predictions) == 18 and predictions["id"].is_unique
    scores = predictions[["score_angry", "score_happy", "score_sad"]].to_numpy()
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-6)
    assert set(predictions["predicted"]) <= {"angry", "happy", "sad"}
    assert {"model_score_neutral", "model_predicted", "speaker", "gender"} <= set(predictions)


@pytest.mark.slow
def test_same_corpus_eval_of_the_test_split_names_the_split_and_its_speakers(project):
    from ser_pipeline.evaluation import evaluate

    root, _, client, source_run = project
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=[
            f"paths.root_dir={root}", f"paths.output_dir={root / 'outputs' / 'same'}",
            "model_uri=models:/ser-synthetic-cnn_blstm_attn@champion", "eval.split=test",
            *[o for o in FAST if o.startswith("data.")]])
    report = evaluate(cfg)
    source = client.get_run(source_run)
    assert report["evaluation"] == "same-corpus" and report["eval_split"] == "test"
    assert report["metrics"]["utterances"] == 16  # the one test speaker x 4 classes x 4
    assert report["test_speakers"] == source.data.tags["test_speakers"].split(",")
    # the packaged model through the Predictor scores the test split as training's test did
    for name in ("uar", "wa", "f1"):
        assert report["metrics"][name] == pytest.approx(source.data.metrics[f"test/{name}"])
    run = client.get_run(report["run_id"])
    assert run.data.tags["evaluation"] == "same-corpus"
    assert run.data.tags["speaker_independent"] == "true"
    assert (root / "outputs" / "same" / "predictions.csv").is_file()
    assert len(list((root / ".cache" / "models").iterdir())) == 1  # the model, fetched once


@pytest.mark.slow
def test_eval_of_a_model_folder_without_tracking_writes_predictions_and_report(project):
    from ser_pipeline.evaluation import evaluate

    root, table, client, _ = project
    model_dir = next((root / "outputs" / "train").rglob("model/model.yaml")).parent
    runs_before = len(_eval_runs(client))
    out = root / "outputs" / "untracked"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=[
            f"paths.root_dir={root}", f"paths.output_dir={out}", f"model_uri={model_dir}",
            "logger=none", "data=manifest", f"data.manifest={table}", "data.name=other",
            "eval.label_map={anger: angry, happiness: happy, sadness: sad}"])
    report = evaluate(cfg)
    assert "run_id" not in report and len(_eval_runs(client)) == runs_before
    assert report["evaluation"] == "cross-corpus"
    assert len(pd.read_csv(out / "predictions.csv")) == 18
    assert json.loads((out / "report.json").read_text())["metrics"]["uar"] == report[
        "metrics"]["uar"]


def test_eval_takes_an_ensemble_directory_like_a_model(project):
    from ser_pipeline.artifact import save_ensemble_dir
    from ser_pipeline.evaluation import evaluate

    root, table, _, _ = project
    model_dir = next((root / "outputs" / "train").rglob("model/model.yaml")).parent
    # two copies of one model: the ensemble's probabilities are that model's
    ensemble = save_ensemble_dir(root / "ensemble", [model_dir, model_dir])
    reports = {}
    for name, uri in (("single", model_dir), ("ensemble", ensemble)):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("eval", overrides=[
                f"paths.root_dir={root}", f"paths.output_dir={root / 'outputs' / name}",
                f"model_uri={uri}", "logger=none", "data=manifest", f"data.manifest={table}",
                "data.name=other", "eval.label_map={anger: angry, happiness: happy, sadness: sad}"])
        reports[name] = evaluate(cfg)
    assert reports["ensemble"]["metrics"] == pytest.approx(reports["single"]["metrics"])
