"""Log-mel spectrograms (optionally with deltas) on torchaudio.

Every feature extractor in ``ser_pipeline.features`` follows one calling
convention, so the data module, the cache and inference treat them alike:

* ``extractor(waveform)`` with ``waveform`` of shape ``(time,)`` (mono float32 at
  ``extractor.sample_rate``) returns ``(channels, n_features, frames)``;
* ``extractor.out_channels`` and ``extractor.n_features`` give those sizes;
* ``extractor.config()`` returns a JSON-able dict that rebuilds the extractor
  through :func:`ser_pipeline.features.build_features` and keys the feature cache.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

from ser_pipeline.audio import trim_silence


def frames_for(num_samples: int, hop_length: int) -> int:
    """Frames a centred STFT produces for ``num_samples`` samples."""
    return num_samples // hop_length + 1


def pad_for_stft(waveform: torch.Tensor, n_fft: int) -> torch.Tensor:
    """``(..., time)`` ready for a centred, reflect-padded STFT: at least 2 samples required,
    clips of at most ``n_fft // 2`` samples zero-padded (reflection needs more than that).

    Every extractor calls this, so all of them give the same frame count for a clip.
    """
    if waveform.shape[-1] < 2:
        raise ValueError("waveform needs at least 2 samples")
    if waveform.shape[-1] <= n_fft // 2:
        waveform = nn.functional.pad(waveform, (0, n_fft // 2 + 1 - waveform.shape[-1]))
    return waveform


class LogMelFeatures(nn.Module):
    """Waveform ``(time,)`` -> log-mel ``(channels, n_mels, frames)``.

    ``deltas=True`` stacks static, delta and delta-delta as 3 channels (the
    DCNN-BLSTMwA input); otherwise 1 channel.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        win_length: int = 400,
        hop_length: int = 160,
        n_mels: int = 64,
        f_min: float = 20.0,
        f_max: float | None = 8000.0,
        top_db: float | None = 80.0,
        deltas: bool = False,
        delta_win_length: int = 5,
        trim_db: float | None = None,
        amin: float = 1e-20,
    ) -> None:
        super().__init__()
        # the power floor before the log. torchaudio's AmplitudeToDB fixes it at 1e-10
        # (-100 dB, absolute): a quiet recording's silence then sits on that floor instead of
        # top_db below its own peak, so turning the gain down changes the features' shape, not
        # only their level. 1e-20 keeps the floor relative (top_db) for any level float32 holds
        self.amin = amin
        # leading/trailing silence cut before extraction (dB below the loudest frame)
        self.trim_db = trim_db
        self.sample_rate, self.n_fft, self.win_length = sample_rate, n_fft, win_length
        self.hop_length, self.n_mels, self.f_min, self.f_max = hop_length, n_mels, f_min, f_max
        self.top_db, self.deltas, self.delta_win_length = top_db, deltas, delta_win_length
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            win_length=win_length,
            hop_length=hop_length,
            f_min=f_min,
            f_max=f_max,
            n_mels=n_mels,
            power=2.0,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        )
        self.compute_deltas = torchaudio.transforms.ComputeDeltas(win_length=delta_win_length)

    @property
    def out_channels(self) -> int:
        return 3 if self.deltas else 1

    @property
    def n_features(self) -> int:
        return self.n_mels

    def config(self) -> dict:
        return {
            "name": "logmel",
            "trim_db": self.trim_db,
            "sample_rate": self.sample_rate,
            "n_fft": self.n_fft,
            "win_length": self.win_length,
            "hop_length": self.hop_length,
            "n_mels": self.n_mels,
            "f_min": self.f_min,
            "f_max": self.f_max,
            "top_db": self.top_db,
            "deltas": self.deltas,
            "delta_win_length": self.delta_win_length,
            "amin": self.amin,
        }

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(time,)`` or ``(batch, time)`` -> ``([batch,] channels, n_mels, frames)``."""
        if self.trim_db is not None:
            waveform = trim_silence(waveform, self.sample_rate, self.trim_db)
        waveform = pad_for_stft(waveform, self.n_fft)
        # (..., 1, n_mels, frames): amplitude_to_DB floors top_db below the max over the last
        # three dims, so the singleton channel keeps that floor per item, not per batch
        logmel = torchaudio.functional.amplitude_to_DB(
            self.mel(waveform).unsqueeze(-3), multiplier=10.0, amin=self.amin, db_multiplier=0.0,
            top_db=self.top_db).squeeze(-3)
        if not self.deltas:
            return logmel.unsqueeze(-3)
        delta = self.compute_deltas(logmel)
        delta2 = self.compute_deltas(delta)
        return torch.stack([logmel, delta, delta2], dim=-3)
