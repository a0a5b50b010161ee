"""Optuna hyperparameter search behind ``tune.py``.

One trial is one ``train.py`` run (or one cross-validation with ``tune.cv=true`` /
``data.fold=all``) whose config is composed exactly as ``python train.py <tune's
own overrides> <the trial's sampled overrides>`` would compose it, so the best
trial can be written as an experiment file that ``train.py`` reproduces.

* Search space (``conf/search_space/<name>.yaml``): named entries, each a config key
  (``model.lr``) or a config group (``feature``) with ``type: float | int |
  categorical``. Value keys absent from a trial's composition (e.g. a parameter of
  a model the trial did not pick) are not sampled in that trial.
* Storage: an RDB URL (default ``sqlite:///<root>/outputs/tune/<study>.db``; any
  SQLAlchemy URL such as ``postgresql://...`` for several machines) or a path to an
  Optuna journal file. Re-running the same command resumes the study.
* Pruning: :class:`ReportToTrial` reports ``val/uar`` every epoch; when the pruner
  says so, training stops after that epoch, the trial's run is finished normally
  and tagged ``pruned=true``, and the trial is recorded as PRUNED.
* Tracking: one MLflow parent run per study (shared by every worker) with one
  child run per trial; the parent holds the best value and parameters, the
  optimisation-history, intermediate-values and parameter-importance plots, the
  trials table and the best configuration.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ser_pipeline import tracking
from ser_pipeline.allocator import keep_freed_memory
from ser_pipeline.files import atomic_write_text
from ser_pipeline.splits import is_refit

log = logging.getLogger(__name__)

#: what a trial may optimise: best validation UAR (the default) or a test metric
METRICS = ("val/uar", "test/uar", "test/wa", "test/f1")
#: overrides of tune.py that are not train.py settings (kept out of trials and experiments)
TUNE_ONLY_KEYS = ("tune", "search_space", "hydra", "task_name")
_MISSING = object()


# -- search space ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchParam:
    """One searched setting: ``key`` is a config key (``model.lr``) or a config group."""

    name: str
    key: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @classmethod
    def from_config(cls, name: str, spec: dict[str, Any]) -> SearchParam:
        kind = spec.get("type")
        key = spec.get("key")
        if not key:
            raise ValueError(f"search space entry '{name}' needs a 'key' (config key or group)")
        if kind == "categorical":
            choices = tuple(spec.get("choices") or ())
            if len(choices) < 1:
                raise ValueError(f"search space entry '{name}': categorical needs 'choices'")
            for choice in choices:
                # Optuna stores categorical choices as these types only
                if choice is not None and not isinstance(choice, bool | int | float | str):
                    raise ValueError(f"search space entry '{name}': choice {choice!r} must be "
                                     "null, a bool, a number or a string")
            return cls(name, key, kind, choices=choices)
        if kind not in ("float", "int"):
            raise ValueError(f"search space entry '{name}': type must be float, int or "
                             f"categorical, not {kind!r}")
        low, high = spec.get("low"), spec.get("high")
        if low is None or high is None or not low < high:
            raise ValueError(f"search space entry '{name}' needs low < high (got {low}, {high})")
        step, log_scale = spec.get("step"), bool(spec.get("log", False))
        if step is not None and log_scale:
            raise ValueError(f"search space entry '{name}': 'step' and 'log' exclude each other")
        return cls(name, key, kind, low, high, step, log_scale)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step,
                                   log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {list(self.choices)}"
        scale = " (log)" if self.log else f" step {self.step}" if self.step else ""
        return f"{self.key} {self.kind} [{self.low}, {self.high}]{scale}"


def load_search_space(space: DictConfig | dict | None) -> list[SearchParam]:
    """The ``search_space`` config as parameters (in file order); raises on a malformed entry."""
    entries = OmegaConf.to_container(space, resolve=True) if isinstance(space, DictConfig) \
        else dict(space or {})
    params = [SearchParam.from_config(name, dict(spec)) for name, spec in entries.items()]
    keys = [p.key for p in params]
    if len(set(keys)) != len(keys):
        raise ValueError(f"search space names one config key twice: {keys}")
    if not params:
        raise ValueError("the search space is empty: pick one with search_space=<name>")
    return params


# -- Hydra overrides ---------------------------------------------------------------------------

def format_override(key: str, value: Any, group: bool = False) -> str:
    """``key=value`` as Hydra parses it back to the same value.

    Strings are quoted (so ``"1"`` stays a string), except a config-group choice
    that is a plain name (``model=cnn_blstm_attn``).
    """
    if group and isinstance(value, str) and re.fullmatch(r"[\w\-./]+", value):
        return f"{key}={value}"
    return f"{key}={_override_value(value)}"


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def is_tune_only(override_key: str) -> bool:
    return override_key.split(".")[0].split("/")[0] in TUNE_ONLY_KEYS


def train_overrides(task_overrides: list[str], searched: set[str] = frozenset()) -> list[str]:
    """The command-line overrides of ``tune.py`` that are ``train.py`` settings.

    Overrides of ``searched`` keys are dropped: the search space sets those.
    """
    parser = OverridesParser.create()
    kept = []
    for text, override in zip(task_overrides, parser.parse_overrides(task_overrides),
                              strict=True):
        if is_tune_only(override.key_or_group):
            continue
        if override.key_or_group in searched:
            log.warning("'%s' is ignored: the search space sets %s", text, override.key_or_group)
            continue
        kept.append(text)
    return kept


def experiment_yaml(overrides: list[str], groups: set[str], header: list[str]) -> str:
    """An ``experiment`` config that composes like ``python train.py <overrides>``.

    Group overrides (``model=x``) become ``override /model: x`` defaults, value
    overrides a ``_global_`` config merged after every group (``_self_`` last).
    """
    parser = OverridesParser.create()
    defaults: list[Any] = []
    values = OmegaConf.create()
    skipped = []
    for text, override in zip(overrides, parser.parse_overrides(overrides), strict=True):
        key = override.key_or_group
        if override.is_delete() or override.package is not None:
            skipped.append(text)
        elif key in groups:
            defaults.append({f"override /{key}": override.value()})
        else:
            OmegaConf.update(values, key, override.value(), force_add=True)
    if skipped:
        log.warning("the experiment file cannot express these overrides: %s", skipped)
    body = OmegaConf.to_yaml(OmegaConf.create({"defaults": [*defaults, "_self_"]}))
    lines = ["# @package _global_", *(f"# {line}" for line in header)]
    lines += [f"# not reproduced (add on the command line): {text}" for text in skipped]
    text = "\n".join(lines) + "\n\n" + body
    if values:
        text += "\n" + OmegaConf.to_yaml(values)
    return text


# -- storage -----------------------------------------------------------------------------------

def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other URLs)."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def open_storage(url: str, heartbeat_interval: int | None = 60, grace_period: int | None = 180,
                 retry_stale_trials: int = 1) -> optuna.storages.BaseStorage:
    """Optuna storage for ``url``: an RDB URL, or a journal file path (no ``://``).

    RDB storages get a heartbeat, so a trial whose worker died (killed, machine
    lost) is marked FAIL by the next worker and retried ``retry_stale_trials`` times.
    """
    if "://" not in url:
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the journal backend locks the file itself: safe for local processes and NFS
        return optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # local workers share one file: wait for its write lock rather than fail after 5 s
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        # a database server across the network: drop connections it closed while a trial ran
        engine_kwargs = {"pool_pre_ping": True}
    from sqlalchemy import exc as sql_errors

    attempt = 1
    while True:
        try:
            with tracking.first_use_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = (optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=retry_stale_trials)
                    if heartbeat_interval and retry_stale_trials > 0 else None)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval or None,
                    grace_period=grace_period if heartbeat_interval else None,
                    heartbeat_stale_trial_callback=retry)
        except (sql_errors.IntegrityError, sql_errors.ProgrammingError,
                optuna.exceptions.StorageInternalError) as error:
            # workers started together on a fresh server database race to create Optuna's
            # tables ("already exists"); the losers find them made when they try again
            if path is not None or attempt == 5:
                raise
            log.info("creating the study tables raced another worker (%s); retrying",
                     type(error).__name__)
            time.sleep(0.2 * attempt)
            attempt += 1


def storage_label(url: str) -> str:
    """``url`` without its password, fit for tags and logs."""
    if "://" not in url:
        return str(Path(url).resolve())
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# -- pruning -----------------------------------------------------------------------------------

class ReportToTrial(pl.Callback):
    """Report the validation metric to an Optuna trial each epoch; stop when it is pruned.

    Why not optuna-integration's PyTorchLightningPruningCallback: that package is
    not a dependency and pins Lightning versions. Why stop rather than raise
    ``TrialPruned`` here: Lightning treats an exception as a crash (FAILED logger
    run, interrupt checkpoint); stopping lets the run end normally, and the
    caller records the trial as PRUNED. Steps are ``step_offset + epoch``, so
    cross-validation folds report on consecutive step ranges.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = "val/uar", step_offset: int = 0):
        self.trial, self.monitor, self.step_offset = trial, monitor, step_offset
        self.pruned_at: int | None = None

    @property
    def pruned(self) -> bool:
        return self.pruned_at is not None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the module's epoch-end hook, so this epoch's metric is in callback_metrics
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        step = self.step_offset + trainer.current_epoch
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            self.pruned_at = step
            trainer.should_stop = True
            log.info("trial %d pruned at step %d (%s %.4f)", self.trial.number, step,
                     self.monitor, float(value))


