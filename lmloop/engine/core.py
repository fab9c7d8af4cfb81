"""The engine: one streaming decode path with continuous batching on a worker thread.

    engine = Engine(model, tokenizer).start()
    for out in engine.generate(prompt_ids, SamplingParams(max_tokens=64)):
        print(out.text, end="", flush=True)

Every caller goes through `submit`, which queues a request and returns a `RequestHandle` to
iterate (blocking) or `async for` over (asyncio). The worker thread loops: admit waiting requests
into free cache rows (prefilled together in one forward), then decode all running rows in one
batched forward and sample every row at once (`lmloop.engine.sampling.pick_batch`); a finished
or cancelled sequence gives its row back at once (Orca's iteration-level scheduling, Yu et al.,
OSDI 2022; docs/generate.md)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import torch

from lmloop.engine import seq2seq
from lmloop.engine.fast import CALIBRATION_TEXT, FastLlamaRunner, fast_runner
from lmloop.engine.params import (
    Completion,
    QueueFull,
    SamplingParams,
    StepOutput,
    TokenLogprob,
)
from lmloop.engine.precision import choose
from lmloop.engine.prefix import PrefixCache
from lmloop.engine.prefix import supports as prefix_supports
from lmloop.engine.runner import ModelRunner
from lmloop.engine.sampling import Sampler, pick_batch, top_logprobs
from lmloop.engine.spec import EngineSpec
from lmloop.engine.text import TextStream
from lmloop.engine.threads import release_openmp_team
from lmloop.errors import UserError
from lmloop.models.io import LoadedModel, load_model
from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 2048  # cache length when the model's context is longer (memory: B x S x layers)
STALL_AFTER_S = 120.0  # a worker with work that has not stepped for this long is not alive
# Keys and values of shared prompt prefixes kept for reuse (`lmloop.engine.prefix`): 256 MB is
# ~5,600 tokens of SmolLM2-135M (46 KB each), a few long system prompts or chat histories.
DEFAULT_PREFIX_CACHE_MB = 256.0
# Prompt scoring (`echo` + logprobs) turns the logits into logprobs this many positions at a
# time: 256 x 49k fp32 is 50 MB, where the whole prompt's matrix is T x V (1.6 GB at 8k tokens).
SCORE_CHUNK = 256
# What decodes for the engine: the generic runner, the fast Llama one (fp32/int8/int4), seq2seq.
Runner = ModelRunner | FastLlamaRunner | seq2seq.Seq2SeqRunner


class RequestHandle:
    """One submitted request: iterate it for `StepOutput`s until one has `finished` set."""

    def __init__(self, engine: Engine, request_id: int, prompt_tokens: int):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self._engine = engine
        self._q: queue.Queue[StepOutput] = queue.Queue()
        self._lock = threading.Lock()
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._aq: asyncio.Queue[StepOutput] | None = None
        self.cancel_requested = False
        self.finished = False

    def _push(self, out: StepOutput) -> None:
        with self._lock:
            self.finished = self.finished or out.finished
            if self._aloop is not None and self._aq is not None:
                try:
                    self._aloop.call_soon_threadsafe(self._aq.put_nowait, out)
                    return
                except RuntimeError:  # the consumer's event loop is gone
                    pass
            self._q.put(out)

    def cancel(self) -> None:
        """Stop generating; the stream ends with finish_reason 'cancelled' (if not done yet)."""
        self.cancel_requested = True
        self._engine._wake()

    def __iter__(self) -> Iterator[StepOutput]:
        while True:
            out = self._q.get()
            yield out
            if out.finished:
                return

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self._agen()

    async def _agen(self) -> AsyncIterator[StepOutput]:
        aq: asyncio.Queue[StepOutput] = asyncio.Queue()
        with self._lock:
            self._aloop, self._aq = asyncio.get_running_loop(), aq
            while not self._q.empty():
                aq.put_nowait(self._q.get_nowait())
        try:
            while True:
                out = await aq.get()
                yield out
                if out.finished:
                    return
        finally:
            if not self.finished:  # the consumer went away (client disconnected)
                self.cancel()

    def result(self) -> Completion:
        """Block until finished; the aggregated completion."""
        return Completion.from_steps(self)


class _Seq:
    __slots__ = (
        "handle", "prompt", "params", "sampler", "stream", "stop_ids", "pos", "last", "n_gen",
        "row", "started", "out_ids",
    )  # fmt: skip

    def __init__(self, handle: RequestHandle, prompt: list[int], params: SamplingParams):
        self.handle, self.prompt, self.params = handle, prompt, params
        self.pos = len(prompt)  # where the next fed token goes
        self.last = -1  # the token to feed next
        self.n_gen = 0
        self.row = -1
        self.started = 0.0
        self.out_ids: list[int] = []  # sampled tokens (the last one not fed yet)


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 16,
        max_waiting: int = 64,
        max_len: int | None = None,
        fast: bool = True,
        precision: str = "fp32",
        source: str | None = None,
        kv_int8: bool | None = None,
        threads: int | None = None,
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
        single_thread_rows: int | None = None,
    ):
        # The engine keeps no reference to the model: its runner keeps what it reads (the fast
        # runner its own copies), so a caller that drops the model frees its weights.
        model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        ctx = int(model.max_seq_len)
        self._ctx = min(ctx, max_len or min(ctx, DEFAULT_MAX_LEN))
        self.vocab = _vocab_of(model)
        self._stop_ids = set(tokenizer.stop_ids)
        # An encoder-decoder model: the prompt is the encoder's input, the engine decodes the
        # output from decoder position 1 (`lmloop.engine.seq2seq`); its config's EOS stops too.
        self.encoder_decoder = bool(getattr(model, "is_encoder_decoder", False))
        if self.encoder_decoder and model.config.eos_token_id is not None:
            self._stop_ids.add(int(model.config.eos_token_id))
        # fp32, int8 or int4 weights (`lmloop.engine.precision`): `auto` is resolved here, once,
        # from what the source holds (`source`: a GGUF's file type) or a measurement of the
        # quality loss; `choice.line()` says what was chosen and why.
        self.choice = choose(precision, model, tokenizer, source=source, kv_int8=kv_int8)
        self.precision = self.choice.precision
        int8, int4 = self.precision == "int8", self.precision == "int4"
        # The KV cache in int8 (the fast runner's; `lmloop.engine.fast`): default with int8 or
        # int4 weights, the memory-lean serving modes.
        self.runner = _make_runner(
            model,
            max_batch,
            self._ctx,
            fast=fast,
            int8=int8,
            int4=int4,
            kv_int8=(int8 or int4) if kv_int8 is None else kv_int8,
            tokenizer=tokenizer,
        )
        self.kv_int8 = bool(getattr(self.runner, "kv_int8", False))
        if kv_int8 and not self.kv_int8:
            raise UserError(
                "an int8 KV cache needs the fast Llama-family runner; this model "
                f"({type(model).__name__}) keeps its cache in fp32",
                hint="serve it with --kv-cache fp32",
            )
        self.threads = threads or default_threads()
        # Decode steps of at most this many rows run on one intra-op thread (0: never). At batch
        # 1 a step opens ~250 OpenMP parallel regions (each projection, attention matmul and
        # softmax), each too small to split: the second thread adds a fork/join per region and
        # competes with the server's event loop for the cores (issue 18, item 2;
        # bench/threads.py measures it). Prefill and larger batches keep `threads`.
        if single_thread_rows is None:
            single_thread_rows = default_single_thread_rows()
        self.single_thread_rows = single_thread_rows
        self.score_chunk = SCORE_CHUNK  # prompt scoring's rows of logits at a time
        self._threads_now = 0
        # Prefix reuse for runners that can read and write cache slots (not encoder-decoder).
        self.prefix = None
        if prefix_cache_mb > 0 and prefix_supports(self.runner):
            self.prefix = PrefixCache(int(prefix_cache_mb * 2**20))
        self.prefilled = 0  # prompt tokens run through the model (the rest came from `prefix`)
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.last_step_at = time.monotonic()
        self._busy = False
        self._backend = getattr(tokenizer, "backend", None)
        self.steps = 0  # decode steps taken (tests, metrics)
        # Requests admitted together prefill in one forward where the runner can (`_waves`),
        # and each step's rows are sampled at once; bench/generate.py swaps these for the
        # one-at-a-time ways to measure both in one run.
        self.batch_prefill = True
        self.sample = pick_batch

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None or not self._thread.is_alive():
            # The caller's OpenMP team (from loading the model) would throttle the worker's
            # threads for as long as it lives (`lmloop.engine.threads`).
            release_openmp_team()
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lmloop-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- state ---------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self._ctx

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def prefill_counts(self) -> dict[str, int]:
        """Prompt tokens prefilled, and what the prefix cache saved (the server's metrics)."""
        prefix = self.prefix
        return {
            "prefilled": self.prefilled,
            "prefix_hits": prefix.hits if prefix else 0,
            "prefix_tokens_reused": prefix.tokens_reused if prefix else 0,
        }

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held per component (the server's metrics): "weights", "kv_cache" (where the
        runner reports them: the fast Llama runner) and "prefix_cache" (its stored blocks)."""
        held = dict(getattr(self.runner, "resident_bytes", dict)())
        held["prefix_cache"] = self.prefix.nbytes if self.prefix else 0
        return held

    @property
    def alive(self) -> bool:
        t = self._thread
        if t is None or not t.is_alive():
            return False
        return not self._busy or time.monotonic() - self.last_step_at < STALL_AFTER_S

    # ---- requests ------------------------------------------------------------------------
    def check(self, prompt_tokens: int, params: SamplingParams) -> None:
        """Raise UserError when a request cannot fit the context (both numbers in the message)."""
        params.validate()
        ctx = self._ctx
        if prompt_tokens == 0:
            raise UserError("the prompt is empty (0 tokens)", hint="give at least one token")
        if self.encoder_decoder:
            return seq2seq.check_request(prompt_tokens, params, ctx)
        if prompt_tokens >= ctx + (params.max_tokens == 0):  # scoring only: the whole context
            raise UserError(
                f"the prompt is {prompt_tokens} tokens, longer than the context of {ctx} tokens",
                hint="shorten the prompt",
            )
        if prompt_tokens + params.max_tokens > ctx:
            raise UserError(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({params.max_tokens}) "
                f"is {prompt_tokens + params.max_tokens} tokens, more than the context of "
                f"{ctx} tokens",
                hint=f"lower max_tokens to at most {ctx - prompt_tokens} or shorten the prompt",
            )

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request (thread-safe). Raises QueueFull, or UserError for a bad request."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        self.check(len(prompt), params)
        bad = [t for t in prompt if not 0 <= t < self.vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})")
        handle = RequestHandle(self, next(self._ids), len(prompt))
        seq = _Seq(handle, prompt, params)
        with self._cv:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests already waiting")
            seq.started = time.monotonic()
            self._waiting.append(seq)
            self._cv.notify_all()
        return handle

    def generate(
        self, prompt_ids: list[int], params: SamplingParams | None = None
    ) -> Iterator[StepOutput]:
        """Stream one request (starts the worker if needed); closing the iterator cancels it."""
        self.start()
        handle = self.submit(prompt_ids, params)
        return self._follow(handle)

    @staticmethod
    def _follow(handle: RequestHandle) -> Iterator[StepOutput]:
        try:
            yield from handle
        finally:
            if not handle.finished:
                handle.cancel()

    def complete(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Completion:
        return Completion.from_steps(self.generate(prompt_ids, params))

    def encode_prompt(self, text: str) -> list[int]:
        """A plain prompt's ids, with the special tokens the model's tokenizer adds (HF's way)."""
        if self.encoder_decoder:
            return seq2seq.encoder_input(self.tokenizer, text)
        hf = getattr(self.tokenizer, "hf", None)
        if hf is not None:
            return list(hf.encode(text, add_special_tokens=True))
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation rendered with the model's chat template, ready for an answer (an
        encoder-decoder model's input is the last user turn)."""
        if self.encoder_decoder:
            return seq2seq.chat_input(self.tokenizer, messages)
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))

    def generate_text(self, prompt: str, params: SamplingParams | None = None) -> str:
        return self.complete(self.encode_prompt(prompt), params).text

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ---- the worker ----------------------------------------------------------------------
    def decode_ids(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids)

    def _decode_output(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _loop(self) -> None:
        # Intra-op threads of this worker thread only (OpenMP's setting is per thread).
        self._threads_now = 0
        self._use_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._waiting or self._running):
                        self._busy = False
                        self._cv.wait(timeout=1.0)
                        self.last_step_at = time.monotonic()
                    if self._stopping:
                        break
                    self._busy = True
                    admit = []
                    while self._waiting and len(self._running) + len(admit) < self.max_batch:
                        admit.append(self._waiting.popleft())
                try:
                    self._iteration(admit)
                except Exception as e:  # noqa: BLE001 - a bug must not leave callers hanging
                    log.exception("engine iteration failed")
                    for seq in admit + list(reversed(self._running)):
                        if not seq.handle.finished:
                            self._release(seq)
                            self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                self.last_step_at = time.monotonic()
        # stopping: nobody waits forever
        with self._cv:
            pending = list(self._waiting) + list(self._running)
            self._waiting.clear()
        for seq in pending:
            if seq.row >= 0:
                self._release(seq)
            self._finish(seq, "cancelled")

    def _iteration(self, admit: list[_Seq]) -> None:
        if admit:
            self._use_threads(self.threads)
        live = []
        for seq in admit:
            if seq.handle.cancel_requested:
                self._finish(seq, "cancelled")
            else:
                live.append(seq)
        for wave in self._waves(live):
            self._prefill(wave)
        self._drop_cancelled()
        if self._running:
            few = len(self._running) <= self.single_thread_rows
            self._use_threads(1 if few else self.threads)
            self._step()

    def _waves(self, seqs: list[_Seq]) -> list[list[_Seq]]:
        """Requests admitted together, in groups that prefill in one forward each (in order).
        A request that asks for its prompt's logprobs goes alone (every position's logits);
        one whose prompt starts with a whole prefix-cache block of another in the group waits
        for the next group, so it reuses those keys and values instead of computing them
        again; and a runner without `prefill_batch` takes one at a time."""
        if not self.batch_prefill or not hasattr(self.runner, "prefill_batch"):
            return [[s] for s in seqs]
        waves: list[list[_Seq]] = []
        wave: list[_Seq] = []
        block = self.prefix.block if self.prefix is not None else 0
        for seq in seqs:
            alone = seq.params.prompt_logprobs is not None
            shares = block and any(
                seq.prompt[:block] == o.prompt[:block] and len(o.prompt) > block for o in wave
            )
            if wave and (alone or shares):
                waves.append(wave)
                wave = []
            wave.append(seq)
            if alone:
                waves.append(wave)
                wave = []
        if wave:
            waves.append(wave)
        return waves

    def _use_threads(self, n: int) -> None:
        if n != self._threads_now:
            torch.set_num_threads(n)
            self._threads_now = n

    def _prefill(self, wave: list[_Seq]) -> None:
        """Prefill a group of admitted requests (one forward where the runner batches), then
        sample each one's first token."""
        ready, starts = [], []
        for seq in wave:
            p = seq.params
            seq.row = len(self._running)
            self._running.append(seq)
            try:
                seq.sampler = Sampler(p, seq.prompt, self.vocab)
                if self.encoder_decoder:  # the output is text of its own, special tokens dropped
                    seq.stream = TextStream(self._decode_output, [], p.stop)
                else:
                    seq.stream = TextStream(self.decode_ids, seq.prompt, p.stop)
                seq.stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self._stop_ids)
                m = 0
                if p.prompt_logprobs is None and self.prefix is not None:
                    m = self.prefix.load(self.runner, seq.row, seq.prompt)
            except Exception as e:  # noqa: BLE001 - one bad request must not kill the worker
                self._prefill_failed(seq, e)
                continue
            ready.append(seq)
            starts.append(m)
        if not ready:
            return
        results = self._forward(ready, starts)
        sampling = []  # (seq, its last prompt position's logits, its prompt logprobs)
        for seq, start, got in zip(ready, starts, results):
            if isinstance(got, Exception):
                self._prefill_failed(seq, got)
                continue
            p = seq.params
            plps = None
            if p.prompt_logprobs is None:
                self.prefilled += len(seq.prompt) - start
                logits = got
            else:  # scored chunk by chunk while it was prefilled (alone: `_waves`)
                self.prefilled += len(seq.prompt)
                plps, logits = got
            # At once, so requests admitted after this one share it; not for scoring-only
            # requests (lm-eval sends thousands, which would push out the prefixes that recur).
            if self.prefix is not None and p.max_tokens > 0:
                self.prefix.store(self.runner, seq.row, seq.prompt)
            if self.encoder_decoder:
                seq.pos = 1  # decoder positions: the start token sat at 0
            if p.max_tokens == 0:  # scoring only
                self._release(seq)
                out = StepOutput(
                    "", [], None, True, "length", len(seq.prompt), 0, prompt_logprobs=plps
                )
                seq.handle._push(out)
                continue
            sampling.append((seq, logits, plps))
        if not sampling:
            return
        seqs = [s for s, _, _ in sampling]
        outs, failed = self._sample(seqs, torch.stack([x for _, x, _ in sampling]))
        plps_of = {id(s): plps for s, _, plps in sampling}
        for seq, out in outs:
            out.prompt_logprobs = plps_of[id(seq)]
        leaving = [seq for seq, out in outs if out.finished] + [seq for seq, _ in failed]
        for seq in sorted(leaving, key=lambda s: -s.row):
            self._release(seq)  # before the caller hears of it: num_running is already right
        for seq, out in outs:
            seq.handle._push(out)
        for seq, error in failed:
            self._finish(seq, "error", error=error)

    def _forward(self, seqs: list[_Seq], starts: list[int]) -> list[Any]:
        """Each sequence's prefill logits, or the exception that its prefill raised: one forward
        for the group where the runner batches; alone when a batched forward fails, so one bad
        request fails by itself."""
        runner = self.runner
        if len(seqs) > 1:
            try:
                rows = [s.row for s in seqs]
                return list(runner.prefill_batch(rows, [s.prompt for s in seqs], starts))
            except Exception:  # noqa: BLE001 - retried one by one below
                log.exception("batched prefill failed; prefilling one request at a time")
        out: list[Any] = []
        for seq, m in zip(seqs, starts):
            try:
                if seq.params.prompt_logprobs is not None:  # (logprobs, last logits)
                    out.append(self._score_prompt(seq.row, seq.prompt, seq.params.prompt_logprobs))
                elif m:
                    out.append(runner.prefill(seq.row, seq.prompt[m:], start=m))
                else:
                    out.append(runner.prefill(seq.row, seq.prompt))
            except Exception as e:  # noqa: BLE001 - one bad request must not kill the worker
                out.append(e)
        return out

    def _prefill_failed(self, seq: _Seq, e: Exception) -> None:
        log.error("request %d: prefill failed", seq.handle.id, exc_info=e)
        self._release(seq)
        self._finish(seq, "error", error=f"{type(e).__name__}: {e}")

    def _step(self) -> None:
        running = self._running
        try:
            logits = self.runner.decode([s.last for s in running], [s.pos for s in running])
        except Exception as e:  # noqa: BLE001
            log.exception("decode step failed (requests %s)", [s.handle.id for s in running])
            for seq in list(reversed(running)):
                self._release(seq)
                self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
            return
        self.steps += 1
        for s in running:
            s.pos += 1
        outs, failed = self._sample(running, logits)
        leaving = [seq for seq, out in outs if out.finished] + [seq for seq, _ in failed]
        if self.prefix is not None:  # a finished answer extends its prompt's stored prefix
            for seq, out in outs:
                if out.finished:
                    self.prefix.store(self.runner, seq.row, seq.prompt + seq.out_ids[:-1])
        for seq in sorted(leaving, key=lambda s: -s.row):
            self._release(seq)
        for seq, out in outs:
            seq.handle._push(out)
        for seq, error in failed:
            self._finish(seq, "error", error=error)

    def _sample(
        self, seqs: list[_Seq], logits: torch.Tensor
    ) -> tuple[list[tuple[_Seq, StepOutput]], list[tuple[_Seq, str]]]:
        """Sample every row at once (`pick_batch`) and record the tokens. A sequence whose
        sampling fails ends alone; the others' rows, samplers and outputs are untouched, so
        they continue exactly as if it had finished normally."""
        outs, failed = [], []
        picks = self.sample([s.sampler for s in seqs], logits)
        for i, (seq, token) in enumerate(zip(seqs, picks)):
            try:
                if isinstance(token, Exception):
                    raise token
                outs.append((seq, self._accept(seq, token, logits[i])))
            except Exception as e:  # noqa: BLE001
                failed.append((seq, _sampling_error(seq, e)))
        return outs, failed

    def _accept(self, seq: _Seq, token: int, logits: torch.Tensor) -> StepOutput:
        """Record one sampled token; its output (to push once rows are settled)."""
        p = seq.params
        seq.n_gen += 1
        seq.last = token
        seq.out_ids.append(token)
        seq.sampler.observe(token)
        lps = None
        if p.logprobs is not None:
            chosen, top = top_logprobs(logits, token, p.logprobs)
            d = self.decode_ids
            lps = [TokenLogprob(d([token]), token, chosen, [(d([i]), i, v) for i, v in top])]
        reason = None
        if token in seq.stop_ids:
            text, reason = seq.stream.flush(), "stop"
        else:
            text, hit = seq.stream.push(token)
            if hit:
                reason = "stop"
            elif seq.n_gen >= p.max_tokens or seq.pos >= self._ctx:
                text += seq.stream.flush()
                reason = "length"
        finished = reason is not None
        return StepOutput(text, [token], lps, finished, reason, len(seq.prompt), seq.n_gen)

    def _score_prompt(
        self, row: int, ids: list[int], n: int
    ) -> tuple[list[TokenLogprob | None], torch.Tensor]:
        """Prefill `row` with the prompt and score it: token t's logprob under the logits at
        t-1 (+ the top n there), None for token 0; and the last token's logits (V,). The
        logits come `score_chunk` rows at a time and only these values are kept: the whole
        T x V matrix (fp32: 1.6 GB for 8k tokens of a 49k vocabulary) never exists."""
        d = self.decode_ids
        out: list[TokenLogprob | None] = [None]
        pos, last = 0, None
        for logits in self.runner.prefill_chunks(row, ids, self.score_chunk):
            k = len(logits)
            nxt = torch.tensor(ids[pos + 1 : pos + 1 + k], dtype=torch.long)  # the next tokens
            pos += k
            last = logits[-1].clone()  # only the prompt's last row samples; the chunk goes
            if not len(nxt):  # the prompt's last position predicts no prompt token
                continue
            lp = torch.log_softmax(logits[: len(nxt)].float(), dim=-1)
            chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
            vals, top = torch.topk(lp, n) if n > 0 else (lp[:, :0], lp[:, :0].long())
            for t, c, vs, ts in zip(nxt.tolist(), chosen, vals.tolist(), top.tolist()):
                out.append(TokenLogprob(d([t]), t, c, [(d([i]), i, v) for i, v in zip(ts, vs)]))
        if last is None:
            raise ValueError("an empty prompt has nothing to score")
        return out, last

    def _release(self, seq: _Seq) -> None:
        """Take a sequence out of the running rows, moving the last row into its place."""
        running = self._running
        r, last = seq.row, len(running) - 1
        if r < 0 or r > last or running[r] is not seq:
            return
        if r != last:
            moved = running[last]
            self.runner.move(last, r, moved.pos)
            moved.row = r
            running[r] = moved
        else:
            self.runner.reset(r)
        running.pop()
        seq.row = -1

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [s for s in self._waiting if s.handle.cancel_requested]
            for s in gone:
                self._waiting.remove(s)
        for s in gone:
            self._finish(s, "cancelled")
        for s in sorted(
            (s for s in self._running if s.handle.cancel_requested), key=lambda s: -s.row
        ):
            self._release(s)
            self._finish(s, "cancelled")

    @staticmethod
    def _finish(seq: _Seq, reason: str, error: str | None = None) -> None:
        seq.handle._push(
            StepOutput("", [], None, True, reason, len(seq.prompt), seq.n_gen, error=error)
        )


