"""tune.py: search spaces, overrides, storages, and real studies end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from ser_pipeline.tuning import (
    SearchParam,
    experiment_yaml,
    format_override,
    load_search_space,
    open_storage,
    train_overrides,
)
from tests.e2e import FAST, REPO, project_env, run_script, store_uri

STUDY = "synthetic-pruning"
#: trials 0 and 1 are fixed: one epoch (never pruned) and two epochs (pruned at epoch 2,
#: since the threshold pruner's lower bound is above any UAR); the learning rate is sampled
SEARCH_SPACE = """\
epochs: {key: trainer.max_epochs, type: categorical, choices: [1, 2]}
lr: {key: model.lr, type: float, low: 1.0e-4, high: 1.0e-2, log: true}
features: {key: feature, type: categorical, choices: [logmel, logmel_deltas]}
"""


def tune_args(root: Path) -> list[str]:
    return ["-cd", str(root / "conf"), "search_space=pruning", "tune.pruner=threshold",
            "tune.pruners.threshold.lower=1.01", "tune.pruners.threshold.n_warmup_steps=1",
            "tune.enqueue=[{epochs:1},{epochs:2}]", *FAST, "trainer.limit_val_batches=1",
            "logger.mlflow.register=false", "logger.mlflow.log_model=false"]


def storage_url(root: Path) -> str:
    return f"sqlite:///{root / 'outputs' / 'tune' / STUDY}.db"


def start_tune(root: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tune.py"), *args], cwd=root,
                            env=project_env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def trial_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("[tune] trial")]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 2-trial session, then the same command re-run by two workers at once (1 trial each)."""
    root = tmp_path_factory.mktemp("project")
    (root / "conf" / "search_space").mkdir(parents=True)
    (root / "conf" / "search_space" / "pruning.yaml").write_text(SEARCH_SPACE)
    first = run_script("tune.py", [*tune_args(root), "tune.n_trials=2"], root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    workers = [start_tune(root, [*tune_args(root), "tune.n_trials=1"]) for _ in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stdout[-3000:] + stderr[-3000:]
    loaded = optuna.load_study(study_name=STUDY, storage=storage_url(root))
    client = MlflowClient(tracking_uri=store_uri(root))
    experiment = client.get_experiment_by_name("ser-pipeline")
    return root, first, [stdout for stdout, _ in outputs], loaded, client, experiment


# -- fast: the pieces ---------------------------------------------------------------------------

def test_search_space_entries_become_typed_parameters():
    params = load_search_space({
        "lr": {"key": "model.lr", "type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "hidden": {"key": "model.net.lstm_hidden", "type": "int", "low": 64, "high": 256,
                   "step": 64},
        "model": {"key": "model", "type": "categorical", "choices": ["a", "b"]},
    })
    assert [(p.name, p.key, p.kind) for p in params] == [
        ("lr", "model.lr", "float"), ("hidden", "model.net.lstm_hidden", "int"),
        ("model", "model", "categorical")]
    trial = optuna.create_study().ask()
    lr, hidden, model = (p.suggest(trial) for p in params)
    assert 1e-4 <= lr <= 1e-2 and hidden in (64, 128, 192, 256) and model in ("a", "b")


@pytest.mark.parametrize("spec", [
    {"key": "model.lr", "type": "float", "low": 1.0, "high": 0.1},
    {"key": "model.lr", "type": "float", "low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4},
    {"key": "model.lr", "type": "normal", "low": 0, "high": 1},
    {"type": "float", "low": 0, "high": 1},
    {"key": "model.net.conv_channels", "type": "categorical", "choices": [[8, 16], [16, 32]]},
])
def test_malformed_search_space_entries_are_rejected(spec):
    with pytest.raises(ValueError, match="search space entry 'x'"):
        SearchParam.from_config("x", spec)


@pytest.mark.parametrize("value", [3e-4, 1e-7, 64, True, None, "logmel", "1", "it's", [8, 16]])
def test_formatted_overrides_parse_back_to_the_same_value(value):
    override = OverridesParser.create().parse_override(format_override("a.b", value))
    assert override.key_or_group == "a.b" and override.value() == value


def test_group_choices_are_written_as_plain_names():
    assert format_override("model", "cnn_blstm_attn", group=True) == "model=cnn_blstm_attn"
    assert format_override("model.name", "cnn_blstm_attn") == "model.name='cnn_blstm_attn'"


def test_tune_only_and_searched_overrides_are_kept_out_of_trials():
    overrides = ["tune.n_trials=3", "search_space=default", "+search_space.x={}",
                 "hydra.verbose=true", "model.lr=1e-3", "model.net.dropout=0.1", "trainer=debug"]
    assert train_overrides(overrides, searched={"model.net.dropout"}) == [
        "model.lr=1e-3", "trainer=debug"]


def test_experiment_file_composes_like_the_overrides(tmp_path, monkeypatch):
    overrides = ["trainer=debug", "feature=logmel_deltas", "model.lr=0.0025",
                 "model.net.conv_channels=[8,16]", "data.fold='all'"]
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "best.yaml").write_text(
        experiment_yaml(overrides, {"trainer", "feature", "model", "data"}, ["a header"]))
    monkeypatch.setenv("SER_PIPELINE_ROOT", str(tmp_path))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        fixed = ["paths.output_dir=/out", f"hydra.searchpath=[file://{tmp_path}]"]
        from_file = compose("train", overrides=["experiment=best", *fixed])
        direct = compose("train", overrides=[*overrides, *fixed])
    assert OmegaConf.to_container(from_file, resolve=True) == \
        OmegaConf.to_container(direct, resolve=True)


def test_storage_is_an_rdb_for_urls_and_a_journal_for_paths(tmp_path):
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'a.db'}"), optuna.storages.RDBStorage)
    journal = open_storage(str(tmp_path / "sub" / "a.journal"))
    assert isinstance(journal, optuna.storages.JournalStorage)


# -- slow: real studies --------------------------------------------------------------------------

@pytest.mark.slow
def test_unpromising_trial_is_pruned_and_the_one_epoch_trial_completes(study):
    _, _, _, loaded, _, _ = study
    first, second = loaded.trials[:2]
    assert (first.params["epochs"], first.state.name) == (1, "COMPLETE")
    assert (second.params["epochs"], second.state.name) == (2, "PRUNED")
    assert sorted(second.intermediate_values) == [0, 1]  # pruned at the second epoch's report


@pytest.mark.slow
def test_rerunning_the_command_resumes_the_study(study):
    _, first, _, loaded, _, _ = study
    assert len(trial_lines(first.stdout)) == 2
    assert [t.number for t in loaded.trials] == [0, 1, 2, 3]
    sessions = {Path(t.user_attrs["output_dir"]).parent for t in loaded.trials}
    assert len(sessions) == 3  # one Hydra run folder per process, one study


@pytest.mark.slow
def test_two_workers_on_one_storage_finish_the_planned_trials_together(study):
    _, _, worker_stdouts, loaded, _, _ = study
    assert [len(trial_lines(stdout)) for stdout in worker_stdouts] == [1, 1]
    later = loaded.trials[2:]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in later)
    assert len({t.user_attrs["mlflow_run_id"] for t in loaded.trials}) == 4


