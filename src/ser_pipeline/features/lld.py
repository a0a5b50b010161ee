"""Hand-crafted frame-level descriptors (LLDs): the classic 34-dim short-term set.

The set and its order follow pyAudioAnalysis' short-term features, computed for
every frame of the same centred STFT that :class:`~ser_pipeline.features.LogMelFeatures`
uses (``frames = num_samples // hop_length + 1``), so LLD and log-mel frames line up:

===== =====================  ==============================================================
row   feature                definition (per frame)
===== =====================  ==============================================================
0     zero-crossing rate     sign changes per sample of the raw frame, ``[0, 1]``
1     energy                 mean of the squared raw samples
2     entropy of energy      entropy (bits) of the energy shares of 10 equal sub-frames
3     spectral centroid      magnitude-weighted mean frequency, divided by Nyquist
4     spectral spread        magnitude-weighted std of frequency around the centroid / Nyquist
5     spectral entropy       entropy (bits) of the power shares of 10 equal sub-bands
6     spectral flux          squared change of the sum-normalised magnitude spectrum
                             from the previous frame (0 for the first frame)
7     spectral roll-off      frequency below which 90 % of the power lies, / Nyquist
8-20  MFCC 1-13              DCT-II (ortho) of the log (dB) slaney mel power spectrum
21-32 chroma C..B            share of the frame's power in each pitch class (C first)
33    chroma deviation       standard deviation of the 12 chroma values
===== =====================  ==============================================================

Time-domain rows (0-2) use the raw samples under the analysis window (a rectangular
window of ``win_length`` samples, as pyAudioAnalysis does); spectral rows use the
Hann-windowed STFT magnitude. Every ratio has an ``EPS`` guard, so silence gives
finite values. The MFCCs are *not* clipped with a ``top_db`` relative to the loudest
frame: each frame's features depend on that frame only, so a batch gives the same
values as its items one by one.

The rows have very different scales (ratios in ``[0, 1]``, entropies up to
``log2(10)``, MFCCs in tens of dB), so standardise each row before a model sees it.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

from ser_pipeline.audio import trim_silence
from ser_pipeline.features.logmel import pad_for_stft

EPS = 1e-10
ENTROPY_BLOCKS = 10
ROLLOFF_FRACTION = 0.90
# C0 in Hz (A4 = 440 Hz is 57 semitones above it), so chroma bin 0 is C and bin 9 is A.
C0_HZ = 440.0 * 2.0 ** (-57 / 12)
# The DC bin carries no pitch, so chroma ignores bins below this.
CHROMA_MIN_HZ = 20.0
LLD_SCALAR_NAMES = (
    "zero_crossing_rate",
    "energy",
    "energy_entropy",
    "spectral_centroid",
    "spectral_spread",
    "spectral_entropy",
    "spectral_flux",
    "spectral_rolloff",
)


def frame_signal(
    waveform: torch.Tensor, n_fft: int, win_length: int, hop_length: int
) -> torch.Tensor:
    """Raw analysis frames matching a centred, reflect-padded ``torch.stft``.

    ``(..., time)`` -> ``(..., frames, win_length)``: frame ``t`` holds the samples the
    STFT's ``win_length`` window covers (it sits centred inside the ``n_fft`` frame).
    """
    batch_shape = waveform.shape[:-1]
    flat = waveform.reshape(-1, 1, waveform.shape[-1])
    padded = nn.functional.pad(flat, (n_fft // 2, n_fft // 2), mode="reflect").squeeze(1)
    offset = (n_fft - win_length) // 2
    frames = padded.unfold(-1, n_fft, hop_length)[..., offset : offset + win_length]
    return frames.reshape(*batch_shape, frames.shape[-2], win_length)


def block_matrix(size: int, n_blocks: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(size, n_blocks)`` 0/1 matrix assigning ``size`` items to contiguous, near-equal blocks.

    ``x @ block_matrix(...)`` sums the last axis of ``x`` per block without a Python loop,
    and (unlike pyAudioAnalysis' truncation) drops no samples or bins.
    """
    block_of = torch.arange(size) * n_blocks // size
    return nn.functional.one_hot(block_of, n_blocks).to(dtype)


