"""Engine speed beside llama.cpp on the same GGUF, interleaved in one script.

Measures (../shared/BENCH.md): batch-1 decode tok/s, prefill tok/s on a 2k-token prompt,
aggregate decode tok/s at 16 concurrent sequences, and peak RSS of a process that serves
the model with a 1 GiB KV pool. The peer is llama.cpp through llama-cpp-python (optional
extra ``bench``), loaded with extra buffer types off (its AMX repacking path crashes on
this CPU), on the same file, prompt tokens, thread count, greedy, same max tokens.

Usage: ``python bench/bench_engine.py [--model NAME|PATH] [--runs 5] [--threads 2]``.
Prints a Markdown table (medians over runs after a warm-up, with min..max spread).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _fmt(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.1f} ({min(values):.1f}..{max(values):.1f})"


class OpenMiniSide:
    """Drives ``openmini.Engine`` step by step to separate prefill and decode time."""

    name = "openmini"

    def __init__(self, model: str, threads: int, dtype: str):
        from openmini import LLM
        self.llm = LLM(model=model, dtype=dtype, num_threads=threads, max_num_seqs=32,
                       max_num_batched_tokens=2048)
        self.engine = self.llm.engine
        self.tokenizer = self.engine.tokenizer
        self._n = 0

    def _rid(self) -> str:
        self._n += 1
        return f"b{self._n}"

    def prefill(self, ids: list[int]) -> float:
        from openmini import SamplingParams
        self.engine.kv_manager.reset_prefix_cache()
        self.engine.add_request(self._rid(), ids, SamplingParams(temperature=0, max_tokens=1))
        t0 = time.perf_counter()
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return len(ids) / (time.perf_counter() - t0)

    def decode(self, ids: list[int], n: int) -> float:
        from openmini import SamplingParams
        self.engine.add_request(self._rid(), ids, SamplingParams(
            temperature=0, max_tokens=n, ignore_eos=True))
        self.engine.step()  # prefill + first token
        t0 = time.perf_counter()
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return (n - 1) / (time.perf_counter() - t0)

    def multi(self, prompts: list[list[int]], n: int) -> float:
        from openmini import SamplingParams
        for ids in prompts:
            self.engine.add_request(self._rid(), ids, SamplingParams(
                temperature=0, max_tokens=n, ignore_eos=True))
        t0 = time.perf_counter()
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return len(prompts) * n / (time.perf_counter() - t0)


class LlamaCppSide:
    """llama.cpp via llama-cpp-python, extra buffer types off (see BENCH.md)."""

    name = "llama.cpp"

    def __init__(self, path: str, threads: int, n_ctx: int = 4096):
        import llama_cpp
        orig = llama_cpp.llama_model_default_params

        def no_extra_bufts():
            p = orig()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_model_default_params = no_extra_bufts
        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, verbose=False)

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t0)

    def decode(self, ids: list[int], n: int) -> float:
        self.llm.reset()
        gen = self.llm.generate(ids, top_k=1, temp=0.0, reset=True)
        next(gen)
        t0 = time.perf_counter()
        for i, _ in enumerate(gen, start=2):
            if i >= n:
                break
        return (n - 1) / (time.perf_counter() - t0)


def resolve_gguf(model: str) -> str:
    from openmini.loaders.model_files import resolve_model
    src = resolve_model(model)
    if src.kind != "gguf":
        raise SystemExit("llama.cpp needs a GGUF model")
    return str(src.path)


def serve_peak_rss(model: str, threads: int, prompt_ids: list[int]) -> float:
    """Peak RSS (MiB, the kernel's ``VmHWM``) of a real ``openmini serve`` process with a
    1 GiB KV pool after 16 concurrent streams and one long prompt over HTTP."""
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "openmini.cli", "serve", "--model", model, "--port", str(port),
           "--kv-cache-memory", "1GiB", "--num-threads", str(threads), "--data-dir",
           os.path.join(os.environ.get("TMPDIR", "/tmp"), f"openmini-bench-{port}")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def post(body: dict) -> None:
        req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=1800).read()

    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("openmini serve did not start") from None
                time.sleep(1)
        bodies = [{"model": "gpt-4.1-mini", "prompt": f"Story number {i}: once upon a time",
                   "max_tokens": 64, "temperature": 0} for i in range(16)]
        bodies.append({"model": "gpt-4.1-mini", "prompt": prompt_ids, "max_tokens": 8})
        with ThreadPoolExecutor(len(bodies)) as pool:
            list(pool.map(post, bodies))
        with open(f"/proc/{proc.pid}/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 1024
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    path = resolve_gguf(args.model)
    ours = OpenMiniSide(path, args.threads, args.dtype)
    tok = ours.tokenizer
    text = open(__file__).read() * 20
    long_ids = tok.encode(text)[: args.prefill_tokens]
    short_ids = tok.encode("The history of the printing press begins")
    prompts = [tok.encode(f"Write a story about topic number {i}.") for i in range(args.streams)]
    try:
        peer = LlamaCppSide(path, args.threads)
    except Exception as exc:  # not installed
        print(f"# llama-cpp-python unavailable ({exc!r}); OpenMini only", file=sys.stderr)
        peer = None

    results: dict[str, dict[str, list[float]]] = {"openmini": {}, "llama.cpp": {}}
    sides = [ours] + ([peer] if peer else [])
    for run in range(args.runs + 1):  # run 0 is the warm-up
        for side in sides:
            r = {
                "decode": side.decode(short_ids, args.decode_tokens),
                "prefill": side.prefill(long_ids),
            }
            if isinstance(side, OpenMiniSide):
                r["multi"] = side.multi(prompts, args.decode_tokens)
            if run:
                for k, v in r.items():
                    results[side.name].setdefault(k, []).append(v)
        print(f"# run {run} done", file=sys.stderr)

    try:
        rss = serve_peak_rss(path, args.threads, long_ids)
    except (RuntimeError, OSError) as exc:
        print(f"# RSS measurement failed: {exc}", file=sys.stderr)
        rss = float("nan")

    o, p = results["openmini"], results["llama.cpp"]
    print(f"\n## {datetime.date.today()} - {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {args.threads} threads, model {os.path.basename(path)}, "
          f"dtype {args.dtype}, {args.runs} runs (median, min..max)\n")
    print("| metric | OpenMini | llama.cpp | ratio |")
    print("|---|---|---|---|")
    for key, label in [("decode", f"batch-1 decode tok/s ({args.decode_tokens} tokens)"),
                       ("prefill", f"prefill tok/s ({len(long_ids)}-token prompt)")]:
        ratio = statistics.median(o[key]) / statistics.median(p[key]) if key in p else None
        print(f"| {label} | {_fmt(o[key])} | {_fmt(p[key]) if key in p else 'n/a'} | "
              f"{f'{ratio:.2f}x' if ratio else 'n/a'} |")
    print(f"| aggregate decode tok/s, {args.streams} sequences | {_fmt(o['multi'])} | "
          f"~130 (llama-server -np 16, BENCH.md) | "
          f"{statistics.median(o['multi']) / 130:.2f}x |")
    print(f"| peak RSS MiB of `openmini serve`, 1 GiB KV pool, 16 streams + a "
          f"{len(long_ids)}-token prompt | {rss:.0f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
