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
        frames = torch.cat(features, dim=-1).double()
        mean = frames.mean(dim=-1, keepdim=True)
        std = frames.std(dim=-1, keepdim=True).clamp_min(1e-5)
        return cls(mean.float(), std.float())

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"feature_mean": self.mean, "feature_std": self.std}


def pad_batch(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of ``(channels, n_features, frames_i)`` -> ``(batch, channels, n_features, max)``
    zero-padded, and ``lengths (batch,)``."""
    lengths = torch.tensor([f.shape[-1] for f in features], dtype=torch.long)
    batch = features[0].new_zeros((len(features), *features[0].shape[:-1], int(lengths.max())))
    for i, item in enumerate(features):
        batch[i, ..., : item.shape[-1]] = item
    return batch, lengths
