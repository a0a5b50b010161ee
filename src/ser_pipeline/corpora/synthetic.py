"""A built-in synthetic emotional speech corpus: no download, generated in seconds.

It is what ``make demo`` and most tests train on, so it must behave like speech to
the features and models: a source-filter synthesiser makes short "utterances" of
nonsense syllables from

* a glottal pulse train (with jitter and shimmer) whose F0 follows a phrase contour
  with accents, shaped by a two-pole glottal low-pass and a spectral-tilt low-pass
  (Klatt's TL: how much vocal effort brightens the voice),
* aspiration (breath) noise, consonant noise bursts and pauses,
* a cascade of formant resonators that glides between vowel-like formant sets,
* lip radiation, an RMS level and a faint noise floor, with silence around.

Emotions change the prosody (F0 level, range and contour, speaking rate, pauses,
loudness, tilt, jitter, breathiness); the speaker's sex sets the F0 range and the
formant scale, and every speaker has its own offsets. Per-utterance variation makes
the emotions overlap, while valence/arousal/dominance targets (1-5 scale) follow the
same random draws that moved the prosody (e.g. louder and faster -> higher arousal).

Layout of a generated corpus::

    root/synthetic.json                     the options it was generated with
    root/labels.csv                         one row per utterance (relative paths)
    root/wav/spk00/spk00_anger_000.wav      16-bit PCM, mono
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
from scipy import ndimage, signal

from ser_pipeline.corpora.manifest import make_manifest

#: Bump when the synthesiser changes, so stored corpora are regenerated.
GENERATOR_VERSION = 2
CONFIG_FILE = "synthetic.json"
LABELS_FILE = "labels.csv"
DEFAULT_EMOTIONS: tuple[str, ...] = ("anger", "happiness", "neutral", "sadness")


@dataclass(frozen=True)
class EmotionProsody:
    """Prototype prosody of one emotion (before speaker and utterance variation)."""

    f0_scale: float  # F0 level relative to the speaker's neutral F0
    f0_range: float  # semitones spanned by the phrase contour
    contours: tuple[str, ...]  # phrase shapes to draw from: fall, rise, flat, rise-fall
    rate: float  # syllables per second
    pause_probability: float  # chance of a pause after a syllable
    level_db: float  # RMS level of the voiced part, dBFS
    tilt: float  # pole of the one-pole tilt low-pass: 0 = bright, ~0.8 = dark (-13 dB at 3 kHz)
    jitter: float  # relative period-to-period F0 perturbation
    shimmer: float  # relative pulse-to-pulse amplitude perturbation
    breath: float  # aspiration noise relative to the voiced source
    vad: tuple[float, float, float]  # valence, arousal, dominance prototype (1-5)


#: Prototypes of the emotions the synthesiser knows; the defaults use the first four.
#: Columns: f0_scale, f0_range, contours, rate, pause_probability, level_db, tilt,
#: jitter, shimmer, breath, (valence, arousal, dominance).
# fmt: off
PROSODY: dict[str, EmotionProsody] = {
    "anger": EmotionProsody(
        1.18, 7.0, ("fall", "rise-fall"), 5.8, 0.10, -19.0, 0.10, 0.025, 0.10, 0.02,
        (1.9, 4.3, 4.0),
    ),
    "happiness": EmotionProsody(
        1.32, 10.0, ("rise", "rise-fall"), 4.7, 0.15, -22.5, 0.40, 0.010, 0.06, 0.03,
        (4.2, 3.7, 3.4),
    ),
    "neutral": EmotionProsody(
        1.00, 3.5, ("fall", "flat"), 3.9, 0.20, -27.0, 0.50, 0.008, 0.05, 0.03,
        (3.0, 2.4, 2.9),
    ),
    "sadness": EmotionProsody(
        0.88, 2.0, ("fall", "flat"), 2.8, 0.35, -32.0, 0.78, 0.016, 0.08, 0.10,
        (1.8, 1.7, 1.9),
    ),
    "boredom": EmotionProsody(
        0.95, 1.5, ("flat",), 3.4, 0.25, -29.0, 0.70, 0.010, 0.05, 0.05,
        (2.2, 1.6, 2.4),
    ),
    "calm": EmotionProsody(
        0.98, 2.5, ("fall",), 3.6, 0.25, -28.0, 0.62, 0.006, 0.04, 0.05,
        (3.6, 1.9, 3.0),
    ),
    "fear": EmotionProsody(
        1.38, 6.0, ("rise", "flat"), 5.9, 0.20, -24.0, 0.40, 0.030, 0.12, 0.07,
        (1.9, 3.9, 1.8),
    ),
    "disgust": EmotionProsody(
        0.97, 5.0, ("rise-fall", "fall"), 3.5, 0.25, -24.5, 0.45, 0.015, 0.08, 0.05,
        (1.7, 3.0, 3.5),
    ),
    "surprise": EmotionProsody(
        1.35, 12.0, ("rise",), 4.6, 0.15, -22.5, 0.40, 0.010, 0.06, 0.04,
        (3.6, 4.0, 2.8),
    ),
}
# fmt: on

#: Vowel-like formant sets (Hz, adult male; Peterson & Barney) for /a/ /i/ /u/ /e/ /o/.
VOWEL_FORMANTS = np.array(
    [
        [730.0, 1090.0, 2440.0, 3400.0],
        [270.0, 2290.0, 3010.0, 3700.0],
        [300.0, 870.0, 2240.0, 3300.0],
        [530.0, 1840.0, 2480.0, 3500.0],
        [570.0, 840.0, 2410.0, 3400.0],
    ]
)
FORMANT_BANDWIDTHS = np.array([80.0, 100.0, 140.0, 200.0])
NOISE_FLOOR_DB = -70.0
GLOTTAL_POLE = 0.97
BREATH_GAIN = 1.0
FRICATIVE_GAIN = 0.2


@dataclass(frozen=True)
class SyntheticSpeaker:
    """A synthetic speaker: sex plus the offsets that make it differ from the others."""

    name: str
    gender: str
    f0_base: float  # neutral F0 in Hz
    formant_scale: float  # vocal-tract length: ~1.0 male, ~1.16 female
    rate_factor: float  # speaks faster (>1) or slower (<1) than the prototype
    level_offset_db: float
    tilt_offset: float


def make_speaker(index: int, seed: int) -> SyntheticSpeaker:
    """Draw speaker ``index`` (``spk00``, ``spk01``...); even indices are female.

    Seeded by ``(seed, index)`` only, so a speaker sounds the same whatever
    ``n_speakers`` is.
    """
    rng = np.random.default_rng([seed, 0, index])
    female = index % 2 == 0
    return SyntheticSpeaker(
        name=f"spk{index:02d}",
        gender="female" if female else "male",
        f0_base=rng.uniform(178.0, 205.0) if female else rng.uniform(93.0, 118.0),
        formant_scale=(1.16 if female else 1.0) * rng.uniform(0.95, 1.05),
        rate_factor=float(np.exp(rng.normal(0.0, 0.06))),
        level_offset_db=float(np.clip(rng.normal(0.0, 1.0), -1.5, 1.5)),
        tilt_offset=rng.normal(0.0, 0.03),
    )


# --------------------------------------------------------------------------- synthesis


def _resonator_sos(frequencies: np.ndarray, bandwidths: np.ndarray, sample_rate: int) -> np.ndarray:
    """Cascade of 2nd-order resonators with unit gain at DC, as ``(sections, 6)`` SOS."""
    keep = frequencies < 0.45 * sample_rate  # formants above Nyquist cannot be rendered
    radius = np.exp(-np.pi * bandwidths[keep] / sample_rate)
    a1 = -2.0 * radius * np.cos(2.0 * np.pi * frequencies[keep] / sample_rate)
    a2 = radius**2
    zeros = np.zeros_like(a1)
    return np.stack([1.0 + a1 + a2, zeros, zeros, np.ones_like(a1), a1, a2], axis=1)


@functools.lru_cache(maxsize=8)
def _fricative_band(sample_rate: int) -> np.ndarray:
    """Band-pass (2.5-6 kHz) that colours consonant noise, as SOS."""
    high = min(6000.0, 0.45 * sample_rate)
    return signal.butter(4, [2500.0, high], "bandpass", fs=sample_rate, output="sos")


def _phrase_contour(shape: str, position: np.ndarray, semitones: float) -> np.ndarray:
    """Semitone offsets over the phrase; ``position`` runs 0..1 across the speech."""
    if shape == "fall":
        return semitones * (0.5 - position)
    if shape == "rise":
        return semitones * (position - 0.5)
    if shape == "rise-fall":
        return semitones * (0.5 - 2.0 * np.abs(position - 0.4))
    return 0.15 * semitones * np.sin(2.0 * np.pi * position)  # flat, with a slight wave


def _fade(length: int, attack: int, release: int) -> np.ndarray:
    """Raised-cosine attack and release over ``length`` samples, shape ``(length,)``."""
    envelope = np.ones(length)
    attack, release = min(attack, length // 2), min(release, length // 2)
    if attack:
        envelope[:attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
    if release:
        envelope[length - release :] = 0.5 + 0.5 * np.cos(np.pi * np.arange(release) / release)
    return envelope


def synthesise_utterance(
    speaker: SyntheticSpeaker,
    emotion: str,
    rng: np.random.Generator,
    sample_rate: int = 16000,
) -> tuple[np.ndarray, dict[str, float]]:
    """One utterance of ``emotion`` by ``speaker``.

    Returns the waveform, shape ``(time,)`` float32 in [-1, 1], and its labels:
    valence, arousal, dominance (1-5) and duration (s).
    """
    proto = PROSODY[emotion]
    sr = sample_rate
    # Latent per-utterance deviations: arousal moves level, rate, F0 and tilt together,
    # so the dimensional targets below are predictable from the prosody drawn here.
    z_arousal, z_valence, z_dominance = rng.normal(size=3)
    f0_scale = proto.f0_scale * np.exp(0.045 * z_arousal - 0.02 * z_dominance + rng.normal(0, 0.04))
    f0_range = proto.f0_range * np.exp(0.12 * z_valence + rng.normal(0, 0.2))
    rate = proto.rate * speaker.rate_factor * np.exp(0.07 * z_arousal + rng.normal(0, 0.07))
    level_db = proto.level_db + speaker.level_offset_db + 1.5 * z_arousal + rng.normal(0, 1.2)
    tilt = np.clip(
        proto.tilt + speaker.tilt_offset - 0.03 * z_arousal + rng.normal(0, 0.03), 0.0, 0.9
    )
    jitter = proto.jitter * np.exp(rng.normal(0, 0.3))
    breath = proto.breath * np.exp(rng.normal(0, 0.3))
    valence = proto.vad[0] + 0.35 * z_valence + rng.normal(0, 0.15)
    arousal = proto.vad[1] + 0.40 * z_arousal + rng.normal(0, 0.15)
    dominance = proto.vad[2] + 0.25 * z_arousal + 0.30 * z_dominance + rng.normal(0, 0.15)

    # Timing: syllables (consonant + vowel) with occasional pauses, silence around.
    n_syllables = max(3, int(round(rng.uniform(0.7, 1.4) * rate)))
    syllable_s = rng.lognormal(0.0, 0.25, n_syllables) / rate
    pause_s = np.where(
        rng.random(n_syllables) < proto.pause_probability, rng.uniform(0.06, 0.22, n_syllables), 0.0
    )
    pause_s[-1] = 0.0
    lead_s, tail_s = rng.uniform(0.1, 0.3, 2)
    starts_s = lead_s + np.concatenate([[0.0], np.cumsum(syllable_s + pause_s)[:-1]])
    total = int(round((starts_s[-1] + syllable_s[-1] + tail_s) * sr))
    starts = np.round(starts_s * sr).astype(int)
    lengths = np.round(syllable_s * sr).astype(int)
    consonant_fraction = rng.uniform(0.2, 0.35, n_syllables)
    stressed = rng.random(n_syllables) < 0.35
    vowels = rng.integers(0, len(VOWEL_FORMANTS), n_syllables)

    voice_env = np.zeros(total)
    consonant_env = np.zeros(total)
    vowel_track = np.zeros(total, dtype=int)
    for i in range(n_syllables):
        onset = starts[i] + int(consonant_fraction[i] * lengths[i])
        end = starts[i] + lengths[i]
        gain = 1.3 if stressed[i] else 1.0
        voice_env[onset:end] = gain * _fade(end - onset, int(0.02 * sr), int(0.4 * (end - onset)))
        consonant_env[starts[i] : onset] = _fade(onset - starts[i], int(0.005 * sr), int(0.01 * sr))
        vowel_track[starts[i] :] = vowels[i]  # holds into the following pause

    # F0: phrase contour + accents on stressed syllables + slow drift, in semitones.
    speech_start, speech_end = starts[0], starts[-1] + lengths[-1]
    time = np.arange(total)
    position = np.clip((time - speech_start) / max(speech_end - speech_start, 1), 0.0, 1.0)
    shape = proto.contours[rng.integers(len(proto.contours))]
    semitones = _phrase_contour(shape, position, f0_range)
    for i in np.flatnonzero(stressed):
        centre, width = starts[i] + 0.6 * lengths[i], 0.35 * lengths[i]
        span = slice(max(0, int(centre - 4 * width)), min(total, int(centre + 4 * width) + 1))
        bump = np.exp(-0.5 * ((time[span] - centre) / width) ** 2)
        semitones[span] += (0.3 * f0_range + 1.0) * bump
    knots = np.linspace(0, total, max(2, int(total / sr * 5)))
    semitones += np.interp(time, knots, rng.normal(0.0, 0.3, knots.size))
    f0 = speaker.f0_base * f0_scale * np.exp(semitones * (np.log(2.0) / 12.0))

    # Glottal pulses: nominal epochs from the integrated F0, then per-period jitter.
    epochs = np.flatnonzero(np.diff(np.floor(np.cumsum(f0 / sr))))
    periods = np.diff(epochs) * (1.0 + jitter * rng.standard_normal(epochs.size - 1))
    epochs = np.round(epochs[0] + np.concatenate([[0.0], np.cumsum(periods)])).astype(int)
    epochs = epochs[epochs < total]
    amplitudes = voice_env[epochs] * (1.0 + proto.shimmer * rng.standard_normal(epochs.size))
    source = np.zeros(total)
    np.add.at(source, epochs, amplitudes)
    # glottal pulse shape: -12 dB/octave above ~80 Hz
    source = signal.lfilter([1.0], [1.0, -2.0 * GLOTTAL_POLE, GLOTTAL_POLE**2], source)
    voiced = voice_env > 0.3
    source_rms = np.sqrt(np.mean(source[voiced] ** 2)) if voiced.any() else 1.0
    # vowels and consonants never overlap in time, so one noise draw serves both
    noise = rng.standard_normal(total)
    # aspiration noise falls like the pulses (-12 dB/octave, here above ~270 Hz) and goes
    # through the tilt with them, so a breathy but lax voice (sadness) stays dark
    aspiration = signal.lfilter([1.0], [1.0, -1.8, 0.81], noise)
    aspiration /= np.std(aspiration) + 1e-12
    source += breath * BREATH_GAIN * source_rms * voice_env * aspiration
    source = signal.lfilter([1.0 - tilt], [1.0, -tilt], source)  # the emotion's spectral tilt

    # Vocal tract: filter through every vowel used, crossfade by the smoothed vowel track.
    # (a 30 ms moving average of the one-hot vowel track makes the formant glides)
    speech = np.zeros(total)
    for vowel in np.unique(vowels):
        weight = ndimage.uniform_filter1d((vowel_track == vowel).astype(float), int(0.03 * sr))
        formants = VOWEL_FORMANTS[vowel] * speaker.formant_scale
        sos = _resonator_sos(formants, FORMANT_BANDWIDTHS, sr)
        speech += weight * signal.sosfilt(sos, source)
    speech = np.diff(speech, prepend=0.0)  # lip radiation, +6 dB/octave

    # Consonants: band-passed noise bursts, ~11 (anger) to ~17 dB (sadness) below the vowels.
    fricative = signal.sosfilt(_fricative_band(sr), noise) * consonant_env
    speech_rms = np.sqrt(np.mean(speech[voiced] ** 2)) if voiced.any() else 1.0
    fricative_rms = np.sqrt(np.mean(fricative[consonant_env > 0.3] ** 2)) + 1e-12
    # more effort (less tilt) also means crisper consonants
    speech += fricative * (FRICATIVE_GAIN * (0.5 + (1.0 - tilt)) * speech_rms / fricative_rms)

    speech *= 10.0 ** (level_db / 20.0) / (np.sqrt(np.mean(speech[voiced] ** 2)) + 1e-12)
    speech += 10.0 ** (NOISE_FLOOR_DB / 20.0) * rng.standard_normal(total)
    peak = np.max(np.abs(speech))
    if peak > 0.97:  # rare loud draws: scale down rather than clip
        speech *= 0.97 / peak
    labels = {
        "valence": float(np.clip(valence, 1.0, 5.0)),
        "arousal": float(np.clip(arousal, 1.0, 5.0)),
        "dominance": float(np.clip(dominance, 1.0, 5.0)),
        "duration": total / sr,
    }
    return speech.astype(np.float32), labels


# --------------------------------------------------------------------------- corpus on disk


def _options(
    n_speakers: int, utterances_per_class: int, emotions: Any, sample_rate: int, seed: int
) -> dict[str, Any]:
    """Validated options as stored in ``synthetic.json``."""
    emotions = list(emotions)
    unknown = [e for e in emotions if e not in PROSODY]
    if unknown:
        raise ValueError(f"synthetic corpus cannot voice {unknown}; known: {sorted(PROSODY)}")
    if len(set(emotions)) != len(emotions) or not emotions:
        raise ValueError(f"emotions must be distinct and non-empty, got {emotions}")
    if n_speakers < 1 or utterances_per_class < 1:
        raise ValueError("n_speakers and utterances_per_class must be at least 1")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be at least 8000 Hz, got {sample_rate}")
    return {
        "generator_version": GENERATOR_VERSION,
        "n_speakers": int(n_speakers),
        "utterances_per_class": int(utterances_per_class),
        "emotions": emotions,
        "sample_rate": int(sample_rate),
        "seed": int(seed),
    }


def _holds_corpus(root: Path, options: dict[str, Any]) -> bool:
    """True if ``root`` is a complete corpus generated with ``options``.

    ``synthetic.json`` is written last, and the folder only appears under its final
    name by an atomic rename, so its presence means the corpus is complete.
    """
    try:
        return json.loads((root / CONFIG_FILE).read_text()) == options
    except (OSError, ValueError):
        return False


def _write_corpus(folder: Path, options: dict[str, Any]) -> None:
    rows = []
    emotion_ids = {name: number for number, name in enumerate(PROSODY)}
    for index in range(options["n_speakers"]):
        speaker = make_speaker(index, options["seed"])
        (folder / "wav" / speaker.name).mkdir(parents=True)
        for emotion in options["emotions"]:
            for k in range(options["utterances_per_class"]):
                # one generator per utterance: its audio does not depend on the other options
                rng = np.random.default_rng([options["seed"], 1, index, emotion_ids[emotion], k])
                wave, labels = synthesise_utterance(speaker, emotion, rng, options["sample_rate"])
                utterance = f"{speaker.name}_{emotion}_{k:03d}"
                relative = f"wav/{speaker.name}/{utterance}.wav"
                sf.write(folder / relative, wave, options["sample_rate"], subtype="PCM_16")
                rows.append(
                    {
                        "id": utterance,
                        "path": relative,
                        "emotion": emotion,
                        "speaker": speaker.name,
                        "gender": speaker.gender,
                        **labels,
                    }
                )
    pd.DataFrame(rows).to_csv(folder / LABELS_FILE, index=False)
    (folder / CONFIG_FILE).write_text(json.dumps(options, indent=2) + "\n")


def _install(staging: Path, root: Path, options: dict[str, Any]) -> None:
    """Move the finished ``staging`` folder to ``root`` atomically.

    ``os.rename`` of a folder succeeds only onto a missing or empty target, so when
    another process got there first we either keep its identical corpus or retire
    the stale one (only if it is a synthetic corpus: never delete a user's folder).
    """
    for _attempt in range(10):
        try:
            os.rename(staging, root)
            return
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if _holds_corpus(root, options):
            shutil.rmtree(staging, ignore_errors=True)
            return
        if not (root / CONFIG_FILE).is_file() and not (root / LABELS_FILE).is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise FileExistsError(
                f"'{root}' exists and is not a synthetic corpus; refusing to replace it"
            )
        retired = Path(tempfile.mkdtemp(prefix=f".{root.name}.retired-", dir=root.parent))
        try:
            os.rename(root, retired / "corpus")
        except FileNotFoundError:
            pass  # another process moved it first; try again
        shutil.rmtree(retired, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    raise RuntimeError(f"could not install the synthetic corpus at '{root}' (busy)")


def generate_synthetic_corpus(
    root: str | Path,
    n_speakers: int = 8,
    utterances_per_class: int = 12,
    emotions: tuple[str, ...] | list[str] = DEFAULT_EMOTIONS,
    sample_rate: int = 16000,
    seed: int = 0,
) -> Path:
    """Generate the corpus into ``root`` (replacing an older synthetic corpus there).

    ``utterances_per_class`` is per speaker and emotion, so the corpus holds
    ``n_speakers * len(emotions) * utterances_per_class`` files; half the speakers are
    female. Same options give byte-identical WAVs. The corpus is written into a
    sibling temporary folder and renamed into place, so readers never see half of it.
    Returns the absolute ``root``.
    """
    options = _options(n_speakers, utterances_per_class, emotions, sample_rate, seed)
    root = Path(root).expanduser().absolute()
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.staging-", dir=root.parent))
    except OSError as error:
        raise OSError(
            error.errno,
            f"cannot generate the synthetic corpus at {root}: {root.parent} is not writable "
            f"({error.strerror}). Point data.root (or paths.data_dir) at a writable folder.",
        ) from error
    try:
        _write_corpus(staging, options)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _install(staging, root, options)
    return root


def read_synthetic(
    root: str | Path,
    n_speakers: int = 8,
    utterances_per_class: int = 12,
    emotions: tuple[str, ...] | list[str] = DEFAULT_EMOTIONS,
    sample_rate: int = 16000,
    seed: int = 0,
) -> pd.DataFrame:
    """Manifest of the synthetic corpus at ``root``, generating it first if needed.

    Regenerates when ``root`` holds a corpus made with other options. Extra column:
    ``duration`` (seconds). Safe to call from several processes at once.
    """
    options = _options(n_speakers, utterances_per_class, emotions, sample_rate, seed)
    root = Path(root).expanduser().absolute()
    if not _holds_corpus(root, options):
        generate_synthetic_corpus(
            root, n_speakers, utterances_per_class, emotions, sample_rate, seed
        )
    labels = pd.read_csv(root / LABELS_FILE, dtype={"id": str, "speaker": str})
    labels["path"] = [str(root / relative) for relative in labels["path"]]
    labels["corpus"] = "synthetic"
    return make_manifest(labels.to_dict("records"))