# -- the study ---------------------------------------------------------------------------------

@dataclass
class TuneContext:
    """What every trial of this worker shares."""

    cfg: DictConfig
    params: list[SearchParam]
    base_overrides: list[str]
    groups: set[str]
    output_dir: Path
    metric: str
    experiment_id: str | None
    parent_run_id: str | None


def config_groups() -> set[str]:
    """Config groups of the running app, without Hydra's own and the search space."""
    choices = HydraConfig.get().runtime.choices
    return {g for g in choices if not g.startswith("hydra/") and g != "search_space"}


def compose_train(overrides: list[str]) -> DictConfig:
    """The config ``python train.py <overrides>`` composes (inside the running Hydra app)."""
    return compose(config_name="train", overrides=list(overrides))


def check_search_space(params: list[SearchParam], base: DictConfig, groups: set[str]) -> None:
    """Fail before any trial on a key that no trial could set (a typo, usually)."""
    conditional = any(p.key in groups for p in params)
    for param in params:
        if param.key in groups:
            continue
        if OmegaConf.select(base, param.key, default=_MISSING) is _MISSING and not conditional:
            raise ValueError(f"search space entry '{param.name}': '{param.key}' is not a key "
                             f"of the training config nor a config group ({sorted(groups)})")


def sample_overrides(trial: optuna.Trial, context: TuneContext) -> list[str]:
    """The trial's overrides: group choices first, then values the composed config has."""
    overrides = [format_override(p.key, p.suggest(trial), group=True)
                 for p in context.params if p.key in context.groups]
    composed = (compose_train(context.base_overrides + overrides) if overrides
                else context.cfg)
    for param in context.params:
        if param.key in context.groups:
            continue
        if OmegaConf.select(composed, param.key, default=_MISSING) is _MISSING:
            log.info("trial %d: '%s' does not apply to this configuration; not sampled",
                     trial.number, param.key)
            continue
        overrides.append(format_override(param.key, param.suggest(trial)))
    return overrides


