"""Feature extractors (log-mel, log-mel + deltas, hand-crafted LLDs) and their cache."""

from __future__ import annotations

from typing import Any

from torch import nn

from ser_pipeline.features.logmel import LogMelFeatures


def build_features(config: dict[str, Any]) -> nn.Module:
    """Rebuild a feature extractor from its ``config()`` dict (training and inference alike)."""
    options = dict(config)
    name = options.pop("name")
    if name == "logmel":
        return LogMelFeatures(**options)
    if name == "lld":
        from ser_pipeline.features.lld import LLDFeatures

        return LLDFeatures(**options)
    raise ValueError(f"unknown feature extractor '{name}' (known: logmel, lld)")


__all__ = ["LogMelFeatures", "build_features"]
