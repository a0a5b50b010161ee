"""webrtcvad segmentation: where utterances start and end, for streams and whole waveforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ser_pipeline.audio import resample
from ser_pipeline.vad import (
    VAD_SAMPLE_RATE,
    SegmenterConfig,
    StreamingSegmenter,
    segment_waveform,
)

SR = VAD_SAMPLE_RATE


def speech_like(seconds: float, sample_rate: int = SR, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-modulated harmonic signal that webrtcvad classifies as speech.

    29 harmonics of a gliding 120-175 Hz F0, amplitude-modulated at ~4 syllables/s;
    ``(time,)`` float32, peak 0.3.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = rng.uniform(120, 150) + 25 * np.sin(2 * np.pi * rng.uniform(0.5, 1.0) * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30))
    syllables = 0.55 - 0.45 * np.cos(2 * np.pi * 4.0 * t)
    return (0.3 * voiced / np.abs(voiced).max() * syllables).astype(np.float32)


def silence(seconds: float, sample_rate: int = SR) -> np.ndarray:
    """Near-silence: a -70 dBFS noise floor, like a quiet room through a microphone."""
    rng = np.random.default_rng(1)
    return (3e-4 * rng.standard_normal(int(seconds * sample_rate))).astype(np.float32)


def recording(*parts: tuple[str, float], sample_rate: int = SR) -> np.ndarray:
    """``("speech", 2.0), ("silence", 1.0), ...`` joined into one waveform."""
    pieces = [speech_like(s, sample_rate, seed=i) if kind == "speech" else silence(s, sample_rate)
              for i, (kind, s) in enumerate(parts)]
    return np.concatenate(pieces)


def spans(utterances) -> list[tuple[float, float]]:
    return [(u.start_s, u.end_s) for u in utterances]


def test_speech_between_silences_is_one_utterance_near_its_boundaries():
    wave = recording(("silence", 1.0), ("speech", 2.0), ("silence", 1.0))
    [(start, end)] = spans(segment_waveform(wave, SR))
    assert start == pytest.approx(1.0, abs=0.15)
    assert end == pytest.approx(3.0, abs=0.45)  # padding_ms (0.3 s) is kept after the speech
    assert end >= 3.0


def test_pause_longer_than_the_hangover_separates_utterances():
    wave = recording(("silence", 0.5), ("speech", 1.5), ("silence", 1.0), ("speech", 1.0),
                     ("silence", 0.5))
    (s1, e1), (s2, e2) = spans(segment_waveform(wave, SR))
    assert s1 == pytest.approx(0.5, abs=0.15) and s2 == pytest.approx(3.0, abs=0.15)
    assert e1 < s2


def test_pause_shorter_than_the_hangover_does_not_cut():
    wave = recording(("silence", 0.5), ("speech", 1.0), ("silence", 0.15), ("speech", 1.0),
                     ("silence", 0.5))
    config = SegmenterConfig(hangover_ms=400)
    assert len(segment_waveform(wave, SR, config)) == 1


def test_burst_shorter_than_min_speech_is_dropped():
    wave = recording(("silence", 0.5), ("speech", 0.12), ("silence", 1.0))
    assert segment_waveform(wave, SR, SegmenterConfig(min_speech_ms=300)) == []


def test_silence_has_no_utterance():
    assert segment_waveform(silence(3.0), SR) == []


def test_long_speech_is_cut_at_max_utterance_s():
    wave = recording(("silence", 0.5), ("speech", 5.0), ("silence", 1.0))
    utterances = segment_waveform(wave, SR, SegmenterConfig(max_utterance_s=2.0))
    assert len(utterances) == 3
    assert all(u.end_s - u.start_s <= 2.0 + 1e-9 for u in utterances)
    assert [u.forced for u in utterances] == [True, True, False]
    assert utterances[0].end == utterances[1].start  # nothing lost between forced cuts


def test_chunk_size_does_not_change_the_cuts():
    wave = recording(("silence", 0.7), ("speech", 1.2), ("silence", 0.8), ("speech", 0.9),
                     ("silence", 0.6))
    whole = segment_waveform(wave, SR)
    segmenter = StreamingSegmenter()
    streamed = []
    for i in range(0, len(wave), 137):  # not a multiple of the 480-sample frame
        streamed += segmenter.feed(wave[i : i + 137])
    streamed += segmenter.flush()
    assert [(u.start, u.end) for u in streamed] == [(u.start, u.end) for u in whole]


def test_utterance_audio_is_the_input_between_its_start_and_end():
    wave = recording(("silence", 0.5), ("speech", 1.0), ("silence", 0.6))
    [utterance] = segment_waveform(wave, SR)
    np.testing.assert_array_equal(utterance.audio, wave[utterance.start : utterance.end])


def test_flush_returns_the_utterance_in_progress():
    segmenter = StreamingSegmenter()
    assert segmenter.feed(recording(("silence", 0.5), ("speech", 1.5))) == []
    assert segmenter.in_speech
    [utterance] = segmenter.flush()
    assert utterance.forced
    assert utterance.end == pytest.approx(2.0 * SR, abs=0.05 * SR)
    assert not segmenter.in_speech


def test_end_is_detected_one_hangover_after_the_last_voiced_frame():
    wave = recording(("silence", 0.5), ("speech", 1.0), ("silence", 1.0))
    [utterance] = segment_waveform(wave, SR, SegmenterConfig(hangover_ms=240))
    assert utterance.end_detected_after_ms == pytest.approx(240, abs=1)


def test_memory_stays_bounded_during_long_silence():
    segmenter = StreamingSegmenter()
    quiet = silence(1.0)
    for _ in range(30):
        segmenter.feed(quiet)
    retained = segmenter.samples_fed - segmenter.retained_from
    assert retained <= SR * SegmenterConfig().padding_ms // 1000 + len(quiet)


def test_other_sample_rates_give_the_same_times():
    at_16k = recording(("silence", 0.8), ("speech", 1.2), ("silence", 0.8))
    at_44k = resample(torch.from_numpy(at_16k), SR, 44100)
    [(s16, e16)] = spans(segment_waveform(at_16k, SR))
    [(s44, e44)] = spans(segment_waveform(at_44k, 44100))
    assert s44 == pytest.approx(s16, abs=0.035) and e44 == pytest.approx(e16, abs=0.035)


@pytest.mark.parametrize("options", [{"aggressiveness": 4}, {"frame_ms": 25},
                                     {"hangover_ms": 0}, {"max_utterance_s": 0.2}])
def test_invalid_settings_are_refused(options):
    with pytest.raises(ValueError):
        SegmenterConfig(**options)
