"""Refit (``data.val_speakers=0``): every non-test speaker trains for a fixed epoch budget and
the last weights are tested; nothing validates, so nothing may pretend to choose on validation."""

from __future__ import annotations

import csv
import json

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from ser_pipeline.splits import is_refit, make_split
from tests.e2e import FAST, run_script, store_uri
from tests.test_splits import manifest, speakers


@pytest.mark.parametrize("protocol", ["loso", "ltso", "group_kfold"])
def test_no_validation_speakers_puts_every_non_test_speaker_in_training(protocol):
    frame = manifest()
    split = make_split(frame, protocol, fold=1, n_folds=5, val_speakers=0)
    assert split.val == [] and split.val_speakers == []
    test = speakers(frame, split.test)
    assert speakers(frame, split.train) == set(frame["speaker"]) - test
    assert len(split.train) + len(split.test) == len(frame)


def test_only_a_speaker_protocol_without_validation_speakers_is_a_refit():
    assert all(is_refit(protocol, 0) for protocol in ("loso", "ltso", "group_kfold"))
    assert not is_refit("loso", 1)
    # random and predefined splits validate on val_fraction / the manifest, whatever val_speakers
    assert not is_refit("random", 0) and not is_refit("predefined", 0)


def test_a_negative_number_of_validation_speakers_is_refused():
    with pytest.raises(ValueError, match="val_speakers must be 0 or more"):
        make_split(manifest(), "loso", fold=0, val_speakers=-1)


REFIT = [*FAST, "data.val_speakers=0", "data.progress=false", "trainer.max_epochs=3"]


@pytest.mark.slow
def test_a_refit_trains_on_every_non_test_speaker_and_packages_the_last_epoch(tmp_path):
    out = tmp_path / "run"
    done = run_script("train.py", [*REFIT, "test_weights=last", f"hydra.run.dir={out}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    split = json.loads((out / "split.json").read_text())
    assert split["val"] == [] and split["val_speakers"] == []
    # 4 synthetic speakers, one tested: the other three train
    with (out / "manifest.csv").open(newline="") as table:
        parts = list(csv.DictReader(table))
    assert len({p["speaker"] for p in parts if p["part"] == "train"}) == 3
    assert {p["part"] for p in parts} == {"train", "test"}
    # no best-validation checkpoint exists; the packaged weights are the last epoch's
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["last.ckpt"]
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True)["state_dict"]
    last = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    packaged = load_file(out / "model" / "weights.safetensors")
    assert packaged.keys() == last.keys()
    assert all(torch.equal(packaged[k], last[k]) for k in packaged)
    # the run logs test metrics and no validation metric at all
    mlflow.set_tracking_uri(store_uri(tmp_path))
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED"
    assert "test/uar" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("val/")]
    assert run.data.params["data.val_utterances"] == "0"


@pytest.mark.slow
def test_a_refit_cross_validation_reports_no_validation_uar(tmp_path):
    done = run_script("train.py", [*REFIT, "test_weights=last", "data.fold=all", "logger=none",
                                   f"hydra.run.dir={tmp_path / 'cv'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {line.split(":")[0]: line for line in done.stdout.splitlines() if ":" in line}
    # test metrics over the 4 folds; the validation column is empty (NaN), not a number
    uar = float(lines["UAR"].split()[1])
    assert 0.0 <= uar <= 1.0
    assert lines["val UAR"].split()[2:] == ["nan", "±", "nan"]


def test_a_refit_with_best_epoch_weights_is_refused_before_training(tmp_path):
    done = run_script("train.py", [*REFIT, "logger=none", f"hydra.run.dir={tmp_path / 'r'}"],
                      tmp_path)
    assert done.returncode != 0
    assert "data.val_speakers=0" in done.stderr and "test_weights=last" in done.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_an_svm_refit_needs_inner_folds_to_choose_c_and_gamma(tmp_path):
    done = run_script("train.py", ["model=svm", "data.reader.n_speakers=4",
                                   "data.reader.utterances_per_class=4", "data.val_speakers=0",
                                   "logger=none", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert done.returncode != 0
    assert "model.selection=inner_folds" in done.stderr


@pytest.mark.slow
def test_an_svm_with_inner_folds_fits_every_non_test_speaker(tmp_path):
    done = run_script("train.py", ["model=svm", "data.reader.n_speakers=4",
                                   "data.reader.utterances_per_class=4", "data.val_speakers=0",
                                   "model.selection=inner_folds", "model.inner_folds=3",
                                   "data.progress=false", f"hydra.run.dir={tmp_path / 'r'}"],
                      tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    mlflow.set_tracking_uri(store_uri(tmp_path))
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    params = run.data.params
    # 4 speakers x 4 classes x 4 utterances: one speaker tested, the other three fitted on
    assert (params["data.train_utterances"], params["data.val_utterances"]) == ("48", "0")
    assert params["svm.selection"] == "inner_folds" and "test/uar" in run.data.metrics


def test_a_study_on_validation_uar_refuses_a_refit(tmp_path):
    done = run_script("tune.py", [*REFIT, "test_weights=last", "tune.n_trials=1"], tmp_path)
    assert done.returncode != 0
    assert "data.val_speakers=0" in done.stderr and "refit" in done.stderr
    assert "[tune] trial" not in done.stdout  # refused before any trial ran
