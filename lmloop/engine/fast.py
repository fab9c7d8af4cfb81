"""The hand-tuned path for the Llama family: fewer, bigger ops per decoded token.

CPU decode at batch 1 is bound by reading the weights once per token plus a per-op overhead of
a few microseconds times ~20 ops per layer. This runner reads the same weights as the model's own
`forward` (numerically the same computation, tested to 1e-4) but:

* fuses q/k/v into one matmul and gate/up into another (fewer, larger GEMMs),
* applies rotary positions to queries and keys in one op (`roll` with a signed sine table),
* keeps its KV cache as (layer, row, kv_head, slot, head_dim), so attention reads each head's
  keys contiguously and grouped-query attention needs no `repeat_interleave` (SDPA's
  `enable_gqa`),
* computes one shared length mask per step instead of per layer, and no mask at batch 1,
* computes the vocabulary projection for the last prompt position only during prefill,
* runs fp32 projections on oneDNN with weights pre-packed once (`PackedLinear`), except
  single rows, which stream a plain layout faster (`DecodeLinear`),
* folds constants into weights (attention's 1/sqrt(D) into the query rows),
* optionally quantizes every projection, vocabulary head included, to int8 with per-channel
  scales and SmoothQuant smoothing (fbgemm's dynamic int8 linear): decode reads 4x fewer
  weight bytes,
* or (`int4`) keeps the projections in 4-bit blocks only (the vocabulary head in int8), for
  prompts and decode steps at every batch size: a decode step's layers are one call into our
  C kernel (`_decode_fused`, `lmloop.engine.kernels`), 6.4x fewer weight bytes than fp32 and no
  torch op in a layer. Every kernel computes a row's numbers the same way at any row count,
  so a sequence's tokens and log-probabilities do not depend on the rest of the batch.

Models that are not plain Llama (GPT-2 family, already-quantized modules) use `ModelRunner`.
"""

from __future__ import annotations

import itertools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lmloop.engine import kernels
from lmloop.engine.kernels import (
    LayerStack,
    Q4Linear,
    Q8Linear,
    attend,
    decode_layers,
    positions_arg,
    tokens_arg,
)
from lmloop.engine.memory import ALIGN, HugePageArena, release_memory, storage_bytes
from lmloop.models.llama import Llama


def _fuse(linears: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([m.weight.detach() for m in linears], 0)
    bias = any(m.bias is not None for m in linears)
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    out.weight = nn.Parameter(w, requires_grad=False)
    if bias:
        b = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in linears]
        out.bias = nn.Parameter(torch.cat([x.detach() for x in b]), requires_grad=False)
    return out


