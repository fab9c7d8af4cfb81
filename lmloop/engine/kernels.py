"""A 4-bit block-quantized linear: our C kernel (`csrc/qlinear.c`), built on first use.

Decode at batch 1 reads every weight once per token, so its speed is the weights' bytes over
memory bandwidth plus per-op overhead. PyTorch's int8 dynamic linear (fbgemm) reads 1 byte per
weight; its CPU 4-bit matmul measured 18-40x slower than that, so it is no path. This module
compiles a small C file with the machine's own C compiler (`-O3 -march=native`: AVX-VNNI or AVX2
where the CPU has them) into `$LMLOOP_CACHE/kernels/`, keyed by the source, the compiler and the
CPU, and loads it with ctypes (which releases the GIL for the call). The OpenMP pragmas link
against the OpenMP runtime torch itself loaded, so the kernel's threads are torch's intra-op team.

The format (the C file documents it): 32 weights in 16 bytes of codes plus a half-precision
scale and offset, llama.cpp's Q4_1 size (0.625 byte per weight). A GGUF model quantized to
Q4_1 and dequantized on load re-quantizes to exactly its own grid (the block's minimum and range
are recovered), so the weights match what llama.cpp reads from the same file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from lmloop.artifacts import cache_dir
from lmloop.engine.memory import HugePageArena

SOURCE = Path(__file__).parent / "csrc" / "qlinear.c"
QK = 32


class KernelUnavailable(RuntimeError):
    """The C kernel could not be built or loaded here (no compiler, a failed build)."""


class KernelBuildFailed(KernelUnavailable):
    """A compiler is there, but building or loading the kernel with it failed."""


class KernelSelfCheckFailed(RuntimeError):
    """The kernel built but computes other numbers than torch: never serve with it."""


def _torch_openmp() -> Path | None:
    """The GNU OpenMP runtime shipped inside torch's wheel (Linux), if any."""
    lib = Path(torch.__file__).parent / "lib"
    found = sorted(lib.glob("libgomp*.so*"))
    return found[0] if found else None


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return os.uname().machine


def _compiler() -> str | None:
    """$CC when set (and then only it: a CC that is not there is no compiler, never a silent
    switch to another one), else `cc` or `gcc` on the PATH."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def _flags(arch: str = "native") -> list[str]:
    return ["-O3", f"-march={arch}", "-fPIC", "-std=c11", "-Wall"]


def _build(cc: str, out: Path, omp: Path | None, arch: str = "native") -> None:
    """Compile and link into `out` (tests build other `arch`es: the AVX2-only and plain C
    paths of the same source)."""
    flags = _flags(arch)
    with tempfile.TemporaryDirectory(prefix="lmloop-kernel-") as tmp:
        obj, so = Path(tmp) / "qlinear.o", Path(tmp) / "qlinear.so"
        # without torch's runtime, only the loops' SIMD pragmas (serial, never a second team)
        compile_ = [cc, *flags, "-fopenmp" if omp else "-fopenmp-simd", "-c"]
        link = [cc, "-shared", str(obj), "-o", str(so), "-lm"]
        if omp:  # torch's own runtime: one OpenMP team per thread, shared with torch's ops
            link += [str(omp), f"-Wl,-rpath,{omp.parent}"]
        for cmd in (compile_ + [str(SOURCE), "-o", str(obj)], link):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise KernelBuildFailed(
                    f"building {SOURCE.name} with {cc} failed: {done.stderr.strip()[-400:]}"
                )
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(so, out)  # whole or not at all: a concurrent builder writes the same bytes


def build_info() -> dict[str, str | None]:
    """What `library()` builds here, without building: compiler (None: none found), its
    version line, flags, OpenMP runtime, and the cached library's path (`lmloop serve --check`)."""
    cc = _compiler()
    omp = _torch_openmp()
    info: dict[str, str | None] = {
        "compiler": cc,
        "CC": os.environ.get("CC"),
        "flags": " ".join(_flags() + ["-fopenmp" if omp else "-fopenmp-simd"]),
        "openmp": str(omp) if omp else None,
        "version": None,
        "path": None,
    }
    if cc is not None:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
        info["version"] = (version.splitlines() or [""])[0]
        info["path"] = str(_cached_path(cc, version, omp))
    return info


