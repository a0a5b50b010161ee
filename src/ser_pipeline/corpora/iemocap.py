"""IEMOCAP -> manifest, with the consensus category and valence/arousal/dominance.

Layout (``IEMOCAP_full_release``)::

    root/Session{1..5}/sentences/wav/<dialog>/<utterance>.wav
    root/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt

Each evaluation file has one header line per turn,
``[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]``,
followed by the evaluators' details (``C-``, ``A-`` lines) and comments (``%``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ser_pipeline.corpora.manifest import CorpusNotFoundError, make_manifest

LAYOUT = (
    "root/Session{1..5}/sentences/wav/<dialog>/<utterance>.wav and "
    "root/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt"
)
OVERRIDE = "data.root=/path/to/IEMOCAP_full_release"

#: Consensus categories -> canonical names; ``xxx`` (no agreement) is dropped.
EMOTION_CODES: dict[str, str] = {
    "neu": "neutral",
    "hap": "happiness",
    "exc": "excitement",
    "sad": "sadness",
    "ang": "anger",
    "fru": "frustration",
    "fea": "fear",
    "sur": "surprise",
    "dis": "disgust",
    "oth": "other",
}
NO_AGREEMENT = "xxx"

_SESSION_DIR = re.compile(r"^Session[1-5]$")
_NUMBER = r"([-+]?\d+(?:\.\d*)?)"
_TURN = re.compile(
    rf"^\[\s*{_NUMBER}\s*-\s*{_NUMBER}\s*\]\s+(?P<id>\S+)\s+(?P<code>\w+)\s+"
    rf"\[\s*{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\]"
)
_SPEAKER_SEX = re.compile(r"([FM])\d+$")


def parse_evaluation(path: Path) -> list[dict]:
    """Read one EmoEvaluation file into ``{id, code, valence, arousal, dominance}`` dicts.

    Only turn lines (``[start - end] id code [v, a, d]``) count; evaluator lines,
    comments, blank lines and the ``%`` header are skipped. V/A/D stay on the raw
    1-5 scale.
    """
    turns = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _TURN.match(line.strip())
        if match is None:
            continue
        _start, _end, valence, arousal, dominance = (float(match.group(i)) for i in (1, 2, 5, 6, 7))
        turns.append(
            {
                "id": match["id"],
                "code": match["code"].lower(),
                "valence": valence,
                "arousal": arousal,
                "dominance": dominance,
            }
        )
    return turns


def speaker_of(utterance_id: str) -> tuple[str, str]:
    """``Ses01F_impro01_M012`` -> ``("Ses01M", "male")``: the turn's speaker, not the dialog's.

    The letter before the trailing number of the id is the speaking actor's sex;
    the dialog prefix only says which actor wore the motion-capture markers.
    """
    match = _SPEAKER_SEX.search(utterance_id)
    if match is None or not utterance_id.startswith("Ses"):
        raise ValueError(f"IEMOCAP utterance id '{utterance_id}' does not end in F<n> or M<n>")
    sex = match.group(1)
    return utterance_id[:5] + sex, "female" if sex == "F" else "male"


def _read_session(session_dir: Path) -> list[dict]:
    wavs = {wav.stem: wav for wav in (session_dir / "sentences" / "wav").glob("*/*.wav")}
    rows = []
    for evaluation in sorted((session_dir / "dialog" / "EmoEvaluation").glob("*.txt")):
        for turn in parse_evaluation(evaluation):
            code = turn.pop("code")
            if code == NO_AGREEMENT or turn["id"] not in wavs:
                continue
            if code not in EMOTION_CODES:
                raise ValueError(f"{evaluation}: unknown IEMOCAP category '{code}'")
            speaker, gender = speaker_of(turn["id"])
            rows.append(
                {
                    **turn,
                    "path": str(wavs[turn["id"]]),
                    "emotion": EMOTION_CODES[code],
                    "speaker": speaker,
                    "gender": gender,
                    "corpus": "iemocap",
                    "session": session_dir.name,
                    "dialog": wavs[turn["id"]].parent.name,
                }
            )
    return rows


def read_iemocap(root: str | Path) -> pd.DataFrame:
    """List every IEMOCAP utterance that has both a wav file and a consensus label.

    Turns labelled ``xxx`` are dropped. Extra columns: ``session`` ("Session1".."Session5",
    the unit of the standard leave-one-session-out protocol) and ``dialog``.
    """
    path = Path(root).expanduser().absolute()
    sessions = (
        sorted(
            d
            for d in path.iterdir()
            if _SESSION_DIR.match(d.name)
            and (d / "sentences" / "wav").is_dir()
            and (d / "dialog" / "EmoEvaluation").is_dir()
        )
        if path.is_dir()
        else []
    )
    if not sessions:
        raise CorpusNotFoundError("iemocap", root, layout=LAYOUT, override=OVERRIDE)
    rows = [row for session in sessions for row in _read_session(session)]
    if not rows:
        raise CorpusNotFoundError("iemocap", root, layout=LAYOUT, override=OVERRIDE)
    return make_manifest(rows)
