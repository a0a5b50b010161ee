"""Resource errors: a full disk, a file size limit, a read-only tree, an unreachable store.

Each must give a clear message naming what failed and leave no corrupted state
behind (no partial cache entry, no half-written temporary file).

A full disk is a real one: a 64 KiB tmpfs (needs root, as these tests run in CI; the
tests skip when mounting is not permitted). The same failure without root comes from
``RLIMIT_FSIZE`` in a forked child, where writes past the limit fail with EFBIG.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ser_pipeline.corpora import generate_synthetic_corpus, read_emodb, read_synthetic
from ser_pipeline.data import SERDataModule
from ser_pipeline.features import LogMelFeatures
from ser_pipeline.features.cache import CacheWriteError, FeatureCache
from ser_pipeline.tracking import TrackingUnavailableError, check_tracking_store
from tests.corpus_trees import EMODB_FILES, build_emodb_tree

DIGEST = "ab" * 32
BIG = torch.randn(1, 64, 1000)  # 256 KB: more than the tiny disk holds
SMALL = torch.randn(1, 4, 5)


def _mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: writes beyond it fail with ENOSPC, as on a full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount(["-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


class ReadOnlyFolder:
    """A folder this process cannot write to once sealed; fill ``path`` before ``seal()``.

    Root ignores permission bits, so as root the folder becomes a read-only bind mount.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False
        path.mkdir()

    def seal(self) -> None:
        if os.geteuid() != 0:
            for item in [self.path, *self.path.rglob("*")]:
                item.chmod(item.stat().st_mode & ~0o222)
            return
        if not _mount(["--bind", str(self.path), str(self.path)]):
            pytest.skip("cannot bind-mount here (needs root)")
        self.mounted = True
        if not _mount(["-o", "remount,ro,bind", str(self.path)]):
            pytest.skip("cannot remount read-only here")

    def release(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=True)
        elif os.geteuid() != 0:
            for item in [self.path, *self.path.rglob("*")]:
                item.chmod(item.stat().st_mode | 0o200)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[ReadOnlyFolder]:
    folder = ReadOnlyFolder(tmp_path / "ro")
    try:
        yield folder
    finally:
        folder.release()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".tmp-"))


# --------------------------------------------------------------------------- full disk


def test_full_disk_while_caching_names_the_cache_and_the_way_out(tiny_disk):
    cache = FeatureCache(tiny_disk / "cache", {"name": "x"})
    with pytest.raises(CacheWriteError) as caught:
        cache.put(DIGEST, BIG)
    message = str(caught.value)
    assert str(cache.folder) in message and "No space left on device" in message
    assert "data.cache_dir=null" in message


def test_full_disk_leaves_no_partial_cache_entry(tiny_disk):
    cache = FeatureCache(tiny_disk / "cache", {"name": "x"})
    with pytest.raises(CacheWriteError):
        cache.put(DIGEST, BIG)
    assert not cache.entry(DIGEST).exists()
    assert leftovers(tiny_disk) == []
    assert cache.get(DIGEST) is None


def test_full_disk_keeps_earlier_entries_valid(tiny_disk):
    cache = FeatureCache(tiny_disk / "cache", {"name": "x"})
    cache.put("cd" * 32, SMALL)
    with pytest.raises(CacheWriteError):
        cache.put(DIGEST, BIG)
    assert torch.equal(cache.get("cd" * 32), SMALL)


def test_cache_works_again_once_space_is_freed(tiny_disk):
    filler = tiny_disk / "filler"
    cache = FeatureCache(tiny_disk / "cache", {"name": "x"})
    with pytest.raises(OSError), open(filler, "wb") as out:
        out.write(b"\0" * 128 * 1024)
    with pytest.raises(CacheWriteError):
        cache.put(DIGEST, SMALL)
    filler.unlink()
    cache.put(DIGEST, SMALL)
    assert torch.equal(cache.get(DIGEST), SMALL)


def test_full_disk_when_opening_a_cache_leaves_no_temp_file(tiny_disk):
    with pytest.raises(OSError), open(tiny_disk / "filler", "wb") as out:
        out.write(b"\0" * 128 * 1024)  # fill the disk to the last block
    with pytest.raises(CacheWriteError, match="No space left on device"):
        FeatureCache(tiny_disk / "cache", {"name": "x"})
    assert leftovers(tiny_disk) == []


@pytest.mark.timeout(120)
def test_full_disk_stops_data_setup_with_the_cache_error(tiny_disk, tmp_path):
    root = tmp_path / "corpus"
    reader = functools.partial(read_synthetic, n_speakers=3, utterances_per_class=1)
    reader(root)
    datamodule = SERDataModule(
        name="synthetic", reader=reader, root=str(root), features=LogMelFeatures(n_mels=64),
        classes=["anger", "happiness", "neutral", "sadness"], split="loso", val_speakers=1,
        cache_dir=str(tiny_disk / "cache"), progress=False)
    with pytest.raises(CacheWriteError, match="No space left on device"):
        datamodule.setup()
    assert leftovers(tiny_disk) == []


