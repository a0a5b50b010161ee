"""Canonical emotion names and class selection on a manifest.

Every reader maps its corpus's own codes to the names in :data:`EMOTIONS`, so a
config can ask for ``[anger, happiness, neutral, sadness]`` on any corpus.
"""

from __future__ import annotations

import pandas as pd

#: The canonical, lower-case English emotion names used in every manifest.
EMOTIONS: tuple[str, ...] = (
    "anger",
    "boredom",
    "calm",
    "disgust",
    "fear",
    "happiness",
    "neutral",
    "sadness",
    "surprise",
    "excitement",
    "frustration",
    "other",
)


def select_classes(
    manifest: pd.DataFrame,
    classes: list[str],
    label_map: dict[str, str] | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep the utterances of ``classes``, after renaming emotions with ``label_map``.

    ``label_map`` merges categories first, e.g. ``{"excitement": "happiness"}`` for
    the usual IEMOCAP 4-class set. Returns the filtered manifest (fresh index, same
    columns) and how many rows were dropped per *original* emotion, so a run can
    log what it left out. Raises ValueError naming any requested class that has no
    utterance at all, which is almost always a typo or a wrong corpus.
    """
    if not classes:
        raise ValueError("select_classes needs at least one class")
    renamed = manifest["emotion"].replace(label_map or {})
    keep = renamed.isin(classes)
    missing = [name for name in classes if not (renamed == name).any()]
    if missing:
        available = sorted(renamed.dropna().unique())
        raise ValueError(
            f"no utterance has emotion {missing} (after label_map); this manifest has {available}"
        )
    dropped = manifest.loc[~keep, "emotion"].value_counts().sort_index()
    selected = manifest.loc[keep].copy()
    selected["emotion"] = renamed[keep]
    return selected.reset_index(drop=True), {str(k): int(v) for k, v in dropped.items()}
