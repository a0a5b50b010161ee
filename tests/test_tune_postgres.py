"""tune.py workers on one study in a real PostgreSQL server (what several machines share).

Two workers start together on a fresh database; once the first has finished a trial, it is
killed (SIGKILL) in the middle of its next one. The survivor fails that trial through the
heartbeat, runs its retry and stops both at ``tune.max_trials``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from ser_pipeline.tuning import open_storage
from tests.e2e import FAST, REPO, project_env, store_uri
from tests.postgres import PostgresUnavailable, postgres_server

STUDY = "shared"
#: 6: the survivor reaches tune.max_trials within the grace period of the kill, so only the
#: wait before it leaves fails the dead trial (on an idle machine it used to stay RUNNING);
#: 10: the survivor still starts trials after the dead one went stale (Optuna fails it then)
MAX_TRIALS = (6, 10)
#: a worker silent for GRACE_PERIOD s has its trial failed; short, so the test stays short
HEARTBEAT_INTERVAL, GRACE_PERIOD = 1, 2
SEARCH_SPACE = "lr: {key: model.lr, type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
RUNNING, FAIL, COMPLETE = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL,
                           optuna.trial.TrialState.COMPLETE)


@pytest.fixture(scope="module")
def server():
    with contextlib.ExitStack() as stack:
        try:
            running = stack.enter_context(postgres_server())
        except PostgresUnavailable as reason:
            pytest.skip(f"no PostgreSQL server: {reason}")
        yield running


def tune_args(root: Path, storage: str, max_trials: int) -> list[str]:
    return ["-cd", str(root / "conf"), "search_space=tiny", f"tune.study_name={STUDY}",
            f"tune.storage={storage}", f"tune.max_trials={max_trials}", "tune.pruner=null",
            "tune.sampler=random", f"tune.heartbeat_interval={HEARTBEAT_INTERVAL}",
            f"tune.grace_period={GRACE_PERIOD}", *FAST, "trainer.max_epochs=1",
            "trainer.limit_val_batches=1", "logger.mlflow.register=false",
            "logger.mlflow.log_model=false"]


def worker_of(trial: optuna.trial.FrozenTrial) -> int | None:
    """The pid of the tune.py process that ran ``trial`` (its Hydra folder ends in ``_<pid>``)."""
    folder = trial.user_attrs.get("output_dir")
    return int(Path(folder).parent.name.rsplit("_", 1)[1]) if folder else None


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)  # polling the database, not waiting for a guessed duration


def start_worker(root: Path, storage: str, max_trials: int, log_file: Path) -> subprocess.Popen:
    # output to a file: a pipe nobody reads while the test waits would block the worker
    with open(log_file, "w") as log:
        return subprocess.Popen([sys.executable, str(REPO / "tune.py"),
                                 *tune_args(root, storage, max_trials)],
                                cwd=root, env=project_env(root, OMP_NUM_THREADS="1"),
                                stdout=log, stderr=subprocess.STDOUT, text=True)


def has_heartbeat(engine: sqlalchemy.Engine, trial: optuna.trial.FrozenTrial) -> bool:
    with engine.connect() as connection:
        return connection.execute(sqlalchemy.text(
            "SELECT count(*) FROM trial_heartbeats WHERE trial_id = :id"),
            {"id": trial._trial_id}).scalar() > 0


@pytest.fixture(scope="module", params=MAX_TRIALS, ids=lambda n: f"max_trials={n}")
def study(server, tmp_path_factory, request):
    max_trials = request.param
    root = tmp_path_factory.mktemp("project")
    (root / "conf" / "search_space").mkdir(parents=True)
    (root / "conf" / "search_space" / "tiny.yaml").write_text(SEARCH_SPACE)
    storage = server.create_database(f"optuna{max_trials}")
    victim, survivor = workers = [start_worker(root, storage, max_trials,
                                               root / f"worker{i}.log") for i in range(2)]
    watcher = open_storage(storage, heartbeat_interval=None)
    engine = sqlalchemy.create_engine(storage)
    seen: dict[str, optuna.trial.FrozenTrial] = {}
    try:
        def victim_in_its_second_trial() -> bool:
            with contextlib.suppress(KeyError):  # KeyError: no worker has created the study yet
                trials = [t for t in optuna.load_study(study_name=STUDY, storage=watcher).trials
                          if worker_of(t) == victim.pid]
                running = [t for t in trials if t.state == RUNNING]
                if any(t.state == COMPLETE for t in trials) and running \
                        and has_heartbeat(engine, running[0]):
                    seen["killed"] = running[0]
                    return True
            return False

        wait_for(victim_in_its_second_trial, "the first worker to be in its second trial")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
        survivor.wait(timeout=1200)  # upper bounds for a loaded machine, not waits
    finally:
        engine.dispose()
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    output = (root / "worker1.log").read_text()
    assert survivor.returncode == 0, output[-4000:]
    final = optuna.load_study(study_name=STUDY, storage=storage)
    client = MlflowClient(tracking_uri=store_uri(root))
    return final, seen["killed"], victim.pid, survivor.pid, client, max_trials


def test_trial_of_a_killed_worker_is_failed_by_the_heartbeat(study):
    final, killed, _, _, _, _ = study
    assert final.trials[killed.number].state == FAIL


def test_the_other_worker_retries_the_killed_trial(study):
    final, killed, _, survivor, _, _ = study
    retries = [t for t in final.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1
    retry = retries[0]
    assert (retry.state, retry.params, worker_of(retry)) == (COMPLETE, killed.params, survivor)


def test_both_workers_ran_trials_and_no_trial_is_lost_or_run_twice(study):
    final, killed, victim, survivor, _, _ = study
    numbers = [t.number for t in final.trials]
    assert numbers == list(range(len(numbers)))  # unique and gapless: PostgreSQL row locks
    assert {t.state for t in final.trials} <= {COMPLETE, FAIL}  # nothing left running or queued
    assert [t.number for t in final.trials if t.state == FAIL] == [killed.number]
    ran_by = [worker_of(t) for t in final.trials]
    assert set(ran_by) == {victim, survivor}


def test_max_trials_caps_the_results_across_workers(study):
    final, _, _, _, _, max_trials = study
    # the killed trial's retry takes its place: max_trials results, one failure beside them
    assert len([t for t in final.trials if t.state == COMPLETE]) == max_trials
    assert len(final.trials) == max_trials + 1


def test_every_completed_trial_is_its_own_mlflow_run(study):
    final, _, _, _, client, _ = study
    experiment = client.get_experiment_by_name("ser-pipeline")
    completed = [t for t in final.trials if t.state == COMPLETE]
    runs = {t.user_attrs["mlflow_run_id"]: t for t in completed}
    assert len(runs) == len(completed)
    for run_id, trial in runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.experiment_id == \
            experiment.experiment_id
        assert run.data.tags["optuna_trial"] == str(trial.number)


def test_storage_for_a_postgresql_url_has_the_heartbeat(server):
    storage = open_storage(server.create_database("heartbeat"), heartbeat_interval=5,
                           grace_period=10)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.get_heartbeat_interval() == 5
    assert isinstance(storage.get_heartbeat_stale_trial_callback(),
                      optuna.storages.RetryHeartbeatStaleTrialCallback)


#: imports, says it is ready, and opens the study when told to (so two do it at one moment)
OPEN_STUDY = """\
import sys, optuna
from ser_pipeline.tuning import open_storage
print("ready", flush=True)
sys.stdin.readline()
optuna.create_study(study_name="s", storage=open_storage(sys.argv[1]), load_if_exists=True)
"""


def test_workers_opening_a_fresh_database_together_all_join_the_study(server):
    # without a retry, all but one fail creating Optuna's tables ("already exists")
    storage = server.create_database("fresh")
    processes = [subprocess.Popen([sys.executable, "-c", OPEN_STUDY, storage], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for _ in range(2)]
    for process in processes:
        assert process.stdout.readline().strip() == "ready", process.communicate()[1]
    for process in processes:  # both at once
        process.stdin.write("go\n")
        process.stdin.flush()
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["s"]
