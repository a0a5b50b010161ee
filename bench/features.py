"""Feature extraction speed: ser_pipeline's log-mel against librosa's, at equal output.

Both sides compute the same thing with the same parameters (taken from the project's
feature config) on the same files in the same process, both warmed up first:

* ``decode``: soundfile, which both use (a control: the two sides should tie);
* ``resample``: ``ser_pipeline.audio.resample`` vs ``librosa.resample`` (soxr_hq);
* ``decode + resample``: ``ser_pipeline.audio.read_audio`` vs ``librosa.load(sr=...)``;
* ``log-mel``: ``LogMelFeatures`` vs ``librosa.feature.melspectrogram`` + ``power_to_db``
  on the *same* waveforms (so their largest absolute difference, in dB, shows the two do
  equal work);
* ``full``: both steps, i.e. a file to its features, as the training cache computes them;
* ``log-mel, batched``: ours on equal-length waveforms stacked into one call (exactly the
  same output; what batching the extractor would give);
* ``cache hit``: ``extract_features`` when every file is already in the feature cache.

Times are the best of ``--repeats`` passes over all files (the least disturbed pass on a
shared machine); files/s and the real-time factor (processing seconds per audio second)
follow from them. Example::

    python bench/features.py                      # 100 EMO-DB files, PyTorch's threads
    python bench/features.py --threads 1 --limit 535
    python bench/features.py --files my_corpus/ -- feature.n_mels=40
"""

from __future__ import annotations

