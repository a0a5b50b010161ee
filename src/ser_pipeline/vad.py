"""Cutting speech into utterances with webrtcvad, for files and the microphone alike.

:class:`StreamingSegmenter` takes float audio at 16 kHz in chunks of any size and
returns each utterance as soon as its end is certain. It follows the classic
webrtcvad recipe:

* a *padded ring buffer* of the last ``padding_ms`` of frames: speech starts when
  ``start_ratio`` of them are voiced (one voiced click does not start an utterance),
  and the utterance begins at the oldest frame in the ring, so the soft onset the
  VAD misses is kept;
* a *hangover*: speech ends after ``hangover_ms`` of unvoiced frames (short pauses
  between words do not cut), and the utterance keeps up to ``padding_ms`` after its
  last voiced frame;
* utterances with less than ``min_speech_ms`` between their first and last voiced
  frame are dropped; speech running past ``max_utterance_s`` is cut there.

:func:`segment_waveform` runs the same class over a whole waveform. webrtcvad only
takes 16-bit PCM at 8/16/32/48 kHz in 10/20/30 ms frames, so the VAD always sees
16 kHz; callers that need another rate for the model resample the *original* audio
and slice it with the utterance's times.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import webrtcvad

from ser_pipeline.audio import resample

VAD_SAMPLE_RATE = 16000


@dataclass(frozen=True)
class SegmenterConfig:
    """How speech is cut; times in milliseconds unless named ``_s``."""

    aggressiveness: int = 2  # webrtcvad mode 0 (keeps most) .. 3 (drops most non-speech)
    frame_ms: int = 30
    padding_ms: int = 300
    hangover_ms: int = 300
    min_speech_ms: int = 250
    max_utterance_s: float = 10.0
    start_ratio: float = 0.8

    def __post_init__(self) -> None:
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"VAD aggressiveness must be 0..3, not {self.aggressiveness}")
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"webrtcvad frames are 10, 20 or 30 ms, not {self.frame_ms}")
        if self.padding_ms < self.frame_ms or self.hangover_ms < self.frame_ms:
            raise ValueError("padding_ms and hangover_ms must be at least one frame")
        if self.max_utterance_s * 1000 <= self.padding_ms:
            raise ValueError("max_utterance_s must be longer than the padding")


@dataclass(frozen=True)
class Utterance:
    """One stretch of speech; sample indices count from the first sample fed, at 16 kHz.

    ``audio`` is ``(end - start,)`` float32 at 16 kHz. ``speech_end`` is the end of
    the last voiced frame and ``detected_at`` how much audio had been fed when the
    end was decided, so ``detected_at - speech_end`` is the hangover actually waited.
    ``forced`` marks a cut made by ``max_utterance_s`` or :meth:`flush`, not by silence.
    """

    start: int
    end: int
    speech_end: int
    detected_at: int
    audio: np.ndarray
    forced: bool = False

    @property
    def start_s(self) -> float:
        return self.start / VAD_SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / VAD_SAMPLE_RATE

    @property
    def end_detected_after_ms(self) -> float:
        return 1000.0 * (self.detected_at - self.speech_end) / VAD_SAMPLE_RATE


class _SampleBuffer:
    """Samples ``[offset, offset + len)`` of a stream, kept as a list of chunks."""

    def __init__(self) -> None:
        self.offset = 0
        self._chunks: list[np.ndarray] = []
        self._length = 0

    @property
    def end(self) -> int:
        return self.offset + self._length

    def append(self, chunk: np.ndarray) -> None:
        self._chunks.append(chunk)
        self._length += len(chunk)

    def slice(self, start: int, end: int) -> np.ndarray:
        """Samples ``[start, end)``, joined from the chunks that overlap them."""
        parts, position = [], self.offset
        for chunk in self._chunks:
            lo, hi = max(start, position), min(end, position + len(chunk))
            if lo < hi:
                parts.append(chunk[lo - position : hi - position])
            position += len(chunk)
            if position >= end:
                break
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def discard_before(self, index: int) -> None:
        """Forget samples before ``index``, so memory stays bounded between utterances."""
        while self._chunks and self.offset + len(self._chunks[0]) <= index:
            removed = self._chunks.pop(0)
            self.offset += len(removed)
            self._length -= len(removed)
        if self._chunks and self.offset < index:
            cut = index - self.offset
            self._chunks[0] = self._chunks[0][cut:].copy()  # a copy frees the long block
            self.offset, self._length = index, self._length - cut


def to_pcm16(audio: np.ndarray) -> bytes:
    """Float samples in [-1, 1] -> little-endian 16-bit PCM bytes (what webrtcvad reads)."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class StreamingSegmenter:
    """Feed 16 kHz float chunks of any size; get finished :class:`Utterance` s back."""

    def __init__(self, config: SegmenterConfig | None = None) -> None:
        self.config = config or SegmenterConfig()
        self._vad = webrtcvad.Vad(self.config.aggressiveness)
        self.frame = VAD_SAMPLE_RATE * self.config.frame_ms // 1000
        self._ring: deque[tuple[int, bool]] = deque(
            maxlen=max(1, self.config.padding_ms // self.config.frame_ms))
        self._hangover_frames = max(1, self.config.hangover_ms // self.config.frame_ms)
        self._padding = VAD_SAMPLE_RATE * self.config.padding_ms // 1000
        self._max_length = int(self.config.max_utterance_s * VAD_SAMPLE_RATE)
        self._min_speech = VAD_SAMPLE_RATE * self.config.min_speech_ms // 1000
        self._audio = _SampleBuffer()
        self._next_frame = 0  # first sample of the next frame the VAD has not judged
        self._reset_utterance()

    def _reset_utterance(self) -> None:
        self._triggered = False
        self._start = self._first_voiced = self._last_voiced_end = 0
        self._silent_frames = 0

    @property
    def in_speech(self) -> bool:
        return self._triggered

    @property
    def samples_fed(self) -> int:
        return self._audio.end

    def feed(self, chunk: np.ndarray | torch.Tensor) -> list[Utterance]:
        """Add ``(time,)`` float samples at 16 kHz; return the utterances that ended in them."""
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.detach().cpu().numpy()
        self._audio.append(np.asarray(chunk, dtype=np.float32).reshape(-1))
        finished = []
        while self._next_frame + self.frame <= self._audio.end:
            start = self._next_frame
            pcm = to_pcm16(self._audio.slice(start, start + self.frame))
            self._next_frame += self.frame
            utterance = self._judge(start, self._vad.is_speech(pcm, VAD_SAMPLE_RATE))
            if utterance is not None:
                finished.append(utterance)
        self._audio.discard_before(self.retained_from)
        return finished

    @property
    def retained_from(self) -> int:
        """Earliest sample a future utterance can still contain (older audio is dropped)."""
        if self._triggered:
            return self._start
        return self._ring[0][0] if self._ring else self._next_frame

    def _judge(self, frame_start: int, voiced: bool) -> Utterance | None:
        frame_end = frame_start + self.frame
        if not self._triggered:
            self._ring.append((frame_start, voiced))
            voiced_count = sum(v for _, v in self._ring)
            if voiced_count >= self.config.start_ratio * self._ring.maxlen:
                self._triggered = True
                self._start = self._ring[0][0]
                self._first_voiced = next(s for s, v in self._ring if v)
                self._last_voiced_end = frame_end
                self._silent_frames = 0
                self._ring.clear()
            return None
        if voiced:
            self._last_voiced_end = frame_end
            self._silent_frames = 0
        else:
            self._silent_frames += 1
        if self._silent_frames >= self._hangover_frames:
            return self._finish(frame_end, forced=False)
        if frame_end + self.frame - self._start > self._max_length:  # next frame would pass it
            return self._cut_long(frame_end)
        return None

    def _finish(self, now: int, forced: bool) -> Utterance | None:
        """Close the utterance at ``now``, keeping up to ``padding_ms`` after its last voice."""
        end = min(self._last_voiced_end + self._padding, now)
        long_enough = self._last_voiced_end - self._first_voiced >= self._min_speech
        utterance = Utterance(self._start, end, self._last_voiced_end, now,
                              self._audio.slice(self._start, end), forced)
        self._reset_utterance()
        return utterance if long_enough else None

    def _cut_long(self, now: int) -> Utterance:
        """Speech still going at ``max_utterance_s``: emit it and carry on in a new one."""
        utterance = Utterance(self._start, now, self._last_voiced_end, now,
                              self._audio.slice(self._start, now), forced=True)
        self._start = self._first_voiced = self._last_voiced_end = now
        return utterance

    def flush(self) -> list[Utterance]:
        """End of input: close the utterance in progress (if long enough) and start afresh."""
        utterance = self._finish(self._audio.end, forced=True) if self._triggered else None
        self._ring.clear()
        return [utterance] if utterance is not None else []


def segment_waveform(
    wave: torch.Tensor | np.ndarray, sample_rate: int, config: SegmenterConfig | None = None
) -> list[Utterance]:
    """Utterances of a whole mono waveform ``(time,)`` at ``sample_rate`` (times at 16 kHz)."""
    wave = torch.as_tensor(wave, dtype=torch.float32)
    segmenter = StreamingSegmenter(config)
    utterances = segmenter.feed(resample(wave, sample_rate, VAD_SAMPLE_RATE))
    return utterances + segmenter.flush()
