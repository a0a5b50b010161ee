"""``infer.py``: emotion predictions for audio files, folders, globs and the live microphone.

Files shorter than ``--segment-above-s`` get one prediction for their speech (the
VAD trims silence at both ends); longer recordings are streamed block by block,
cut into utterances by webrtcvad (:mod:`ser_pipeline.vad`), and every utterance is
predicted with its start and end time. ``--mic`` does the same live
(:mod:`ser_pipeline.microphone`). Decoding, down-mixing, resampling and features
are those of training, with the parameters stored in the model directory.

Exit status: 0 all good, 1 a file (or the model, or the microphone) failed,
2 bad arguments.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import soundfile as sf
import torch

from ser_pipeline import microphone as mic
from ser_pipeline.artifact import UnsafeArtifactError
from ser_pipeline.audio import (
    AudioError,
    audio_info,
    iter_audio_blocks,
    read_audio,
    read_audio_segment,
    resample,
)
from ser_pipeline.inference import EnsemblePredictor, Predictor
from ser_pipeline.model_uri import ModelNotFoundError, resolve_model
from ser_pipeline.vad import (
    VAD_SAMPLE_RATE,
    SegmenterConfig,
    StreamingSegmenter,
    Utterance,
    segment_waveform,
)

PROG = "infer.py"
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au",
                  ".w64", ".caf"}
#: Peak below which a recording counts as silent (-80 dBFS: below 16-bit dither).
SILENT_PEAK = 1e-4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Predict emotions (and gender / valence, arousal, dominance "
        "where the model has them) for audio files or live microphone speech.")
    parser.add_argument("inputs", nargs="*", metavar="PATH",
                        help="audio files, folders (searched recursively) or glob patterns")
    parser.add_argument("--mic", action="store_true", help="predict live microphone speech")
    parser.add_argument("--model", metavar="URI", action="append",
                        help="runs:/<run_id>/<path>, models:/<name>/<version>, "
                        "models:/<name>@<alias> or a model directory (default: the newest "
                        "registered model, else the newest finished run's model); given "
                        "several times, an ensemble averaging the models' probabilities")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow store for --model "
                        "(default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    parser.add_argument("--top-k", type=_positive(int), default=3, metavar="K",
                        help="how many ranked emotions to show (default 3)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per utterance instead of a table")
    parser.add_argument("--tta", type=_positive(int), default=1, metavar="N",
                        help="test-time augmentation: average over N augmented copies "
                             "(1 = off; the same views as training's model.tta_views)")
    parser.add_argument("--threads", type=_positive(int), metavar="N",
                        help="CPU threads for the model (default: PyTorch's choice); 1 is "
                        "often fastest for live speech on a busy machine")
    ensemble = parser.add_argument_group("ensembles")
    ensemble.add_argument("--save-ensemble", type=Path, metavar="DIR",
                          help="write the --model models as one ensemble model directory DIR "
                          "(then --model DIR, eval.py and MLflow's pyfunc model use it) and exit")
    ensemble.add_argument("--register", metavar="NAME",
                          help="with --save-ensemble: log DIR as the pyfunc model of a new run "
                          "in the tracking store and register it as model NAME")
    vad = parser.add_argument_group("speech detection")
    vad.add_argument("--vad-aggressiveness", type=int, choices=range(4), default=2,
                     help="webrtcvad mode: 0 keeps most audio, 3 drops most non-speech")
    vad.add_argument("--min-speech-ms", type=_positive(int), default=250, metavar="MS",
                     help="drop utterances with less speech than this (default 250)")
    vad.add_argument("--max-utterance-s", type=_positive(float), default=10.0, metavar="S",
                     help="cut speech running longer than this (default 10)")
    vad.add_argument("--segment-above-s", type=_positive(float), default=10.0, metavar="S",
                     help="files longer than this are cut into utterances (default 10); "
                     "shorter ones get one prediction")
    mic = parser.add_argument_group("microphone")
    mic.add_argument("--device", help="input device: index or part of its name")
    mic.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    mic.add_argument("--duration", type=_positive(float), metavar="S",
                     help="stop after S seconds of audio")
    mic.add_argument("--save-dir", type=Path, metavar="DIR",
                     help="keep each utterance as a WAV file here")
    return parser


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _fail(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# -- inputs ------------------------------------------------------------------------------------

def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files named by paths, folders (recursive) and globs, in order; plus one error per
    pattern or folder that names no audio. Missing plain paths are kept: reading reports them."""
    files: list[Path] = []
    errors: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
            if not found:
                errors.append(f"{item}: folder holds no audio files "
                              f"({', '.join(sorted(AUDIO_SUFFIXES))})")
            files += found
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True)
                           if Path(p).is_file())
            if not found:
                errors.append(f"{item}: no file matches this pattern")
            files += found
        else:
            files.append(path)
    return list(dict.fromkeys(files)), errors  # a file named twice is predicted once


