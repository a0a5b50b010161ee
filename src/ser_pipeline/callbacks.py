"""Lightning callbacks the pipeline adds to every run."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


def report_native_crashes() -> None:
    """On a native crash (SIGSEGV, SIGBUS, SIGFPE, SIGABRT) print every thread's Python stack.

    Called before each training run, because Lightning switches it off: at the end of every
    ``fit`` / ``test`` its signal connector restores, for every signal, the handler Python's
    signal table lists, which for these is the default - faulthandler installs its handler
    natively, outside that table, so the restore removes it while ``faulthandler.is_enabled()``
    still says True. Re-enabling (disable, then enable) installs it again.
    """
    faulthandler.disable()
    # sys.stderr without a file descriptor (a test's captured stream): the process's own
    for stream in (sys.stderr, sys.__stderr__):
        try:
            faulthandler.enable(stream, all_threads=True)
            return
        except (AttributeError, ValueError, OSError, RuntimeError):  # no usable fileno()
            continue


class ReseedEachEpoch(pl.Callback):
    """Seed torch's global RNG from (seed, epoch) at every epoch start.

    Why: Lightning checkpoints do not carry the RNG state, so without this a run
    resumed from a checkpoint would draw different dropout masks than the
    uninterrupted run; with it, both see the same randomness epoch by epoch.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(self.seed * 1_000_003 + trainer.current_epoch)


class CheckpointOnInterrupt(pl.Callback):
    """Write ``interrupted.ckpt`` when training stops on Ctrl-C, SIGTERM or an error."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if trainer.state.fn != "fit":
            return
        path = self.dirpath / "interrupted.ckpt"
        try:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(path)
            log.warning("training stopped (%s); checkpoint kept at %s",
                        type(exception).__name__, path)
        except OSError as error:  # e.g. disk full: say so, keep the original error
            log.error("could not write %s: %s", path, error)


class TerminationRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM, as the interrupt Lightning already shuts down cleanly on."""


class StopOnSignal(pl.Callback):
    """Stop on SIGINT / SIGTERM at the next batch boundary, not wherever the signal lands.

    Why not Python's default (raise where the signal lands): the exception can fire inside an
    MLflow write to the SQLite store (metrics are logged every epoch) and leave its session
    half-done, the run stuck RUNNING. Used as a context manager around training, the first
    signal only records itself; the next batch start (train, validation or test) raises
    :class:`TerminationRequested`, which Lightning handles like Ctrl-C (``on_exception``
    writes ``interrupted.ckpt``, loggers are finalised), and outside Lightning :meth:`check`
    raises it between steps. A second signal raises at once, for a stuck step.

    ``requested`` (anything with ``is_set()``, e.g. a ``multiprocessing.Event``) is a stop
    asked for by another process: a cross-validation worker is told to stop through it (a
    signal after it is still only recorded: Ctrl-C reaches the parent and its workers at
    once, and the parent's request must not turn the workers' copy into an immediate
    raise). The context manager nests (a worker holds one
    for its whole life and hands it to every fold's ``train``): each level installs the
    handlers and restores what it found, and what was received stays received.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, requested: Any | None = None) -> None:
        self.received: int | None = None
        self.requested = requested
        self._previous: list[dict[int, object]] = []

    def __enter__(self) -> StopOnSignal:
        handlers = {}
        if threading.current_thread() is threading.main_thread():  # handlers: main thread only
            handlers = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        self._previous.append(handlers)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for sig, handler in self._previous.pop().items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _stop_requested(self) -> bool:
        return self.requested is not None and self.requested.is_set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise TerminationRequested(f"{name} received twice")
        self.received = signum
        log.warning("%s received: stopping at the next batch boundary (send it again to stop "
                    "at once)", name)

    def check(self) -> None:
        """Raise :class:`TerminationRequested` if a signal came in or a stop was requested."""
        if self.received is not None:
            raise TerminationRequested(f"{signal.Signals(self.received).name} received")
        if self._stop_requested():
            raise TerminationRequested("stop requested by the parent process")

    def check_together(self, trainer: pl.Trainer | None) -> None:
        """:meth:`check`, agreed by every DDP rank: all stop at the same point if any must.

        Why: a rank that stops alone leaves the others waiting in their next collective
        (gradient all-reduce, metric sync) until they time out, and the run ends FAILED; a
        stop agreed at a boundary every rank reaches ends all of them as an interrupt, which
        the launching rank records as KILLED. In one process it is :meth:`check`.
        """
        if _ranks(trainer) == 1:
            self.check()
            return
        here = self.received is not None or self._stop_requested()
        if trainer.strategy.reduce_boolean_decision(here, all=False):
            raise TerminationRequested("stop agreed by the DDP ranks (a signal or a stop "
                                       "request reached one of them)")

    def _take_sigterm(self, trainer: pl.Trainer) -> None:
        # Lightning installs its own SIGTERM handler when fit / test starts; under DDP it calls
        # a broadcast from inside the handler, which can pair with another collective and hang
        # the ranks. With several ranks this one records the signal only; the ranks agree at
        # check_together. Lightning restores what it found (this handler) at teardown.
        if (_ranks(trainer) > 1 and self._previous
                and threading.current_thread() is threading.main_thread()):
            signal.signal(signal.SIGTERM, self._handle)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_sigterm(trainer)
        report_native_crashes()  # the previous stage's teardown removed it

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_sigterm(trainer)
        report_native_crashes()

    def on_train_batch_start(self, trainer: pl.Trainer | None, *args: object,
                             **kwargs: object) -> None:
        self.check_together(trainer)  # every rank runs the same number of training batches

    # evaluation shards differ by up to one batch between ranks: under DDP the check waits
    # for the epoch's end, which every rank reaches
    def on_validation_batch_start(self, trainer: pl.Trainer | None, *args: object,
                                  **kwargs: object) -> None:
        if _ranks(trainer) == 1:
            self.check()

    def on_test_batch_start(self, trainer: pl.Trainer | None, *args: object,
                            **kwargs: object) -> None:
        if _ranks(trainer) == 1:
            self.check()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _ranks(trainer) > 1:
            self.check_together(trainer)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _ranks(trainer) > 1:
            self.check_together(trainer)


def _ranks(trainer: pl.Trainer | None) -> int:
    return trainer.world_size if trainer is not None else 1


def end_with_launcher(trainer: pl.Trainer) -> None:
    """In a DDP rank that Lightning's launcher started (ranks 1.. of a node): exit as soon as
    the launching process is gone.

    Why: a launching rank killed outright (out of memory, SIGKILL) cannot stop its copies, and
    a copy waiting to join the process group, or in a collective, would wait out torch's 30 min
    timeout. Ranks started by SLURM or torchrun are ended by those.
    """
    from lightning_fabric.plugins.environments import LightningEnvironment

    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.local_rank == 0 or not isinstance(environment, LightningEnvironment):
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)  # the parent's pid changes when it dies: nothing to wait on
        log.error("the launching process %d is gone: rank %d ends", launcher,
                  trainer.global_rank)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-launcher", daemon=True).start()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT / SIGTERM pending (never lost) here and in every process started meanwhile.

    Why: a spawned worker inherits the blocked signal mask, so a signal sent to it while it
    is still importing or unpickling its arguments waits until it has installed its own
    handler (:func:`release_held_signals`) instead of killing it by the default action with
    its MLflow run unfinished. Pending signals of this process are delivered on exit.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopOnSignal.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def release_held_signals() -> None:
    """Deliver SIGINT / SIGTERM held since :func:`signals_held` (call with a handler in place)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, StopOnSignal.SIGNALS)
