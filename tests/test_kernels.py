"""The 4-bit C kernel: packing, the fused linear, and the fused batch-1 decode step."""

from __future__ import annotations

import gc
import os
import platform
import time

import pytest
import torch
import torch.nn.functional as F
from modelkit import hf_gpt2, hf_llama, save_hf, tiny_tokenizer

from lmloop.engine import Engine, SamplingParams, kernels
from lmloop.engine.fast import FastLlamaRunner
from lmloop.errors import UserError
from lmloop.models.io import load_model


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save_hf(hf_llama(tok.vocab_size, tied=False), tok, d)
    return load_model(str(d))


@pytest.fixture(scope="module")
def llama64(tok, tmp_path_factory):
    """Heads of 64 dims (SmolLM2's), which the attention's vector path is written for."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    d = tmp_path_factory.mktemp("llama64")
    save_hf(LlamaForCausalLM(cfg).eval(), tok, d)
    return load_model(str(d))


def test_packing_recovers_a_q4_grid_exactly():
    """Weights that are already 4-bit (a GGUF Q4_1 model, dequantized on load) pack back to
    their own codes, scales and offsets: the kernel reads the weights the file holds."""
    g = torch.Generator().manual_seed(0)
    n, nb = 8, 3
    d = (torch.rand(n, nb, 1, generator=g) * 0.1 + 0.01).half().float()
    m = (torch.randn(n, nb, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (n, nb, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every block spans the whole code range
    w = (q * d + m).reshape(n, nb * 32)
    codes, scales = kernels.pack_q4(w)
    assert codes.shape == (n, nb, 16) and codes.dtype == torch.uint8
    assert torch.equal(kernels.unpack(codes, scales), w)
    assert torch.equal(scales.float(), torch.cat([d, m], -1))


def _rms(x, w, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def _a8(x: torch.Tensor) -> torch.Tensor:
    """The values the kernel multiplies for activations x: quantized 32 at a time as the C
    code does (d = absmax / 127, q = x * (127 / absmax) rounded to nearest, ties to even),
    then dequantized (q * d)."""
    b = x.reshape(*x.shape[:-1], -1, kernels.QK)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(b * inv) * (amax / 127)).reshape(x.shape)


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to fp32 summation order: 1e-5 of the output's magnitude."""
    err = (got.double() - want).abs().max() / want.abs().max()
    assert float(err) < 1e-5, float(err)


@pytest.mark.parametrize("rows", [1, 3])
def test_the_linear_and_its_fused_inputs_match_torch(rows):
    """The 4-bit linear against a torch reference that applies the same 8-bit activation
    quantization and the same block dequantization (`unpack`), to 1e-5; and against fp32
    torch, where only the quantization's ~0.5% separates them."""
    g = torch.Generator().manual_seed(1)
    n, k = 72, 64  # 72 output rows: 18 groups of 4, then none left over
    lin = kernels.Q4Linear(torch.randn(n, k, generator=g), torch.randn(n, generator=g))
    w, b = lin.weight().double(), lin.bias.double()
    x = torch.randn(rows, k, generator=g)

    def check(got, inp):  # inp: what the kernel's input stage makes of x (fp32)
        _same(got, _a8(inp).double() @ w.T + b)
        want = inp.double() @ w.T + b
        assert float((got - want).norm() / want.norm()) < 0.02

    check(lin(x), x)
    norm = torch.rand(k, generator=g) + 0.5
    check(lin(x, norm=norm, eps=1e-5), _rms(x, norm, 1e-5))
    gate_up = torch.randn(rows, 2 * k, generator=g)
    check(lin(gate_up, swiglu=True), F.silu(gate_up[:, :k]) * gate_up[:, k:])
    acc = torch.randn(rows, n, generator=g)
    start = acc.clone()
    lin(x, out=acc, add=True)
    check(acc - start, x)
    with pytest.raises(ValueError):
        lin(x, swiglu=True)  # a gate | up input is twice as wide


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_linear_equals_its_quantized_reference(rows):
    """`Int8Linear` against torch doing the same quantization, to 1e-5: int8 weights per output
    channel (absmax / 127), rows scaled to absmax 1, then the whole input quantized to uint8
    with one scale and zero point (7 bits without VNNI) as fbgemm's dynamic linear does."""
    from lmloop.engine.fast import Int8Linear, scale_rows

    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    lin = Int8Linear(w, b)
    x = torch.randn(rows, 64, generator=g)
    x[0] *= 1000  # a massive row: the per-row scaling keeps the others' precision
    ws = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
    wd = (torch.round(w / ws).clamp(-128, 127) * ws).double()
    xs, m = scale_rows(x)
    scale, zero = torch._choose_qparams_per_tensor(xs, Int8Linear.reduce_range)
    top = 127 if Int8Linear.reduce_range else 255
    xd = ((torch.round(xs / scale) + zero).clamp(0, top) - zero) * scale
    want = (xd.double() @ wd.T) * (1 if m is None else m.double()) + b.double()
    got = lin(x)
    for r in range(rows):  # each row to 1e-5 of its own magnitude
        _same(got[r], want[r])


