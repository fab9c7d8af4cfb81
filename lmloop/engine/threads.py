"""OpenMP teams: the engine's decode threads run at full speed only when theirs is the only one.

libgomp gives a thread its own team (pool of worker threads) at its first parallel op, and the
team lives as long as that thread. When more pool threads are alive than there are cores,
libgomp throttles spin-waiting to almost nothing, so the engine's threads go to sleep and are
woken for every op. Measured on SmolLM2-135M --int8 with 2 engine threads on 2 cores: 13.1 ms a
batch-1 decode step alone, 35.2 ms with one other team alive (the thread that loaded the model),
11.4 ms after that thread released its team. So the thread that starts an engine gives its own
team back first (`release_openmp_team`, called by `Engine.start`): the server's loader thread and
a CLI's main thread alike.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

# GNU OpenMP only (torch's Linux wheels ship it): its pause releases the calling thread's pool
# and nothing else (libgomp's team.c, gomp_pause_host). LLVM's and Intel's runtimes pause the
# whole runtime, which could stall a running engine: there this is a no-op.
_OPENMP_NAMES = ("libgomp",)
OMP_PAUSE_SOFT = 1


def _openmp_runtime() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime torch loaded (found among the process's mapped libraries).

    Torch's own copy first: other wheels bundle theirs (scikit-learn ships a
    `scikit_learn.libs/libgomp-*.so`), and pausing another runtime's pool frees nothing of
    torch's team."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    torch_lib = str(Path(torch.__file__).parent / "lib") + "/"
    found = [p for p in paths if p.rsplit("/", 1)[-1].startswith(_OPENMP_NAMES) and ".so" in p]
    for path in sorted(found, key=lambda p: (not p.startswith(torch_lib), p)):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def release_openmp_team() -> bool:
    """Let the calling thread's OpenMP worker threads exit (OpenMP 5's
    `omp_pause_resource_all(omp_pause_soft)`: libgomp frees the calling thread's pool only, and
    refuses inside a parallel region). The thread gets a new team at its next parallel op.
    True when a runtime was found and accepted the call."""
    lib = _openmp_runtime()
    fn = getattr(lib, "omp_pause_resource_all", None) if lib is not None else None
    if fn is None:
        return False
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn(OMP_PAUSE_SOFT) == 0
