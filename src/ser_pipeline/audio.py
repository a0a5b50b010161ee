"""Reading audio files: one function that every reader of audio calls.

Training, the feature cache, benchmarks and inference all go through
:func:`read_audio`, so a file is decoded, down-mixed and resampled the same way
everywhere, and a bad file always fails with the same named :class:`AudioError`.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from scipy import signal

#: Header rates outside this range are corrupt or not audio: refused before decoding, since a
#: tiny file claiming 1 Hz would be resampled into gigabytes.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768_000
#: Float samples are nominally within [-1, 1]; far beyond this the power spectrum overflows
#: float32 (about 1e19) and features turn infinite, so such files are refused as not audio.
MAX_ABS_SAMPLE = 1e6
#: torchaudio's sinc kernel is (new/gcd, orig/gcd)-sized: fine for 44.1k/48k/11025 (<= 640),
#: but a rate sharing few factors with the target (12347 Hz) needs ~1 GB and seconds per file.
MAX_SINC_FACTOR = 1000


class AudioError(Exception):
    """A file that cannot be used as speech audio; ``reason`` says why in a few words."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def _open(path: Path) -> sf.SoundFile:
    try:  # stat fails with EACCES (not "missing") inside a folder we may not enter
        if path.is_dir():
            raise AudioError(path, "is a directory, not an audio file")
        if not path.exists():
            raise AudioError(path, "file not found")
        if not os.access(path, os.R_OK):
            raise AudioError(path, "permission denied")
        if path.stat().st_size == 0:
            raise AudioError(path, "empty file (0 bytes)")
    except PermissionError as error:
        raise AudioError(path, "permission denied (cannot enter its folder)") from error
    except OSError as error:
        raise AudioError(path, f"cannot access file ({error.strerror or error})") from error
    try:
        handle = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(path, f"not a readable audio file ({error})") from error
    if not MIN_SAMPLE_RATE <= handle.samplerate <= MAX_SAMPLE_RATE:
        handle.close()
        raise AudioError(path, f"implausible sample rate {handle.samplerate} Hz (corrupt header?)")
    return handle


def _to_mono_float(block: np.ndarray, path: Path) -> torch.Tensor:
    """``(frames, channels)`` -> mono ``(frames,)`` float32, refusing non-finite samples."""
    block = np.asarray(block, dtype=np.float32)
    if block.ndim == 2:  # a mono file is a view of its one column, not a reduction over it
        mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)
    else:
        mono = block
    # one pass: NaN and inf both make the peak non-finite (finite float32 samples cannot)
    peak = float(np.abs(mono).max()) if mono.size else 0.0
    if not math.isfinite(peak):
        raise AudioError(path, "contains NaN or infinite samples")
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(path, f"samples far outside [-1, 1] (peak {peak:.3g})")
    return torch.from_numpy(np.ascontiguousarray(mono))


