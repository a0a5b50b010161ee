"""BLSTM with local attention on frame-level LLDs (Mirsamadi, Barsoum & Zhang, ICASSP 2017)."""

from __future__ import annotations

import torch
from torch import nn

from ser_pipeline.models.heads import EmotionHeads
from ser_pipeline.models.layers import BLSTM, fuse, fusion_branch, length_mask
from ser_pipeline.models.pooling import AttentionPooling


class BlstmLocalAttn(nn.Module):
    """Frame-level dense layers -> BLSTM -> local attention -> task heads.

    Local attention weights frame ``t`` by ``softmax_t(u^T h_t)`` over the valid frames
    and takes the weighted mean of the BLSTM outputs ``h_t``. Input ``features
    (batch, in_channels, n_features, frames)`` (channels and features are flattened
    into one vector per frame; for LLDs ``in_channels=1``, ``n_features=34``) and
    ``lengths (batch,)``; embedding ``(batch, 2 * lstm_hidden)``.
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
        frame_dims: list[int] | tuple[int, ...] = (256, 256),
        lstm_hidden: int = 128,
        lstm_layers: int = 1,
        lstm_dropout: float = 0.0,
        head_hidden: int = 128,
        dropout: float = 0.3,
        fusion_dim: int = 0,
        fusion_dropout: float | None = None,
        functionals_dim: int = 0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels * n_features
        for frame_dim in frame_dims:
            layers += [nn.Linear(width, frame_dim), nn.ReLU(), nn.Dropout(dropout)]
            width = frame_dim
        self.frame_layers = nn.Sequential(*layers)
        self.blstm = BLSTM(width, lstm_hidden, lstm_layers, lstm_dropout)
        self.attention = AttentionPooling(self.blstm.output_size, hidden_dim=0)
        self.embedding_dim = self.attention.output_dim
        self.fusion = fusion_branch(in_channels * n_features, fusion_dim, functionals_dim, dropout,
                                    fusion_dropout)
        self.heads = EmotionHeads(
            self.embedding_dim + fusion_dim,
            n_emotions,
            n_genders,
            n_dims,
            n_domains,
            domain_adversarial,
            dropout,
            hidden_dim=head_hidden,
        )

    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(batch, in_channels, n_features, frames)`` -> embedding ``(batch, embedding_dim)``."""
        batch, channels, n_features, frames = features.shape
        # dense layers act on each frame alone, so padded frames never mix into valid
        # ones; the length-aware BLSTM and the masked softmax then ignore them
        x = features.permute(0, 3, 1, 2).reshape(batch, frames, channels * n_features)
        hidden = self.blstm(self.frame_layers(x), lengths)
        return self.attention(hidden, length_mask(lengths, frames))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                functionals: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See :class:`EmotionHeads` for the returned keys and shapes."""
        return self.heads(fuse(self.encode(features, lengths), self.fusion, features, lengths,
                               functionals))
