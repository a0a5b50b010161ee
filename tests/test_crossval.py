"""Cross-validation (`train.py data.fold=all`): fold configs, aggregates, and a real 3-fold run."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from ser_pipeline import tracking
from ser_pipeline.corpora import read_manifest, read_synthetic, write_manifest
from ser_pipeline.crossval import _fold_worker, fold_config, summarise_folds
from ser_pipeline.splits import count_folds, make_split
from tests.e2e import FAST, REPO, project_env, run_script, store_uri


def test_fold_config_sets_fold_output_folder_and_keeps_fold_models_unregistered(tmp_path):
    cfg = OmegaConf.create({"data": {"fold": "all"}, "paths": {"output_dir": str(tmp_path)},
                            "logger": {"mlflow": {"register": True}}})
    fold = fold_config(cfg, 2, tmp_path)
    assert fold.data.fold == 2
    assert fold.paths.output_dir == str(tmp_path / "fold2")
    assert fold.logger.mlflow.register is False
    assert cfg.data.fold == "all"  # the cross-validation config itself is untouched


def test_fold_summary_is_mean_and_sample_std():
    folds = [{"uar": 0.5, "wa": 0.6, "f1": 0.4, "val_uar": 0.55},
             {"uar": 0.7, "wa": 0.8, "f1": 0.6, "val_uar": 0.65}]
    summary = summarise_folds(folds)
    assert summary["mean"]["uar"] == pytest.approx(0.6)
    assert summary["std"]["uar"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert math.isnan(summarise_folds(folds[:1])["std"]["f1"])  # one fold: no spread to tell


def test_emodb_leave_two_speakers_out_has_five_mixed_gender_folds():
    # EMO-DB's ten speakers: 03 10 11 12 15 male, 08 09 13 14 16 female
    males, females = ["03", "10", "11", "12", "15"], ["08", "09", "13", "14", "16"]
    rows = [{"id": f"{s}_{e}", "speaker": s, "gender": "male" if s in males else "female",
             "emotion": e} for s in males + females for e in ("anger", "neutral")]
    manifest = pd.DataFrame(rows)
    assert count_folds(manifest, "ltso") == 5
    tested = []
    for fold in range(5):
        split = make_split(manifest, "ltso", fold, val_speakers=2)
        genders = {"male" if s in males else "female" for s in split.test_speakers}
        assert len(split.test_speakers) == 2 and genders == {"male", "female"}
        tested += split.test_speakers
    assert sorted(tested) == sorted(males + females)


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory):
    """`train.py data.fold=all` over 3 group folds of a 4-speaker synthetic corpus."""
    root = tmp_path_factory.mktemp("project")
    result = run_script("train.py", [*FAST, "data.fold=all", "data.split=group_kfold",
                                     "data.n_folds=3", "trainer.limit_val_batches=1",
                                     "logger.mlflow.log_model=false"], root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=store_uri(root))
    experiment = client.get_experiment_by_name("ser-pipeline")
    parent = client.search_runs([experiment.experiment_id], "tags.cross_validation = 'true'")[0]
    folds = client.search_runs([experiment.experiment_id],
                               f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return root, result, client, parent, sorted(folds, key=lambda r: int(r.data.tags["fold"]))


@pytest.mark.slow
def test_every_fold_is_a_finished_child_run(cross_validated):
    _, _, _, parent, folds = cross_validated
    assert parent.info.status == "FINISHED"
    assert [run.data.tags["fold"] for run in folds] == ["0", "1", "2"]
    assert all(run.info.status == "FINISHED" for run in folds)
    tested = [set(run.data.tags["test_speakers"].split(",")) for run in folds]
    assert set.union(*tested) == {"spk00", "spk01", "spk02", "spk03"}
    assert sum(len(t) for t in tested) == 4  # each speaker tested exactly once


@pytest.mark.slow
def test_parent_run_is_tagged_with_the_protocol(cross_validated):
    _, _, _, parent, _ = cross_validated
    tags = parent.data.tags
    assert (tags["protocol"], tags["speaker_independent"], tags["n_folds"]) == (
        "group_kfold", "true", "3")


@pytest.mark.slow
def test_parent_logs_mean_and_std_of_the_fold_metrics(cross_validated):
    _, _, _, parent, folds = cross_validated
    for name in ("uar", "wa", "f1"):
        values = [run.data.metrics[f"test/{name}"] for run in folds]
        assert parent.data.metrics[f"cv/{name}_mean"] == pytest.approx(np.mean(values))
        assert parent.data.metrics[f"cv/{name}_std"] == pytest.approx(np.std(values, ddof=1))


@pytest.mark.slow
def test_parent_logs_the_confusion_matrix_summed_over_folds(cross_validated):
    root, _, client, parent, folds = cross_validated

    def counts(run_id: str, name: str) -> np.ndarray:
        path = client.download_artifacts(run_id, f"confusion/{name}.json", str(root))
        return np.array(json.loads(Path(path).read_text())["counts"])

    summed = counts(parent.info.run_id, "test_sum_over_folds")
    assert (summed == sum(counts(run.info.run_id, "test") for run in folds)).all()
    assert summed.sum() == 4 * 4 * 4  # every utterance of the corpus tested once
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "confusion")}
    assert "confusion/test_sum_over_folds.png" in artifacts


@pytest.mark.slow
def test_console_shows_the_fold_table_and_mean_with_std(cross_validated):
    _, result, _, parent, _ = cross_validated
    assert "=== cross-validation: group_kfold, 3/3 folds ===" in result.stdout
    assert f"UAR:      {parent.data.metrics['cv/uar_mean']:.4f} ± " in result.stdout


@pytest.mark.slow
def test_two_worker_processes_give_the_sequential_folds_results(cross_validated, tmp_path):
    """``cv.workers=2``: same child runs and metrics as one fold after another (each seeds)."""
    _, _, _, _, sequential = cross_validated
    result = run_script("train.py", [*FAST, "data.fold=all", "data.split=group_kfold",
                                     "data.n_folds=3", "trainer.limit_val_batches=1",
                                     "logger.mlflow.log_model=false", "cv.workers=2"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 worker processes" in result.stdout + result.stderr
    client = MlflowClient(tracking_uri=store_uri(tmp_path))
    experiment = client.get_experiment_by_name("ser-pipeline")
    parent = client.search_runs([experiment.experiment_id], "tags.cross_validation = 'true'")[0]
    folds = sorted(client.search_runs([experiment.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'"),
                   key=lambda r: int(r.data.tags["fold"]))
    assert parent.info.status == "FINISHED" and parent.data.metrics["cv/folds_run"] == 3
    # each fold checkpoints into its own folder, as in a sequential run
    assert len(list(tmp_path.glob("outputs/**/fold*/checkpoints/last.ckpt"))) == 3
    assert all(run.info.status == "FINISHED" for run in folds)
    for parallel_run, sequential_run in zip(folds, sequential, strict=True):
        for metric in ("test/uar", "test/wa", "test/loss"):
            assert parallel_run.data.metrics[metric] == sequential_run.data.metrics[metric]


@pytest.mark.slow
def test_the_parent_writes_and_logs_the_manifest_every_fold_reads(cross_validated):
    root, _, client, parent, folds = cross_validated
    [manifest_file] = root.glob("outputs/train/*/manifest.csv")  # the parent's folder
    manifest = read_manifest(manifest_file)
    assert "data/manifest.csv" in {a.path for a in client.list_artifacts(parent.info.run_id,
                                                                         "data")}
    for fold in range(len(folds)):
        used = read_manifest(manifest_file.parent / f"fold{fold}" / "manifest.csv")
        assert set(used["id"]) <= set(manifest["id"])


@pytest.mark.slow
def test_a_worker_trains_its_fold_from_the_manifest_file_alone(tmp_path):
    """A worker gets the manifest's path, not a table: its data.root does not even exist."""
    corpus = read_synthetic(tmp_path / "corpus", n_speakers=4, utterances_per_class=4)
    manifest = write_manifest(corpus, tmp_path / "cv" / "manifest.csv")
    overrides = [o for o in FAST if not o.startswith("data.")]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            *overrides, "data=manifest", f"data.manifest={tmp_path / 'absent.csv'}",
            "data.val_speakers=1", "data.progress=false", "logger=none",
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'cv'}"])
    jobs, results = queue.Queue(), queue.Queue()
    jobs.put(0)
    jobs.put(None)
    threads = torch.get_num_threads()
    try:
        _fold_worker(OmegaConf.to_container(cfg, resolve=True), str(manifest),
                     str(tmp_path / "cv"), None, 1, jobs, results, threading.Event())
    finally:
        torch.set_num_threads(threads)
    fold, kind, outcome = results.get_nowait()
    assert (fold, kind) == (0, "done"), outcome
    used = read_manifest(tmp_path / "cv" / "fold0" / "manifest.csv")
    assert set(used["id"]) <= set(corpus["id"])
    assert set(outcome["row"]["test_speakers"]) <= set(corpus["speaker"])


