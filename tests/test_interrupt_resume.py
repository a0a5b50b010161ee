"""Interrupted runs keep their checkpoints and logs; resumed and repeated runs are exact."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from ser_pipeline.callbacks import (
    StopOnSignal,
    TerminationRequested,
    release_held_signals,
    signals_held,
)
from tests.e2e import FAST, REPO, project_env, run_script, store_uri

pytestmark = pytest.mark.slow

QUICK = [*FAST, "logger.mlflow.log_model=false", "callbacks.early_stopping.patience=100"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_is_held_until_a_safe_point_and_a_second_one_stops_at_once(sig):
    """The first signal must not raise where it lands (e.g. inside an MLflow/SQLite write)."""
    before = signal.getsignal(sig)
    with StopOnSignal() as stop:
        signal.raise_signal(sig)  # handled before raise_signal returns
        written = True  # still running: nothing was raised mid-step
        with pytest.raises(TerminationRequested):
            stop.check()  # ...until the next safe point asks
        with pytest.raises(TerminationRequested):
            signal.raise_signal(sig)  # a second signal: stop now
    assert written
    assert signal.getsignal(sig) is before  # handlers restored


def test_no_signal_means_no_stop():
    with StopOnSignal() as stop:
        stop.check()
        stop.on_train_batch_start(None, None, None, 0)
    assert stop.received is None


def test_nested_use_keeps_a_received_signal_and_restores_the_handlers():
    """A worker holds one StopOnSignal for its life and hands it to each fold's ``train``."""
    before = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal()
    with stop:
        with stop:
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == stop._handle  # the outer level still holds
        with pytest.raises(TerminationRequested):
            stop.check()  # ...and remembers what the inner level received
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_requested_by_another_process_stops_at_the_next_check():
    requested = multiprocessing.get_context("spawn").Event()
    with StopOnSignal(requested=requested) as stop:
        stop.check()
        requested.set()
        with pytest.raises(TerminationRequested, match="stop requested"):
            stop.on_train_batch_start(None, None, None, 0)


def _report_signals_after_start_up(report: Any, signalled: Any) -> None:
    """A spawned child that, like a cross-validation worker, installs its handler late."""
    report.put("started")
    signalled.wait(120)  # the signal came while this process had no handler (still importing)
    with StopOnSignal() as stop:
        release_held_signals()
        report.put(stop.received)


def test_a_signal_sent_to_a_starting_worker_is_held_not_fatal():
    context = multiprocessing.get_context("spawn")
    report, signalled = context.Queue(), context.Event()
    with signals_held():
        child = context.Process(target=_report_signals_after_start_up, args=(report, signalled))
        child.start()
    assert report.get(timeout=120) == "started"
    os.kill(child.pid, signal.SIGTERM)  # before it has a handler: the default would kill it
    signalled.set()
    assert report.get(timeout=120) == signal.SIGTERM
    child.join(timeout=120)
    assert child.exitcode == 0


def runs_of(root: Path):
    client = MlflowClient(tracking_uri=store_uri(root))
    experiment = client.get_experiment_by_name("ser-pipeline")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def train_ok(root: Path, *overrides: str):
    result = run_script("train.py", [*QUICK, *overrides], root)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs_of(root)[-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-epoch run with seed 0."""
    root = tmp_path_factory.mktemp("reference")
    return train_ok(root, "trainer.max_epochs=4", "seed=0")


def interrupt_after_first_checkpoint(root: Path, sig: signal.Signals) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *QUICK, "trainer.max_epochs=400", "seed=0"],
        cwd=root, env=project_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 300
    try:
        while not list(root.glob("outputs/**/checkpoints/last.ckpt")):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)  # polling for the checkpoint file
        process.send_signal(sig)
        # kept for the assertion messages: a run left RUNNING must come with its console
        process.console = "".join(process.communicate(timeout=120))[-6000:]
    except BaseException:
        # never leave a 400-epoch training behind: it would load the machine for the next test
        process.kill()
        process.communicate()
        raise
    return process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_marks_run_killed_and_keeps_checkpoints(tmp_path, sig):
    process = interrupt_after_first_checkpoint(tmp_path, sig)
    assert process.returncode != 0
    [run] = runs_of(tmp_path)
    assert run.info.status == "KILLED", f"exit {process.returncode}:\n{process.console}"
    assert "val/uar" in run.data.metrics  # what was logged before the signal is kept
    checkpoints = {p.name for p in tmp_path.glob("outputs/**/checkpoints/*.ckpt")}
    assert "last.ckpt" in checkpoints and "interrupted.ckpt" in checkpoints


def test_resume_after_sigterm_matches_the_uninterrupted_run(tmp_path, reference):
    interrupt_after_first_checkpoint(tmp_path, signal.SIGTERM)
    [killed] = runs_of(tmp_path)
    last = next(tmp_path.glob("outputs/**/checkpoints/last.ckpt"))
    resumed = train_ok(tmp_path, "trainer.max_epochs=4", "seed=0", f"ckpt_path={last}")
    assert resumed.info.run_id != killed.info.run_id
    assert resumed.data.tags["resumed_from_run"] == killed.info.run_id
    for metric in ("test/uar", "test/loss", "test/wa"):
        assert resumed.data.metrics[metric] == reference.data.metrics[metric], metric


def test_same_seed_gives_identical_metrics_and_another_seed_differs(tmp_path, reference):
    again = train_ok(tmp_path, "trainer.max_epochs=4", "seed=0")
    other = train_ok(tmp_path, "trainer.max_epochs=4", "seed=1")
    for metric in ("test/loss", "test/uar", "val/loss", "train/loss"):
        assert again.data.metrics[metric] == reference.data.metrics[metric], metric
    assert other.data.metrics["test/loss"] != reference.data.metrics["test/loss"]
