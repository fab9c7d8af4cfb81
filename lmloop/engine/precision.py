"""Which weights a model is served with: `--precision auto|fp32|int8|int4`, resolved once at load.

    choice = choose("auto", model, tokenizer, source="Q4_1")
    print(choice.line())   # precision int4: the source holds 4-bit weights (Q4_1)

What `auto` serves, the quality bound and why it is that bound are in docs/serve.md (and
`Bound`). The measurement is deterministic, so the gate and the server pick the same precision
for the same model on the same machine. Explicit choices are kept or refused with a one-line
reason; a kernel build that fails is never silent, and a kernel that fails its self-check
against torch (`kernels.self_check`) refuses to serve."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from lmloop.artifacts import atomic_write, cache_dir
from lmloop.engine import kernels
from lmloop.engine.fast import (
    CALIBRATION_TEXT,
    MISSING_INT8_OPS,
    FastLlamaRunner,
    dynamic_linear_op,
)
from lmloop.engine.fast import supports as fast_supports
from lmloop.engine.memory import release_memory
from lmloop.engine.runner import ModelRunner
from lmloop.errors import UserError
from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Bound:
    """The quality `auto` accepts from a quantized path, against the model's fp32 forward.

    Set from the 4-bit format users of llama.cpp and Ollama already serve without asking: on
    SmolLM2-135M's own Q4_1 file our int4 path loses 0.028 nats per token, top-1 90.1% on the
    probe (docs/serve.md's table; its layer weights re-pack exactly, so that is the activation,
    head and KV-cache rounding alone). The bound leaves room for a float checkpoint's own weights
    rounding to 4 bits (a version the loop trained from that file), and sends a model that loses
    clearly more (outlier weights, a tiny or badly conditioned checkpoint) to int8, else fp32.
    A stricter bound (e.g. 0.02 nats and 97%) would refuse int8 on SmolLM2 too (0.017, 92.8%;
    an int8 KV cache alone costs 2% of top-1) and serve every float checkpoint at fp32, the slow
    default this rule replaces."""

    kl: float = 0.05  # mean KL(fp32 || quantized), nats per token
    top1: float = 0.85  # share of positions where both pick the same most likely token


BOUND = Bound()

# Held out from `CALIBRATION_TEXT` (the int8 smoothing's text), so the probe does not grade
# the quantization on what it was fitted to. About 120 tokens of SmolLM2's tokenizer.
PROBE_TEXT = (
    "Rivers carry water from the mountains to the sea, shaping valleys as they go. Over "
    "thousands of years a small stream can cut a canyon through solid rock.\n"
    "User: Can you suggest a name for my new puppy?\nAssistant: How about Biscuit, Maple or "
    "Scout? Each is short, friendly and easy to call across a park.\n"
    "for i in range(10):\n    print(i * i)\n"
    "The meeting moved to Thursday at 3 pm; please bring the quarterly report and two copies "
    "of the budget."
)
PROBE_TOKENS = 128


@dataclasses.dataclass(frozen=True)
class Choice:
    precision: str  # fp32 | int8 | int4
    reason: str

    def line(self) -> str:
        return f"precision {self.precision}: {self.reason}"


def source_bits(quant: str | None) -> int | None:
    """Bits per weight a GGUF file type stands for (4 for Q4_1, 8 for Q8_0; None: float)."""
    if not quant:
        return None
    q = quant.upper()
    if q.startswith(("F", "BF")) or q in ("ALL_F32",):
        return None
    for prefix, bits in (("IQ1", 2), ("IQ2", 2), ("TQ", 2), ("Q1", 2), ("Q2", 2), ("IQ3", 3),
                         ("Q3", 3), ("IQ4", 4), ("Q4", 4), ("MXFP4", 4), ("NVFP4", 4),
                         ("Q5", 5), ("Q6", 6), ("Q8", 8)):  # fmt: skip
        if q.startswith(prefix):
            return bits
    return None


def kernel_problem() -> kernels.KernelUnavailable | None:
    """Why the C kernel cannot be used here (None: it built and passed its self-check).
    A failed self-check is raised as a UserError: such a kernel must not serve anything."""
    try:
        kernels.library()
    except kernels.KernelUnavailable as e:
        return e
    except kernels.KernelSelfCheckFailed as e:
        raise UserError(
            f"refusing to serve: {e}",
            hint="report it with the output of `lmloop serve --check`; --precision fp32 "
            "and --kv-cache fp32 do not use the kernel",
        ) from None
    return None


def int4_unsupported(model: torch.nn.Module) -> str | None:
    """Why the 4-bit kernel cannot run this model's layers (None: it can)."""
    if not fast_supports(model):
        name = type(model).__name__
        return f"the 4-bit kernel covers the Llama family in fp32 on the CPU, not {name}"
    cfg = model.config
    widths = (getattr(cfg, "hidden_size", 0), getattr(cfg, "intermediate_size", 0))
    if any(w % kernels.QK for w in widths):
        return (
            f"the 4-bit kernel needs layer widths that are multiples of {kernels.QK} (this "
            f"model: {widths[0]} and {widths[1]})"
        )
    return None


