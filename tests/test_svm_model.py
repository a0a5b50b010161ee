"""``model=svm``: the classic reference (functionals + RBF SVM) as a pipeline model.

Its predictions come from stored arrays (no scikit-learn at inference), so the first tests pin
them to scikit-learn's own ``predict``; the end-to-end tests train it through ``train.py`` on
the synthetic corpus and serve it through ``infer.py``.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ser_pipeline.artifact import (
    SPEC_FILE,
    STATS_FILE,
    WEIGHTS_FILE,
    UnsafeArtifactError,
    load_model_dir,
)
from ser_pipeline.classic import (
    C_GRID,
    GAMMA_SCALES,
    SVMClassifier,
    fit_svm,
    fit_temperature,
    fit_with_inner_folds,
    fit_with_validation_grid,
    functionals,
    resolve_summary,
    speaker_folds,
    utterance_vector,
)
from ser_pipeline.features.batching import pad_batch
from ser_pipeline.metrics import label_scores
from tests.e2e import run_script, served_test_accuracy, store_uri
from tests.test_safe_loading import _Payload

CLASSES = ["anger", "happiness", "neutral", "sadness"]
#: 4 synthetic speakers x 4 classes x 4 utterances: one speaker tested, one validates
SMALL = ["model=svm", "data.reader.n_speakers=4", "data.reader.utterances_per_class=4",
         "data.val_speakers=1", "data.progress=false"]


def overlapping_classes(n_classes: int, rows: int = 240, dims: int = 12, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs close enough to overlap, so that one-vs-one votes often tie."""
    generator = np.random.default_rng(seed)
    centres = generator.normal(scale=0.8, size=(n_classes, dims))
    labels = np.arange(rows) % n_classes
    return centres[labels] + generator.normal(size=(rows, dims)), labels


# -- the array predictor -------------------------------------------------------------------------

@pytest.mark.parametrize("n_classes", [2, 3, 6])
def test_array_predictor_equals_sklearn_predict_exactly(n_classes):
    x, y = overlapping_classes(n_classes)
    fitted = fit_svm(x[:160], y[:160], c=1.0, gamma_scale=1.0)
    net, _ = SVMClassifier.from_fitted(fitted, n_emotions=n_classes, summary="vector")
    queries = np.concatenate([x[160:], np.random.default_rng(1).normal(size=(400, x.shape[1]))])
    np.testing.assert_array_equal(net.predict_vectors(queries), fitted.predict(queries))


def test_vote_ties_go_to_the_first_class_as_in_libsvm():
    x, y = overlapping_classes(6)
    fitted = fit_svm(x[:160], y[:160], c=1.0, gamma_scale=1.0)
    net, _ = SVMClassifier.from_fitted(fitted, n_emotions=6, summary="vector")
    queries = np.random.default_rng(1).normal(size=(2000, x.shape[1]))
    votes = net.votes(torch.from_numpy(queries))
    leaders = votes == votes.max(1, keepdim=True).values
    tied = (leaders.sum(1) > 1).numpy()
    assert tied.sum() >= 10  # the data really exercises the tie rule
    first_leader = leaders.float().argmax(1).numpy()  # argmax of 0/1 rows: the first True
    np.testing.assert_array_equal(net.predict_vectors(queries[tied]), first_leader[tied])
    np.testing.assert_array_equal(fitted.predict(queries[tied]), first_leader[tied])


def test_decision_values_equal_sklearns_one_vs_one_decision_function():
    x, y = overlapping_classes(4)
    fitted = fit_svm(x[:160], y[:160], c=10.0, gamma_scale=0.25)
    net, _ = SVMClassifier.from_fitted(fitted, n_emotions=4, summary="vector")
    fitted.svc.decision_function_shape = "ovo"
    from ser_pipeline.classic import ovo_decision_values, rbf_kernel

    z = torch.from_numpy(fitted.standardise(x[160:]))
    ours = ovo_decision_values(rbf_kernel(z, net.support_vectors, net.gamma), net.dual_coef,
                               net.intercept, net.n_support)
    np.testing.assert_allclose(ours.numpy(), fitted.svc.decision_function(z.numpy()),
                               rtol=1e-10, atol=1e-10)


def test_a_class_missing_from_training_gets_no_votes_and_zero_probability():
    x, y = overlapping_classes(3)
    fitted = fit_svm(x, np.array([0, 2, 3])[y], c=1.0, gamma_scale=1.0)  # class 1 never seen
    net, kwargs = SVMClassifier.from_fitted(fitted, n_emotions=4, summary="vector")
    assert kwargs["svm_classes"] == [0, 2, 3]
    votes = net.votes(torch.from_numpy(x[:5]))
    assert torch.isinf(votes[:, 1]).all() and (votes.softmax(-1)[:, 1] == 0).all()