def test_a_failing_fold_stops_the_workers_and_fails_the_run(tmp_path):
    result = run_script("train.py", [*FAST, "data.fold=all", "data.split=group_kfold",
                                     "data.n_folds=3", "logger.mlflow.log_model=false",
                                     "cv.workers=2", "model.lr=-1"], tmp_path)  # AdamW refuses it
    assert result.returncode != 0
    assert "fold 0 failed" in result.stderr or "fold 1 failed" in result.stderr
    assert "Invalid learning rate" in result.stderr
    client = MlflowClient(tracking_uri=store_uri(tmp_path))
    experiment = client.get_experiment_by_name("ser-pipeline")
    parent = client.search_runs([experiment.experiment_id], "tags.cross_validation = 'true'")[0]
    assert parent.info.status == "FAILED"


@pytest.mark.slow
def test_parent_and_fold_runs_carry_the_code_checkouts_commit(cross_validated):
    """The project root (``SER_PIPELINE_ROOT``, here a temp folder) is not the code's checkout:
    every run names the commit of the package it ran, parent and children alike."""
    _, _, _, parent, folds = cross_validated
    [commit] = {run.data.tags["git_commit"] for run in [parent, *folds]}
    assert len(commit) == 40 and int(commit, 16) >= 0  # a real sha, not "unknown"
    assert commit == tracking.code_version()["git_commit"] or commit in subprocess.run(
        ["git", "log", "--format=%H", "-50"], cwd=REPO, capture_output=True, text=True,
        check=True).stdout  # the checkout's commit then (others may have committed since)