@pytest.mark.parametrize("n", [72, 77])  # whole groups of 8 rows; then 5 rows left over
def test_a_rows_outputs_are_the_same_bits_at_any_row_count(n):
    """Batch invariance at the kernel: each row of a many-row call (weights unpacked once for
    several rows) equals, to the bit, that row computed alone; for the 4-bit linear with its
    fused inputs and for the int8 one (the 4-bit runner's vocabulary head)."""
    g = torch.Generator().manual_seed(n)
    k = 96
    q4 = kernels.Q4Linear(torch.randn(n, k, generator=g), torch.randn(n, generator=g))
    q8 = kernels.Q8Linear(torch.randn(n, k, generator=g), torch.randn(n, generator=g))
    norm = torch.rand(k, generator=g) + 0.5
    for rows in (2, 3, 4, 5, 16):
        x = torch.randn(rows, k, generator=g)
        x[0] *= 1000  # a massive row beside small ones changes nothing for the others
        gate_up = torch.randn(rows, 2 * k, generator=g)
        calls = [
            lambda t: q4(t),
            lambda t: q4(t, norm=norm, eps=1e-5),
            lambda t: q8(t),
            lambda t: q8(t, norm=norm, eps=1e-5),
        ]
        for call in calls:
            many = call(x)
            assert all(torch.equal(many[r], call(x[r : r + 1])[0]) for r in range(rows))
        many = q4(gate_up, swiglu=True)
        assert all(
            torch.equal(many[r], q4(gate_up[r : r + 1], swiglu=True)[0]) for r in range(rows)
        )


