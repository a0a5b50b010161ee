"""What every benchmark script shares: the machine it ran on, timing, tables and result files.

Each ``bench/<name>.py`` measures one thing, prints a table and writes
``bench/results/<name>-....json``; ``bench/report.py`` turns those files into the README
table. A result file always holds ``benchmark`` (its kind), ``machine`` (see
:func:`machine_info`), ``command`` (what reproduces it) and ``started_at``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
#: EMO-DB beside the checkout (see ../shared/datasets/README.md); benchmarks default to it
EMODB_WAV = REPO.parent / "shared" / "datasets" / "emodb" / "wav"

#: the input representation each seed model was published with
MODEL_FEATURES = {
    "cnn_blstm_attn": "logmel",
    "cnn_attn_multitask": "logmel",
    "dcnn_blstm_attn": "logmel_deltas",
    "blstm_local_attn": "lld",
    "svm": "lld",
    "ssl_attn": "ssl",
}


# -- the machine ---------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: OS, CPU, cores this process may use, library versions, load.

    ``load_average`` (1, 5, 15 min) is recorded because timings on a shared machine are
    only comparable when the load was comparable.
    """
    import torch

    from ser_pipeline.tracking import git_state

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": cpus,
        "memory_gb": memory_gb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg")
        else None,
        **git_state(REPO),
    }


def machine_label(machine: dict[str, Any]) -> str:
    """A short machine name for tables, e.g. ``2 CPU Intel Xeon 2.50GHz``."""
    cpu = machine.get("cpu", "?").replace("(R)", "").replace("(TM)", "").replace(" Processor", "")
    cpu = " ".join(cpu.replace("CPU @", "@").split())
    return f"{machine.get('cpus_available', '?')} CPU {cpu}"


def load_label(machine: dict[str, Any]) -> str:
    """The 1-minute load average per available CPU, e.g. ``3.7`` (above 1: contended)."""
    load, cpus = machine.get("load_average"), machine.get("cpus_available") or 1
    return "?" if not load else f"{load[0] / cpus:.1f}"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 1024**2


def current_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# -- commands and threads -------------------------------------------------------------------------

#: options that say where results go, not what is measured: left out of recorded commands
OUTPUT_OPTIONS = ("--results-dir", "--name")


def command_line(script: str, argv: Sequence[str]) -> str:
    """``python <script> <argv...>`` without output options, quoted for a shell."""
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in OUTPUT_OPTIONS:
            skip_value = True
        elif not arg.startswith(tuple(f"{option}=" for option in OUTPUT_OPTIONS)):
            kept.append(arg)
    return shlex.join(["python", script, *kept])


def limit_threads(threads: int | None) -> dict[str, int]:
    """Use ``threads`` threads in PyTorch *and* numpy/BLAS (librosa), so comparisons are fair.

    ``None`` keeps the libraries' defaults. Returns the thread counts in effect.
    """
    import torch

    if threads is not None:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        # kept alive for the whole process: the limit lasts while the object does
        limit_threads.keep = threadpool_limits(limits=threads)  # type: ignore[attr-defined]
    from threadpoolctl import threadpool_info

    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return {"torch": torch.get_num_threads(), "blas": max(blas, default=1)}


# -- timing ---------------------------------------------------------------------------------------

def time_repeats(work: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``work`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        work()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return seconds


def timing_summary(seconds: Sequence[float]) -> dict[str, float]:
    """``best`` (the least disturbed run on a shared machine), ``median``, ``worst``."""
    return {"best": min(seconds), "median": statistics.median(seconds), "worst": max(seconds)}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between order statistics."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- output ---------------------------------------------------------------------------------------

def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                 markdown: bool = False) -> str:
    """Rows under headers, columns padded to their widest cell (or a Markdown table).

    Numbers are right-aligned, text left-aligned; cells are converted with ``str``.
    """
    cells = [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} columns: {row}")
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in cells) and bool(cells)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w)
                  for v, w, num in zip(values, widths, numeric, strict=True)]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded).rstrip()

    if markdown:
        rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                              for w, num in zip(widths, numeric, strict=True)) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(row) for row in cells)])


def _is_number(text: str) -> bool:
    if text == "-":  # an empty cell does not make a numeric column textual
        return True
    try:
        float(text.replace("×", "").replace("x", "").replace("%", ""))
    except ValueError:
        return False
    return True


def mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``0.812 ± 0.034``; a one-fold result (std NaN, see ``ser_pipeline.metrics``) has no ±;
    no figure at all (mean NaN: a refit's validation UAR, ``data.val_speakers=0``) is ``-``."""
    if mean != mean:  # NaN
        return "-"
    if std != std:
        return f"{mean:.{digits}f} (one fold)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_result(payload: dict[str, Any], name: str, results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<results_dir>/<name>.json`` atomically (a reader never sees half a file)."""
    from ser_pipeline.files import atomic_write_text

    return atomic_write_text(results_dir / f"{name}.json",
                             json.dumps(payload, indent=1, default=str) + "\n")


def started_at() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def compose_train_config(overrides: Sequence[str], output_dir: Path) -> Any:
    """``train.py``'s composed config for ``overrides``, with ``paths.output_dir`` set.

    (Outside ``@hydra.main`` the ``${hydra:runtime.output_dir}`` it normally points at
    does not exist.) Raises Hydra's error for an unknown group or key, before any work.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    OmegaConf.update(cfg, "paths.output_dir", str(output_dir))
    return cfg


def split_model_feature(spec: str) -> tuple[str, str]:
    """``model`` or ``model:feature`` -> ``(model, feature)``; the model's own feature by default."""
    model, _, feature = spec.partition(":")
    if not feature:
        if model not in MODEL_FEATURES:
            raise ValueError(f"unknown model '{model}' (known: {', '.join(MODEL_FEATURES)}); "
                             "name a feature with model:feature for other models")
        feature = MODEL_FEATURES[model]
    return model, feature
