"""Late fusion: several models' class probabilities averaged (infer.py --model A --model B)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ser_pipeline.artifact import save_model_dir
from ser_pipeline.features import LogMelFeatures
from ser_pipeline.features.batching import FeatureStats
from ser_pipeline.inference import EnsemblePredictor, Predictor
from ser_pipeline.models import CnnBlstmAttn
from tests.conftest import TINY_CLASSES
from tests.test_infer import infer, model_variant, short_speech, write_audio


def other_model_dir(target, seed: int = 1, classes=TINY_CLASSES):
    torch.manual_seed(seed)
    kwargs = {"in_channels": 1, "n_features": 16, "n_emotions": len(classes),
              "conv_channels": [4, 8], "lstm_hidden": 8, "lstm_layers": 1, "lstm_dropout": 0.0,
              "attention_dim": 8, "head_hidden": 8}
    return save_model_dir(target, CnnBlstmAttn(**kwargs), kwargs, {
        "features": LogMelFeatures(sample_rate=16000, n_mels=16).config(),
        "classes": list(classes), "genders": ["female", "male"],
        "dimensions": ["valence", "arousal", "dominance"], "has_gender": True,
        "has_dimensions": False, "info": {}},
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