def share_entropy(parts: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of the shares ``parts / parts.sum(-1)``: ``(..., n) -> (...)``."""
    shares = parts / (parts.sum(-1, keepdim=True) + EPS)
    return -(shares * torch.log2(shares + EPS)).sum(-1)


def zero_crossing_rate(frames: torch.Tensor) -> torch.Tensor:
    """Sign changes per sample: ``(..., win_length) -> (...)``.

    A sine of frequency ``f`` gives about ``2 f / sample_rate``. A sample of exactly 0
    counts as half a crossing on each side, so touching zero is not double-counted.
    """
    changes = torch.diff(torch.sign(frames), dim=-1).abs().sum(-1) / 2
    return changes / (frames.shape[-1] - 1)


def frame_energy(frames: torch.Tensor) -> torch.Tensor:
    """Mean squared amplitude: ``(..., win_length) -> (...)`` (``A**2 / 2`` for a sine)."""
    return frames.pow(2).mean(-1)


def energy_entropy(frames: torch.Tensor, n_blocks: int = ENTROPY_BLOCKS) -> torch.Tensor:
    """Entropy (bits) of the energy shares of ``n_blocks`` sub-frames: ``(..., L) -> (...)``.

    Low for abrupt changes (energy concentrated in a few sub-frames), ``log2(n_blocks)``
    for a steady signal.
    """
    blocks = block_matrix(frames.shape[-1], n_blocks, frames.dtype).to(frames.device)
    return share_entropy(frames.pow(2) @ blocks)


def spectral_centroid_spread(
    magnitude: torch.Tensor, sample_rate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid and spread of ``magnitude`` ``(..., freqs, frames)``, each ``(..., frames)``.

    Both are in units of the Nyquist frequency (``[0, 1]``). The magnitude is first
    divided by its per-frame peak, as pyAudioAnalysis does, so ``EPS`` never dominates
    quiet but non-silent frames.
    """
    n_freqs = magnitude.shape[-2]
    nyquist = sample_rate / 2
    freqs = torch.linspace(0, nyquist, n_freqs, dtype=magnitude.dtype, device=magnitude.device)
    freqs = freqs.unsqueeze(-1)  # (freqs, 1) broadcasts over frames
    weights = magnitude / (magnitude.amax(-2, keepdim=True) + EPS)
    total = weights.sum(-2) + EPS
    centroid = (freqs * weights).sum(-2) / total
    spread = torch.sqrt(((freqs - centroid.unsqueeze(-2)) ** 2 * weights).sum(-2) / total)
    return centroid / nyquist, spread / nyquist


def spectral_entropy(power: torch.Tensor, n_blocks: int = ENTROPY_BLOCKS) -> torch.Tensor:
    """Entropy (bits) of the power shares of ``n_blocks`` sub-bands: ``(..., freqs, frames) -> (..., frames)``."""
    blocks = block_matrix(power.shape[-2], n_blocks, power.dtype).to(power.device)
    return share_entropy(power.transpose(-1, -2) @ blocks)


def spectral_flux(magnitude: torch.Tensor) -> torch.Tensor:
    """Squared change of the sum-normalised spectrum: ``(..., freqs, frames) -> (..., frames)``.

    The first frame has no predecessor and gets 0 (pyAudioAnalysis compares it with itself).
    """
    normalised = magnitude / (magnitude.sum(-2, keepdim=True) + EPS)
    flux = torch.diff(normalised, dim=-1).pow(2).sum(-2)
    return nn.functional.pad(flux, (1, 0))


def spectral_rolloff(power: torch.Tensor, fraction: float = ROLLOFF_FRACTION) -> torch.Tensor:
    """Lowest frequency with ``fraction`` of the power below it, / Nyquist.

    ``(..., freqs, frames) -> (..., frames)``; silence gives 0.
    """
    cumulative = power.cumsum(-2)
    threshold = fraction * cumulative[..., -1:, :]
    # the roll-off bin is the first whose cumulative power reaches the threshold,
    # i.e. the number of bins still below it
    rolloff_bin = (cumulative < threshold).sum(-2)
    return rolloff_bin.to(power.dtype) / (power.shape[-2] - 1)


def chroma_matrix(
    n_freqs: int, sample_rate: int, n_chroma: int = 12, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(n_chroma, n_freqs)`` 0/1 matrix mapping each STFT bin to its nearest pitch class.

    Pitch class 0 is C (``C0_HZ``); with 12 classes, 440 Hz (A) maps to class 9.
    Bins below ``CHROMA_MIN_HZ`` (the DC bin) map to none.
    """
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    audible = freqs >= CHROMA_MIN_HZ
    steps = torch.round(n_chroma * torch.log2(freqs.clamp_min(CHROMA_MIN_HZ) / C0_HZ))
    pitch_class = torch.remainder(steps, n_chroma).long()
    matrix = nn.functional.one_hot(pitch_class, n_chroma).T * audible
    return matrix.to(dtype)


def chroma(power: torch.Tensor, pitch_classes: torch.Tensor) -> torch.Tensor:
    """Share of each frame's power per pitch class.

    ``power (..., freqs, frames)`` and ``pitch_classes (n_chroma, freqs)`` (from
    :func:`chroma_matrix`) -> ``(..., n_chroma, frames)``.
    """
    return (pitch_classes.to(power) @ power) / (power.sum(-2, keepdim=True) + EPS)


def mfcc(power: torch.Tensor, mel_fbanks: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """MFCCs from a power spectrum: ``(..., freqs, frames) -> (..., n_mfcc, frames)``.

    ``mel_fbanks (freqs, n_mels)`` from ``torchaudio.functional.melscale_fbanks`` and
    ``dct (n_mels, n_mfcc)`` from ``torchaudio.functional.create_dct``. The mel power is
    taken to dB with a floor of ``EPS`` (-100 dB), per frame (no ``top_db``).
    """
    mel = (power.transpose(-1, -2) @ mel_fbanks.to(power)).clamp_min(EPS)  # (..., frames, n_mels)
    return (10.0 * torch.log10(mel) @ dct.to(power)).transpose(-1, -2)


class LLDFeatures(nn.Module):
    """Waveform ``(time,)`` or ``(batch, time)`` -> LLDs ``([batch,] 1, 34, frames)``.

    Rows are listed in the module docstring; ``n_features = 8 + n_mfcc + n_chroma + 1``
    (34 with the defaults). MFCCs use ``n_mels`` slaney-normalised slaney-scale mel
    filters over 0 Hz-Nyquist, as librosa does by default.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        win_length: int = 400,
        hop_length: int = 160,
        n_fft: int = 512,
        n_mfcc: int = 13,
        n_chroma: int = 12,
        n_mels: int = 40,
        trim_db: float | None = None,
    ) -> None:
        super().__init__()
        # leading/trailing silence cut before extraction (dB below the loudest frame)
        self.trim_db = trim_db
        if win_length > n_fft:
            raise ValueError(f"win_length ({win_length}) must not exceed n_fft ({n_fft})")
        self.sample_rate, self.win_length, self.hop_length = sample_rate, win_length, hop_length
        self.n_fft, self.n_mfcc, self.n_chroma, self.n_mels = n_fft, n_mfcc, n_chroma, n_mels
        n_freqs = n_fft // 2 + 1
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        fbanks = torchaudio.functional.melscale_fbanks(
            n_freqs, 0.0, sample_rate / 2, n_mels, sample_rate, norm="slaney", mel_scale="slaney"
        )
        self.register_buffer("mel_fbanks", fbanks, persistent=False)
        dct = torchaudio.functional.create_dct(n_mfcc, n_mels, norm="ortho")
        self.register_buffer("dct", dct, persistent=False)
        pitch_classes = chroma_matrix(n_freqs, sample_rate, n_chroma)
        self.register_buffer("pitch_classes", pitch_classes, persistent=False)

    @property
    def out_channels(self) -> int:
        return 1

    @property
    def n_features(self) -> int:
        return 8 + self.n_mfcc + self.n_chroma + 1

    def feature_names(self) -> list[str]:
        """One name per feature row, in output order (``mfcc_1``, ``chroma_A``, ...)."""
        pitch_names = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
        chroma_names = (
            pitch_names if self.n_chroma == 12 else [str(i) for i in range(self.n_chroma)]
        )
        return [
            *LLD_SCALAR_NAMES,
            *(f"mfcc_{i + 1}" for i in range(self.n_mfcc)),
            *(f"chroma_{name}" for name in chroma_names),
            "chroma_deviation",
        ]

    def config(self) -> dict:
        return {
            "name": "lld",
            "trim_db": self.trim_db,
            "sample_rate": self.sample_rate,
            "win_length": self.win_length,
            "hop_length": self.hop_length,
            "n_fft": self.n_fft,
            "n_mfcc": self.n_mfcc,
            "n_chroma": self.n_chroma,
            "n_mels": self.n_mels,
        }

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(time,)`` or ``(batch, time)`` -> ``([batch,] 1, n_features, frames)``."""
        if self.trim_db is not None:
            waveform = trim_silence(waveform, self.sample_rate, self.trim_db)
        waveform = pad_for_stft(waveform, self.n_fft)  # same frame count as LogMelFeatures
        frames = frame_signal(waveform, self.n_fft, self.win_length, self.hop_length)
        spectrum = torch.stft(
            waveform.reshape(-1, waveform.shape[-1]),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.to(waveform),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        magnitude = spectrum.abs().reshape(*waveform.shape[:-1], *spectrum.shape[-2:])
        power = magnitude.pow(2)
        centroid, spread = spectral_centroid_spread(magnitude, self.sample_rate)
        chroma_values = chroma(power, self.pitch_classes)
        rows = [
            zero_crossing_rate(frames).unsqueeze(-2),
            frame_energy(frames).unsqueeze(-2),
            energy_entropy(frames).unsqueeze(-2),
            centroid.unsqueeze(-2),
            spread.unsqueeze(-2),
            spectral_entropy(power).unsqueeze(-2),
            spectral_flux(magnitude).unsqueeze(-2),
            spectral_rolloff(power).unsqueeze(-2),
            mfcc(power, self.mel_fbanks, self.dct),
            chroma_values,
            chroma_values.std(-2, correction=0, keepdim=True),
        ]
        return torch.cat(rows, dim=-2).unsqueeze(-3)
