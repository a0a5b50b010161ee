"""allocator.keep_freed_memory: glibc keeps freed memory for the next batch (no re-faulting)."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: in a fresh process: malloc 20 MiB, free it, report the heap glibc still holds (mallinfo2)
PROBE = """
import ctypes, sys
from ser_pipeline.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
block = libc.malloc(20 * 2**20)
mapped = libc.mallinfo2().hblkhd  # bytes in chunks of their own mmap
libc.free(block)
print(mapped, libc.mallinfo2().fordblks)  # ... and free bytes the heap keeps
"""


def probe(mode: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"} | {"PYTHONPATH": ":".join(sys.path)})
    assert done.returncode == 0, done.stderr
    mapped, kept = (int(x) for x in done.stdout.split())
    return mapped, kept


def glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018 - glibc >= 2.33
    except AttributeError:
        return False
    return sys.platform.startswith("linux")


@pytest.mark.skipif(not glibc(), reason="mallopt / mallinfo2 are glibc's (Linux)")
def test_freed_batch_memory_stays_in_the_heap_instead_of_going_back_to_the_kernel():
    mapped, kept = probe("default")
    assert mapped >= 20 * 2**20 and kept < 20 * 2**20  # its own mmap, unmapped when freed
    mapped, kept = probe("keep")
    assert mapped < 20 * 2**20 <= kept  # from the heap, kept there for the next batch


@pytest.mark.parametrize("variable, value", [("MALLOC_TRIM_THRESHOLD_", "131072"),
                                             ("SER_PIPELINE_MALLOC", "system")])
def test_a_users_own_malloc_settings_are_left_alone(monkeypatch, variable, value):
    from ser_pipeline.allocator import keep_freed_memory

    monkeypatch.setenv(variable, value)
    assert keep_freed_memory() is False