def _in_child_with_file_size_limit(limit: int, work) -> dict:
    """Run ``work()`` in a forked child limited to files of ``limit`` bytes; its JSON reply."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            os.write(write_end, json.dumps(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as reply:
        text = reply.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child failed"
    return json.loads(text)


def test_file_size_limit_while_caching_is_a_clear_error_and_leaves_nothing(tmp_path):
    cache = FeatureCache(tmp_path / "cache", {"name": "x"})

    def put_big() -> dict:
        try:
            cache.put(DIGEST, BIG)
        except CacheWriteError as error:
            return {"error": str(error)}
        return {"error": None}

    reply = _in_child_with_file_size_limit(16 * 1024, put_big)
    assert reply["error"] and "File too large" in reply["error"]
    assert str(cache.folder) in reply["error"]
    assert leftovers(tmp_path) == [] and cache.get(DIGEST) is None
    cache.put(DIGEST, BIG)  # without the limit, the same entry is written and read back
    assert torch.equal(cache.get(DIGEST), BIG)


# --------------------------------------------------------------------------- read-only trees


def test_emodb_reader_works_on_a_read_only_tree(read_only):
    build_emodb_tree(read_only.path)
    read_only.seal()
    manifest = read_emodb(read_only.path)
    assert sorted(Path(p).name for p in manifest["path"]) == sorted(EMODB_FILES)


def test_synthetic_corpus_already_there_is_read_from_a_read_only_tree(read_only):
    generate_synthetic_corpus(read_only.path / "corpus", n_speakers=1, utterances_per_class=1)
    read_only.seal()
    manifest = read_synthetic(read_only.path / "corpus", n_speakers=1, utterances_per_class=1)
    assert len(manifest) == 4 and all(Path(p).is_file() for p in manifest["path"])


def test_synthetic_generator_fails_on_a_read_only_root(read_only):
    read_only.seal()
    with pytest.raises(OSError) as caught:
        generate_synthetic_corpus(read_only.path / "corpus", n_speakers=1, utterances_per_class=1)
    assert str(read_only.path) in str(caught.value)
    assert not (read_only.path / "corpus").exists()


def test_synthetic_generator_names_its_root_when_not_writable(read_only):
    read_only.seal()
    root = read_only.path / "corpus"
    with pytest.raises(OSError, match=f"{root}.*(writable|data.root)"):
        generate_synthetic_corpus(root, n_speakers=1, utterances_per_class=1)


def test_sqlite_store_in_a_read_only_folder_is_refused_naming_it(read_only):
    read_only.seal()
    uri = f"sqlite:///{read_only.path / 'mlflow.db'}"
    with pytest.raises(TrackingUnavailableError, match="not writable") as caught:
        check_tracking_store(uri)
    assert uri in str(caught.value)


def test_sqlite_store_that_cannot_be_created_is_refused_naming_it(read_only):
    read_only.seal()
    uri = f"sqlite:///{read_only.path / 'mlruns' / 'mlflow.db'}"
    with pytest.raises(TrackingUnavailableError, match="cannot create") as caught:
        check_tracking_store(uri)
    assert uri in str(caught.value)


# --------------------------------------------------------------------------- tracking server


def closed_port() -> int:
    """A local port nothing listens on (bound, read, released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(30)
def test_unreachable_tracking_server_is_named_in_the_error():
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(TrackingUnavailableError, match="unreachable") as caught:
        check_tracking_store(uri, timeout_s=2.0)
    assert uri in str(caught.value)
    assert "logger=none" in str(caught.value)  # and the way to run without it


def test_plain_file_store_is_refused_before_mlflow_sees_it(tmp_path):
    with pytest.raises(TrackingUnavailableError, match="plain file store"):
        check_tracking_store(str(tmp_path / "mlruns"))


# --------------------------------------------------------------------------- killed writers


def test_temp_file_of_a_killed_writer_is_never_read_as_an_entry(tmp_path):
    cache = FeatureCache(tmp_path, {"name": "x"})
    entry = cache.entry(DIGEST)
    entry.parent.mkdir(parents=True)
    # what a writer killed mid-save leaves: half a safetensors file under a temporary name
    cache.put("cd" * 32, BIG)
    half = cache.entry("cd" * 32).read_bytes()[:5000]
    (entry.parent / ".tmp-killed.safetensors").write_bytes(half)
    assert cache.get(DIGEST) is None


def test_temp_file_of_a_killed_writer_does_not_block_the_next_put(tmp_path):
    cache = FeatureCache(tmp_path, {"name": "x"})
    entry = cache.entry(DIGEST)
    entry.parent.mkdir(parents=True)
    (entry.parent / ".tmp-killed.safetensors").write_bytes(b"\x08\x00\x00\x00half")
    cache.put(DIGEST, SMALL)
    assert torch.equal(cache.get(DIGEST), SMALL)


def test_killed_config_writer_leaves_a_cache_that_still_opens(tmp_path):
    first = FeatureCache(tmp_path, {"name": "x"})
    (first.folder / "config.json").unlink()
    (first.folder / ".tmp-killed").write_text('{"name": ')  # the rename never happened
    second = FeatureCache(tmp_path, {"name": "x"})
    assert json.loads((second.folder / "config.json").read_text()) == {"name": "x"}


def test_full_disk_while_checkpointing_leaves_no_truncated_checkpoint(tiny_disk):
    import torch

    from ser_pipeline.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    io.save_checkpoint({"small": torch.zeros(10)}, tiny_disk / "last.ckpt")
    before = (tiny_disk / "last.ckpt").read_bytes()
    with pytest.raises(OSError):
        io.save_checkpoint({"big": torch.zeros(1_000_000)}, tiny_disk / "last.ckpt")
    assert (tiny_disk / "last.ckpt").read_bytes() == before  # the previous one, intact
    assert leftovers(tiny_disk) == []
    assert torch.load(tiny_disk / "last.ckpt", weights_only=True)["small"].shape == (10,)
