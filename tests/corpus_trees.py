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


# --------------------------------------------------------------------------- MSP-Podcast

_MSP_LABELS = """\
FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set
MSP-PODCAST_0001_0008.wav,A,5.8,2.2,5.0,127,Male,Train
MSP-PODCAST_0001_0019.wav,H,4.4,5.6,4.2,127,Male,Train
MSP-PODCAST_0002_0003.wav,N,3.8,4.0,4.0,Unknown,Unknown,Train
MSP-PODCAST_0002_0004.wav,S,2.4,2.6,3.0,Unknown,Unknown,Train
MSP-PODCAST_0003_0001.wav,X,4.0,4.0,4.0,131,Female,Train
MSP-PODCAST_0004_0010.wav,N,3.6,4.2,3.8,200,Female,Development
MSP-PODCAST_0005_0002.wav,S,2.2,2.0,2.8,310,Female,Test1
MSP-PODCAST_0005_0007.wav,U,5.4,4.8,4.4,310,Female,Test1
MSP-PODCAST_0006_0001.wav,D,4.6,2.4,4.8,402,Male,Test2
MSP-PODCAST_0007_0001.wav,A,6.0,1.8,5.2,500,Male,Train
"""
#: Segment -> (emotion, speaker, gender, split, (valence, arousal, dominance)).
MSP_EXPECTED: dict[str, tuple[str, str, str | None, str, tuple[float, float, float]]] = {
    "MSP-PODCAST_0001_0008": ("anger", "127", "male", "train", (2.2, 5.8, 5.0)),
    "MSP-PODCAST_0001_0019": ("happiness", "127", "male", "train", (5.6, 4.4, 4.2)),
    "MSP-PODCAST_0002_0003": ("neutral", "unknown/MSP-PODCAST_0002_0003", None, "train",
                              (4.0, 3.8, 4.0)),
    "MSP-PODCAST_0002_0004": ("sadness", "unknown/MSP-PODCAST_0002_0004", None, "train",
                              (2.6, 2.4, 3.0)),
    "MSP-PODCAST_0004_0010": ("neutral", "200", "female", "val", (4.2, 3.6, 3.8)),
    "MSP-PODCAST_0005_0002": ("sadness", "310", "female", "test", (2.0, 2.2, 2.8)),
    "MSP-PODCAST_0005_0007": ("surprise", "310", "female", "test", (4.8, 5.4, 4.4)),
    "MSP-PODCAST_0006_0001": ("disgust", "402", "male", "test2", (2.4, 4.6, 4.8)),
}
#: Labelled X (no agreement): a reader must drop it.
MSP_NO_AGREEMENT = "MSP-PODCAST_0003_0001"
#: Labelled but without audio under Audios/: a reader must leave it out.
MSP_MISSING_WAV = "MSP-PODCAST_0007_0001"


def build_msppodcast_tree(root: Path, labels: str = _MSP_LABELS) -> Path:
    """``root/Audios/<FileName>`` and ``root/Labels/labels_consensus.csv`` as in release 1.x."""
    for name in [*MSP_EXPECTED, MSP_NO_AGREEMENT]:
        write_tiny_wav(root / "Audios" / f"{name}.wav")
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    (root / "Labels" / "labels_consensus.csv").write_text(labels)
    return root


# --------------------------------------------------------------------------- own tables

def write_table(path: Path, rows: list[dict], audio: bool = True) -> Path:
    """A corpus table at ``path`` (CSV, or JSON lines for ``.jsonl``) listing ``rows``.

    With ``audio``, a tiny WAV is written at every row's relative ``path`` (taken from the
    table's folder), so the table describes a real corpus.
    """
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    if audio:
        for row in rows:
            if "path" in row and not Path(row["path"]).is_absolute():
                write_tiny_wav(path.parent / row["path"])
    frame = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False)
    return path


def table_rows(n_speakers: int = 4, per_class: int = 2,
               emotions: tuple[str, ...] = ("anger", "sadness")) -> list[dict]:
    """Rows of a small table corpus: speaker k is female for even k, one split per speaker
    (the last speaker tests, the one before validates, the others train)."""
    rows = []
    for s in range(n_speakers):
        split = "test" if s == n_speakers - 1 else "val" if s == n_speakers - 2 else "train"
        for emotion in emotions:
            for k in range(per_class):
                rows.append({"path": f"audio/spk{s}/{emotion}_{k}.wav", "emotion": emotion,
                             "speaker": f"spk{s}", "gender": "F" if s % 2 == 0 else "M",
                             "valence": 0.1 * k, "arousal": 0.5, "dominance": "", "split": split})
    return rows
