"""Preference training: DPO/IPO and KTO losses and gradients equal TRL's; runs, resume, bad input.

TRL (a dev dependency, never a runtime one) is the reference: its trainers collate a fixed batch
for a tiny random Llama; the same batch goes through our objective on the same weights loaded by
our own loader, and the losses and every parameter's gradient must agree to 1e-5. The same
records also go through our own tokenization and collation (`*_records_*`): the rows (EOS after
each completion, KTO's mismatched KL pairs) must equal TRL's token for token.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch

from lmloop.cli import main
from lmloop.log import read_metrics
from lmloop.training.batches import IGNORE, pad_rows

sys.path.insert(0, str(Path(__file__).parent))
from modelkit import hf_llama, tiny_tokenizer  # noqa: E402
from test_train import train_frozen_at  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [
    ("the cat sat", " on the mat", " under a big tree"),
    ("once upon", " a time", " the dog"),
    ("tiny models", " learn tiny stories", " jump again and again"),
    ("the quick brown", " fox jumps", " robot who loved to read"),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _hf_tok(tok):
    """The same tokenizer as a `transformers` one, which TRL's trainers take."""
    from transformers import PreTrainedTokenizerFast

    eos = tok.specials["eos_token"]
    return PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=eos, pad_token=eos)


def _ours(hf_model, tok, tmp: Path):
    """The same weights through lmloop's own loader."""
    from lmloop.models.io import load_model

    hf_model.save_pretrained(str(tmp))
    tok.save(tmp)
    return load_model(str(tmp)).model.float()


def _xy(input_ids, completion_mask, attention_mask):
    """TRL's (ids, completion mask) rows as our shifted (inputs, targets with IGNORE)."""
    y = input_ids[:, 1:].clone()
    y[(completion_mask[:, 1:] == 0) | (attention_mask[:, 1:] == 0)] = IGNORE
    return input_ids[:, :-1], y


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[name.removeprefix("model.")] = p.grad.detach().clone()
    return out


def _assert_same_grads(theirs: dict, ours: dict) -> None:
    assert set(theirs) == set(ours), set(theirs) ^ set(ours)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("loss_type,sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_dpo_loss_and_gradients_equal_trl(tmp_path, tok, loss_type, sft_weight):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lmloop.training.config import PreferenceSpec
    from lmloop.training.objectives import DPOObjective, Reference

    policy, ref = (
        hf_llama(tok.vocab_size, tied=False, seed=0),
        hf_llama(tok.vocab_size, tied=False, seed=1),
    )
    ours, ours_ref = _ours(policy, tok, tmp_path / "p"), _ours(ref, tok, tmp_path / "r")
    recs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=4,
                     beta=0.3, use_cpu=True, max_length=64, bf16=False,
                     # RPO: TRL adds the chosen tokens' mean cross-entropy as a second loss
                     loss_type=[loss_type] + ["sft"] * (sft_weight > 0),
                     loss_weights=[1.0] + [sft_weight] * (sft_weight > 0))  # fmt: skip
    trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(ref), args=args,
                         train_dataset=Dataset.from_list(recs), processing_class=_hf_tok(tok))  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()

    spec = PreferenceSpec(beta=0.3, loss_type=loss_type, sft_weight=sft_weight)
    obj = DPOObjective([((0,), (0,))], 0, 0, spec, Reference(ours, ours_ref))
    x, y = _xy(batch["input_ids"], batch["completion_mask"], batch["attention_mask"])
    st = obj.step(
        ours, (x, y, None, None), torch.device("cpu"), torch.autograd.grad_mode.enable_grad
    )
    (st.loss_sum / st.units).backward()

    assert st.units == 4
    torch.testing.assert_close(st.loss_sum / st.units, theirs.detach(), rtol=1e-5, atol=1e-6)
    assert abs(float(theirs) - 0.6931) > 1e-3 or loss_type == "ipo"  # policy != reference
    _assert_same_grads(_grads(trainer.model), _grads(ours))


