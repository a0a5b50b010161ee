"""infer.py --mic, captured for real through PortAudio from a virtual ALSA microphone.

No sound hardware is needed: a temporary ``$HOME/.asoundrc`` defines ``virtmic``, an
ALSA ``file`` PCM whose ``infile`` is a known 16 kHz recording (speech-like audio at
known times). PortAudio reads it like any capture device, only faster than real
time, so ``--duration`` (counted in captured samples) ends each test. The tests that
need PortAudio skip, saying why, where its library cannot be loaded.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_pipeline import microphone
from ser_pipeline.infer_cli import main
from ser_pipeline.vad import SegmenterConfig
from tests.test_vad import recording

REPO = Path(__file__).resolve().parents[1]
#: (start, end) seconds of the speech in the virtual microphone's recording
SPOKEN = [(1.0, 4.0), (5.5, 7.5)]
MIC_RECORDING = (("silence", 1.0), ("speech", 3.0), ("silence", 1.5), ("speech", 2.0),
                 ("silence", 1.5))
ASOUNDRC = """
pcm.virtmic_file {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
pcm.virtmic {{
    type plug
    slave {{ pcm "virtmic_file"; format S16_LE; rate 16000; channels 1 }}
}}
"""


def sounddevice_or_skip():
    try:
        import sounddevice
    except OSError as error:
        pytest.skip(f"PortAudio cannot be loaded here ({error}); apt-get install libportaudio2")
    return sounddevice


def make_home(folder: Path, wave: np.ndarray | None) -> Path:
    """A HOME whose .asoundrc plays ``wave`` (16 kHz) as ``virtmic``; no device if None."""
    folder.mkdir(parents=True, exist_ok=True)
    if wave is None:
        (folder / ".asoundrc").write_text("\n")
        return folder
    # ALSA keeps delivering the last period once the file ends: end on plenty of silence
    padded = np.concatenate([wave, np.zeros(16000 * 3, np.float32)])
    infile = folder / "microphone.raw"
    (np.clip(padded, -1, 1) * 32767).astype("<i2").tofile(infile)
    (folder / ".asoundrc").write_text(ASOUNDRC.format(infile=infile))
    return folder


@pytest.fixture
def alsa_home(tmp_path):
    """Point ALSA at a temporary HOME in this process; returns a function (wave) -> HOME.

    PortAudio is restarted so that ALSA reads the new ``.asoundrc`` (and again after).
    """
    sd = sounddevice_or_skip()
    original = os.environ.get("HOME")

    def use(wave: np.ndarray | None) -> Path:
        home = make_home(tmp_path / "home", wave)
        os.environ["HOME"] = str(home)
        sd._terminate()
        sd._initialize()
        return home

    yield use
    if original is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = original
    sd._terminate()
    sd._initialize()


@pytest.mark.slow  # a fresh interpreter imports torch, Lightning and the model: ~10-30 s
def test_utterances_are_cut_near_the_spoken_boundaries_and_each_is_predicted(
        tiny_model_dir, tmp_path):
    """The whole CLI, as a user runs it: a subprocess reading the virtual microphone."""
    sounddevice_or_skip()
    home = make_home(tmp_path / "home", recording(*MIC_RECORDING))
    saved = tmp_path / "saved"
    result = subprocess.run(
        [sys.executable, str(REPO / "infer.py"), "--mic", "--device", "virtmic",
         "--duration", "9", "--json", "--model", str(tiny_model_dir), "--save-dir", str(saved)],
        env={**os.environ, "HOME": str(home)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(SPOKEN)
    for record, (start, end) in zip(records, SPOKEN, strict=True):
        assert record["source"] == "mic"
        assert record["start_s"] == pytest.approx(start, abs=0.15)
        assert end <= record["end_s"] <= end + 0.45
        assert record["emotion"] in record["scores"]
        assert record["end_detected_after_ms"] == pytest.approx(300, abs=31)
        assert record["latency_ms"] >= 0
        kept = sf.info(record["wav"])
        assert kept.duration == pytest.approx(record["end_s"] - record["start_s"], abs=1e-3)


def test_microphone_yields_utterances_as_they_end(alsa_home):
    alsa_home(recording(*MIC_RECORDING))
    with microphone.Microphone("virtmic", duration_s=9.0) as mic:
        captured = list(mic.utterances())
    assert [c.utterance.start_s for c in captured] == pytest.approx(
        [start for start, _ in SPOKEN], abs=0.15)
    assert all(c.utterance.end_s >= end for c, (_, end) in zip(captured, SPOKEN, strict=True))
    assert not any(c.utterance.forced for c in captured)
    assert mic.overflows == 0


def test_capture_stops_after_duration_and_flushes_the_utterance_in_progress(alsa_home):
    alsa_home(recording(*MIC_RECORDING))
    with microphone.Microphone("virtmic", duration_s=6.5) as mic:
        captured = list(mic.utterances())
    assert len(captured) == 2
    assert captured[1].utterance.forced  # cut by the end of capture, not by silence
    assert captured[1].utterance.end_s <= 6.5 + 0.03


def test_max_utterance_forces_a_cut_in_long_speech(alsa_home):
    alsa_home(recording(*MIC_RECORDING))
    config = SegmenterConfig(max_utterance_s=1.5)
    with microphone.Microphone("virtmic", config, duration_s=9.0) as mic:
        lengths = [c.utterance.end_s - c.utterance.start_s for c in mic.utterances()]
    assert len(lengths) >= 4 and max(lengths) <= 1.5


class InterruptAfterFirstLine(io.StringIO):
    """stdout that sends this process a real SIGINT (Ctrl-C) once the first line is out."""

    def write(self, text: str) -> int:
        written = super().write(text)
        if text.endswith("\n") and self.getvalue().count("\n") == 1:
            signal.raise_signal(signal.SIGINT)
        return written


def test_ctrl_c_ends_cleanly_and_predicts_the_utterance_in_progress(
        alsa_home, tiny_model_dir, monkeypatch):
    alsa_home(recording(*MIC_RECORDING))
    out = InterruptAfterFirstLine()
    monkeypatch.setattr(sys, "stdout", out)
    status = main(["--mic", "--device", "virtmic", "--json", "--duration", "6.5",
                   "--model", str(tiny_model_dir)])
    assert status == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["start_s"] for r in records] == pytest.approx([s for s, _ in SPOKEN], abs=0.15)


def test_list_devices_names_the_input_devices(alsa_home, capsys):
    alsa_home(recording(("silence", 1.0)))
    assert main(["--list-devices"]) == 0
    assert "virtmic" in capsys.readouterr().out


def test_bad_device_lists_the_devices_and_exits_2(alsa_home, tiny_model_dir, capsys):
    alsa_home(recording(("silence", 1.0)))
    status = main(["--mic", "--device", "no-such-microphone", "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert status == 2
    assert "no-such-microphone" in err and "virtmic" in err


def test_no_input_device_is_one_clear_error(alsa_home, tiny_model_dir, capsys):
    if Path("/dev/snd").exists():
        pytest.skip("this machine has sound hardware, so it has input devices")
    alsa_home(None)
    assert main(["--mic", "--model", str(tiny_model_dir)]) == 1
    assert "no audio input device found" in capsys.readouterr().err


def without_portaudio(monkeypatch) -> None:
    """Make importing sounddevice fail as it does where libportaudio is not installed."""
    import ctypes.util

    find_library = ctypes.util.find_library
    monkeypatch.setattr(ctypes.util, "find_library",
                        lambda name: None if "portaudio" in name else find_library(name))
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)


def test_missing_portaudio_names_the_package_to_install(monkeypatch):
    without_portaudio(monkeypatch)
    with pytest.raises(microphone.PortAudioMissingError, match="apt-get install libportaudio2"):
        microphone.import_sounddevice()


def test_cli_without_portaudio_exits_1_with_that_message(monkeypatch, tiny_model_dir, capsys):
    without_portaudio(monkeypatch)
    assert main(["--mic", "--model", str(tiny_model_dir)]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "libportaudio2" in line


def test_input_overflows_are_counted_and_capture_goes_on(alsa_home):
    """PortAudio flags a lost block with input_overflow; the callback counts it and keeps
    queueing audio (driven here with sounddevice's own CallbackFlags)."""
    alsa_home(recording(*MIC_RECORDING))
    mic = microphone.Microphone("virtmic", duration_s=9.0)
    flags = mic.sd.CallbackFlags()
    flags.input_overflow = True
    block = np.zeros((mic.block, mic.channels), dtype=np.int16)
    mic._on_audio(block, mic.block, None, flags)
    mic._on_audio(block, mic.block, None, mic.sd.CallbackFlags())
    assert mic.overflows == 1
    assert mic.captured == 2 * mic.block and mic._queue.qsize() == 2
