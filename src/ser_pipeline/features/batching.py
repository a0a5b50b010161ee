"""Normalisation and padding: the two steps training and inference share after extraction.

Kept apart from ``data.py`` (which imports Lightning) so that inference loads fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FeatureStats:
    """Per (channel, feature) mean and std over all training frames, stored with the model."""

    mean: torch.Tensor  # (channels, n_features, 1)
    std: torch.Tensor  # (channels, n_features, 1)

    @classmethod
    def from_features(cls, features: list[torch.Tensor]) -> FeatureStats:
        """Statistics over every frame of ``features`` (each ``(channels, n_features, frames)``)."""
        running = RunningStats()
        for item in features:
            running.update(item)
        return running.stats()

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    @classmethod
    def of_utterance(cls, features: torch.Tensor) -> FeatureStats:
        """One utterance's own per (channel, feature) statistics over its frames."""
        return cls.from_features([features])

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"feature_mean": self.mean, "feature_std": self.std}


class RunningStats:
    """Frame statistics accumulated as features arrive (sums in float64).

    Training uses it once over a set of utterances; a speaker-normalised model at inference
    keeps one per speaker and adds every utterance it hears (``Predictor.adapt``).
    """

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        """Add the frames of one ``(channels, n_features, frames)`` tensor."""
        frames = features.detach().double()
        total, total_sq = frames.sum(-1, keepdim=True), frames.pow(2).sum(-1, keepdim=True)
        if self.total is None or self.total_sq is None:
            self.total, self.total_sq = total, total_sq
        else:
            self.total, self.total_sq = self.total + total, self.total_sq + total_sq
        self.count += frames.shape[-1]

    def stats(self) -> FeatureStats:
        """Mean and (unbiased) std of every frame added so far."""
        if self.total is None or self.total_sq is None or self.count == 0:
            raise ValueError("no frames to compute statistics from")
        mean = self.total / self.count
        variance = (self.total_sq - self.count * mean.pow(2)) / max(self.count - 1, 1)
        std = variance.clamp_min(0).sqrt().clamp_min(1e-5)
        return FeatureStats(mean.float(), std.float())


def remove_level(features: torch.Tensor) -> torch.Tensor:
    """``(channels, n_features, frames)`` minus each channel's mean over features and frames.

    For log features a gain change adds one constant to every value, so this removes the
    recording level exactly while keeping the spectral envelope and every row's dynamics
    (which per-utterance z-scoring would flatten).
    """
    return features - features.mean(dim=(-2, -1), keepdim=True)


def normalize_utterances(raw: list[torch.Tensor], mode: str,
                         stats: FeatureStats | None) -> list[torch.Tensor]:
    """Normalise ``raw`` features as a model trained with ``data.normalization=mode`` expects.

    ``utterance``: every item z-scored with its own statistics (inductive; a gain change is an
    additive shift of log features, so it cancels). ``level``: :func:`remove_level`, then the
    training statistics ``stats`` (inductive, level-invariant). Otherwise every item uses ``stats``
    (training speakers' for ``global``, the speaker's own for ``speaker``).
    """
    if mode == "utterance":
        return [FeatureStats.of_utterance(r).normalize(r) for r in raw]
    if mode == "level" and stats is not None:  # the level removed, then training statistics
        return [stats.normalize(remove_level(r)) for r in raw]
    if stats is None:
        raise ValueError(f"normalisation '{mode}' needs statistics")
    return [stats.normalize(r) for r in raw]


def pad_batch(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of ``(channels, n_features, frames_i)`` -> ``(batch, channels, n_features, max)``
    zero-padded, and ``lengths (batch,)``."""
    lengths = torch.tensor([f.shape[-1] for f in features], dtype=torch.long)
    batch = features[0].new_zeros((len(features), *features[0].shape[:-1], int(lengths.max())))
    for i, item in enumerate(features):
        batch[i, ..., : item.shape[-1]] = item
    return batch, lengths