def trial_config(context: TuneContext, overrides: list[str], output_dir: Path) -> DictConfig:
    cfg = compose_train([*context.base_overrides, *overrides,
                         format_override("paths.output_dir", str(output_dir))])
    if not context.cfg.tune.register_trial_models and \
            OmegaConf.select(cfg, "logger.mlflow.register") is not None:
        OmegaConf.update(cfg, "logger.mlflow.register", False)
    return cfg


def run_trial(trial: optuna.Trial, context: TuneContext) -> float:
    """Optuna objective: train (or cross-validate) one configuration; the metric to maximise."""
    from ser_pipeline.crossval import cross_validate
    from ser_pipeline.training import train

    overrides = sample_overrides(trial, context)
    if context.cfg.tune.cv and not any(o.startswith("data.fold=") for o in overrides):
        overrides.append("data.fold='all'")
    output_dir = context.output_dir / f"trial{trial.number:03d}"
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("output_dir", str(output_dir))
    cfg = trial_config(context, overrides, output_dir)
    tags = {"optuna_study": trial.study.study_name, "optuna_trial": str(trial.number),
            "optuna_role": "trial", "optuna_params": json.dumps(trial.params)}
    stage, name = context.metric.split("/")
    reporters: list[ReportToTrial] = []

    if str(cfg.data.fold) == "all":
        epochs = int(cfg.trainer.max_epochs)

        def fold_callbacks(fold: int) -> list[pl.Callback]:
            reporters.append(ReportToTrial(trial, step_offset=fold * epochs))
            return [reporters[-1]]

        summary = cross_validate(cfg, parent_run_id=context.parent_run_id,
                                 fold_callbacks=fold_callbacks,
                                 stop_after_fold=lambda fold, result: reporters[-1].pruned,
                                 extra_tags=tags)
        run_id, value = summary["run_id"], summary["mean"]["val_uar" if stage == "val" else name]
    else:
        reporters.append(ReportToTrial(trial))
        result = train(cfg, parent_run_id=context.parent_run_id, extra_callbacks=reporters,
                       extra_tags=tags)
        run_id = result.get("run_id")
        value = result["best_val_uar"] if stage == "val" else result["test"][name]
    pruned_at = next((r.pruned_at for r in reporters if r.pruned), None)
    if run_id is not None:
        trial.set_user_attr("mlflow_run_id", run_id)
        client = tracking.client()
        client.set_tag(run_id, "pruned", str(pruned_at is not None).lower())
        client.update_run(run_id, name=f"trial-{trial.number:03d}")
        if pruned_at is not None:
            client.set_tag(run_id, "pruned_at_step", str(pruned_at))
    if pruned_at is not None:
        raise optuna.TrialPruned(f"pruned at step {pruned_at}")
    return float(value)


