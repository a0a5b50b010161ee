"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ser_pipeline.artifact import save_model_dir
from ser_pipeline.features import LogMelFeatures
from ser_pipeline.features.batching import FeatureStats
from ser_pipeline.models import CnnBlstmAttn

TINY_CLASSES = ["anger", "happiness", "neutral", "sadness"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory from an untrained, tiny CnnBlstmAttn (16 log-mels, 16 kHz).

    Statistics are zeros/ones, gender and dimension heads are present; good for
    anything that needs a real, loadable model but not a trained one. Shared by the
    whole session: copy it before changing anything in it.
    """
    torch.manual_seed(0)
    extractor = LogMelFeatures(sample_rate=16000, n_mels=16)
    kwargs = {"in_channels": 1, "n_features": 16, "n_emotions": len(TINY_CLASSES),
              "conv_channels": [4, 8], "lstm_hidden": 8, "lstm_layers": 1, "lstm_dropout": 0.0,
              "attention_dim": 8, "head_hidden": 8}
    stats = FeatureStats(torch.zeros(1, 16, 1), torch.ones(1, 16, 1))
    return save_model_dir(tmp_path_factory.mktemp("tiny_model"), CnnBlstmAttn(**kwargs), kwargs, {
        "features": extractor.config(),
        "classes": TINY_CLASSES,
        "genders": ["female", "male"],
        "dimensions": ["valence", "arousal", "dominance"],
        "has_gender": True,
        "has_dimensions": True,
        "info": {"note": "untrained test model"},
    }, stats)
