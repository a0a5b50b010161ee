"""Builders of miniature corpus trees in the real layouts, for reader tests.

Each ``build_<corpus>_tree(root)`` writes a handful of tiny WAVs (0.1 s of a quiet
tone) under ``root`` exactly where the real corpus keeps them, and returns ``root``.
The module-level constants say what a reader must find in each tree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def write_tiny_wav(path: Path, seconds: float = 0.1, sample_rate: int = 16000) -> Path:
    """Write ``seconds`` of a quiet 220 Hz tone as 16-bit PCM, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    time = np.arange(int(seconds * sample_rate)) / sample_rate
    sf.write(path, 0.1 * np.sin(2 * np.pi * 220.0 * time), sample_rate, subtype="PCM_16")
    return path


# --------------------------------------------------------------------------- EMO-DB

#: File name -> (emotion, speaker, gender) a reader must report.
EMODB_FILES: dict[str, tuple[str, str, str]] = {
    "03a01Wa.wav": ("anger", "03", "male"),
    "03a01Nc.wav": ("neutral", "03", "male"),
    "08b02Lb.wav": ("boredom", "08", "female"),
    "09a05Ea.wav": ("disgust", "09", "female"),
    "10b10Aa.wav": ("fear", "10", "male"),
    "13a07Fd.wav": ("happiness", "13", "female"),
    "16b03Tb.wav": ("sadness", "16", "female"),
}


def build_emodb_tree(root: Path) -> Path:
    """``root/wav/SSTTTEV.wav`` for every entry of :data:`EMODB_FILES`, plus a stray file."""
    for name in EMODB_FILES:
        write_tiny_wav(root / "wav" / name)
    (root / "wav" / "README.txt").write_text("not an utterance")
    return root


# --------------------------------------------------------------------------- RAVDESS

#: Speech files (vocal channel 01) -> (emotion, speaker, gender, intensity).
RAVDESS_SPEECH: dict[str, tuple[str, str, str, str]] = {
    "03-01-01-01-01-01-01.wav": ("neutral", "Actor_01", "male", "normal"),
    "03-01-05-02-02-01-01.wav": ("anger", "Actor_01", "male", "strong"),
    "03-01-02-01-01-02-02.wav": ("calm", "Actor_02", "female", "normal"),
    "03-01-08-02-02-02-02.wav": ("surprise", "Actor_02", "female", "strong"),
    "03-01-03-01-01-01-13.wav": ("happiness", "Actor_13", "male", "normal"),
    "03-01-07-02-01-01-24.wav": ("disgust", "Actor_24", "female", "strong"),
}
#: Song files (vocal channel 02): a speech reader must leave them out.
RAVDESS_SONG: tuple[str, ...] = ("03-02-03-01-01-01-01.wav", "03-02-04-02-02-01-02.wav")


def build_ravdess_tree(root: Path) -> Path:
    """``root/Actor_XX/MM-VV-EE-II-SS-RR-AA.wav`` for the speech and song files above."""
    for name in (*RAVDESS_SPEECH, *RAVDESS_SONG):
        actor = int(name[-6:-4])
        write_tiny_wav(root / f"Actor_{actor:02d}" / name)
    return root


# --------------------------------------------------------------------------- IEMOCAP

_SES01_IMPRO01 = """\
% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]
C-E2:\tNeutral;\t()
C-E3:\tNeutral;\t()
A-E3:\tval 3; act 2; dom  2;\t()

[10.0100 - 11.3925]\tSes01F_impro01_M001\texc\t[3.5000, 3.5000, 3.0000]
C-E1:\tExcited;\t()
A-E1:\tval 4; act 4; dom  3;\t()

[14.8872 - 18.0175]\tSes01F_impro01_F002\txxx\t[2.0000, 3.0000, 3.0000]
C-E2:\tAnger;\t()
C-E3:\tFrustration;\t()

[19.2900 - 20.7875]\tSes01F_impro01_M003\tfru\t[1.5000, 3.5000, 3.5000]
C-E2:\tFrustration;\t()

[21.0000 - 22.0000]\tSes01F_impro01_F005\tang\t[1.0000, 4.5000, 4.0000]
"""
_SES02_SCRIPT01 = """\
% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[1.0000 - 2.5000]\tSes02M_script01_1_F000\tsad\t[1.5000, 2.0000, 2.0000]
C-E1:\tSadness;\t()

[3.0000 - 4.2500]\tSes02M_script01_1_M001\thap\t[4.0000, 3.0000, 3.5000]
C-E1:\tHappiness;\t()
"""

