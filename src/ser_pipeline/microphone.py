"""Live microphone capture cut into utterances, for ``infer.py --mic``.

PortAudio (through sounddevice) calls :meth:`Microphone._on_audio` from its own
thread; that callback only copies the block into a queue, so capture never waits
for the model. The caller's thread drains the queue, runs the
:class:`~ser_pipeline.vad.StreamingSegmenter` and gets each utterance as soon as
its end is detected. Input overflows (audio PortAudio had to drop because we were
late) are counted, not fatal.

sounddevice is imported lazily: importing it needs the PortAudio shared library,
and every other part of ser_pipeline must work without it.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ser_pipeline.audio import resample
from ser_pipeline.vad import VAD_SAMPLE_RATE, SegmenterConfig, StreamingSegmenter, Utterance


class MicrophoneError(RuntimeError):
    """The microphone cannot be used; the message says why and what to do."""


class PortAudioMissingError(MicrophoneError):
    pass


class InputDeviceError(MicrophoneError):
    """No input device, or ``--device`` names none; the message lists the devices."""

    def __init__(self, message: str, bad_argument: bool) -> None:
        super().__init__(message)
        self.bad_argument = bad_argument


def import_sounddevice() -> Any:
    """The sounddevice module, or :class:`PortAudioMissingError` naming the package to install."""
    try:
        import sounddevice
    except OSError as error:  # sounddevice raises OSError when libportaudio is not found
        raise PortAudioMissingError(
            f"cannot use the microphone: {error}. Install the PortAudio library, e.g. "
            "`sudo apt-get install libportaudio2` (Debian/Ubuntu), "
            "`sudo dnf install portaudio` (Fedora) or `brew install portaudio` (macOS)."
        ) from error
    return sounddevice


def input_devices() -> list[dict[str, Any]]:
    """PortAudio's devices that can record: dicts with ``index``, ``name``, rate, channels."""
    sd = import_sounddevice()
    return [dict(device) for device in sd.query_devices() if device["max_input_channels"] > 0]


def describe_input_devices() -> str:
    """One line per input device (``index: name (channels, default rate)``), for messages."""
    devices = input_devices()
    if not devices:
        return "  (none: PortAudio sees no device that can record)"
    return "\n".join(
        f"  {d['index']}: {d['name']} ({d['max_input_channels']} ch, "
        f"{d['default_samplerate']:.0f} Hz)" for d in devices)


def find_input_device(device: str | int | None) -> dict[str, Any]:
    """The device ``--device`` names (index or part of a name), or the default input."""
    sd = import_sounddevice()
    if isinstance(device, str) and device.strip().isdigit():
        device = int(device)
    if not input_devices():
        raise InputDeviceError(
            "no audio input device found: connect a microphone, or check that your user may "
            "record (e.g. is in the 'audio' group) and that PulseAudio/PipeWire is running.",
            bad_argument=False)
    try:
        return dict(sd.query_devices(device, "input"))
    except (ValueError, sd.PortAudioError) as error:
        what = "no default input device" if device is None else f"--device {device!r}: {error}"
        raise InputDeviceError(f"{what}. Input devices:\n{describe_input_devices()}",
                               bad_argument=device is not None) from error


@dataclass(frozen=True)
class CapturedUtterance:
    """An utterance from the microphone and when (``time.perf_counter()``) its end was found."""

    utterance: Utterance
    detected_time: float


class Microphone:
    """An open input stream whose audio is cut into utterances (use as a context manager).

    Captures 16-bit mono at 16 kHz where the device allows it, else at the device's
    own rate (and/or in stereo), resampled to 16 kHz and averaged to mono here. 16-bit
    integers are what microphones deliver, so ALSA passes them through unconverted,
    and they become floats exactly as libsndfile decodes 16-bit files (``/ 32768``).
    (Asking ALSA's plug layer for float32 instead loses samples on some plugins.)

    ``duration_s`` stops after that much captured audio (counted in samples, so a
    virtual device that delivers faster than real time stops at the same point of
    its recording).
    """

    def __init__(self, device: str | int | None = None, config: SegmenterConfig | None = None,
                 duration_s: float | None = None, block_ms: int = 30) -> None:
        self.sd = import_sounddevice()
        self.device = find_input_device(device)
        self.segmenter = StreamingSegmenter(config)
        self.sample_rate, self.channels = self._choose_format()
        self.block = max(1, self.sample_rate * block_ms // 1000)
        self.max_samples = None if duration_s is None else int(duration_s * self.sample_rate)
        self.captured = 0  # samples the callback has queued
        self.overflows = 0
        self._queue: queue.Queue[np.ndarray] = queue.Queue()
        self._stream: Any = None

    def _choose_format(self) -> tuple[int, int]:
        index = self.device["index"]
        for rate in (VAD_SAMPLE_RATE, int(self.device["default_samplerate"])):
            for channels in (1, min(2, self.device["max_input_channels"])):
                try:
                    self.sd.check_input_settings(index, channels=channels, dtype="int16",
                                                 samplerate=rate)
                    return rate, channels
                except self.sd.PortAudioError:
                    continue
        raise InputDeviceError(
            f"input device {self.device['name']!r} accepts neither 16 kHz nor its default rate "
            f"in mono or stereo 16-bit. Input devices:\n{describe_input_devices()}",
            bad_argument=True)

    def _on_audio(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio's thread: copy the block to the queue and nothing else (no blocking)."""
        if status.input_overflow:
            self.overflows += 1
        # averaging channels is the down-mix training uses (ser_pipeline.audio)
        self._queue.put(indata.mean(axis=1, dtype=np.float32) / 32768.0)
        self.captured += frames
        if self.max_samples is not None and self.captured >= self.max_samples:
            raise self.sd.CallbackStop

    def __enter__(self) -> Microphone:
        self._stream = self.sd.InputStream(
            device=self.device["index"], samplerate=self.sample_rate, channels=self.channels,
            dtype="int16", blocksize=self.block, latency="low", callback=self._on_audio)
        self._stream.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()

    def _to_vad_rate(self, audio: np.ndarray) -> np.ndarray:
        if self.sample_rate == VAD_SAMPLE_RATE:
            return audio
        return resample(torch.from_numpy(audio), self.sample_rate, VAD_SAMPLE_RATE).numpy()

    def _segment(self, blocks: list[np.ndarray]) -> Iterator[CapturedUtterance]:
        for utterance in self.segmenter.feed(self._to_vad_rate(np.concatenate(blocks))):
            yield CapturedUtterance(utterance, time.perf_counter())

    def _drain(self) -> list[np.ndarray]:
        blocks = []
        while True:
            try:
                blocks.append(self._queue.get_nowait())
            except queue.Empty:
                return blocks

    def utterances(self) -> Iterator[CapturedUtterance]:
        """Utterances as they end, until ``duration_s`` or the stream stops.

        Stop early with Ctrl-C (KeyboardInterrupt) and then call :meth:`flush`.
        """
        while True:
            try:
                # a short timeout so a stream that stopped (duration reached) ends the loop
                blocks = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                if not self._stream.active:
                    break
                continue
            yield from self._segment(blocks + self._drain())
        yield from self.flush()

    def flush(self) -> Iterator[CapturedUtterance]:
        """Stop capturing and return what is left: queued audio and the utterance in progress."""
        self._stream.stop()
        blocks = self._drain()
        if blocks:
            yield from self._segment(blocks)
        for utterance in self.segmenter.flush():
            yield CapturedUtterance(utterance, time.perf_counter())
