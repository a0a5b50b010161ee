"""Every seed model trains by name; multi-corpus training, augmentation and TTA work."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ser_pipeline.training import build_datamodule, train
from tests.e2e import REPO

pytestmark = pytest.mark.slow

SMALL = ["trainer=debug", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
         "data.progress=false"]
SMALL_CORPUS = ["data.reader.n_speakers=4", "data.reader.utterances_per_class=3"]


def config(tmp_path: Path, *overrides: str, small_corpus: bool = True):
    extra = SMALL_CORPUS if small_corpus else []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*SMALL, *extra, *overrides])
    OmegaConf.update(cfg, "paths.root_dir", str(tmp_path))
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "out"))
    return cfg


@pytest.mark.parametrize("model,feature", [
    ("cnn_blstm_attn", "logmel"),
    ("cnn_attn_multitask", "logmel"),
    ("dcnn_blstm_attn", "logmel_deltas"),
    ("blstm_local_attn", "lld"),
])
def test_each_model_trains_and_tests_by_name(tmp_path, model, feature):
    result = train(config(tmp_path, f"model={model}", f"feature={feature}", "logger=none"))
    assert 0.0 <= result["test"]["uar"] <= 1.0
    assert result["epochs"] == 1


def test_multi_corpus_masks_missing_classes_and_reports_each_corpus(tmp_path):
    # a random split puts both corpora in the test set (this test is about masking and reporting)
    cfg = config(tmp_path, "data=multi", "logger=none", "data.split=random",
                 "data.classes=[anger,happiness,neutral,sadness]", small_corpus=False)
    synthetic = {"_target_": "ser_pipeline.corpora.read_synthetic", "_partial_": True,
                 "n_speakers": 4, "utterances_per_class": 3}
    OmegaConf.update(cfg, "data.reader.corpora", {
        "alpha": {"reader": {**synthetic, "emotions": ["anger", "neutral", "sadness"]},
                  "root": str(tmp_path / "alpha"), "label_map": {}},
        "beta": {"reader": {**synthetic, "emotions": ["anger", "happiness", "neutral"], "seed": 1},
                 "root": str(tmp_path / "beta"), "label_map": {}},
    }, merge=False)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    assert datamodule.domains == ["alpha", "beta"]
    batch = next(iter(datamodule.train_dataloader()))
    for domain, mask in zip(batch["domain"].tolist(), batch["class_mask"].tolist(), strict=True):
        lacking = "happiness" if domain == 0 else "sadness"
        assert mask[datamodule.classes.index(lacking)] is False
    OmegaConf.update(cfg, "model.domain_head", True)
    OmegaConf.update(cfg, "model.loss.weights.domain", 0.1)
    result = train(cfg, datamodule=datamodule)
    assert {"uar_alpha", "uar_beta"} <= set(result["test"])
    assert "domain" in result["module"].net(batch["features"], batch["lengths"])


def test_waveform_augmentation_changes_training_features(tmp_path):
    cfg = config(tmp_path, "logger=none",
                 "+data.augment={noise_prob: 1.0, snr_db: [5, 10], shift_prob: 1.0}")
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    dataset = datamodule.datasets["train"]
    first, second = dataset[0]["features"], dataset[0]["features"]
    assert first.shape[:2] == dataset.features[0].shape[:2]
    assert not first.equal(second)  # a fresh augmentation each time
    assert datamodule.datasets["test"][0]["features"].equal(datamodule.datasets["test"][0]["features"])


def test_tta_metrics_are_logged_beside_plain_ones(tmp_path):
    cfg = config(tmp_path, "model.tta_views=3", "logger.mlflow.log_model=false",
                 "logger.mlflow.register=false",
                 f"logger.mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db")
    result = train(cfg)
    assert set(result["test_tta"]) == {"uar", "wa", "f1"}
    assert "top3" in result["test"]


def test_balanced_sampling_draws_rare_classes_as_often_as_common_ones():
    import torch

    from ser_pipeline.data import EpochShuffleSampler, class_balanced_weights

    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    sampler = EpochShuffleSampler(len(labels), seed=0,
                                  weights=class_balanced_weights(labels, 3))
    drawn = []
    for epoch in range(30):
        sampler.set_epoch(epoch)
        drawn.append(labels[list(sampler)])
    counts = torch.cat(drawn).bincount(minlength=3).float()
    assert counts.min() / counts.max() > 0.85
