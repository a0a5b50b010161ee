"""Plain ``nn.Module`` models: an encoder to one utterance embedding, then :class:`EmotionHeads`.

Every model takes ``in_channels``, ``n_features``, ``n_emotions``, ``n_genders``,
``n_dims``, ``n_domains`` and ``domain_adversarial`` plus its own hyperparameters,
and maps ``forward(features (batch, channels, n_features, frames), lengths (batch,))``
to a dict with ``"emotion"``, ``"gender"``, ``"vad"``, ``"embedding"`` and, when
``n_domains > 0``, ``"domain"``. Outputs do not depend on how much padding a batch
adds (eval mode).
"""

from __future__ import annotations

from torch import nn

from ser_pipeline.models.blstm_local_attn import BlstmLocalAttn
from ser_pipeline.models.cnn_attn_multitask import CnnAttnMultitask
from ser_pipeline.models.cnn_blstm_attn import CnnBlstmAttn
from ser_pipeline.models.dcnn_blstm_attn import DcnnBlstmAttn
from ser_pipeline.models.heads import EmotionHeads
from ser_pipeline.models.ssl_attn import SslAttn

MODELS: dict[str, type[nn.Module]] = {
    "cnn_blstm_attn": CnnBlstmAttn,
    "cnn_attn_multitask": CnnAttnMultitask,
    "dcnn_blstm_attn": DcnnBlstmAttn,
    "blstm_local_attn": BlstmLocalAttn,
    "ssl_attn": SslAttn,
}

__all__ = [
    "MODELS",
    "BlstmLocalAttn",
    "CnnAttnMultitask",
    "CnnBlstmAttn",
    "DcnnBlstmAttn",
    "EmotionHeads",
    "SslAttn",
]
