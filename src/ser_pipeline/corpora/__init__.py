"""Corpus readers: each turns one corpus's folder layout into a manifest.

Every reader has the signature ``read_<corpus>(root, **options) -> DataFrame`` and
returns :func:`make_manifest` rows (see :data:`MANIFEST_COLUMNS`) with canonical
emotion names (:data:`EMOTIONS`). Nothing after this package looks at a corpus layout.
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
    require_layout,
    validate_manifest,
)
from ser_pipeline.corpora.msppodcast import read_msppodcast
from ser_pipeline.corpora.ravdess import read_ravdess
from ser_pipeline.corpora.synthetic import generate_synthetic_corpus, read_synthetic
from ser_pipeline.corpora.table import TableError, read_table

#: Reader per corpus name, as used by ``conf/data/<name>.yaml``.
READERS = {
    "synthetic": read_synthetic,
    "emodb": read_emodb,
    "ravdess": read_ravdess,
    "iemocap": read_iemocap,
    "cremad": read_cremad,
    "msppodcast": read_msppodcast,
    "manifest": read_table,
}

__all__ = [
    "DIMENSIONS",
    "EMOTIONS",
    "GENDERS",
    "MANIFEST_COLUMNS",
    "READERS",
    "CorpusNotFoundError",
    "TableError",
    "generate_synthetic_corpus",
    "make_manifest",
    "read_cremad",
    "read_emodb",
    "read_iemocap",
    "read_msppodcast",
    "read_ravdess",
    "read_synthetic",
    "read_table",
    "require_layout",
    "select_classes",
    "validate_manifest",
]
