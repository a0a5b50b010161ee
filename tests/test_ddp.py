"""trainer=ddp: two real processes (gloo on CPU) train one model, and only rank 0 tracks it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.e2e import REPO, project_env, run_script, store_uri

#: a small synthetic corpus that a tiny model learns in a few epochs: 64 training, 32
#: validation and 32 test utterances (4 speakers x 4 classes x 8, LOSO fold 0)
DATA = [
    "data.reader.n_speakers=4",
    "data.reader.utterances_per_class=8",
    "data.val_speakers=1",
    "trainer.enable_progress_bar=false",
    "model.net.conv_channels=[8,16]",
    "model.net.lstm_hidden=16",
    "model.net.lstm_layers=1",
    "model.net.attention_dim=16",
    "model.net.head_hidden=16",
]
#: two ranks with 8 items per batch see, step by step, the 16 items one process sees with
#: batch size 16 (EpochShuffleSampler interleaves its one order over the ranks)
DDP = ["trainer=ddp", "trainer.devices=2", "data.batch_size=8"]
SINGLE = ["trainer=cpu", "data.batch_size=16"]
EPOCHS = "trainer.max_epochs=8"
#: one thread per process: two ranks on a 2-core machine must not oversubscribe it
THREADS = {"OMP_NUM_THREADS": "1"}
#: test UAR of the DDP run may differ from the single process's by this much. Why not 0:
#: the optimisation steps see the same items and DDP averages the two ranks' gradients,
#: but each rank's batch norm normalises its own 8 items (SyncBatchNorm is CUDA-only), pads
#: to its own longest item and sums in another order, so weights drift apart by float
#: noise that can flip the odd borderline test utterance. 0.1 is under two of the 32 test
#: utterances' worth of recall (each is 1/8 of its class's recall, 1/32 of UAR); a
#: rank-unaware bug (metrics over one rank's half, or half the data trained) is far off.
UAR_TOLERANCE = 0.1

pytestmark = pytest.mark.slow


def only_run(root: Path):
    client = MlflowClient(tracking_uri=store_uri(root))
    experiment = client.get_experiment_by_name("ser-pipeline")
    return client, client.search_runs([experiment.experiment_id])


def train(root: Path, *overrides: str):
    result = run_script("train.py", [*DATA, *overrides], root, **THREADS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, runs = only_run(root)
    return result, client, runs


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return train(tmp_path_factory.mktemp("ddp"), *DDP, EPOCHS)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train(tmp_path_factory.mktemp("single"), *SINGLE, EPOCHS)


def test_two_ranks_log_exactly_one_finished_run_with_one_registered_model(ddp):
    result, client, runs = ddp
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert result.stdout.count("=== summary ===") == 1  # rank 1 trains, prints nothing more
    [version] = client.search_model_versions("name='ser-synthetic-cnn_blstm_attn'")
    assert version.run_id == runs[0].info.run_id


def test_two_ranks_log_the_metric_names_of_one_process(ddp, single):
    assert set(ddp[2][0].data.metrics) == set(single[2][0].data.metrics)


def test_logged_test_metrics_are_the_whole_test_sets(ddp, tmp_path):
    _, client, [run] = ddp
    confusion = json.loads(Path(client.download_artifacts(
        run.info.run_id, "confusion/test.json", str(tmp_path))).read_text())
    counts = torch.tensor(confusion["counts"], dtype=torch.float64)
    assert counts.sum() == 32  # both ranks' 16 utterances, none twice
    recall = counts.diagonal() / counts.sum(1)
    assert run.data.metrics["test/uar"] == pytest.approx(float(recall.mean()), abs=1e-6)
    val = json.loads(Path(client.download_artifacts(
        run.info.run_id, "confusion/val_best.json", str(tmp_path))).read_text())
    assert sum(map(sum, val["counts"])) == 32


def test_two_ranks_reach_the_test_uar_of_one_process(ddp, single):
    ddp_uar = ddp[2][0].data.metrics["test/uar"]
    single_uar = single[2][0].data.metrics["test/uar"]
    assert single_uar > 0.5, "the reference run learned nothing: the comparison says nothing"
    assert abs(ddp_uar - single_uar) <= UAR_TOLERANCE, (ddp_uar, single_uar)


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.parametrize("target", ["launcher", "rank1"])
def test_sigterm_to_any_rank_ends_both_and_the_run_is_killed(tmp_path, target):
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *DATA, *DDP, "trainer.max_epochs=400"],
        cwd=tmp_path, env=project_env(tmp_path, **THREADS), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("outputs/**/checkpoints/last.ckpt")):
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)  # polling for the checkpoint file
    ranks = [pid for pid in children_of(process.pid)
             if "train.py" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(ranks) == 1, ranks
    os.kill(process.pid if target == "launcher" else ranks[0], signal.SIGTERM)
    console = process.communicate(timeout=180)[0][-6000:]
    assert process.returncode != 0
    deadline = time.monotonic() + 60
    while not gone(ranks[0]):
        assert time.monotonic() < deadline, f"rank 1 still runs:\n{console}"
        time.sleep(0.2)  # polling for the rank's exit
    _, [run] = only_run(tmp_path)
    assert run.info.status == "KILLED", f"exit {process.returncode}:\n{console}"
