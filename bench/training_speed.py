"""Training throughput on CPU: utterances/s, peak memory and time per epoch, per model.

Each model is measured in a fresh process (so peak memory is that model's alone) that
builds the real data module and ``SERModule`` from the composed config (fold 0 of the
corpus' default split) and runs the configured Lightning ``Trainer`` for ``--batches``
training batches, no validation. The first batch is a warm-up; throughput counts the
batches after it, from one batch's end to the next (data loading, forward, backward,
optimiser step). The time per epoch is the training split's size divided by that
throughput, or measured directly with ``--batches 0`` (one whole epoch).

Peak memory is the process's peak resident set (``ru_maxrss``), which includes Python,
PyTorch and the cached features of the whole corpus; ``rss_before_training_mb`` is the
resident set just before ``fit``, so the difference is what training itself adds.
Example::

    python bench/training_speed.py                          # EMO-DB, every seed model
    python bench/training_speed.py --models cnn_blstm_attn --batches 0 --threads 2
    # one GPU (peak GPU memory recorded): EMO-DB, and a synthetic corpus of IEMOCAP's size
    python bench/training_speed.py --models cnn_blstm_attn --batches 0 -- trainer=gpu
    python bench/training_speed.py --corpus synthetic --models cnn_blstm_attn --batches 0 \\
        --name training-synthetic-iemocap-size-gpu -- trainer=gpu \\
        data.reader.n_speakers=10 data.reader.utterances_per_class=138
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/training_speed.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch

from bench.common import (
    MODEL_FEATURES,
    RESULTS_DIR,
    command_line,
    compose_train_config,
    current_rss_mb,
    format_table,
    limit_threads,
    machine_info,
    peak_rss_mb,
    split_model_feature,
    started_at,
    write_result,
)

#: a worker prints its result on one line starting with this
RESULT_MARKER = "BENCH_RESULT "


class BatchTimer(pl.Callback):
    """Records when each training batch ends and how many utterances it held."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.sizes: list[int] = []
        self.frames: list[int] = []
        self.epoch_start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule,
                           outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        self.ends.append(time.perf_counter())
        self.sizes.append(len(batch["ids"]))
        self.frames.append(int(batch["features"].shape[-1]))

    def throughput(self) -> float:
        """Utterances per second over the batches after the first (the warm-up)."""
        if len(self.ends) < 2:
            raise ValueError("need at least 2 training batches (1 warm-up + 1 timed)")
        return sum(self.sizes[1:]) / (self.ends[-1] - self.ends[0])


def measure_model(overrides: list[str], batches: int) -> dict[str, Any]:
    """Train ``batches`` batches (0: one epoch) of the composed config; timing and memory."""
    from hydra.utils import instantiate

    from ser_pipeline.training import build_datamodule, build_module

    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        cfg = compose_train_config(["logger=none", "callbacks=none", "data.progress=false",
                                    *overrides], Path(scratch))
        pl.seed_everything(cfg.seed, workers=True)
        setup_started = time.perf_counter()
        datamodule = build_datamodule(cfg)
        datamodule.setup()
        setup_s = time.perf_counter() - setup_started
        module, _ = build_module(cfg, datamodule)
        timer = BatchTimer()
        trainer = instantiate(cfg.trainer, callbacks=[timer], logger=False, max_epochs=1,
                              min_epochs=1, limit_train_batches=batches or 1.0,
                              limit_val_batches=0, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False)
        rss_before = current_rss_mb()
        on_gpu = trainer.strategy.root_device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(module, datamodule=datamodule)
        device = torch.cuda.get_device_name() if on_gpu else "cpu"
        peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
    train_size = len(datamodule.datasets["train"])
    per_s = timer.throughput()
    return {
        "model": str(cfg.model.name),
        "corpus": datamodule.name,
        "batch_size": int(cfg.data.batch_size),
        "batches_timed": len(timer.ends) - 1,
        "mean_frames_per_batch": sum(timer.frames) / len(timer.frames),
        "parameters": sum(p.numel() for p in module.net.parameters()),
        "utterances_per_s": per_s,
        "train_utterances": train_size,
        "epoch_s_estimated": train_size / per_s,
        "epoch_s_measured": (timer.ends[-1] - timer.epoch_start) if not batches else None,
        "setup_s": setup_s,
        "rss_before_training_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "device": device,
        "peak_gpu_mb": peak_gpu_mb,
    }


