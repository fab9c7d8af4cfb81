"""`lmloop train`: the loop, checkpoints, exact resume after SIGKILL, DDP, LoRA, SFT, bad input.

Everything runs on a tiny Llama (hidden 64, 2 layers) over a tiny data dir built here with a BPE
tokenizer trained in-process; no network, no /work/shared. The expensive tests (SIGKILL resume,
2-process DDP) use real subprocesses and few steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmloop.cli import main
from lmloop.log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny-cpu.yaml")
WORDS = (
    "the a cat dog bird sat ran flew on under over mat log tree and then quickly slowly "
    "red blue green small big old young happy sad river hill house garden morning night"
).split()


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmloop.tokenizer import SPECIAL_TOKENS, Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_sentences(400, 0), trainer)
    return Tokenizer.from_backend(backend)


def make_data_dir(path: Path, tok, *, train_docs: int = 300, val_docs: int = 40) -> Path:
    """A prepared data dir in the DATA stage's format, built through lmloop.data.shards."""
    from lmloop.artifacts import make_meta, write_meta
    from lmloop.data import shards

    path.mkdir(parents=True)
    tok.save(path / "tokenizer")
    splits = {}
    for split, n, seed in (("train", train_docs, 1), ("val", val_docs, 2), ("test", 10, 3)):
        docs = _sentences(n, seed)
        w = shards.ShardWriter(path, split, shards.dtype_for_vocab(tok.vocab_size))
        for doc in docs:
            w.write(np.array(tok.encode(doc) + [tok.eos_id]))
        files = w.close()
        splits[split] = {
            "documents": n,
            "bytes": sum(len(d.encode()) for d in docs),
            "tokens": w.tokens,
            "shards": files,
        }
    tinfo = {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    write_meta(path, make_meta(shards.SCHEMA, shards.FORMAT_VERSION, None, splits=splits,
                               removed={}, tokenizer=tinfo))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tok):
    return make_data_dir(tmp_path_factory.mktemp("data") / "d", tok)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


def train(*args: str) -> int:
    return main(["train", TINY, *args])


FAST = ["log_every=1", "eval.every=4", "schedule.warmup_steps=2"]


# ---- the loop, outputs, checkpoints ------------------------------------------------------


def test_train_writes_metrics_checkpoints_meta_and_plot(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    rc = train("--data", str(data_dir), "--out", str(run), "--max-steps", "8",
               "--save-every", "2", "keep_last=2", *FAST)  # fmt: skip
    assert rc == 0
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 9))
    for r in recs:
        assert {"step", "loss", "ppl", "lr", "grad_norm", "ms", "tok_s"} <= set(r)
        assert math.isfinite(r["loss"])
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["val_bpb"] > 0 for r in evals)
    # the model learns: loss drops from ~ln(vocab) at the start
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
    assert abs(recs[0]["loss"] - math.log(300)) < 0.5
    meta = json.loads((run / "meta.json").read_text())
    assert meta["schema"] == "lmloop.run" and meta["latest"] == "step-0000008"
    assert meta["best"] in ("step-0000004", "step-0000008")
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step-0000008" in kept and "step-0000006" in kept and "step-0000002" not in kept
    assert len(kept) <= 3  # last 2 + best
    ck = run / "checkpoints" / "step-0000008"
    assert (ck / "train_state.pt").is_file() and (ck / "model.safetensors").is_file()
    assert (run / "curves.png").stat().st_size > 1000
    out = capsys.readouterr()
    assert "val bpb" in out.out and "step 8/8 | loss" in out.err

    # the run dir is what --model accepts everywhere else
    from lmloop.models.io import load_model

    lm = load_model(run)
    assert lm.model.config.hidden_size == 64 and lm.tokenizer.vocab_size == 300
    # and a new run refuses to overwrite it
    assert train("--data", str(data_dir), "--out", str(run), "--max-steps", "2") == 2


