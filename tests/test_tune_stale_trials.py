"""A worker leaving a study: max_trials counts a retry in place of its failure, and trials of
dead workers are failed and retried before it goes (Optuna only checks when a trial starts)."""

from __future__ import annotations

import time

import optuna
import pytest

from ser_pipeline.tuning import counted_trials, open_storage, retry_stale_trials

FAIL, COMPLETE, RUNNING = (optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE,
                           optuna.trial.TrialState.RUNNING)
LR = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)


@pytest.fixture
def study(tmp_path):
    """A study on SQLite with a 1 s heartbeat and a 1 s grace period."""
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1,
                           grace_period=1)
    return optuna.create_study(study_name="s", storage=storage, direction="maximize")


def objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("lr", 1e-4, 1e-2, log=True)


def test_a_retried_failure_is_not_counted_its_retry_is(study):
    for value in (0.1, 0.2):
        study.add_trial(optuna.create_trial(value=value, params={"lr": 1e-3},
                                            distributions={"lr": LR}))
    study.add_trial(optuna.create_trial(state=FAIL, params={"lr": 1e-3}, distributions={"lr": LR}))
    study.add_trial(optuna.create_trial(
        state=optuna.trial.TrialState.WAITING, params={"lr": 1e-3}, distributions={"lr": LR},
        system_attrs={"failed_trial": 2, "retry_history": [2]}))
    assert counted_trials(study) == 3


def test_a_failure_never_retried_still_counts(study):
    study.add_trial(optuna.create_trial(state=FAIL, params={"lr": 1e-3}, distributions={"lr": LR}))
    assert counted_trials(study) == 1


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_leaving_worker_fails_a_dead_workers_trial_and_runs_its_retry(study):
    dead = study.ask({"lr": LR})  # started by a worker that then died: one heartbeat, no more
    study._storage.record_heartbeat(dead._trial_id)
    retry_stale_trials(study, objective, [], grace_period=1, interval=1)
    trials = study.get_trials()
    assert [t.state for t in trials] == [FAIL, COMPLETE]
    assert trials[1].params == trials[0].params
    assert trials[1].system_attrs["failed_trial"] == dead.number


def test_a_leaving_worker_goes_at_once_when_no_trial_runs(study):
    study.optimize(objective, n_trials=1)
    started = time.monotonic()
    retry_stale_trials(study, objective, [], grace_period=60, interval=30)
    assert time.monotonic() - started < 1