def test_forward_summarises_valid_frames_only_so_padding_changes_nothing():
    generator = torch.Generator().manual_seed(0)
    items = [torch.randn(1, 3, n, generator=generator) for n in (5, 9, 7)]
    table = np.stack([utterance_vector(f, "functionals") for f in items])
    labels = np.array([0, 1, 2])
    fitted = fit_svm(np.concatenate([table, table + 0.1]), np.tile(labels, 2), 10.0, 1.0)
    net, _ = SVMClassifier.from_fitted(fitted, n_emotions=3, summary="functionals")
    features, lengths = pad_batch(items)
    batched = net(features, lengths)["emotion"]
    alone = torch.cat([net(f[None], torch.tensor([f.shape[-1]]))["emotion"] for f in items])
    assert torch.equal(batched, alone)
    assert net(features, lengths)["gender"].shape == (3, 2)


def test_functionals_are_8_summaries_of_each_row_and_its_delta():
    ramp = np.array([[0.0, 1.0, 2.0, 3.0], [4.0, 4.0, 4.0, 4.0]])
    vector = functionals(ramp).reshape(8, 4)  # mean, std, min, max, p10, p50, p90, slope
    np.testing.assert_allclose(vector[:, 0], [1.5, np.std([0, 1, 2, 3]), 0, 3, 0.3, 1.5, 2.7, 1])
    np.testing.assert_allclose(vector[:, 1], [4, 0, 4, 4, 4, 4, 4, 0])
    np.testing.assert_allclose(vector[:, 2], [1, 0, 1, 1, 1, 1, 1, 0])  # the ramp's delta


def test_a_feature_with_one_frame_per_utterance_is_used_as_is():
    items = [torch.randn(1, 88, 1) for _ in range(3)]
    assert resolve_summary("auto", items) == "vector"
    assert resolve_summary("auto", [*items, torch.randn(1, 88, 2)]) == "functionals"
    np.testing.assert_array_equal(utterance_vector(items[0], "vector"),
                                  items[0].flatten().double().numpy())


def test_grid_choice_is_made_on_validation_rows_only():
    x, y = overlapping_classes(3, rows=180)
    fitted, chosen = fit_with_validation_grid(x[:90], y[:90], x[90:120], y[90:120])
    assert len(chosen["grid"]) == len(C_GRID) * len(GAMMA_SCALES)
    assert chosen["val_uar"] == max(point["val_uar"] for point in chosen["grid"])
    assert fitted.svc.support_vectors_.shape[0] <= 120  # refit on train + validation rows
    assert (fitted.c, fitted.gamma_scale) == (chosen["C"], chosen["gamma_scale"])


def test_without_refit_the_validation_rows_stay_unseen():
    x, y = overlapping_classes(3, rows=180)
    fitted, chosen = fit_with_validation_grid(x[:90], y[:90], x[90:120], y[90:120], refit=False)
    assert chosen["refit"] is False
    assert fitted.svc.support_vectors_.shape[0] <= 90  # the training rows' fit, kept
    np.testing.assert_array_equal(fitted.predict(x[90:120]), chosen["val_predicted"])


def test_inner_folds_hold_out_every_speaker_once_and_never_fit_on_it():
    groups = np.repeat(np.array(list("abcdefghijkl")), 5)
    for max_folds in (12, 4):
        folds = speaker_folds(groups, max_folds)
        assert len(folds) == max_folds
        held = np.concatenate([held_out for _, held_out in folds])
        assert sorted(held) == list(range(len(groups)))
        for fit_rows, held_out in folds:
            assert not set(groups[fit_rows]) & set(groups[held_out])
    with pytest.raises(ValueError, match="two speakers"):
        speaker_folds(np.array(["a"] * 5))


def test_inner_fold_choice_scores_pooled_held_out_predictions_and_fits_all_rows():
    x, y = overlapping_classes(3, rows=180)
    groups = np.arange(180) % 6  # 6 speakers, every class in each
    fitted, chosen = fit_with_inner_folds(x, y, groups, c_grid=(0.1, 10.0), gamma_scales=(1.0,))
    assert len(chosen["grid"]) == 2 and chosen["inner_folds"] == 6 and chosen["refit"]
    assert chosen["val_uar"] == max(point["val_uar"] for point in chosen["grid"])
    assert fitted.svc.shape_fit_[0] == 180 and (fitted.c, fitted.gamma_scale) == (chosen["C"], 1.0)
    by_hand = np.empty_like(y)  # the chosen point, refitted fold by fold
    for fit_rows, held_out in speaker_folds(groups):
        by_hand[held_out] = fit_svm(x[fit_rows], y[fit_rows], chosen["C"], 1.0,
                                    "balanced").predict(x[held_out])
    np.testing.assert_array_equal(by_hand, chosen["val_predicted"])
    assert label_scores(y, by_hand)["uar"] == pytest.approx(chosen["val_uar"])


