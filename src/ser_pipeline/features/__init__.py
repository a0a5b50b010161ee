"""Feature extractors (log-mel, log-mel + deltas, hand-crafted LLDs, pretrained SSL encoders,
openSMILE sets) and their cache."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ser_pipeline.features.logmel import LogMelFeatures

#: Every feature extractor by the ``name`` its ``config()`` records: the classes that
#: ``conf/feature/*.yaml`` name as ``_target_``, and the only ones a model directory may ask
#: for (an allow-list: a stored config never names an arbitrary class). Imported on use, so
#: optional dependencies (opensmile, an SSL encoder) load only for the extractor that needs them.
EXTRACTORS: dict[str, str] = {
    "logmel": "ser_pipeline.features.logmel.LogMelFeatures",
    "lld": "ser_pipeline.features.lld.LLDFeatures",
    "ssl": "ser_pipeline.features.ssl.SSLFeatures",
    # what a network that fine-tunes its encoder reads (feature.finetune)
    "waveform": "ser_pipeline.features.ssl.WaveformFeatures",
    "opensmile": "ser_pipeline.features.opensmile.OpenSmileFeatures",
}


def extractor_class(name: str) -> type[nn.Module]:
    """The extractor class registered as ``name`` (see :data:`EXTRACTORS`)."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor '{name}' (known: {', '.join(EXTRACTORS)})")
    module, _, cls = EXTRACTORS[name].rpartition(".")
    return getattr(importlib.import_module(module), cls)


def build_features(config: dict[str, Any]) -> nn.Module:
    """Rebuild a feature extractor from its ``config()`` dict (training and inference alike)."""
    options = dict(config)
    return extractor_class(options.pop("name"))(**options)


__all__ = ["EXTRACTORS", "LogMelFeatures", "build_features", "extractor_class"]
