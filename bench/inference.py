"""Inference speed: model load time, per-file latency and the microphone path's delay.

* **load**: ``Predictor.from_dir`` on a model directory (YAML + safetensors), in a warm
  process (imports already paid), first load and the median of ``--repeats``;
* **files**: ``infer.py``'s own per-file path (``ser_pipeline.infer_cli.predict_file``:
  decode, resample, VAD trim, features, network) for every file, after one warm-up file:
  latency per file and real-time factor (seconds of work per second of audio);
* **microphone**: offline, without a sound card. A 3-s utterance (speech cut from the
  files by the VAD and joined) followed by 1 s of silence is fed to the
  ``StreamingSegmenter`` in 30-ms chunks, the size ``Microphone`` delivers. The delay is
  the time from the arrival of the chunk in which the VAD closes the utterance to its
  prediction being ready (segmenter + resampling + prediction, as ``infer.py --mic``
  does it). The hangover the VAD waits before it may close an utterance (audio time,
  ``SegmenterConfig.hangover_ms``) is reported beside it: it is a setting, not compute.

Without ``--model`` the default model's architecture (``conf/train.yaml``) is built with
untrained weights: latency does not depend on the weights' values. Example::

    python bench/inference.py                                   # EMO-DB files, default model
    python bench/inference.py --model models:/ser-emodb-cnn_blstm_attn@champion --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/inference.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import (
    EMODB_WAV,
    RESULTS_DIR,
    command_line,
    compose_train_config,
    format_table,
    limit_threads,
    machine_info,
    percentile,
    started_at,
    write_result,
)
from bench.features import find_audio_files

#: issue 7: end of utterance to prediction, for a 3-s utterance
TARGET_MIC_DELAY_MS = 100.0
UTTERANCE_S = 3.0
TRAILING_SILENCE_S = 1.0
CHUNK_MS = 30  # Microphone's default block


def build_untrained_model(directory: Path, overrides: list[str]) -> Path:
    """A model directory for the configured architecture and features, weights untrained.

    Sizes (feature channels and bins, number of classes) come from the composed config,
    so the network is exactly as large as a trained one; statistics are 0 mean, 1 std.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ser_pipeline.artifact import save_model_dir
    from ser_pipeline.corpora.manifest import DIMENSIONS, GENDERS
    from ser_pipeline.features.batching import FeatureStats

    cfg = compose_train_config(overrides, directory / "hydra")
    extractor = instantiate(cfg.feature)
    kwargs = OmegaConf.to_container(cfg.model.net, resolve=True)
    target = kwargs.pop("_target_")
    kwargs.update(in_channels=extractor.out_channels, n_features=extractor.n_features,
                  n_emotions=len(cfg.data.classes))
    torch.manual_seed(0)
    net = instantiate({"_target_": target, **kwargs})
    channels, bins = extractor.out_channels, extractor.n_features
    stats = FeatureStats(torch.zeros(channels, bins, 1), torch.ones(channels, bins, 1))
    return save_model_dir(directory / "model", net, kwargs, {
        "features": extractor.config(), "classes": list(cfg.data.classes),
        "genders": list(GENDERS), "dimensions": list(DIMENSIONS), "has_gender": True,
        "has_dimensions": False,
        "info": {"model": str(cfg.model.name), "note": "untrained: for timing only"},
    }, stats)


def measure_load(model_dir: Path, repeats: int) -> dict[str, float]:
    """Milliseconds to load the model directory into a ready :class:`Predictor`."""
    from ser_pipeline.inference import Predictor

    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        Predictor.from_dir(model_dir)
        seconds.append(1000 * (time.perf_counter() - started))
    return summarise_ms(seconds)


