"""Data augmentation for training and test-time augmentation (TTA).

Three levels, each a pure function plus (where it has settings) a thin ``nn.Module``:

* waveform, ``(time,)`` or ``(batch, time)``: :func:`add_noise`, :func:`speed_perturb`,
  :func:`time_shift`, bundled by :class:`WaveAugment` (applied to single, unpadded
  waveforms in the dataset, before feature extraction);
* features, ``(batch, channels, n_features, frames)`` with ``lengths (batch,)``:
  :class:`SpecAugment` and :func:`mixup` (applied to padded batches in the
  ``LightningModule``);
* inference: :func:`tta_views` makes augmented copies of one waveform and
  :func:`average_predictions` merges the model outputs for them.

Every function keeps its input's shape and dtype and draws randomness only from the
``generator`` it is given (a ``torch.Generator``, an ``int`` seed, or ``None`` for
torch's global generator, which ``seed_everything`` seeds), so runs are reproducible.
The modules are the identity in eval mode, so validation and test see clean data.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torchaudio
from torch import nn

EPS = 1e-10
CLASSIFICATION_HEADS = ("emotion", "gender", "domain")

Seed = torch.Generator | int | None


def as_generator(seed: Seed) -> torch.Generator | None:
    """An ``int`` becomes a freshly seeded CPU generator; generators and ``None`` pass through."""
    if isinstance(seed, int):
        return torch.Generator().manual_seed(seed)
    return seed


def _device(generator: torch.Generator | None) -> torch.device | None:
    """Random numbers must be drawn on their generator's device (CPU for ``None``)."""
    return generator.device if generator is not None else None


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """``U[0, 1)`` samples on the generator's device."""
    return torch.rand(shape, generator=generator, device=_device(generator))


