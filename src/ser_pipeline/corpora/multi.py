"""Several corpora as one manifest (``data=multi``), each a domain.

Each corpus keeps its own ``corpus`` value (the domain label carried through the
batch); ids and speakers are prefixed with the corpus name so they never collide.
A per-corpus ``label_map`` renames categories into the shared label space; a
class a corpus lacks stays absent (the data module masks it out of that corpus's
softmax) and is never relabelled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ser_pipeline.corpora.manifest import make_manifest


def read_multi(root: str | Path | None, corpora: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """``corpora``: ``{name: {"reader": callable(root), "root": path, "label_map": {...}}}``.

    ``root`` is unused (each corpus has its own); it keeps the reader signature.
    """
    frames = []
    for name, spec in corpora.items():
        reader: Callable[[str], pd.DataFrame] = spec["reader"]
        frame = reader(spec["root"]).copy()
        frame["emotion"] = frame["emotion"].replace(dict(spec.get("label_map") or {}))
        frame["id"] = name + "/" + frame["id"].astype(str)
        frame["speaker"] = name + "/" + frame["speaker"].astype(str)
        frame["corpus"] = name
        frames.append(frame)
    if not frames:
        raise ValueError("data=multi needs at least one corpus under data.reader.corpora")
    return make_manifest(pd.concat(frames, ignore_index=True).to_dict("records"))
