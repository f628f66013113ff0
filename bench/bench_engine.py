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
import resource
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


def rss_child(model: str, threads: int) -> None:
    """Child mode: load like `openmini serve` (1 GiB KV pool), run 16 streams, print peak RSS."""
    side = OpenMiniSide(model, threads, "auto")
    prompts = [side.tokenizer.encode(f"Story number {i}: once upon a time") for i in range(16)]
    side.multi(prompts, 64)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.model, args.threads)
        return 0

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

    child = subprocess.run([sys.executable, __file__, "--rss-child", "--model", path,
                            "--threads", str(args.threads)], capture_output=True, text=True)
    rss = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mib"] if \
        child.returncode == 0 else float("nan")

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
    print(f"| peak RSS MiB, 1 GiB KV pool, 16 streams | {rss:.0f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