def build_sampler(cfg: DictConfig, seed_offset: int) -> optuna.samplers.BaseSampler:
    """``tune.samplers[tune.sampler]``; a fixed seed is offset by the trials already run,
    so a resumed study does not redraw its first random points."""
    spec = copy.deepcopy(cfg.tune.samplers[cfg.tune.sampler])
    if spec.get("seed") is not None:
        spec.seed = int(spec.seed) + seed_offset
    return instantiate(spec)


def build_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    if not cfg.tune.pruner:
        return optuna.pruners.NopPruner()
    return instantiate(cfg.tune.pruners[cfg.tune.pruner])


# -- tracking the study ------------------------------------------------------------------------

def study_parent_run(experiment_id: str, study: optuna.Study, storage: str,
                     tags: dict[str, str]) -> str:
    """The study's MLflow parent run, shared by every worker and every resumed session.

    Found by the tag ``optuna_study_key``; when two workers create it at the same
    moment, both keep the older run and the newer one is deleted.
    """
    client = tracking.client()
    key = f"{study.study_name}@{storage}"
    query = "tags.optuna_study_key = '{}'".format(key.replace("'", "\\'"))

    def existing() -> list:
        runs = client.search_runs([experiment_id], query, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    runs = existing()
    if runs:
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    created = client.create_run(experiment_id, run_name=f"study-{study.study_name}",
                                tags={**tags, "optuna_study_key": key})
    winner = existing()[0].info.run_id
    if winner != created.info.run_id:
        client.delete_run(created.info.run_id)
    return winner


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``tune.max_trials``: all, running and waiting ones included
    (parallel workers stop together), except a failed trial that was retried (its retry
    counts in its place, so a killed worker's trial costs the study no result)."""
    trials = study.get_trials(deepcopy=False)
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    return sum(1 for t in trials
               if not (t.state == optuna.trial.TrialState.FAIL and t.number in retried))


class MaxTrials:
    """Stop the study once :func:`counted_trials` reaches ``max_trials`` (Optuna's
    ``MaxTrialsCallback``, with a retried failure replaced by its retry)."""

    def __init__(self, max_trials: int) -> None:
        self.max_trials = max_trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if counted_trials(study) >= self.max_trials:
            study.stop()


def retry_stale_trials(study: optuna.Study, objective: Any, callbacks: list,
                       grace_period: float, interval: float) -> None:
    """Before this worker leaves: fail trials whose worker died and run their retries here.

    Why: Optuna fails a stale trial only when a worker starts a trial, so a worker killed
    within ``grace_period`` s of the study reaching ``tune.max_trials`` would leave its trial
    RUNNING for good, its retry never run, once the others stop. A dead trial's heartbeat is
    stale one grace period after the last worker stopped starting trials; a live worker's
    never is (it finishes its own trial), so waiting longer would only wait for it.
    """
    unfinished = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING
    # two heartbeat periods of margin: staleness is judged on the database's clock
    deadline = time.monotonic() + grace_period + 2 * interval
    while study.get_trials(deepcopy=False, states=unfinished):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # RetryHeartbeatStaleTrialCallback enqueues
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if waiting:
            log.info("running %d retr%s of trials whose worker died", len(waiting),
                     "y" if len(waiting) == 1 else "ies")
            # another worker may take a retry first: then this one starts a new trial, the
            # overshoot Optuna allows for workers finishing at once
            study.optimize(objective, n_trials=len(waiting), callbacks=callbacks)
            deadline = time.monotonic() + grace_period + 2 * interval
            continue
        if time.monotonic() >= deadline:  # what still runs has a live worker
            return
        time.sleep(interval)  # the heartbeat's own period: nothing changes faster


def trial_counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {name.lower(): states.count(state) for name, state in
            (("COMPLETE", optuna.trial.TrialState.COMPLETE),
             ("PRUNED", optuna.trial.TrialState.PRUNED),
             ("FAIL", optuna.trial.TrialState.FAIL),
             ("RUNNING", optuna.trial.TrialState.RUNNING))}


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def log_study_state(run_id: str, study: optuna.Study, metric: str) -> None:
    """Best value, parameters and trial counts on the parent run (tags are updatable)."""
    client = tracking.client()
    counts = trial_counts(study)
    finished = counts["complete"] + counts["pruned"] + counts["fail"]
    for name, count in counts.items():
        client.log_metric(run_id, f"trials_{name}", count, step=finished)
    best = best_trial(study)
    if best is None:
        return
    client.log_metric(run_id, "best_value", float(best.value), step=finished)
    client.set_tag(run_id, "best_trial", str(best.number))
    client.set_tag(run_id, "best_run_id", best.user_attrs.get("mlflow_run_id", ""))
    for name, value in best.params.items():
        client.set_tag(run_id, f"best.{name}", str(value))
    client.log_dict(run_id, {"metric": metric, "value": best.value, "trial": best.number,
                             "params": best.params,
                             "overrides": best.user_attrs.get("overrides", []),
                             "run_id": best.user_attrs.get("mlflow_run_id")}, "best.json")


def log_study_plots(run_id: str, study: optuna.Study) -> None:
    """Optimisation history, intermediate values and parameter importances (PNG), trials CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    client = tracking.client()
    client.log_text(run_id, study.trials_dataframe().to_csv(index=False), "trials.csv")
    figures = [("optimization_history", plots.plot_optimization_history),
               ("intermediate_values", plots.plot_intermediate_values)]
    if trial_counts(study)["complete"] >= 2:  # importances of a single trial are all equal
        figures.append(("param_importances", plots.plot_param_importances))
    for name, plot in figures:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
        except (ValueError, RuntimeError) as error:
            # e.g. importances need two completed trials with a varied parameter
            log.info("no %s plot yet: %s", name, error)
            continue
        figure = getattr(axes, "figure", None) or axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        client.log_figure(run_id, figure, f"plots/{name}.png")
        plt.close(figure)


# -- the best configuration --------------------------------------------------------------------

def main_config_dir() -> Path | None:
    """The folder ``train.py`` reads its configs from (the app's primary config source)."""
    for source in HydraConfig.get().runtime.config_sources:
        if source.provider == "main" and source.schema == "file":
            return Path(source.path).resolve()
    return None


def write_best_experiment(study: optuna.Study, context: TuneContext) -> Path | None:
    """``<tune.best_experiment.dir>/<name>.yaml`` for the best trial (None without one)."""
    best = best_trial(study)
    if best is None:
        return None
    settings = context.cfg.tune.best_experiment
    folder = Path(settings.dir)
    path = folder / f"{settings.name}.yaml"
    command = f"python train.py experiment={settings.name}"
    if main_config_dir() != folder.parent.resolve():
        command = f"python train.py -cd {folder.parent.resolve()} experiment={settings.name}"
    overrides = [*context.base_overrides, *best.user_attrs.get("overrides", [])]
    header = [
        f"Best trial {best.number} of Optuna study '{study.study_name}' "
        f"({context.metric} {best.value:.4f}), written by tune.py on "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}.",
        f"Parameters: {json.dumps(best.params)}",
        f"MLflow run: {best.user_attrs.get('mlflow_run_id')}",
        f"Reproduce: {command}",
    ]
    atomic_write_text(path, experiment_yaml(overrides, context.groups, header))
    return path


def _progress_line(study: optuna.Study, trial: optuna.trial.FrozenTrial, metric: str) -> str:
    state = trial.state.name
    if trial.state == optuna.trial.TrialState.COMPLETE:
        outcome = f"{metric} {trial.value:.4f}"
    elif trial.intermediate_values:
        step = max(trial.intermediate_values)
        outcome = f"step {step}: val/uar {trial.intermediate_values[step]:.4f}"
    else:
        outcome = "no value"
    seconds = trial.duration.total_seconds() if trial.duration else float("nan")
    best = best_trial(study)
    best_text = f"best {best.value:.4f} (trial {best.number})" if best else "no best yet"
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in trial.params.items())
    return (f"[tune] trial {trial.number:>3} {state:<8} {outcome} | {seconds:6.1f} s | "
            f"{best_text} | {params}")


def tune(cfg: DictConfig) -> float:
    """Entry point behind ``tune.py``: run this worker's trials; returns the best value."""
    keep_freed_memory()  # trials reuse the previous batch's memory (allocator.py)
    settings = cfg.tune
    if settings.metric not in METRICS:
        raise ValueError(f"tune.metric must be one of {METRICS}, not '{settings.metric}'")
    if settings.metric.startswith("test/"):
        log.warning("tuning on %s selects hyperparameters on the test speakers; "
                    "val/uar keeps the test set unseen", settings.metric)
    params = load_search_space(cfg.get("search_space"))
    groups = config_groups()
    base_overrides = train_overrides(list(HydraConfig.get().overrides.task),
                                     {p.key for p in params})
    base = compose_train(base_overrides)
    check_search_space(params, base, groups)
    if settings.metric.startswith("val/") and is_refit(str(base.data.split),
                                                        base.data.val_speakers):
        raise ValueError(f"tune.metric={settings.metric} chooses on validation speakers, but "
                         "data.val_speakers=0 (a refit) holds none out: tune with validation "
                         "speakers, then refit the chosen configuration")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    print("search space:\n" + "\n".join(f"  {p.name}: {p.describe()}" for p in params),
          flush=True)

    storage_url = str(settings.storage)
    storage = open_storage(storage_url, settings.heartbeat_interval, settings.grace_period,
                           settings.retry_stale_trials)
    study = optuna.create_study(study_name=settings.study_name, storage=storage,
                                direction="maximize", load_if_exists=True,
                                pruner=build_pruner(cfg))
    study.sampler = build_sampler(cfg, len(study.trials))
    for params_to_try in settings.enqueue or []:
        study.enqueue_trial(OmegaConf.to_container(params_to_try), skip_if_exists=True)
    label = storage_label(storage_url)
    log.info("study '%s' in %s: %d trials so far", study.study_name, label, len(study.trials))

    experiment_id, parent_run_id = None, None
    mlflow_cfg = cfg.logger.get("mlflow") if cfg.get("logger") else None
    if mlflow_cfg is not None:
        experiment_id = tracking.setup_tracking(cfg)
        parent_run_id = study_parent_run(experiment_id, study, label, tracking.run_tags(cfg, extra={
            "optuna_role": "study", "optuna_study": study.study_name, "optuna_storage": label,
            "optuna_metric": settings.metric, "optuna_sampler": str(settings.sampler),
            "optuna_pruner": str(settings.pruner),
            "optuna_search_space": json.dumps([p.describe() for p in params]),
        }))
    context = TuneContext(cfg, params, base_overrides, groups, output_dir, settings.metric,
                          experiment_id, parent_run_id)

    best_written: int | None = None

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # the best configuration is on disk as soon as it is found, even if this worker dies
        nonlocal best_written
        print(_progress_line(study, trial, settings.metric), flush=True)
        if parent_run_id is not None:
            log_study_state(parent_run_id, study, settings.metric)
        best = best_trial(study)
        if best is not None and best.number != best_written:
            best_written = best.number
            write_best_experiment(study, context)

    callbacks = [after_trial]
    n_trials = settings.n_trials
    if settings.max_trials is not None:
        callbacks.append(MaxTrials(settings.max_trials))
        n_trials = min(n_trials or settings.max_trials,
                       max(0, settings.max_trials - counted_trials(study)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the [tune] lines replace Optuna's
    started = time.time()
    status = "FAILED"
    def objective(trial: optuna.Trial) -> float:
        return run_trial(trial, context)

    try:
        if n_trials != 0:
            study.optimize(objective, n_trials=n_trials,
                           timeout=settings.timeout, callbacks=callbacks,
                           catch=(Exception,) if settings.catch_errors else (),
                           show_progress_bar=bool(settings.show_progress_bar))
        if isinstance(storage, optuna.storages.RDBStorage) and \
                storage.get_heartbeat_interval() and settings.retry_stale_trials > 0:
            retry_stale_trials(study, objective, [after_trial], settings.grace_period,
                               settings.heartbeat_interval)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (Lightning exits after either)
        status = "KILLED"
        raise
    finally:
        best_path = write_best_experiment(study, context)
        if parent_run_id is not None:
            log_study_state(parent_run_id, study, settings.metric)
            log_study_plots(parent_run_id, study)
            if best_path is not None:
                tracking.client().log_artifact(parent_run_id, str(best_path), "best_config")
            tracking.client().set_terminated(parent_run_id, status)
        print(_study_summary(study, context, best_path, time.time() - started), flush=True)
    best = best_trial(study)
    return float(best.value) if best is not None else math.nan


def _study_summary(study: optuna.Study, context: TuneContext, best_path: Path | None,
                   seconds: float) -> str:
    counts = trial_counts(study)
    lines = ["", f"=== study '{study.study_name}' ===",
             "trials:      " + ", ".join(f"{n} {k}" for k, n in counts.items()),
             f"this worker: {seconds:.1f} s"]
    best = best_trial(study)
    if best is not None:
        lines += [f"best:        trial {best.number}, {context.metric} {best.value:.4f}",
                  f"params:      {json.dumps(best.params)}"]
    if best_path is not None:
        reproduce = re.search(r"# Reproduce: (.*)", best_path.read_text())
        lines += [f"best config: {best_path}",
                  f"reproduce:   {reproduce.group(1) if reproduce else ''}"]
    if context.parent_run_id:
        lines.append(f"mlflow run:  {context.parent_run_id}")
    return "\n".join(lines)
