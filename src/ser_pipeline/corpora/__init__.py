"""Corpus readers: each turns one corpus's folder layout into a manifest.

Every reader has the signature ``read_<corpus>(root, **options) -> DataFrame`` and
returns :func:`make_manifest` rows (see :data:`MANIFEST_COLUMNS`) with canonical
emotion names (:data:`EMOTIONS`). Nothing after this package looks at a corpus layout.
``conf/data/<name>.yaml`` names its reader as ``reader._target_``; :func:`write_manifest`
and :func:`read_manifest` keep a manifest on disk (a run's ``manifest.csv``).
"""

from __future__ import annotations

from ser_pipeline.corpora.cremad import read_cremad
from ser_pipeline.corpora.emodb import read_emodb
from ser_pipeline.corpora.iemocap import read_iemocap
from ser_pipeline.corpora.labels import EMOTIONS, select_classes
from ser_pipeline.corpora.manifest import (
    DIMENSIONS,
    GENDERS,
    MANIFEST_COLUMNS,
    CorpusNotFoundError,
    make_manifest,
    read_manifest,
    require_layout,
    validate_manifest,
    write_manifest,
)
from ser_pipeline.corpora.msppodcast import read_msppodcast
from ser_pipeline.corpora.ravdess import read_ravdess
from ser_pipeline.corpora.synthetic import generate_synthetic_corpus, read_synthetic
from ser_pipeline.corpora.table import TableError, read_table

__all__ = [
    "DIMENSIONS",
    "EMOTIONS",
    "GENDERS",
    "MANIFEST_COLUMNS",
    "CorpusNotFoundError",
    "TableError",
    "generate_synthetic_corpus",
    "make_manifest",
    "read_cremad",
    "read_emodb",
    "read_iemocap",
    "read_manifest",
    "read_msppodcast",
    "read_ravdess",
    "read_synthetic",
    "read_table",
    "require_layout",
    "select_classes",
    "validate_manifest",
    "write_manifest",
]
