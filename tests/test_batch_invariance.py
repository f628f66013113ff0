"""Batch invariance of the default (quantized, native-kernel) mode on a tiny random model.

A request must get bit-identical logprobs whatever shares its steps: alone, batched with
more than 16 other decoding sequences (decode rows above the old GEMM switch), and in mixed
steps where new prompts (short ones under 17 rows and long ones) are prefilled while it
decodes. Reference: the same request run alone on the same engine.
"""

from __future__ import annotations

import random

import pytest

from openmini import LLM, SamplingParams
from openmini.models.quantization import NativeKernels

pytestmark = pytest.mark.skipif(NativeKernels.load() is None, reason="native kernels unavailable")


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3)


def _trace(output) -> list:
    """Token ids and every logprob value (chosen and top alternatives) of one completion."""
    out = output.outputs[0]
    return [out.token_ids, [sorted(d.items()) if isinstance(d, dict) else d for d in out.logprobs]]


def test_default_mode_is_batch_invariant(tiny_llama):
    llm = LLM(str(tiny_llama.hf_dir), dtype="auto", max_model_len=2048, num_blocks=512,
              max_num_batched_tokens=256, max_num_seqs=64)
    assert llm.engine.model.native_kernels
    engine, vocab = llm.engine, tiny_llama.vocab_size
    prompts = {f"r{i}": _prompt(vocab, [5, 12, 40, 300][i % 4] + i, seed=i) for i in range(24)}

    alone = {}
    for rid, ids in prompts.items():
        alone[rid] = _trace(llm.generate({"prompt_token_ids": ids}, _params(12))[0])

    # staggered arrivals: prefills of new requests share steps with 17+ decoding sequences
    finished = {}
    pending = list(prompts.items())
    step = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(3 if step % 2 == 0 else 0):
            if pending:
                rid, ids = pending.pop(0)
                engine.add_request(rid, ids, _params(12))
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = _trace(out)
        step += 1
    assert sorted(finished) == sorted(prompts)
    for rid in prompts:
        assert finished[rid] == alone[rid], rid
    engine.kv_manager.check_invariants()
