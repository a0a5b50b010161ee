"""Properties of the audio reader and the feature pipeline over generated audio files.

Hypothesis draws lengths, sample rates (common and odd ones), channel counts,
amplitudes and sample formats; whatever it draws, the reader gives a finite mono
waveform of the resampled length (or a named AudioError), and the features have the
shape the frame formula says.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ser_pipeline.audio import AudioError, iter_audio_blocks, read_audio
from ser_pipeline.features import LogMelFeatures
from ser_pipeline.features.cache import FeatureCache
from ser_pipeline.features.logmel import frames_for

TARGET = 16000
PROPERTY = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

common_rates = st.sampled_from([8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000])
# rates sharing few factors with 16 kHz (e.g. 12347 Hz) once made torchaudio build a ~1 GB kernel
odd_rates = st.integers(min_value=1000, max_value=192000)
rates = st.one_of(common_rates, odd_rates)
int_subtypes = st.sampled_from(["PCM_U8", "PCM_16", "PCM_24", "PCM_32"])
float_subtypes = st.sampled_from(["FLOAT", "DOUBLE"])


@st.composite
def audio_files(draw, max_seconds: float = 0.4):
    """(samples, rate, channels, subtype, amplitude, seed) of a valid audio file."""
    rate = draw(rates)
    shortest = max(2, math.ceil(2 * rate / TARGET))  # still 2 samples once resampled
    samples = draw(st.integers(min_value=shortest, max_value=max(shortest,
                                                                 int(max_seconds * rate))))
    channels = draw(st.integers(min_value=1, max_value=6))
    subtype = draw(st.one_of(int_subtypes, float_subtypes))
    limit = 1.0 if subtype.startswith("PCM") else 1000.0  # float files may exceed full scale
    amplitude = draw(st.floats(min_value=0.0, max_value=limit))
    return samples, rate, channels, subtype, amplitude, draw(st.integers(0, 2**32 - 1))


def write(folder: Path, samples: int, rate: int, channels: int, subtype: str,
          amplitude: float, seed: int) -> Path:
    """Noise at ``amplitude`` peak, the same in every channel; returns the path."""
    noise = np.random.default_rng(seed).uniform(-1.0, 1.0, samples) * amplitude
    path = folder / "audio.wav"
    sf.write(path, np.repeat(noise[:, None], channels, axis=1), rate, subtype=subtype)
    return path


def resampled_length(samples: int, rate: int) -> int:
    return math.ceil(samples * TARGET / rate)


@PROPERTY
@given(audio_files())
def test_reader_gives_finite_mono_of_the_resampled_length(spec):
    with tempfile.TemporaryDirectory() as folder:
        wave = read_audio(write(Path(folder), *spec), TARGET)
    samples, rate = spec[0], spec[1]
    assert wave.ndim == 1 and wave.dtype == torch.float32
    assert abs(wave.shape[0] - resampled_length(samples, rate)) <= 1
    assert torch.isfinite(wave).all()


@PROPERTY
@given(rates, st.integers(min_value=2, max_value=40))
def test_file_too_short_once_resampled_is_refused_by_name(rate, samples):
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), samples, rate, 1, "PCM_16", 0.5, 0)
        if resampled_length(samples, rate) >= 2:
            assert read_audio(path, TARGET).shape[0] >= 2
            return
        with pytest.raises(AudioError, match="too short"):
            read_audio(path, TARGET)


@PROPERTY
@given(audio_files())
def test_streamed_blocks_add_up_to_the_whole_file(spec):
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), *spec)
        whole = read_audio(path, TARGET)
        blocks = list(iter_audio_blocks(path, TARGET, block_seconds=0.1))
    assert all(b.ndim == 1 and torch.isfinite(b).all() for b in blocks)
    # each block is resampled on its own: lengths agree within a sample per block
    assert abs(sum(b.shape[0] for b in blocks) - whole.shape[0]) <= len(blocks)


@PROPERTY
@given(audio_files(), st.integers(min_value=2, max_value=6))
def test_identical_channels_down_mix_to_the_mono_signal(spec, channels):
    samples, rate, _, subtype, amplitude, seed = spec
    with tempfile.TemporaryDirectory() as folder:
        mono = read_audio(write(Path(folder), samples, rate, 1, subtype, amplitude, seed), TARGET)
        mixed = read_audio(
            write(Path(folder), samples, rate, channels, subtype, amplitude, seed), TARGET)
    assert torch.allclose(mono, mixed, atol=1e-5 * max(1.0, amplitude))


@PROPERTY
@given(audio_files(), st.booleans())
def test_features_are_finite_with_the_frame_formula_shape(spec, deltas):
    extractor = LogMelFeatures(n_mels=16, deltas=deltas)
    with tempfile.TemporaryDirectory() as folder:
        wave = read_audio(write(Path(folder), *spec), TARGET)
    features = extractor(wave)
    assert features.shape == (3 if deltas else 1, 16, frames_for(max(wave.shape[0], 257), 160))
    assert torch.isfinite(features).all()


@PROPERTY
@given(st.floats(min_value=0.0, max_value=1e30), st.integers(0, 2**32 - 1))
def test_any_float_amplitude_gives_finite_features_or_a_named_error(amplitude, seed):
    extractor = LogMelFeatures(n_mels=16)
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), 1600, TARGET, 1, "FLOAT", amplitude, seed)
        try:
            features = extractor(read_audio(path, TARGET))
        except AudioError as error:
            assert "far outside" in error.reason
            return
    assert torch.isfinite(features).all()


@PROPERTY
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 300),
       st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), st.integers(0, 2**32 - 1))
def test_cache_returns_exactly_what_was_stored(channels, n_features, frames, scale, seed):
    tensor = torch.randn(channels, n_features, frames,
                         generator=torch.Generator().manual_seed(seed)) * scale
    with tempfile.TemporaryDirectory() as folder:
        cache = FeatureCache(folder, {"name": "x"})
        cache.put("ef" * 32, tensor)
        assert torch.equal(cache.get("ef" * 32), tensor)


@pytest.mark.parametrize("rate", [12347, 23757, 96001])
@pytest.mark.timeout(10)
def test_odd_rate_resamples_quickly(tmp_path, rate):
    path = write(tmp_path, rate, rate, 1, "PCM_16", 0.5, 0)  # one second
    assert abs(read_audio(path, TARGET).shape[0] - TARGET) <= 1
