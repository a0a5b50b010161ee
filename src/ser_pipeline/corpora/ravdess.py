"""RAVDESS (speech part) -> manifest.

Layout: ``root/Actor_XX/MM-VV-EE-II-SS-RR-AA.wav``: modality, vocal channel
(01 speech, 02 song), emotion, intensity (01 normal, 02 strong; neutral has no
strong), statement, repetition, actor (odd = male, even = female).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ser_pipeline.corpora.manifest import CorpusNotFoundError, make_manifest

LAYOUT = "root/Actor_XX/MM-VV-EE-II-SS-RR-AA.wav, e.g. Actor_01/03-01-05-02-01-01-01.wav"
OVERRIDE = "data.root=/path/to/RAVDESS"

EMOTION_CODES: dict[str, str] = {
    "01": "neutral",
    "02": "calm",
    "03": "happiness",
    "04": "sadness",
    "05": "anger",
    "06": "fear",
    "07": "disgust",
    "08": "surprise",
}
INTENSITY_CODES: dict[str, str] = {"01": "normal", "02": "strong"}
SPEECH_CHANNEL = "01"

_NAME = re.compile(
    r"^(?P<modality>\d{2})-(?P<channel>\d{2})-(?P<emotion>\d{2})-(?P<intensity>\d{2})"
    r"-(?P<statement>\d{2})-(?P<repetition>\d{2})-(?P<actor>\d{2})\.wav$"
)
_ACTOR_DIR = re.compile(r"^Actor_\d{2}$")


def read_ravdess(root: str | Path) -> pd.DataFrame:
    """List the RAVDESS speech utterances under ``root`` (1,440 in the full corpus).

    Songs (vocal channel 02) are left out. Extra columns: ``intensity`` ("normal" or
    "strong") and ``statement`` ("01" kids / "02" dogs). No dimensional labels.
    """
    path = Path(root).expanduser().absolute()
    actor_dirs = (
        sorted(d for d in path.iterdir() if d.is_dir() and _ACTOR_DIR.match(d.name))
        if path.is_dir()
        else []
    )
    if not actor_dirs:
        raise CorpusNotFoundError("ravdess", root, layout=LAYOUT, override=OVERRIDE)
    rows = []
    for actor_dir in actor_dirs:
        for wav in actor_dir.glob("*.wav"):
            match = _NAME.match(wav.name)
            if match is None or match["channel"] != SPEECH_CHANNEL:
                continue
            if match["emotion"] not in EMOTION_CODES:
                continue
            actor = int(match["actor"])
            rows.append(
                {
                    "id": wav.stem,
                    "path": str(wav),
                    "emotion": EMOTION_CODES[match["emotion"]],
                    "speaker": f"Actor_{actor:02d}",
                    "gender": "male" if actor % 2 == 1 else "female",
                    "corpus": "ravdess",
                    "intensity": INTENSITY_CODES.get(match["intensity"]),
                    "statement": match["statement"],
                }
            )
    if not rows:
        raise CorpusNotFoundError("ravdess", root, layout=LAYOUT, override=OVERRIDE)
    return make_manifest(rows)