import argparse
import glob
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/features.py`: make `bench` importable
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
    started_at,
    time_repeats,
    timing_summary,
    write_result,
)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
#: speed-up over librosa the project aims for (issue 7)
TARGET_SPEEDUP = 2.0
#: largest difference (dB) on identical input that still counts as the same output
EQUAL_OUTPUT_DB = 0.01


def find_audio_files(inputs: list[str], limit: int | None) -> list[Path]:
    """Audio files named by paths, folders (recursive) or globs; ``limit`` spread evenly."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        elif glob.has_magic(item):
            files += sorted(Path(p) for p in glob.glob(item, recursive=True))
        else:
            files.append(path)
    if limit is not None and len(files) > limit:
        # evenly spaced rather than the first ones: the first files are often one speaker
        files = [files[i * len(files) // limit] for i in range(limit)]
    return files


def librosa_params(extractor: Any) -> dict[str, Any]:
    """librosa arguments that compute exactly what ``LogMelFeatures`` computes."""
    return {
        "melspectrogram": dict(
            sr=extractor.sample_rate, n_fft=extractor.n_fft, hop_length=extractor.hop_length,
            win_length=extractor.win_length, window="hann", center=True, pad_mode="reflect",
            power=2.0, n_mels=extractor.n_mels, fmin=extractor.f_min, fmax=extractor.f_max,
            htk=False, norm="slaney"),
        # torchaudio's AmplitudeToDB: 10 log10(max(x, 1e-10)) with ref 1, floored top_db below max
        "power_to_db": dict(ref=1.0, amin=1e-10, top_db=extractor.top_db),
    }


def librosa_logmel(waveform: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """``(time,)`` float32 -> ``(n_mels, frames)`` log-mel in dB, the librosa way."""
    import librosa

    power = librosa.feature.melspectrogram(y=waveform, **params["melspectrogram"])
    return librosa.power_to_db(power, **params["power_to_db"])


def max_abs_difference(ours: list[torch.Tensor], theirs: list[np.ndarray]) -> float:
    """Largest |ours - theirs| over all files, on the frames both have.

    ``ours`` items are ``(1, n_mels, frames)``, ``theirs`` ``(n_mels, frames')``; frame
    counts differ by one at most, when two resamplers round a file's length differently.
    """
    largest = 0.0
    for a, b in zip(ours, theirs, strict=True):
        a = a[0].numpy()
        frames = min(a.shape[-1], b.shape[-1])
        largest = max(largest, float(np.abs(a[:, :frames] - b[:, :frames]).max()))
    return largest


def batched_by_length(extractor: Any, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
    """``extractor`` called once per group of equal-length waveforms ``(batch, time)``.

    No padding, so each item's output is what a call on it alone gives.
    """
    groups: dict[int, list[int]] = {}
    for index, wave in enumerate(waveforms):
        groups.setdefault(wave.shape[-1], []).append(index)
    outputs: list[torch.Tensor | None] = [None] * len(waveforms)
    for indices in groups.values():
        batch = extractor(torch.stack([waveforms[i] for i in indices]))
        for i, item in zip(indices, batch, strict=True):
            outputs[i] = item
    return outputs  # type: ignore[return-value]


def measure(files: list[Path], extractor: Any, repeats: int) -> dict[str, Any]:
    """Times (s per pass over ``files``) and output differences of every compared path."""
    import librosa
    import soundfile as sf

    from ser_pipeline.audio import audio_info, read_audio, resample
    from ser_pipeline.features.cache import FeatureCache, extract_features

    rate = extractor.sample_rate
    params = librosa_params(extractor)
    paths = [str(f) for f in files]
    audio_seconds = sum(frames / native for native, frames, _ in map(audio_info, files))

    def decode_one(path: str) -> tuple[np.ndarray, int]:
        wave, native = sf.read(path, dtype="float32", always_2d=True)
        return wave.mean(axis=1, dtype=np.float32), native

    def decode() -> list[tuple[np.ndarray, int]]:
        # both sides decode with soundfile (librosa.load reads WAV/FLAC/OGG through it too)
        return [decode_one(p) for p in paths]

    decoded = [(torch.from_numpy(wave), native) for wave, native in decode()]

    def ours_resample() -> list[torch.Tensor]:
        return [resample(wave, native, rate) for wave, native in decoded]

    def librosa_resample() -> list[np.ndarray]:
        return [librosa.resample(wave.numpy(), orig_sr=native, target_sr=rate)
                for wave, native in decoded]

    def ours_read() -> list[torch.Tensor]:
        return [read_audio(p, rate) for p in paths]

    def librosa_read() -> list[np.ndarray]:
        return [librosa.load(p, sr=rate)[0] for p in paths]

    waveforms = ours_read()
    numpy_waveforms = [w.numpy() for w in waveforms]

    def ours_features() -> list[torch.Tensor]:
        return [extractor(w) for w in waveforms]

    def librosa_features() -> list[np.ndarray]:
        return [librosa_logmel(w, params) for w in numpy_waveforms]

    def ours_full() -> list[torch.Tensor]:
        return [extractor(read_audio(p, rate)) for p in paths]

    def librosa_full() -> list[np.ndarray]:
        return [librosa_logmel(librosa.load(p, sr=rate)[0], params) for p in paths]

    def ours_batched() -> list[torch.Tensor]:
        return batched_by_length(extractor, waveforms)

    results: dict[str, Any] = {}
    for name, ours, theirs in (("decode", decode, decode),
                               ("resample", ours_resample, librosa_resample),
                               ("decode + resample", ours_read, librosa_read),
                               ("log-mel", ours_features, librosa_features),
                               ("full", ours_full, librosa_full)):
        # interleaved passes, so a burst of load from elsewhere hits both sides alike
        ours_s, theirs_s = [], []
        for _ in range(repeats):
            ours_s += time_repeats(ours, 1, warmup=0 if ours_s else 1)
            theirs_s += time_repeats(theirs, 1, warmup=0 if theirs_s else 1)
        results[name] = {"ours": timing_summary(ours_s), "librosa": timing_summary(theirs_s)}

    reference = librosa_features()
    results["log-mel"]["max_abs_diff_db"] = max_abs_difference(ours_features(), reference)
    results["full"]["max_abs_diff_db"] = max_abs_difference(ours_full(), librosa_full())
    results["full"]["note"] = (
        "the resamplers differ (librosa: soxr_hq; ours: torchaudio windowed sinc), which "
        "shows near Nyquist; the log-mel row compares identical input")
    batched = ours_batched()
    results["log-mel, batched"] = {
        "ours": timing_summary(time_repeats(ours_batched, repeats)),
        "max_abs_diff_db": max_abs_difference(batched, reference),
    }
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        cache = FeatureCache(cache_dir, extractor.config())

        def compute(path: str) -> torch.Tensor:
            return extractor(read_audio(path, rate))

        def cached() -> None:
            extract_features(paths, compute, cache, progress=False)

        cached()  # fills the cache: every timed pass below is all hits
        hits_before = cache.hits
        results["cache hit"] = {"ours": timing_summary(time_repeats(cached, repeats, warmup=0))}
        results["cache hit"]["hits_per_pass"] = (cache.hits - hits_before) / repeats
    return {"files": len(files), "audio_seconds": audio_seconds,
            "native_rates": sorted({audio_info(f)[0] for f in files}), "paths": results}


def speedups(measured: dict[str, Any]) -> dict[str, float]:
    """librosa's best time / ours, per path both sides ran."""
    return {name: r["librosa"]["best"] / r["ours"]["best"]
            for name, r in measured["paths"].items() if "librosa" in r}


def targets(measured: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's feature target: >= 2x librosa's throughput, file to features, equal output."""
    full = speedups(measured)["full"]
    difference = measured["paths"]["log-mel"]["max_abs_diff_db"]
    return [{
        "name": f"feature extraction >= {TARGET_SPEEDUP:g}x librosa's throughput "
                "(file -> log-mel) at equal output",
        "value": round(full, 2),
        "threshold": TARGET_SPEEDUP,
        "equal_output": difference <= EQUAL_OUTPUT_DB,
        "met": full >= TARGET_SPEEDUP and difference <= EQUAL_OUTPUT_DB,
    }]


def table_rows(measured: dict[str, Any]) -> list[list[str]]:
    """One row per path: files/s and real-time factor of each side, speed-up, difference."""
    files, seconds = measured["files"], measured["audio_seconds"]
    rows = []
    for name, r in measured["paths"].items():
        ours = r["ours"]["best"]
        theirs = r.get("librosa", {}).get("best")
        diff = r.get("max_abs_diff_db")
        rows.append([
            name,
            f"{files / ours:.1f}", f"{files / theirs:.1f}" if theirs else "-",
            f"{theirs / ours:.2f}x" if theirs else "-",
            f"{ours / seconds:.4f}", f"{theirs / seconds:.4f}" if theirs else "-",
            f"{diff:.2g}" if diff is not None else "-",
        ])
    return rows


TABLE_HEADERS = ["path", "files/s ours", "files/s librosa", "speed-up", "RTF ours",
                 "RTF librosa", "max |diff| dB"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/features.py",
        description="Log-mel extraction speed of ser_pipeline against librosa, same "
        "parameters, same files, same process.")
    parser.add_argument("--files", nargs="+", default=[str(EMODB_WAV)], metavar="PATH",
                        help="audio files, folders or globs (default: EMO-DB beside the checkout)")
    parser.add_argument("--limit", type=int, default=100,
                        help="use at most this many files, spread evenly (default 100)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per path; the best counts (default 3)")
    parser.add_argument("--threads", type=int,
                        help="threads for PyTorch and numpy/BLAS alike (default: their own)")
    parser.add_argument("--feature", default="logmel",
                        help="feature config (conf/feature/<name>.yaml) to take parameters "
                        "from (default logmel)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", help="result file name (default features-<threads>t)")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides of the feature config, e.g. feature.n_mels=40")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    files = find_audio_files(args.files, args.limit)
    if not files:
        print(f"no audio files in {' '.join(args.files)}; give some with --files",
              file=sys.stderr)
        return 2
    from hydra.utils import instantiate

    with tempfile.TemporaryDirectory() as scratch:
        cfg = compose_train_config([f"feature={args.feature}", *args.overrides], Path(scratch))
    extractor = instantiate(cfg.feature)
    if extractor.config().get("name") != "logmel" or extractor.deltas:
        print("only the static log-mel (feature=logmel, deltas=false) has a librosa twin",
              file=sys.stderr)
        return 2
    threads = limit_threads(args.threads)
    machine = machine_info()
    begun = started_at()
    measured = measure(files, extractor, args.repeats)
    payload = {
        "benchmark": "features",
        "command": command_line("bench/features.py", argv),
        "started_at": begun,
        "machine": machine,
        "load_average_after": machine_info()["load_average"],
        "threads": threads,
        "repeats": args.repeats,
        "feature": extractor.config(),
        "librosa": librosa_params(extractor),
        **measured,
        "speedup": speedups(measured),
        "targets": targets(measured),
    }
    name = args.name or f"features-{threads['torch']}t"
    path = write_result(payload, name, args.results_dir)
    print(f"{measured['files']} files, {measured['audio_seconds']:.1f} s of audio at "
          f"{measured['native_rates']} Hz -> {extractor.sample_rate} Hz; threads {threads}; "
          f"best of {args.repeats}")
    print(format_table(TABLE_HEADERS, table_rows(measured)))
    for target in payload["targets"]:
        print(f"target: {target['name']}: {target['value']}x -> "
              f"{'met' if target['met'] else 'MISSED'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
