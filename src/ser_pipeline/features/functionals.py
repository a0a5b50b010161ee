"""The functionals stream: one vector per utterance, fused beside a deep model's embedding.

``python train.py experiment=cnn_blstm_attn functionals=compare`` gives the data module a second
feature extractor (any of ``conf/feature``: the 6,373 ComParE 2016 functionals, the 544 LLD
functionals of the SVM reference, eGeMAPS' 88) whose output becomes one vector per utterance
(:func:`~ser_pipeline.models.svm.utterance_vector`, as ``model=svm`` summarises it). The vectors
are z-scored with the training utterances' statistics (clipped to +-``clip``), every batch
carries them as ``functionals``, and the model's :class:`~ser_pipeline.models.layers.VectorBranch`
projects them to ``model.net.fusion_dim`` beside its learned embedding: early fusion of what the
functionals + SVM reference sees with the deep encoder.

Level: the waveform is scaled to ``level_dbfs`` RMS before extraction, so a gain change cancels
(exactly, up to clipping and quantisation): energy-related functionals would otherwise carry
the recording level into the heads, which is what a microphone changes first.

Silence: with ``trim_db`` the leading and trailing silence (frames more than ``trim_db`` below the
loudest) is cut first, so that the level and every functional describe the speech, not how much
silence a corpus or a microphone leaves around it (RAVDESS: about a second each side).

The stream is computed from the whole (unaugmented) utterance, once per file (and cached like
the frame features); inference (:class:`~ser_pipeline.inference.Predictor`) repeats the same
steps from what the model directory stores (:meth:`FunctionalsStream.config` and the statistics).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ser_pipeline.audio import set_level, trim_silence
from ser_pipeline.features import build_features
from ser_pipeline.models.svm import utterance_vector


class FunctionalsStream:
    """A second feature extractor turned into z-scored utterance vectors.

    ``summary``: ``functionals`` (8 functionals of every frame row and its delta, for frame
    features such as ``feature=lld``), ``vector`` (the one frame of an extractor that gives
    functionals already, e.g. ``compare_functionals``) or ``auto`` (``vector`` exactly when the
    extractor gives one frame per utterance).
    """

    def __init__(self, extractor: nn.Module, summary: str = "auto",
                 level_dbfs: float | None = -25.0, clip: float = 10.0,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                 trim_db: float | None = None) -> None:
        if summary == "auto":
            summary = "vector" if getattr(extractor, "level", None) == "functionals" else "functionals"
        if summary not in ("functionals", "vector"):
            raise ValueError(f"functionals.summary must be auto, functionals or vector, "
                             f"not {summary!r}")
        self.extractor, self.summary = extractor, summary
        self.level_dbfs = None if level_dbfs is None else float(level_dbfs)
        self.clip = float(clip)
        self.trim_db = None if trim_db is None else float(trim_db)
        self.mean, self.std = mean, std

    @property
    def sample_rate(self) -> int:
        return int(self.extractor.sample_rate)

    def config(self) -> dict[str, Any]:
        """What the vectors depend on (the cache key and the model directory's record)."""
        config = {"extractor": self.extractor.config(), "summary": self.summary,
                  "level_dbfs": self.level_dbfs, "clip": self.clip}
        # recorded only when set, so that caches and model directories written before the
        # option existed keep their meaning (and their cache key)
        if self.trim_db is not None:
            config["trim_db"] = self.trim_db
        return config

    @classmethod
    def from_spec(cls, spec: dict[str, Any], mean: torch.Tensor,
                  std: torch.Tensor) -> FunctionalsStream:
        """Rebuild a fitted stream from :meth:`config` and its stored statistics."""
        options = dict(spec)
        extractor = build_features(options.pop("extractor")).eval()
        return cls(extractor, mean=mean, std=std, **options)

    def raw(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(time,)`` at ``sample_rate`` -> the unnormalised ``(n_inputs,)`` float32 vector."""
        if self.trim_db is not None:
            waveform = trim_silence(waveform, self.sample_rate, self.trim_db)
        with torch.no_grad():
            features = self.extractor(set_level(waveform, self.level_dbfs))
        return torch.from_numpy(utterance_vector(features, self.summary)).float()

    def fit(self, vectors: list[torch.Tensor]) -> None:
        """The z-scoring statistics of the training utterances' ``vectors``."""
        table = torch.stack(vectors).double()
        std = table.std(0, unbiased=False)
        self.mean = table.mean(0).float()
        self.std = torch.where(std > 1e-8, std, torch.ones_like(std)).float()  # constants stay

    @property
    def n_inputs(self) -> int:
        if self.mean is None:
            raise RuntimeError("the functionals stream is not fitted (no statistics)")
        return int(self.mean.numel())

    def normalize(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(..., n_inputs)`` raw vectors -> z-scored with the training statistics, clipped."""
        if self.mean is None or self.std is None:
            raise RuntimeError("the functionals stream is not fitted (no statistics)")
        z = (vectors - self.mean) / self.std
        return z.clamp(-self.clip, self.clip)

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(time,)`` -> the normalised ``(n_inputs,)`` vector a model's fusion branch reads."""
        return self.normalize(self.raw(waveform))