# -- predictions -------------------------------------------------------------------------------

def _record(source: str, start_s: float, end_s: float, prediction: dict[str, Any]
            ) -> dict[str, Any]:
    return {"source": source, "start_s": round(start_s, 3), "end_s": round(end_s, 3),
            **prediction}


def predict_file(
    predictor: Predictor, path: Path, config: SegmenterConfig, segment_above_s: float
) -> Iterator[dict[str, Any]]:
    """One record per utterance of ``path``; raises AudioError (with the reason) for bad files."""
    rate, frames, _ = audio_info(path)
    if frames == 0:
        raise AudioError(path, "no audio samples (0 frames)")
    seconds = frames / rate
    if seconds * 1000 < config.min_speech_ms:
        raise AudioError(path, f"too short ({seconds:.2f} s; at least "
                         f"{config.min_speech_ms} ms of speech needed)")
    if seconds <= segment_above_s:
        yield _predict_whole(predictor, path, config)
    else:
        yield from _predict_utterances(predictor, path, config)


def _no_speech(path: Path, peak: float, config: SegmenterConfig) -> AudioError:
    if peak < SILENT_PEAK:
        return AudioError(path, "silent (no sample above -80 dBFS)")
    return AudioError(path, "no speech found (only noise or silence, or less than "
                      f"{config.min_speech_ms} ms of speech)")


def _predict_whole(predictor: Predictor, path: Path, config: SegmenterConfig) -> dict[str, Any]:
    """A short file: one prediction for the span from its first to its last speech."""
    wave = read_audio(path, predictor.sample_rate)
    utterances = segment_waveform(wave, predictor.sample_rate, config)
    if not utterances:
        raise _no_speech(path, float(wave.abs().max()), config)
    start_s, end_s = utterances[0].start_s, utterances[-1].end_s
    rate = predictor.sample_rate
    speech = wave[int(start_s * rate) : int(end_s * rate)]
    return _record(str(path), start_s, end_s, predictor.predict_utterance(speech))


def _predict_utterances(
    predictor: Predictor, path: Path, config: SegmenterConfig
) -> Iterator[dict[str, Any]]:
    """A long recording, streamed in blocks (bounded memory), one record per utterance."""
    def predict(utterance: Utterance) -> dict[str, Any]:
        if predictor.sample_rate == VAD_SAMPLE_RATE:
            audio = torch.from_numpy(utterance.audio)
        else:  # re-read at the model's rate rather than resample the VAD's copy twice
            audio = read_audio_segment(path, predictor.sample_rate, utterance.start_s,
                                       utterance.end_s)
        return _record(str(path), utterance.start_s, utterance.end_s,
                       predictor.predict_utterance(audio))

    segmenter = StreamingSegmenter(config)
    peak, found = 0.0, False
    for block in iter_audio_blocks(path, VAD_SAMPLE_RATE):
        peak = max(peak, float(block.abs().max())) if len(block) else peak
        for utterance in segmenter.feed(block):
            found = True
            yield predict(utterance)
    for utterance in segmenter.flush():
        found = True
        yield predict(utterance)
    if not found:
        raise _no_speech(path, peak, config)


# -- output ------------------------------------------------------------------------------------

