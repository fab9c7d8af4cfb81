"""The engine: one streaming decode path with continuous batching on a worker thread.

    engine = Engine(model, tokenizer).start()
    for out in engine.generate(prompt_ids, SamplingParams(max_tokens=64)):
        print(out.text, end="", flush=True)

Every caller goes through `submit`, which queues a request and returns a `RequestHandle` to
iterate (blocking) or `async for` over (asyncio). The worker thread loops: admit waiting requests
into free cache rows (short prompts prefilled together in one forward; a long prompt, or one
scored for its logprobs, `prefill_chunk` tokens per iteration in a row of its own), then decode
all running rows in one batched forward and sample every row at once
(`lmloop.engine.sampling.pick_batch`); a finished or cancelled sequence gives its row back at
once (Orca's iteration-level scheduling, Yu et al., OSDI 2022; chunked prefill as in
Sarathi-Serve, Agrawal et al., OSDI 2024; docs/generate.md)."""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import torch

from lmloop.engine import kernels, seq2seq
from lmloop.engine.fast import CALIBRATION_TEXT, FastLlamaRunner, supports
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
# Prompt scoring (`echo` + logprobs) turns the logits into logprobs at most this many positions
# at a time: 256 x 49k fp32 is 50 MB, where the whole prompt's matrix is T x V (1.6 GB at 8k).
SCORE_CHUNK = 256
# A prompt with more than this many tokens to compute (or one scored for its logprobs) is
# prefilled this many tokens per iteration, between the running rows' decode steps, and short
# prompts arriving together share this budget per step, so new work delays the running rows'
# tokens by one chunk's time instead of the whole prompt's: SmolLM2-135M int4 on 2 cores runs
# a 1,500-token prompt in 2.2 s at once, in chunks of 32 in 3.1 s (67 ms each), a 16-row decode
# step in 29 ms (bench/soak.py: the well-behaved streams' inter-token p99 under an abusive
# client, 2.7 s with whole prompts, 0.23 s with chunks of 64).
DEFAULT_PREFILL_CHUNK = 32  # EngineSpec.prefill_chunk
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
        push_all([(self, out)], self._engine._outbox)

    def _route(self, out: StepOutput) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None:
        """Record `out`; where it goes: the async consumer's (loop, queue), or None when it
        was put on the blocking queue."""
        with self._lock:
            self.finished = self.finished or out.finished
            if self._aloop is not None and self._aq is not None and not self._aloop.is_closed():
                return self._aloop, self._aq
            self._q.put(out)
            return None

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


def _deliver(items: list[tuple[asyncio.Queue, StepOutput]]) -> None:
    for aq, out in items:
        aq.put_nowait(out)


Outbox = list[tuple[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput]]]]


