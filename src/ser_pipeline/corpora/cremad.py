"""CREMA-D -> manifest.

Layout: ``root/AudioWAV/AAAA_SSS_EEE_LL.wav`` (actor, sentence, emotion, level)
and ``root/VideoDemographics.csv`` (ActorID, Age, Sex, Race, Ethnicity), the only
source of the actors' sex.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ser_pipeline.corpora.manifest import CorpusNotFoundError, make_manifest, require_layout

DEMOGRAPHICS = "VideoDemographics.csv"
LAYOUT = (
    "root/AudioWAV/AAAA_SSS_EEE_LL.wav (e.g. AudioWAV/1001_DFA_ANG_XX.wav) "
    f"and root/{DEMOGRAPHICS} (ActorID, Age, Sex, ...)"
)
OVERRIDE = "data.root=/path/to/CREMA-D"

EMOTION_CODES: dict[str, str] = {
    "ANG": "anger",
    "DIS": "disgust",
    "FEA": "fear",
    "HAP": "happiness",
    "NEU": "neutral",
    "SAD": "sadness",
}
LEVEL_CODES: dict[str, str] = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}

_NAME = re.compile(
    r"^(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]{2})\.wav$"
)


def _actor_genders(csv_path: Path) -> dict[str, str | None]:
    demographics = pd.read_csv(csv_path, dtype={"ActorID": str})
    genders: dict[str, str | None] = {}
    for actor, sex in zip(demographics["ActorID"], demographics["Sex"], strict=True):
        sex = str(sex).strip().lower()
        genders[str(actor).strip()] = sex if sex in ("female", "male") else None
    return genders


def read_cremad(root: str | Path) -> pd.DataFrame:
    """List every CREMA-D clip under ``root`` (7,442 in the full corpus).

    Extra columns: ``level`` (low/medium/high/unspecified) and ``sentence`` (e.g.
    "DFA"). Actors missing from the demographics file get gender None.
    """
    path = require_layout("cremad", root, LAYOUT, OVERRIDE, "AudioWAV")
    if not (path / DEMOGRAPHICS).is_file():
        raise CorpusNotFoundError(
            "cremad", root, layout=f"{LAYOUT}; {DEMOGRAPHICS} is missing", override=OVERRIDE
        )
    genders = _actor_genders(path / DEMOGRAPHICS)
    rows = []
    for wav in (path / "AudioWAV").glob("*.wav"):
        match = _NAME.match(wav.name)
        if match is None or match["emotion"] not in EMOTION_CODES:
            continue
        rows.append(
            {
                "id": wav.stem,
                "path": str(wav),
                "emotion": EMOTION_CODES[match["emotion"]],
                "speaker": match["actor"],
                "gender": genders.get(match["actor"]),
                "corpus": "cremad",
                "level": LEVEL_CODES.get(match["level"]),
                "sentence": match["sentence"],
            }
        )
    if not rows:
        raise CorpusNotFoundError("cremad", root, layout=LAYOUT, override=OVERRIDE)
    return make_manifest(rows)
