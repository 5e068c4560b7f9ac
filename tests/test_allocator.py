"""The malloc tuning of server processes, checked in a fresh interpreter: mallopt's arena
limit only holds for threads started after it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from asynccas import allocator

# Starts threads that each allocate megabyte buffers, then counts malloc's heaps (arenas) in
# malloc_info's XML, read back through a memory stream.
_COUNT_ARENAS = """
import ctypes, sys, threading
from asynccas.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
barrier = threading.Barrier(8)
def churn():
    barrier.wait()
    for size in range(1 << 20, 1 << 21, 1 << 16):
        buffers = [bytearray(size) for _ in range(4)]
        del buffers
threads = [threading.Thread(target=churn) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc.open_memstream.restype = ctypes.c_void_p
libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
text, length = ctypes.c_char_p(), ctypes.c_size_t()
stream = libc.open_memstream(ctypes.byref(text), ctypes.byref(length))
libc.malloc_info(0, stream)
libc.fclose(stream)
print(text.value.decode().count("<heap nr="))
"""


def _arenas(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _COUNT_ARENAS, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_server_processes_use_at_most_arena_max_malloc_arenas() -> None:
    # Untuned, glibc gives threads that contend their own arenas (up to 8 per core), each
    # keeping freed buffers; that is what the limit is for.
    assert _arenas("untuned") > allocator.ARENA_MAX
    assert _arenas("tuned") <= allocator.ARENA_MAX