def test_the_kernel_layout_round_trips():
    """The interleaved layouts the kernels read hold exactly the packed weights."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(21, 64, generator=g)  # 2 groups of 8 and 5 rows left over
    codes, scales = kernels.pack_q4(w)
    flat = kernels.to_kernel_layout(codes, scales)
    back = kernels.from_kernel_layout(*flat, 21, 2)
    assert torch.equal(back[0], codes) and torch.equal(back[1], scales)
    assert torch.equal(kernels.Q4Linear(w, None).weight(), kernels.unpack(codes, scales))
    q8 = kernels.Q8Linear(w, None)
    assert float((q8.weight() - w).abs().max()) <= float(q8.scale.max()) / 2 + 1e-7


@pytest.mark.parametrize("D", [8, 64])
@pytest.mark.parametrize("positions", [[33, 0, 17], [33, 0, 17, 5, 39]])
def test_attention_writes_the_slots_and_attends_like_torch(D, positions):
    """`attend` against torch on the same int8 cache, rows at their own positions: each new key
    (rotary applied) and value quantized into its row's slot of the right layer, and softmax
    attention over that row's slots 0..position of the dequantized cache (grouped queries: 3
    query heads per kv head; with 5 rows the kernel takes a group's heads in one pass, with 3
    one head at a time)."""
    from lmloop.engine.fast import quantize_rows

    g = torch.Generator().manual_seed(D)
    H, Hkv, L, B, S, layer = 6, 2, 2, 6, 40, 1
    n = len(positions)
    kv = torch.randint(-127, 128, (L, 2, B, Hkv, S, D), generator=g, dtype=torch.int8)
    scale = torch.rand(L, 2, B, Hkv, S, 1, generator=g) * 0.02 + 0.001
    kv0, scale0 = kv.clone(), scale.clone()
    h = torch.randn(n, (H + 2 * Hkv) * D, generator=g)
    cos, sin = torch.randn(S, D, generator=g), torch.randn(S, D, generator=g)
    y = torch.empty(n, H * D)
    kernels.attend(h, positions, (H, Hkv, D), cos, sin, kv, scale, layer, y)

    for r, pos in enumerate(positions):
        x = h[r].view(H + 2 * Hkv, D)
        qk = x[: H + Hkv] * cos[pos] + torch.roll(x[: H + Hkv], D // 2, dims=-1) * sin[pos]
        new_q, new_s = quantize_rows(torch.stack((qk[H:], x[H + Hkv :])))  # (2, Hkv, D)
        assert torch.equal(kv[layer, :, r, :, pos], new_q)
        assert torch.equal(scale[layer, :, r, :, pos], new_s)
        kv0[layer, :, r, :, pos], scale0[layer, :, r, :, pos] = new_q, new_s
        k = kv[layer, 0, r, :, : pos + 1].float() * scale[layer, 0, r, :, : pos + 1]
        v = kv[layer, 1, r, :, : pos + 1].float() * scale[layer, 1, r, :, : pos + 1]
        q = qk[:H].view(Hkv, H // Hkv, D)
        want = torch.softmax(q @ k.transpose(-1, -2), -1) @ v  # (Hkv, 3, D)
        assert torch.allclose(y[r].view(Hkv, H // Hkv, D), want, atol=1e-5, rtol=1e-4)
    assert torch.equal(kv, kv0) and torch.equal(scale, scale0)  # nothing else written
    with pytest.raises(ValueError):
        kernels.attend(h, [40, 0, 0], (H, Hkv, D), cos, sin, kv, scale, layer, y)


@pytest.mark.parametrize("D", [8, 64])
def test_a_rows_attention_is_the_same_bits_alone_or_in_a_batch(D):
    """Batch invariance of `attend`: five rows in one call (a kv group's query heads in one
    pass) give each row the bits it gets alone (its heads one at a time)."""
    g = torch.Generator().manual_seed(7)
    H, Hkv, L, B, S, layer = 6, 2, 2, 6, 64, 0
    positions = [60, 3, 17, 41, 9]
    kv = torch.randint(-127, 128, (L, 2, B, Hkv, S, D), generator=g, dtype=torch.int8)
    scale = torch.rand(L, 2, B, Hkv, S, 1, generator=g) * 0.02 + 0.001
    h = torch.randn(len(positions), (H + 2 * Hkv) * D, generator=g)
    cos, sin = torch.randn(S, D, generator=g), torch.randn(S, D, generator=g)
    together = torch.empty(len(positions), H * D)
    kernels.attend(h, positions, (H, Hkv, D), cos, sin, kv.clone(), scale.clone(), layer, together)
    for r, pos in enumerate(positions):
        alone_kv, alone_scale = kv.clone(), scale.clone()
        alone_kv[:, :, 0], alone_scale[:, :, 0] = kv[:, :, r], scale[:, :, r]  # row r in slot 0
        alone = torch.empty(1, H * D)
        kernels.attend(h[r : r + 1].contiguous(), [pos], (H, Hkv, D), cos, sin, alone_kv,
                       alone_scale, layer, alone)  # fmt: skip
        assert torch.equal(alone[0], together[r]), r


def _greedy(runner, ids, steps):
    logits = runner.prefill(0, ids)
    out, pos = [], len(ids)
    for _ in range(steps):
        t = int(logits.argmax())
        out.append(logits)
        logits = runner.decode([t], [pos])[0]
        pos += 1
    return torch.stack(out)


@pytest.mark.parametrize("heads", ["d8", "d64"])
def test_the_fused_decode_step_equals_the_op_by_op_one(heads, request, tok, monkeypatch):
    """`_decode_fused` (norms, SwiGLU and residuals fused into the 4-bit linears; rotary
    positions, the int8 cache write and attention in one C call) against the same runner's
    torch path over the same 4-bit weights."""
    model = request.getfixturevalue("llama" if heads == "d8" else "llama64").model
    ids = tok.encode("Once upon a time there was")
    fused = FastLlamaRunner(model, 2, 48, int4=True, kv_int8=True)
    plain = FastLlamaRunner(model, 2, 48, int4=True, kv_int8=True)
    plain.fuse_one = False
    calls = []
    real = FastLlamaRunner._decode_fused
    monkeypatch.setattr(
        FastLlamaRunner, "_decode_fused", lambda self, *a: calls.append(1) or real(self, *a)
    )
    with torch.inference_mode():
        a, b = _greedy(fused, ids, 20), _greedy(plain, ids, 20)
    assert len(calls) == 20  # every decode step took the fused path
    # The same math in another order: a last-bit difference can move an activation across
    # an int8 rounding boundary in the next layer, so agreement is to ~1%, not to fp32's 1e-6.
    assert float((a - b).abs().max()) < 0.02 * float(b.abs().max())
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    end = len(ids) + 20  # the caches agree slot by slot (int8 codes within a step or two)
    ka, kb = fused.kv[:, :, 0, :, :end].int(), plain.kv[:, :, 0, :, :end].int()
    assert int((ka - kb).abs().max()) <= 2 and float((ka - kb).abs().float().mean()) < 0.05
    sa, sb = fused.kv_scale[:, :, 0, :, :end], plain.kv_scale[:, :, 0, :, :end]
    assert torch.allclose(sa, sb, rtol=0.02)


def test_an_int4_engine_stays_close_to_fp32_alone_and_batched(llama, tok):
    ids = tok.encode("The quick brown fox")
    with torch.inference_mode():
        ref = llama.model(torch.tensor([ids]))[0, -1]
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    with Engine(llama.model, llama.tokenizer, precision="int4") as engine:
        assert engine.kv_int8 and engine.runner.layers4 is not None
        assert engine.sample.keywords["topk"] is kernels.topk  # top-p's candidates in C too
        assert engine.sample.keywords["fused"] is kernels.sample  # and the whole draw
        with torch.inference_mode():  # the first decode step alone (4-bit) vs the model
            engine.runner.prefill(0, ids[:-1])
            got = engine.runner.decode([ids[-1]], [len(ids) - 1])[0]
        assert float((got - ref).abs().max()) < 0.1 * float(ref.abs().max())
        alone = engine.complete(ids, p)
        handles = [engine.submit(ids, p), engine.submit(tok.encode("12 apples"), p)]
        both = [h.result() for h in handles]  # two rows: the same kernels
    assert alone.completion_tokens == 10 and [c.completion_tokens for c in both] == [10, 10]
    after = llama.model.state_dict()  # packing worked on copies
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_int4_is_refused_with_a_reason(llama, tok, tmp_path, monkeypatch):
    save_hf(hf_gpt2(tok.vocab_size), tok, tmp_path / "gpt2")
    gpt2 = load_model(str(tmp_path / "gpt2"))
    with pytest.raises(UserError, match="Llama family"):
        Engine(gpt2.model, gpt2.tokenizer, precision="int4")
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    kernels.library.cache_clear()
    try:
        with pytest.raises(UserError, match="C compiler"):
            Engine(llama.model, llama.tokenizer, precision="int4")
    finally:
        kernels.library.cache_clear()


def _x86_flags() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        return ""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        return next((line for line in f if line.startswith("flags")), "")


# The kernel is compiled for the machine it runs on (-march=native): these build the same
# source for the paths other CPUs take and check them here. Only x86-64 can run them.
# icelake-server has AVX-512 VNNI but not AVX-VNNI: the other VNNI spelling.
ARCHES = [("x86-64", 0, "sse2"), ("haswell", 1, "avx2"), ("icelake-server", 2, "avx512_vnni")]


@pytest.mark.parametrize(("arch", "simd", "flag"), ARCHES, ids=[a[0] for a in ARCHES])
def test_the_plain_c_and_avx2_paths_agree_with_torch(
    arch, simd, flag, request, tok, tmp_path, monkeypatch
):
    if f" {flag} " not in _x86_flags() + " ":
        # Justified: code built for an instruction set the CPU lacks would crash the process
        # (SIGILL), not fail. Every machine still tests its own native build above; the x86-64
        # CI machines run the plain C and AVX2 builds, and the VNNI one where AVX-512 VNNI is.
        pytest.skip(f"this CPU cannot run {arch} code")
    path = tmp_path / f"qlinear-{arch}.so"
    kernels._build(kernels._compiler(), path, kernels._torch_openmp(), arch=arch)
    lib = kernels.load(path)
    assert lib.lm_simd() == simd
    monkeypatch.setattr(kernels, "library", lambda: lib)
    test_the_linear_and_its_fused_inputs_match_torch(1)
    test_the_linear_and_its_fused_inputs_match_torch(3)
    test_a_rows_outputs_are_the_same_bits_at_any_row_count(77)
    for D in (8, 64):
        test_attention_writes_the_slots_and_attends_like_torch(D, [33, 0, 17, 5, 39])
        test_a_rows_attention_is_the_same_bits_alone_or_in_a_batch(D)
    for heads in ("d8", "d64"):
        test_the_fused_decode_step_equals_the_op_by_op_one(heads, request, tok, monkeypatch)


def test_batched_steps_attend_in_c_like_the_torch_path(llama64, tok):
    """Rows of different lengths decoded together over the int8 cache: the C attention
    (`_decode_rows`) against the torch path of the same int8 runner."""
    prompts = [tok.encode(t) for t in ("Once upon a time", "The quick brown fox jumps", "12")]
    runs = []
    for c in (True, False):
        r = FastLlamaRunner(llama64.model, 4, 48, int8=True, kv_int8=True)
        assert r.c_attention  # the kernel builds here
        r.c_attention = c
        with torch.inference_mode():
            for row, ids in enumerate(prompts):
                r.prefill(row, ids)
            pos, toks, out = [len(p) for p in prompts], [5, 6, 7], []
            for _ in range(8):
                logits = r.decode(toks, pos)
                out.append(logits)
                toks, pos = logits.argmax(-1).tolist(), [p + 1 for p in pos]
        runs.append((torch.stack(out), r.kv.clone()))
    (a, ka), (b, kb) = runs
    assert float((a - b).abs().max()) < 0.02 * float(b.abs().max())
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert int((ka.int() - kb.int()).abs().max()) <= 1


@pytest.mark.parametrize("bias", [False, True])
def test_int8_rows_keep_their_own_precision_beside_a_massive_one(bias):
    """One token with activations 1,000x the others' (a prompt's first token) must not set
    the quantization scale of the rest of a prompt or a batched step."""
    from lmloop.engine.fast import Int8Linear

    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 64, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    lin = Int8Linear(w, b)
    x = torch.randn(5, 64, generator=g)
    x[0] *= 1000
    got, want = lin(x), F.linear(x, w, b)
    for r in range(5):
        assert float((got[r] - want[r]).norm() / want[r].norm()) < 0.03, r
    assert torch.allclose(lin(x[1:2]), want[1:2], rtol=0.03, atol=0.03 * float(want[1].abs().max()))


@pytest.mark.parametrize("bias", [False, True])
def test_torch_dynamic_int8_rows_keep_their_own_precision_too(bias):
    """The same for the int8 modules other model families run on (`quantize_linears`), with the
    (batch, tokens, features) inputs their forward passes."""
    from lmloop.engine.fast import quantize_linears

    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g))
    want_w, want_b = lin.weight.detach().clone(), None if not bias else lin.bias.detach().clone()
    q = quantize_linears(torch.nn.Sequential(lin))
    x = torch.randn(2, 3, 64, generator=g)
    x[0, 0] *= 1000
    with torch.inference_mode():
        got = q(x)
    want = F.linear(x, want_w, want_b)
    rel = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max()
    assert float(rel) < 0.03


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping that holds `addr` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise LookupError(f"no mapping holds {addr:#x}")


THP = pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
    reason="a kernel with transparent huge pages (Linux's)",
)


@THP
def test_an_arena_asks_for_huge_pages_and_keeps_its_tensors_intact():
    """The arena's block is advised for transparent huge pages ("hg" in its VmFlags), its
    copies hold the same values in aligned places, and a tensor past its room comes back as it
    was (a wrong size estimate costs speed, never a failure)."""
    from lmloop.engine.memory import HugePageArena, storage_bytes

    arena = HugePageArena(3 << 20)
    assert "hg" in _vm_flags(arena.block.data_ptr())
    a, b = torch.randn(100, 7), torch.arange(1000, dtype=torch.int16)
    ca, cb = arena.take(a), arena.take(b)
    assert torch.equal(ca, a) and torch.equal(cb, b) and ca.dtype == a.dtype
    assert ca.data_ptr() % 64 == 0 and cb.data_ptr() % 64 == 0
    assert ca.untyped_storage().data_ptr() == arena.block.data_ptr()  # in the block, not a copy
    # 2,800 bytes, then the next at 2,816 (aligned): what the block holds, not its 4 MB
    assert storage_bytes(ca.untyped_storage()) == arena.used == 2816 + 2000
    big = torch.zeros(4 << 20, dtype=torch.uint8)
    assert arena.take(big) is big


@THP
def test_int4_weights_and_head_live_in_arenas(llama):
    """The 4-bit runner's packed projections and its int8 head are copied onto memory advised
    for huge pages, with the same numbers as packed alone."""
    runner = FastLlamaRunner(llama.model, 1, 16, int4=True, kv_int8=True)
    lins = [lin for layer in runner.layers for lin in layer]
    for t in [x for lin in lins for x in (lin.codes, lin.scales)] + [runner.lm_head.qweight]:
        assert "hg" in _vm_flags(t.data_ptr())
    alone = kernels.Q4Linear(runner.layers[0][2].weight(), None)
    assert torch.equal(alone.codes, runner.layers[0][2].codes)
    # and the arenas go with the runner (a server that reloads a model must not keep the old
    # weights): once nothing refers to them, no huge-page mapping holds their addresses
    at = [t.data_ptr() for t in (lins[0].codes, runner.lm_head.qweight)]
    del runner, lins, alone, t
    gc.collect()
    for addr in at:
        try:
            assert "hg" not in _vm_flags(addr)
        except LookupError:  # unmapped: gone
            pass


@pytest.mark.parametrize("k", [1, 7, 256, 1000])
def test_topk_answers_what_torch_topk_does(k):
    """The kernel's top-k against torch's on rows with distinct values, negatives and -inf:
    the same values and indices, largest first; on rows full of ties, the same values, and of
    equal values the lower column first; NaNs rank first, as torch ranks them."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(5, 1000, generator=g)
    x[1] = -x[1].abs()
    x[2, ::3] = float("-inf")
    vals, idx = kernels.topk(x, k)
    want_v, want_i = torch.topk(x, k)
    assert torch.equal(vals, want_v) and torch.equal(torch.gather(x, 1, idx), vals)
    finite = vals > float("-inf")  # row 2's -inf are ties, whose order torch leaves open
    assert torch.equal(idx[finite], want_i[finite])
    assert [sorted(r) for r in idx.tolist()] == [sorted(r) for r in want_i.tolist()]
    ties = torch.randint(0, 6, (3, 1000), generator=g).float() / 5  # six values, ~170 each
    vals, idx = kernels.topk(ties, k)
    assert torch.equal(vals, torch.topk(ties, k).values)
    assert torch.equal(torch.gather(ties, 1, idx), vals)
    key = vals * 10_000 - idx  # (value desc, column asc) decreases strictly along a row
    assert bool((key[:, 1:] < key[:, :-1]).all())
    nan = x[:1].clone()
    nan[0, [3, 500, 999]] = float("nan")
    nan[0, 500] = -nan[0, 500]  # a NaN with its sign bit set ranks first all the same
    assert int(nan[0, 500:501].view(torch.int32)) < 0
    vals, idx = kernels.topk(nan, k)
    want_v, want_i = torch.topk(nan, k)
    m = min(k, 3)  # torch ranks the three NaNs first too
    assert bool(want_v[0, :m].isnan().all()) and bool(vals[0, :m].isnan().all())
    assert set(idx[0, :m].tolist()) <= {3, 500, 999}
    assert torch.equal(vals[:, m:], want_v[:, m:]) and torch.equal(idx[:, m:], want_i[:, m:])