def measure_files(predictor: Any, files: list[Path]) -> dict[str, Any]:
    """Latency (ms) and real-time factor per file through ``infer.py``'s file path."""
    from ser_pipeline.audio import audio_info
    from ser_pipeline.infer_cli import predict_file
    from ser_pipeline.vad import SegmenterConfig

    config = SegmenterConfig()
    list(predict_file(predictor, files[0], config, segment_above_s=10.0))  # warm-up
    latencies, factors = [], []
    for path in files:
        rate, frames, _ = audio_info(path)
        started = time.perf_counter()
        list(predict_file(predictor, path, config, segment_above_s=10.0))
        elapsed = time.perf_counter() - started
        latencies.append(1000 * elapsed)
        factors.append(elapsed / (frames / rate))
    return {"files": len(files), "latency_ms": summarise_ms(latencies),
            "rtf_median": statistics.median(factors), "rtf_worst": max(factors)}


def summarise_ms(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p90": percentile(values, 90),
            "max": max(values)}


def speech_utterance(files: list[Path], seconds: float = UTTERANCE_S) -> np.ndarray:
    """``seconds`` of continuous speech at 16 kHz ``(time,)``: the VAD's speech of ``files``,
    from each utterance's start to its last voiced frame, joined until long enough."""
    from ser_pipeline.audio import read_audio
    from ser_pipeline.vad import VAD_SAMPLE_RATE, segment_waveform

    wanted = int(seconds * VAD_SAMPLE_RATE)
    pieces, total = [], 0
    for path in files:
        wave = read_audio(path, VAD_SAMPLE_RATE).numpy()
        for utterance in segment_waveform(wave, VAD_SAMPLE_RATE):
            # up to the last voiced frame: the padding after it would be a pause at the join
            pieces.append(wave[utterance.start : utterance.speech_end])
            total += len(pieces[-1])
        if total >= wanted:
            return np.concatenate(pieces)[:wanted]
    raise ValueError(f"the files hold less than {seconds} s of speech the VAD accepts")


def measure_microphone(predictor: Any, speech: np.ndarray, runs: int) -> dict[str, Any]:
    """Delay (ms) from the chunk that closes the utterance to its prediction, over ``runs``.

    Mirrors ``infer.py --mic``: ``StreamingSegmenter.feed`` per chunk, then the
    utterance's 16-kHz audio resampled to the model's rate and predicted.
    """
    from ser_pipeline.audio import resample
    from ser_pipeline.vad import VAD_SAMPLE_RATE, SegmenterConfig, StreamingSegmenter

    stream = np.concatenate([speech, np.zeros(int(TRAILING_SILENCE_S * VAD_SAMPLE_RATE),
                                              np.float32)]).astype(np.float32)
    chunk = VAD_SAMPLE_RATE * CHUNK_MS // 1000
    predictor.predict_waveform(torch.zeros(predictor.sample_rate))  # as infer.py --mic does
    delays, other_chunks, found, durations, hangovers = [], [], [], [], []
    for _ in range(runs):
        segmenter = StreamingSegmenter(SegmenterConfig())
        utterances = 0
        for start in range(0, len(stream), chunk):
            began = time.perf_counter()
            closed = segmenter.feed(stream[start : start + chunk])
            for utterance in closed:
                audio = resample(torch.from_numpy(utterance.audio), VAD_SAMPLE_RATE,
                                 predictor.sample_rate)
                predictor.predict_waveform(audio)
            elapsed_ms = 1000 * (time.perf_counter() - began)
            if closed:
                utterances += len(closed)
                delays.append(elapsed_ms)
                durations.append((closed[-1].end - closed[-1].start) / VAD_SAMPLE_RATE)
                hangovers.append(closed[-1].end_detected_after_ms)
            else:
                other_chunks.append(elapsed_ms)
        found.append(utterances)
    if not delays:
        raise ValueError("the VAD closed no utterance in the test signal")
    return {"runs": runs, "chunk_ms": CHUNK_MS, "utterance_s": len(speech) / VAD_SAMPLE_RATE,
            "utterances_per_run": max(found), "detected_utterance_s": statistics.median(durations),
            "delay_ms": summarise_ms(delays),
            "vad_hangover_ms": statistics.median(hangovers),
            "other_chunk_ms": summarise_ms(other_chunks)}


