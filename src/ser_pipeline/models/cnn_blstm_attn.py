"""CNN -> BLSTM -> attention pooling on log-mels (the default model)."""

from __future__ import annotations

import torch
from torch import nn

from ser_pipeline.models.heads import EmotionHeads
from ser_pipeline.models.layers import (
    BLSTM,
    MaskedConvBlock,
    fuse,
    fusion_branch,
    halve_size,
    length_mask,
    mask_frames,
)
from ser_pipeline.models.pooling import AttentionPooling


class CnnBlstmAttn(nn.Module):
    """Conv blocks, a BLSTM over time, masked self-attention pooling, then task heads.

    Each conv block (3x3 conv, batch norm, ReLU, 2x2 max-pool) halves frequency and
    time; the remaining frequency axis is flattened into the per-frame feature vector
    the BLSTM reads. Input ``features (batch, in_channels, n_features, frames)`` with
    ``lengths (batch,)``; output as :class:`EmotionHeads`, embedding
    ``(batch, 2 * lstm_hidden)``.
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
        conv_channels: list[int] | tuple[int, ...] = (16, 32),
        conv_dropout: float = 0.1,
        lstm_hidden: int = 128,
        lstm_layers: int = 2,
        lstm_dropout: float = 0.2,
        attention_dim: int = 128,
        head_hidden: int = 128,
        dropout: float = 0.3,
        fusion_dim: int = 0,
        fusion_dropout: float | None = None,
        functionals_dim: int = 0,
    ) -> None:
        super().__init__()
        channels = [in_channels, *conv_channels]
        self.conv_blocks = nn.ModuleList(
            MaskedConvBlock(c_in, c_out, dropout=conv_dropout)
            for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
        )
        freq = n_features
        for _ in conv_channels:
            freq = halve_size(freq)
        self.blstm = BLSTM(channels[-1] * freq, lstm_hidden, lstm_layers, lstm_dropout)
        self.attention = AttentionPooling(self.blstm.output_size, attention_dim)
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
        x = mask_frames(features, lengths)  # the padding must be zero for the first conv
        for block in self.conv_blocks:
            x, lengths = block(x, lengths)
        batch, channels, freq, frames = x.shape
        # (batch, frames, channels * freq): one feature vector per (pooled) frame
        sequence = x.permute(0, 3, 1, 2).reshape(batch, frames, channels * freq)
        hidden = self.blstm(sequence, lengths)
        return self.attention(hidden, length_mask(lengths, frames))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                functionals: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See :class:`EmotionHeads` for the returned keys and shapes."""
        return self.heads(fuse(self.encode(features, lengths), self.fusion, features, lengths,
                               functionals))
