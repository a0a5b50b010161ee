"""Masked pooling of a sequence of vectors into one utterance vector."""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Softmax of ``scores`` over ``dim`` where ``mask`` is True; exactly 0 elsewhere.

    ``mask`` broadcasts against ``scores``; every item needs at least one True entry.
    """
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x (batch, steps, dim)`` over the steps where ``mask (batch, steps)`` is True."""
    weights = mask.to(x.dtype)
    return (x * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)


class AttentionPooling(nn.Module):
    """Learned attention weights over steps -> weighted mean per head.

    ``hidden_dim > 0`` scores each step with ``v^T tanh(W h_t + b)`` (additive
    self-attention); ``hidden_dim = 0`` uses the linear score ``u^T h_t`` of Mirsamadi
    et al. (2017, "local attention"). With ``heads > 1`` each head has its own scoring
    vector and the weighted means are concatenated: output ``heads * input_dim``.
    """

    def __init__(self, input_dim: int, hidden_dim: int = 128, heads: int = 1) -> None:
        super().__init__()
        if hidden_dim > 0:
            self.score = nn.Sequential(
                nn.Linear(input_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, heads)
            )
        else:
            # a bias would be the same for every step and cancel in the softmax
            self.score = nn.Linear(input_dim, heads, bias=False)
        self.heads = heads
        self.output_dim = heads * input_dim

    def weights(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(batch, steps, heads)``, summing to 1 over valid steps."""
        return masked_softmax(self.score(x), mask.unsqueeze(-1), dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x (batch, steps, input_dim)``, ``mask (batch, steps)`` -> ``(batch, heads * input_dim)``."""
        alpha = self.weights(x, mask)
        pooled = torch.einsum("bsh,bsd->bhd", alpha, x)
        return pooled.reshape(x.shape[0], self.output_dim)