@functools.lru_cache(maxsize=16)
def _sinc_resampler(orig_rate: int, new_rate: int) -> torchaudio.transforms.Resample:
    # one transform per rate pair: torchaudio.functional.resample rebuilds its sinc kernel
    # on every call, which made resampling the slowest step of reading a file
    return torchaudio.transforms.Resample(orig_rate, new_rate)


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """``(..., time)`` at ``orig_rate`` -> ``(..., time')`` at ``new_rate``.

    torchaudio's sinc resampler; scipy's polyphase filter for rates with few common factors.
    """
    if orig_rate == new_rate:
        return waveform
    divisor = math.gcd(orig_rate, new_rate)
    if max(orig_rate, new_rate) // divisor <= MAX_SINC_FACTOR:
        with torch.no_grad():
            return _sinc_resampler(orig_rate, new_rate)(waveform)
    # polyphase FIR instead: its cost grows with the signal, not with the rates' factors
    out = signal.resample_poly(waveform.detach().cpu().numpy(), new_rate // divisor,
                               orig_rate // divisor, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(waveform.device)


def audio_info(path: str | Path) -> tuple[int, int, int]:
    """``(sample_rate, frames, channels)`` of a file, without decoding it."""
    path = Path(path)
    with _open(path) as handle:
        return handle.samplerate, handle.frames, handle.channels


def read_audio(path: str | Path, sample_rate: int, min_samples: int = 2) -> torch.Tensor:
    """Decode ``path`` to a mono float32 waveform ``(time,)`` at ``sample_rate``.

    Any format and rate libsndfile reads; channels are averaged. Raises
    :class:`AudioError` for missing, unreadable, empty, too-short or non-finite audio.
    """
    path = Path(path)
    with _open(path) as handle:
        rate = handle.samplerate
        if handle.frames == 0:
            raise AudioError(path, "no audio samples (0 frames)")
        try:
            block = handle.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as error:
            raise AudioError(path, f"cannot decode audio ({error})") from error
    if block.shape[0] < min_samples:
        raise AudioError(path, f"too short ({block.shape[0]} samples)")
    wave = resample(_to_mono_float(block, path), rate, sample_rate)
    if wave.shape[0] < min_samples:  # e.g. 2 samples at 32 kHz are 1 sample at 16 kHz
        raise AudioError(path, f"too short ({block.shape[0]} samples at {rate} Hz)")
    return wave


def iter_audio_blocks(
    path: str | Path, sample_rate: int, block_seconds: float = 30.0
) -> Iterator[torch.Tensor]:
    """Yield a long file as consecutive mono blocks ``(time,)`` at ``sample_rate``.

    Only one block is held in memory at a time (an hour-long recording streams).
    Blocks are resampled independently, which is exact up to the resampling
    filter's edge (a few samples at block joins).
    """
    path = Path(path)
    with _open(path) as handle:
        rate = handle.samplerate
        if handle.frames == 0:
            raise AudioError(path, "no audio samples (0 frames)")
        for block in handle.blocks(blocksize=max(1, int(block_seconds * rate)), dtype="float32",
                                   always_2d=True):
            yield resample(_to_mono_float(block, path), rate, sample_rate)


def read_audio_segment(
    path: str | Path, sample_rate: int, start_s: float, end_s: float
) -> torch.Tensor:
    """Seconds ``[start_s, end_s)`` of ``path`` as mono float32 ``(time,)`` at ``sample_rate``.

    Seeks instead of decoding the whole file; down-mixing and resampling are those
    of :func:`read_audio`, so a cut utterance reaches a model exactly as in training.
    """
    path = Path(path)
    with _open(path) as handle:
        rate = handle.samplerate
        first = max(0, int(round(start_s * rate)))
        count = max(0, min(handle.frames, int(round(end_s * rate))) - first)
        try:
            handle.seek(first)
            block = handle.read(count, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as error:
            raise AudioError(path, f"cannot decode audio ({error})") from error
    if block.shape[0] < 2:
        raise AudioError(path, f"too short between {start_s:.2f} s and {end_s:.2f} s")
    return resample(_to_mono_float(block, path), rate, sample_rate)


def _open_bytes(data: bytes, name: str) -> sf.SoundFile:
    """:func:`_open` for the bytes of an audio file."""
    if not data:
        raise AudioError(name, "empty (0 bytes)")
    try:
        handle = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        # libsndfile's own words, not "Error opening <_io.BytesIO object at 0x...>: ..."
        reason = getattr(error, "error_string", None) or error
        raise AudioError(name, f"not a readable audio file ({reason})") from error
    if not MIN_SAMPLE_RATE <= handle.samplerate <= MAX_SAMPLE_RATE:
        handle.close()
        raise AudioError(name, f"implausible sample rate {handle.samplerate} Hz (corrupt header?)")
    return handle


def audio_bytes_info(data: bytes, name: str = "<audio bytes>") -> tuple[int, int, int]:
    """``(sample_rate, frames, channels)`` of the bytes of an audio file, without decoding them."""
    with _open_bytes(data, name) as handle:
        return handle.samplerate, handle.frames, handle.channels


def decode_audio_bytes(data: bytes, sample_rate: int, name: str = "<audio bytes>") -> torch.Tensor:
    """The bytes of an audio file -> mono float32 ``(time,)`` at ``sample_rate``.

    For audio that arrives over the network (the MLflow model server); down-mixing,
    checks and resampling are those of :func:`read_audio`.
    """
    with _open_bytes(data, name) as handle:
        rate = handle.samplerate
        try:
            block = handle.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as error:
            raise AudioError(name, f"cannot decode audio ({error})") from error
    if block.shape[0] < 2:
        raise AudioError(name, f"too short ({block.shape[0]} samples)")
    return resample(_to_mono_float(block, Path(name)), rate, sample_rate)


def set_level(waveform: torch.Tensor, level_dbfs: float | None) -> torch.Tensor:
    """``waveform`` scaled to an RMS of ``level_dbfs`` dB re full scale (silence unchanged)."""
    if level_dbfs is None:
        return waveform
    rms = waveform.float().pow(2).mean().sqrt()
    if rms <= 1e-8:
        return waveform
    return waveform * (10.0 ** (level_dbfs / 20.0) / rms)


def trim_silence(waveform: torch.Tensor, sample_rate: int, top_db: float,
                 frame_s: float = 0.025, hop_s: float = 0.010) -> torch.Tensor:
    """``(time,)`` without its leading and trailing silence.

    Silence is every frame (``frame_s`` windows every ``hop_s``) whose RMS lies more than
    ``top_db`` below the loudest frame's, so the cut is the same at any recording level.
    Why: corpora and microphones differ most in how much silence surrounds the speech
    (RAVDESS: about a second; EMO-DB's 2-s copy: padding), and per-utterance statistics
    would otherwise describe the silence. A clip with no frame above the threshold, or one
    shorter than a frame, is returned unchanged.
    """
    frame, hop = max(int(frame_s * sample_rate), 1), max(int(hop_s * sample_rate), 1)
    if waveform.dim() != 1 or waveform.shape[-1] < frame:
        return waveform
    frames = waveform.unfold(0, frame, hop)
    level = 10.0 * torch.log10(frames.pow(2).mean(-1).clamp_min(1e-20))
    loud = torch.nonzero(level >= level.max() - top_db).flatten()
    start, end = int(loud[0]) * hop, int(loud[-1]) * hop + frame
    return waveform[start:end]
