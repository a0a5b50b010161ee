"""openSMILE feature sets (eGeMAPS, ComParE, ...) through audEERING's ``opensmile`` package.

``opensmile`` is an optional extra (``pip install -e '.[opensmile]'``): it is licensed under
audEERING's research licence (non-commercial use only), unlike this project (MIT), so nothing
here imports it until an extractor is built.

Two kinds of output, both in the project's feature contract ``(channels=1, n_features, frames)``:

* ``level="lld"`` (``feature=egemaps``): low-level descriptors per frame, 10 ms apart (25 for
  eGeMAPSv02), for the sequence models;
* ``level="functionals"`` (``feature=egemaps_functionals``, ``feature=compare_functionals``):
  one vector per utterance (88 for eGeMAPSv02, 6,373 for ComParE_2016) as a 1-frame sequence,
  for the classic models and fusion.

Clips shorter than ``MIN_SECONDS`` are zero-padded to it (openSMILE fills too-short segments
with NaN), and any value openSMILE leaves undefined becomes 0, so every output is finite.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from ser_pipeline.audio import set_level, trim_silence

log = logging.getLogger(__name__)

LEVELS = {"lld": "LowLevelDescriptors", "lld_deltas": "LowLevelDescriptors_Deltas",
          "functionals": "Functionals"}
#: shorter clips are zero-padded to this (openSMILE needs 0.06 s for its longest window)
MIN_SECONDS = 0.1
#: openSMILE's frame step for the LLD levels of every standard set (10 ms)
FRAME_STEP_SECONDS = 0.01


def import_opensmile():
    """The ``opensmile`` module, or an ImportError saying how to install it and its licence."""
    try:
        import opensmile
    except ImportError as error:
        raise ImportError(
            "openSMILE features need the optional opensmile package: "
            "pip install -e '.[opensmile]' (audEERING's research licence: non-commercial use "
            "only)") from error
    return opensmile


class OpenSmileFeatures(nn.Module):
    """Waveform ``(time,)`` or ``(batch, time)`` -> ``([batch,] 1, n_features, frames)``.

    ``feature_set``: an ``opensmile.FeatureSet`` name (``eGeMAPSv02``, ``ComParE_2016``, ...);
    ``level``: ``lld``, ``lld_deltas`` or ``functionals`` (one frame per utterance).
    ``opensmile_version`` is what :meth:`config` recorded; another installed version only
    warns (its values may differ slightly from the ones a model was trained on).
    ``trim_db``: cut leading/trailing silence more than this below the loudest frame first.
    ``level_dbfs``: then scale the waveform to this RMS (dB re full scale), so that the
    recording level cancels (``model=svm feature=compare_functionals feature.level_dbfs=-25``
    sees what the functionals stream sees); ``None`` keeps the level.
    """

    def __init__(self, feature_set: str = "eGeMAPSv02", level: str = "lld",
                 sample_rate: int = 16000, opensmile_version: str | None = None,
                 trim_db: float | None = None, level_dbfs: float | None = None) -> None:
        super().__init__()
        opensmile = import_opensmile()
        if level not in LEVELS:
            raise ValueError(f"openSMILE level must be one of {sorted(LEVELS)}, not {level!r}")
        if feature_set not in opensmile.FeatureSet.__members__:
            raise ValueError(f"unknown openSMILE feature set {feature_set!r} (known: "
                             f"{', '.join(opensmile.FeatureSet.__members__)})")
        self.feature_set, self.level, self.sample_rate = feature_set, level, int(sample_rate)
        self.trim_db = trim_db
        self.level_dbfs = None if level_dbfs is None else float(level_dbfs)
        self.version = opensmile.__version__
        if opensmile_version is not None and opensmile_version != self.version:
            log.warning("features were made with opensmile %s, this is %s: values may differ",
                        opensmile_version, self.version)
        self.smile = opensmile.Smile(feature_set=opensmile.FeatureSet[feature_set],
                                     feature_level=opensmile.FeatureLevel[LEVELS[level]])

    @property
    def out_channels(self) -> int:
        return 1

    @property
    def n_features(self) -> int:
        return len(self.smile.feature_names)

    @property
    def hop_length(self) -> int:
        """Samples between LLD frames (functionals: one frame however long the clip)."""
        return round(FRAME_STEP_SECONDS * self.sample_rate)

    def feature_names(self) -> list[str]:
        """openSMILE's name for every feature row, in output order."""
        return list(self.smile.feature_names)

    def config(self) -> dict[str, Any]:
        config = {"name": "opensmile", "feature_set": self.feature_set, "level": self.level,
                  "sample_rate": self.sample_rate, "opensmile_version": self.version,
                  "trim_db": self.trim_db}
        if self.level_dbfs is not None:  # only when set, so earlier caches and models keep their key
            config["level_dbfs"] = self.level_dbfs
        return config

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(time,)`` or ``(batch, time)`` -> ``([batch,] 1, n_features, frames)`` float32."""
        if waveform.dim() == 1:
            return self._features(waveform)
        return torch.stack([self._features(item) for item in waveform])

    def _features(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(time,)`` -> ``(1, n_features, frames)``."""
        signal = waveform.detach().to("cpu", torch.float32)
        if self.trim_db is not None:
            signal = trim_silence(signal, self.sample_rate, self.trim_db)
        signal = set_level(signal, self.level_dbfs)
        shortest = round(MIN_SECONDS * self.sample_rate)
        if signal.shape[-1] < shortest:
            signal = nn.functional.pad(signal, (0, shortest - signal.shape[-1]))
        with warnings.catch_warnings():  # "segment too short": handled by the padding above
            warnings.simplefilter("ignore", UserWarning)
            frame = self.smile.process_signal(signal.numpy(), self.sample_rate)
        values = torch.from_numpy(frame.to_numpy(dtype="float32").copy())  # (frames, n)
        return torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).T.unsqueeze(0)
