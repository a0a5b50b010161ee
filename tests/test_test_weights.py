"""Which weights a run tests and packages: the best-validation checkpoint, or the last epoch's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e import FAST, run_script

pytestmark = pytest.mark.slow


def packaged_and_checkpointed(tmp_path: Path, weights: str) -> tuple[dict, dict, dict]:
    out = tmp_path / "run"
    done = run_script("train.py", [*FAST, "trainer.max_epochs=4", f"test_weights={weights}",
                                   "model.lr=3e-3", f"hydra.run.dir={out}",
                                   # "best" = the highest training loss: the first epoch,
                                   # so that best and last differ
                                   "callbacks.model_checkpoint.monitor=train/loss"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    packaged = load_file(out / "model" / "weights.safetensors")

    def net_of(checkpoint: Path) -> dict:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}

    checkpoints = out / "checkpoints"
    best = [p for p in checkpoints.glob("epoch*.ckpt")]
    assert len(best) == 1 and not best[0].name.startswith("epoch003")
    return packaged, net_of(checkpoints / "last.ckpt"), net_of(best[0])


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_test_weights_last_packages_the_weights_training_ended_with(tmp_path):
    packaged, last, best = packaged_and_checkpointed(tmp_path, "last")
    assert same(packaged, last) and not same(packaged, best)


def test_test_weights_best_packages_the_best_validation_checkpoint(tmp_path):
    packaged, last, best = packaged_and_checkpointed(tmp_path, "best")
    assert same(packaged, best) and not same(packaged, last)


def test_an_unknown_test_weights_value_is_refused(tmp_path):
    done = run_script("train.py", [*FAST, "test_weights=final", "logger=none",
                                   f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode != 0
    assert "test_weights must be 'best' or 'last'" in done.stderr