# -- calibrated scores ---------------------------------------------------------------------------

def _nll(votes: np.ndarray, truth: np.ndarray, temperature: float) -> float:
    log_p = torch.from_numpy(votes / temperature).log_softmax(-1).numpy()
    return float(-log_p[np.arange(len(truth)), truth].mean())


def test_held_out_votes_equal_the_stored_arrays_votes():
    for n_classes in (2, 4):
        x, y = overlapping_classes(n_classes)
        fitted = fit_svm(x[:160], y[:160], c=1.0, gamma_scale=1.0)
        net, _ = SVMClassifier.from_fitted(fitted, n_emotions=n_classes + 1, summary="vector")
        np.testing.assert_array_equal(fitted.votes(x[160:], np.arange(n_classes + 1)),
                                      net.votes(torch.from_numpy(x[160:])).numpy())


def test_temperature_minimises_the_held_out_nll_and_keeps_every_prediction():
    x, y = overlapping_classes(6, rows=480)
    fitted = fit_svm(x[:240], y[:240], c=1.0, gamma_scale=1.0)
    votes = fitted.votes(x[240:], np.arange(6))
    temperature = fit_temperature(votes, y[240:])
    assert abs(np.log(temperature)) > 0.1  # the raw counts' softmax is not calibrated
    best = _nll(votes, y[240:], temperature)
    for other in (1.0, temperature * 0.8, temperature * 1.25):
        assert best < _nll(votes, y[240:], other)
    plain, _ = SVMClassifier.from_fitted(fitted, 6, "vector")
    calibrated, kwargs = SVMClassifier.from_fitted(fitted, 6, "vector", temperature)
    assert kwargs["temperature"] == temperature
    features = torch.from_numpy(x[240:, None, :, None]).float()
    lengths = torch.ones(len(features), dtype=torch.long)
    raw = plain(features, lengths)["emotion"]
    scaled = calibrated(features, lengths)["emotion"]
    torch.testing.assert_close(scaled, raw / temperature)
    assert torch.equal(scaled.argmax(-1), raw.argmax(-1))  # ties included: same order
    with pytest.raises(ValueError, match="temperature"):
        SVMClassifier(**{**kwargs, "temperature": 0.0})


def test_temperature_ignores_rows_of_a_class_without_votes():
    votes = np.array([[2.0, -np.inf, 0.0], [0.0, -np.inf, 2.0], [1.0, -np.inf, 1.0]])
    assert fit_temperature(votes, np.array([0, 2, 1])) == pytest.approx(
        fit_temperature(votes[:2], np.array([0, 2])))
    assert fit_temperature(votes[2:], np.array([1])) == 1.0


def test_selection_returns_the_held_out_votes_it_was_judged_on():
    x, y = overlapping_classes(3, rows=180)
    fitted, chosen = fit_with_validation_grid(x[:90], y[:90], x[90:120], y[90:120], refit=False)
    np.testing.assert_array_equal(chosen["val_votes"], fitted.votes(x[90:120], np.arange(3)))
    np.testing.assert_array_equal(chosen["val_votes"].argmax(1), chosen["val_predicted"])
    groups = np.arange(180) % 6
    _, inner = fit_with_inner_folds(x, y, groups, c_grid=(1.0,), gamma_scales=(1.0,))
    np.testing.assert_array_equal(inner["val_votes"].argmax(1), inner["val_predicted"])


def test_selection_takes_named_labels_as_bench_baseline_passes_them():
    x, y = overlapping_classes(3, rows=180)
    names = np.array(["anger", "neutral", "sadness"], dtype=object)[y]
    fitted, chosen = fit_with_validation_grid(x[:90], names[:90], x[90:120], names[90:120])
    assert set(chosen["val_predicted"]) <= set(names)
    assert chosen["val_votes"].shape == (30, 3)
    _, inner = fit_with_inner_folds(x, names, np.arange(180) % 6, c_grid=(1.0,),
                                    gamma_scales=(1.0,))
    _, by_index = fit_with_inner_folds(x, y, np.arange(180) % 6, c_grid=(1.0,),
                                       gamma_scales=(1.0,))
    np.testing.assert_array_equal(inner["val_predicted"],
                                  np.array(["anger", "neutral", "sadness"])[by_index["val_predicted"]])


def test_model_config_uses_lld_functionals_by_default_and_the_reference_grid(tmp_path):
    from bench.common import compose_train_config

    cfg = compose_train_config(["model=svm"], tmp_path)
    assert cfg.feature._target_.endswith("LLDFeatures") and cfg.model.kind == "svm"
    assert tuple(cfg.model.C) == C_GRID and tuple(cfg.model.gamma_scale) == GAMMA_SCALES
    other = compose_train_config(["model=svm", "feature=logmel"], tmp_path)
    assert other.feature._target_.endswith("LogMelFeatures")