#: Utterance id -> (emotion, speaker, gender, session, (valence, arousal, dominance)).
IEMOCAP_EXPECTED: dict[str, tuple[str, str, str, str, tuple[float, float, float]]] = {
    "Ses01F_impro01_F000": ("neutral", "Ses01F", "female", "Session1", (2.5, 2.5, 2.5)),
    "Ses01F_impro01_M001": ("excitement", "Ses01M", "male", "Session1", (3.5, 3.5, 3.0)),
    "Ses01F_impro01_M003": ("frustration", "Ses01M", "male", "Session1", (1.5, 3.5, 3.5)),
    "Ses02M_script01_1_F000": ("sadness", "Ses02F", "female", "Session2", (1.5, 2.0, 2.0)),
    "Ses02M_script01_1_M001": ("happiness", "Ses02M", "male", "Session2", (4.0, 3.0, 3.5)),
}
#: A wav with no label line: a reader must leave it out.
IEMOCAP_UNLABELLED = "Ses01F_impro01_F004"
#: Labelled ``xxx`` (no agreement): a reader must drop it.
IEMOCAP_NO_AGREEMENT = "Ses01F_impro01_F002"
#: Has a label line (``ang``) but no wav: a reader must leave it out.
IEMOCAP_MISSING_WAV = "Ses01F_impro01_F005"


def build_iemocap_tree(root: Path) -> Path:
    """Two sessions of ``IEMOCAP_full_release``: wavs per dialog plus EmoEvaluation files."""
    dialogs = {
        ("Session1", "Ses01F_impro01"): _SES01_IMPRO01,
        ("Session2", "Ses02M_script01_1"): _SES02_SCRIPT01,
    }
    for (session, dialog), evaluation in dialogs.items():
        folder = root / session / "dialog" / "EmoEvaluation"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{dialog}.txt").write_text(evaluation)
        # per-evaluator folders sit beside the consensus files; they are not turns
        (folder / "Categorical").mkdir(exist_ok=True)
        (folder / "Categorical" / f"{dialog}_e1_cat.txt").write_text(
            f"{dialog}_F000 :Neutral state; ()\n"
        )
    for utterance in [*IEMOCAP_EXPECTED, IEMOCAP_UNLABELLED, IEMOCAP_NO_AGREEMENT]:
        session = f"Session{int(utterance[3:5])}"
        dialog = utterance.rsplit("_", 1)[0]
        write_tiny_wav(root / session / "sentences" / "wav" / dialog / f"{utterance}.wav")
    return root


# --------------------------------------------------------------------------- CREMA-D

#: Clip -> (emotion, speaker, gender, level).
CREMAD_FILES: dict[str, tuple[str, str, str | None, str]] = {
    "1001_DFA_ANG_XX.wav": ("anger", "1001", "male", "unspecified"),
    "1001_IEO_HAP_HI.wav": ("happiness", "1001", "male", "high"),
    "1002_IEO_SAD_LO.wav": ("sadness", "1002", "female", "low"),
    "1002_TIE_NEU_XX.wav": ("neutral", "1002", "female", "unspecified"),
    "1003_ITS_FEA_MD.wav": ("fear", "1003", "female", "medium"),
    "1091_WSI_DIS_XX.wav": ("disgust", "1091", None, "unspecified"),  # not in the CSV
}
_DEMOGRAPHICS = """\
ActorID,Age,Sex,Race,Ethnicity
1001,51,Male,Caucasian,Not Hispanic
1002,21,Female,Caucasian,Not Hispanic
1003,21,Female,Caucasian,Not Hispanic
"""


def build_cremad_tree(root: Path, demographics: bool = True) -> Path:
    """``root/AudioWAV/AAAA_SSS_EEE_LL.wav`` and, unless told not to, the demographics CSV."""
    for name in CREMAD_FILES:
        write_tiny_wav(root / "AudioWAV" / name)
    if demographics:
        (root / "VideoDemographics.csv").write_text(_DEMOGRAPHICS)
    return root
