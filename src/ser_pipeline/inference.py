"""Predictor: a loaded model directory turned into emotion predictions.

The same preprocessing as training (``read_audio`` -> feature extractor ->
normalisation -> padding) with the parameters stored in the model directory. Used by
``infer.py``, the MLflow pyfunc model and benchmarks.

Normalisation is the training split's statistics, or, for a model trained with
``data.normalization=speaker``, the statistics of the speaker being predicted: those
accumulated with :meth:`Predictor.adapt` (``infer.py`` adds every utterance it hears,
so a session is one speaker), else those of the waveforms of one
:meth:`Predictor.predict_waveforms` call (a call is one speaker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ser_pipeline.artifact import LoadedModel, load_model_dir
from ser_pipeline.audio import read_audio
from ser_pipeline.features.batching import (
    FeatureStats,
    RunningStats,
    normalize_utterances,
    pad_batch,
)


class Predictor:
    """Predict emotion (and gender / dimensions where the model has them) for waveforms."""

    def __init__(self, model: LoadedModel, top_k: int = 3, tta_views: int = 1) -> None:
        self.model = model
        self.spec = model.spec
        self.top_k = min(top_k, len(self.spec.classes))
        self.tta_views = tta_views
        self.speaker = RunningStats() if self.speaker_normalized else None

    @classmethod
    def from_dir(cls, directory: str | Path, top_k: int = 3, tta_views: int = 1) -> Predictor:
        return cls(load_model_dir(directory), top_k=top_k, tta_views=tta_views)

    @property
    def sample_rate(self) -> int:
        return self.spec.sample_rate

    @property
    def classes(self) -> list[str]:
        return list(self.spec.classes)

    @property
    def speaker_normalized(self) -> bool:
        return self.spec.normalization == "speaker"

    def adapt(self, waveform: torch.Tensor) -> None:
        """Add a waveform of the current speaker to its statistics (speaker-normalised models)."""
        if self.speaker is not None:
            self.speaker.update(self.model.extractor(waveform))

    def reset_speaker(self) -> None:
        """Forget the statistics gathered with :meth:`adapt` (a new speaker follows)."""
        if self.speaker is not None:
            self.speaker = RunningStats()

    def _stats(self, raw: list[torch.Tensor]) -> FeatureStats:
        """The statistics that normalise ``raw`` features of one speaker."""
        if self.speaker is None:
            return self.model.stats
        if self.speaker.count:
            return self.speaker.stats()
        return FeatureStats.from_features(raw)

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(time,)`` at ``sample_rate`` -> normalised ``(channels, n_features, frames)``."""
        raw = self.model.extractor(waveform)
        return self._normalize([raw])[0]

    def _normalize(self, raw: list[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised features of one speaker's utterances, as in training."""
        mode = self.spec.normalization
        return normalize_utterances(raw, mode, None if mode == "utterance" else self._stats(raw))

    @torch.no_grad()
    def predict_waveforms(self, waveforms: list[torch.Tensor],
                          raw: list[torch.Tensor] | None = None) -> list[dict[str, Any]]:
        """One prediction dict per mono waveform ``(time,)`` at ``sample_rate``.

        ``raw``: their unnormalised features, when the caller has them already.
        """
        outputs = self._outputs(waveforms, raw)
        probabilities = outputs["emotion"]
        results = []
        for i in range(len(waveforms)):
            scores = {c: float(p) for c, p in zip(self.classes, probabilities[i], strict=True)}
            ranked = sorted(scores, key=scores.get, reverse=True)
            result: dict[str, Any] = {
                "emotion": ranked[0],
                "scores": scores,
                "top_k": ranked[: self.top_k],
                "gender": None,
                "valence": None,
                "arousal": None,
                "dominance": None,
            }
            if self.spec.has_gender:
                result["gender"] = self.spec.genders[int(outputs["gender"][i].argmax())]
            if self.spec.has_dimensions:
                for d, name in enumerate(self.spec.dimensions):
                    result[name] = float(outputs["vad"][i, d])
            results.append(result)
        return results

    def _outputs(self, waveforms: list[torch.Tensor], raw: list[torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
        """Network outputs with class probabilities (averaged over TTA views when enabled)."""
        if raw is None:
            raw = [self.model.extractor(w) for w in waveforms]
        if self.tta_views <= 1:
            features, lengths = pad_batch(self._normalize(raw))
            outputs = self._forward(features, lengths, waveforms)
            return {**outputs, "emotion": outputs["emotion"].softmax(-1),
                    "gender": outputs["gender"].softmax(-1)}
        from ser_pipeline.augment import average_predictions, tta_views

        per_view: list[dict[str, torch.Tensor]] = []
        views = [tta_views(w, self.tta_views, generator=0) for w in waveforms]
        for v in range(self.tta_views):
            features, lengths = pad_batch(self._normalize([self.model.extractor(item[v])
                                                           for item in views]))
            outputs = self._forward(features, lengths, [item[v] for item in views])
            per_view.append({k: outputs[k] for k in ("emotion", "gender", "vad")})
        return average_predictions(per_view)

    def _forward(self, features: torch.Tensor, lengths: torch.Tensor,
                 waveforms: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The network on a padded batch; a model with a functionals stream also gets each
        waveform's normalised vector (computed as in training, from the whole waveform)."""
        if self.model.functionals is None:
            return self.model.net(features, lengths)
        vectors = torch.stack([self.model.functionals(w) for w in waveforms])
        return self.model.net(features, lengths, functionals=vectors)

    def predict_waveform(self, waveform: torch.Tensor) -> dict[str, Any]:
        return self.predict_waveforms([waveform])[0]

    def predict_utterance(self, waveform: torch.Tensor) -> dict[str, Any]:
        """The next utterance of a session's one speaker (``infer.py``'s files and microphone).

        A speaker-normalised model first adds it to the speaker statistics, so each prediction
        uses everything heard so far; any other model just predicts it.
        """
        raw = self.model.extractor(waveform)  # once, for the statistics and the prediction
        if self.speaker is not None:
            self.speaker.update(raw)
        return self.predict_waveforms([waveform], [raw])[0]

    def predict_file(self, path: str | Path) -> dict[str, Any]:
        """Whole-file prediction (no segmentation); raises AudioError for bad files."""
        return self.predict_waveform(read_audio(path, self.sample_rate))


class EnsemblePredictor(Predictor):
    """Late fusion: several model directories, their class probabilities averaged.

    Members must share the class list (in order) and the sample rate; each keeps its own
    features, normalisation (and speaker statistics) and TTA views. Gender and dimensions
    are reported only when every member has them. ``infer.py --model A --model B`` and the
    benchmarks use it; one member behaves exactly like that member's :class:`Predictor`.
    """

    def __init__(self, members: list[Predictor]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one model")
        first = members[0]
        for member in members[1:]:
            if member.classes != first.classes or member.sample_rate != first.sample_rate:
                raise ValueError("ensemble members must share classes and sample rate: "
                                 f"{first.classes} @ {first.sample_rate} Hz vs "
                                 f"{member.classes} @ {member.sample_rate} Hz")
        self.members = members
        self.model = first.model
        self.top_k = first.top_k
        self.tta_views = first.tta_views
        self.speaker = None
        from dataclasses import replace

        self.spec = replace(first.spec,
                            has_gender=all(m.spec.has_gender for m in members),
                            has_dimensions=all(m.spec.has_dimensions for m in members))

    @classmethod
    def from_dirs(cls, directories: list[str | Path], top_k: int = 3,
                  tta_views: int = 1) -> Predictor:
        """The predictor of ``directories``, model or ensemble directories (an ensemble's
        members join the others); one model is that model's own :class:`Predictor`."""
        from ser_pipeline.artifact import ensemble_members

        members = [Predictor.from_dir(m, top_k=top_k, tta_views=tta_views)
                   for d in directories for m in ensemble_members(d)]
        return members[0] if len(members) == 1 else cls(members)

    @property
    def speaker_normalized(self) -> bool:
        return any(m.speaker_normalized for m in self.members)

    def adapt(self, waveform: torch.Tensor) -> None:
        for member in self.members:
            member.adapt(waveform)

    def reset_speaker(self) -> None:
        for member in self.members:
            member.reset_speaker()

    def _outputs(self, waveforms: list[torch.Tensor], raw: list[torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
        outputs = [m._outputs(waveforms) for m in self.members]
        return {key: torch.stack([o[key] for o in outputs]).mean(0)
                for key in ("emotion", "gender", "vad")}

    def predict_utterance(self, waveform: torch.Tensor) -> dict[str, Any]:
        for member in self.members:
            if member.speaker is not None:
                member.speaker.update(member.model.extractor(waveform))
        return self.predict_waveforms([waveform])[0]