# -- end to end: train.py, MLflow, registry, infer.py ---------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``train.py model=svm`` on the small synthetic corpus, with a throw-away MLflow store."""
    root = tmp_path_factory.mktemp("project")
    result = run_script("train.py", SMALL, root, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=store_uri(root))
    [run] = client.search_runs([client.get_experiment_by_name("ser-pipeline").experiment_id])
    model_dir = next((root / "outputs").rglob("model/model.yaml")).parent
    return root, result, client, run, model_dir


@pytest.mark.slow
def test_run_logs_params_metrics_tags_and_confusion_matrices(trained):
    root, result, client, run, _ = trained
    assert run.info.status == "FINISHED" and "test UAR:" in result.stdout
    for metric in ("val/uar", "test/uar", "test/wa", "test/f1", "test/recall_anger"):
        assert metric in run.data.metrics, metric
    assert run.data.params["model.name"] == "svm" and "svm.C_chosen" in run.data.params
    assert float(run.data.params["svm.temperature"]) > 0  # model.calibration=temperature
    assert run.data.tags["model"] == "svm" and run.data.tags["speaker_independent"] == "true"
    names = {a.path for a in client.list_artifacts(run.info.run_id, "confusion")}
    assert names == {"confusion/test.png", "confusion/test.json",
                     "confusion/val_best.png", "confusion/val_best.json"}
    local = client.download_artifacts(run.info.run_id, "confusion/test.json", str(root))
    confusion = json.loads(Path(local).read_text())
    assert confusion["labels"] == CLASSES and sum(map(sum, confusion["counts"])) == 16


@pytest.mark.slow
def test_model_is_registered_and_its_directory_is_yaml_and_safetensors_only(trained):
    _, _, client, run, model_dir = trained
    version = client.get_model_version_by_alias("ser-synthetic-svm", "champion")
    assert version.run_id == run.info.run_id
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        [SPEC_FILE, WEIGHTS_FILE, STATS_FILE])
    loaded = load_model_dir(model_dir)
    assert isinstance(loaded.net, SVMClassifier) and loaded.net.n_inputs == 544
    assert not loaded.spec.has_gender


@pytest.mark.slow
def test_served_predictions_reproduce_the_logged_test_accuracy(trained):
    """Predictor on the test speaker's files gives exactly the run's test WA: one code path."""
    root, _, client, run, model_dir = trained
    wavs, accuracy = served_test_accuracy(client, run.info.run_id, root, model_dir)
    assert len(wavs) == 16
    assert accuracy == pytest.approx(run.data.metrics["test/wa"], abs=1e-12)


@pytest.mark.slow
def test_infer_predicts_with_the_registered_svm(trained, capsys):
    from ser_pipeline.infer_cli import main  # what infer.py runs

    root, _, _, _, _ = trained
    wavs = sorted((root / "data" / "synthetic" / "wav").rglob("*.wav"))[:2]
    status = main(["--json", "--tracking-uri", store_uri(root), "--model",
                   "models:/ser-synthetic-svm/1", *map(str, wavs)])
    out, err = capsys.readouterr()
    assert status == 0, err[-3000:]
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2
    for record in records:
        assert record["emotion"] in CLASSES and record["gender"] is None
        assert set(record["scores"]) == set(CLASSES)
        assert sum(record["scores"].values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_planted_pickle_in_an_svm_model_dir_is_refused_and_never_run(trained, tmp_path):
    model_dir = shutil.copytree(trained[4], tmp_path / "model")
    marker = tmp_path / "pwned"
    (model_dir / WEIGHTS_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeArtifactError, match="not a valid safetensors file"):
        load_model_dir(model_dir)
    assert not marker.exists()


@pytest.mark.slow
def test_cross_validation_runs_every_fold_of_the_svm(trained):
    root = trained[0]  # its corpus and feature cache; the runs above are read already
    result = run_script("train.py", [*SMALL, "data.fold=all", "data.split=group_kfold",
                                     "data.n_folds=3", "logger.mlflow.log_model=false",
                                     "model.selection=inner_folds"],
                        root, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=store_uri(root))
    experiment = client.get_experiment_by_name("ser-pipeline")
    parent = client.search_runs([experiment.experiment_id], "tags.cross_validation = 'true'")[0]
    folds = client.search_runs([experiment.experiment_id],
                               f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(folds) == 3 and {f.data.tags["model"] for f in folds} == {"svm"}
    assert {f.data.params["svm.selection"] for f in folds} == {"inner_folds"}
    mean = np.mean([f.data.metrics["test/uar"] for f in folds])
    assert parent.data.metrics["cv/uar_mean"] == pytest.approx(mean)
    assert "confusion/test_sum_over_folds.json" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "confusion")}
