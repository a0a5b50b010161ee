"""On-disk feature cache keyed by the extractor's config and each file's content.

Why hand-written: no library in our stack caches per-file tensors keyed by
content with atomic writes. Entries are safetensors files written to a temporary
name and renamed into place (atomic on POSIX), so two runs sharing one cache
never see half-written entries; each entry stores a checksum of its data, and an
entry that fails to load or verify is deleted and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ser_pipeline.audio import AudioError
from ser_pipeline.files import atomic_path, atomic_write_text


class CacheWriteError(OSError):
    """The cache could not store something (disk full, file size limit, read-only disk).

    Nothing partial is left behind: a later ``get`` finds no entry or a complete one.
    """

    def __init__(self, folder: Path, error: BaseException) -> None:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        super().__init__(
            f"cannot write to the feature cache {folder} ({reason}); free disk space, point "
            "paths.cache_dir elsewhere or run without the cache (data.cache_dir=null)")


def config_digest(config: dict) -> str:
    """Stable short hash of a JSON-able config."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (content, not name or mtime, keys the cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.contiguous().numpy().tobytes(), digest_size=16).hexdigest()


class FeatureCache:
    """``root/<config digest>/<content digest>.safetensors``."""

    def __init__(self, root: str | Path, extractor_config: dict) -> None:
        self.folder = Path(root) / config_digest(extractor_config)
        config_file = self.folder / "config.json"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not config_file.exists():
                atomic_write_text(config_file,
                                  json.dumps(extractor_config, sort_keys=True, indent=1))
        except OSError as error:
            raise CacheWriteError(self.folder, error) from error
        self.hits = 0
        self.misses = 0

    def entry(self, content_digest: str) -> Path:
        return self.folder / content_digest[:2] / f"{content_digest}.safetensors"

    def get(self, content_digest: str) -> torch.Tensor | None:
        path = self.entry(content_digest)
        if not path.exists():
            return None
        try:
            with safe_open(path, framework="pt") as stored:
                metadata = stored.metadata() or {}
                tensor = stored.get_tensor("features")
            if metadata.get("blake2b") != _tensor_digest(tensor):
                raise ValueError("checksum mismatch")
        except (SafetensorError, OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # corrupt: recompute, never trust
            return None
        return tensor

    def put(self, content_digest: str, tensor: torch.Tensor) -> None:
        path = self.entry(content_digest)
        # float16 stays float16 (SSL hidden states: half the disk); anything else is float32
        dtype = torch.float16 if tensor.dtype == torch.float16 else torch.float32
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        try:
            with atomic_path(path) as tmp:
                save_file({"features": tensor}, str(tmp),
                          metadata={"blake2b": _tensor_digest(tensor)})
        except (OSError, SafetensorError) as error:  # safetensors reports ENOSPC as its own
            raise CacheWriteError(self.folder, error) from error


def extract_features(
    paths: Sequence[str],
    compute: Callable[[str], torch.Tensor],
    cache: FeatureCache | None,
    description: str = "features",
    progress: bool = True,
) -> tuple[list[torch.Tensor | None], dict[str, str]]:
    """Features for every path, from the cache where possible.

    Returns one tensor per path (None for files that could not be decoded) and
    ``{path: reason}`` for those skipped files, so callers can count and report them.
    """
    results: list[torch.Tensor | None] = []
    skipped: dict[str, str] = {}
    for path in tqdm(paths, desc=description, disable=not progress, leave=False):
        try:
            digest = file_digest(path) if cache is not None else ""
        except OSError as error:
            skipped[path] = f"cannot read file ({error.strerror or error})"
            results.append(None)
            continue
        tensor = cache.get(digest) if cache is not None else None
        if tensor is not None:
            cache.hits += 1
            results.append(tensor)
            continue
        try:
            tensor = compute(path)
        except AudioError as error:
            skipped[path] = error.reason
            results.append(None)
            continue
        if cache is not None:
            cache.misses += 1
            cache.put(digest, tensor)
        results.append(tensor)
    return results, skipped
