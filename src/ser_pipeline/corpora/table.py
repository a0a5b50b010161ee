"""Any corpus from a table (``data=manifest``): a CSV or JSON-lines file -> manifest.

One row per utterance. Required columns: ``path`` (relative to the table's folder, or
absolute), ``emotion``, ``speaker``. Optional: ``id`` (default: the path relative to the
table's folder, without its suffix), ``gender`` (female/male, f/m, any case; blank =
unknown), ``valence``, ``arousal``, ``dominance`` (numbers; blank = unknown) and
``split`` (train/val/test, used by ``data.split=predefined``). Further columns are kept.

Everything is checked before any audio is read, and each problem is a named
:class:`TableError` that says what to fix.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ser_pipeline.corpora.manifest import DIMENSIONS, CorpusNotFoundError, make_manifest
from ser_pipeline.splits import PREDEFINED_PARTS, speakers_in_several_parts

log = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("path", "emotion", "speaker")
OPTIONAL_COLUMNS: tuple[str, ...] = ("id", "gender", *DIMENSIONS, "split")
#: accepted spellings of the genders (lower-cased before lookup); blank means unknown
GENDER_SPELLINGS: dict[str, str] = {"female": "female", "f": "female",
                                    "male": "male", "m": "male"}
#: accepted spellings of the predefined parts
SPLIT_SPELLINGS: dict[str, str] = {"train": "train", "training": "train", "val": "val",
                                   "valid": "val", "validation": "val", "dev": "val",
                                   "development": "val", "test": "test"}
#: ``data.missing``: what to do with rows whose audio file does not exist
MISSING_POLICIES = ("fail", "skip")
LAYOUT = ("a CSV (.csv, .tsv) or JSON-lines (.jsonl, .json) table with columns path, emotion, "
          "speaker and optionally id, gender, valence, arousal, dominance, split")
OVERRIDE = "data.manifest=/path/to/labels.csv"


class TableError(ValueError):
    """A corpus table that cannot be used as it is; the message says what to fix."""


class MissingColumnError(TableError):
    """A required column is absent."""


class EmptyTableError(TableError):
    """The table has no rows, or required cells are blank."""


class MissingAudioError(TableError):
    """Rows whose audio file does not exist (``data.missing=skip`` leaves them out)."""


class UnknownGenderError(TableError):
    """A gender value that is neither female nor male (nor blank)."""


class NonNumericDimensionError(TableError):
    """A valence/arousal/dominance value that is not a number (nor blank)."""


class UnknownSplitError(TableError):
    """A ``split`` value that is not train/val/test (nor one of their spellings)."""


class SpeakerInSeveralSplitsError(TableError):
    """A speaker in two predefined parts: its test utterances would not be unseen."""


def _load(path: Path) -> pd.DataFrame:
    """The table's cells; header names stripped and lower-cased (``Path`` -> ``path``)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        text = path.read_text(encoding="utf-8-sig")
        if not text.strip():
            return pd.DataFrame()
        # JSON lines, or (.json) one array of records
        lines = not (suffix == ".json" and text.lstrip().startswith("["))
        frame = pd.read_json(io.StringIO(text), lines=lines, dtype=False)
        frame = frame.astype(object).where(frame.notna(), None)
    else:
        try:  # every cell as text: ids such as "0012" and speakers "03" keep their zeros
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str,
                                keep_default_na=False, encoding="utf-8-sig")
        except pd.errors.EmptyDataError:
            return pd.DataFrame()
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return frame


def _text(values: pd.Series) -> pd.Series:
    """Cells as stripped strings, None where blank."""
    text = values.map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v))
                      else str(v).strip())
    return text.where(text.astype(bool) & text.notna(), None)


def _rows(mask: pd.Series, limit: int = 5) -> str:
    """Table line numbers (header = line 1) of the first rows in ``mask``."""
    lines = (np.flatnonzero(mask.to_numpy()) + 2).tolist()
    more = f" and {len(lines) - limit} more" if len(lines) > limit else ""
    return ", ".join(map(str, lines[:limit])) + more


