"""A microphone is not a corpus: predictions must not hang on the recording level.

``data.normalization=utterance`` z-scores every utterance with its own statistics; a gain
change is an additive shift of log-mel features, so it cancels exactly (up to float error
and clipping, which these tests avoid by keeping peaks below 0 dBFS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ser_pipeline.artifact import save_model_dir
from ser_pipeline.augment import WaveAugment
from ser_pipeline.corpora.synthetic import DEFAULT_EMOTIONS, make_speaker, synthesise_utterance
from ser_pipeline.features import LogMelFeatures
from ser_pipeline.features.batching import FeatureStats, normalize_utterances
from ser_pipeline.inference import Predictor
from ser_pipeline.models import CnnBlstmAttn

GAINS_DB = (-20.0, -10.0, 0.0, 5.0, 10.0)
#: largest allowed difference of class probabilities between gains
PROBABILITY_TOLERANCE = 1e-3


def speech_like(n: int = 8, peak: float = 0.25) -> list[torch.Tensor]:
    """``n`` synthetic utterances (4 emotions, 2 speakers), scaled to ``peak`` so that
    +10 dB (x 3.16) still does not clip."""
    rng = np.random.default_rng(0)
    waves = []
    for i in range(n):
        wave, _ = synthesise_utterance(make_speaker(i % 2, 0), DEFAULT_EMOTIONS[i % 4], rng)
        waves.append(torch.from_numpy(wave * (peak / np.abs(wave).max())).float())
    return waves


def gained(wave: torch.Tensor, db: float) -> torch.Tensor:
    return wave * 10.0 ** (db / 20.0)


@pytest.fixture(scope="module", params=["utterance", "level"])
def utterance_model_dir(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model normalising per utterance (``utterance`` or ``level``)."""
    torch.manual_seed(0)
    extractor = LogMelFeatures(sample_rate=16000, n_mels=16)
    kwargs = {"in_channels": 1, "n_features": 16, "n_emotions": len(DEFAULT_EMOTIONS),
              "conv_channels": [4, 8], "lstm_hidden": 8, "lstm_layers": 1, "lstm_dropout": 0.0,
              "attention_dim": 8, "head_hidden": 8, "fusion_dim": 8}
    net = CnnBlstmAttn(**kwargs)
    return save_model_dir(tmp_path_factory.mktemp("utterance_model"), net, kwargs, {
        "features": extractor.config(), "classes": list(DEFAULT_EMOTIONS),
        "genders": ["female", "male"], "dimensions": ["valence", "arousal", "dominance"],
        "has_gender": True, "has_dimensions": False, "normalization": request.param,
        "info": {"note": "untrained test model"},
    }, FeatureStats(torch.full((1, 16, 1), 0.5), torch.full((1, 16, 1), 2.0)))


@pytest.mark.parametrize("mode", ["utterance", "level"])
def test_utterance_normalised_log_mels_do_not_depend_on_the_gain(mode):
    extractor = LogMelFeatures(sample_rate=16000, n_mels=32)
    for wave in speech_like(4):
        stats = FeatureStats(torch.zeros(1, 32, 1), torch.full((1, 32, 1), 10.0))
        reference = normalize_utterances([extractor(wave)], mode, stats)[0]
        for db in GAINS_DB:
            features = normalize_utterances([extractor(gained(wave, db))], mode, stats)[0]
            assert torch.allclose(features, reference, atol=1e-3), db


def test_globally_normalised_log_mels_do_depend_on_the_gain():
    # the contrast that makes the test above mean something
    extractor = LogMelFeatures(sample_rate=16000, n_mels=32)
    wave = speech_like(1)[0]
    stats = FeatureStats(torch.zeros(1, 32, 1), torch.ones(1, 32, 1))
    quiet = normalize_utterances([extractor(gained(wave, -20))], "global", stats)[0]
    loud = normalize_utterances([extractor(wave)], "global", stats)[0]
    assert (loud - quiet).mean() == pytest.approx(20.0, abs=0.5)


def test_predictions_agree_from_minus_20_to_plus_10_db(utterance_model_dir):
    predictor = Predictor.from_dir(utterance_model_dir)
    waves = speech_like()
    reference = predictor.predict_waveforms(waves)
    for db in GAINS_DB:
        results = predictor.predict_waveforms([gained(w, db) for w in waves])
        for got, want in zip(results, reference, strict=True):
            assert got["emotion"] == want["emotion"], db
            assert max(abs(got["scores"][c] - want["scores"][c]) for c in want["scores"]) \
                < PROBABILITY_TOLERANCE, db


def test_one_file_at_a_time_predicts_as_a_batch_does(utterance_model_dir):
    # utterance statistics are each item's own: batching never mixes utterances
    predictor = Predictor.from_dir(utterance_model_dir)
    waves = speech_like(4)
    batch = predictor.predict_waveforms(waves)
    for wave, together in zip(waves, batch, strict=True):
        alone = predictor.predict_waveform(wave)
        assert alone["emotion"] == together["emotion"]
        assert alone["scores"] == pytest.approx(together["scores"], abs=1e-5)


def test_gain_augmentation_draws_gains_in_its_range_and_clips():
    augment = WaveAugment(gain_prob=1.0, gain_db=(-20.0, 10.0)).train()
    wave = torch.full((1000,), 0.5)
    ratios = []
    for seed in range(50):
        out = augment(wave, generator=seed)
        assert float(out.abs().max()) <= 1.0
        ratios.append(float(out[0] / wave[0]))
    db = 20 * np.log10(np.array(ratios))
    assert db.min() >= -20.0 - 1e-6 and db.max() <= 20 * np.log10(2.0) + 1e-6
    assert db.min() < -10.0  # the range is really drawn from, not one fixed gain
    assert augment.eval()(wave).equal(wave)


def test_trimming_cuts_the_silence_around_speech_at_any_level():
    from ser_pipeline.audio import trim_silence

    speech = speech_like(1)[0]
    silence = torch.zeros(8000) + 1e-5 * torch.randn(8000, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([silence, speech, silence])
    alone = trim_silence(speech, 16000, top_db=40.0)
    assert padded.shape[0] - alone.shape[0] >= 16000  # the padding is gone
    for db in (-20.0, 0.0):
        trimmed = trim_silence(gained(padded, db), 16000, top_db=40.0)
        assert abs(trimmed.shape[0] - alone.shape[0]) <= 2 * 160  # within two hops


def test_a_trimming_extractor_sees_the_same_speech_with_and_without_padding():
    extractor = LogMelFeatures(sample_rate=16000, n_mels=16, trim_db=40.0)
    speech = speech_like(1)[0]
    padded = torch.cat([torch.zeros(4000), speech, torch.zeros(4000)])
    assert abs(extractor(padded).shape[-1] - extractor(speech).shape[-1]) <= 4
    assert extractor.config()["trim_db"] == 40.0


def test_a_quiet_recording_with_digital_silence_shifts_log_mels_by_the_gain_alone():
    # RAVDESS-like: speech at -34 dBFS peak, then zeros. Turned down 20 dB, every log-mel value
    # (speech, and the silence floored top_db below the peak) drops by 20 dB: an absolute power
    # floor (torchaudio's default 1e-10) would leave the silence where it was
    wave = torch.cat([speech_like(1, peak=0.02)[0], torch.zeros(8000)])
    extractor = LogMelFeatures()
    original, quieter = extractor(wave), extractor(gained(wave, -20.0))
    assert torch.allclose(original - quieter, torch.full_like(original, 20.0), atol=0.05)
