"""Every config the README names composes and instantiates, without reading any audio.

Like lightning-hydra-template's ``tests/test_configs.py``: a recipe, corpus or model/feature
pair that no longer fits the code fails here, in seconds, not after an hour of training.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

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


def build_net(cfg, n_classes: int = 4):
    """The network of ``cfg`` for the sizes its feature extractor gives (the svm has none)."""
    if cfg.model.get("kind") == "svm":
        return None
    if cfg.feature.get("_target_", "").endswith("SSLFeatures"):
        in_channels, n_features = 3, 32  # a tiny encoder's (layers, dim): no weights here
    else:
        extractor = instantiate(cfg.feature)
        in_channels, n_features = extractor.out_channels, extractor.n_features
    kwargs = OmegaConf.to_container(cfg.model.net, resolve=True)
    target = kwargs.pop("_target_")
    return instantiate({"_target_": target, **kwargs, "in_channels": in_channels,
                        "n_features": n_features, "n_emotions": n_classes})


@pytest.mark.parametrize("corpus", ["emodb", "ravdess", "synthetic"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_recipe_composes_on_every_shared_corpus_and_builds_its_model(experiment, corpus,
                                                                           tmp_path):
    cfg = composed([f"experiment={experiment}", f"data={corpus}"], tmp_path)
    assert cfg.data.name == corpus  # a recipe never pins a corpus
    assert cfg.model.name == experiment
    assert build_net(cfg, len(cfg.data.classes)) is not None
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
    net = build_net(cfg)
    assert (net is None) == (model == "svm")


def test_sweeps_and_tuning_optimise_the_same_validation_metric(tmp_path):
    cfg = composed([], tmp_path)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        tune = compose("tune")
    # neither may choose hyperparameters on the test speakers
    assert cfg.optimized_metric == tune.tune.metric == "val/uar"