#: a parallel cross-validation that trains until it is stopped
ENDLESS_CV = [*FAST, "data.fold=all", "data.split=group_kfold", "data.n_folds=3",
              "logger.mlflow.log_model=false", "cv.workers=2", "trainer.max_epochs=400",
              "callbacks.early_stopping.patience=400"]


def start_train(root: Path, overrides: list[str]) -> subprocess.Popen:
    """``train.py`` in its own process group (as a shell starts a job), its console (the
    workers' logs on stderr, the parent's through Hydra on stdout) as one stream."""
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides], cwd=root,
                            env=project_env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_line(process: subprocess.Popen, text: str) -> None:
    """Read ``process``'s console until a line contains ``text`` (the event to act on)."""
    seen = []
    for line in process.stdout:
        if text in line:
            return
        seen.append(line)
    raise AssertionError(f"'{text}' never appeared:\n" + "".join(seen[-40:]))


def stop_and_collect_runs(process: subprocess.Popen, root: Path, sig: signal.Signals,
                          whole_group: bool) -> tuple[Any, list[Any]]:
    """Send ``sig`` (to the process, or to its group as Ctrl-C does), wait, read the store."""
    if whole_group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    console, _ = process.communicate(timeout=300)
    assert process.returncode != 0, console[-3000:]
    client = MlflowClient(tracking_uri=store_uri(root))
    experiment = client.get_experiment_by_name("ser-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("cross_validation") == "true")
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert not [r for r in runs if r.info.status == "RUNNING"], console[-3000:]
    return parent, folds


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "whole_group"), [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM-to-the-parent", "SIGINT-to-the-group-as-Ctrl-C"])
def test_a_signal_stops_every_worker_and_marks_the_runs_killed(tmp_path, sig, whole_group):
    process = start_train(tmp_path, ENDLESS_CV)
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("outputs/**/fold*/checkpoints/last.ckpt"))) < 2:
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the two workers wrote no checkpoints"
        time.sleep(0.2)  # polling for both workers' first checkpoint (a file, no event)
    parent, folds = stop_and_collect_runs(process, tmp_path, sig, whole_group)
    assert parent.info.status == "KILLED"
    assert len(folds) == 2 and all(run.info.status == "KILLED" for run in folds)
    assert len(list(tmp_path.glob("outputs/**/fold*/checkpoints/interrupted.ckpt"))) == 2