def _q4_bytes(blocks: list[nn.Module]) -> int:
    """What the blocks' linears take in the 4-bit format (5/8 byte a weight), with room to
    align each packed tensor (codes and scales: two per fused linear, at most seven)."""
    linears = [m for b in blocks for m in b.modules() if isinstance(m, nn.Linear)]
    return sum(m.weight.numel() * 5 // 8 for m in linears) + 2 * ALIGN * len(linears)


def _copy(m: nn.Linear, own: bool) -> nn.Linear:
    """The same linear; `own`: over copies of its tensors (see `_own`), else over views."""
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    take = _own if own else torch.Tensor.detach
    out.weight = nn.Parameter(take(m.weight), requires_grad=False)
    if m.bias is not None:
        out.bias = nn.Parameter(take(m.bias), requires_grad=False)
    return out


def _own(t: torch.Tensor) -> torch.Tensor:
    """A copy the runner owns. A loaded checkpoint's tensors are views of one memory-mapped file:
    keeping a view would keep the whole file's pages (513 MB for SmolLM2-135M) resident after
    the model itself is dropped."""
    return t.detach().clone()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and one fp32 scale per vector along the last dim (symmetric, absmax/127):
    x ~= q * scale."""
    scale = x.abs().amax(-1, keepdim=True).clamp_(min=1e-8).div_(127)
    return torch.round(x / scale).to(torch.int8), scale


def quantize_linears(mods: nn.Module) -> nn.Module:
    """int8 weights (per output channel) for every nn.Linear inside `mods` (dynamic quantization:
    activations are quantized per call, accumulation in int32, result in fp32). As in
    `Int8Linear`, an input of several rows is scaled to one magnitude per row first (hooks), so
    one row with massive activations does not set the quantization scale of the others."""
    with warnings.catch_warnings():
        # imported here, under the filter: importing torch.ao's dynamic quantization prints its
        # deprecation notices (the kernels still ship), and only int8 weights need it
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {nn.Linear: per_channel_dynamic_qconfig}
        out = quantize_dynamic(mods, spec, dtype=torch.qint8, inplace=True)
    for m in out.modules():
        if isinstance(m, DynamicLinear):
            m.pin_range = False  # `pin_range` on: `ModelRunner` sets it around prompts
            m.register_forward_pre_hook(_rows_in)
            m.register_forward_hook(_rows_out)
    return out


def scale_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x with every row (last dim) at absmax 1, the rows' factors), or (x, None) for one row:
    what a dynamic int8 linear, which quantizes its whole input with one scale, needs to keep
    per-token precision (`Int8Linear`)."""
    if x.numel() == x.shape[-1]:  # one row: per tensor is per token already
        return x, None
    m = x.abs().amax(-1, keepdim=True).clamp_(min=1e-8)
    return x / m, m


def unscale_rows(y: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The linear's output for the unscaled rows: (W x/m + b) * m, less the bias's scaling."""
    y = y.mul_(m)
    return y if bias is None else y.add_(bias * (1 - m))


def _rows_in(mod: nn.Module, args: tuple) -> tuple:
    x, mod._pinned = args[0], None
    if getattr(mod, "pin_range", False):  # set by `ModelRunner` around prompts
        mod._pinned = x.shape
        x = pin_range(x.reshape(-1, x.shape[-1]))
    x, mod._row_scale = scale_rows(x)
    return (x, *args[1:])


def _rows_out(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    m, mod._row_scale = mod._row_scale, None
    y = out if m is None else unscale_rows(out, m, mod.bias())
    shape, mod._pinned = mod._pinned, None
    if shape is not None:
        y = y[:-1].reshape(*shape[:-1], y.shape[-1])
    return None if y is out else y


def pin_range(x: torch.Tensor) -> torch.Tensor:
    """x (N, C) with one more row holding +1 and -1: an int8 linear's input whose quantization
    range is [-1, 1] once every row is scaled to absmax 1 (`scale_rows`), whatever the other
    rows. fbgemm quantizes a whole input with one range, the union of its rows' ranges, so
    without it a row's numbers depend on what else is in the call: a prompt would get other
    numbers alone, in two parts (after a cached prefix) or packed with others (`prefill_batch`),
    and a single row is not scaled at all. The pin costs one row."""
    pin = x.new_zeros(1, x.shape[-1])
    pin[0, 0], pin[0, 1] = 1.0, -1.0
    return torch.cat([x, pin])


def _prompt_linear(lin, x: torch.Tensor) -> torch.Tensor:
    """A linear over prompt rows whose result for a row does not depend on the other rows:
    an `Int8Linear`'s input gets `pin_range`'s row; fp32 linears need no help."""
    if not isinstance(lin, Int8Linear):
        return lin(x)
    return lin(pin_range(x))[:-1]


def supports(model: nn.Module) -> bool:
    if not isinstance(model, Llama):
        return False
    for m in model.modules():
        if type(m).__name__.startswith("DynamicQuantized") or (
            isinstance(m, nn.Linear) and not isinstance(m.weight, torch.Tensor)
        ):
            return False
    p = model.lm_head.weight
    return p.device.type == "cpu" and p.dtype == torch.float32


# Calibration text for int8 smoothing: activation outlier channels are a property of the model
# (they show on any text), so a short varied paragraph is enough to find them.
CALIBRATION_TEXT = (
    "The history of science is the study of how people came to understand the natural world. "
    "Once upon a time, a little fox lived at the edge of a forest with her two brothers. "
    "Question: What is the capital of France? Answer: Paris.\n"
    "def mean(xs):\n    return sum(xs) / len(xs)\n"
    "In 2023, prices rose by 4.5% while wages grew 3%; analysts expect the trend to continue!"
)
SMOOTH_ALPHA = 0.4  # migration strength (SmoothQuant's alpha); 0.4-0.5 measured best on SmolLM2


MISSING_INT8_OPS = "this torch lacks fbgemm's quantized.linear_dynamic op (int8 weights)"


def dynamic_linear_op():
    """fbgemm's dynamic int8 linear, or None in a torch without it (torch.ao's quantization is
    deprecated: int8 weights are then refused, fp32 still serves; `lmloop serve --check`).
    The overload's C++ entry point where this torch exposes it: its Python wrapper checks for
    fake script objects on every call (~1.4 us of a ~12 us small call, 121 calls a step)."""
    try:
        op = torch.ops.quantized.linear_dynamic.default
        torch.ops.quantized.linear_prepack.default  # noqa: B018 - the lookup is the check
    except (AttributeError, RuntimeError):
        return None
    return getattr(op, "_op", None) or op


class Int8Linear:
    """int8 weights with one scale per output channel; activations quantized per call by
    fbgemm's dynamic linear, int32 accumulation.

    fbgemm quantizes the whole input with one scale. At one row that is per token; at several
    (a prompt, a batched step) one token with massive activations (a prompt's first token
    reaches hundreds of times the others' magnitude in SmolLM2's down projection) would set the
    scale for all and leave the rest a few levels. So several rows are scaled to the same
    magnitude first and the outputs scaled back (a linear map commutes with a per-row factor):
    per-token precision for two elementwise ops. Measured on SmolLM2-135M (`bench/int4.py`: 20
    prompts, every position against fp32): mean KL 0.455 -> 0.044 nats, top-1 66.8 -> 89.8%.

    A plain callable, not an nn.Module: a decode step makes 121 of these calls, and a module's
    call machinery (hook checks) plus the op packet's overload lookup cost more than a
    microsecond each. Without VNNI, fbgemm's u8 x s8 pair sums can saturate int16, so the
    activation range is then reduced to 7 bits, as PyTorch's own dynamic quantization does."""

    reduce_range = not any(f in kernels.cpu_flags() for f in ("avx512_vnni", "avx_vnni"))
    _op = dynamic_linear_op()

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if self._op is None:
            raise RuntimeError(MISSING_INT8_OPS)
        w = weight.detach().float()
        scale = (w.abs().amax(1).clamp(min=1e-8) / 127).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notice; the kernels ship in 2.13
            wq = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        b = None if bias is None else bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(wq, b)
        self.bias = b
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x, m = scale_rows(x)
        y = self._op(x, self.packed, self.reduce_range)
        return y if m is None else unscale_rows(y, m, self.bias)


class PackedLinear(nn.Module):
    """fp32 linear on oneDNN with its weight pre-packed into the kernel's blocked layout.

    Measured on this project's 2-core AMD EPYC (one thread), SmolLM2 shapes: the same speed as
    MKL's sgemm at batch 1, ~2x at 4 rows, 1.5-1.9x at 16 rows and 1.5x in prefill. These are
    the ops PyTorch's own compiler emits for CPU linears (`mkldnn._linear_pointwise`); where
    oneDNN is missing, `pack` returns the plain nn.Linear."""

    def __init__(self, lin: nn.Linear, hint: int = 16):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), hint)
        self.bias = None if lin.bias is None else lin.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    @staticmethod
    def pack(lin: nn.Linear) -> nn.Module:
        w = lin.weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            return lin  # the packed kernels are for fp32 on the CPU
        try:
            if not torch.backends.mkldnn.is_available():
                return lin
            packed = PackedLinear(lin)
            x = torch.randn(2, lin.in_features)
            with torch.no_grad():  # trust it only when it agrees with the plain linear
                if not torch.allclose(
                    packed(x), F.linear(x, lin.weight, lin.bias), rtol=1e-4, atol=1e-4
                ):
                    return lin
            return packed
        except (RuntimeError, AttributeError):
            return lin


