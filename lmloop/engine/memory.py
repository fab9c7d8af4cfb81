"""Giving memory back to the operating system, and asking it for large pages."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import mmap
import weakref

import torch


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


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
_USED: dict[int, int] = {}  # arena blocks' bytes in use, by address, while each block lives
ALIGN = 64  # a cache line: every tensor in an arena starts on one


class HugePageArena:
    """Tensors copied side by side into one block of memory that the kernel may back with 2 MB
    pages (`madvise(MADV_HUGEPAGE)`: machines that run transparent huge pages in "madvise"
    mode, this project's among them, otherwise give a process 4 KB pages only).

    For the weights a decode step streams: one row's step reads ~94 MB of SmolLM2-135M's 4-bit
    layers and int8 head, and on 4 KB pages that is ~23,000 page walks a step, with the cores'
    prefetchers stopping at every page's end. Measured on this project's 2-core machine (the
    C kernel's 30 layers alone, medians of 1,000 steps): 2.8-2.9 ms a one-row step on 4 KB
    pages, 2.2-2.5 ms on 2 MB ones. Not for the KV cache: a 2 MB page is resident as soon as one
    of its bytes is written, so a cache whose rows hold a few hundred tokens would count in full.

    `nbytes` is what the caller will copy in (plus up to 64 bytes a tensor for alignment);
    a tensor that no longer fits is returned as it was, so a wrong estimate costs speed, never
    a failure. Where `madvise` or huge pages are missing, the block is plain memory."""

    def __init__(self, nbytes: int):
        size = -(-max(nbytes, 1) // HUGE_PAGE) * HUGE_PAGE
        try:
            block: mmap.mmap | None = mmap.mmap(
                -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            )
        except (AttributeError, OSError, ValueError):  # no anonymous mappings here
            block = None
        if block is not None and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                block.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel without transparent huge pages: 4 KB pages it is
                pass
        with torch.inference_mode(False):  # plain tensors, whichever mode the caller is in
            # the tensor's storage keeps the mapping alive, and so does every view of it
            if block is None:
                self.block = torch.empty(size, dtype=torch.uint8)
            else:
                self.block = torch.frombuffer(block, dtype=torch.uint8)
        self.used = 0
        # The bytes in use, by the block's address, for as long as the mapping lives: the
        # storage (not this object, which the packing code drops) decides that.
        self._ptr = None
        if block is not None:
            self._ptr = self.block.data_ptr()
            _USED[self._ptr] = 0
            weakref.finalize(block, _USED.pop, self._ptr, None)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of t in the arena (t itself when it no longer fits)."""
        n = t.numel() * t.element_size()
        at = -(-self.used // ALIGN) * ALIGN
        if at + n > self.block.numel():
            return t
        with torch.inference_mode(False):
            out = self.block[at : at + n].view(t.dtype).view(t.shape)
            out.copy_(t)
        self.used = at + n
        if self._ptr is not None:
            _USED[self._ptr] = self.used
        return out


def storage_bytes(storage: torch.UntypedStorage) -> int:
    """A storage's size as memory use: an arena's block counts what was copied into it (the
    rest of its pages are never written, so never resident), any other storage all of it."""
    used = _USED.get(storage.data_ptr())
    return used if used is not None else storage.nbytes()
