"""Deep CNN with channel attention and attention pooling over the time x frequency map."""

from __future__ import annotations

import torch
from torch import nn

from ser_pipeline.models.heads import EmotionHeads
from ser_pipeline.models.layers import (
    MaskedConvBlock,
    fuse,
    fusion_branch,
    halve_size,
    length_mask,
    mask_frames,
)
from ser_pipeline.models.pooling import AttentionPooling


class CnnAttnMultitask(nn.Module):
    """Conv blocks with squeeze-excitation, multi-head attention pooling over (freq, time).

    Every block is 3x3 conv, batch norm, ReLU, channel attention (masked squeeze) and,
    for the first ``pooled_blocks`` blocks, a 2x2 max-pool. The last feature map
    ``(batch, C, F', T')`` is read as ``F' * T'`` positions of ``C``-dim vectors; a
    learned per-frequency-row embedding is added so the pooling can tell low bands
    from high ones, and ``attention_heads`` heads pool the valid positions. A linear
    layer projects the concatenated heads to ``embedding_dim``.
    Input ``features (batch, in_channels, n_features, frames)``, ``lengths (batch,)``.
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
        conv_channels: list[int] | tuple[int, ...] = (16, 32, 64, 128),
        pooled_blocks: int = 4,
        conv_dropout: float = 0.1,
        attention_dim: int = 64,
        attention_heads: int = 4,
        embedding_dim: int = 256,
        head_hidden: int = 128,
        dropout: float = 0.3,
        fusion_dim: int = 0,
        fusion_dropout: float | None = None,
        functionals_dim: int = 0,
    ) -> None:
        super().__init__()
        channels = [in_channels, *conv_channels]
        self.conv_blocks = nn.ModuleList(
            MaskedConvBlock(
                c_in, c_out, dropout=conv_dropout, squeeze_excitation=True, pool=i < pooled_blocks
            )
            for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True))
        )
        freq = n_features
        for _ in range(min(pooled_blocks, len(conv_channels))):
            freq = halve_size(freq)
        self.frequency_embedding = nn.Parameter(torch.zeros(freq, channels[-1]))
        self.attention = AttentionPooling(channels[-1], attention_dim, heads=attention_heads)
        self.project = nn.Sequential(nn.Linear(self.attention.output_dim, embedding_dim), nn.ReLU())
        self.embedding_dim = embedding_dim
        self.fusion = fusion_branch(in_channels * n_features, fusion_dim, functionals_dim, dropout,
                                    fusion_dropout)
        self.heads = EmotionHeads(
            embedding_dim + fusion_dim,
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
        # positions ordered (frames, freq) so a frame's mask repeats over its freq rows
        positions = x.permute(0, 3, 2, 1) + self.frequency_embedding
        positions = positions.reshape(batch, frames * freq, channels)
        mask = length_mask(lengths, frames).repeat_interleave(freq, dim=1)
        return self.project(self.attention(positions, mask))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                functionals: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See :class:`EmotionHeads` for the returned keys and shapes."""
        return self.heads(fuse(self.encode(features, lengths), self.fusion, features, lengths,
                               functionals))