def push_all(outs: list[tuple[RequestHandle, StepOutput]], outbox: Outbox) -> None:
    """Hand each output to its handle's consumer, in order: a blocking consumer's at once; an
    async consumer's go to `outbox`, one entry per event loop for the lot (a decode step's rows
    all stream to the server's one loop), which `hand_over` passes on."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput]]] = {}
    for handle, out in outs:
        dest = handle._route(out)
        if dest is not None:
            by_loop.setdefault(dest[0], []).append((dest[1], out))
    outbox.extend(by_loop.items())


def hand_over(outbox: Outbox) -> None:
    """Wake each event loop in `outbox` for its outputs, in order, and empty it. The engine
    calls this right before its next forward (and before it waits for work): a wake-up is a
    write to the loop's self-pipe, a system call that gives up the GIL, and the woken loop
    then holds the GIL while it streams the step's tokens; woken just before the forward's C
    call, which runs without the GIL, the loop's work no longer stalls the engine's Python
    between steps (one client: ~3% of the engine thread's time waited in that write)."""
    items, outbox[:] = list(outbox), []
    for loop, batch in items:
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the consumer's event loop closed meanwhile: nobody listens
            pass


class _Seq:
    __slots__ = (
        "handle", "prompt", "params", "sampler", "stream", "stop_ids", "pos", "last", "n_gen",
        "row", "started", "out_ids", "start", "filled", "plps",
    )  # fmt: skip

    def __init__(self, handle: RequestHandle, prompt: list[int], params: SamplingParams):
        self.handle, self.prompt, self.params = handle, prompt, params
        self.pos = len(prompt)  # where the next fed token goes
        self.last = -1  # the token to feed next
        self.n_gen = 0
        self.row = -1
        self.started = 0.0
        self.out_ids: list[int] = []  # sampled tokens (the last one not fed yet)
        self.start = 0  # prompt tokens that came from the prefix cache
        self.filled = 0  # prompt tokens in the cache so far (a prompt prefilled in chunks)
        self.plps: list[TokenLogprob | None] | None = None  # its prompt logprobs so far


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
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ):
        # The engine keeps no reference to the model: its runner keeps what it reads (the fast
        # runner its own copies), so a caller that drops the model frees its weights.
        model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        ctx = int(model.max_seq_len)
        self._ctx = min(ctx, max_len or min(ctx, DEFAULT_MAX_LEN))
        self.vocab = int(model.config.vocab_size)
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
        self.score_chunk = SCORE_CHUNK  # prompt scoring's rows of logits at a time, at most
        # Long prompts and scored ones go in chunks through one row set apart, the last, and
        # join the running rows when prefilled (`_fill`); 0 prefills other prompts at once.
        self.prefill_chunk = prefill_chunk
        self._filling: _Seq | None = None
        self._fill_waited = False
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
        # New prompts join the running rows' decode step where the runner can (`_mixed`).
        self.mix = getattr(self.runner, "mixes", False)
        self.mixed_steps = 0  # decode steps that carried new prompts (tests, metrics)
        self._outbox: Outbox = []  # async consumers' outputs until the next forward
        self.sample = pick_batch
        if getattr(self.runner, "int4", False):  # the C kernel is loaded: its sampler too
            self.sample = functools.partial(pick_batch, topk=kernels.topk, fused=kernels.sample)

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
        return len(self._running) + (self._filling is not None)

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
                if not (self._running or self._filling):  # no forward next: wake them now
                    hand_over(self._outbox)
                with self._cv:
                    while not (self._stopping or self._waiting or self._running or self._filling):
                        self._busy = False
                        self._cv.wait(timeout=1.0)
                        self.last_step_at = time.monotonic()
                    if self._stopping:
                        break
                    self._busy = True
                    admit, fill = self._admit()
                try:
                    self._iteration(admit, fill)
                except Exception as e:  # noqa: BLE001 - a bug must not leave callers hanging
                    log.exception("engine iteration failed")
                    self._filling, filling = None, self._filling
                    lost = admit + [s for s in (fill, filling) if s is not None]
                    for seq in lost + list(reversed(self._running)):
                        if not seq.handle.finished:
                            self._release(seq)
                            self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                self.last_step_at = time.monotonic()
        # stopping: nobody waits forever
        with self._cv:
            pending = list(self._waiting) + list(self._running)
            pending += [self._filling] if self._filling else []
            self._waiting.clear()
            self._filling = None
        for seq in pending:
            if seq.row >= 0:
                self._release(seq)
            self._finish(seq, "cancelled")
        hand_over(self._outbox)

    def _todo(self, seq: _Seq) -> int:
        """Prompt tokens to compute, beyond what the prefix cache holds."""
        return len(seq.prompt) - (self.prefix.cached(seq.prompt) if self.prefix else 0)

    def _admit(self) -> tuple[list[_Seq], _Seq | None]:
        """Waiting requests to start now, in order, while rows are free. A prompt scored for
        its logprobs (an encoder-decoder model refuses that in `check`), or one with more than
        `prefill_chunk` tokens to compute, is prefilled in chunks (`_fill`), one such at a time
        (the row it fills is held for it; another waits its turn, the short ones behind it do
        not). Short ones prefill in this iteration, up to `prefill_chunk` tokens to compute in
        all (at least one), so a burst of new prompts stalls the running rows no longer than a
        chunk does; the rest wait an iteration. An encoder-decoder model encodes each input
        whole, and takes what rows allow."""
        admit: list[_Seq] = []
        fill = None
        room = self.max_batch - self.num_running
        budget = 0 if self.encoder_decoder else self.prefill_chunk
        spent = 0
        for seq in list(self._waiting):
            if room == 0:
                break
            todo = self._todo(seq) if budget else 0
            if seq.params.prompt_logprobs is not None or todo > budget > 0:
                if self._filling is not None or fill is not None:
                    continue
                fill = seq
            elif admit and spent + todo > budget > 0:
                continue
            else:
                admit.append(seq)
                spent += todo
            self._waiting.remove(seq)
            room -= 1
        return admit, fill

    def _iteration(self, admit: list[_Seq], fill: _Seq | None = None) -> None:
        if admit or fill or self._filling:
            self._use_threads(self.threads)
        live = []
        for seq in admit + ([fill] if fill else []):
            if seq.handle.cancel_requested:
                self._finish(seq, "cancelled")
            elif seq is fill:
                self._start_fill(seq)
            else:
                live.append(seq)
        waves = self._waves(live)
        mix = self.mix and self.batch_prefill and self._filling is None
        if len(waves) == 1 and self._running and mix:
            self._drop_cancelled()
            if self._running:  # new prompts ride along with the running rows' step
                self._mixed(waves[0])
                return
        for wave in waves:
            self._prefill(wave)
        # A chunk waits an iteration while rows are decoding or new prompts were just
        # prefilled, never twice running: a running stream's tokens wait for a chunk at most
        # every second step. With nothing else to run (prompt scoring alone, lm-eval's case)
        # a chunk runs every iteration.
        if self._filling is not None:
            if (waves or self._running) and not self._fill_waited:
                self._fill_waited = True
            else:
                self._fill_waited = False
                self._fill()
        self._drop_cancelled()
        if self._running:
            few = len(self._running) <= self.single_thread_rows
            self._use_threads(1 if few else self.threads)
            self._step()

    def _waves(self, seqs: list[_Seq]) -> list[list[_Seq]]:
        """Requests admitted together, in groups that prefill in one forward each (in order).
        One whose prompt starts with a whole prefix-cache block of another in the group waits
        for the next group, so it reuses those keys and values instead of computing them
        again; and a runner without `prefill_batch` takes one at a time."""
        if not self.batch_prefill or not hasattr(self.runner, "prefill_batch"):
            return [[s] for s in seqs]
        waves: list[list[_Seq]] = []
        wave: list[_Seq] = []
        block = self.prefix.block if self.prefix is not None else 0
        for seq in seqs:
            shares = block and any(
                seq.prompt[:block] == o.prompt[:block] and len(o.prompt) > block for o in wave
            )
            if wave and shares:
                waves.append(wave)
                wave = []
            wave.append(seq)
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
        ready = self._seat(wave)
        if ready:
            self._prefilled(ready, self._forward(ready))

    def _seat(self, wave: list[_Seq]) -> list[_Seq]:
        """Give each admitted request the next running row and set it up; those ready to
        prefill (a failed set-up has ended its request)."""
        ready = []
        for seq in wave:
            seq.row = len(self._running)
            self._running.append(seq)
            if self._set_up(seq):
                ready.append(seq)
        return ready

    def _set_up(self, seq: _Seq) -> bool:
        """A request's sampler, text stream and stop tokens, and its prompt's prefix from the
        prefix cache in its row (`seq.start` tokens); False when that failed (it has ended)."""
        p = seq.params
        try:
            seq.sampler = Sampler(p, seq.prompt, self.vocab)
            if self.encoder_decoder:  # the output is text of its own, special tokens dropped
                seq.stream = TextStream(self._decode_output, [], p.stop)
            else:
                seq.stream = TextStream(self.decode_ids, seq.prompt, p.stop)
            seq.stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self._stop_ids)
            if p.prompt_logprobs is None and self.prefix is not None:
                seq.start = self.prefix.load(self.runner, seq.row, seq.prompt)
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the worker
            self._prefill_failed(seq, e)
            return False
        return True

    def _start_fill(self, seq: _Seq) -> None:
        """Set a prompt up in the row set apart for chunks (the last: the running rows stay
        below it while it fills); `_fill` runs its chunks, one per iteration."""
        seq.row = self.max_batch - 1
        if self._set_up(seq):
            seq.filled = seq.start
            seq.plps = [None] if seq.params.prompt_logprobs is not None else None
            self._filling = seq

    def _fill(self) -> None:
        """Prefill the next chunk of the prompt being filled. Chunks are cut by position alone
        (never by what else runs), so a prompt's numbers do not depend on the batch. After the
        last one the sequence takes the next running row and samples its first token."""
        seq = self._filling
        assert seq is not None
        scoring = seq.params.prompt_logprobs is not None
        n = self.prefill_chunk or len(seq.prompt)
        if scoring:
            n = min(n, self.score_chunk)
        s = seq.filled
        part = seq.prompt[s : s + n]
        hand_over(self._outbox)
        try:
            logits = self.runner.prefill(seq.row, part, start=s, every_position=scoring)
            if scoring:
                logits = self._score_chunk(seq, s, logits)
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the worker
            self._filling = None
            self._prefill_failed(seq, e)
            return
        seq.filled = s + len(part)
        if seq.filled < len(seq.prompt):
            return
        self._filling = None
        row = len(self._running)
        if row != seq.row:
            self.runner.move(seq.row, row, len(seq.prompt))
        seq.row = row
        self._running.append(seq)
        self._prefilled([seq], [(seq.plps, logits) if scoring else logits])

    def _prefilled(self, ready: list[_Seq], results: list[Any]) -> None:
        """After prefill: store each prompt's prefix, end scoring-only requests, sample the
        others' first tokens. `results`: each one's last logits, (its prompt logprobs, last
        logits) when scored, or the exception its prefill raised."""
        sampling = []  # (seq, its last prompt position's logits, its prompt logprobs)
        for seq, got in zip(ready, results):
            if isinstance(got, Exception):
                self._prefill_failed(seq, got)
                continue
            p = seq.params
            # a scored prompt was scored chunk by chunk while it was prefilled (`_fill`)
            plps, logits = got if p.prompt_logprobs is not None else (None, got)
            self.prefilled += len(seq.prompt) - seq.start
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
        push_all([(seq.handle, out) for seq, out in outs], self._outbox)
        for seq, error in failed:
            self._finish(seq, "error", error=error)

    def _forward(self, seqs: list[_Seq]) -> list[Any]:
        """Each sequence's prefill logits, or the exception that its prefill raised: one forward
        for the group where the runner batches; alone when a batched forward fails, so one bad
        request fails by itself."""
        runner = self.runner
        hand_over(self._outbox)
        if len(seqs) > 1:
            try:
                rows, starts = [s.row for s in seqs], [s.start for s in seqs]
                return list(runner.prefill_batch(rows, [s.prompt for s in seqs], starts))
            except Exception:  # noqa: BLE001 - retried one by one below
                log.exception("batched prefill failed; prefilling one request at a time")
        out: list[Any] = []
        for seq in seqs:
            m = seq.start
            try:
                if m:
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

    def _mixed(self, wave: list[_Seq]) -> None:
        """Admitted prompts prefilled inside the running rows' decode step: one forward (the
        runner's `decode_with_prompts`) in place of a prefill and a step, each row's numbers
        its own, so every request gets the tokens it gets apart. The new requests sample their
        first tokens and decode from the next step on. If the joint forward fails, the prompts
        prefill apart (where one bad request fails alone) and the rows step as usual."""
        running = list(self._running)
        ready = self._seat(wave)
        self._use_threads(self.threads)
        hand_over(self._outbox)
        try:
            logits, first = self.runner.decode_with_prompts(
                [s.last for s in running], [s.pos for s in running], [s.row for s in ready],
                [s.prompt for s in ready], [s.start for s in ready],
            )  # fmt: skip
        except Exception:  # noqa: BLE001 - retried apart below
            log.exception("a decode step with new prompts failed; running them apart")
            if ready:
                self._prefilled(ready, self._forward(ready))
            self._step()
            return
        self.mixed_steps += 1
        self._prefilled(ready, list(first))
        self._decoded(running, logits)

    def _step(self) -> None:
        running = self._running
        hand_over(self._outbox)
        try:
            logits = self.runner.decode([s.last for s in running], [s.pos for s in running])
        except Exception as e:  # noqa: BLE001
            log.exception("decode step failed (requests %s)", [s.handle.id for s in running])
            for seq in list(reversed(running)):
                self._release(seq)
                self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
            return
        self._decoded(list(running), logits)

    def _decoded(self, running: list[_Seq], logits: torch.Tensor) -> None:
        """After a decode step of `running` (rows' logits in that order): sample, record,
        release the finished ones and tell the callers."""
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
        push_all([(seq.handle, out) for seq, out in outs], self._outbox)
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

    def _score_chunk(self, seq: _Seq, pos: int, logits: torch.Tensor) -> torch.Tensor:
        """Score the prompt tokens that the logits of positions pos.. predict: token t's
        logprob under the logits at t-1 (+ the top n there), appended to `seq.plps` (None
        for token 0); the chunk's last logits (V,). Only these values are kept: the whole
        T x V matrix (fp32: 1.6 GB for 8k tokens of a 49k vocabulary) never exists."""
        assert seq.plps is not None and seq.params.prompt_logprobs is not None
        n, ids, d = seq.params.prompt_logprobs, seq.prompt, self.decode_ids
        nxt = torch.tensor(ids[pos + 1 : pos + 1 + len(logits)], dtype=torch.long)
        if len(nxt):  # the prompt's last position predicts no prompt token
            lp = torch.log_softmax(logits[: len(nxt)].float(), dim=-1)
            chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
            vals, top = torch.topk(lp, n) if n > 0 else (lp[:, :0], lp[:, :0].long())
            for t, c, vs, ts in zip(nxt.tolist(), chosen, vals.tolist(), top.tolist()):
                tops = [(d([i]), i, v) for i, v in zip(ts, vs)]
                seq.plps.append(TokenLogprob(d([t]), t, c, tops))
        return logits[-1].clone()  # only the prompt's last row samples; the chunk goes

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
        filling = self._filling
        if filling is not None and filling.handle.cancel_requested:
            self._filling = None
            self._finish(filling, "cancelled")

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
    """`int4`: the fast runner over 4-bit weights (`precision.choose` has checked that the
    kernel builds, passes its self-check and covers this model's family and widths)."""
    if getattr(model, "is_encoder_decoder", False) and not int4:
        return seq2seq.Seq2SeqRunner(model, batch, max_len, int8=int8)
    if (fast or int4) and supports(model):  # a plain fp32 Llama on the CPU
        calib = None
        if int8 or int4:  # int8's smoothing text (with int4, the vocabulary head stays int8)
            with torch.inference_mode():
                vocab = int(model.config.vocab_size)
                calib = [t for t in tokenizer.encode(CALIBRATION_TEXT) if t < vocab]
        return FastLlamaRunner(model, batch, max_len, int8=int8, int4=int4, kv_int8=kv_int8,
                               calibration_ids=calib)  # fmt: skip
    if int4:
        raise UserError(
            f"--precision int4 needs a Llama-family fp32 model on the CPU; this is "
            f"{type(model).__name__}",
            hint="use --precision int8",
        )
    return ModelRunner(model, batch, max_len, int8=int8)


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
