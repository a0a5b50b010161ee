"""A head for self-supervised encoder features: weighted layer sum -> attention pooling."""

from __future__ import annotations

import torch
from torch import nn

from ser_pipeline.models.heads import EmotionHeads
from ser_pipeline.models.layers import FunctionalsBranch, fuse, length_mask
from ser_pipeline.models.pooling import AttentionPooling


class SslAttn(nn.Module):
    """SUPERB-style downstream model on the hidden states of every encoder layer.

    Input ``features (batch, layers, dim, frames)`` (``feature=ssl``: ``in_channels`` is the
    number of layers, ``n_features`` the encoder dimension) with ``lengths (batch,)``. A
    learnable softmax over the layers mixes them into one ``(batch, frames, dim)`` sequence
    (the SUPERB protocol: which layers matter is learnt, the encoder stays frozen), a linear
    projection with ReLU maps each frame to ``projection_dim``, masked attention pooling
    gives the utterance embedding ``(batch, projection_dim)``, then :class:`EmotionHeads`.
    ``fusion_dim > 0`` appends a :class:`FunctionalsBranch` vector of the mixed sequence's
    utterance functionals (of the ``dim`` rows: the layer mix, not every layer) to it.
    """

    def __init__(
        self,
        in_channels: int,
        n_features: int,
        n_emotions: int,
        n_genders: int = 2,
        n_dims: int = 3,
        n_domains: int = 0,
        domain_adversarial: bool = False,
        projection_dim: int = 256,
        attention_dim: int = 128,
        head_hidden: int = 128,
        dropout: float = 0.3,
        fusion_dim: int = 0,
    ) -> None:
        super().__init__()
        # zeros: every layer starts with the same weight, 1 / layers
        self.layer_logits = nn.Parameter(torch.zeros(in_channels))
        self.projection = nn.Sequential(nn.Linear(n_features, projection_dim), nn.ReLU(),
                                        nn.Dropout(dropout))
        self.attention = AttentionPooling(projection_dim, attention_dim)
        self.embedding_dim = self.attention.output_dim
        self.fusion = FunctionalsBranch(n_features, fusion_dim, dropout) if fusion_dim else None
        self.heads = EmotionHeads(self.embedding_dim + fusion_dim, n_emotions, n_genders, n_dims, n_domains,
                                  domain_adversarial, dropout, hidden_dim=head_hidden)

    def layer_weights(self) -> torch.Tensor:
        """``(layers,)`` mixing weights, summing to 1."""
        return self.layer_logits.softmax(0)

    def mix_layers(self, features: torch.Tensor) -> torch.Tensor:
        """``(batch, layers, dim, frames)`` -> the weighted layer sum ``(batch, dim, frames)``."""
        return torch.einsum("l,bldt->bdt", self.layer_weights().to(features), features)

    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(batch, layers, dim, frames)`` -> embedding ``(batch, projection_dim)``."""
        mixed = self.mix_layers(features).transpose(1, 2)  # (batch, frames, dim)
        return self.attention(self.projection(mixed), length_mask(lengths, features.shape[-1]))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """See :class:`EmotionHeads` for the returned keys and shapes."""
        embedding = self.encode(features, lengths)
        if self.fusion is None:
            return self.heads(embedding)
        mixed = self.mix_layers(features).unsqueeze(1)  # (batch, 1, dim, frames)
        return self.heads(fuse(embedding, self.fusion, mixed, lengths))
