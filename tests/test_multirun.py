"""`train.py -m`: every job of a Hydra sweep is its own MLflow run; a failing job loses nothing."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e import FAST, run_script, store_uri

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two jobs; the first fails inside its run (batch size 0), the second trains."""
    root = tmp_path_factory.mktemp("project")
    result = run_script("train.py", ["-m", "data.batch_size=0,16", *FAST,
                                     "trainer.limit_val_batches=1",
                                     "logger.mlflow.register=false",
                                     "logger.mlflow.log_model=false"], root)
    client = MlflowClient(tracking_uri=store_uri(root))
    experiment = client.get_experiment_by_name("ser-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    return result, sorted(runs, key=lambda r: int(r.data.tags["sweep_job"]))


def test_every_job_is_its_own_run_tagged_with_the_sweep(sweep):
    _, runs = sweep
    assert [run.data.tags["sweep_job"] for run in runs] == ["0", "1"]
    assert [run.data.params["data.batch_size"] for run in runs] == ["0", "16"]
    assert len({run.data.tags["sweep_id"] for run in runs}) == 1


def test_a_failing_job_does_not_stop_the_sweep(sweep):
    result, runs = sweep
    failed, trained = runs
    assert failed.info.status == "FAILED"
    assert trained.info.status == "FINISHED" and "test/uar" in trained.data.metrics


def test_the_sweep_reports_the_failure_in_its_exit_status(sweep):
    result, _ = sweep
    assert result.returncode != 0
    assert "batch_size" in result.stderr  # the failing job's error is shown