def choose(
    requested: str,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    *,
    source: str | None = None,
    kv_int8: bool | None = None,
) -> Choice:
    """The precision to serve `model` at (see the module docstring); UserError for an explicit
    request that cannot be kept. `source`: the GGUF file type the weights came from, if any;
    `kv_int8`: the KV cache setting (None: int8 with quantized weights)."""
    seq2seq = bool(getattr(model, "is_encoder_decoder", False))
    if requested in ("int8", "int4") and dynamic_linear_op() is None:
        raise UserError(f"--precision {requested}: {MISSING_INT8_OPS}", hint="use --precision fp32")
    if requested in ("fp32", "int8"):
        kv = requested == "int8" if kv_int8 is None else kv_int8
        if kv and fast_supports(model):  # attention over an int8 cache runs in C
            _kernel_or_torch_attention(requested)
        return Choice(requested, f"as asked (--precision {requested})")
    if requested == "int4":
        why = int4_unsupported(model)
        if why is None:
            problem = kernel_problem()
            why = None if problem is None else f"it needs its C kernel: {problem}"
        if why is not None:
            raise UserError(f"--precision int4: {why}", hint="use --precision int8")
        return Choice("int4", "as asked (--precision int4)")
    if requested != "auto":
        raise UserError(f"unknown precision {requested!r}", hint="auto, fp32, int8 or int4")
    if seq2seq:
        return Choice("fp32", "int8 and int4 apply to decoder-only models; this is encoder-decoder")
    if dynamic_linear_op() is None:
        return Choice("fp32", f"{MISSING_INT8_OPS}, so neither int8 nor int4")
    why_not4 = int4_unsupported(model)
    # the kernel also runs int8's attention: a failed self-check refuses here, for any family
    # the fast runner serves
    problem = kernel_problem() if fast_supports(model) else None
    if why_not4 is None and problem is not None:
        why_not4 = f"the C kernel is unavailable ({problem})"
    bits = source_bits(source)
    if bits is not None:
        held = f"the source holds {bits}-bit weights ({source})"
        if bits <= 4 and why_not4 is None:
            return Choice("int4", held)
        if bits <= 4:
            return Choice("int8", f"{held}, but {why_not4}; int8 instead")
        return Choice("int8", f"{held}; int8 is the nearest precision that keeps them")
    # a float checkpoint: the fastest precision within the bound, measured on the probe
    ref, ids = _reference(model, tokenizer)
    if ref is None:
        return Choice("fp32", "the probe text does not fit this model's context")
    tried = []
    weights = weights_digest(model)
    for cand in ("int4", "int8"):
        if cand == "int4" and why_not4 is not None:
            tried.append(f"not int4: {why_not4}")
            continue
        kl, top1 = measure(model, tokenizer, cand, ids, ref, kv_int8=kv_int8, weights=weights)
        figures = f"mean KL {kl:.4f} nats/token, top-1 {top1:.1%} against fp32"
        bound = f"bound: KL <= {BOUND.kl}, top-1 >= {BOUND.top1:.0%}"
        if kl <= BOUND.kl and top1 >= BOUND.top1:
            return Choice(cand, "; ".join(tried + [f"{figures} on the probe text ({bound})"]))
        tried.append(f"not {cand}: {figures}, outside the {bound}")
    return Choice("fp32", "; ".join(tried))


def _kernel_or_torch_attention(requested: str) -> None:
    """An int8 cache is attended over in C where the kernel builds. No compiler: the torch path,
    said once; a compiler whose build fails: refused (an explicit request is never quietly
    served another way)."""
    problem = kernel_problem()
    if problem is None:
        return
    if isinstance(problem, kernels.KernelBuildFailed):
        cache = "" if requested == "int8" else " with an int8 KV cache"
        raise UserError(
            f"--precision {requested}{cache}: {problem}",
            hint="fix the compiler (or set CC to a working one), or use --kv-cache fp32",
        )
    log.warning(
        "int8 attention runs on torch ops (slower): the C kernel is unavailable: %s", problem
    )


