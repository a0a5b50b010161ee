"""Generators of bad and odd audio files, for tests of everything that reads audio.

Each ``write_*`` function writes one file (or folder) at ``path`` and returns ``path``.
:data:`BAD` and :data:`ODD` map a short name to a generator: a bad file must give a
named :class:`~ser_pipeline.audio.AudioError` wherever audio is read, an odd one must
be decoded like any other speech file. :data:`BAD_REASONS` is the reason (a
substring) each bad file must be refused with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf


def tone(seconds: float = 0.5, sample_rate: int = 16000, amplitude: float = 0.3,
         freq: float = 220.0) -> np.ndarray:
    """A sine ``(samples,)`` float64, the stand-in for speech in these files."""
    time = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return amplitude * np.sin(2 * np.pi * freq * time)


def write_tone(path: Path, seconds: float = 0.5, sample_rate: int = 16000, channels: int = 1,
               subtype: str = "PCM_16", amplitude: float = 0.3) -> Path:
    """A tone in ``channels`` identical channels, stored as ``subtype`` (libsndfile names)."""
    wave = tone(seconds, sample_rate, amplitude)
    data = np.repeat(wave[:, None], channels, axis=1) if channels > 1 else wave
    sf.write(path, data, sample_rate, subtype=subtype)
    return path


# --------------------------------------------------------------------------- bad files


def write_random_bytes(path: Path, size: int = 4096, seed: int = 0) -> Path:
    """Noise bytes under a ``.wav`` name: no format libsndfile recognises."""
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def write_truncated_header(path: Path) -> Path:
    """The first 30 bytes of a valid WAV: RIFF/fmt present, no ``data`` chunk."""
    write_tone(path)
    path.write_bytes(path.read_bytes()[:30])
    return path


def write_header_only(path: Path) -> Path:
    """A complete 44-byte WAV header whose data chunk was cut off: zero frames."""
    write_tone(path)
    path.write_bytes(path.read_bytes()[:44])
    return path


def write_zero_length(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_one_sample(path: Path) -> Path:
    sf.write(path, np.array([0.25]), 16000, subtype="PCM_16")
    return path


def write_float_samples(path: Path, value: float, samples: int = 1600) -> Path:
    """A 32-bit float WAV of a tone with every tenth sample set to ``value`` (NaN, inf)."""
    wave = tone(samples / 16000).astype(np.float32)
    wave[::10] = value
    sf.write(path, wave, 16000, subtype="FLOAT")
    return path


def write_nan(path: Path) -> Path:
    return write_float_samples(path, np.nan)


def write_inf(path: Path) -> Path:
    return write_float_samples(path, np.inf)


def write_huge_floats(path: Path) -> Path:
    """Finite floats of magnitude 1e20: a corrupt float file whose power spectrum overflows."""
    sf.write(path, (tone(0.1) * 1e20).astype(np.float32), 16000, subtype="FLOAT")
    return path


def write_rate_1hz(path: Path) -> Path:
    """A header claiming 1 sample per second: resampling would make 16000x the samples."""
    sf.write(path, tone(0.5), 1, subtype="PCM_16")
    return path


def write_directory(path: Path) -> Path:
    """A folder named like an audio file."""
    path.mkdir()
    return path


BAD: dict[str, Callable[[Path], Path]] = {
    "random_bytes": write_random_bytes,
    "truncated_header": write_truncated_header,
    "header_only": write_header_only,
    "zero_length": write_zero_length,
    "one_sample": write_one_sample,
    "nan_floats": write_nan,
    "inf_floats": write_inf,
    "huge_floats": write_huge_floats,
    "rate_1hz": write_rate_1hz,
    "directory": write_directory,
}

BAD_REASONS: dict[str, str] = {
    "random_bytes": "not a readable audio file",
    "truncated_header": "not a readable audio file",
    "header_only": "no audio samples",
    "zero_length": "empty file",
    "one_sample": "too short",
    "nan_floats": "NaN or infinite",
    "inf_floats": "NaN or infinite",
    "huge_floats": "far outside [-1, 1]",
    "rate_1hz": "implausible sample rate",
    "directory": "is a directory",
}

# --------------------------------------------------------------------------- odd but valid


def _tone_writer(**options) -> Callable[[Path], Path]:
    return lambda path: write_tone(path, **options)


#: name -> (writer, sample rate, channels) of files that must decode like speech.
ODD: dict[str, tuple[Callable[[Path], Path], int, int]] = {
    "pcm_u8": (_tone_writer(subtype="PCM_U8"), 16000, 1),
    "pcm_24": (_tone_writer(subtype="PCM_24"), 16000, 1),
    "pcm_32": (_tone_writer(subtype="PCM_32"), 16000, 1),
    "float32": (_tone_writer(subtype="FLOAT"), 16000, 1),
    "float64": (_tone_writer(subtype="DOUBLE"), 16000, 1),
    "float_loud": (_tone_writer(subtype="FLOAT", amplitude=4.0), 16000, 1),
    "stereo": (_tone_writer(channels=2), 16000, 2),
    "surround_5_1": (_tone_writer(channels=6), 16000, 6),
    "rate_8k": (_tone_writer(sample_rate=8000), 8000, 1),
    "rate_96k": (_tone_writer(sample_rate=96000, subtype="PCM_24"), 96000, 1),
    "rate_11025": (_tone_writer(sample_rate=11025), 11025, 1),
    "two_samples": (lambda path: _write(path, np.array([0.1, -0.1]), 16000), 16000, 1),
}

ODD_SECONDS = 0.5  # duration of the ODD tones (except ``two_samples``)


def _write(path: Path, data: np.ndarray, sample_rate: int) -> Path:
    sf.write(path, data, sample_rate, subtype="PCM_16")
    return path


def write_long_recording(path: Path, seconds: float, sample_rate: int = 8000,
                         silent: bool = False) -> Path:
    """A long 16-bit mono recording, written a minute at a time (never held in memory)."""
    minute = np.zeros(60 * sample_rate, dtype=np.int16)
    if not silent:
        minute = (3000 * np.sin(np.arange(minute.size) * 0.05)).astype(np.int16)
    remaining = int(seconds * sample_rate)
    with sf.SoundFile(path, "w", samplerate=sample_rate, channels=1, subtype="PCM_16") as out:
        while remaining > 0:
            out.write(minute[:remaining])
            remaining -= minute.size
    return path
