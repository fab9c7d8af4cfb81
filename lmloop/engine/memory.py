"""Giving memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def trim_heap() -> bool:
    """Give the heap's freed pages back to the OS (glibc's `malloc_trim`); False where the C
    library has none. No garbage collection: cheap enough to run every few seconds beside
    serving (the server does: `lmloop.server.app.TRIM_EVERY_S`)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return False
    return True


# glibc gives each thread that allocates at once its own heap ("arena"), up to 8 per core; a
# server's threads (engine, event loop, tokenizing and HTTP workers) then each keep the freed
# pages of the largest requests they served. Two arenas: bench/soak.py's abusive clients left
# resident memory +8-13% over the calm level with the default, +4% with two (same run length).
SERVER_ARENAS = 2
M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def limit_arenas(n: int = SERVER_ARENAS) -> bool:
    """Cap glibc's heaps at `n` for threads that start after this (call it before any);
    False where the C library has no `mallopt` (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, n))
    except (OSError, AttributeError):
        return False


def release_memory() -> None:
    """Collect garbage and give freed heap pages back to the OS. glibc keeps freed blocks below
    its mmap threshold in the heap, and that threshold grows with every large block freed, so
    building an engine (copies, quantization) leaves hundreds of MB of freed pages resident
    (measured: 470 MB for SmolLM2-135M with --int8) until `malloc_trim` returns them."""
    gc.collect()
    trim_heap()