def targets(microphone: dict[str, Any]) -> list[dict[str, Any]]:
    delay = microphone["delay_ms"]["median"]
    return [{"name": f"microphone delay < {TARGET_MIC_DELAY_MS:g} ms (end of a 3-s utterance "
                     "detected -> prediction ready, median)",
             "value": round(delay, 1), "threshold": TARGET_MIC_DELAY_MS,
             "met": delay < TARGET_MIC_DELAY_MS}]


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    load, files, micro = result["load"], result["files"], result["microphone"]
    lat, delay = files["latency_ms"], micro["delay_ms"]
    return [
        [f"model load (x{result['repeats']})", f"{load['median']:.1f}", f"{load['p90']:.1f}",
         f"{load['max']:.1f}", "-"],
        [f"file ({files['files']} files)", f"{lat['median']:.1f}", f"{lat['p90']:.1f}",
         f"{lat['max']:.1f}", f"{files['rtf_median']:.4f}"],
        [f"mic: end detected -> prediction ({micro['utterance_s']:.1f} s utterance)",
         f"{delay['median']:.1f}", f"{delay['p90']:.1f}", f"{delay['max']:.1f}", "-"],
        [f"mic: any other {CHUNK_MS}-ms chunk", f"{micro['other_chunk_ms']['median']:.2f}",
         f"{micro['other_chunk_ms']['p90']:.2f}", f"{micro['other_chunk_ms']['max']:.2f}",
         "-"],
    ]


TABLE_HEADERS = ["step", "median ms", "p90 ms", "max ms", "RTF"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/inference.py",
        description="Model load time, per-file latency and microphone delay of inference.")
    parser.add_argument("--model", metavar="URI",
                        help="model directory, runs:/... or models:/... (default: the "
                        "configured model with untrained weights)")
    parser.add_argument("--tracking-uri", help="MLflow store for --model")
    parser.add_argument("--files", nargs="+", default=[str(EMODB_WAV)], metavar="PATH",
                        help="audio files, folders or globs (default: EMO-DB beside the checkout)")
    parser.add_argument("--limit", type=int, default=50, help="at most this many files")
    parser.add_argument("--repeats", type=int, default=5, help="model loads timed")
    parser.add_argument("--mic-runs", type=int, default=20, help="microphone passes timed")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", help="result file name (default inference-<model>-<t>t)")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides for the untrained model, e.g. model=cnn_attn_multitask")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    files = find_audio_files(args.files, args.limit)
    if not files:
        print(f"no audio files in {' '.join(args.files)}; give some with --files",
              file=sys.stderr)
        return 2
    threads = limit_threads(args.threads)
    from ser_pipeline.inference import Predictor

    machine = machine_info()
    begun = started_at()
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as scratch:
        if args.model:
            from ser_pipeline.model_uri import resolve_model

            model_dir = resolve_model(args.model, args.tracking_uri)
        else:
            model_dir = build_untrained_model(Path(scratch), args.overrides)
        load = measure_load(model_dir, args.repeats)
        predictor = Predictor.from_dir(model_dir)
        spec = predictor.spec
        result = {"repeats": args.repeats, "load": load, "files": measure_files(predictor, files),
                  "microphone": measure_microphone(predictor, speech_utterance(files),
                                                   args.mic_runs)}
    model = str(spec.info.get("model") or spec.architecture)
    payload = {
        "benchmark": "inference",
        "command": command_line("bench/inference.py", argv),
        "started_at": begun,
        "machine": machine,
        "load_average_after": machine_info()["load_average"],
        "threads": threads,
        "model": model,
        "model_source": args.model or "untrained (configured architecture)",
        "features": spec.features,
        **result,
        "targets": targets(result["microphone"]),
    }
    path = write_result(payload, args.name or f"inference-{model}-{threads['torch']}t",
                        args.results_dir)
    print(f"model {model} ({payload['model_source']}); threads {threads}")
    print(format_table(TABLE_HEADERS, table_rows(result)))
    micro = result["microphone"]
    print(f"VAD hangover before an utterance may close: {micro['vad_hangover_ms']:.0f} ms of "
          f"audio (setting); utterances found per pass: {micro['utterances_per_run']}")
    for target in payload["targets"]:
        print(f"target: {target['name']}: {target['value']} ms -> "
              f"{'met' if target['met'] else 'MISSED'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
