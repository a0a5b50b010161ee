"""Late fusion: several models' class probabilities averaged (infer.py --model A --model B)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ser_pipeline.artifact import save_model_dir
from ser_pipeline.features import LogMelFeatures
from ser_pipeline.features.batching import FeatureStats
from ser_pipeline.inference import EnsemblePredictor, Predictor
from ser_pipeline.metrics import label_scores
from ser_pipeline.models import CnnBlstmAttn
from tests.conftest import TINY_CLASSES
from tests.test_infer import infer, model_variant, short_speech, write_audio


def other_model_dir(target, seed: int = 1, classes=TINY_CLASSES, info: dict | None = None):
    torch.manual_seed(seed)
    kwargs = {"in_channels": 1, "n_features": 16, "n_emotions": len(classes),
              "conv_channels": [4, 8], "lstm_hidden": 8, "lstm_layers": 1, "lstm_dropout": 0.0,
              "attention_dim": 8, "head_hidden": 8}
    return save_model_dir(target, CnnBlstmAttn(**kwargs), kwargs, {
        "features": LogMelFeatures(sample_rate=16000, n_mels=16).config(),
        "classes": list(classes), "genders": ["female", "male"],
        "dimensions": ["valence", "arousal", "dominance"], "has_gender": True,
        "has_dimensions": False, "info": info or {}},
        FeatureStats(torch.zeros(1, 16, 1), torch.ones(1, 16, 1)))


def waves(n: int = 3) -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    return [torch.from_numpy(0.1 * rng.standard_normal(16000).astype(np.float32))
            for _ in range(n)]


def test_an_ensemble_averages_its_members_probabilities(tiny_model_dir, tmp_path):
    members = [Predictor.from_dir(tiny_model_dir), Predictor.from_dir(other_model_dir(tmp_path))]
    ensemble = EnsemblePredictor(members)
    got = ensemble.predict_waveforms(waves())
    each = [m.predict_waveforms(waves()) for m in members]
    for i, result in enumerate(got):
        for c in TINY_CLASSES:
            want = (each[0][i]["scores"][c] + each[1][i]["scores"][c]) / 2
            assert result["scores"][c] == pytest.approx(want, abs=1e-6)
        assert result["emotion"] == max(result["scores"], key=result["scores"].get)


def test_heads_only_some_members_have_are_left_out(tiny_model_dir, tmp_path):
    ensemble = EnsemblePredictor.from_dirs([tiny_model_dir, other_model_dir(tmp_path)])
    result = ensemble.predict_waveform(waves(1)[0])
    assert result["gender"] in ("female", "male")
    assert result["valence"] is None  # the second member has no dimensions


def test_one_member_is_that_members_predictor(tiny_model_dir):
    single = EnsemblePredictor.from_dirs([tiny_model_dir])
    assert type(single) is Predictor


def test_members_with_other_classes_are_refused(tiny_model_dir, tmp_path):
    other = other_model_dir(tmp_path, classes=["anger", "neutral"])
    with pytest.raises(ValueError, match="share classes"):
        EnsemblePredictor.from_dirs([tiny_model_dir, other])


def test_infer_py_takes_several_models(tiny_model_dir, tmp_path, capsys):
    path = write_audio(tmp_path / "a.wav", short_speech())
    second = other_model_dir(tmp_path / "second")
    status, [alone], _ = infer(capsys, "--model", str(tiny_model_dir), str(path))
    status2, [both], _ = infer(capsys, "--model", str(tiny_model_dir), "--model", str(second),
                               str(path))
    assert status == status2 == 0
    assert both["scores"] != alone["scores"]
    assert sum(both["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_infer_py_names_an_ensemble_that_does_not_fit(tiny_model_dir, tmp_path, capsys):
    path = write_audio(tmp_path / "a.wav", short_speech())
    other = model_variant(tiny_model_dir, tmp_path / "v", classes=["anger", "joy", "neutral",
                                                                    "sadness"])
    status, _, err = infer(capsys, "--model", str(tiny_model_dir), "--model", str(other),
                           str(path))
    assert status == 1
    assert "share classes" in err


def split_member(target, seed: int, val_speakers: list[str], **info):
    """A tiny model whose fold held out speaker "t" for test and ``val_speakers`` for
    validation (the split info a cross-validation's fold model carries), plus ``info``."""
    return other_model_dir(target, seed=seed, info={
        "split": {"test_speakers": ["t"], "val_speakers": val_speakers}, **info})


def test_the_ensemble_bench_scores_validation_speakers_when_asked(tmp_path):
    import pandas as pd

    from bench.ensemble import evaluate_fold

    rows = []
    for speaker in ("t", "v"):
        for i, emotion in enumerate(TINY_CLASSES):
            path = write_audio(tmp_path / f"{speaker}{i}.wav", short_speech())
            rows.append({"path": str(path), "speaker": speaker, "emotion": emotion})
    manifest = pd.DataFrame(rows)
    members = [split_member(tmp_path / f"m{s}", s, ["v"]) for s in (1, 2)]
    val = evaluate_fold(members, manifest, "val")
    test = evaluate_fold(members, manifest, "test")
    assert val["val_speakers"] == ["v"] and test["test_speakers"] == ["t"]
    assert val["utterances"] == test["utterances"] == len(TINY_CLASSES)
    assert len(val["members"]) == 2 and 0.0 <= val["ensemble"]["uar"] <= 1.0
    # members that held out other validation speakers cannot be compared on them
    third = split_member(tmp_path / "m3", 3, ["w"])
    with pytest.raises(SystemExit, match="different val speakers"):
        evaluate_fold([members[0], third], manifest, "val")
    # nor can a member fitted on them (model=svm refits on training + validation speakers)
    refit = split_member(tmp_path / "m4", 4, ["v"], svm={"refit": True})
    with pytest.raises(SystemExit, match="model.refit=false"):
        evaluate_fold([members[0], refit], manifest, "val")
    assert evaluate_fold([refit, members[0]], manifest, "test")["utterances"] == len(TINY_CLASSES)


def test_an_ensemble_directory_predicts_as_its_members_together(tiny_model_dir, tmp_path):
    from ser_pipeline.artifact import save_ensemble_dir

    second = other_model_dir(tmp_path / "second")
    saved = save_ensemble_dir(tmp_path / "ens", [tiny_model_dir, second])
    assert sorted(p.name for p in saved.iterdir()) == ["ensemble.yaml", "member0", "member1"]
    together = EnsemblePredictor.from_dirs([tiny_model_dir, second]).predict_waveforms(waves())
    loaded = EnsemblePredictor.from_dirs([saved])
    assert len(loaded.members) == 2
    for a, b in zip(loaded.predict_waveforms(waves()), together, strict=True):
        assert a["emotion"] == b["emotion"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
    # an ensemble given as a member is flattened into its members
    nested = save_ensemble_dir(tmp_path / "nested", [saved, tiny_model_dir])
    assert len(EnsemblePredictor.from_dirs([nested]).members) == 3


@pytest.mark.parametrize("members", [["../outside"], ["a/b"], [], "member0", [3]])
def test_an_ensemble_naming_anything_but_its_own_sub_folders_is_refused(tmp_path, members):
    import yaml

    from ser_pipeline.artifact import UnsafeArtifactError, ensemble_members

    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump({"format_version": 1,
                                                            "members": members}))
    with pytest.raises(UnsafeArtifactError):
        ensemble_members(tmp_path)


def test_infer_py_saves_an_ensemble_that_predicts_as_its_members(tiny_model_dir, tmp_path,
                                                                 capsys):
    path = write_audio(tmp_path / "a.wav", short_speech())
    second = other_model_dir(tmp_path / "second")
    status, [both], _ = infer(capsys, "--model", str(tiny_model_dir), "--model", str(second),
                              str(path))
    target = tmp_path / "ens"
    from ser_pipeline.infer_cli import main

    assert main(["--model", str(tiny_model_dir), "--model", str(second),
                 "--save-ensemble", str(target)]) == 0
    assert "an ensemble of 2 model(s)" in capsys.readouterr().out
    status2, [saved], _ = infer(capsys, "--model", str(target), str(path))
    assert status == status2 == 0
    assert saved["scores"] == pytest.approx(both["scores"], abs=1e-6)


def test_a_registered_ensemble_serves_through_mlflow_pyfunc(tiny_model_dir, tmp_path, capsys,
                                                            monkeypatch):
    import base64

    import mlflow
    import pandas as pd

    from ser_pipeline.infer_cli import main
    from ser_pipeline.model_uri import resolve_model

    monkeypatch.setenv("SER_PIPELINE_ROOT", str(tmp_path))  # the model cache: this test's own
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    # mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI: set through monkeypatch, it is
    # put back as it was after the test (else later tests would use this store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    (tmp_path / "mlruns").mkdir()
    second = other_model_dir(tmp_path / "second")
    previous = mlflow.get_tracking_uri()
    try:
        assert main(["--model", str(tiny_model_dir), "--model", str(second), "--save-ensemble",
                     str(tmp_path / "ens"), "--register", "ser-ens", "--tracking-uri",
                     store]) == 0
        assert "registered models:/ser-ens/1" in capsys.readouterr().out
        fetched = resolve_model("models:/ser-ens/1", store)
        assert len(EnsemblePredictor.from_dirs([fetched]).members) == 2
        path = write_audio(tmp_path / "a.wav", short_speech())
        expected = EnsemblePredictor.from_dirs([tiny_model_dir, second]).predict_file(path)
        mlflow.set_tracking_uri(store)
        served = mlflow.pyfunc.load_model("models:/ser-ens/1")
        frame = served.predict(pd.DataFrame({
            "path": [""], "audio_base64": [base64.b64encode(path.read_bytes()).decode()]}))
    finally:
        mlflow.set_tracking_uri(previous)
    assert frame.loc[0, "emotion"] == expected["emotion"]
    for name, score in expected["scores"].items():
        assert frame.loc[0, f"score_{name}"] == pytest.approx(score, abs=1e-5)


def test_register_without_save_ensemble_is_a_usage_error(tiny_model_dir):
    from ser_pipeline.infer_cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_model_dir), "--register", "x"])
    assert exit_info.value.code == 2


def test_robustness_scores_a_corpus_with_each_file_extracted_once(tmp_path, monkeypatch):
    import pandas as pd

    from bench.robustness import cross_corpus, probabilities
    from ser_pipeline.audio import read_audio

    models = [other_model_dir(tmp_path / f"fold{s}", seed=s) for s in (1, 2)]
    rows = [{"path": str(write_audio(tmp_path / f"{i}.wav", short_speech())), "speaker": "x",
             "emotion": emotion} for i, emotion in enumerate(TINY_CLASSES)]
    target = pd.DataFrame(rows)
    # what each fold model gives on its own, extracting every file itself
    waves = [read_audio(r["path"], 16000) for r in rows]
    alone = [probabilities(Predictor.from_dir(m), waves).argmax(1) for m in models]
    calls = []
    original = LogMelFeatures.forward
    monkeypatch.setattr(LogMelFeatures, "forward",
                        lambda self, wave: calls.append(1) or original(self, wave))
    result = cross_corpus(models, target)
    assert len(calls) == len(rows)  # once per file, not once per file and fold model
    for scores, predicted in zip(result["per_model"], alone, strict=True):
        truth = target["emotion"].tolist()
        assert scores == label_scores(truth, [TINY_CLASSES[i] for i in predicted])
