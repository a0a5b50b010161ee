"""MSP-Podcast (1.x releases) -> manifest.

Layout: ``root/Audios/<FileName>`` (16 kHz mono WAV segments, e.g.
``MSP-PODCAST_0001_0008.wav``) and ``root/Labels/labels_consensus.csv`` with columns
``FileName, EmoClass, EmoAct, EmoVal, EmoDom, SpkrID, Gender, Split_Set``.

The official split set becomes the ``split`` column read by ``data.split=predefined``:
``Train`` -> train, ``Development`` -> val, ``test_set`` (``Test1``) -> test; other test
sets keep their own lower-cased name and are left out of the predefined split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ser_pipeline.corpora.manifest import CorpusNotFoundError, make_manifest, require_layout

log = logging.getLogger(__name__)

LABELS = "Labels/labels_consensus.csv"
LAYOUT = f"root/Audios/<FileName>.wav and root/{LABELS} (FileName, EmoClass, ..., Split_Set)"
OVERRIDE = "data.root=/path/to/MSP-Podcast"
COLUMNS: tuple[str, ...] = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID",
                            "Gender", "Split_Set")

#: consensus codes; X (no agreement) is left out
EMOTION_CODES: dict[str, str] = {
    "A": "anger",
    "S": "sadness",
    "H": "happiness",
    "U": "surprise",
    "F": "fear",
    "D": "disgust",
    "C": "contempt",
    "N": "neutral",
    "O": "other",
}
GENDERS: dict[str, str] = {"female": "female", "male": "male"}
UNKNOWN_SPEAKER = "unknown"


def read_msppodcast(root: str | Path, test_set: str = "Test1") -> pd.DataFrame:
    """List every labelled MSP-Podcast segment under ``root`` that has its audio.

    Dimensions are on the corpus's 1-7 scale. An ``Unknown`` speaker becomes a speaker of
    its own (``unknown/<segment>``): merging them into one speaker would make speaker-based
    splits meaningless. Extra columns: ``split`` and ``split_set`` (the official name).
    """
    path = require_layout("msppodcast", root, LAYOUT, OVERRIDE, "Audios", LABELS)
    labels = pd.read_csv(path / LABELS, dtype=str, keep_default_na=False)
    labels.columns = [str(c).strip() for c in labels.columns]
    absent = [c for c in COLUMNS if c not in labels.columns]
    if absent:
        raise ValueError(f"msppodcast: {path / LABELS} lacks column(s) {absent}; expected "
                         f"{list(COLUMNS)}, found {list(labels.columns)}")
    splits = {"train": "train", "development": "val", test_set.lower(): "test"}
    rows, no_audio = [], 0
    for record in labels.to_dict("records"):
        emotion = EMOTION_CODES.get(record["EmoClass"].strip().upper())
        if emotion is None:
            continue
        name = record["FileName"].strip()
        wav = path / "Audios" / name
        if not wav.is_file():
            no_audio += 1
            continue
        segment = Path(name).stem
        speaker = record["SpkrID"].strip()
        if not speaker or speaker.lower() == UNKNOWN_SPEAKER:
            speaker = f"{UNKNOWN_SPEAKER}/{segment}"
        split_set = record["Split_Set"].strip()
        rows.append({
            "id": segment,
            "path": str(wav),
            "emotion": emotion,
            "speaker": speaker,
            "gender": GENDERS.get(record["Gender"].strip().lower()),
            "corpus": "msppodcast",
            "valence": pd.to_numeric(record["EmoVal"], errors="coerce"),
            "arousal": pd.to_numeric(record["EmoAct"], errors="coerce"),
            "dominance": pd.to_numeric(record["EmoDom"], errors="coerce"),
            "split": splits.get(split_set.lower(), split_set.lower()),
            "split_set": split_set,
        })
    if no_audio:
        log.warning("msppodcast: %d labelled segment(s) have no file under %s/Audios",
                    no_audio, path)
    if not rows:
        raise CorpusNotFoundError("msppodcast", root, layout=LAYOUT, override=OVERRIDE)
    return make_manifest(rows)
