"""Feature extractors (log-mel, log-mel + deltas, hand-crafted LLDs, pretrained SSL encoders,
openSMILE sets) and their cache."""

from __future__ import annotations

from typing import Any

from torch import nn

from ser_pipeline.features.logmel import LogMelFeatures

KNOWN = ("logmel", "lld", "ssl", "waveform", "opensmile")


def build_features(config: dict[str, Any]) -> nn.Module:
    """Rebuild a feature extractor from its ``config()`` dict (training and inference alike)."""
    options = dict(config)
    name = options.pop("name")
    if name == "logmel":
        return LogMelFeatures(**options)
    if name == "lld":
        from ser_pipeline.features.lld import LLDFeatures

        return LLDFeatures(**options)
    if name == "ssl":
        from ser_pipeline.features.ssl import SSLFeatures

        return SSLFeatures(**options)
    if name == "waveform":  # what a network that fine-tunes its encoder reads (feature.finetune)
        from ser_pipeline.features.ssl import WaveformFeatures

        return WaveformFeatures(**options)
    if name == "opensmile":
        from ser_pipeline.features.opensmile import OpenSmileFeatures

        return OpenSmileFeatures(**options)
    raise ValueError(f"unknown feature extractor '{name}' (known: {', '.join(KNOWN)})")


__all__ = ["LogMelFeatures", "build_features"]
