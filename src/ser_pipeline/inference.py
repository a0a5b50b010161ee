"""Predictor: a loaded model directory turned into emotion predictions.

The same preprocessing as training (``read_audio`` -> feature extractor ->
training-split normalisation -> padding) with the parameters stored in the
model directory. Used by ``infer.py``, the MLflow pyfunc model and benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ser_pipeline.artifact import LoadedModel, load_model_dir
from ser_pipeline.audio import read_audio
from ser_pipeline.features.batching import pad_batch


class Predictor:
    """Predict emotion (and gender / dimensions where the model has them) for waveforms."""

    def __init__(self, model: LoadedModel, top_k: int = 3, tta_views: int = 1) -> None:
        self.model = model
        self.spec = model.spec
        self.top_k = min(top_k, len(self.spec.classes))
        self.tta_views = tta_views

    @classmethod
    def from_dir(cls, directory: str | Path, top_k: int = 3, tta_views: int = 1) -> Predictor:
        return cls(load_model_dir(directory), top_k=top_k, tta_views=tta_views)

    @property
    def sample_rate(self) -> int:
        return self.spec.sample_rate

    @property
    def classes(self) -> list[str]:
        return list(self.spec.classes)

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(time,)`` at ``sample_rate`` -> normalised ``(channels, n_features, frames)``."""
        return self.model.stats.normalise(self.model.extractor(waveform))

    @torch.no_grad()
    def predict_waveforms(self, waveforms: list[torch.Tensor]) -> list[dict[str, Any]]:
        """One prediction dict per mono waveform ``(time,)`` at ``sample_rate``."""
        outputs = self._outputs(waveforms)
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

    def _outputs(self, waveforms: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Network outputs with class probabilities (averaged over TTA views when enabled)."""
        if self.tta_views <= 1:
            features, lengths = pad_batch([self.features(w) for w in waveforms])
            outputs = self.model.net(features, lengths)
            return {**outputs, "emotion": outputs["emotion"].softmax(-1),
                    "gender": outputs["gender"].softmax(-1)}
        from ser_pipeline.augment import average_predictions, tta_views

        per_view: list[dict[str, torch.Tensor]] = []
        views = [tta_views(w, self.tta_views, generator=0) for w in waveforms]
        for v in range(self.tta_views):
            features, lengths = pad_batch([self.features(item[v]) for item in views])
            outputs = self.model.net(features, lengths)
            per_view.append({k: outputs[k] for k in ("emotion", "gender", "vad")})
        return average_predictions(per_view)

    def predict_waveform(self, waveform: torch.Tensor) -> dict[str, Any]:
        return self.predict_waveforms([waveform])[0]

    def predict_file(self, path: str | Path) -> dict[str, Any]:
        """Whole-file prediction (no segmentation); raises AudioError for bad files."""
        return self.predict_waveform(read_audio(path, self.sample_rate))
