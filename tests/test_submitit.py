"""Sweeps through Hydra's submitit launcher: every job in a process of its own (as on SLURM).

``hydra/launcher=submitit_local`` runs the jobs of ``train.py -m`` as local submitit jobs,
the very code path of ``hydra/launcher=slurm`` short of ``sbatch``. The multirun's rules hold
there too: every job its own MLflow run tagged with the sweep, a failing job FAILED while
the other trains, and the command exits non-zero.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from tests.e2e import FAST, REPO, run_script, store_uri

submitit = pytest.importorskip("submitit", reason="the cluster extra is not installed: "
                                                  "pip install -e '.[cluster]'")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="hydra-submitit-launcher is not installed: pip install -e '.[cluster]'")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two submitit jobs; the first fails inside its run (batch size 0), the second trains."""
    root = tmp_path_factory.mktemp("project")
    result = run_script("train.py", ["-m", "hydra/launcher=submitit_local",
                                     "data.batch_size=0,16", *FAST,
                                     "trainer.limit_val_batches=1",
                                     "logger.mlflow.register=false",
                                     "logger.mlflow.log_model=false"], root,
                        OMP_NUM_THREADS="1")
    client = MlflowClient(tracking_uri=store_uri(root))
    experiment = client.get_experiment_by_name("ser-pipeline")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return root, result, sorted(runs, key=lambda r: int(r.data.tags["sweep_job"]))


@pytest.mark.slow
def test_every_submitit_job_is_its_own_run_tagged_with_the_sweep(sweep):
    _, result, runs = sweep
    assert [run.data.tags["sweep_job"] for run in runs] == ["0", "1"], result.stderr[-3000:]
    assert [run.data.params["data.batch_size"] for run in runs] == ["0", "16"]
    assert len({run.data.tags["sweep_id"] for run in runs}) == 1


@pytest.mark.slow
def test_submitit_jobs_run_in_processes_of_their_own(sweep):
    _, _, runs = sweep
    sweep_dir = Path(runs[0].data.tags["sweep_dir"])
    jobs = [folder for folder in (sweep_dir / ".submitit").iterdir() if folder.name.isdigit()]
    # a local submitit job id is the pid of the process that ran it
    assert len(jobs) == 2 and os.getpid() not in {int(job.name) for job in jobs}
    assert all(any(job.glob("*_result.pkl")) for job in jobs)


@pytest.mark.slow
def test_a_failing_submitit_job_does_not_stop_the_sweep(sweep):
    _, _, runs = sweep
    failed, trained = runs
    assert failed.info.status == "FAILED"
    assert trained.info.status == "FINISHED" and "test/uar" in trained.data.metrics


@pytest.mark.slow
def test_the_submitit_sweep_reports_the_failure_in_its_exit_status(sweep):
    _, result, _ = sweep
    assert result.returncode != 0
    assert "batch_size" in result.stderr  # the failing job's error reaches the sweep command


class OffClusterSlurmExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor where ``srun`` is absent: it writes sbatch files, never submits."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def test_slurm_launcher_config_reaches_sbatch(tmp_path):
    """The documented settings of conf/hydra/launcher/slurm.yaml become #SBATCH lines."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.mem_gb=16",
            f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert {k: launcher[k] for k in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb",
                                     "timeout_min", "array_parallelism")} == {
        "partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 16,
        "timeout_min": 240, "array_parallelism": 16}
    # what the plugin's launch() hands to submitit (less its own keys), translated to SLURM's
    # names as submitit's AutoExecutor does (timeout_min -> time, mem_gb -> mem=16GB, ...)
    executor = OffClusterSlurmExecutor(folder=tmp_path / "%j")
    parameters = executor._convert_parameters(
        {key: value for key, value in launcher.items()
         if key not in ("_target_", "submitit_folder", "max_num_timeout", "name")})
    executor.update_parameters(**parameters)  # raises on a setting submitit does not know
    sbatch = executor._make_submission_file_text("python -c pass", "0")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=16GB", "#SBATCH --time=240"):
        assert line in sbatch