class DecodeLinear(nn.Module):
    """fp32 linear that keeps the layout each batch size reads fastest.

    One row (batch-1 decode, the last prompt position) is a matrix-vector product bound by
    memory bandwidth, and oneDNN's blocked layout is not the fastest way to stream it: measured
    on this project's 2-core AMD EPYC (one thread, SmolLM2 shapes, ms per call),

    | weight (out x in) | packed (oneDNN) | x @ W^T, W (out, in) | x @ Wt, Wt (in, out) |
    |---|---:|---:|---:|
    | q/k/v 960 x 576 | 0.23 | 0.24 | 0.18 |
    | gate/up 3072 x 576 | 0.52 | 0.64 | 0.36 |
    | down 576 x 1536 | 0.29 | 0.24 | 0.29 |
    | vocabulary 49152 x 576 | 8.6 | 11.2 | 4.8 |

    while at 4-128 rows the packed layout is 1.3-3x faster than either. So one row goes to
    MKL's sgemm over the (in, out) copy when the projection widens (out > in: ~20 GB/s streamed
    instead of ~12), or over the plain (out, in) weight when it narrows (no copy); more rows go
    to the packed weight. The price is one extra copy of the widening weights (q/k/v, gate/up,
    vocabulary head): about 390 MB for SmolLM2-135M."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.packed = PackedLinear.pack(lin)
        w = lin.weight.detach()
        self.widens = w.shape[0] > w.shape[1]
        self.row_weight = w.t().contiguous() if self.widens else w
        self.bias = None if lin.bias is None else lin.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1 or x.dim() != 2:
            return self.packed(x)
        if not self.widens:
            return F.linear(x, self.row_weight, self.bias)
        if self.bias is None:
            return torch.mm(x, self.row_weight)
        return torch.addmm(self.bias, x, self.row_weight)


def _smooth(absmax: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor | None:
    """Per-input-channel factors s: x/s has flatter channels, W*s takes the difference."""
    if absmax is None:
        return None
    wmax = w.abs().amax(0).clamp(min=1e-5)
    s = absmax.clamp(min=1e-5) ** SMOOTH_ALPHA / wmax ** (1 - SMOOTH_ALPHA)
    return s.clamp(1e-3, 1e3)


def _calibrate(model: nn.Module, ids: list[int] | None, max_len: int) -> dict:
    """Per-input-channel absolute maxima of every projection's input over the calibration text,
    from the model's own forward: {(layer, "qkv" | "o" | "gu" | "down"): (in,), "head": (C,)}.
    q/k/v share one input, as do gate/up."""
    stats: dict = {}
    if not ids:
        return stats

    def recorder(key):
        def record(mod: nn.Module, args: tuple) -> None:
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            prev = stats.get(key)
            stats[key] = a if prev is None else torch.maximum(prev, a)

        return record

    watch = {"head": model.lm_head}
    for i, blk in enumerate(model.model.layers):
        a, mlp = blk.self_attn, blk.mlp
        watch[i, "qkv"], watch[i, "o"] = a.q_proj, a.o_proj
        watch[i, "gu"], watch[i, "down"] = mlp.gate_proj, mlp.down_proj
    hooks = [m.register_forward_pre_hook(recorder(k)) for k, m in watch.items()]
    try:
        with torch.inference_mode():
            model(torch.tensor([ids[: max_len - 1]]))
    finally:
        for h in hooks:
            h.remove()
    return stats


class FastLlamaRunner:
    """The KV cache is one tensor (layer, k|v, row, kv head, slot, head dim), fp32, or int8 with
    one scale per (token, kv head) vector (`kv_int8`): a quarter of the memory (SmolLM2-135M at
    16 rows x 2,048 slots: 1,440 MB fp32, 371 MB int8 with scales) for a measured quality cost
    (BENCHMARKS.md). Attention then reads int8 keys and values converted to fp32 and applies
    the scales to the scores (keys) and to the probabilities (values), where they are a
    per-slot factor: no dequantized copy of the cache is made."""

    def __init__(
        self,
        model: nn.Module,
        batch: int,
        max_len: int,
        *,
        int8: bool = False,
        int4: bool = False,
        kv_int8: bool = False,
        calibration_ids: list[int] | None = None,
    ):
        cfg = model.config
        self.H, self.Hkv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hd
        self.C, self.I, self.eps = cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps
        self.max_len = max_len
        # fp32 keeps these tensors as they are: copies the runner owns. int8 replaces them with
        # quantized ones, so it reads views while building (no fp32 copy adds to the peak).
        own = not (int8 or int4)
        self.embed = model.model.embed_tokens.weight.detach()
        if own:
            self.embed = _own(self.embed)
        self.embed_scale = None  # int8 rows' scales (int8 mode)
        half = self.D // 2
        self.cos = _own(model.rope_cos[:max_len])
        sin = model.rope_sin[:max_len].detach()
        # rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi]
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        blocks = list(model.model.layers)
        self.norms = [
            (_own(b.input_layernorm.weight), _own(b.post_attention_layernorm.weight))
            for b in blocks
        ]
        self.final_norm = _own(model.model.norm.weight)
        self.kv_int8 = kv_int8
        self._scratch = torch.empty(0)
        self._slots = torch.arange(max_len)
        # One layer at a time: its fp32 fused copies live only until its kernels are built.
        # int4: one set of weights, 4-bit, for prompts and decode steps at any batch size
        # (`layers4` names the same list), over the unsmoothed norms; the head in int8.
        self.int4 = int4
        self.layers4 = self.norms4 = None
        self.fuse_one = True  # int4 decode steps go through `_decode_fused`
        self.stack: LayerStack | None = None
        # Decode steps over an int8 cache attend in one C call a layer (`_decode_rows`) where
        # the kernel builds: ~25 torch ops a layer fewer, and no fp32 copy of the cache.
        self.c_attention = kv_int8 and kernels.available()
        if int8 or int4:
            stats = _calibrate(model, calibration_ids, max_len)
            self.layers = []
            # int4: the layers' codes and scales (5/8 byte a weight) side by side on large pages
            arena = HugePageArena(_q4_bytes(blocks)) if int4 else None
            for i, b in enumerate(blocks):
                self.layers.append(
                    self._int4_layer(b, arena) if int4 else self._int8_layer(i, b, stats)
                )
            if int4:
                self.layers4, self.norms4 = self.layers, self.norms
            release_memory()  # the fp32 temporaries' pages, before the head's
            self._int8_head(model.lm_head, stats.get("head"))
            # Embedding rows in int8 too (a quarter of the largest fp32 tensor left): a lookup
            # reads one row per token, so this costs one multiply per step.
            self.embed, self.embed_scale = quantize_rows(self.embed)
        else:
            self.layers = [tuple(DecodeLinear(m) for m in self._fp32_layer(b, own)) for b in blocks]
            self.lm_head = DecodeLinear(_copy(model.lm_head, own))
        # The cache is allocated (zeroed: resident) at the first prefill, not here: a server
        # drops the loaded checkpoint once the engine is built, so the cache's pages and the
        # checkpoint's are never resident together (peak while loading SmolLM2-135M with
        # --int8: 1.73 GB when allocated here; 1.29 GB now, with the one-layer-at-a-time
        # quantization above).
        self.kv = self.kv_scale = None
        self._kv_shape = (batch, max_len)
        release_memory()

    def resident_bytes(self) -> dict[str, int]:
        """Bytes this runner holds: its KV cache (0 until the first prefill allocates it) and
        everything else it refers to, weights and tables ("weights"), found by walking its
        attributes, so a copy kept anywhere counts; a tensor shared by several objects counts
        once."""
        storages: dict[int, int] = {}
        seen: set[int] = set()

        def walk(o: object) -> None:
            if id(o) in seen or o is None:
                return
            seen.add(id(o))
            if isinstance(o, torch.Tensor):
                try:
                    st = o.untyped_storage()
                    storages[st.data_ptr()] = storage_bytes(st)
                except RuntimeError:  # oneDNN's blocked layout has no plain storage
                    storages[id(o)] = o.numel() * o.element_size()
            elif isinstance(o, Int8Linear):  # fbgemm's packed weight: int8, row scales, bias
                storages[id(o)] = o.in_features * o.out_features + 12 * o.out_features
            elif isinstance(o, (list, tuple)):
                for x in o:
                    walk(x)
            elif isinstance(o, dict):
                for x in o.values():
                    walk(x)
            elif isinstance(o, nn.Module) or type(o).__module__.startswith("lmloop."):
                walk(vars(o))

        cache = (self.kv, self.kv_scale, self._scratch)
        walk({k: v for k, v in vars(self).items() if k not in ("kv", "kv_scale", "_scratch")})
        return {
            "weights": sum(storages.values()),
            "kv_cache": sum(t.nbytes for t in cache if t is not None),
        }

    def allocate(self) -> None:
        """Allocate the KV cache if it is not yet (prefill and `write_kv` call this)."""
        if self.kv is not None:
            return
        batch, slots = self._kv_shape
        shape = (len(self.layers), 2, batch, self.Hkv, slots, self.D)
        with torch.inference_mode(False):  # a plain tensor, whichever mode the first call is in
            self.kv = torch.zeros(shape, dtype=torch.int8 if self.kv_int8 else torch.float32)
            self.kv_scale = torch.zeros(shape[:-1] + (1,)) if self.kv_int8 else None

    # An int8 cache is read as fp32, converted per layer. Past this many elements (4 MB) the
    # conversion goes to one reused buffer: a fresh block that size is mapped and faulted in
    # by every layer (measured at 16 rows x 1,024 slots: 148-165 ms a step against 137 for an
    # fp32 cache, varying with the page faults). At most 50 MB for 16 rows x 2,048 slots.
    SCRATCH_MIN = 1 << 20

    def _scratch_for(self, n: int, span: int) -> torch.Tensor | None:
        need = 2 * n * self.Hkv * span * self.D
        if need < self.SCRATCH_MIN:
            return None
        if self._scratch.numel() < need:
            with torch.inference_mode(False):  # a plain tensor, as the cache's
                self._scratch = torch.empty(need)
        return self._scratch[:need].view(2, n, self.Hkv, span, self.D)

    def _embed(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids)
        if self.embed_scale is None:
            return F.embedding(t, self.embed)
        return self.embed[t].float() * self.embed_scale[t]

    def _kv_float(self, i: int, rows: slice | int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values of `rows`, slots [0, end), in fp32 (for prefill)."""
        kv = self.kv[i, :, rows, :, :end]
        if self.kv_scale is not None:
            kv = kv.float() * self.kv_scale[i, :, rows, :, :end]
        return kv[0], kv[1]

    def _store(self, i: int, index: tuple, kv: torch.Tensor) -> None:
        """Write new keys and values (k|v stacked on the axis `index` leaves for it)."""
        if self.kv_scale is None:
            self.kv[i][index] = kv
        else:
            q, scale = quantize_rows(kv)
            self.kv[i][index] = q
            self.kv_scale[i][index] = scale

    def _fp32_layer(self, blk: nn.Module, own: bool) -> tuple[nn.Linear, ...]:
        """(q|k|v, o, gate|up, down) of one block, attention's 1/sqrt(D) folded into the query
        rows (one op less per step)."""
        a, mlp = blk.self_attn, blk.mlp
        qkv = _fuse([a.q_proj, a.k_proj, a.v_proj])
        with torch.no_grad():
            qkv.weight[: self.H * self.D] *= self.D**-0.5
            if qkv.bias is not None:
                qkv.bias[: self.H * self.D] *= self.D**-0.5
        gu = _fuse([mlp.gate_proj, mlp.up_proj])
        return qkv, _copy(a.o_proj, own), gu, _copy(mlp.down_proj, own)

    def _int4_layer(self, blk: nn.Module, arena: HugePageArena) -> tuple[Q4Linear, ...]:
        """One block's projections in 4-bit blocks (`lmloop.engine.kernels`; 32 weights share
        a scale and an offset and activations are quantized 32 at a time, so they need no
        smoothing). The fused fp32 copies are dropped as soon as they are packed."""
        return tuple(Q4Linear(m.weight, m.bias, arena) for m in self._fp32_layer(blk, own=False))

    def _int8_layer(self, idx: int, blk: nn.Module, stats: dict) -> tuple[Int8Linear, ...]:
        """One block's projections as Int8Linears, smoothed (SmoothQuant, Xiao et al. 2023).

        Activation outlier channels are what make per-token int8 activations lossy; measured
        on SmolLM2-135M, smoothing cut the mean KL to the fp32 model from 0.27 to 0.06 nats per
        token. The smoothing factors are folded into the RMSNorm weights (q/k/v, gate/up), into
        the up-projection rows (down) and into the value rows (o_proj), so smoothing costs
        nothing per call."""
        I, H, Hkv, D = self.I, self.H, self.Hkv, self.D  # noqa: E741
        qkv, o, gu, down = self._fp32_layer(blk, own=False)
        n1, n2 = self.norms[idx]
        gu_w, gu_b = gu.weight.detach(), gu.bias
        down_w = down.weight.detach()
        s = _smooth(stats.get((idx, "down")), down_w)
        if s is not None:  # up rows / s, so down's input arrives divided by s
            gu_w[I:] /= s[:, None]
            if gu_b is not None:
                gu_b = torch.cat([gu_b[:I], gu_b[I:] / s])
            down_w = down_w * s
        s = _smooth(stats.get((idx, "gu")), gu_w)
        if s is not None:
            gu_w, n2 = gu_w * s, n2 / s
        qkv_w, qkv_b = qkv.weight.detach(), qkv.bias
        o_w = o.weight.detach()
        s = _smooth(stats.get((idx, "o")), o_w)
        if s is not None:
            # o's input channel (query head h, dim d) carries v's (kv head of h, d): one factor
            # per (kv head, d), shared by the query heads of the group, lets the division happen
            # in v's rows instead of a multiply per call.
            sg = s.view(Hkv, H // Hkv, D).amax(1)  # (Hkv, D)
            v0 = (H + Hkv) * D
            qkv_w[v0:] /= sg.reshape(-1, 1)
            if qkv_b is not None:
                qkv_b = torch.cat([qkv_b[:v0], qkv_b[v0:] / sg.reshape(-1)])
            o_w = o_w * sg[:, None, :].expand(Hkv, H // Hkv, D).reshape(-1)
        s = _smooth(stats.get((idx, "qkv")), qkv_w)
        if s is not None:
            qkv_w, n1 = qkv_w * s, n1 / s
        self.norms[idx] = (n1, n2)
        return (
            Int8Linear(qkv_w, qkv_b),
            Int8Linear(o_w, o.bias),
            Int8Linear(gu_w, gu_b),
            Int8Linear(down_w, down.bias),
        )

    def _int8_head(self, head: nn.Linear, absmax: torch.Tensor | None) -> None:
        w = head.weight.detach()
        s = _smooth(absmax, w)
        if s is not None:  # folded into the final norm
            w, self.final_norm = w * s, self.final_norm / s
        # int4: the C kernel's int8 linear, which quantizes each row on its own and sums in
        # integers (fbgemm's quantizes all rows with one scale: logits would depend on the batch)
        if self.int4:  # on large pages: one row's step reads all of it
            self.lm_head = Q8Linear(w, None, HugePageArena(w.numel() + ALIGN))
        else:
            self.lm_head = Int8Linear(w, None)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The vocabulary head over the final norm of x (rows, C)."""
        if isinstance(self.lm_head, Q8Linear):  # the norm fused into the head's C call
            return self.lm_head(x, norm=self.final_norm, eps=self.eps)
        return self.lm_head(self._norm(x, self.final_norm))

    def _prompt_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head over prompt rows, each row's logits as it would get alone."""
        if isinstance(self.lm_head, Q8Linear):
            return self._logits(x)
        return _prompt_linear(self.lm_head, self._norm(x, self.final_norm))

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Spelled out: F.rms_norm's composite kernel costs ~4x more per call at batch 1.
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * w

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + torch.roll(x, self.D // 2, dims=-1) * sin

    def prefill(
        self, row: int, ids: list[int], *, start: int = 0, every_position: bool = False
    ) -> torch.Tensor:
        """Tokens at positions start..start+T-1 of `row` (slots before `start` hold a prefix
        already: the prefix cache's `write_kv`); logits of the last token (V,), or of every
        token (T, V) with `every_position`."""
        x = self._prompts([row], [list(ids)], [start])
        if every_position:  # (T, V): prompt scoring
            return self._prompt_logits(x)
        return self._prompt_logits(x[-1:])[0]

    def prefill_batch(
        self, rows: list[int], prompts: list[list[int]], starts: list[int]
    ) -> torch.Tensor:
        """Several prompts in one forward: prompt i's tokens from starts[i] go to `rows[i]` at
        positions starts[i].. (slots before hold a prefix already); logits of each prompt's
        last token (n, V). The same numbers as `prefill` of each alone."""
        x = self._prompts(rows, [p[s:] for p, s in zip(prompts, starts)], starts)
        last = torch.tensor(list(itertools.accumulate(len(p) - s for p, s in zip(prompts, starts))))
        return self._prompt_logits(x[last - 1])

    @property
    def mixes(self) -> bool:
        """Whether `decode_with_prompts` runs here: 4-bit weights over the int8 cache."""
        return self.int4 and self.fuse_one and self.kv_int8

    def decode_with_prompts(
        self,
        tokens: list[int],
        positions: list[int],
        rows: list[int],
        prompts: list[list[int]],
        starts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step of rows 0..n-1 and new prompts (prompt i's tokens from starts[i] into
        `rows[i]`, at positions starts[i]..) in one C call: the decode rows' logits (n, V) and
        each prompt's last-token logits (m, V). The numbers `decode` and `prefill_batch` give
        apart, bit for bit (the C path computes every token's row alone); one pass over the
        weights in place of two. Only where `mixes`."""
        self.allocate()
        toks, pos, crow = list(tokens), list(positions), list(range(len(tokens)))
        last = []
        for row, ids, start in zip(rows, prompts, starts):
            tail = ids[start:]
            toks += tail
            pos += range(start, start + len(tail))
            crow += [row] * len(tail)
            last.append(len(toks) - 1)
        at, cr = tokens_arg(crow, pos, self.kv)
        x = self._layers_fused(toks, at, cr)
        logits = self._logits(x[list(range(len(tokens))) + last])
        return logits[: len(tokens)], logits[len(tokens) :]

    def _prompts(self, rows: list[int], tails: list[list[int]], starts: list[int]):
        """Run prompts' tokens (tails[i] at positions starts[i]..) packed into N rows:
        the projections run once over all of them (one GEMM per weight instead of one per
        prompt); rotary positions, the cache writes and attention are each prompt's own.
        The hidden states (N, C) before the final norm."""
        self.allocate()
        H, Hkv, D = self.H, self.Hkv, self.D
        spans = []  # (row, start, end, where its first token sits among the packed ones)
        N = 0
        for row, ids, start in zip(rows, tails, starts):
            spans.append((row, start, start + len(ids), N))
            N += len(ids)
        if self.int4 and self.fuse_one and self.kv_scale is not None:
            return self._prompts_fused(spans, [t for ids in tails for t in ids])
        x = self._embed([t for ids in tails for t in ids])  # (N, C)
        pos = torch.cat([self._slots[s:e] for _, s, e, _ in spans])
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]  # (N, 1, D)
        # from 0: SDPA's own causal mask; after a prefix, query t sees slots <= t
        masks = [
            None if s == 0 else self._slots[None, :e] <= self._slots[s:e, None]
            for _, s, e, _ in spans
        ]
        y = torch.empty(N, H * D)
        fused = self.int4  # norms, SwiGLU and the residual adds inside the 4-bit linears
        for i, ((qkv, o, gu, down), (n1, n2)) in enumerate(zip(self.layers, self.norms)):
            if fused:  # (N, (H + 2 Hkv) D)
                h = qkv(x, norm=n1, eps=self.eps)
            else:
                h = _prompt_linear(qkv, self._norm(x, n1))
            qk = self._rope(h[:, : (H + Hkv) * D].view(N, H + Hkv, D), cos, sin)
            v = h[:, (H + Hkv) * D :].view(N, Hkv, D)
            for (row, start, end, at), mask in zip(spans, masks):
                T = end - start
                kv = torch.stack((qk[at : at + T, H:], v[at : at + T])).transpose(1, 2)
                self._store(i, (slice(None), row, slice(None), slice(start, end)), kv)
                # Attention reads keys and values back from the cache, so that a prompt sees
                # the same (int8-rounded) values whether its prefix was prefilled or copied in.
                k_, v_ = self._kv_float(i, row, end)
                q = qk[at : at + T, :H].transpose(0, 1)[None]  # (1, H, T, D)
                a = F.scaled_dot_product_attention(
                    q,
                    k_[None],
                    v_[None],
                    attn_mask=mask,
                    is_causal=mask is None,
                    scale=1.0,  # already folded into the queries
                    enable_gqa=True,
                )  # (1, H, T, D)
                y[at : at + T] = a[0].transpose(0, 1).reshape(T, H * D)
            if fused:  # each row's numbers as alone: the kernel's rows are independent
                o(y, out=x, add=True)
                down(gu(x, norm=n2, eps=self.eps), swiglu=True, out=x, add=True)
                continue
            x = x + _prompt_linear(o, y)
            g = _prompt_linear(gu, self._norm(x, n2))
            x = x + _prompt_linear(down, F.silu(g[:, : self.I]) * g[:, self.I :])
        return x

    def _prompts_fused(self, spans: list[tuple[int, int, int, int]], tokens: list[int]):
        """`_prompts` over 4-bit weights and the int8 cache: every prompt token is a row of one
        `decode_layers` call, at its position in its own cache row (the C attention writes all
        the new keys and values before any token attends, so each sees its prompt's earlier
        tokens). A token's numbers are then those a decode step at its position computes: a
        prompt gets the same cache and logits prefilled at once, in chunks, after a cached
        prefix or beside other prompts. One C call in place of ~20 torch ops a layer for each
        prompt (a short prompt admitted beside 15 decoding rows cost ~10 ms, half a step)."""
        rows = [row for row, s, e, _ in spans for _ in range(s, e)]
        at, crow = tokens_arg(rows, [p for _, s, e, _ in spans for p in range(s, e)], self.kv)
        return self._layers_fused(tokens, at, crow)

    def _layers_fused(self, tokens: list[int], at, crow=None) -> torch.Tensor:
        """The 4-bit layers over tokens in one C call: the hidden states (n, C) before the final
        norm. `at`: their positions, `crow`: their cache rows (None: token r is row r's)."""
        n, H, Hkv, D = len(tokens), self.H, self.Hkv, self.D
        x = self._embed(tokens).contiguous()  # (n, C), the residual stream, updated in place
        h = torch.empty(n, (H + 2 * Hkv) * D)
        y = torch.empty(n, H * D)
        g = torch.empty(n, 2 * self.I)
        if self.stack is None:  # built once: the layers' pointers for the C loop
            self.stack = LayerStack(self.layers4, self.norms4)
        # qkv(norm1(x)) -> attend -> x += o(y) -> g = gate_up(norm2(x)) -> x += down(swiglu(g)),
        # every layer in one C call
        decode_layers(self.stack, at, (H, Hkv, D), self.eps, self.cos, self.sin, self.kv,
                      self.kv_scale, x, h, y, g, crow)  # fmt: skip
        return x

    def _decode_fused(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """A decode step of rows 0..n-1 over 4-bit weights and the int8 cache: every layer in
        one C call (`lmloop.engine.kernels.decode_layers`: five kernel functions a layer, no
        torch op and no return to Python between them; ~150 Python-to-C crossings a step fewer,
        ~2-3 us each). RMSNorm, SwiGLU and the residual adds are fused into the linears;
        rotary positions, the cache writes and each row's attention are one function; the
        head's norm is fused into the head. Each function computes a row's numbers as it would
        alone, so a row's logits do not depend on the others (the embedding lookup is per row
        too). Measured on SmolLM2-135M, 2 threads: see BENCHMARKS.md."""
        return self._logits(self._layers_fused(tokens, positions_arg(positions, self.kv)))

    def _decode_rows(self, tokens: list[int], positions: list[int], layers, norms) -> torch.Tensor:
        """A decode step of rows 0..n-1 over the int8 cache: rotary positions, the cache writes
        and each row's attention (its own length, no mask) are one C call a layer."""
        n, H, Hkv, D = len(tokens), self.H, self.Hkv, self.D
        at = positions_arg(positions, self.kv)
        x = self._embed(tokens)  # (n, C)
        y = torch.empty(n, H * D)
        for i, ((qkv, o, gu, down), (n1, n2)) in enumerate(zip(layers, norms)):
            h = qkv(self._norm(x, n1)).contiguous()  # (n, (H + 2 Hkv) D)
            attend(h, at, (H, Hkv, D), self.cos, self.sin, self.kv, self.kv_scale, i, y)
            x = x + o(y)
            g = gu(self._norm(x, n2))
            x = x + down(F.silu(g[:, : self.I]) * g[:, self.I :])
        return self._logits(x)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        n, H, Hkv, D = len(tokens), self.H, self.Hkv, self.D
        if self.int4 and self.fuse_one and self.kv_scale is not None:
            return self._decode_fused(tokens, positions)
        layers, norms = self.layers, self.norms
        if self.c_attention and self.kv_scale is not None:
            return self._decode_rows(tokens, positions, layers, norms)
        pos = torch.tensor(positions)
        x = self._embed(tokens)  # (n, C)
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]  # (n, 1, D)
        span = max(positions) + 1
        p0 = positions[0]
        same = all(p == p0 for p in positions)
        # Views over every layer, taken once per step (indexing costs an op per axis per call):
        # what attention reads (L, 2, n, Hkv, S, D), the scales (L, 2, n, Hkv, 1, S), and where
        # the new keys/values go.
        kv_all, scale_all, scratch = self.kv[:, :, :n, :, :span], self.kv_scale, None
        if scale_all is not None:
            scale_all = scale_all[:, :, :n, :, :span].transpose(-1, -2)
            scratch = self._scratch_for(n, span)
        # One length mask for every layer: row r sees slots <= its own position.
        mask = None
        if same:  # new keys/values (2, n, Hkv, D) go to slot p0 of rows 0..n-1
            dst = self.kv[:, :, :n, :, p0]
            dst_scale = None if self.kv_scale is None else self.kv_scale[:, :, :n, :, p0]
        else:  # (n, 2, Hkv, D) to each row's own slot; additive mask: -inf where not visible
            at = (slice(None), torch.arange(n), slice(None), pos)
            seen = self._slots[None, :span] <= pos[:, None]  # (n, span)
            mask = torch.zeros(n, 1, 1, span).masked_fill_(~seen[:, None, None, :], float("-inf"))
        rep = H // Hkv
        for i, ((qkv, o, gu, down), (n1, n2)) in enumerate(zip(layers, norms)):
            h = qkv(self._norm(x, n1))  # (n, (H + 2 Hkv) D)
            qk = self._rope(h[:, : (H + Hkv) * D].view(n, H + Hkv, D), cos, sin)
            v = h[:, (H + Hkv) * D :].view(n, Hkv, D)
            if not same:
                self._store(i, at, torch.stack((qk[:, H:], v), 1))
            elif dst_scale is None:
                dst[i] = torch.stack((qk[:, H:], v))
            else:
                dst[i], dst_scale[i] = quantize_rows(torch.stack((qk[:, H:], v)))
            # One query per row: plain matmuls beat SDPA's dispatch here. Query heads are grouped
            # by their kv head (n, Hkv, rep, D), which is grouped-query attention without copies.
            q = qk[:, :H].reshape(n, Hkv, rep, D)
            if scale_all is None:
                kc, vc = kv_all[i].unbind(0)  # (n, Hkv, S, D)
                att = torch.matmul(q, kc.transpose(-1, -2))  # (n, Hkv, rep, S)
            else:  # a key's scale multiplies its score; a value's, its probability
                if scratch is None:
                    kc, vc = kv_all[i].float().unbind(0)  # one conversion for keys and values
                else:
                    kc, vc = scratch.copy_(kv_all[i]).unbind(0)
                ks, vs = scale_all[i].unbind(0)  # (n, Hkv, 1, S)
                att = torch.matmul(q, kc.transpose(-1, -2)) * ks
            if mask is not None:
                att = att + mask
            p = torch.softmax(att, dim=-1)
            y = torch.matmul(p if scale_all is None else p * vs, vc)  # (n, Hkv, rep, D)
            x = x + o(y.reshape(n, H * D))
            g = gu(self._norm(x, n2))
            x = x + down(F.silu(g[:, : self.I]) * g[:, self.I :])
        return self._logits(x)

    def move(self, src: int, dst: int, length: int) -> None:
        self.kv[:, :, dst, :, :length] = self.kv[:, :, src, :, :length]
        if self.kv_scale is not None:
            self.kv_scale[:, :, dst, :, :length] = self.kv_scale[:, :, src, :, :length]

    def reset(self, row: int) -> None:
        """Nothing to clear: a row's length mask comes from its positions."""

    # The prefix cache's access to slots (`lmloop.engine.prefix`): copies of the cache's own
    # storage, (layer, k|v, kv head, slot, dim) and, with an int8 cache, its scales.
    def read_kv(self, row: int, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        parts = [self.kv[:, :, row, :, start:stop].clone()]
        if self.kv_scale is not None:
            parts.append(self.kv_scale[:, :, row, :, start:stop].clone())
        return tuple(parts)

    def write_kv(self, row: int, start: int, parts: tuple[torch.Tensor, ...], n: int) -> None:
        self.allocate()
        self.kv[:, :, row, :, start : start + n] = parts[0][:, :, :, :n]
        if self.kv_scale is not None:
            self.kv_scale[:, :, row, :, start : start + n] = parts[1][:, :, :, :n]