def _cached_path(cc: str, version: str, omp: Path | None) -> Path:
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (SOURCE.read_text(), version, cpu_flags(), str(omp), cc))
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"qlinear-{key}.so"


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The compiled kernel (built on the first call of a process when not cached), checked
    against torch before it is handed out (`self_check`)."""
    cc = _compiler()
    if cc is None:
        cc_env = os.environ.get("CC")
        where = f"CC={cc_env} is not an executable" if cc_env else "no C compiler found"
        raise KernelUnavailable(f"{where} (set CC, or install gcc)")
    omp = _torch_openmp()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    path = _cached_path(cc, version, omp)
    if not path.exists():
        _build(cc, path, omp)
    lib = load(path)
    self_check(lib)
    return lib


def _kernel_matmul(lib: ctypes.CDLL, codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor):
    """y = x @ W^T through the library's `lm_qlinear` (the self-check's call)."""
    n, nb, _ = codes.shape
    y = torch.empty(x.shape[0], n)
    kc, ks = to_kernel_layout(codes, scales)  # the order the kernel reads
    rc = lib.lm_qlinear(
        kc.data_ptr(), ks.data_ptr(), n, nb * QK, x.data_ptr(), x.shape[0], y.data_ptr(),
        None, None, 0.0, 0, 0,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("the 4-bit linear could not allocate its activation blocks")
    return y


def reference_matmul(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernel's linear in torch, with its quantization: activations rounded to int8 per
    block of 32 (absmax / 127, ties to even), weights as the codes and scales stand for."""
    rows, k = x.shape
    b = x.reshape(rows, k // QK, QK)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))  # as the C code rounds
    q = torch.round(b * inv)
    return (q * (amax / 127)).reshape(rows, k) @ unpack(codes, scales).t()


def self_check(lib: ctypes.CDLL) -> None:
    """One small matmul through the built kernel against `reference_matmul`: a library that
    disagrees (a miscompiled SIMD path, a wrong instruction set) is never used to serve."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 4 * QK, generator=g)
    x = torch.randn(3, 4 * QK, generator=g)
    codes, scales = pack_q4(w)
    got = _kernel_matmul(lib, codes, scales, x)
    want = reference_matmul(codes, scales, x)
    err = float((got - want).abs().max())
    bound = 1e-4 * float(want.abs().max()) + 1e-5
    if not err <= bound:  # NaN fails too
        raise KernelSelfCheckFailed(
            f"the C kernel's 4-bit matmul differs from torch's by {err:.3g} (allowed {bound:.3g})"
        )


def load(path: Path) -> ctypes.CDLL:
    """A built kernel library with its functions' signatures declared."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelBuildFailed(f"loading {path} failed: {e}") from None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.lm_qlinear.argtypes = [p, p, i, i, p, i, p, p, p, ctypes.c_float, i, i]
    lib.lm_qlinear.restype = i
    lib.lm_qlinear8.argtypes = [p, p, p, i, i, p, i, p, p, p, ctypes.c_float, i]
    lib.lm_qlinear8.restype = i
    lib.lm_attend.argtypes = [p, i, p, p, i, i, i, p, p, p, p, i, i, i, p]
    lib.lm_attend.restype = i
    lib.lm_decode_layers.argtypes = [i, i, p, p, p, p, p, p, p, p, ctypes.c_float, i, i, i,
                                     p, p, p, p, i, i, p, p, p, p, p]  # fmt: skip
    lib.lm_decode_layers.restype = i
    lib.lm_topk.argtypes = [p, i, i, i, p, p]
    lib.lm_topk.restype = i
    lib.lm_sample.argtypes = [p, i, i, p, p, p, p, p, p]
    lib.lm_sample.restype = i
    return lib


def available() -> bool:
    try:
        library()
    except KernelUnavailable:
        return False
    return True


def pack_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) fp32 -> codes (N, K/32, 16) uint8 and scales (N, K/32, 2) fp16: per block of 32,
    w ~= d * q + m with q in 0..15 (byte j holds q[j] and q[j + 16])."""
    n, k = w.shape
    b = w.detach().float().reshape(n, k // QK, QK)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = ((b - lo) * inv).round_().clamp_(0, 15).to(torch.uint8)
    codes = (q[..., :16] | (q[..., 16:] << 4)).contiguous()
    return codes, torch.cat([d, lo], -1).half().contiguous()


GROUP = 8  # weight rows the kernel interleaves (the C file's R)


def to_kernel_layout(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`pack_q4`'s (N, K/32, 16) codes and (N, K/32, 2) scales in the order the kernel reads
    them (the C file documents it): N // 8 groups of 8 rows whose codes are interleaved four at
    a time, then the rows left over as they were. Flat uint8 codes and fp16 scales."""
    n, nb, _ = codes.shape
    full = n // GROUP * GROUP
    q = torch.cat([codes[:full] & 0x0F, codes[:full] >> 4], -1)  # (full, nb, 32) in order
    # element 8t + 4h + e of row i -> register t, byte 4i + e, low (h = 0) or high nibble
    q = q.view(-1, GROUP, nb, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # (G, nb, t, i, e, h)
    grouped = q[..., 0] | (q[..., 1] << 4)
    s = scales[:full].view(-1, GROUP, nb, 2).permute(0, 2, 3, 1)  # (G, nb, d|m, i)
    return (
        torch.cat([grouped.reshape(-1), codes[full:].reshape(-1)]).contiguous(),
        torch.cat([s.reshape(-1), scales[full:].reshape(-1)]).contiguous(),
    )


def from_kernel_layout(
    codes: torch.Tensor, scales: torch.Tensor, n: int, nb: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`to_kernel_layout` undone: (N, K/32, 16) codes and (N, K/32, 2) scales."""
    full = n // GROUP * GROUP
    g = codes[: full * nb * 16].view(-1, nb, 4, GROUP, 4)  # (G, nb, t, i, e)
    q = torch.stack([g & 0x0F, g >> 4], -1).permute(0, 3, 1, 2, 5, 4).reshape(full, nb, 32)
    rows = torch.cat([q[..., :16] | (q[..., 16:] << 4), codes[full * nb * 16 :].view(-1, nb, 16)])
    s = scales[: full * nb * 2].view(-1, nb, 2, GROUP).permute(0, 3, 1, 2).reshape(full, nb, 2)
    return rows, torch.cat([s, scales[full * nb * 2 :].view(-1, nb, 2)])


def unpack(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weights packed codes and scales stand for (tests, quality checks)."""
    n, nb, _ = codes.shape
    scales = scales.float()
    q = torch.cat([codes & 0x0F, codes >> 4], -1).float()
    return (q * scales[..., :1] + scales[..., 1:]).reshape(n, nb * QK)


class Q4Linear:
    """A linear over q4 block weights: y = x @ W^T + b, x (rows, K) fp32: one row (decode at
    batch 1), a batched step's rows or a prompt's positions. Each weight block is unpacked once
    per 4 rows, and a row's outputs are computed by the same operations in the same order
    whatever the row count (the C file's `dot_q4_tile`): a row's numbers do not depend on the
    rows beside it.

    A plain callable, as `Int8Linear` (a decode step makes 120 of these calls)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, arena: HugePageArena | None = None
    ):
        n, k = weight.shape
        if k % QK:
            raise ValueError(f"input size {k} is not a multiple of {QK}")
        self.lib = library()
        self.out_features, self.in_features = n, k
        self.codes, self.scales = to_kernel_layout(*pack_q4(weight))
        if arena is not None:  # on large pages (`lmloop.engine.memory.HugePageArena`)
            self.codes, self.scales = arena.take(self.codes), arena.take(self.scales)
        self.bias = None if bias is None else bias.detach().float().contiguous().clone()
        self._w, self._s = self.codes.data_ptr(), self.scales.data_ptr()
        self._b = None if self.bias is None else self.bias.data_ptr()

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: torch.Tensor | None = None,
        eps: float = 0.0,
        swiglu: bool = False,
        out: torch.Tensor | None = None,
        add: bool = False,
    ) -> torch.Tensor:
        """x (rows, K) -> (rows, N). Fused on the way in: `norm` (RMSNorm with this weight and
        `eps` first) or `swiglu` (x is gate | up, 2K wide: silu(gate) * up). `out`: write
        there (fp32, contiguous), or with `add` add to it (a residual stream)."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        rows = x.shape[0]
        if x.shape[-1] != self.in_features * (2 if swiglu else 1):
            raise ValueError(f"input width {x.shape[-1]} for a {self.in_features}-wide linear")
        y = torch.empty(rows, self.out_features) if out is None else out
        rc = self.lib.lm_qlinear(
            self._w, self._s, self.out_features, self.in_features, x.data_ptr(), rows,
            y.data_ptr(), self._b, None if norm is None else norm.data_ptr(), eps, int(swiglu),
            int(add),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("the 4-bit linear could not allocate its activation blocks")
        return y

    def weight(self) -> torch.Tensor:
        n, nb = self.out_features, self.in_features // QK
        return unpack(*from_kernel_layout(self.codes, self.scales, n, nb))


class Q8Linear:
    """An int8 linear whose rows never see each other: int8 weights with one scale per output
    row, each input row quantized on its own (absmax / 127, after an optional fused RMSNorm),
    products summed in 32-bit integers (exact), so a row's outputs are the same bits at any
    row count. The 4-bit runner's vocabulary head: fbgemm's dynamic int8 linear quantizes all
    its rows with one scale, which makes a row's logits depend on the rest of the batch."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, arena: HugePageArena | None = None
    ):
        n, k = weight.shape
        if k % QK or k >= 1 << 17:
            raise ValueError(f"input size {k} is not a multiple of {QK} below 131072")
        self.lib = library()
        self.out_features, self.in_features = n, k
        w = weight.detach().float()
        self.scale = (w.abs().amax(1).clamp(min=1e-8) / 127).contiguous()
        q = torch.round(w / self.scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.wsum = q.sum(1, dtype=torch.int32).contiguous()
        # groups of 8 rows, each 4 consecutive weights of the 8 rows side by side (the C file)
        full = n // GROUP * GROUP
        grouped = q[:full].view(-1, GROUP, k // 4, 4).transpose(1, 2)
        self.qweight = torch.cat([grouped.reshape(-1), q[full:].reshape(-1)]).contiguous()
        if arena is not None:
            self.qweight = arena.take(self.qweight)
        self.bias = None if bias is None else bias.detach().float().contiguous().clone()
        self._w, self._s = self.qweight.data_ptr(), self.scale.data_ptr()
        self._b = None if self.bias is None else self.bias.data_ptr()

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: torch.Tensor | None = None,
        eps: float = 0.0,
        out: torch.Tensor | None = None,
        add: bool = False,
    ) -> torch.Tensor:
        """x (rows, K) -> (rows, N); `norm`, `eps`, `out` and `add` as `Q4Linear`'s."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input width {x.shape[-1]} for a {self.in_features}-wide linear")
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features) if out is None else out
        rc = self.lib.lm_qlinear8(
            self._w, self._s, self.wsum.data_ptr(), self.out_features, self.in_features, x.data_ptr(), rows,
            y.data_ptr(), self._b, None if norm is None else norm.data_ptr(), eps, int(add),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("the int8 linear could not allocate its activation rows")
        return y

    def weight(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        full = n // GROUP * GROUP
        g = self.qweight[: full * k].view(-1, k // 4, GROUP, 4).transpose(1, 2).reshape(full, k)
        q = torch.cat([g, self.qweight[full * k :].view(-1, k)])
        return q.float() * self.scale[:, None]


def positions_arg(positions: list[int], kv: torch.Tensor) -> ctypes.Array:
    """Rows' positions as `attend` passes them to C, checked against the cache once (a decode
    step makes one and uses it in every layer)."""
    _, _, rows, _, slots, _ = kv.shape
    if len(positions) > rows or not all(0 <= p < slots for p in positions):
        raise ValueError(f"positions {positions} do not fit a {rows} x {slots} cache")
    return (ctypes.c_int * len(positions))(*positions)


def tokens_arg(
    rows: list[int], positions: list[int], kv: torch.Tensor
) -> tuple[ctypes.Array, ctypes.Array]:
    """Prompt tokens as `decode_layers` takes them: each one's position and cache row, checked
    against the cache (rows and slots in range). (positions, cache rows) as C arrays."""
    _, _, nrows, _, slots, _ = kv.shape
    if len(rows) != len(positions) or not all(0 <= r < nrows for r in rows):
        raise ValueError(f"cache rows {rows} do not fit a cache of {nrows} rows")
    if not all(0 <= p < slots for p in positions):
        raise ValueError(f"positions {positions} do not fit a cache of {slots} slots")
    ints = ctypes.c_int * len(rows)
    return ints(*positions), ints(*rows)


def attend(
    h: torch.Tensor,
    positions: list[int] | ctypes.Array,
    heads: tuple[int, int, int],
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: torch.Tensor,
    kv_scale: torch.Tensor,
    layer: int,
    y: torch.Tensor,
) -> None:
    """One decode step's attention for cache rows 0..n-1 (the C file documents it): h (n, ...)
    holds each row's new queries, key and value; rotary positions from rows `positions` of the
    `cos` / `sin` tables; the new key and value quantized into each row's slot of `kv` (the
    fast runner's int8 cache) and `kv_scale`; softmax attention over each row's slots
    0..position into y (n, H * D). Every tensor fp32 (kv int8) and contiguous. `positions`: a
    list (checked here) or `positions_arg`'s array (checked already)."""
    H, Hkv, D = heads
    _, _, rows, _, slots, _ = kv.shape
    if isinstance(positions, list):
        positions = positions_arg(positions, kv)
        if not all(t.is_contiguous() for t in (h, cos, sin, kv, kv_scale, y)):
            raise ValueError("attend needs contiguous tensors")
    rc = library().lm_attend(
        h.data_ptr(), len(positions), positions, None, H, Hkv, D, cos.data_ptr(), sin.data_ptr(),
        kv.data_ptr(), kv_scale.data_ptr(), layer, rows, slots, y.data_ptr(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("attention could not allocate its scores")


class LayerStack:
    """A model's 4-bit layers as `decode_layers` hands them to C: per layer its four linears
    (qkv, o, gate|up, down; `Q4Linear`s) and its two RMSNorm weights, as arrays of pointers
    built once. It keeps the layers alive, so the pointers stay valid."""

    def __init__(self, layers: list[tuple[Q4Linear, ...]], norms: list[tuple[torch.Tensor, ...]]):
        lins = [lin for layer in layers for lin in layer]
        if len(lins) != 4 * len(layers) or len(norms) != len(layers):
            raise ValueError("a layer stack needs four linears and two norms a layer")
        ptrs, ints = ctypes.c_void_p * len(lins), ctypes.c_int * len(lins)
        self.layers, self.norms, self.n = layers, norms, len(layers)
        self.codes = ptrs(*[lin._w for lin in lins])
        self.scales = ptrs(*[lin._s for lin in lins])
        self.bias = ptrs(*[lin._b for lin in lins])
        self.n_out = ints(*[lin.out_features for lin in lins])
        self.k_in = ints(*[lin.in_features for lin in lins])
        per_layer = ctypes.c_void_p * len(layers)
        self.norm1 = per_layer(*[n1.data_ptr() for n1, _ in norms])
        self.norm2 = per_layer(*[n2.data_ptr() for _, n2 in norms])


def decode_layers(
    stack: LayerStack,
    positions: ctypes.Array,
    heads: tuple[int, int, int],
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: torch.Tensor,
    kv_scale: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    y: torch.Tensor,
    g: torch.Tensor,
    cache_rows: ctypes.Array | None = None,
) -> None:
    """Every layer of a decode step in one C call (the C file's `lm_decode_layers`): the same
    operations as each layer's five calls (the linears' and `attend`'s), in the same order.
    x (rows, C) is updated in place; h, y and g are scratch rows sized as those calls' outputs;
    `positions`: `positions_arg`'s array. Every tensor fp32 (kv int8) and contiguous.
    `cache_rows` (`tokens_arg`'s): the cache row of each row of x, where rows are prompt tokens
    (several to a cache row); None: row r is cache row r."""
    H, Hkv, D = heads
    _, _, rows, _, slots, _ = kv.shape
    rc = library().lm_decode_layers(
        stack.n, len(positions), positions, stack.codes, stack.scales, stack.n_out, stack.k_in,
        stack.bias, stack.norm1, stack.norm2, eps, H, Hkv, D, cos.data_ptr(), sin.data_ptr(),
        kv.data_ptr(), kv_scale.data_ptr(), rows, slots, x.data_ptr(), h.data_ptr(),
        y.data_ptr(), g.data_ptr(), cache_rows,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("a decode step's layers could not allocate their scratch")


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k)` of a 2-D fp32 tensor along its rows, by the C kernel's `lm_topk`:
    the same values in the same order (largest first, a NaN above every number); of equal
    values the lower column first, where torch leaves their order open. (values, indices)."""
    if x.dim() != 2 or x.dtype != torch.float32:
        return torch.topk(x, k)
    x = x.contiguous()
    rows, n = x.shape
    if not 0 < k <= n or rows == 0:
        return torch.topk(x, k)  # torch's answer or its error
    vals, idx = torch.empty(rows, k), torch.empty(rows, k, dtype=torch.long)
    if library().lm_topk(x.data_ptr(), rows, n, k, vals.data_ptr(), idx.data_ptr()) != 0:
        raise MemoryError("top-k could not allocate its heaps")
    return vals, idx


def sample(
    x: torch.Tensor,
    temperature: list[float],
    top_p: list[float],
    min_p: list[float],
    u: list[float],
) -> tuple[list[int], list[float]]:
    """A token for each row of logits x (rows, V) by the C kernel's `lm_sample`: temperature,
    then top-p (or every token where top_p is 1) and min-p, then the inversion at the row's
    uniform u in (0, 1] (`lmloop.engine.sampling.draw`'s rule, over the kept tokens in
    vocabulary order). (tokens, kept masses); token -1 where the row cannot be sampled, its
    mass then the sum that was not finite or positive."""
    x = x.float().contiguous()
    rows, n = x.shape
    cols = [torch.tensor(v, dtype=torch.float32) for v in (temperature, top_p, min_p, u)]
    tokens, total = torch.empty(rows, dtype=torch.long), torch.empty(rows)
    rc = library().lm_sample(x.data_ptr(), rows, n, *(c.data_ptr() for c in cols),
                             tokens.data_ptr(), total.data_ptr())  # fmt: skip
    if rc != 0:
        raise MemoryError("sampling could not allocate its scratch")
    return tokens.tolist(), total.tolist()
