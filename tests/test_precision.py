"""`--precision auto|fp32|int8|int4`: what auto picks and why, the kernel's build and
self-check, the aliases, and `lmloop serve --check`."""

from __future__ import annotations

import dataclasses
import struct

import pytest
import torch
from modelkit import hf_gpt2, hf_llama, save_hf, tiny_tokenizer

from lmloop.cli import main
from lmloop.config import parse_args
from lmloop.engine import Engine, check, fast, kernels, precision
from lmloop.engine.config import GenerateConfig
from lmloop.engine.core import engine_for
from lmloop.engine.spec import EngineSpec
from lmloop.errors import UserError
from lmloop.loop.config import LoopConfig
from lmloop.models.io import gguf_quant, load_model
from lmloop.server.settings import ServeConfig
from lmloop.stages import serve


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save_hf(hf_llama(tok.vocab_size, tied=False), tok, d)
    return d


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(str(llama_dir))


@pytest.fixture(scope="module")
def gpt2(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    save_hf(hf_gpt2(tok.vocab_size), tok, d)
    return load_model(str(d))


@pytest.fixture
def fresh_kernel():
    """Each test builds (or fails to build) the kernel afresh, and leaves no state behind."""
    kernels.library.cache_clear()
    yield
    kernels.library.cache_clear()


@pytest.fixture
def no_compiler(monkeypatch, tmp_path, fresh_kernel):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))


@pytest.fixture
def broken_compiler(monkeypatch, tmp_path, fresh_kernel):
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'broken-cc 1.0'\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))


# ---- the spec and its aliases ---------------------------------------------------------------
def test_int8_and_int4_flags_are_aliases_on_the_command_line_and_in_yaml(tmp_path):
    assert parse_args(GenerateConfig, []).engine.precision == "auto"
    assert parse_args(ServeConfig, ["--model", "m", "--int4"]).engine.precision == "int4"
    assert parse_args(ServeConfig, ["--model", "m", "--int8"]).engine.precision == "int8"
    assert parse_args(ServeConfig, ["--model", "m", "int4=false"]).engine.precision == "auto"
    assert parse_args(ServeConfig, ["--model", "m", "--precision", "fp32"]).engine.precision == (
        "fp32"
    )
    yaml = tmp_path / "serve.yaml"
    yaml.write_text("model: m\nint8: true\nthreads: 2\n")
    cfg = parse_args(ServeConfig, [str(yaml)])
    assert (cfg.engine.precision, cfg.engine.threads) == ("int8", 2)
    loop = tmp_path / "loop.yaml"
    loop.write_text("db: f.db\nbase_data: d\nengine:\n  int4: true\n  max_batch: 4\n")
    cfg = parse_args(LoopConfig, [str(loop)])
    assert (cfg.engine.precision, cfg.engine.max_batch) == ("int4", 4)
    assert (
        parse_args(LoopConfig, ["db=f.db", "base_data=d", "engine.int8=true"]).engine.precision
        == "int8"
    )
    assert parse_args(ServeConfig, ["--model", "m", "--int4", "--precision", "int4"])
    with pytest.raises(UserError, match="--int8 means --precision int8, but --precision is int4"):
        parse_args(ServeConfig, ["--model", "m", "--int8", "--precision", "int4"])
    with pytest.raises(UserError, match="--int4 means --precision int4"):
        parse_args(ServeConfig, ["--model", "m", "--int8", "--int4"])
    with pytest.raises(UserError, match="expected one of auto, fp32, int8, int4"):
        parse_args(ServeConfig, ["--model", "m", "--precision", "int3"])


def test_engine_kwargs_carry_the_precision():
    assert EngineSpec(precision="int4").engine_kwargs()["precision"] == "int4"
    assert EngineSpec().engine_kwargs()["precision"] == "auto"