class PredictionPrinter:
    """Prints records as they come: a table (header once) or one JSON object per line."""

    def __init__(self, as_json: bool, source_width: int = 24, out: TextIO | None = None) -> None:
        self.as_json, self.out = as_json, out or sys.stdout
        self.source_width = max(6, min(source_width, 48))
        self._header_done = False

    def write(self, record: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(record), file=self.out, flush=True)
            return
        if not self._header_done:
            print(self._row("source", "start", "end", "emotion", "score", "gender",
                            "val", "aro", "dom", "top-k"), file=self.out)
            self._header_done = True
        top = ", ".join(f"{c} {record['scores'][c]:.2f}" for c in record["top_k"])
        dims = [f"{record[d]:.2f}" if record[d] is not None else "-"
                for d in ("valence", "arousal", "dominance")]
        print(self._row(record["source"], f"{record['start_s']:.2f}", f"{record['end_s']:.2f}",
                        record["emotion"], f"{record['scores'][record['emotion']]:.2f}",
                        record["gender"] or "-", *dims, top), file=self.out, flush=True)

    def _row(self, source: str, start: str, end: str, emotion: str, score: str, gender: str,
             valence: str, arousal: str, dominance: str, top: str) -> str:
        if len(source) > self.source_width:  # keep the end of long paths: the file name
            source = "..." + source[-(self.source_width - 3):]
        return (f"{source:<{self.source_width}}  {start:>7} {end:>7}  {emotion:<12} {score:>5}  "
                f"{gender:<7} {valence:>5} {arousal:>5} {dominance:>5}  {top}")


# -- the two modes -----------------------------------------------------------------------------

def run_files(args: argparse.Namespace, predictor: Predictor, config: SegmenterConfig,
              files: list[Path], errors: list[str]) -> int:
    for error in errors:
        _fail(error)
    printer = PredictionPrinter(args.json, max((len(str(f)) for f in files), default=6))
    failed = bool(errors)
    for path in files:
        try:
            for record in predict_file(predictor, path, config, args.segment_above_s):
                printer.write(record)
        except AudioError as error:
            _fail(f"{error.path}: {error.reason}")
            failed = True
    return 1 if failed else 0


def run_microphone(
    args: argparse.Namespace, microphone: mic.Microphone, predictor: Predictor
) -> int:
    """Predict each utterance as it ends; Ctrl-C stops and predicts the one in progress.

    Utterances arrive at the VAD's 16 kHz and are resampled to the model's rate.
    ``latency_ms`` is the time from the end being detected to the line being printed;
    ``end_detected_after_ms`` how much audio after the last voiced frame that took.
    """
    printer = PredictionPrinter(args.json, source_width=6)
    if args.save_dir is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)
    session = time.strftime("%Y%m%d-%H%M%S")
    count = 0

    def emit(captured: mic.CapturedUtterance) -> None:
        nonlocal count
        utterance = captured.utterance
        audio = resample(torch.from_numpy(utterance.audio), VAD_SAMPLE_RATE,
                         predictor.sample_rate)
        record = _record("mic", utterance.start_s, utterance.end_s,
                         predictor.predict_utterance(audio))
        count += 1
        if args.save_dir is not None:
            wav = args.save_dir / f"mic-{session}-{count:03d}.wav"
            sf.write(wav, utterance.audio, VAD_SAMPLE_RATE, subtype="PCM_16")
            record["wav"] = str(wav)
        record["end_detected_after_ms"] = round(utterance.end_detected_after_ms, 1)
        record["latency_ms"] = round(1000 * (time.perf_counter() - captured.detected_time), 1)
        printer.write(record)

    # the first forward pass sets up kernels and buffers (slow); pay that before listening
    predictor.predict_waveform(torch.zeros(predictor.sample_rate))
    print(f"listening on {microphone.device['name']!r} ({microphone.sample_rate} Hz); "
          "Ctrl-C to stop", file=sys.stderr, flush=True)
    with microphone:
        try:
            for captured in microphone.utterances():
                emit(captured)
        except KeyboardInterrupt:
            for captured in microphone.flush():
                emit(captured)
    if microphone.overflows:
        _fail(f"warning: input overflowed {microphone.overflows} time(s): some audio was lost "
              "because the machine was too slow to keep up")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.register and not args.save_ensemble:
        parser.error("--register needs --save-ensemble DIR")
    if args.save_ensemble:
        if args.inputs or args.mic:
            parser.error("--save-ensemble writes a model and exits: give no audio or --mic")
        return save_ensemble(args)
    if args.mic and args.inputs:
        parser.error("give audio files or --mic, not both")
    if not (args.mic or args.inputs or args.list_devices):
        parser.error("give audio files, folders or globs to predict, or --mic")
    padding_ms = SegmenterConfig().padding_ms
    if args.max_utterance_s * 1000 <= padding_ms:
        parser.error(f"--max-utterance-s must be longer than the VAD padding ({padding_ms} ms)")

    microphone = None
    try:
        if args.list_devices:
            print("input devices:\n" + mic.describe_input_devices())
            return 0
        if args.mic:  # before loading the model: a bad device should fail at once
            microphone = mic.Microphone(args.device, _segmenter_config(args), args.duration)
    except mic.InputDeviceError as error:
        _fail(str(error))
        return 2 if error.bad_argument else 1
    except mic.MicrophoneError as error:
        _fail(str(error))
        return 1

    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = _load_predictor(args)
    if predictor is None:
        return 1
    if predictor.speaker_normalized:
        print("note: this model normalises features per speaker; the statistics grow with every "
              "utterance of this session, so give one speaker's audio per call (the first "
              "predictions rest on the least audio)", file=sys.stderr, flush=True)
    if microphone is not None:
        return run_microphone(args, microphone, predictor)
    files, errors = expand_inputs(args.inputs)
    return run_files(args, predictor, _segmenter_config(args), files, errors)


