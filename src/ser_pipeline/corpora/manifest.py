"""The manifest: the one table every corpus reader produces.

Everything after a corpus reader reads the manifest, never the corpus layout
(the SpeechBrain-recipe idea). One row per utterance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ser_pipeline.files import atomic_write_text

#: Required columns, in order. ``gender`` is "female", "male" or None;
#: ``valence``/``arousal``/``dominance`` are floats, NaN where the corpus lacks them.
#: Readers may add extra columns (e.g. ``session`` for IEMOCAP, ``domain``).
MANIFEST_COLUMNS: tuple[str, ...] = (
    "id",
    "path",
    "emotion",
    "speaker",
    "gender",
    "corpus",
    "valence",
    "arousal",
    "dominance",
)
DIMENSIONS: tuple[str, ...] = ("valence", "arousal", "dominance")
#: columns that are text even when every value looks like a number (speaker "03")
TEXT_COLUMNS: tuple[str, ...] = ("id", "path", "emotion", "speaker", "gender", "corpus",
                                 "split", "session", "part")
GENDERS: tuple[str, ...] = ("female", "male")


class CorpusNotFoundError(FileNotFoundError):
    """A corpus root is missing or does not have the expected layout."""

    def __init__(self, corpus: str, root: str | Path, layout: str, override: str) -> None:
        self.corpus, self.root = corpus, Path(root)
        super().__init__(
            f"{corpus}: no corpus found at '{root}'.\n"
            f"Expected layout: {layout}\n"
            f"Point the pipeline at your copy with: {override}"
        )


def make_manifest(rows: list[dict]) -> pd.DataFrame:
    """Build a manifest from row dicts, filling missing optional fields.

    Missing ``gender`` becomes None, missing dimensions become NaN; rows are sorted
    by id so that every reader's output is deterministic.
    """
    frame = pd.DataFrame(rows)
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = np.nan if column in DIMENSIONS else None
    for column in DIMENSIONS:
        frame[column] = frame[column].astype(float)
    frame["path"] = frame["path"].astype(str)
    frame["speaker"] = frame["speaker"].astype(str)
    extra = [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    frame = frame[list(MANIFEST_COLUMNS) + extra]
    return frame.sort_values("id", kind="stable").reset_index(drop=True)


def validate_manifest(frame: pd.DataFrame) -> None:
    """Raise ValueError when a manifest lacks columns or has duplicate ids."""
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}")
    duplicated = frame["id"][frame["id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"manifest has duplicate utterance ids, e.g. {duplicated[:3]}")
    bad_gender = set(frame["gender"].dropna()) - set(GENDERS)
    if bad_gender:
        raise ValueError(f"manifest has unknown gender values {sorted(bad_gender)}")


def write_manifest(frame: pd.DataFrame, path: str | Path) -> Path:
    """``frame`` as a CSV table at ``path`` (written atomically); :func:`read_manifest` reads it.

    The file is what a run trained on, for a person to open and for every later step (a
    cross-validation's worker processes) to read, instead of a table handed over in memory.
    """
    return atomic_write_text(path, frame.to_csv(index=False))


def read_manifest(path: str | Path) -> pd.DataFrame:
    """A manifest from :func:`write_manifest`, typed as :func:`make_manifest` types it.

    The manifest's text columns stay text (ids and speakers such as ``"03"`` keep their
    zeros), missing where blank; the dimensions are floats (NaN where blank), and so is an extra
    column whose every cell is a number (e.g. the synthetic corpus's ``duration``).
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in frame.columns:
        blank = frame[column] == ""
        numbers = pd.to_numeric(frame[column].where(~blank), errors="coerce")
        if column in DIMENSIONS or (column not in TEXT_COLUMNS
                                    and numbers.notna().sum() == (~blank).sum()):
            frame[column] = numbers.astype(float)
        else:
            frame[column] = frame[column].where(~blank)  # text, missing where blank
    validate_manifest(frame)
    return frame


def require_layout(
    corpus: str, root: str | Path, layout: str, override: str, *required: str
) -> Path:
    """Return ``root`` as an absolute path, or raise CorpusNotFoundError at once.

    ``required`` are paths relative to ``root`` that must exist (files or folders);
    checking them up front turns a wrong ``data.root`` into one clear message instead
    of an empty manifest that fails much later.
    """
    path = Path(root).expanduser().absolute()
    if not path.is_dir() or any(not (path / part).exists() for part in required):
        raise CorpusNotFoundError(corpus, root, layout=layout, override=override)
    return path