# ---- what the source holds --------------------------------------------------------------------
def _gguf_header(path, file_type: int | None) -> None:
    """A GGUF v3 header with a string, arrays of strings and of int32 (a vocabulary and its
    token types), a float and the file type."""

    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    kvs = [s("general.architecture") + struct.pack("<I", 8) + s("llama")]
    vocab = [f"tok{i}" for i in range(50)]
    kvs.append(
        s("tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, len(vocab))
        + b"".join(s(v) for v in vocab)
    )
    kvs.append(s("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 5, 50) + bytes(4 * 50))
    kvs.append(s("llama.rope.freq_base") + struct.pack("<If", 6, 10000.0))
    if file_type is not None:
        kvs.append(s("general.file_type") + struct.pack("<II", 4, file_type))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))


def test_the_gguf_file_type_is_read_from_the_header(tmp_path):
    for value, name in ((3, "Q4_1"), (2, "Q4_0"), (7, "Q8_0"), (1, "F16"), (15, "Q4_K_M")):
        _gguf_header(tmp_path / "m.gguf", value)
        assert gguf_quant(tmp_path / "m.gguf") == name
    _gguf_header(tmp_path / "m.gguf", None)
    assert gguf_quant(tmp_path / "m.gguf") is None
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    assert gguf_quant(tmp_path / "bad.gguf") is None
    assert [precision.source_bits(q) for q in ("Q4_1", "Q4_K_M", "IQ4_XS", "Q8_0", "Q6_K")] == [
        4, 4, 4, 8, 6,
    ]  # fmt: skip
    assert precision.source_bits("F16") is None and precision.source_bits(None) is None


def _no_measuring(monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "measure", lambda *a, **k: calls.append(a[2]) or (9.0, 0.0))
    return calls


def test_auto_serves_a_4bit_source_as_int4_without_measuring(llama, gpt2, monkeypatch):
    calls = _no_measuring(monkeypatch)
    e = Engine(llama.model, llama.tokenizer, precision="auto", source="Q4_1")
    assert (e.precision, e.kv_int8) == ("int4", True)
    assert e.runner.layers4 is not None
    assert e.choice.line() == "precision int4: the source holds 4-bit weights (Q4_1)"
    assert Engine(llama.model, llama.tokenizer, precision="auto", source="Q8_0").precision == (
        "int8"
    )
    # a family the 4-bit kernel does not cover: int8, saying why
    g = Engine(gpt2.model, gpt2.tokenizer, precision="auto", source="Q4_1")
    assert g.precision == "int8" and "not GPT" in g.choice.reason
    assert calls == []
    # the loaded model's file type reaches the engine: the server and the gate both build
    # their engines this way, so they resolve auto alike
    as_gguf = dataclasses.replace(llama, quant="Q4_1")
    assert engine_for(as_gguf, EngineSpec()).precision == "int4"


@pytest.mark.parametrize(
    ("figures", "want"),
    [
        ({"int4": (0.01, 0.99), "int8": (0.0, 1.0)}, "int4"),
        ({"int4": (0.2, 0.99), "int8": (0.01, 0.95)}, "int8"),
        ({"int4": (0.01, 0.80), "int8": (0.01, 0.95)}, "int8"),
        ({"int4": (0.2, 0.5), "int8": (0.06, 0.95)}, "fp32"),
    ],
)
def test_auto_on_a_float_checkpoint_takes_the_fastest_within_the_bound(
    llama, monkeypatch, figures, want
):
    tried = []

    def measure(model, tok, prec, ids, ref, **kw):
        tried.append(prec)
        return figures[prec]

    monkeypatch.setattr(precision, "measure", measure)
    e = Engine(llama.model, llama.tokenizer, precision="auto")
    assert e.precision == want
    assert tried == {"int4": ["int4"], "int8": ["int4", "int8"], "fp32": ["int4", "int8"]}[want]


def test_the_probes_figures_are_measured_once_per_weights(llama_dir, monkeypatch, tmp_path):
    """A second load of the same weights reads the probe's figures back (the gate, the server's
    start and its hot reload each measured them, ~4 s a precision for a 135M model); other
    weights, or an unreadable entry, are measured afresh."""
    monkeypatch.setenv("LMLOOP_CACHE", str(tmp_path))
    measured = []
    real = precision._measure

    def counting(model, prec, *a):
        measured.append(prec)
        return real(model, prec, *a)

    monkeypatch.setattr(precision, "_measure", counting)
    lm = load_model(str(llama_dir))
    first = precision.choose("auto", lm.model, lm.tokenizer)
    assert measured and set(measured) <= {"int4", "int8"}
    n = len(measured)
    again = load_model(str(llama_dir))  # another load of the same checkpoint
    assert precision.choose("auto", again.model, again.tokenizer) == first
    assert len(measured) == n  # read back, figures and reason alike
    with torch.no_grad():  # one weight moved: a different model, measured again
        again.model.model.layers[0].mlp.down_proj.weight[0, 0] += 0.5
    precision.choose("auto", again.model, again.tokenizer)
    m = len(measured)
    assert m > n
    entries = sorted((tmp_path / "precision-probe").glob("*.json"))
    assert len(entries) == m  # one entry a measurement
    for e in entries:
        e.write_text("{not json")
    assert precision.choose("auto", lm.model, lm.tokenizer) == first  # measured again
    assert len(measured) == m + n


def test_the_probe_measures_each_precision_against_fp32(llama):
    ref, ids = precision.reference_for(llama.model, list(range(3, 40)))
    kl32, top32 = precision.measure(llama.model, llama.tokenizer, "fp32", ids, ref)
    assert kl32 < 1e-6 and top32 == 1.0  # the fp32 runner is the model itself
    kl4, top4 = precision.measure(llama.model, llama.tokenizer, "int4", ids, ref)
    kl8, top8 = precision.measure(llama.model, llama.tokenizer, "int8", ids, ref)
    # quantization shows (this tiny model's logits are nearly flat, so its KL is small)
    assert kl4 > 1e-6 and kl8 > 1e-7 and top4 < 1.0
    assert 0.5 < top4 and 0.5 < top8 <= 1.0


# ---- no compiler, a broken one, a kernel that computes wrong numbers -------------------------
def test_without_a_compiler_auto_falls_back_to_int8_and_says_so(llama, no_compiler, caplog):
    e = Engine(llama.model, llama.tokenizer, precision="auto", source="Q4_1")
    assert e.precision == "int8"
    assert "C kernel is unavailable" in e.choice.reason and "no-such-cc" in e.choice.reason
    assert not e.runner.c_attention  # torch attention over the int8 cache
    # an explicit int8 runs too, on torch attention, and says so (a warning, not silence)
    with caplog.at_level("WARNING", logger="lmloop.engine.precision"):
        e = Engine(llama.model, llama.tokenizer, precision="int8")
    assert e.precision == "int8" and not e.runner.c_attention
    assert [r.levelname for r in caplog.records if "torch ops" in r.getMessage()] == ["WARNING"]
    with pytest.raises(UserError, match="C kernel") as err:
        Engine(llama.model, llama.tokenizer, precision="int4")
    assert err.value.hint == "use --precision int8"


def test_explicit_int4_without_a_compiler_exits_2_naming_int8(llama_dir, no_compiler, capsys):
    rc = main(["generate", "--model", str(llama_dir), "--prompt", "hi", "--precision", "int4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "--precision int8" in err[0]


def test_explicit_int4_on_a_family_the_kernel_does_not_cover_names_int8(gpt2, fresh_kernel):
    with pytest.raises(UserError, match="not GPT") as err:
        Engine(gpt2.model, gpt2.tokenizer, precision="int4")
    assert err.value.hint == "use --precision int8"


def test_a_failed_build_is_refused_when_asked_for_and_said_under_auto(llama, broken_compiler):
    with pytest.raises(UserError, match="failed") as err:
        Engine(llama.model, llama.tokenizer, precision="int8")
    assert "broken-cc" in err.value.message
    with pytest.raises(UserError, match="failed"):
        Engine(llama.model, llama.tokenizer, precision="int4")
    e = Engine(llama.model, llama.tokenizer, precision="auto", source="Q4_1")
    assert e.precision == "int8" and "failed" in e.choice.reason
    # an int8 cache is not asked for with --kv-cache fp32: nothing uses the kernel then
    assert Engine(llama.model, llama.tokenizer, precision="int8", kv_int8=False).precision == (
        "int8"
    )


def test_a_kernel_that_fails_its_self_check_never_serves(llama, monkeypatch, fresh_kernel):
    real = kernels._kernel_matmul
    monkeypatch.setattr(kernels, "_kernel_matmul", lambda *a: real(*a) * 1.01)
    for how in (
        {"precision": "int4"},
        {"precision": "int8"},
        {"precision": "auto", "source": "Q4_1"},
    ):
        with pytest.raises(UserError, match="refusing to serve"):
            Engine(llama.model, llama.tokenizer, **how)
    monkeypatch.setattr(kernels, "_kernel_matmul", real)
    kernels.library.cache_clear()
    assert Engine(llama.model, llama.tokenizer, precision="int4").precision == "int4"


def test_the_self_check_reference_is_the_kernels_quantization(fresh_kernel):
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(24, 96, generator=g), torch.randn(2, 96, generator=g)
    codes, scales = kernels.pack_q4(w)
    got = kernels._kernel_matmul(kernels.library(), codes, scales, x)
    want = kernels.reference_matmul(codes, scales, x)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    # and the check is sharp: the unquantized product is far outside its tolerance
    assert float((x @ w.t() - want).abs().max()) > 1e-2 * float(want.abs().max())


# ---- lmloop serve --check ---------------------------------------------------------------------
def test_serve_check_reports_the_build_and_the_torch_ops(capsys, fresh_kernel):
    assert serve.run(ServeConfig(check=True)) == 0
    items = {i.name: i for i in check.run_checks()}
    assert items["kernel build"].ok and items["kernel instruction set"].ok
    assert items["torch.ops.mkldnn._linear_pointwise"].ok
    assert items["torch.ops.quantized.linear_dynamic"].needed
    assert "kernel build" in capsys.readouterr().out


def test_serve_check_exits_1_when_a_needed_op_is_missing(monkeypatch, capsys):
    real = check.torch_op
    monkeypatch.setattr(check, "torch_op", lambda n: n != "quantized.linear_dynamic" and real(n))
    assert serve.run(ServeConfig(check=True)) == 1
    monkeypatch.setattr(check, "torch_op", lambda n: not n.startswith("mkldnn") and real(n))
    assert serve.run(ServeConfig(check=True)) == 0  # optional: plain F.linear serves fp32


def test_serve_check_without_a_compiler_still_passes(no_compiler):
    items = {i.name: i for i in check.run_checks()}
    assert not items["C compiler"].ok and "kernel build" not in items
    assert check.failed(list(items.values())) == []


def test_serve_check_exits_1_on_a_broken_build(broken_compiler):
    assert serve.run(ServeConfig(check=True)) == 1


def test_a_torch_without_the_packed_linear_ops_serves_fp32_on_plain_ops(llama, monkeypatch):
    """The private oneDNN ops' fallback: the same logits through plain F.linear."""

    def missing(self, lin, hint=16):
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute")

    monkeypatch.setattr(fast.PackedLinear, "__init__", missing)
    e = Engine(llama.model, llama.tokenizer, precision="fp32")
    assert all(type(m.packed) is torch.nn.Linear for m in e.runner.layers[0])
    ids = llama.tokenizer.encode("the quick brown fox")
    with torch.inference_mode():
        got = e.runner.prefill(0, ids)
        want = llama.model(torch.tensor([ids]))[0, -1]
        step = e.runner.decode([5, 6], [len(ids), 0])  # two rows: the packed path's turn
    assert torch.allclose(got, want, atol=1e-4)
    assert step.shape == (2, llama.model.config.vocab_size)


def test_a_torch_without_fbgemms_int8_ops_serves_fp32_and_refuses_int8(llama, monkeypatch):
    monkeypatch.setattr(precision, "dynamic_linear_op", lambda: None)
    monkeypatch.setattr(fast.Int8Linear, "_op", None)
    for asked in ("int8", "int4"):
        with pytest.raises(UserError, match="quantized.linear_dynamic") as err:
            Engine(llama.model, llama.tokenizer, precision=asked)
        assert err.value.hint == "use --precision fp32"
    e = Engine(llama.model, llama.tokenizer, precision="auto", source="Q4_1")
    assert e.precision == "fp32"
    ids = llama.tokenizer.encode("the quick brown fox")
    with torch.inference_mode():
        got = e.runner.prefill(0, ids)
    assert torch.allclose(got, llama.model(torch.tensor([ids]))[0, -1], atol=1e-4)