def _reference(model: torch.nn.Module, tokenizer: Tokenizer):
    """(log-probabilities (T, V) of the model's fp32 forward on the probe, its ids); (None,
    ids) when the model's context is too short for a meaningful probe."""
    vocab = int(model.config.vocab_size)
    ids = [t for t in tokenizer.encode(PROBE_TEXT) if t < vocab][:PROBE_TOKENS]
    ids = ids[: int(model.max_seq_len) - 1]
    if len(ids) < 8:
        return None, ids
    return reference_for(model, ids)


def reference_for(model: torch.nn.Module, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """(log-probabilities (T, V) of the model's own fp32 forward over `ids`, `ids`)."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0]
    return torch.log_softmax(logits.float(), -1), ids


def measure(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    precision: str,
    ids: list[int],
    ref: torch.Tensor,
    *,
    kv_int8: bool | None = None,
    weights: str | None = None,
    cache: bool = True,
) -> tuple[float, float]:
    """(mean KL(fp32 || `precision`) in nats per token, top-1 agreement) over `ids`, fed one
    decode step at a time through the runner `precision` is served with (batch 1). Kept in
    the cache (`_probe_path`) and read back for the same weights (`weights`: their
    `weights_digest`, computed here when not given), code, kernel build, torch and threads;
    `cache=False` measures and keeps nothing (bench/precision.py times the measurement)."""
    kv = precision != "fp32" if kv_int8 is None else kv_int8
    vocab = int(model.config.vocab_size)
    calib = [t for t in tokenizer.encode(CALIBRATION_TEXT) if t < vocab]  # int8's smoothing
    if not cache:
        return _measure(model, precision, ids, calib, ref, kv)
    path = _probe_path(precision, ids, calib, kv, weights or weights_digest(model))
    try:
        got = json.loads(path.read_text())
        return float(got["kl"]), float(got["top1"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not measured here yet (or an unreadable entry): measure
    kl, top1 = _measure(model, precision, ids, calib, ref, kv)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"kl": kl, "top1": top1, "precision": precision}))
    except OSError as e:  # a read-only cache costs the next load a measurement, nothing more
        log.warning("could not keep the precision probe's figures in %s: %s", path, e)
    return kl, top1


# The probe's figures are kept per machine: the same weights, measured by the same code with
# the same kernel build, torch and thread count, give the same numbers (the measurement is
# deterministic), and measuring takes ~4 s a precision for a 135M model (a runner's packing and
# 128 decode steps; 8.7 s for a version served int8, which tries int4 first) that every load
# of a trained version paid again: the gate's engines, the server's start and its hot reload. The key covers the engine's and the models' source, so
# a change to either measures afresh.
_PROBE_CODE = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "models")


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of the model's configuration and every tensor of its state (names, shapes,
    dtypes and bytes): ~1 s for 135M fp32 parameters."""
    h = hashlib.blake2b(digest_size=20)
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg):  # lmloop's model configs: a repr of every field
        h.update(repr(cfg).encode())
    elif cfg is not None:
        h.update(getattr(cfg, "to_json_string", lambda: type(cfg).__name__)().encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _probe_path(precision: str, ids: list[int], calib: list[int], kv: bool, weights: str) -> Path:
    h = hashlib.blake2b(digest_size=20)
    build = kernels.build_info()  # compiler, flags, and the library's key (source, CPU)
    for part in (weights, precision, repr(kv), repr(ids), repr(calib), torch.__version__,
                 str(torch.get_num_threads()), json.dumps(build, sort_keys=True)):  # fmt: skip
        h.update(part.encode() + b"\0")
    for root in _PROBE_CODE:
        for f in sorted(root.rglob("*")):
            if f.suffix in (".py", ".c") and f.is_file():
                h.update(f.read_bytes())
    return cache_dir() / "precision-probe" / f"{h.hexdigest()}.json"


def _measure(
    model: torch.nn.Module,
    precision: str,
    ids: list[int],
    calib: list[int],
    ref: torch.Tensor,
    kv: bool,
) -> tuple[float, float]:
    int8, int4, n = precision == "int8", precision == "int4", len(ids) + 1
    runner: FastLlamaRunner | ModelRunner
    if fast_supports(model):
        runner = FastLlamaRunner(
            model, 1, n, int8=int8, int4=int4, kv_int8=kv, calibration_ids=calib
        )
    else:
        runner = ModelRunner(model, 1, n, int8=int8)
    rows = []
    with torch.inference_mode():
        rows.append(runner.prefill(0, ids[:1]))
        for t in range(1, len(ids)):
            rows.append(runner.decode([ids[t]], [t])[0])
        lp = torch.log_softmax(torch.stack(rows).float(), -1)
    del runner
    release_memory()
    kl = F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).mean()
    top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean()
    return float(kl), float(top1)
