"""A head for self-supervised encoder features: weighted layer sum -> attention pooling.

With ``encoder=`` (``feature.finetune``) the network runs the encoder itself on the waveform
and fine-tunes it (:class:`~ser_pipeline.models.speech_encoder.SpeechEncoder`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ser_pipeline.models.heads import EmotionHeads
from ser_pipeline.models.layers import fuse, fusion_branch, length_mask
from ser_pipeline.models.pooling import AttentionPooling
from ser_pipeline.models.speech_encoder import SpeechEncoder


class SslAttn(nn.Module):
    """SUPERB-style downstream model on the hidden states of every encoder layer.

    Input ``features (batch, layers, dim, frames)`` (``feature=ssl``: ``in_channels`` is the
    number of layers, ``n_features`` the encoder dimension) with ``lengths (batch,)``. A
    learnable softmax over the layers mixes them into one ``(batch, frames, dim)`` sequence
    (the SUPERB protocol: which layers matter is learnt, the encoder stays frozen), a linear
    projection with ReLU maps each frame to ``projection_dim``, masked attention pooling
    gives the utterance embedding ``(batch, projection_dim)``, then :class:`EmotionHeads`.
    ``fusion_dim > 0`` appends a :class:`~ser_pipeline.models.layers.FunctionalsBranch` vector of the mixed sequence's
    utterance functionals (of the ``dim`` rows: the layer mix, not every layer) to it, or, with a
    functionals stream (``functionals_dim > 0``), a :class:`VectorBranch` of those vectors.

    ``encoder``: fine-tuning (``feature=ssl feature.finetune=true|N``). The input is then the
    waveform ``(batch, 1, 1, samples)`` with ``lengths`` in samples, and ``encoder`` holds the
    :class:`SpeechEncoder` arguments (architecture, layers, what trains: what
    ``SSLFeatures.network_kwargs`` gives); ``in_channels`` / ``n_features`` (1, 1) describe
    that input, the layer count and dimension come from the encoder. Each layer's hidden
    states are layer-normalised over their dimension (no affine), standing in for the
    frozen path's z-scoring with training statistics.
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
        fusion_dropout: float | None = None,
        functionals_dim: int = 0,
        encoder: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = SpeechEncoder(**encoder) if encoder else None
        if self.encoder is not None:
            in_channels, n_features = self.encoder.out_channels, self.encoder.dim
        # zeros: every layer starts with the same weight, 1 / layers
        self.layer_logits = nn.Parameter(torch.zeros(in_channels))
        self.projection = nn.Sequential(nn.Linear(n_features, projection_dim), nn.ReLU(),
                                        nn.Dropout(dropout))
        self.attention = AttentionPooling(projection_dim, attention_dim)
        self.embedding_dim = self.attention.output_dim
        self.fusion = fusion_branch(n_features, fusion_dim, functionals_dim, dropout,
                                    fusion_dropout)
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

    def hidden_states(self, features: torch.Tensor, lengths: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(batch, layers, dim, frames)`` encoder outputs and their lengths: ``features``
        as given, or (``encoder=``) the encoder run on the waveform ``(batch, 1, 1, samples)``."""
        if self.encoder is None:
            return features, lengths
        hidden, frames = self.encoder(features[:, 0, 0], lengths)
        normed = nn.functional.layer_norm(hidden.transpose(-1, -2), (self.encoder.dim,))
        valid = length_mask(frames, hidden.shape[-1])[:, None, None]  # padding stays zero
        return normed.transpose(-1, -2) * valid, frames

    def parameter_groups(self, encoder_lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: the encoder's trainable parameters at ``encoder_lr``, the rest at
        the optimizer's own rate (frozen parameters are left out)."""
        encoder = [p for p in self.encoder.parameters() if p.requires_grad] if self.encoder else []
        in_encoder = {id(p) for p in encoder}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_encoder]
        return [group for group in ({"params": rest}, {"params": encoder, "lr": encoder_lr})
                if group["params"]]

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                functionals: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See :class:`EmotionHeads` for the returned keys and shapes."""
        features, lengths = self.hidden_states(features, lengths)
        embedding = self.encode(features, lengths)
        if self.fusion is None:
            return self.heads(embedding)
        if functionals is not None:
            return self.heads(fuse(embedding, self.fusion, features, lengths, functionals))
        mixed = self.mix_layers(features).unsqueeze(1)  # (batch, 1, dim, frames)
        return self.heads(fuse(embedding, self.fusion, mixed, lengths))
