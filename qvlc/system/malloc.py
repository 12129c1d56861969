"""The C heap under ONNX Runtime's calls (glibc): where their large buffers come from, and handing freed pages
back to the OS. A leaf: the runtime, the proof and the compiler all use it."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Iterator

# glibc's mallopt parameters and their defaults (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_THRESHOLD = 128 * 1024
_reuse_lock = threading.Lock()
_reusing = [0]  # how many heap_reuse blocks are open (threads and nesting)


@contextlib.contextmanager
def heap_reuse(threshold: int = 1 << 30) -> Iterator[None]:
    """Serve allocations up to ``threshold`` bytes from the heap, and keep what is freed there for the next call,
    while graphs run. ONNX Runtime's CPU provider computes an fp16 MatMul in fp32, casting the weight into a
    new fp32 buffer on every call. Above glibc's mmap threshold (at most 32 MB) each such buffer is a fresh
    mapping whose every page the kernel zero-fills and faults in, then unmaps on free; this is what bound
    validation's decode steps. Measured: a decode-sized fp16 MatMul ([1, 1536] x [1536, 8960]) takes 28 ms that
    way and 8.4 ms with the buffer reused from the heap, against 2.2 ms in fp32
    (``benchmarks/bench_fp16_matmul.py --k 1536 --n 8960``). The graphs and their arithmetic are untouched:
    only where ORT's buffers come from changes.

    Freed chunks stay resident until the block ends: then glibc's default thresholds (128 KiB) are restored and
    the heap is trimmed (the outermost block, when blocks nest or several threads run graphs). Without glibc it
    does nothing."""
    libc = _libc()
    if libc is None:
        yield
        return
    with _reuse_lock:
        _reusing[0] += 1
        if _reusing[0] == 1:
            libc.mallopt(M_MMAP_THRESHOLD, threshold)
            libc.mallopt(M_TRIM_THRESHOLD, threshold)
    try:
        yield
    finally:
        with _reuse_lock:
            _reusing[0] -= 1
            if _reusing[0] == 0:
                libc.mallopt(M_MMAP_THRESHOLD, GLIBC_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, GLIBC_THRESHOLD)
                libc.malloc_trim(0)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). ONNX Runtime without
    its arena mallocs every activation below glibc's mmap threshold (32 MB) from the heap, and the freed chunks
    stay resident: measured, 6.4 GB of heap during the 7B prefills — memory the page cache then lacks for the
    weights. Cheap next to a graph call (it walks the free lists once)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