@pytest.mark.slow
def test_a_signal_while_the_folds_start_up_leaves_no_run_unfinished(tmp_path):
    """SIGTERM as the first fold starts (its data is ready, no run or checkpoint yet): the
    workers, still importing or setting up, record it; nothing trains on, nothing stays RUNNING."""
    process = start_train(tmp_path, ENDLESS_CV)
    wait_for_line(process, "[ser_pipeline.training] - data: ")
    parent, folds = stop_and_collect_runs(process, tmp_path, signal.SIGTERM, False)
    assert parent.info.status == "KILLED"
    assert all(run.info.status == "KILLED" for run in folds)
    assert not list(tmp_path.glob("outputs/**/fold*/checkpoints/epoch*.ckpt"))  # none trained on


@pytest.mark.slow
def test_a_signal_during_the_parents_final_logging_keeps_the_complete_run(tmp_path):
    """After the last fold the parent logs the summary; a signal then waits for it to be
    logged (the run is complete: FINISHED) and stops the command afterwards."""
    process = start_train(tmp_path, [*FAST, "data.fold=all", "data.split=group_kfold",
                                     "data.n_folds=3", "logger.mlflow.log_model=false"])
    wait_for_line(process, "fold 3/3 (test ")  # logged just before the summary
    parent, folds = stop_and_collect_runs(process, tmp_path, signal.SIGTERM, False)
    assert parent.info.status == "FINISHED" and parent.data.tags["cv_complete"] == "true"
    assert parent.data.metrics["cv/folds_run"] == 3 and "cv/uar_mean" in parent.data.metrics
    client = MlflowClient(tracking_uri=store_uri(tmp_path))
    assert "cv/summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id, "cv")}
    assert len(folds) == 3 and all(run.info.status == "FINISHED" for run in folds)


@pytest.mark.slow
def test_parent_logs_breakdowns_and_calibration_over_every_fold(cross_validated):
    root, _, client, parent, folds = cross_validated
    run_id = parent.info.run_id
    names = {a.path for a in client.list_artifacts(run_id, "reports")}
    assert "reports/test_over_folds_uar_by_speaker.json" in names
    assert "reports/test_over_folds_reliability.png" in names
    by_speaker = json.loads(Path(client.download_artifacts(
        run_id, "reports/test_over_folds_uar_by_speaker.json", str(root))).read_text())
    assert sorted(by_speaker) == ["spk00", "spk01", "spk02", "spk03"]  # every fold's tests
    assert "test_over_folds/ece" in parent.data.metrics