@pytest.mark.slow
def test_progress_is_reported_one_line_per_trial(study):
    _, first, _, _, _, _ = study
    lines = trial_lines(first.stdout)
    assert "trial   0 COMPLETE val/uar" in lines[0] and "epochs=1" in lines[0]
    assert "trial   1 PRUNED   step 1" in lines[1] and "best" in lines[1]


@pytest.mark.slow
def test_study_is_one_parent_run_with_a_child_run_per_trial(study):
    _, _, _, loaded, client, experiment = study
    parents = client.search_runs([experiment.experiment_id], "tags.optuna_role = 'study'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {int(run.data.tags["optuna_trial"]): run for run in children}
    assert sorted(by_trial) == [0, 1, 2, 3]
    for trial in loaded.trials:
        run = by_trial[trial.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags["pruned"] == str(trial.state.name == "PRUNED").lower()
    assert by_trial[1].data.tags["pruned_at_step"] == "1"


@pytest.mark.slow
def test_study_run_logs_best_value_parameters_and_plots(study):
    _, _, _, loaded, client, experiment = study
    parent = client.search_runs([experiment.experiment_id], "tags.optuna_role = 'study'")[0]
    assert parent.data.metrics["best_value"] == pytest.approx(loaded.best_value)
    assert parent.data.tags["best_trial"] == str(loaded.best_trial.number)
    assert parent.data.tags["best.lr"] == str(loaded.best_params["lr"])
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/intermediate_values.png"} <= plots
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "best.json", "trials.csv", "best_config"}


@pytest.mark.slow
def test_best_config_file_reproduces_the_best_trial(study, monkeypatch):
    root, _, _, loaded, client, _ = study
    run_id = loaded.best_trial.user_attrs["mlflow_run_id"]
    logged = yaml.safe_load(Path(client.download_artifacts(
        run_id, "config/train.yaml", str(root))).read_text())
    assert (root / "conf" / "experiment" / f"tuned-{STUDY}.yaml").exists()
    monkeypatch.setenv("SER_PIPELINE_ROOT", str(root))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        # what `python train.py -cd <root>/conf experiment=tuned-...` composes
        cfg = compose("train", overrides=[
            f"experiment=tuned-{STUDY}", f"hydra.searchpath=[file://{root / 'conf'}]",
            f"paths.output_dir={logged['paths']['output_dir']}"])
    assert OmegaConf.to_container(cfg, resolve=True) == logged
