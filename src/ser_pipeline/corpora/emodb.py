"""EMO-DB (Berlin Database of Emotional Speech) -> manifest.

Layout: ``root/wav/SSTTTEV.wav``, e.g. ``03a01Fa.wav``: speaker ``03``, text
``a01``, emotion letter ``F`` (German initial), version ``a``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ser_pipeline.corpora.manifest import CorpusNotFoundError, make_manifest, require_layout

LAYOUT = "root/wav/SSTTTEV.wav, e.g. wav/03a01Fa.wav (speaker, text id, emotion letter, version)"
OVERRIDE = "data.root=/path/to/emodb"

#: German initials -> canonical names.
EMOTION_CODES: dict[str, str] = {
    "W": "anger",  # Ärger (Wut)
    "L": "boredom",  # Langeweile
    "E": "disgust",  # Ekel
    "A": "fear",  # Angst
    "F": "happiness",  # Freude
    "T": "sadness",  # Trauer
    "N": "neutral",
}
MALE_SPEAKERS = frozenset({"03", "10", "11", "12", "15"})
FEMALE_SPEAKERS = frozenset({"08", "09", "13", "14", "16"})

_NAME = re.compile(r"^(?P<speaker>\d{2})(?P<text>[ab]\d{2})(?P<emotion>[WLEAFTN])[a-z]\.wav$")


def _gender(speaker: str) -> str | None:
    if speaker in MALE_SPEAKERS:
        return "male"
    return "female" if speaker in FEMALE_SPEAKERS else None


def read_emodb(root: str | Path) -> pd.DataFrame:
    """List every EMO-DB utterance under ``root`` (535 in the full corpus).

    Extra column: ``text`` (the sentence id, e.g. "a01"). No dimensional labels.
    Files whose names do not follow the EMO-DB scheme are ignored.
    """
    root = require_layout("emodb", root, LAYOUT, OVERRIDE, "wav")
    rows = []
    for wav in (root / "wav").iterdir():
        match = _NAME.match(wav.name)
        if match is None:
            continue
        speaker = match["speaker"]
        rows.append(
            {
                "id": wav.stem,
                "path": str(wav),
                "emotion": EMOTION_CODES[match["emotion"]],
                "speaker": speaker,
                "gender": _gender(speaker),
                "corpus": "emodb",
                "text": match["text"],
            }
        )
    if not rows:  # a wav/ folder, but not EMO-DB's file names
        raise CorpusNotFoundError("emodb", root, layout=LAYOUT, override=OVERRIDE)
    return make_manifest(rows)
