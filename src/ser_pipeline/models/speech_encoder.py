"""A pretrained speech encoder (wav2vec 2.0 / HuBERT / WavLM) inside a network, to fine-tune.

``feature=ssl feature.finetune=...`` makes the encoder part of the network: the feature
stage yields the waveform (``features.ssl.WaveformFeatures``) and :class:`SpeechEncoder`
turns it into the hidden states the frozen path would have cached, with gradients where
the encoder trains. The architecture comes from torchaudio's builders (``builder`` +
``kwargs``, plain values kept in ``model.yaml``); the weights are loaded once from the
pretrained encoder (:meth:`SpeechEncoder.load_pretrained`) and afterwards live in the
network's state dict (the model directory's ``weights.safetensors``).

Gradient checkpointing: torchaudio's ``Transformer`` has no switch for it (its layer loop
calls every layer directly), so :meth:`SpeechEncoder.forward` walks torchaudio's pieces
itself (convolutional feature extractor, ``Encoder._preprocess``, ``Transformer._preprocess``,
then each layer) and wraps each trainable layer in :func:`torch.utils.checkpoint.checkpoint`.
Walking the layers itself also runs the frozen layers below the trainable ones without
gradients, so they keep no activations for the backward pass. Layer drop is not applied
(as in torchaudio's own ``extract_features``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ser_pipeline.features.ssl import BUILDERS
from ser_pipeline.models.layers import length_mask

#: stage numbers for "needs gradients from here on": 0 = convolutional feature extractor,
#: 1 = feature projection + positional convolution, 2 + i = transformer layer i (0-based)
_CNN, _FRONT, _FIRST_LAYER = 0, 1, 2


class SpeechEncoder(nn.Module):
    """Waveforms ``(batch, samples)`` + ``lengths`` -> hidden states ``(batch, layers, dim, frames)``.

    ``layers``: transformer layer numbers returned (1 = first layer's output); layers above
    the highest are not run. ``finetune``: ``True`` trains every layer that runs plus the
    feature projection and positional convolution; an integer ``N`` trains only the top
    ``N`` of the layers that run (everything below stays frozen). ``finetune_cnn`` also trains
    the convolutional feature extractor (frozen by default, the usual practice).
    ``normalize_waveform``: each waveform layer-normalised over its own samples first (what
    torchaudio's large bundles do). Frozen parts have ``requires_grad=False``, run without
    gradients and stay in eval mode (no dropout) while the network trains.

    In eval mode the items of a batch run one at a time over their own samples, so a
    prediction never depends on the padding of the batch it came in (the first
    convolution's group norm would see it): validation and test give exactly what
    inference gives for each file alone. Training batches run padded, with ``lengths``
    masking the attention.
    """

    def __init__(
        self,
        builder: str,
        kwargs: dict,
        layers: list[int],
        finetune: bool | int = True,
        finetune_cnn: bool = False,
        gradient_checkpointing: bool = True,
        normalize_waveform: bool = False,
    ) -> None:
        super().__init__()
        if builder not in BUILDERS:
            raise ValueError(f"encoder builder {builder!r} is not one of {sorted(BUILDERS)}")
        self.model = BUILDERS[builder](**kwargs)
        transformer = self.model.encoder.transformer
        self.layers = [int(i) for i in layers]
        n_layers = len(transformer.layers)
        if not self.layers or not all(1 <= i <= n_layers for i in self.layers):
            raise ValueError(f"encoder layers must be numbers in 1..{n_layers}, not {layers}")
        self.depth = max(self.layers)
        if finetune is True:
            self.first_trainable = 0
        elif isinstance(finetune, int) and not isinstance(finetune, bool) \
                and 1 <= finetune <= self.depth:
            self.first_trainable = self.depth - finetune
        else:
            raise ValueError(f"feature.finetune must be true or a number of top layers in "
                             f"1..{self.depth} (the layers that run), not {finetune!r}")
        self.finetune, self.finetune_cnn = finetune, bool(finetune_cnn)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.normalize_waveform = bool(normalize_waveform)
        # WavLM's attention takes padding as a key mask (and refuses torchaudio's additive
        # attention mask, so torchaudio's own batched extract_features fails for it)
        self._key_padding = builder == "wavlm_model"
        self.dim = self.model.encoder.feature_projection.projection.out_features
        if self.finetune_cnn:
            self._grad_from = _CNN
        elif self.first_trainable == 0:
            self._grad_from = _FRONT
        else:
            self._grad_from = _FIRST_LAYER + self.first_trainable
        self.model.requires_grad_(False)
        for module in self.trainable_modules():
            module.requires_grad_(True)

    @property
    def out_channels(self) -> int:
        return len(self.layers)

    def trainable_modules(self) -> list[nn.Module]:
        """The parts of the encoder that train (everything else is frozen)."""
        encoder = self.model.encoder
        transformer = encoder.transformer
        modules: list[nn.Module] = list(transformer.layers[self.first_trainable:self.depth])
        if self.first_trainable == 0:
            modules += [encoder.feature_projection, transformer.pos_conv_embed,
                        transformer.dropout]
            if transformer.layer_norm_first:  # used before the layers only in this case
                modules.append(transformer.layer_norm)
        if self.finetune_cnn:
            modules.append(self.model.feature_extractor)
        return modules

    def load_pretrained(self, model: nn.Module) -> None:
        """Copy the weights of a torchaudio ``Wav2Vec2Model`` of the same architecture."""
        self.model.load_state_dict(model.state_dict())

    def train(self, mode: bool = True) -> SpeechEncoder:
        super().train(mode)
        if mode:  # frozen parts stay in eval mode: no dropout where nothing learns
            self.model.eval()
            for module in self.trainable_modules():
                module.train()
        return self

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, samples)``, ``(batch,)`` valid samples -> ``(batch, layers, dim, frames)``
        float32 zero-padded after each item's frames, and those frames ``(batch,)``."""
        if lengths is None:
            lengths = torch.full((waveform.shape[0],), waveform.shape[1], dtype=torch.long,
                                 device=waveform.device)
        if self.training:
            return self._hidden_states(waveform, lengths)
        items = [self._hidden_states(waveform[i : i + 1, : int(lengths[i])], None)[0][0]
                 for i in range(waveform.shape[0])]
        frames = torch.tensor([item.shape[-1] for item in items], device=waveform.device)
        hidden = items[0].new_zeros((len(items), *items[0].shape[:-1], int(frames.max())))
        for i, item in enumerate(items):
            hidden[i, ..., : item.shape[-1]] = item
        return hidden, frames

    def _hidden_states(self, waveform: torch.Tensor, lengths: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """torchaudio's ``extract_features`` walked stage by stage (see the module docstring)."""
        grad = torch.is_grad_enabled()
        model, transformer = self.model, self.model.encoder.transformer
        if self.normalize_waveform:
            waveform = _normalize_each(waveform, lengths)
        with torch.set_grad_enabled(grad and self._grad_from <= _CNN):
            x, frames = model.feature_extractor(waveform, lengths)
        with torch.set_grad_enabled(grad and self._grad_from <= _FRONT):
            x, mask = model.encoder._preprocess(x, frames)
            x = transformer._preprocess(x)
        padding = None
        if self._key_padding and frames is not None:  # (batch, frames): -10000 on padding,
            # additive like torchaudio's attention mask (a bool one would warn beside the
            # float position bias)
            pads = ~length_mask(frames, x.shape[1])
            mask, padding = None, x.new_zeros(pads.shape).masked_fill(pads, -10000.0)
        hidden, position_bias = [], None
        for i, layer in enumerate(transformer.layers[: self.depth]):
            trains = grad and self._grad_from <= _FIRST_LAYER + i
            with torch.set_grad_enabled(trains):
                if trains and self.training and self.gradient_checkpointing:
                    x, position_bias = checkpoint(layer, x, mask, position_bias,
                                                  padding, use_reentrant=False)
                else:
                    x, position_bias = layer(x, mask, position_bias, padding)
            hidden.append(x)
        if frames is None:
            frames = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        stacked = torch.stack([hidden[i - 1] for i in self.layers], 1)  # (batch, L, frames, dim)
        return stacked.transpose(-1, -2), frames


def _normalize_each(waveform: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Each ``(batch, samples)`` row layer-normalised over its valid samples (padding stays 0)."""
    if lengths is None:
        return nn.functional.layer_norm(waveform, waveform.shape[-1:])
    valid = torch.arange(waveform.shape[-1], device=waveform.device) < lengths[:, None]
    count = lengths[:, None].to(waveform.dtype)
    mean = (waveform * valid).sum(-1, keepdim=True) / count
    variance = ((waveform - mean).pow(2) * valid).sum(-1, keepdim=True) / count
    return (waveform - mean) / (variance + 1e-5).sqrt() * valid
