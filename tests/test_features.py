"""Audio reading, log-mel features and the on-disk feature cache."""

import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from ser_pipeline.audio import AudioError, read_audio
from ser_pipeline.features import LogMelFeatures, build_features
from ser_pipeline.features.cache import FeatureCache, extract_features, file_digest


def tone(path, seconds=0.5, rate=16000, channels=1, freq=220.0, subtype="PCM_16"):
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    sf.write(path, data, rate, subtype=subtype)
    return path


@pytest.mark.parametrize("deltas,channels", [(False, 1), (True, 3)])
def test_logmel_shape_is_channels_mels_frames(deltas, channels):
    extractor = LogMelFeatures(n_mels=40, hop_length=160, deltas=deltas)
    features = extractor(torch.randn(16000))
    assert features.shape == (channels, 40, 16000 // 160 + 1)
    assert extractor.out_channels == channels and extractor.n_features == 40


def test_logmel_batch_equals_items():
    extractor = LogMelFeatures()
    waves = torch.randn(2, 8000)
    assert torch.allclose(extractor(waves)[1], extractor(waves[1]), atol=1e-4)


def test_extractor_rebuilds_from_its_config():
    extractor = LogMelFeatures(n_mels=32, deltas=True)
    rebuilt = build_features(extractor.config())
    wave = torch.randn(4000)
    assert torch.equal(rebuilt(wave), extractor(wave))


def test_read_audio_downmixes_and_resamples(tmp_path):
    path = tone(tmp_path / "stereo.wav", seconds=1.0, rate=44100, channels=2)
    wave = read_audio(path, 16000)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(wave.shape[0] - 16000) <= 1


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4, "not a readable audio file"),
])
def test_read_audio_names_the_problem(tmp_path, content, reason):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=reason):
        read_audio(path, 16000)


def test_read_audio_refuses_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    sf.write(path, np.array([0.1, np.nan, 0.2] * 100, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        read_audio(path, 16000)


def test_cache_hit_returns_the_stored_features(tmp_path):
    extractor = LogMelFeatures()
    path = str(tone(tmp_path / "a.wav"))
    cache = FeatureCache(tmp_path / "cache", extractor.config())
    calls = []

    def compute(p):
        calls.append(p)
        return extractor(read_audio(p, 16000))

    first, _ = extract_features([path], compute, cache, progress=False)
    second, _ = extract_features([path], compute, cache, progress=False)
    assert len(calls) == 1 and cache.hits == 1 and cache.misses == 1
    assert torch.equal(first[0], second[0])


def test_cache_key_depends_on_content_and_config(tmp_path):
    path = tone(tmp_path / "a.wav")
    digest = file_digest(path)
    tone(path, freq=440.0)
    assert file_digest(path) != digest
    a = FeatureCache(tmp_path / "c", LogMelFeatures(n_mels=64).config())
    b = FeatureCache(tmp_path / "c", LogMelFeatures(n_mels=40).config())
    assert a.folder != b.folder


def test_corrupt_cache_entry_is_recomputed_not_trusted(tmp_path):
    cache = FeatureCache(tmp_path, {"name": "x"})
    cache.put("ab" * 32, torch.ones(1, 4, 5))
    entry = cache.entry("ab" * 32)
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the tensor data
    entry.write_bytes(bytes(data))
    assert cache.get("ab" * 32) is None
    assert not entry.exists()
    entry.parent.mkdir(exist_ok=True)
    entry.write_bytes(b"truncated")
    assert cache.get("ab" * 32) is None


def test_concurrent_writers_leave_valid_entries(tmp_path):
    cache = FeatureCache(tmp_path, {"name": "x"})
    tensors = [torch.full((1, 8, 100), float(i)) for i in range(4)]

    def write(t):
        for _ in range(20):
            cache.put("cd" * 32, t)

    threads = [threading.Thread(target=write, args=(t,)) for t in tensors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = cache.get("cd" * 32)
    assert stored is not None and any(torch.equal(stored, t) for t in tensors)
    assert not list(cache.entry("cd" * 32).parent.glob(".tmp-*"))


def test_undecodable_files_are_skipped_and_counted(tmp_path):
    extractor = LogMelFeatures()
    good = str(tone(tmp_path / "good.wav"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 10)
    features, skipped = extract_features(
        [good, str(bad)], lambda p: extractor(read_audio(p, 16000)),
        FeatureCache(tmp_path / "cache", extractor.config()), progress=False)
    assert features[0] is not None and features[1] is None
    assert list(skipped) == [str(bad)] and "not a readable audio file" in skipped[str(bad)]