@pytest.mark.parametrize("heads", ["d8", "d64"])
def test_a_prompt_prefills_to_the_bits_of_decoding_it_token_by_token(heads, request, tok):
    """Under int4 every prompt token goes through the decode step's C path at its position in
    its own cache row, so prefilling a prompt at once, in chunks, beside another prompt, or
    token by token as decode steps gives the same last logits and the same cache, bit for bit."""
    model = request.getfixturevalue("llama" if heads == "d8" else "llama64").model
    ids = tok.encode("Once upon a time there was a fox")
    other = tok.encode("12 apples and a pear")
    n = len(ids)

    def runner():
        return FastLlamaRunner(model, 3, 48, int4=True, kv_int8=True)

    with torch.inference_mode():
        whole = runner()
        a = whole.prefill(1, ids)  # row 1: rows are each prompt's own
        steps = runner()  # decode steps run rows 0..k-1: row 0 here
        steps.prefill(0, ids[:1])
        for i in range(1, n):
            b = steps.decode([ids[i]], [i])[0]
        chunks = runner()
        chunks.prefill(2, ids[:3])
        c = chunks.prefill(2, ids[3:], start=3)
        both = runner()
        d = both.prefill_batch([0, 1], [other, ids], [0, 0])[1]
    for got in (b, c, d):
        assert torch.equal(got, a)
    for r, (run, row) in enumerate([(steps, 0), (chunks, 2), (both, 1)]):
        assert torch.equal(run.kv[:, :, row, :, :n], whole.kv[:, :, 1, :, :n]), r
        assert torch.equal(run.kv_scale[:, :, row, :, :n], whole.kv_scale[:, :, 1, :, :n]), r
    # the other prompt of the batch is its own: as prefilled alone
    alone = runner()
    with torch.inference_mode():
        e = alone.prefill(0, other)
        f = both.decode([5], [len(other)])[0]  # and row 0 decodes on from it as alone
        g = alone.decode([5], [len(other)])[0]
    assert torch.equal(both.kv[:, :, 0, :, : len(other)], alone.kv[:, :, 0, :, : len(other)])
    assert torch.equal(f, g) and e.shape == f.shape


