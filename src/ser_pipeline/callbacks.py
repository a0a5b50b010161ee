"""Lightning callbacks the pipeline adds to every run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


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