def test_kto_loss_and_gradients_equal_trl(tmp_path, tok):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from lmloop.training.config import PreferenceSpec
    from lmloop.training.objectives import KTOObjective

    policy, ref = (
        hf_llama(tok.vocab_size, tied=False, seed=0),
        hf_llama(tok.vocab_size, tied=False, seed=1),
    )
    ours, ours_ref = _ours(policy, tok, tmp_path / "p"), _ours(ref, tok, tmp_path / "r")
    recs = [
        {"prompt": p, "completion": c, "label": i % 2 == 0} for i, (p, c, _) in enumerate(PAIRS)
    ]
    recs += [
        {"prompt": p, "completion": r, "label": i % 2 == 1} for i, (p, _, r) in enumerate(PAIRS)
    ]
    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=8,
                     beta=0.2, desirable_weight=1.0, undesirable_weight=1.5, use_cpu=True,
                     max_length=64, bf16=False)  # fmt: skip
    trainer = KTOTrainer(model=policy, ref_model=copy.deepcopy(ref), args=args,
                         train_dataset=Dataset.from_list(recs), processing_class=_hf_tok(tok))  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()

    spec = PreferenceSpec(beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    obj = KTOObjective([((0,), (0,), True)], 0, 0, spec, None, tokenizer=tok, seq_len=64)
    x, y = _xy(batch["input_ids"], batch["completion_mask"], batch["attention_mask"])
    kx, ky = _xy(batch["KL_input_ids"], batch["KL_completion_mask"], batch["KL_attention_mask"])
    from lmloop.training.objectives import sequence_logps

    logps, _ = sequence_logps(ours(x), y)
    with torch.no_grad():
        kl_logps, _ = sequence_logps(ours(kx), ky)
        ref_logps, _ = sequence_logps(ours_ref(x), y)
        kl_ref, _ = sequence_logps(ours_ref(kx), ky)
    st = obj.loss(logps, ref_logps, kl_logps, kl_ref, torch.as_tensor(batch["label"]).bool())
    (st.loss_sum / st.units).backward()

    torch.testing.assert_close(st.loss_sum / st.units, theirs.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(_grads(trainer.model), _grads(ours))


# ---- parity from records: TRL's tokenization and collation against ours -------------------------


def _assert_same_rows(x, y, batch, prefix: str = "") -> None:
    """Our shifted rows (x, y) equal TRL's collated `prefix` rows, token for token, up to where
    each row's padding starts (the widths may differ: ours pads matched and KL rows together)."""
    ids, att = batch[prefix + "input_ids"], batch[prefix + "attention_mask"]
    tx, ty = _xy(ids, batch[prefix + "completion_mask"], att)
    assert x.shape[0] == tx.shape[0]
    for r in range(tx.shape[0]):
        n = int(att[r].sum()) - 1  # real positions after the shift
        assert x[r, :n].tolist() == tx[r, :n].tolist(), (prefix, r)
        assert y[r, :n].tolist() == ty[r, :n].tolist(), (prefix, r)
        assert (y[r, n:] == IGNORE).all(), (prefix, r)  # nothing scored past the row's end


def _ends_with_eos(y, eos: int) -> None:
    for r in range(y.shape[0]):
        scored = y[r][y[r] != IGNORE]
        assert int(scored[-1]) == eos, r  # the model learns to stop after a plain completion


@pytest.mark.parametrize("loss_type,sft_weight", [("sigmoid", 0.5), ("ipo", 0.0)])
def test_dpo_records_batch_loss_and_gradients_equal_trl(tmp_path, tok, loss_type, sft_weight):
    """The same plain-string records through TRL's tokenization + collation and through ours:
    the rows (ids, scored tokens, EOS after each completion), the loss and every gradient agree."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lmloop.training.batches import pad_id_of
    from lmloop.training.config import PreferenceSpec
    from lmloop.training.objectives import DPOObjective, Reference

    policy, ref = (
        hf_llama(tok.vocab_size, tied=False, seed=0),
        hf_llama(tok.vocab_size, tied=False, seed=1),
    )
    ours, ours_ref = _ours(policy, tok, tmp_path / "p"), _ours(ref, tok, tmp_path / "r")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=4,
                     beta=0.3, use_cpu=True, max_length=64, bf16=False,
                     train_sampling_strategy="sequential",
                     loss_type=[loss_type] + ["sft"] * (sft_weight > 0),
                     loss_weights=[1.0] + [sft_weight] * (sft_weight > 0))  # fmt: skip
    recs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(ref), args=args,
                         train_dataset=Dataset.from_list(recs), processing_class=_hf_tok(tok))  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()

    rows = DPOObjective.tokenize(PAIRS, tok, 64)
    spec = PreferenceSpec(beta=0.3, loss_type=loss_type, sft_weight=sft_weight)
    obj = DPOObjective(rows, pad_id_of(tok), 0, spec, Reference(ours, ours_ref))
    x, y, _, _ = obj.collate(rows)  # [chosen..., rejected...] in record order, as TRL's collator
    _assert_same_rows(x, y, batch)
    _ends_with_eos(y, tok.eos_id)
    st = obj.step(
        ours, (x, y, None, None), torch.device("cpu"), torch.autograd.grad_mode.enable_grad
    )
    (st.loss_sum / st.units).backward()

    assert st.units == len(PAIRS)
    torch.testing.assert_close(st.loss_sum / st.units, theirs.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(_grads(trainer.model), _grads(ours))


def test_kto_records_batch_kl_pairs_loss_and_gradients_equal_trl(tmp_path, tok):
    """KTO records through TRL and through ours: the matched rows, the mismatched KL rows (each
    prompt with the previous example's completion, as TRL pairs them), the loss and gradients."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from lmloop.training.batches import pad_id_of
    from lmloop.training.config import PreferenceSpec
    from lmloop.training.objectives import KTOObjective, Reference

    policy, ref = (
        hf_llama(tok.vocab_size, tied=False, seed=0),
        hf_llama(tok.vocab_size, tied=False, seed=1),
    )
    ours, ours_ref = _ours(policy, tok, tmp_path / "p"), _ours(ref, tok, tmp_path / "r")
    recs = [(p, c, i % 2 == 0) for i, (p, c, _) in enumerate(PAIRS)]
    recs += [(p, r, i % 3 == 0) for i, (p, _, r) in enumerate(PAIRS)]
    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=8,
                     beta=0.2, desirable_weight=1.0, undesirable_weight=1.5, use_cpu=True,
                     max_length=64, bf16=False, train_sampling_strategy="sequential")  # fmt: skip
    data = Dataset.from_list([{"prompt": p, "completion": c, "label": lab} for p, c, lab in recs])
    trainer = KTOTrainer(model=policy, ref_model=copy.deepcopy(ref), args=args,
                         train_dataset=data, processing_class=_hf_tok(tok))  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()

    rows = KTOObjective.tokenize(recs, tok, 64)
    spec = PreferenceSpec(beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    obj = KTOObjective(rows, pad_id_of(tok), 0, spec, Reference(ours, ours_ref),
                       tokenizer=tok, seq_len=64)  # fmt: skip
    x, y, labels, _ = obj.collate(rows)  # record order, as TRL's sequential batch
    k = len(recs)
    assert labels.tolist() == batch["label"].tolist()
    _assert_same_rows(x[:k], y[:k], batch)
    _assert_same_rows(x[k:], y[k:], batch, prefix="KL_")
    _ends_with_eos(y, tok.eos_id)
    st = obj.step(
        ours, (x, y, labels, None), torch.device("cpu"), torch.autograd.grad_mode.enable_grad
    )
    (st.loss_sum / st.units).backward()

    assert st.stats["kl"] > 0  # the KL reference point is not clamped away, so it counts
    torch.testing.assert_close(st.loss_sum / st.units, theirs.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(_grads(trainer.model), _grads(ours))


# ---- runs through `lmloop train` ---------------------------------------------------------------

WORDS = "red blue green small big old young happy sad river hill house garden morning".split()


def _model_dir(path: Path, tok) -> Path:
    from lmloop.artifacts import atomic_dir
    from lmloop.models import build_model
    from lmloop.models.io import save_model
    from lmloop.models.llama import LlamaConfig

    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                    intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2,
                                    max_position_embeddings=128, eos_token_id=tok.eos_id))  # fmt: skip
    with atomic_dir(path) as tmp:
        save_model(tmp, model, tok)
    return path


def _pref_records(path: Path, task: str, n: int = 48) -> Path:
    """A learnable preference: answers that end with a question are chosen."""
    rng = random.Random(3)
    with path.open("w") as f:
        for i in range(n):
            q = [{"role": "user", "content": f"tell me about the {rng.choice(WORDS)} {i}"}]
            body = " ".join(rng.choice(WORDS) for _ in range(4))
            good = [{"role": "assistant", "content": f"{body}. what do you think?"}]
            bad = [{"role": "assistant", "content": f"{body}. that is all."}]
            if task == "dpo":
                f.write(json.dumps({"prompt": q, "chosen": good, "rejected": bad}) + "\n")
            else:
                f.write(json.dumps({"prompt": q, "completion": good, "label": True}) + "\n")
                f.write(json.dumps({"prompt": q, "completion": bad, "label": False}) + "\n")
    return path


def train(*args: str) -> int:
    return main(["train", *args])


@pytest.mark.parametrize(
    "task,lora,precision",
    [("dpo", False, "fp32"), ("dpo", True, "fp32"), ("kto", False, "fp32"), ("dpo", True, "bf16"),
     ("kto", False, "bf16")],
)  # fmt: skip
def test_preference_run_learns_and_logs_rewards(tmp_path, tok, task, lora, precision):
    """Under bf16 the reference is scored in the policy's precision: before the first step the
    two give the same log-probs, so the rewards start at 0 (the LoRA reference: adapters off;
    full fine-tuning: a frozen copy)."""
    data = _pref_records(tmp_path / f"{task}.jsonl", task)
    model = _model_dir(tmp_path / "m", tok)
    run = tmp_path / "run"
    extra = ["lora.r=4", "lora.alpha=8", "optim.lr=2e-2"] if lora else ["optim.lr=3e-3"]
    extra.append(f"precision={precision}")
    rc = train("--data", str(data), "--init-from", str(model), "--out", str(run),
               "--max-steps", "12", "eval.every=6", "log_every=1", "batch.micro_batch=4",
               "batch.global_batch=8", "pref.beta=0.5", "schedule.warmup_steps=1", "batch.seq_len=64", *extra)  # fmt: skip
    assert rc == 0
    recs = read_metrics(run / "metrics.jsonl")
    assert json.loads((run / "meta.json").read_text())["task"] == task
    first, last = recs[0], recs[-1]
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    assert last["rewards/margin"] > first["rewards/margin"] + 0.1  # it learned the preference
    if task == "dpo":
        assert last["rewards/accuracy"] > 0.8 and last["val_rewards/accuracy"] > 0.5
    else:
        assert "kl" in last
    assert last["val_loss"] < recs[5]["loss"] + 1.0
    assert (run / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_replayed_documents_keep_their_likelihood_through_a_preference_run(tmp_path, tok, task):
    """{"text"} records in preference data add their cross-entropy beside each pair or example
    (`pref.replay_weight`): the same run with the weight at 0 ends with those documents less
    likely, and the term is what its log reports."""
    from lmloop.models.io import load_model
    from lmloop.training.batches import tokenize_records
    from lmloop.training.objectives import sequence_logps

    rng = random.Random(5)
    docs = [" ".join(rng.choice(WORDS) for _ in range(30)) + "." for _ in range(6)]
    data = _pref_records(tmp_path / f"{task}.jsonl", task)
    with data.open("a") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    model = _model_dir(tmp_path / "m", tok)
    rows = tokenize_records(docs, tok, 64)
    x, y = pad_rows(rows, 0)

    def doc_nll(run: Path) -> float:
        m = load_model(run).model.eval()
        with torch.no_grad():
            logps, n = sequence_logps(m(x), y)
        return float(-logps.sum() / n.sum())

    nll = {}
    for weight in (1.0, 0.0):
        run = tmp_path / f"run-{weight}"
        rc = train("--data", str(data), "--init-from", str(model), "--out", str(run),
                   "--max-steps", "10", "log_every=1", "batch.micro_batch=4", "batch.global_batch=8",
                   "pref.beta=0.5", "optim.lr=3e-3", "schedule.warmup_steps=1", "batch.seq_len=64",
                   f"pref.replay_weight={weight}")  # fmt: skip
        assert rc == 0
        recs = read_metrics(run / "metrics.jsonl")
        assert ("nll/replay" in recs[-1]) == (weight > 0)
        nll[weight] = doc_nll(run)
    before = doc_nll(model)
    assert nll[1.0] < before - 0.2 and nll[1.0] < nll[0.0] - 0.2, (before, nll)


def test_lora_reference_is_the_base_without_a_copy(tok):
    from lmloop.training.lora import apply_lora
    from lmloop.training.objectives import Reference, sequence_logps

    base = _model_dir_model(tok)
    x = torch.randint(4, tok.vocab_size, (2, 10))
    y = x.roll(-1, 1)
    before, _ = sequence_logps(base(x), y)
    model, _ = apply_lora(base, 4, 8.0, 0.0, ["q_proj", "v_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # the adapter now changes the output
    ref = Reference(model, None)
    after, _ = sequence_logps(model(x), y)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(ref.logps(x, y)[0], before.detach())
    assert ref.frozen is None


def test_logits_at_the_targets_only_give_the_full_forwards_losses_and_gradients(tok):
    """SFT rows (prompt and padding without targets) and completion log-probs: the head run only
    where a target is gives the losses and gradients of logits everywhere."""
    import torch.nn.functional as F

    from lmloop.training.objectives import LMObjective, sequence_logps, target_logps

    model = _model_dir_model(tok)
    torch.manual_seed(1)
    rows = []
    for n_prompt, n_answer in ((5, 3), (2, 7), (9, 1)):
        ids = torch.randint(4, tok.vocab_size, (n_prompt + n_answer,)).tolist()
        rows.append((ids, [IGNORE] * n_prompt + ids[n_prompt:][1:] + [tok.eos_id]))
    x, y = pad_rows(rows, 0)
    assert (y == IGNORE).any()

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    full = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                           reduction="sum")  # fmt: skip
    st = LMObjective(None).step(model, (x, y), torch.device("cpu"), contextlib.nullcontext)
    assert st.units == int((y != IGNORE).sum())
    torch.testing.assert_close(st.loss_sum, full)
    for a, b in zip(grads(st.loss_sum), grads(full), strict=True):
        torch.testing.assert_close(a, b)
    want, n_want = sequence_logps(model(x), y)
    got, n_got = target_logps(model, x, y)
    assert n_got.tolist() == n_want.tolist() == [3, 7, 1]
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got @ torch.tensor([1.0, -2.0, 3.0])),
                    grads(want @ torch.tensor([1.0, -2.0, 3.0])), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)


def test_a_bf16_lora_run_saves_full_precision_weights(tmp_path, tok):
    """One step at a negligible learning rate leaves the merged weights the starting model's, to
    the last fp32 bit's neighbourhood: a merge into the bf16 cast would round every one."""
    from lmloop.models.io import load_model

    data = _pref_records(tmp_path / "dpo.jsonl", "dpo", n=8)
    model = _model_dir(tmp_path / "m", tok)
    run = tmp_path / "run"
    rc = train("--data", str(data), "--init-from", str(model), "--out", str(run),
               "--max-steps", "1", "batch.micro_batch=4", "batch.global_batch=4",
               "batch.seq_len=64", "lora.r=4", "lora.alpha=8", "optim.lr=1e-20",
               "precision=bf16", "eval.every=0", "plot=false")  # fmt: skip
    assert rc == 0
    start = load_model(str(model)).model.state_dict()
    saved = load_model(str(run)).model.state_dict()
    worst = max(float((saved[k] - v).abs().max()) for k, v in start.items())
    assert worst < 1e-7, worst


def test_precomputed_reference_equals_the_live_one(tok):
    """A run that revisits its pairs scores each with the reference once, up front; the loss
    and gradients then equal those from the reference run live on every batch."""
    from lmloop.training.config import PreferenceSpec
    from lmloop.training.lora import apply_lora
    from lmloop.training.objectives import DPOObjective, Reference

    model, _ = apply_lora(_model_dir_model(tok), 4, 8.0, 0.0, ["q_proj", "v_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)  # policy != reference
    enc = [(tok.encode(p + c), tok.encode(p + r), len(tok.encode(p))) for p, c, r in PAIRS]
    rows = [(([*c[:-1]], [IGNORE] * (k - 1) + c[k:]), ([*r[:-1]], [IGNORE] * (k - 1) + r[k:]))
            for c, r, k in enc]  # fmt: skip
    spec = PreferenceSpec(beta=0.5)
    results = []
    for precompute in (False, True):
        obj = DPOObjective(rows, 0, 0, spec, Reference(model, None))
        if precompute:
            obj.precompute_reference(chunk=3)  # chunks unlike the training batch
        batch = obj.batch(range(4))
        assert (batch[2] is not None) == precompute
        model.zero_grad()
        st = obj.step(model, batch, torch.device("cpu"), torch.autograd.grad_mode.enable_grad)
        (st.loss_sum / st.units).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((st.loss_sum.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for n in results[0][1]:
        torch.testing.assert_close(results[1][1][n], results[0][1][n], rtol=1e-5, atol=1e-6)


def _model_dir_model(tok):
    from lmloop.models import build_model
    from lmloop.models.llama import LlamaConfig

    torch.manual_seed(0)
    return build_model(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=128, eos_token_id=tok.eos_id))  # fmt: skip


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, tok, task):
    data = _pref_records(tmp_path / f"{task}.jsonl", task, n=24)
    model = _model_dir(tmp_path / "m", tok)
    args = ["--data", str(data), "--init-from", str(model), "--max-steps", "8", "--save-every",
            "3", "log_every=1", "eval.every=4", "batch.micro_batch=4", "batch.global_batch=4",
            "schedule.warmup_steps=1", "optim.lr=3e-3", "batch.seq_len=64"]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMLOOP_NO_PROGRESS": "1"}
    proc = train_frozen_at(5, [*args, "--out", str(cut)], env)
    try:
        assert train(*args, "--out", str(full)) == 0
        import time

        end = time.time() + 120
        while time.time() < end and not any(
            r["step"] >= 5 for r in read_metrics(cut / "metrics.jsonl")
        ):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert max(r["step"] for r in read_metrics(cut / "metrics.jsonl")) == 5
    assert train(*args, "--out", str(cut), "--resume") == 0
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"] and ra.get("rewards/margin") == rb.get("rewards/margin"), ra
    wa = (full / "checkpoints" / "step-0000008" / "model.safetensors").read_bytes()
    assert wa == (cut / "checkpoints" / "step-0000008" / "model.safetensors").read_bytes()


def test_sft_last_turn_only(tok):
    from lmloop.training.batches import encode_chat

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "two"}]  # fmt: skip
    _, every = encode_chat(tok, msgs)
    _, last = encode_chat(tok, msgs, last_only=True)
    taught = lambda labels: tok.decode([t for t in labels if t != IGNORE])  # noqa: E731
    assert "one" in taught(every) and "two" in taught(every)
    assert "one" not in taught(last) and "two" in taught(last)


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    return err[0]


def test_bad_preference_inputs_fail_in_one_line(tmp_path, tok, capsys):
    model = _model_dir(tmp_path / "m", tok)
    no_rej = tmp_path / "norej.jsonl"
    no_rej.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    one_label = tmp_path / "one.jsonl"
    one_label.write_text("".join(
        json.dumps({"prompt": "a", "completion": f"b{i}", "label": True}) + "\n" for i in range(3)
    ))  # fmt: skip
    good = _pref_records(tmp_path / "dpo.jsonl", "dpo", n=4)
    base = ["--init-from", str(model), "--max-steps", "1", "batch.seq_len=64"]
    cases = [
        (["--data", str(no_rej), "--task", "dpo", *base], "without 'rejected'"),
        (["--data", str(one_label), *base], "KTO needs both labels"),
        (["--data", str(good), "pref.beta=0", *base], "pref: beta must be > 0"),
        (["--data", str(good), "pref.sft_weight=-1", *base], "pref: sft_weight must be >= 0"),
        (["--data", str(good), "--max-steps", "1", "batch.seq_len=64"], "needs a starting model"),
    ]
    for i, (args, want) in enumerate(cases):
        assert train(*args, "--out", str(tmp_path / f"r{i}")) == 2, want
        assert want in _err(capsys), want
        assert not (tmp_path / f"r{i}").exists()


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from lmloop.training import run as tr

    cpu = torch.device("cpu")
    for flags, bf16 in [("flags : fpu avx2 avx512f avx512_vnni", False),
                        ("flags : fpu avx2 avx512_bf16", True), ("flags : fpu amx_bf16", True)]:  # fmt: skip
        monkeypatch.setattr(tr, "cpu_flags", lambda f=flags: f)
        with tr.autocast("auto", cpu)():
            assert torch.is_autocast_enabled("cpu") is bf16
        with tr.autocast("fp32", cpu)():
            assert not torch.is_autocast_enabled("cpu")
        with tr.autocast("bf16", cpu)():
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert torch.is_autocast_enabled("cpu")
