"""LLDFeatures: the 34 pyAudioAnalysis-style short-term descriptors per log-mel frame."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ser_pipeline.features import LogMelFeatures, build_features
from ser_pipeline.features.lld import LLDFeatures

SAMPLE_RATE = 16000
NYQUIST = SAMPLE_RATE / 2
BIN_HZ = SAMPLE_RATE / 512  # STFT bin width with the default n_fft


@pytest.fixture(scope="module")
def lld() -> LLDFeatures:
    return LLDFeatures()


def sine(freq: float, seconds: float = 0.5, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * SAMPLE_RATE), dtype=torch.float64) / SAMPLE_RATE
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def white_noise(seconds: float = 0.5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(int(seconds * SAMPLE_RATE), generator=generator)


def row(lld: LLDFeatures, features: torch.Tensor, name: str) -> torch.Tensor:
    """One feature over time, interior frames only (the edges see reflect padding)."""
    return features[0, lld.feature_names().index(name), 3:-3]


def test_has_one_channel_of_34_features(lld: LLDFeatures) -> None:
    features = lld(sine(440.0))
    assert (lld.out_channels, lld.n_features) == (1, 34)
    assert features.shape[:2] == (1, 34)
    assert features.dtype == torch.float32
    assert len(lld.feature_names()) == 34


@pytest.mark.parametrize("num_samples", [200, 1000, 16000, 16001, 12345])
def test_frames_line_up_with_log_mel_framing(lld: LLDFeatures, num_samples: int) -> None:
    wave = white_noise(seconds=num_samples / SAMPLE_RATE)
    assert lld(wave).shape[-1] == LogMelFeatures()(wave).shape[-1]


def test_batch_gives_the_same_features_as_each_item(lld: LLDFeatures) -> None:
    batch = torch.stack([sine(440.0), white_noise()])
    features = lld(batch)
    assert features.shape[:3] == (2, 1, 34)
    for item, item_features in zip(batch, features, strict=True):
        torch.testing.assert_close(item_features, lld(item), rtol=1e-4, atol=1e-4)


def test_silence_gives_finite_features(lld: LLDFeatures) -> None:
    features = lld(torch.zeros(SAMPLE_RATE // 2))
    assert torch.isfinite(features).all()
    assert (row(lld, features, "zero_crossing_rate") == 0).all()
    assert (row(lld, features, "energy") == 0).all()


def test_zero_crossing_rate_of_sine_is_twice_its_frequency_per_sample(lld: LLDFeatures) -> None:
    zcr = row(lld, lld(sine(1000.0)), "zero_crossing_rate")
    # a 400-sample frame holds 50 +- 1 crossings of a 1 kHz sine
    torch.testing.assert_close(zcr, torch.full_like(zcr, 2 * 1000 / SAMPLE_RATE), atol=3e-3, rtol=0)


def test_energy_of_sine_is_half_its_squared_amplitude(lld: LLDFeatures) -> None:
    energy = row(lld, lld(sine(440.0, amplitude=0.5)), "energy")
    torch.testing.assert_close(energy, torch.full_like(energy, 0.5**2 / 2), rtol=2e-2, atol=0)


def test_energy_entropy_is_maximal_for_steady_sine_and_low_for_a_click(lld: LLDFeatures) -> None:
    steady = row(lld, lld(sine(1000.0)), "energy_entropy")
    torch.testing.assert_close(steady, torch.full_like(steady, math.log2(10)), atol=1e-2, rtol=0)
    click = torch.zeros(SAMPLE_RATE // 2)
    click[4000] = 1.0
    frame_centred_on_click = 4000 // 160
    assert lld(click)[0, 2, frame_centred_on_click] < 0.01


@pytest.mark.parametrize("freq", [1000.0, 2500.0])
def test_spectral_centroid_of_sine_is_its_frequency(lld: LLDFeatures, freq: float) -> None:
    centroid_hz = row(lld, lld(sine(freq)), "spectral_centroid") * NYQUIST
    assert (centroid_hz - freq).abs().max() < BIN_HZ


def test_spectral_spread_of_sine_is_below_a_few_bins(lld: LLDFeatures) -> None:
    spread_hz = row(lld, lld(sine(1000.0)), "spectral_spread") * NYQUIST
    assert spread_hz.max() < 4 * BIN_HZ


def test_white_noise_has_flat_spectrum_statistics(lld: LLDFeatures) -> None:
    features = lld(white_noise(seconds=2.0))
    # uniform spectrum on [0, 1] (Nyquist units): mean 1/2, std 1/sqrt(12), 90 % below 0.9
    assert row(lld, features, "spectral_centroid").mean() == pytest.approx(0.5, abs=0.02)
    assert row(lld, features, "spectral_spread").mean() == pytest.approx(12**-0.5, abs=0.02)
    assert row(lld, features, "spectral_rolloff").mean() == pytest.approx(0.9, abs=0.02)
    assert row(lld, features, "spectral_entropy").mean() == pytest.approx(math.log2(10), abs=0.1)


def test_spectral_rolloff_of_sine_is_its_frequency(lld: LLDFeatures) -> None:
    rolloff_hz = row(lld, lld(sine(1000.0)), "spectral_rolloff") * NYQUIST
    # 90 % of a Hann-windowed tone's power lies within its main lobe (+- 2 bins)
    assert (rolloff_hz - 1000.0).abs().max() <= 2 * BIN_HZ


def test_spectral_entropy_of_sine_is_low(lld: LLDFeatures) -> None:
    assert row(lld, lld(sine(1000.0)), "spectral_entropy").max() < 0.1


def test_spectral_flux_is_zero_for_steady_sine_and_peaks_at_onset(lld: LLDFeatures) -> None:
    assert row(lld, lld(sine(1000.0)), "spectral_flux").max() < 1e-4
    onset = torch.cat([sine(300.0, seconds=0.25), sine(3000.0, seconds=0.25)])
    flux = row(lld, lld(onset), "spectral_flux")
    onset_frame = 4000 // 160 - 3  # row() drops the first 3 frames
    assert abs(int(flux.argmax()) - onset_frame) <= 2


def test_chroma_peaks_at_a_for_a_440_hz_tone(lld: LLDFeatures) -> None:
    features = lld(sine(440.0))
    chroma = features[0, 21:33, 3:-3]
    assert (chroma.argmax(dim=0) == lld.feature_names().index("chroma_A") - 21).all()
    assert (chroma.sum(dim=0) <= 1 + 1e-5).all()


def test_chroma_deviation_is_the_std_of_the_chroma_bins(lld: LLDFeatures) -> None:
    features = lld(white_noise())
    expected = features[0, 21:33].std(dim=0, correction=0)
    torch.testing.assert_close(features[0, 33], expected)


def test_mfccs_match_librosa_with_the_same_parameters(lld: LLDFeatures) -> None:
    librosa = pytest.importorskip("librosa")
    wave = sine(440.0) + white_noise()
    mel = librosa.feature.melspectrogram(
        y=wave.numpy().astype(np.float64),
        sr=SAMPLE_RATE,
        n_fft=512,
        win_length=400,
        hop_length=160,
        n_mels=40,
        center=True,
        pad_mode="reflect",
        power=2.0,
    )
    # top_db=None: LLDFeatures clips each frame at -100 dB, never relative to the loudest
    expected = librosa.feature.mfcc(S=librosa.power_to_db(mel, top_db=None), n_mfcc=13)
    mfcc = lld(wave)[0, 8:21].double().numpy()
    assert mfcc.shape == expected.shape
    np.testing.assert_allclose(mfcc, expected, atol=1e-3, rtol=0)


def test_config_rebuilds_an_identical_extractor(lld: LLDFeatures) -> None:
    config = lld.config()
    assert config["name"] == "lld"
    rebuilt = build_features(config)
    assert isinstance(rebuilt, LLDFeatures)
    assert rebuilt.config() == config
    wave = white_noise()
    torch.testing.assert_close(rebuilt(wave), lld(wave))