def test_schedules_and_param_groups():
    from types import SimpleNamespace as NS

    import torch

    from lmloop.models import build_model
    from lmloop.models.llama import LlamaConfig
    from lmloop.training.optim import lr_factor, param_groups

    cos = NS(kind="cosine", warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    assert lr_factor(0, cos, 100) == pytest.approx(0.1)
    assert lr_factor(9, cos, 100) == pytest.approx(1.0)
    assert lr_factor(99, cos, 100) == pytest.approx(0.1, abs=1e-3)
    lin = NS(kind="linear", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_factor(50, lin, 100) == pytest.approx(0.5)
    wsd = NS(kind="wsd", warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_factor(50, wsd, 100) == 1.0 and lr_factor(79, wsd, 100) == 1.0
    assert lr_factor(99, wsd, 100) == pytest.approx(0.0)
    const = NS(kind="constant", warmup_steps=0, min_lr_ratio=0.1, decay_fraction=0.2)
    assert lr_factor(99, const, 100) == 1.0

    torch.manual_seed(0)
    m = build_model(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=16,
                                attention_bias=True))  # fmt: skip
    decay, hidden, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(p.ndim == 2 and "embed" not in names[id(p)] for p in decay)
    assert any("embed_tokens" in names[id(p)] for p in no_decay)
    assert any(names[id(p)].endswith("norm.weight") for p in no_decay)
    assert any(names[id(p)].endswith("q_proj.bias") for p in no_decay)
    assert len(decay) == 2 * 7 and hidden == decay  # 7 matrices per block, lm_head tied


def test_param_count_and_flops_match_the_built_models():
    from lmloop.models import build_model, num_params
    from lmloop.models.gpt import GPTConfig
    from lmloop.models.llama import LlamaConfig

    configs = [
        LlamaConfig(vocab_size=70, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                    tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
        LlamaConfig(vocab_size=70, hidden_size=16, intermediate_size=40, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8),
        GPTConfig(vocab_size=70, n_embd=16, n_layer=2, n_head=2, n_positions=8),
        GPTConfig(vocab_size=70, n_embd=16, n_layer=1, n_head=2, n_positions=8,
                  positions="learned", tie_word_embeddings=False),
    ]  # fmt: skip
    for c in configs:
        m = build_model(c)
        counts = (c.num_params(), c.num_params(non_embedding=True))
        assert counts == (num_params(m), num_params(m, non_embedding=True)), c
    c = configs[1]  # 6 x (body + lm_head) + 12 x layers x d_attn x seq
    body = c.num_params(non_embedding=True)
    assert c.flops_per_token(8) == 6 * (body + 70 * 16) + 12 * 1 * 16 * 8


def test_grad_accumulation_normalizes_by_true_token_count(tmp_path, tok):
    """SFT micro-batches with different completion lengths: 2x4 accumulation == one batch of 8."""
    recs = tmp_path / "sft.jsonl"
    rng = random.Random(0)
    with recs.open("w") as f:
        for i in range(8):
            reply = " ".join(rng.choice(WORDS) for _ in range(1 + 6 * (i % 3)))
            f.write(json.dumps({"prompt": f"say {i}", "completion": reply}) + "\n")
    model_dir = _tiny_model_dir(tmp_path / "m", tok)
    common = ["--data", str(recs), "--init-from", str(model_dir), "--max-steps", "3",
              "eval.val_fraction=0", "log_every=1", "optim.lr=1e-2", "batch.global_batch=8"]  # fmt: skip
    assert train(*common, "--out", str(tmp_path / "a"), "batch.micro_batch=8") == 0
    assert train(*common, "--out", str(tmp_path / "b"), "batch.micro_batch=2") == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(a) == [1, 2, 3]
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6)


def _tiny_model_dir(path: Path, tok, seed: int = 0) -> Path:
    import torch

    from lmloop.artifacts import atomic_dir
    from lmloop.models import build_model
    from lmloop.models.io import save_model
    from lmloop.models.llama import LlamaConfig

    torch.manual_seed(seed)
    model = build_model(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                    intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2,
                                    max_position_embeddings=128,
                                    eos_token_id=tok.eos_id))  # fmt: skip
    with atomic_dir(path) as tmp:
        save_model(tmp, model, tok)
    return path


# ---- exact resume after SIGKILL ----------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["LMLOOP_NO_PROGRESS"] = "1"
    return env


# A crash test freezes its trainer at a step boundary (after that step's metrics line and any
# checkpoint) through run()'s on_step hook, then SIGKILLs it: the kill lands between the same two
# checkpoints however loaded the machine is, and the training loop holds no test code.
_FREEZE_AT = """
import os, signal, sys
from lmloop.config import parse_args
from lmloop.log import setup_logging
from lmloop.stages import train
at = int(sys.argv[1])
setup_logging(False)
def freeze(step):
    if step == at:
        os.kill(os.getpid(), signal.SIGSTOP)
train.run(parse_args(train.TrainConfig, sys.argv[2:]), on_step=freeze)
"""


def train_frozen_at(step: int, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`lmloop train ARGS` in a subprocess that stops itself (SIGSTOP) once `step` is done."""
    cmd = [sys.executable, "-c", _FREEZE_AT, str(step), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read().decode()[-2000:]}")
        if any(r["step"] >= step for r in read_metrics(run / "metrics.jsonl")):
            return
        time.sleep(0.05)
    raise AssertionError("trainer did not reach the step in time")


def test_sigkill_then_resume_is_bit_identical(tmp_path, data_dir):
    args = ["--data", str(data_dir), "--max-steps", "10", "--save-every", "4", "log_every=1",
            "eval.every=5", "schedule.warmup_steps=2"]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = train_frozen_at(6, [TINY, *args, "--out", str(cut)], _env())
    try:
        assert train(*args, "--out", str(full)) == 0  # meanwhile, the uninterrupted run
        _wait_for_step(proc, cut, 6)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert max(losses(cut)) == 6  # steps 5 and 6 ran after the step-4 checkpoint, then died
    assert json.loads((cut / "meta.json").read_text())["latest"] == "step-0000004"

    assert train(*args, "--out", str(cut), "--resume") == 0
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 11))  # the killed run's extra lines are gone
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"], ra["step"]  # bit for bit
        assert ra.get("val_loss") == rb.get("val_loss")
        assert ra["grad_norm"] == rb["grad_norm"]
    wa = (full / "checkpoints" / "step-0000010" / "model.safetensors").read_bytes()
    wb = (cut / "checkpoints" / "step-0000010" / "model.safetensors").read_bytes()
    assert wa == wb


# ---- DDP: 2 processes (gloo) == 1 process with the same global batch ------------------------


def test_ddp_two_processes_match_one_and_resume_on_one(tmp_path, data_dir):
    args = ["--data", str(data_dir), "log_every=1", "eval.every=2", "schedule.kind=constant",
            "schedule.warmup_steps=0", "batch.micro_batch=2", "batch.global_batch=8"]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lmloop.cli", "train", TINY, *args, "--max-steps", "3", "--out", str(two)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert train(*args, "--max-steps", "5", "--out", str(one)) == 0
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()[-3000:]
    meta = json.loads((two / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["latest"] == "step-0000003"
    assert len(list((two / "checkpoints").iterdir())) == 1  # written once, by rank 0
    a, b = losses(one), losses(two)
    assert list(b) == [1, 2, 3]
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=1e-5)
    vb = {r["step"]: r["val_loss"] for r in read_metrics(two / "metrics.jsonl") if "val_loss" in r}
    va = {r["step"]: r["val_loss"] for r in read_metrics(one / "metrics.jsonl") if "val_loss" in r}
    assert vb[2] == pytest.approx(va[2], rel=1e-5)
    # the 2-process run resumes in 1 process (a different world size) and continues the same way
    assert train(*args, "--max-steps", "5", "--out", str(two), "--resume") == 0
    b = losses(two)
    assert list(b) == [1, 2, 3, 4, 5]
    for s in (4, 5):
        assert b[s] == pytest.approx(a[s], rel=1e-4)


# ---- FSDP: 2 sharded processes == 1 process; checkpoints cross world sizes both ways ---------


def _torchrun(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lmloop.cli", "train", TINY, *args]  # fmt: skip
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen) -> None:
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()[-3000:]


def test_fsdp_two_processes_match_one_and_resume_across_world_sizes(tmp_path, data_dir):
    # eval.batches=3: 3 validation micro-batches over 2 ranks, the uneven case FSDP must pad;
    # fp32: the two differ only in the order sharded reductions sum, which bf16 autocast's
    # rounding (precision=auto on a CPU with native bf16) would swamp
    args = ["--data", str(data_dir), "log_every=1", "eval.every=2", "eval.batches=3",
            "schedule.kind=constant", "schedule.warmup_steps=0", "batch.micro_batch=2",
            "batch.global_batch=8", "precision=fp32"]  # fmt: skip
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    proc = _torchrun(*args, "--parallel", "fsdp", "--max-steps", "3", "--out", str(fsdp))
    try:
        assert train(*args, "--max-steps", "5", "--out", str(one)) == 0  # meanwhile: reference
    finally:
        _finish(proc)
    meta = json.loads((fsdp / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["latest"] == "step-0000003"
    assert meta["config"]["parallel"] == "fsdp"
    assert len(list((fsdp / "checkpoints").iterdir())) == 1  # written once, by rank 0
    a, b = losses(one), losses(fsdp)
    assert list(b) == [1, 2, 3]
    for s in b:  # sharded reductions sum in another order: close, not bit-identical
        assert b[s] == pytest.approx(a[s], rel=1e-5)
    val = {r["step"]: r["val_loss"] for r in read_metrics(one / "metrics.jsonl") if "val_loss" in r}
    vb = {r["step"]: r["val_loss"] for r in read_metrics(fsdp / "metrics.jsonl") if "val_loss" in r}
    assert vb[2] == pytest.approx(val[2], rel=1e-5)

    # the checkpoint is the ordinary unsharded format: full weights, index-keyed optimizer state
    import torch
    from safetensors.torch import load_file

    from lmloop.models.io import load_model

    ck = fsdp / "checkpoints" / "step-0000003"
    w = load_file(str(ck / "model.safetensors"))
    assert w["model.embed_tokens.weight"].shape == (300, 64) and "lm_head.weight" not in w
    opt = torch.load(ck / "train_state.pt", weights_only=False)["optimizers"][0]
    ref = torch.load(one / "checkpoints/step-0000005/train_state.pt", weights_only=False)
    ref = ref["optimizers"][0]
    # `fused` is the process's kernel choice (FSDP's sharded DTensors keep the default AdamW)
    groups = [
        [{k: v for k, v in g.items() if k != "fused"} for g in o["param_groups"]]
        for o in (opt, ref)
    ]
    assert groups[0] == groups[1] and set(opt["state"]) == set(ref["state"])
    for i, st in ref["state"].items():
        assert {k: (type(v), v.shape) for k, v in opt["state"][i].items()} == {
            k: (type(v), v.shape) for k, v in st.items()
        }
    assert load_model(fsdp).model.config.hidden_size == 64  # --model RUN_DIR reads it

    # FSDP (2) -> one process for step 4 -> FSDP (2) again for step 5: the same losses
    assert train(*args, "--max-steps", "4", "--out", str(fsdp), "--resume") == 0
    _finish(_torchrun(*args, "parallel=fsdp", "--max-steps", "5", "--out", str(fsdp), "--resume"))
    b = losses(fsdp)
    assert list(b) == [1, 2, 3, 4, 5]
    for s in (4, 5):
        assert b[s] == pytest.approx(a[s], rel=1e-4)
    vb = {r["step"]: r["val_loss"] for r in read_metrics(fsdp / "metrics.jsonl") if "val_loss" in r}
    assert vb[4] == pytest.approx(val[4], rel=1e-4)


def test_fsdp_refusals_and_single_process(tmp_path, data_dir, tok, capsys):
    d = ["--data", str(data_dir), "--max-steps", "1"]
    assert train(*d, "--out", str(tmp_path / "a"), "parallel=zero") == 2
    assert "parallel: got 'zero', expected one of ddp, fsdp" in capsys.readouterr().err
    assert train(*d, "--out", str(tmp_path / "b"), "parallel=fsdp", "optim.name=muon") == 2
    assert "muon is not supported with parallel=fsdp" in _err(capsys)
    base = _tiny_model_dir(tmp_path / "base", tok)
    assert train(*d, "--out", str(tmp_path / "c"), "parallel=fsdp", "--init-from", str(base),
                 "lora.r=4") == 2  # fmt: skip
    assert "LoRA (lora.r=4) is not supported with parallel=fsdp" in _err(capsys)
    assert not any((tmp_path / x).exists() for x in "abc")
    # in one process fsdp changes nothing: the same run as ddp, bit for bit
    assert train(*d, "--out", str(tmp_path / "e"), "parallel=fsdp") == 0
    assert train(*d, "--out", str(tmp_path / "f")) == 0
    assert losses(tmp_path / "e") == losses(tmp_path / "f")


def test_memory_estimate_divides_state_over_fsdp_shards():
    from lmloop.models.llama import LlamaConfig
    from lmloop.stages.train import memory_estimate

    c = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    one = memory_estimate(c, 1000, 2, 64)
    two = memory_estimate(c, 1000, 2, 64, shards=2)
    assert two["weights"] == one["weights"] // 2 and two["optimizer"] == 4000
    assert two["activations"] == one["activations"]


# ---- LoRA -------------------------------------------------------------------------------


def test_lora_trains_adapters_merges_and_resumes(tmp_path, data_dir, tok):
    from safetensors.torch import load_file

    base = _tiny_model_dir(tmp_path / "base", tok)
    args = ["--data", str(data_dir), "--init-from", str(base), "lora.r=4", "lora.alpha=8",
            "lora.targets=q_proj,v_proj", "optim.lr=2e-2", "log_every=1", "eval.every=2",
            "schedule.kind=constant", "schedule.warmup_steps=0", "batch.seq_len=32"]  # fmt: skip
    assert train(*args, "--max-steps", "4", "--out", str(tmp_path / "full")) == 0
    w0 = load_file(str(base / "model.safetensors"))
    w1 = load_file(str(tmp_path / "full/checkpoints/step-0000004/model.safetensors"))
    assert set(w0) == set(w1)  # merged: a plain model, no lora keys
    for k in w0:
        changed = not np.array_equal(w0[k].numpy(), w1[k].numpy())
        assert changed == ("q_proj" in k or "v_proj" in k), k
    # the merged checkpoint loads as an ordinary model
    from lmloop.models.io import load_model

    assert load_model(tmp_path / "full").model.config.hidden_size == 32
    # a LoRA run stopped at step 2 and resumed reproduces the uninterrupted one exactly
    part = tmp_path / "part"
    assert train(*args, "--max-steps", "2", "--out", str(part)) == 0
    assert train(*args, "--max-steps", "4", "--out", str(part), "--resume") == 0
    assert losses(part) == losses(tmp_path / "full")


def test_lora_on_the_last_blocks_only(tmp_path, data_dir, tok):
    from safetensors.torch import load_file

    base = _tiny_model_dir(tmp_path / "base", tok)
    w0 = load_file(str(base / "model.safetensors"))
    last = max(int(k.split(".")[2]) for k in w0 if k.startswith("model.layers."))
    assert last >= 1
    assert train("--data", str(data_dir), "--init-from", str(base), "lora.r=4",
                 "lora.targets=q_proj,v_proj", "lora.last_layers=1", "optim.lr=2e-2",
                 "batch.seq_len=32", "--max-steps", "2", "--out", str(tmp_path / "run")) == 0  # fmt: skip
    w1 = load_file(str(tmp_path / "run/checkpoints/step-0000002/model.safetensors"))
    for k in w0:
        changed = not np.array_equal(w0[k].numpy(), w1[k].numpy())
        want = f"layers.{last}." in k and ("q_proj" in k or "v_proj" in k)
        assert changed == want, k


# ---- SFT --------------------------------------------------------------------------------


def test_sft_loss_only_on_completion_tokens(tok):
    from lmloop.training.batches import IGNORE, encode_chat

    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat on the mat"},
        {"role": "user", "content": "and the dog"},
        {"role": "assistant", "content": "ran under the tree"},
    ]
    ids, labels = encode_chat(tok, msgs)
    assert len(ids) == len(labels)
    assert tok.decode(ids) == tok.apply_chat_template(msgs, add_generation_prompt=False)
    learned = [t for t in labels if t != IGNORE]
    text = tok.decode(learned)
    assert text == "sat on the mat<|im_end|>\nran under the tree<|im_end|>\n"
    masked = tok.decode([i for i, t in zip(ids, labels) if t == IGNORE])
    assert "be brief" in masked and "and the dog" in masked and "sat" not in masked


def test_sft_run_from_jsonl(tmp_path, tok):
    recs = tmp_path / "chats.jsonl"
    rng = random.Random(1)
    with recs.open("w") as f:
        for i in range(12):
            reply = " ".join(rng.choice(WORDS) for _ in range(4))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": reply}]}) + "\n")  # fmt: skip
    model_dir = _tiny_model_dir(tmp_path / "m", tok)
    run = tmp_path / "run"
    rc = train("--data", str(recs), "--init-from", str(model_dir), "--out", str(run),
               "--max-steps", "6", "eval.every=3", "log_every=1", "optim.lr=1e-2")  # fmt: skip
    assert rc == 0
    recs_ = read_metrics(run / "metrics.jsonl")
    assert recs_[-1]["loss"] < recs_[0]["loss"]
    assert "val_loss" in recs_[-1] and recs_[-1]["val_bpb"] > 0
    assert json.loads((run / "meta.json").read_text())["task"] == "sft"


# ---- bad input, divergence, dry run ------------------------------------------------------


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_inputs_each_one_clear_line(tmp_path, data_dir, tok, capsys):
    import shutil

    d = ["--data", str(data_dir)]
    # tokenizer and model vocabularies differ
    assert train(*d, "--out", str(tmp_path / "a"), "model.vocab_size=100") == 2
    assert "tokenizer has 300 tokens but the model's vocabulary is 100" in _err(capsys)
    from tokenizers import Tokenizer as Backend
    from tokenizers import models as tm
    from tokenizers import pre_tokenizers

    from lmloop.tokenizer import SPECIAL_TOKENS, Tokenizer

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list("abcdefgh "))}
    other = Backend(tm.WordLevel(vocab, unk_token="a"))
    other.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    other_model = _tiny_model_dir(tmp_path / "om", Tokenizer.from_backend(other))
    assert train(*d, "--out", str(tmp_path / "b"), "--init-from", str(other_model)) == 2
    assert "tokenized with a different tokenizer (300 tokens) than the model's (13" in _err(capsys)
    # a sequence length beyond the model's
    model_dir = _tiny_model_dir(tmp_path / "m", tok)
    assert train(*d, "--out", str(tmp_path / "c"), "--init-from", str(model_dir),
                 "batch.seq_len=256") == 2  # fmt: skip
    assert "batch.seq_len 256 is beyond the model's context 128" in _err(capsys)
    # missing shards, and a wrong format version
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    (broken / "train-000000.bin").unlink()
    assert train("--data", str(broken), "--out", str(tmp_path / "d")) == 2
    assert "token shard missing" in _err(capsys)
    meta = json.loads((broken / "meta.json").read_text())
    meta["format_version"] = 99
    (broken / "meta.json").write_text(json.dumps(meta))
    assert train("--data", str(broken), "--out", str(tmp_path / "d")) == 2
    assert "format 99, expected 1" in _err(capsys)
    assert train("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")) == 2
    assert "not a prepared data dir" in _err(capsys)
    # resuming an incompatible checkpoint; resuming nothing
    run = tmp_path / "run"
    assert train(*d, "--out", str(run), "--max-steps", "1") == 0
    assert train(*d, "--out", str(run), "--resume", "model.hidden_size=32") == 2
    assert "incompatible" in (e := _err(capsys)) and "hidden_size: checkpoint 64, now 32" in e
    assert train(*d, "--out", str(tmp_path / "none"), "--resume") == 2
    assert "holds no checkpoint" in _err(capsys)
    # a config that cannot fit memory (sized before anything is allocated)
    assert train(*d, "--out", str(tmp_path / "e"), "model.hidden_size=65536",
                 "model.num_layers=64", "model.num_heads=64") == 2  # fmt: skip
    e = _err(capsys)
    assert "this config needs about" in e and "available" in e and "lower batch.micro_batch" in e
    # batch shapes that don't divide; SFT records that are malformed
    assert train(*d, "--out", str(tmp_path / "f"), "batch.global_batch=6") == 2
    assert "not a multiple of micro_batch" in _err(capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert train("--data", str(bad), "--out", str(tmp_path / "g"), "--init-from",
                 str(model_dir)) == 2  # fmt: skip
    assert "bad.jsonl:1: no assistant message" in _err(capsys)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    rc = train("--data", str(data_dir), "--out", str(run), "--max-steps", "20",
               "--save-every", "1", "optim.lr=1e30", "optim.grad_clip=0",
               "schedule.warmup_steps=0", "log_every=1")  # fmt: skip
    assert rc == 2
    err = _err(capsys)
    assert "training diverged" in err and "the last good checkpoint is step-" in err
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"].startswith("diverged at step")
    good = run / "checkpoints" / meta["latest"]
    from safetensors.torch import load_file

    assert all(
        bool(np.isfinite(v.numpy()).all())
        for v in load_file(str(good / "model.safetensors")).values()
    )


def test_dry_run_prints_the_budget(tmp_path, data_dir, capsys):
    assert train("--data", str(data_dir), "--out", str(tmp_path / "x"), "--dry-run") == 0
    out = capsys.readouterr().out
    for word in ("params", "FLOPs/token", "tokens/step   512", "memory", "weights"):
        assert word in out, out
    assert not (tmp_path / "x").exists()


def test_shipped_configs_parse_and_dry_run(tmp_path, data_dir, capsys):
    from lmloop.config import parse_args
    from lmloop.stages.train import TrainConfig

    for path in sorted((ROOT / "configs" / "train").glob("*.yaml")):
        cfg = parse_args(TrainConfig, [str(path), "--data", str(data_dir), "--out", "x"])
        assert cfg.max_steps >= 1, path
    small = str(ROOT / "configs" / "train" / "wikitext-small.yaml")
    assert main(["train", small, "--data", str(data_dir), "--out", "x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tokens/step   4,096" in out and "llama" in out
    assert main(["train", "--help"]) == 0
    assert "--init-from" in capsys.readouterr().out


def test_sinusoidal_gpt_token_embeddings_start_at_the_tables_scale():
    """Untied sinusoidal GPTs start with token embeddings as large as the fixed position table
    (RMS 1/sqrt(2)); at GPT-2's 0.02 the table drowns them and training stalls at the unigram
    loss (the quickstart's corpus: val loss 4.82 after 125 steps, 2.89 at 150 with this init)."""
    import torch

    from lmloop.models import build_model
    from lmloop.models.gpt import GPTConfig

    def rms(tied: bool, positions: str) -> float:
        torch.manual_seed(0)
        cfg = GPTConfig(
            vocab_size=300,
            n_embd=64,
            n_layer=1,
            n_head=2,
            n_positions=32,
            positions=positions,
            tie_word_embeddings=tied,
        )  # type: ignore[arg-type]
        return float(build_model(cfg).model.embed_tokens.weight.pow(2).mean().sqrt())

    table = float(build_model(GPTConfig(vocab_size=300, n_embd=64, n_layer=1, n_head=2,
                                        n_positions=32)).model.pe.pow(2).mean().sqrt())  # fmt: skip
    assert abs(rms(False, "sinusoidal") - table) < 0.05 * table
    assert rms(True, "sinusoidal") < 0.05 and rms(False, "learned") < 0.05  # GPT-2's init
