"""One training run: seed -> data -> model -> fit -> test best -> log -> package.

:func:`train` trains and tests one fold; ``crossval.py`` calls it for every fold and
``experiment.run`` (behind ``train.py``) chooses between the two.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn

from ser_pipeline import reports, tracking
from ser_pipeline.artifact import save_model_dir
from ser_pipeline.callbacks import (
    CheckpointOnInterrupt,
    ReseedEachEpoch,
    StopOnSignal,
    TerminationRequested,
    end_with_launcher,
    report_native_crashes,
)
from ser_pipeline.checkpoint_io import AtomicCheckpointIO
from ser_pipeline.corpora.manifest import DIMENSIONS, GENDERS
from ser_pipeline.data import SERDataModule
from ser_pipeline.metrics import label_scores
from ser_pipeline.module import SERModule
from ser_pipeline.splits import is_refit

log = logging.getLogger(__name__)

#: written into a run's output folder so that a resumed checkpoint can name its original run
RUN_MARKER = "mlflow_run.json"


def build_datamodule(cfg: DictConfig, **overrides: Any) -> SERDataModule:
    """``cfg.data`` with its feature extractor and, when ``functionals=`` names one, the
    functionals stream (``conf/functionals``: a second extractor, one vector per utterance);
    ``overrides``: further arguments (cross-validation's folds read one manifest file)."""
    functionals = cfg.get("functionals")
    return instantiate(cfg.data, features=instantiate(cfg.feature),
                       functionals=instantiate(functionals) if functionals else None,
                       **overrides, _convert_="partial")


#: ``conf/model`` keys that are settings around the module, not :class:`SERModule` arguments:
#: its name, the optimiser values the ``optimizer`` node interpolates, the network's domain
#: switches (:func:`net_kwargs`) and test-time augmentation (applied after testing)
MODULE_SETTINGS = ("name", "lr", "weight_decay", "domain_head", "domain_adversarial",
                   "tta_views")


def net_kwargs(cfg: DictConfig, in_channels: int, n_features: int, n_emotions: int,
               n_domains: int = 0) -> dict[str, Any]:
    """The network's constructor arguments: ``model.net`` plus the sizes known from the data.

    What the model directory stores (``kwargs``), so that inference rebuilds the same network.
    """
    kwargs = OmegaConf.to_container(cfg.model.net, resolve=True)
    kwargs.pop("_target_")
    kwargs.update(in_channels=in_channels, n_features=n_features, n_emotions=n_emotions)
    if cfg.model.get("domain_head", False) and n_domains > 1:
        kwargs.update(n_domains=n_domains,
                      domain_adversarial=bool(cfg.model.get("domain_adversarial", False)))
    return kwargs


def instantiate_net(cfg: DictConfig, kwargs: dict[str, Any]) -> nn.Module:
    """``model.net``'s ``_target_`` built with ``kwargs`` (from :func:`net_kwargs`)."""
    return instantiate({"_target_": cfg.model.net._target_, **kwargs})


def instantiate_module(cfg: DictConfig, net: nn.Module, class_names: list[str],
                       class_counts: list[int] | None = None,
                       domain_names: list[str] | None = None, n_speakers: int = 0) -> SERModule:
    """``instantiate(cfg.model, net=..., ...)``: the config's keys are the module's arguments,
    ``net`` and what the data decides (classes, training class counts, domains, the number of
    training speakers) are passed."""
    arguments = OmegaConf.to_container(cfg.model, resolve=True)  # ${model.lr} & co. resolved
    for key in (*MODULE_SETTINGS, "net"):
        arguments.pop(key, None)
    return instantiate(arguments, net=net, class_names=list(class_names),
                       class_counts=class_counts, domain_names=domain_names,
                       n_speakers=n_speakers, _convert_="all")


def build_module(cfg: DictConfig, datamodule: SERDataModule) -> tuple[SERModule, dict]:
    """The module for ``datamodule`` (set up) and the network kwargs its model directory keeps."""
    n_classes = len(datamodule.classes)
    kwargs = net_kwargs(cfg, datamodule.in_channels, datamodule.n_features, n_classes,
                        len(datamodule.domains))
    if datamodule.functionals_dim:  # the functionals stream's vectors, fused before the heads
        kwargs["functionals_dim"] = datamodule.functionals_dim
    # feature.finetune: the network runs the encoder (architecture, layers, what trains) and
    # starts from its pretrained weights; afterwards they live in the network's state dict
    kwargs.update(getattr(datamodule.extractor, "network_kwargs", dict)())
    if "encoder" in kwargs and cfg.model.name != "ssl_attn":
        raise ValueError(f"feature.finetune runs the encoder inside the network, which "
                         f"model=ssl_attn does; model={cfg.model.name} cannot")
    net = instantiate_net(cfg, kwargs)
    if "encoder" in kwargs:
        net.encoder.load_pretrained(datamodule.extractor.pretrained_encoder)
    if "pretrained_weights" in kwargs:
        # the trained state dict holds the backbone; a rebuilt model must not re-read the file
        kwargs["pretrained_weights"] = None
    counts = datamodule.datasets["train"].emotion.bincount(minlength=n_classes).tolist()
    module = instantiate_module(cfg, net, datamodule.classes, counts, datamodule.domains,
                                len(datamodule.train_speakers))
    return module, kwargs


def _resumed_from(ckpt_path: str | None) -> dict[str, str]:
    if not ckpt_path:
        return {}
    tags = {"resumed_from_checkpoint": str(Path(ckpt_path).resolve())}
    marker = Path(ckpt_path).resolve().parent.parent / RUN_MARKER  # <output_dir>/checkpoints/x
    if marker.exists():
        tags["resumed_from_run"] = json.loads(marker.read_text()).get("run_id", "")
    return tags


def train(cfg: DictConfig, parent_run_id: str | None = None,
          datamodule: SERDataModule | None = None, extra_callbacks: list | None = None,
          extra_tags: dict[str, str] | None = None,
          stop: StopOnSignal | None = None) -> dict[str, Any]:
    """Train and test one fold; returns the summary (run id, metrics, confusion, model dir).

    ``parent_run_id`` nests the MLflow run (cross-validation folds, Optuna trials);
    ``extra_callbacks`` (e.g. an Optuna pruning callback) join the configured ones;
    ``stop`` is the caller's :class:`StopOnSignal` (a cross-validation worker's), so that a
    signal or stop request that came before this fold started stops it before its run exists.
    """
    started = time.time()
    report_native_crashes()  # a crash in native code leaves the Python stacks in the log
    output_dir = Path(cfg.paths.output_dir)
    test_weights(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    experiment_id = tracking.setup_tracking(cfg)
    datamodule = datamodule or build_datamodule(cfg)
    datamodule.setup()
    if cfg.model.get("kind") == "svm":  # the classic reference: no network, no Lightning
        from ser_pipeline.classic import train_svm

        return train_svm(cfg, datamodule, experiment_id, parent_run_id,
                         tracking.run_tags(cfg, datamodule.split, extra_tags))
    module, kwargs = build_module(cfg, datamodule)
    summary = datamodule.summary()
    log.info("data: %s", json.dumps({k: (v if k not in ("train", "val", "test") else
                                         {"utterances": v["utterances"],
                                          "speakers": len(v["speakers"])})
                                     for k, v in summary.items() if k != "skipped_files"}))
    if not datamodule.split.speaker_independent:
        log.warning("split '%s' is SPEAKER-DEPENDENT: test speakers were seen in training",
                    datamodule.split.protocol)

    checkpoint_dir = output_dir / "checkpoints"
    if cfg.get("ckpt_path") and cfg.get("callbacks"):
        # keep checkpointing into the original folder: Lightning restores the best score and
        # best-k bookkeeping only when the folder is unchanged, so the resumed run selects
        # the same best epoch as an uninterrupted one would
        checkpoint_dir = Path(cfg.ckpt_path).resolve().parent
        cfg = copy.deepcopy(cfg)  # the caller's config keeps its own paths
        for name, callback in cfg.callbacks.items():
            if "dirpath" in callback:
                OmegaConf.update(cfg, f"callbacks.{name}.dirpath", str(checkpoint_dir))
    stop = stop or StopOnSignal()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if datamodule.refit:  # nothing validates: drop what watches validation metrics
        callbacks = [c for c in callbacks
                     if not str(getattr(c, "monitor", None) or "").startswith("val/")]
    callbacks += [ReseedEachEpoch(cfg.seed), CheckpointOnInterrupt(str(checkpoint_dir)), stop,
                  *(extra_callbacks or [])]

    trainer = build_trainer(cfg, callbacks, validate=not datamodule.refit)
    end_with_launcher(trainer)
    # Under DDP (trainer=ddp) this function runs once per rank: Lightning's launcher starts
    # ranks 1.. as copies of the command when rank 0 reaches fit, so rank 0 has filled the
    # feature cache above before they read it (ranks started by SLURM / torchrun fill it at
    # once, each entry written atomically). Only global rank 0 creates the MLflow run, logs,
    # writes the model directory and registers; the other ranks train their shard untracked.
    if not trainer.is_global_zero:
        experiment_id = None
    # manifest.csv, split.json
    record = datamodule.write_record(output_dir) if trainer.is_global_zero else []
    with stop:
        stop.check()  # stopped before this fold began: no run is started
        if experiment_id is None:
            return _fit_and_test(cfg, datamodule, module, trainer, None, started, stop)
        mlflow_cfg = tracking.tracking_config(cfg)
        tags = tracking.run_tags(cfg, datamodule.split,
                                 {**_resumed_from(cfg.get("ckpt_path")), **(extra_tags or {})})
        run_name = f"{cfg.model.name}-{datamodule.name}-fold{datamodule.split.fold}"
        with tracking.tracked_run(experiment_id, run_name, tags, parent_run_id) as run:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / RUN_MARKER).write_text(json.dumps(
                {"run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}))
            tracking.log_params(tracking.flatten_config(cfg))
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/train.yaml")
            mlflow.log_dict(summary, "data/summary.json")
            for path in record:
                mlflow.log_artifact(str(path), "data")
            mlflow.log_params({f"data.{part}_utterances": n
                               for part, n in datamodule.part_utterances().items()})
            mlflow.log_param("data.skipped_files", len(datamodule.skipped))
            from pytorch_lightning.loggers import MLFlowLogger

            logger = MLFlowLogger(experiment_name=mlflow_cfg.experiment_name,
                                  tracking_uri=mlflow.get_tracking_uri(),
                                  run_id=run.info.run_id)
            result = _fit_and_test(cfg, datamodule, module, trainer, logger, started, stop)
            result["run_id"] = run.info.run_id
            # a signal from here on waits until the results are logged: the run is complete
            _log_results(cfg, datamodule, module, kwargs, result, output_dir)
        stop.check()  # ...and then stops the caller (e.g. the next cross-validation fold)
    return result


@contextlib.contextmanager
def _sigterm_as_termination() -> Iterator[None]:
    """Lightning's own SIGTERM stop (a ``SystemExit`` with no code, which would read as a clean
    exit and mark the run FINISHED) as the :class:`TerminationRequested` the run ends KILLED on."""
    try:
        yield
    except SIGTERMException as error:  # Lightning's SIGTERM flag, checked between batches
        raise TerminationRequested("SIGTERM received") from error


def interactive() -> bool:
    """True when the console is a terminal (progress bars), False for logs and pipes."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def build_trainer(cfg: DictConfig, callbacks: list, validate: bool = True) -> pl.Trainer:
    """``cfg.trainer`` with ``callbacks``, no logger yet (the MLflow run does not exist yet)
    and atomic checkpoint writes; it knows its DDP rank (``trainer.global_rank``) at once.
    ``validate=False`` (a refit, ``data.val_speakers=0``) runs no validation loop."""
    # a live bar only in a terminal: in CI logs or `> file` the module's one line per epoch
    # (epoch, val/uar, val/wa, val/loss) is the record, not thousands of carriage returns
    progress = bool(cfg.trainer.get("enable_progress_bar", True)) and interactive()
    no_validation = {} if validate else {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    return instantiate(cfg.trainer, callbacks=callbacks, logger=False,
                       plugins=[AtomicCheckpointIO()], enable_progress_bar=progress,
                       **no_validation)


def test_weights(cfg: DictConfig) -> str:
    """``cfg.test_weights``: ``best`` or ``last`` (anything else is refused before training,
    as is ``best`` for a refit, ``data.val_speakers=0``, which has no validation to choose on)."""
    weights = str(cfg.get("test_weights", "best"))
    if weights not in ("best", "last"):
        raise ValueError(f"test_weights must be 'best' or 'last', not {weights!r}")
    data = cfg.get("data")
    if data is not None and is_refit(str(data.get("split", "loso")), data.get("val_speakers", 1)):
        if cfg.get("model") is not None and cfg.model.get("kind") == "svm":
            if str(cfg.model.get("selection", "validation")) != "inner_folds":
                raise ValueError("data.val_speakers=0 leaves model=svm no validation speakers "
                                 "to choose C and gamma on: use model.selection=inner_folds "
                                 "(or keep validation speakers; model.refit=true already "
                                 "refits on them)")
        elif weights != "last":
            raise ValueError("data.val_speakers=0 (refit: every non-test speaker trains) leaves "
                             "no validation speakers to choose the best epoch on: use "
                             "test_weights=last with a fixed epoch budget")
    return weights


def _fit_and_test(cfg: DictConfig, datamodule: SERDataModule, module: SERModule,
                  trainer: pl.Trainer, logger: Any, started: float,
                  stop: StopOnSignal) -> dict[str, Any]:
    if logger is not None:
        trainer.logger = logger
    with _sigterm_as_termination():
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    stop.check()  # a signal during the last epoch's end stops before testing
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    # test_weights=last: the weights training ended with (a fixed epoch budget, averaged
    # weights), so the validation speakers choose nothing; best: the best-validation checkpoint
    weights = test_weights(cfg)
    tested = best if weights == "best" else ""
    # the validation UAR of the weights that are tested and packaged (NaN: a refit, whose
    # validation speakers trained, has none)
    val_uar = module.best_val_uar if weights == "best" else module.last_val_uar
    result: dict[str, Any] = {"run_id": None, "best_checkpoint": best or None,
                              "best_val_uar": float("nan") if datamodule.refit else val_uar,
                              "epochs": trainer.current_epoch}
    if cfg.get("test", True):
        with _sigterm_as_termination():
            trainer.test(module, datamodule=datamodule, ckpt_path=tested or None, verbose=False)
        stop.check()
        result["test"] = dict(module.test_results)
    result["train_seconds"] = time.time() - started
    result["module"] = module
    return result


def test_predictions(datamodule: SERDataModule, module: SERModule) -> dict[str, list]:
    """The last test's utterances: truth, prediction, probabilities, speaker, gender (lists)."""
    rows = datamodule.datasets["test"].rows.set_index("id").loc[module.test_ids]
    probabilities = module.test_probabilities.numpy()
    classes = datamodule.classes
    return {"truth": rows["emotion"].tolist(),
            "predicted": [classes[i] for i in probabilities.argmax(1)],
            "probabilities": probabilities.tolist(),
            "speakers": rows["speaker"].astype(str).tolist(),
            "genders": rows["gender"].fillna("unknown").astype(str).tolist()}


def log_prediction_reports(predictions: dict[str, list], classes: list[str], name: str) -> None:
    """UAR per speaker and gender, reliability diagram and ECE of ``predictions`` (MLflow)."""
    reports.log_test_reports(predictions["truth"], predictions["predicted"],
                             np.asarray(predictions["probabilities"]), classes,
                             predictions["speakers"], predictions["genders"], name=name)


def _log_results(cfg: DictConfig, datamodule: SERDataModule, module: SERModule,
                 kwargs: dict, result: dict[str, Any], output_dir: Path) -> None:
    """Confusion matrices, per-class report, the model artifact and its registration."""
    classes = datamodule.classes
    if module.best_val_confusion is not None:
        tracking.log_confusion(module.best_val_confusion.numpy(), classes, "val_best",
                               f"validation (best epoch, UAR {module.best_val_uar:.3f})")
    if module.test_confusion is not None:
        uar = result["test"]["uar"]
        protocol = ("speaker-independent" if datamodule.split.speaker_independent
                    else "SPEAKER-DEPENDENT")
        tracking.log_confusion(module.test_confusion.numpy(), classes, "test",
                               f"test, {protocol} (UAR {uar:.3f})")
        result["confusion"] = module.test_confusion.tolist()
    if getattr(module, "test_probabilities", None) is not None:
        result["predictions"] = test_predictions(datamodule, module)
        log_prediction_reports(result["predictions"], classes, "test")
    mlflow.log_metric("train_seconds", result["train_seconds"])
    mlflow_cfg = tracking.tracking_config(cfg)
    model_dir = output_dir / "model"
    save_model_dir(model_dir, module.net, kwargs, {
        "features": datamodule.extractor.config(),
        "classes": classes,
        "genders": list(GENDERS),
        "dimensions": list(DIMENSIONS),
        "has_gender": datamodule.has_gender,
        "has_dimensions": datamodule.has_dimensions,
        "normalization": datamodule.normalization,
        "info": {"corpus": datamodule.name, "model": str(cfg.model.name),
                 "run_id": result["run_id"], "split": datamodule.split.summary(),
                 "test_metrics": result.get("test", {})},
    }, datamodule.stats, datamodule.functionals)
    result["model_dir"] = str(model_dir)
    tta = int(cfg.model.get("tta_views") or 1)
    if tta > 1 and "test" in result:
        result["test_tta"] = evaluate_with_tta(model_dir, datamodule, tta)
        mlflow.log_metrics({f"test_tta/{k}": v for k, v in result["test_tta"].items()})
    from ser_pipeline.packaging import publish_model

    result.update(publish_model(model_dir, mlflow_cfg, module.best_val_uar, "test" in result))


def evaluate_with_tta(model_dir: Path, datamodule: SERDataModule, views: int) -> dict[str, float]:
    """Test metrics with test-time augmentation, through the inference path (``Predictor``)."""
    from ser_pipeline.audio import read_audio
    from ser_pipeline.inference import Predictor

    predictor = Predictor.from_dir(model_dir, tta_views=views)
    truth, predicted = [], []
    # one call per test speaker: a speaker-normalised model takes that speaker's statistics
    for _, rows in datamodule.datasets["test"].rows.groupby(["corpus", "speaker"]):
        waveforms = [read_audio(p, predictor.sample_rate) for p in rows["path"]]
        if predictor.speaker_normalized:
            predicted += [r["emotion"] for r in predictor.predict_waveforms(waveforms)]
        else:  # one at a time: no padding, exactly as infer.py sees each file
            predicted += [predictor.predict_waveform(w)["emotion"] for w in waveforms]
        truth += rows["emotion"].tolist()
    return label_scores(truth, predicted)


def print_summary(result: dict[str, Any]) -> None:
    test = result.get("test", {})
    lines = [f"run id:      {result.get('run_id') or '(not tracked)'}"]
    if test:
        lines.append(f"test UAR:    {test['uar']:.4f}")
        lines.append(f"test WA:     {test['wa']:.4f}")
        lines.append(f"test F1:     {test['f1']:.4f}")
    if result.get("registered"):
        lines.append(f"model:       {result['registered']}")
    lines.append(f"time:        {result['train_seconds']:.1f} s")
    print("\n".join(["", "=== summary ===", *lines]), flush=True)