def _sampling_error(seq: _Seq, e: Exception) -> str:
    p = seq.params
    log.warning("request %d: sampling failed: %s: %s", seq.handle.id, type(e).__name__, e)
    return (
        f"sampling failed after {seq.n_gen} tokens (temperature {p.temperature}, "
        f"repetition_penalty {p.repetition_penalty}): {type(e).__name__}: {e}"
    )


def default_threads() -> int:
    """LMLOOP_ENGINE_THREADS, else all cores on a machine of 2 to 4, else half the cores.

    Measured on this project's idle 2-core machine (`lmloop serve --int8`, SmolLM2-135M, issue
    18): 2 threads serve 1 / 4 / 16 clients at 70.5 / 170 / 376 tok/s against 49.2 / 124 / 263
    on 1, once no other OpenMP team is alive in the process (`lmloop.engine.threads`; before that
    fix 2 threads were 2x slower than 1). Above 4 cores nothing is measured yet, so
    the earlier rule stays there: half the cores, leaving the rest to the event loop and HTTP.
    On shared, loaded cores spinning OpenMP threads stall each other: pin it with the variable."""
    env = os.environ.get("LMLOOP_ENGINE_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    cores = os.cpu_count() or 1
    return cores if cores <= 4 else cores // 2


def default_single_thread_rows() -> int:
    """0 (every step on the engine's threads) unless LMLOOP_ENGINE_SINGLE_THREAD_ROWS says."""
    env = os.environ.get("LMLOOP_ENGINE_SINGLE_THREAD_ROWS")
    return int(env) if env and env.isdigit() else 0


def _vocab_of(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(cfg.vocab_size)


def _make_runner(
    model: torch.nn.Module,
    batch: int,
    max_len: int,
    *,
    fast: bool,
    int8: bool,
    kv_int8: bool,
    tokenizer: Tokenizer,
    int4: bool = False,
) -> Runner:
    if int4:
        return _int4_runner(model, batch, max_len, kv_int8=kv_int8, tokenizer=tokenizer)
    if getattr(model, "is_encoder_decoder", False):
        return seq2seq.Seq2SeqRunner(model, batch, max_len, int8=int8)
    if fast:
        calib = None
        if int8:
            with torch.inference_mode():
                calib = [t for t in tokenizer.encode(CALIBRATION_TEXT) if t < _vocab_of(model)]
        runner = fast_runner(
            model, batch, max_len, int8=int8, kv_int8=kv_int8, calibration_ids=calib
        )
        if runner is not None:
            return runner
    return ModelRunner(model, batch, max_len, int8=int8)


def _int4_runner(
    model: torch.nn.Module, batch: int, max_len: int, *, kv_int8: bool, tokenizer: Tokenizer
) -> FastLlamaRunner:
    """The fast runner over 4-bit weights (`precision.choose` has checked that the kernel
    builds, passes its self-check and covers this model's family and widths)."""
    with torch.inference_mode():  # the vocabulary head stays int8 (smoothed by this text)
        calib = [t for t in tokenizer.encode(CALIBRATION_TEXT) if t < _vocab_of(model)]
    runner = fast_runner(model, batch, max_len, int4=True, kv_int8=kv_int8, calibration_ids=calib)
    if runner is None:
        raise UserError(
            f"--precision int4 needs a Llama-family fp32 model on the CPU; this is "
            f"{type(model).__name__}",
            hint="use --precision int8",
        )
    return runner


def load_engine(
    spec: str, engine: EngineSpec | None = None, **kw: Any
) -> tuple[Engine, LoadedModel]:
    """Load a model (`lmloop.models.io.load_model`) and build an engine over it, run as
    `engine` says; `kw` overrides single `Engine` arguments (a batch job's queue length)."""
    loaded = load_model(spec)
    return engine_for(loaded, engine, **kw), loaded


def engine_for(loaded: LoadedModel, engine: EngineSpec | None = None, **kw: Any) -> Engine:
    """An engine over a model already loaded, run as `engine` says (`kw`: single overrides)."""
    kw = {"source": loaded.quant, **(engine or EngineSpec()).engine_kwargs(), **kw}
    return Engine(loaded.model, loaded.tokenizer, **kw)
