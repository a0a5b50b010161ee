"""Task heads shared by every model: one utterance embedding -> emotion, gender, VAD, domain."""

from __future__ import annotations

import torch
from torch import nn

from ser_pipeline.models.layers import GradientReversal


def task_head(input_dim: int, output_dim: int, hidden_dim: int, dropout: float) -> nn.Module:
    """Dropout -> linear (``hidden_dim <= 0``), or dropout -> linear -> ReLU -> dropout -> linear."""
    if hidden_dim <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(input_dim, output_dim))
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(input_dim, hidden_dim),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, output_dim),
    )


class EmotionHeads(nn.Module):
    """A small MLP per task on one shared embedding.

    Outputs (dict): ``"emotion"`` ``(batch, n_emotions)`` logits, ``"gender"``
    ``(batch, n_genders)`` logits, ``"vad"`` ``(batch, n_dims)`` real values,
    ``"embedding"`` the input ``(batch, embedding_dim)``, and ``"domain"``
    ``(batch, n_domains)`` logits only when ``n_domains > 0``. With
    ``domain_adversarial`` the domain head sits behind a gradient-reversal layer
    (``self.gradient_reversal.scale`` can be annealed during training), so minimising
    the domain loss pushes the encoder towards domain-invariant embeddings.
    """

    def __init__(
        self,
        embedding_dim: int,
        n_emotions: int,
        n_genders: int = 2,
        n_dims: int = 3,
        n_domains: int = 0,
        domain_adversarial: bool = False,
        dropout: float = 0.3,
        hidden_dim: int = 128,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim  # what a head on ``"embedding"`` takes (SERModule)
        self.emotion = task_head(embedding_dim, n_emotions, hidden_dim, dropout)
        self.gender = task_head(embedding_dim, n_genders, hidden_dim, dropout)
        self.vad = task_head(embedding_dim, n_dims, hidden_dim, dropout)
        self.domain = task_head(embedding_dim, n_domains, hidden_dim, dropout) if n_domains else None
        self.gradient_reversal = GradientReversal() if domain_adversarial and n_domains else None

    def forward(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(batch, embedding_dim)`` -> dict of head outputs (see class docstring)."""
        outputs = {
            "emotion": self.emotion(embedding),
            "gender": self.gender(embedding),
            "vad": self.vad(embedding),
            "embedding": embedding,
        }
        if self.domain is not None:
            domain_input = embedding
            if self.gradient_reversal is not None:
                domain_input = self.gradient_reversal(embedding)
            outputs["domain"] = self.domain(domain_input)
        return outputs