def _uniform_between(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(_uniform((1,), generator))


def _happens(probability: float, generator: torch.Generator | None) -> bool:
    return float(_uniform((1,), generator)) < probability


# --------------------------------------------------------------------------- waveform level


def add_noise(
    wave: torch.Tensor,
    snr_db: float | torch.Tensor,
    noise: torch.Tensor | None = None,
    generator: Seed = None,
) -> torch.Tensor:
    """Add noise at an exact signal-to-noise ratio.

    ``wave`` ``(time,)`` or ``(batch, time)``; ``snr_db`` a float or ``(batch,)``.
    ``noise`` defaults to white Gaussian noise; supplied noise ``(time',)`` or
    ``(batch, time')`` is tiled or cropped to ``time``. The noise is scaled so that
    ``10 log10(mean(wave**2) / mean(scaled_noise**2)) == snr_db`` per row; powers are
    over the whole row, so call this before padding. A silent row stays silent.
    """
    generator = as_generator(generator)
    num_samples = wave.shape[-1]
    if noise is None:
        noise = torch.randn(wave.shape, generator=generator, device=_device(generator))
    else:
        repeats = -(-num_samples // noise.shape[-1])  # ceil division
        noise = noise.tile(repeats)[..., :num_samples]
        noise = noise.expand(wave.shape)
    noise = noise.to(device=wave.device, dtype=wave.dtype)
    snr_db = torch.as_tensor(snr_db, dtype=wave.dtype, device=wave.device)
    if snr_db.dim() == 1:
        snr_db = snr_db.unsqueeze(-1)  # (batch, 1) broadcasts over time
    signal_power = wave.pow(2).mean(-1, keepdim=True)
    noise_power = noise.pow(2).mean(-1, keepdim=True).clamp_min(EPS)
    scale = torch.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return wave + scale * noise


def speed_perturb(wave: torch.Tensor, factor: float, sample_rate: int) -> torch.Tensor:
    """Play ``wave`` ``factor`` times faster (tempo and pitch), keeping its length.

    ``(..., time) -> (..., time)``. The signal is treated as if recorded at
    ``sample_rate * factor`` and resampled to ``sample_rate`` (Kaldi-style speed
    perturbation), so a tone of ``f`` Hz becomes ``factor * f`` Hz and the content
    lasts ``1 / factor`` as long. The result is cropped (``factor < 1``) or zero-padded
    at the end (``factor > 1``) back to ``time`` samples. ``factor`` is rounded to a
    multiple of ``1 / sample_rate``; resampling is cheap when ``sample_rate * factor``
    and ``sample_rate`` share a large divisor (0.9, 1.1: 9/10, 11/10).
    """
    if factor <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    orig_freq = round(sample_rate * factor)
    if orig_freq == sample_rate:
        return wave.clone()
    resampled = torchaudio.functional.resample(wave, orig_freq, sample_rate)
    num_samples = wave.shape[-1]
    if resampled.shape[-1] >= num_samples:
        return resampled[..., :num_samples]
    return nn.functional.pad(resampled, (0, num_samples - resampled.shape[-1]))


def time_shift(
    wave: torch.Tensor, max_shift: int, generator: Seed = None, roll: bool = True
) -> torch.Tensor:
    """Shift each row by a random whole number of samples in ``[-max_shift, max_shift]``.

    ``(time,)`` or ``(batch, time)``, same shape out; each row gets its own shift.
    ``roll=True`` wraps the samples pushed off one end round to the other (nothing is
    lost); ``roll=False`` drops them and fills the gap with zeros.
    """
    generator = as_generator(generator)
    rows = wave.reshape(-1, wave.shape[-1])
    num_samples = rows.shape[-1]
    shifts = torch.floor(_uniform((rows.shape[0], 1), generator) * (2 * max_shift + 1)) - max_shift
    # output sample i reads input sample i - shift
    source = torch.arange(num_samples, device=shifts.device) - shifts.long()
    inside = (source >= 0) & (source < num_samples)
    source = source.remainder(num_samples).to(wave.device)
    shifted = rows.gather(-1, source)
    if not roll:
        shifted = shifted * inside.to(device=wave.device, dtype=wave.dtype)
    return shifted.reshape(wave.shape)


class WaveAugment(nn.Module):
    """Random speed perturbation, time shift, gain and additive noise, each with a probability.

    ``forward(wave, generator=None)`` takes ``(time,)`` or ``(batch, time)`` (rows
    augmented independently) and applies, in this order: speed perturbation with a
    factor drawn from the discrete set ``speeds`` (like Kaldi's 0.9/1.0/1.1), a roll
    by up to ``max_shift_s`` seconds, a gain drawn uniformly from ``gain_db`` (a quieter or
    louder microphone; clipped to [-1, 1] like a real converter), then white noise at an SNR
    drawn uniformly from ``snr_db`` (last, so the SNR holds for the final signal). Identity
    in eval mode.
    """

    def __init__(
        self,
        noise_prob: float = 0.0,
        snr_db: tuple[float, float] = (10.0, 30.0),
        speed_prob: float = 0.0,
        speeds: Sequence[float] = (0.9, 1.1),
        shift_prob: float = 0.0,
        max_shift_s: float = 0.1,
        gain_prob: float = 0.0,
        gain_db: tuple[float, float] = (-20.0, 10.0),
        sample_rate: int = 16000,
    ) -> None:
        super().__init__()
        if not speeds:
            raise ValueError("speeds must name at least one factor")
        self.noise_prob, self.snr_db = noise_prob, tuple(snr_db)
        self.speed_prob, self.speeds = speed_prob, tuple(speeds)
        self.shift_prob, self.max_shift_s, self.sample_rate = shift_prob, max_shift_s, sample_rate
        self.gain_prob, self.gain_db = gain_prob, tuple(gain_db)

    def forward(self, wave: torch.Tensor, generator: Seed = None) -> torch.Tensor:
        """``(time,)`` or ``(batch, time)`` -> same shape and dtype."""
        if not self.training:
            return wave
        generator = as_generator(generator)
        if wave.dim() == 2:
            return torch.stack([self(row, generator) for row in wave])
        if _happens(self.speed_prob, generator):
            choice = int(_uniform((1,), generator) * len(self.speeds))
            wave = speed_perturb(wave, self.speeds[choice], self.sample_rate)
        if _happens(self.shift_prob, generator):
            wave = time_shift(wave, round(self.max_shift_s * self.sample_rate), generator)
        if _happens(self.gain_prob, generator):
            gain = 10.0 ** (_uniform_between(*self.gain_db, generator) / 20.0)
            wave = (wave * gain).clamp(-1.0, 1.0)
        if _happens(self.noise_prob, generator):
            snr = _uniform_between(*self.snr_db, generator)
            wave = add_noise(wave, snr, generator=generator)
        return wave


# --------------------------------------------------------------------------- feature level


def _random_bands(
    n_masks: int,
    max_width: int,
    extent: torch.Tensor,
    size: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Boolean ``(batch, size)``: ``n_masks`` random bands per row, each inside ``[0, extent)``.

    ``extent (batch,)`` limits where bands may fall (an item's valid frames); widths are
    uniform in ``0..min(max_width, extent)``, starts uniform over the positions that fit.
    """
    batch = extent.shape[0]
    extent = extent.to("cpu", torch.float64).unsqueeze(-1)  # (batch, 1)
    widest = extent.clamp(max=max_width)
    width = torch.floor(_uniform((batch, n_masks), generator).cpu().double() * (widest + 1))
    start = torch.floor(_uniform((batch, n_masks), generator).cpu().double() * (extent - width + 1))
    position = torch.arange(size, dtype=torch.float64)
    inside = (position >= start.unsqueeze(-1)) & (position < (start + width).unsqueeze(-1))
    return inside.any(dim=1)


class SpecAugment(nn.Module):
    """Frequency and time masking on padded batches (Park et al., 2019; no time warping).

    ``forward(features (batch, channels, n_features, frames), lengths (batch,) | None,
    generator=None)`` masks ``freq_masks`` bands of up to ``freq_width`` feature rows and
    ``time_masks`` bands of up to ``time_width`` frames per item, all channels alike.
    Time masks fall only inside each item's first ``lengths[i]`` frames, so padding is
    never counted as masked content. Masked cells get ``mask_value``, or with ``None``
    the item's mean over its valid frames per channel (a neutral value whatever the
    feature scale, e.g. dB log-mels). Identity in eval mode.
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 8,
        time_masks: int = 2,
        time_width: int = 20,
        mask_value: float | None = None,
    ) -> None:
        super().__init__()
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.mask_value = mask_value

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor | None = None, generator: Seed = None
    ) -> torch.Tensor:
        """``(batch, channels, n_features, frames)`` -> same shape, with masked bands."""
        if not self.training:
            return features
        generator = as_generator(generator)
        batch, _, n_features, n_frames = features.shape
        if lengths is None:
            lengths = torch.full((batch,), n_frames)
        freq_mask = _random_bands(
            self.freq_masks,
            self.freq_width,
            torch.full((batch,), n_features),
            n_features,
            generator,
        )
        time_mask = _random_bands(self.time_masks, self.time_width, lengths, n_frames, generator)
        masked = (freq_mask[:, None, :, None] | time_mask[:, None, None, :]).to(features.device)
        return features.masked_fill(masked, 0.0) + masked * self._fill(features, lengths)

    def _fill(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mask value, broadcastable to ``features``: a scalar or ``(batch, channels, 1, 1)``."""
        if self.mask_value is not None:
            return torch.tensor(self.mask_value, dtype=features.dtype, device=features.device)
        valid = torch.arange(features.shape[-1], device=features.device) < lengths.to(
            features.device
        ).unsqueeze(-1)
        valid = valid[:, None, None, :].to(features.dtype)  # (batch, 1, 1, frames)
        total = (features * valid).sum(dim=(-2, -1), keepdim=True)
        count = valid.sum(dim=(-2, -1), keepdim=True).clamp_min(1) * features.shape[-2]
        return total / count


class MixupBatch(NamedTuple):
    """What :func:`mixup` returns; ``features``/``targets`` are the mixed tensors."""

    features: torch.Tensor
    targets: torch.Tensor | dict[str, torch.Tensor]
    lam: float
    permutation: torch.Tensor
    lengths: torch.Tensor | None


def mixup(
    features: torch.Tensor,
    targets_onehot: torch.Tensor | Mapping[str, torch.Tensor],
    alpha: float,
    generator: Seed = None,
    lengths: torch.Tensor | None = None,
) -> MixupBatch:
    """Mix each item with a random partner (Zhang et al., 2018).

    ``features (batch, ...)``; ``targets_onehot`` a float ``(batch, classes)`` tensor of
    one-hot (or soft) targets, or a dict of such tensors (e.g. per head; ``vad`` values
    ``(batch, 3)`` mix the same way). With ``lam ~ Beta(alpha, alpha)``, one per batch,
    and ``permutation`` a random permutation of the batch:
    ``mixed = lam * x + (1 - lam) * x[permutation]`` for features and targets alike, so
    one-hot targets become soft targets that still sum to 1.

    Lengths: the mixture of a short item with a long one contains the long one's
    frames (mixed with the short one's padding), so the mixed length is the max of
    the pair, ``max(lengths, lengths[permutation])``, returned as ``lengths``.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be positive, got {alpha}")
    generator = as_generator(generator)
    # torch's Beta sampler takes no generator: seed a numpy one from the torch generator
    seed = int(torch.randint(2**62, (1,), generator=generator, device=_device(generator)))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    permutation = torch.randperm(features.shape[0], generator=generator, device=_device(generator))
    permutation = permutation.to(features.device)

    def mix(x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError("mixup needs float (one-hot or soft) targets, not class indices")
        return lam * x + (1.0 - lam) * x[permutation.to(x.device)]

    if isinstance(targets_onehot, Mapping):
        targets: torch.Tensor | dict[str, torch.Tensor] = {
            name: mix(value) for name, value in targets_onehot.items()
        }
    else:
        targets = mix(targets_onehot)
    mixed_lengths = None
    if lengths is not None:
        mixed_lengths = torch.maximum(lengths, lengths[permutation.to(lengths.device)])
    return MixupBatch(mix(features), targets, lam, permutation, mixed_lengths)


# --------------------------------------------------------------------------- test time


def tta_views(
    wave: torch.Tensor,
    n_views: int,
    generator: Seed = None,
    snr_db: tuple[float, float] = (20.0, 40.0),
    max_shift: int = 1600,
) -> list[torch.Tensor]:
    """``n_views`` copies of ``wave`` ``(time,)`` or ``(batch, time)`` for test-time augmentation.

    View 0 is ``wave`` itself, unchanged. Each other view is rolled by up to
    ``max_shift`` samples (0.1 s at 16 kHz) and gets white noise at an SNR drawn
    uniformly from ``snr_db``: mild changes that should not alter the emotion.
    Run the model on each view and merge with :func:`average_predictions`.
    """
    if n_views < 1:
        raise ValueError(f"n_views must be at least 1, got {n_views}")
    generator = as_generator(generator)
    views = [wave]
    for _ in range(n_views - 1):
        view = time_shift(wave, max_shift, generator)
        views.append(add_noise(view, _uniform_between(*snr_db, generator), generator=generator))
    return views


def average_predictions(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    classification_heads: Collection[str] = CLASSIFICATION_HEADS,
) -> dict[str, torch.Tensor]:
    """Merge model outputs for several views of the same input.

    ``predictions`` holds one dict per view with the same keys and shapes, e.g.
    ``{"emotion": (batch, n_emotions) logits, "vad": (batch, 3) values}``. Keys in
    ``classification_heads`` are turned into softmax probabilities before averaging, so
    the result for them is **probabilities**, not logits (averaging logits would let
    one over-confident view dominate). Every other key (``vad``) is averaged as is.
    """
    if not predictions:
        raise ValueError("need at least one prediction to average")
    keys = set(predictions[0])
    if any(set(p) != keys for p in predictions):
        raise ValueError("all predictions must have the same keys")
    merged = {}
    for key in predictions[0]:
        values = torch.stack([p[key] for p in predictions])
        if key in classification_heads:
            values = values.softmax(dim=-1)
        merged[key] = values.mean(dim=0)
    return merged