def read_table(root: str | Path, missing: str = "fail", corpus: str = "manifest") -> pd.DataFrame:
    """The manifest of the corpus listed in the table at ``root``.

    ``missing``: ``fail`` (default) raises :class:`MissingAudioError` with the count and
    the first missing paths; ``skip`` leaves those rows out (logged). ``corpus`` fills the
    ``corpus`` column unless the table has one. Raises a :class:`TableError` subclass for
    every other problem, before any audio is read.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"data.missing must be one of {MISSING_POLICIES}, not {missing!r}")
    table = Path(root).expanduser().absolute()
    if not table.is_file():
        raise CorpusNotFoundError("manifest", root, layout=LAYOUT, override=OVERRIDE)
    frame = _load(table)
    absent = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if absent:
        raise MissingColumnError(
            f"{table}: missing column(s) {absent}; found {list(map(str, frame.columns))}. "
            f"Required: {list(REQUIRED_COLUMNS)}; optional: {list(OPTIONAL_COLUMNS)}")
    if frame.empty:
        raise EmptyTableError(f"{table}: the table has a header but no rows")
    frame = frame.reset_index(drop=True)
    for column in REQUIRED_COLUMNS:
        frame[column] = _text(frame[column])
        blank = frame[column].isna()
        if blank.any():
            raise EmptyTableError(f"{table}: {int(blank.sum())} row(s) have no {column} "
                                  f"(lines {_rows(blank)})")
    frame["emotion"] = frame["emotion"].str.lower()

    if "gender" in frame.columns:
        spelled = _text(frame["gender"]).str.lower()
        frame["gender"] = spelled.map(GENDER_SPELLINGS)
        unknown = spelled.notna() & frame["gender"].isna()
        if unknown.any():
            raise UnknownGenderError(
                f"{table}: unknown gender value(s) {sorted(spelled[unknown].unique())} "
                f"(lines {_rows(unknown)}); use female or male (f/m), blank when unknown")
    for column in DIMENSIONS:
        if column not in frame.columns:
            continue
        text = _text(frame[column])
        numbers = pd.to_numeric(text, errors="coerce")
        bad = text.notna() & numbers.isna()
        if bad.any():
            raise NonNumericDimensionError(
                f"{table}: non-numeric {column} value(s) {sorted(text[bad].unique())[:5]} "
                f"(lines {_rows(bad)}); give numbers, blank when unknown")
        frame[column] = numbers.astype(float)
    if "split" in frame.columns:
        spelled = _text(frame["split"]).str.lower()
        frame["split"] = spelled.map(SPLIT_SPELLINGS)
        unknown = frame["split"].isna()
        if unknown.any():
            raise UnknownSplitError(
                f"{table}: split value(s) {sorted(spelled[unknown].dropna().unique())} "
                f"(lines {_rows(unknown)}) are not {list(PREDEFINED_PARTS)}")
        crossing = speakers_in_several_parts(frame)
        if crossing:
            examples = "; ".join(f"{s} in {'+'.join(p)}" for s, p in list(crossing.items())[:5])
            raise SpeakerInSeveralSplitsError(
                f"{table}: {len(crossing)} speaker(s) are in more than one predefined split "
                f"({examples}): test speakers must be unseen in training. Give every "
                "speaker one split, or drop the split column and use data.split=loso")

    folder = table.parent
    frame["path"] = [str(p if p.is_absolute() else folder / p)
                     for p in map(Path, frame["path"])]
    if "id" in frame.columns:
        frame["id"] = _text(frame["id"])
        fallback = frame["id"].isna()
    else:
        fallback = pd.Series(True, index=frame.index)
    frame.loc[fallback, "id"] = [
        Path(p).relative_to(folder).with_suffix("").as_posix() if Path(p).is_relative_to(folder)
        else Path(p).with_suffix("").as_posix() for p in frame.loc[fallback, "path"]]
    duplicated = frame["id"].duplicated(keep=False)
    if duplicated.any():
        raise TableError(f"{table}: duplicate utterance ids {sorted(frame['id'][duplicated])[:5]} "
                         f"(lines {_rows(duplicated)}); give each row its own path or id")

    exists = frame["path"].map(lambda p: Path(p).is_file())
    if not exists.all():
        gone = frame.loc[~exists, "path"].tolist()
        listing = "\n".join(f"  {p}" for p in gone[:5]) + (
            f"\n  ... and {len(gone) - 5} more" if len(gone) > 5 else "")
        if missing == "fail":
            raise MissingAudioError(
                f"{table}: {len(gone)} of {len(frame)} audio file(s) do not exist:\n{listing}\n"
                "Fix the paths (relative paths are taken from the table's folder) or skip "
                "those rows with data.missing=skip")
        log.warning("%s: skipping %d row(s) whose audio does not exist (data.missing=skip):\n%s",
                    table, len(gone), listing)
        frame = frame[exists].reset_index(drop=True)
        if frame.empty:
            raise EmptyTableError(f"{table}: no row's audio file exists")
    if "corpus" not in frame.columns:
        frame["corpus"] = corpus
    return make_manifest(frame.to_dict("records"))
