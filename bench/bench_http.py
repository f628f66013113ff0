"""HTTP serving speed: TTFT p50/p90 and decode tok/s per stream at 1, 4 and 16 concurrent
streams, OpenMini beside llama-cpp-python's OpenAI server on the same GGUF (when installed).

Both servers run as subprocesses on 127.0.0.1 with 2 threads; clients are the official
``openai`` AsyncOpenAI client streaming chat completions (temperature 0, same prompts, same
max_tokens). Runs alternate between the servers (A B A B ...) and medians are reported
(../shared/BENCH.md). llama-cpp-python's server handles one request at a time, so its
concurrent figures show queueing; llama.cpp's C++ llama-server is the stronger peer for
concurrency (figures in BENCH.md).

Usage: ``python bench/bench_http.py [--model NAME|PATH] [--runs 3] [--max-tokens 64]``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

LLAMA_SERVER = """
import sys, llama_cpp
orig = llama_cpp.llama_model_default_params
def no_extra_bufts():
    p = orig(); p.use_extra_bufts = False; return p
llama_cpp.llama_model_default_params = no_extra_bufts
from llama_cpp.server.__main__ import main
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start")


async def one_stream(client, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = None
    n = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], stream=True,
        temperature=0, max_tokens=max_tokens, stream_options={"include_usage": True})
    usage_tokens = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            n += 1
        if getattr(chunk, "usage", None):
            usage_tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    tokens = usage_tokens or n
    first = first or end
    rate = (tokens - 1) / (end - first) if tokens > 1 and end > first else float("nan")
    return first - t0, rate, tokens


async def run_level(base_url: str, model: str, conc: int, max_tokens: int) -> tuple[list, list]:
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=600)
    prompts = [f"Write a short story about a lighthouse keeper, variation {i}." for i in range(conc)]
    t0 = time.perf_counter()
    res = await asyncio.gather(*[one_stream(client, model, p, max_tokens) for p in prompts])
    wall = time.perf_counter() - t0
    await client.close()
    return [r[0] for r in res], [r[1] for r in res], sum(r[2] for r in res) / wall


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,4,16")
    args = ap.parse_args()
    from openmini.loaders.model_files import resolve_model
    path = str(resolve_model(args.model).path)
    levels = [int(x) for x in args.levels.split(",")]

    servers = {}
    port = free_port()
    servers["openmini"] = (subprocess.Popen(
        [sys.executable, "-m", "openmini.cli", "serve", "--model", path, "--port", str(port),
         "--num-threads", "2", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}")
    try:
        import llama_cpp.server  # noqa: F401
        port2 = free_port()
        servers["llama-cpp-python"] = (subprocess.Popen(
            [sys.executable, "-c", LLAMA_SERVER, "--model", path, "--port", str(port2),
             "--n_threads", "2", "--n_ctx", "8192", "--chat_format", "chatml"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port2}")
    except ImportError:
        print("# llama-cpp-python[server] not installed; OpenMini only", file=sys.stderr)
    results: dict[tuple[str, int], tuple[list, list, list]] = {}
    try:
        for name, (proc, url) in servers.items():
            wait_ready(url, proc)
            asyncio.run(run_level(url, "gpt-4.1-mini", 1, 8))  # warm-up
        for run in range(args.runs):
            for conc in levels:
                for name, (proc, url) in servers.items():
                    ttft, rate, agg = asyncio.run(
                        run_level(url, "gpt-4.1-mini", conc, args.max_tokens))
                    acc = results.setdefault((name, conc), ([], [], []))
                    acc[0].extend(ttft)
                    acc[1].extend(rate)
                    acc[2].append(agg)
            print(f"# run {run + 1} done", file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)

    print(f"\n## {datetime.date.today()} - HTTP, {os.cpu_count()} CPUs, 2 threads, "
          f"{os.path.basename(path)}, max_tokens {args.max_tokens}, {args.runs} runs\n")
    print("| server | streams | TTFT p50 s | TTFT p90 s | tok/s per stream (median) | aggregate tok/s |")
    print("|---|---|---|---|---|---|")
    for conc in levels:
        for name in servers:
            ttft, rate, agg = results[(name, conc)]
            med = statistics.median([r for r in rate if r == r])
            print(f"| {name} | {conc} | {pct(ttft, .5):.2f} | {pct(ttft, .9):.2f} | {med:.1f} | "
                  f"{statistics.median(agg):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
