"""Every config the README names composes and instantiates, without reading any audio.

Like lightning-hydra-template's ``tests/test_configs.py``: a recipe, corpus or model/feature
pair that no longer fits the code fails here, in seconds, not after an hour of training.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from ser_pipeline.features import EXTRACTORS, build_features, extractor_class
from ser_pipeline.module import SERModule
from ser_pipeline.training import instantiate_module, instantiate_net, net_kwargs

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
CORPORA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
#: the model/feature pairs the README names (its model table and feature sections)
PAIRS = [("cnn_blstm_attn", "logmel"), ("cnn_attn_multitask", "logmel"),
         ("dcnn_blstm_attn", "logmel_deltas"), ("blstm_local_attn", "lld"),
         ("blstm_local_attn", "egemaps"), ("svm", "lld"), ("svm", "egemaps_functionals"),
         ("svm", "compare_functionals"), ("ssl_attn", "ssl"), ("cnn_blstm_attn", "lld")]
NEEDS = {"egemaps": "opensmile", "egemaps_functionals": "opensmile",
         "compare_functionals": "opensmile"}


def composed(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path))
    return cfg


def build_module(cfg, n_classes: int = 4):
    """The module of ``cfg`` (its network sized for ``cfg.feature``), as training builds it
    but with class names and counts made up: no corpus is read. None for the svm."""
    if cfg.model.get("kind") == "svm":
        return None
    if cfg.feature.get("_target_", "").endswith("SSLFeatures"):
        in_channels, n_features = 3, 32  # a tiny encoder's (layers, dim): no weights here
    else:
        extractor = instantiate(cfg.feature)
        in_channels, n_features = extractor.out_channels, extractor.n_features
    net = instantiate_net(cfg, net_kwargs(cfg, in_channels, n_features, n_classes))
    classes = [f"class{i}" for i in range(n_classes)]
    return instantiate_module(cfg, net, classes, class_counts=[10] * n_classes)


@pytest.mark.parametrize("corpus", ["emodb", "ravdess", "synthetic"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_recipe_composes_on_every_shared_corpus_and_builds_its_model(experiment, corpus,
                                                                           tmp_path):
    cfg = composed([f"experiment={experiment}", f"data={corpus}"], tmp_path)
    assert cfg.data.name == corpus  # a recipe never pins a corpus
    assert cfg.model.name == experiment
    if cfg.model.get("kind") == "svm":  # no network: classic.train_svm fits it
        assert cfg.model.selection in ("validation", "inner_folds")
        if importlib.util.find_spec("opensmile") is None:
            pytest.skip("the svm recipe's ComParE features need the opensmile extra")
        assert instantiate(cfg.feature).config()["level_dbfs"] == cfg.feature.level_dbfs
        return
    module = build_module(cfg, len(cfg.data.classes))
    assert isinstance(module, SERModule)
    assert module.configure_optimizers() is not None  # the optimiser factory fits the net
    datamodule = instantiate(cfg.data, features=instantiate(cfg.feature), _convert_="partial")
    assert datamodule.normalization == cfg.data.normalization


@pytest.mark.parametrize("corpus", CORPORA)
def test_every_corpus_config_builds_its_data_module(corpus, tmp_path):
    overrides = [f"data={corpus}"]
    if corpus == "manifest":
        overrides.append(f"data.manifest={tmp_path / 'labels.csv'}")
    cfg = composed(overrides, tmp_path)
    datamodule = instantiate(cfg.data, features=instantiate(cfg.feature), _convert_="partial")
    assert datamodule.name == cfg.data.name
    assert callable(datamodule.reader)


@pytest.mark.parametrize(("model", "feature"), PAIRS)
def test_every_model_feature_pair_the_readme_names_builds(model, feature, tmp_path):
    if feature in NEEDS and importlib.util.find_spec(NEEDS[feature]) is None:
        pytest.skip(f"feature={feature} needs the optional '{NEEDS[feature]}' extra")
    cfg = composed([f"model={model}", f"feature={feature}"], tmp_path)
    module = build_module(cfg)
    assert (module is None) == (model == "svm")


def test_sweeps_and_tuning_optimise_the_same_validation_metric(tmp_path):
    cfg = composed([], tmp_path)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        tune = compose("tune")
    # neither may choose hyperparameters on the test speakers
    assert cfg.optimized_metric == tune.tune.metric == "val/uar"


#: command-line overrides of the module's settings that the README, recipes and benchmarks use
MODULE_OVERRIDES = [
    ["model.loss.class_weights=balanced"],
    ["model.loss.class_weights=[1.0,2.0,1.0,0.5]"],
    ["model.loss.weighting=uncertainty", "model.loss.label_smoothing=0.1"],
    ["model=cnn_attn_multitask", "model.mixup_alpha=0.2", "model.tta_views=5"],
    ["model.spec_augment={_target_:ser_pipeline.augment.SpecAugment}"],
    ["model.lr=3e-4", "model.weight_decay=0.0",
     "model.scheduler={_target_:torch.optim.lr_scheduler.OneCycleLR,_partial_:true,"
     "max_lr:0.003,total_steps:60}"],
    ["data=multi", "model.domain_head=true", "model.loss.weights.domain=0.1",
     "model.domain_adversarial=true"],
]


@pytest.mark.parametrize("overrides", MODULE_OVERRIDES, ids=lambda o: o[-1].split("=")[0])
def test_module_settings_given_on_the_command_line_reach_the_module(overrides, tmp_path):
    cfg = composed(overrides, tmp_path)
    module = build_module(cfg)
    assert module.optimizer_factory.keywords["lr"] == cfg.model.lr
    assert module.label_smoothing == cfg.model.loss.label_smoothing
    assert module.loss_weights["domain"] == cfg.model.loss.weights.domain
    assert (module.uncertainty is not None) == (cfg.model.loss.weighting == "uncertainty")
    assert module.mixup_alpha == cfg.model.mixup_alpha
    assert (module.spec_augment is not None) == (cfg.model.spec_augment is not None)
    assert (module.scheduler_factory is not None) == (cfg.model.scheduler is not None)
    if cfg.model.loss.class_weights is not None:
        expected = ([1.0] * 4 if cfg.model.loss.class_weights == "balanced"  # equal counts
                    else list(cfg.model.loss.class_weights))
        assert module.class_weights.tolist() == expected


def test_a_loss_setting_that_does_not_exist_is_refused_by_name(tmp_path):
    cfg = composed(["model.loss.weighting=learned"], tmp_path)
    with pytest.raises(Exception, match="weighting must be 'fixed' or 'uncertainty'"):
        build_module(cfg)


@pytest.mark.parametrize("feature", sorted(p.stem for p in (CONF / "feature").glob("*.yaml")))
def test_every_feature_config_names_a_registered_extractor_that_rebuilds_from_its_record(
        feature, tmp_path):
    """conf/feature's ``_target_`` and the model directory's record reach the same class."""
    cfg = composed([f"feature={feature}"], tmp_path)
    target = get_class(cfg.feature._target_)
    assert target in {extractor_class(name) for name in EXTRACTORS}
    if target.__name__ == "SSLFeatures" or (feature in NEEDS and
                                           importlib.util.find_spec(NEEDS[feature]) is None):
        return  # building it needs encoder weights / the optional opensmile extra
    extractor = instantiate(cfg.feature)
    record = extractor.config()
    assert extractor_class(record["name"]) is target
    assert build_features(record).config() == record