def worker_overrides(corpus: str, root: str | None, model: str, feature: str,
                     extra: list[str]) -> list[str]:
    """The Hydra overrides a worker composes: corpus, model, its feature, then the user's."""
    overrides = [f"data={corpus}", f"model={model}", f"feature={feature}", "trainer=cpu"]
    if root:
        overrides.append(f"data.root={root}")
    return [*overrides, *extra]


def run_worker(script_args: list[str], threads: int | None) -> dict[str, Any]:
    """This script with ``--worker`` in a fresh process; its result line, parsed."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                           *script_args], capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise RuntimeError(f"worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["model"], r["feature"], f"{r['parameters'] / 1e6:.2f}",
             f"{r['utterances_per_s']:.1f}",
             f"{r['epoch_s_measured'] or r['epoch_s_estimated']:.1f}",
             f"{r['peak_rss_mb']:.0f}",
             f"{r['peak_rss_mb'] - (r['rss_before_training_mb'] or 0):.0f}"] for r in rows]


TABLE_HEADERS = ["model", "feature", "params (M)", "utt/s", "epoch s", "peak RSS MiB",
                 "training adds MiB"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/training_speed.py",
        description="Training utterances/s, peak memory and time per epoch on CPU, per model.")
    parser.add_argument("--corpus", default="emodb", help="data config (conf/data/<name>.yaml)")
    parser.add_argument("--root", help="corpus folder (data.root); default: the config's")
    parser.add_argument("--models", nargs="+", default=list(MODEL_FEATURES),
                        metavar="MODEL[:FEATURE]",
                        help="models, each with its seed feature unless given (default: all)")
    parser.add_argument("--batches", type=int, default=6,
                        help="training batches per model, the first a warm-up; 0 = one "
                        "whole epoch (default 6)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", help="result file name (default training-<corpus>-<t>t)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*",
                        help="further Hydra overrides, e.g. data.batch_size=16 (after --)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.batches == 1:
        build_parser().error("--batches must be 0 (one epoch) or at least 2")
    try:
        specs = [split_model_feature(spec) for spec in args.models]
    except ValueError as error:
        build_parser().error(str(error))
    if args.worker:  # one model, in this process: print the result for the parent
        threads = limit_threads(args.threads)
        model, feature = specs[0]
        result = measure_model(worker_overrides(args.corpus, args.root, model, feature,
                                                args.overrides), args.batches)
        print(RESULT_MARKER + json.dumps({**result, "feature": feature, "threads": threads}),
              flush=True)
        return 0

    machine = machine_info()
    begun = started_at()
    rows, failed = [], []
    for model, feature in specs:
        worker_args = ["--corpus", args.corpus, "--models", f"{model}:{feature}",
                       "--batches", str(args.batches)]
        if args.root:
            worker_args += ["--root", args.root]
        if args.threads is not None:
            worker_args += ["--threads", str(args.threads)]
        print(f"measuring {model} ({feature}) ...", flush=True)
        try:
            rows.append(run_worker([*worker_args, "--", *args.overrides], args.threads))
        except RuntimeError as error:
            print(f"{model}: {error}", file=sys.stderr)
            failed.append(model)
    if not rows:
        return 1
    payload = {
        "benchmark": "training_speed",
        "command": command_line("bench/training_speed.py", argv),
        "started_at": begun,
        "machine": machine,
        "load_average_after": machine_info()["load_average"],
        "corpus": args.corpus,
        "batches": args.batches,
        "rows": rows,
    }
    threads = rows[0]["threads"]["torch"]
    path = write_result(payload, args.name or f"training-{args.corpus}-{threads}t",
                        args.results_dir)
    print(f"{args.corpus}, fold 0 training split ({rows[0]['train_utterances']} utterances), "
          f"{threads} thread(s), batch size {rows[0]['batch_size']}")
    print(format_table(TABLE_HEADERS, table_rows(rows)))
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
