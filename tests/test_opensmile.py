"""openSMILE feature sets: eGeMAPS LLDs per frame, eGeMAPS / ComParE functionals per utterance.

Skipped with the reason when the optional ``opensmile`` extra is not installed
(``pip install -e '.[opensmile]'``; ``.ci/run`` installs it through ``make``).
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from ser_pipeline.features import build_features
from ser_pipeline.features.cache import FeatureCache, extract_features
from tests.e2e import REPO, run_script, store_uri

needs_opensmile = pytest.mark.skipif(
    importlib.util.find_spec("opensmile") is None,
    reason="the optional opensmile extra is not installed (pip install -e '.[opensmile]')")

SAMPLE_RATE = 16000
#: feature config -> (n_features, whether it is one frame per utterance)
SETS = {"egemaps": (25, False), "egemaps_functionals": (88, True),
        "compare_functionals": (6373, True)}


def voiced(seconds: float = 1.0, f0: float = 220.0) -> torch.Tensor:
    """A vowel-like harmonic tone (5 harmonics with falling amplitude) at ``f0`` Hz."""
    t = torch.arange(int(seconds * SAMPLE_RATE), dtype=torch.float64) / SAMPLE_RATE
    wave = sum(0.3 / k * torch.sin(2 * math.pi * k * f0 * t) for k in range(1, 6))
    return wave.float()


def extractor_for(name: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"feature={name}"])
    return instantiate(cfg.feature)


@needs_opensmile
@pytest.mark.parametrize("name", list(SETS))
def test_feature_set_gives_one_channel_of_its_features(name):
    extractor = extractor_for(name)
    n_features, one_frame = SETS[name]
    features = extractor(voiced(1.0))
    assert (extractor.out_channels, extractor.n_features) == (1, n_features)
    assert features.shape[:2] == (1, n_features) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    if one_frame:
        assert features.shape[-1] == 1
    else:  # 10 ms frames: about 100 per second
        assert extractor.hop_length == 160 and 90 <= features.shape[-1] <= 100


@needs_opensmile
def test_egemaps_pitch_of_a_220_hz_tone_is_36_semitones_above_27_5_hz():
    extractor = extractor_for("egemaps")
    features = extractor(voiced(1.0, f0=220.0))
    pitch = features[0, extractor.feature_names().index("F0semitoneFrom27.5Hz_sma3nz"), 10:-10]
    assert pitch.median().item() == pytest.approx(12 * math.log2(220 / 27.5), abs=0.5)


@needs_opensmile
@pytest.mark.parametrize("name", ["egemaps", "egemaps_functionals"])
def test_clips_shorter_than_a_window_and_silence_give_finite_features(name):
    extractor = extractor_for(name)
    for wave in (voiced(0.02), torch.zeros(SAMPLE_RATE // 2)):
        features = extractor(wave)
        assert features.shape[-1] >= 1 and torch.isfinite(features).all()


@needs_opensmile
def test_config_rebuilds_the_extractor_with_the_same_values():
    extractor = extractor_for("egemaps_functionals")
    config = extractor.config()
    assert config["name"] == "opensmile" and config["opensmile_version"]
    wave = voiced(0.5)
    assert torch.equal(build_features(config)(wave), extractor(wave))


@needs_opensmile
def test_level_dbfs_makes_the_functionals_independent_of_the_recording_level():
    from ser_pipeline.features.opensmile import OpenSmileFeatures

    wave = voiced(0.8)
    plain = OpenSmileFeatures("eGeMAPSv02", "functionals")
    levelled = OpenSmileFeatures("eGeMAPSv02", "functionals", level_dbfs=-25.0)
    loud = plain.feature_names().index("loudness_sma3_amean")
    quiet = 10.0 ** (-20.0 / 20.0)
    assert plain(wave * quiet)[0, loud, 0] < 0.5 * plain(wave)[0, loud, 0]
    torch.testing.assert_close(levelled(wave * quiet), levelled(wave), rtol=1e-3, atol=1e-3)
    config = levelled.config()
    assert config["level_dbfs"] == -25.0 and "level_dbfs" not in plain.config()
    assert torch.equal(build_features(config)(wave), levelled(wave))


@needs_opensmile
def test_a_batch_gives_what_each_item_gives_alone():
    extractor = extractor_for("egemaps")
    waves = torch.stack([voiced(0.5), voiced(0.5, f0=180.0)])
    assert torch.equal(extractor(waves)[1], extractor(waves[1]))


@needs_opensmile
def test_features_are_cached_and_read_back_unchanged(tmp_path):
    extractor = extractor_for("egemaps")
    path = tmp_path / "a.wav"
    sf.write(path, voiced(0.5).numpy(), SAMPLE_RATE)
    cache = FeatureCache(tmp_path / "cache", extractor.config())

    def compute(p: str) -> torch.Tensor:
        return extractor(torch.from_numpy(sf.read(p, dtype="float32")[0]))

    [first], _ = extract_features([str(path)], compute, cache, progress=False)
    [second], _ = extract_features([str(path)], compute, cache, progress=False)
    assert (cache.misses, cache.hits) == (1, 1) and torch.equal(first, second)
    other = FeatureCache(tmp_path / "cache", extractor_for("egemaps_functionals").config())
    assert other.folder != cache.folder


def test_without_the_extra_the_error_says_how_to_install_it_and_its_licence(monkeypatch):
    from ser_pipeline.features.opensmile import OpenSmileFeatures

    monkeypatch.setitem(sys.modules, "opensmile", None)  # what an absent package looks like
    with pytest.raises(ImportError, match=r"\.\[opensmile\]") as error:
        OpenSmileFeatures()
    assert "non-commercial" in str(error.value)


@needs_opensmile
@pytest.mark.slow
def test_train_py_trains_blstm_local_attn_on_egemaps(tmp_path):
    args = ["feature=egemaps", "model=blstm_local_attn", "data.reader.n_speakers=4",
            "data.reader.utterances_per_class=4", "trainer=debug",
            "trainer.enable_progress_bar=false", "model.net.frame_dims=[16]",
            "model.net.lstm_hidden=8", "model.net.head_hidden=8", "logger.mlflow.log_model=false"]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=store_uri(tmp_path))
    [run] = client.search_runs([client.get_experiment_by_name("ser-pipeline").experiment_id])
    assert run.info.status == "FINISHED" and "test/uar" in run.data.metrics
    assert run.data.params["feature.feature_set"] == "eGeMAPSv02"