@pytest.mark.parametrize("heads", ["d8", "d64"])
def test_prompts_that_join_a_running_step_get_the_numbers_they_get_alone(heads, request, tok):
    """On an int4 engine a prompt admitted while others decode is prefilled inside their decode
    step (one forward, `decode_with_prompts`). Every request, the running and the joining,
    gets the tokens and the logprobs (chosen and top 3) it gets alone, exactly: sampled with
    its own seed, rows leaving and moving, prompts of unequal lengths."""
    model = request.getfixturevalue("llama" if heads == "d8" else "llama64").model
    prompts = [tok.encode(t) for t in ("Once upon a time", "12 apples", "The lazy dog, again",
                                       "Tiny models", "A fox")]  # fmt: skip
    lengths = [14, 4, 11, 3, 9]

    def params(i, n):
        return SamplingParams(max_tokens=n, temperature=1.0, seed=i, logprobs=3, ignore_eos=True)

    with Engine(model, tok, precision="int4", max_batch=3, prefix_cache_mb=0) as engine:
        assert engine.mix
        alone = [engine.complete(p, params(i, n)) for i, (p, n) in enumerate(zip(prompts, lengths))]
        assert engine.mixed_steps == 0  # alone: nothing runs beside a new prompt
        handles = []
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            handles.append(engine.submit(p, params(i, n)))
            if i == 0:  # the first runs a few steps before the others arrive
                steps = engine.steps
                while engine.steps < steps + 2:
                    time.sleep(0.001)
        together = [h.result() for h in handles]
        assert engine.mixed_steps >= 1  # prompts joined a running step (how many: timing)
    for a, b, n in zip(alone, together, lengths):
        assert a.token_ids == b.token_ids and len(a.token_ids) == n
        assert [(x.logprob, x.top) for x in a.logprobs] == [(x.logprob, x.top) for x in b.logprobs]


def test_a_failed_joint_step_falls_back_to_prefilling_apart(llama, tok, monkeypatch):
    """When the decode step that carries new prompts raises, the prompts prefill apart and the
    rows step as usual: every request still gets the tokens it gets alone."""
    prompts = [tok.encode(t) for t in ("Once upon a time", "12 apples", "A fox")]
    lengths = [40, 5, 7]  # the first still runs when the others arrive
    p = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    with Engine(llama.model, tok, precision="int4", max_batch=3, prefix_cache_mb=0) as engine:
        alone = [engine.complete(x, q) for x, q in zip(prompts, p)]
        failures = []

        def broken(*a, **kw):
            failures.append(1)
            raise RuntimeError("joint step failed")

        monkeypatch.setattr(engine.runner, "decode_with_prompts", broken)
        first = engine.submit(prompts[0], p[0])
        steps = engine.steps
        while engine.steps < steps + 2:
            time.sleep(0.001)
        rest = [engine.submit(x, q) for x, q in zip(prompts[1:], p[1:])]
        together = [h.result() for h in [first, *rest]]
    assert failures and engine.mixed_steps == 0
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