def _segmenter_config(args: argparse.Namespace) -> SegmenterConfig:
    return SegmenterConfig(aggressiveness=args.vad_aggressiveness,
                           min_speech_ms=args.min_speech_ms, max_utterance_s=args.max_utterance_s)


def save_ensemble(args: argparse.Namespace) -> int:
    """``--save-ensemble DIR [--register NAME]``: the ``--model`` models as one directory."""
    from ser_pipeline.artifact import save_ensemble_dir

    try:
        directories = [resolve_model(u, args.tracking_uri) for u in args.model or [None]]
        save_ensemble_dir(args.save_ensemble, directories)
        predictor = EnsemblePredictor.from_dirs([args.save_ensemble])  # it loads, or it fails
    except (ModelNotFoundError, UnsafeArtifactError, ValueError, OSError) as error:
        _fail(str(error))
        return 1
    members = len(getattr(predictor, "members", [predictor]))
    print(f"wrote {args.save_ensemble}: an ensemble of {members} model(s), classes "
          f"{', '.join(predictor.classes)}")
    if args.register:
        import mlflow

        from ser_pipeline import tracking
        from ser_pipeline.packaging import log_pyfunc_model

        uri = args.tracking_uri or tracking.resolve_tracking_uri(None, Path("mlruns"))
        mlflow.set_tracking_uri(uri)
        # a local SQLite store keeps artifacts beside it, as training's runs do
        artifact_root = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
                         if uri.startswith("sqlite:///") else None)
        experiment = tracking.get_or_create_experiment("ser-pipeline", artifact_root)
        with mlflow.start_run(experiment_id=experiment, run_name="ensemble",
                              tags={"ensemble_members": str(members)}):
            mlflow.log_param("members", json.dumps([str(u) for u in args.model or []]))
            info = log_pyfunc_model(args.save_ensemble)
        version = mlflow.register_model(info.model_uri, args.register)
        print(f"registered models:/{version.name}/{version.version} ({info.model_uri}) in {uri}")
    return 0


def _load_predictor(args: argparse.Namespace) -> Predictor | None:
    try:
        uris = args.model or [None]
        return EnsemblePredictor.from_dirs([resolve_model(u, args.tracking_uri) for u in uris],
                                           top_k=args.top_k, tta_views=args.tta)
    except (ModelNotFoundError, UnsafeArtifactError, ValueError) as error:
        _fail(str(error))
        return None
