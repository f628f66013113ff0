"""Engine acceptance on tiny random models (fp32 mode): loading -> logits vs transformers,
batched == alone, prefix cache, chunked prefill, preemption, seeds, abort, n > 1, AsyncEngine.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from openmini import LLM, SamplingParams
from openmini.config import EngineConfig, CacheConfig, SchedulerConfig
from openmini.engine.async_engine import AsyncEngine
from openmini.engine.engine import Engine
from openmini.loaders.model_files import load_model_files
from openmini.models.attention import AttentionMetadata, allocate_kv_cache
from openmini.models.registry import build_model


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _our_logits(path, ids: list[int]) -> torch.Tensor:
    files = load_model_files(str(path))
    model = build_model(files.config, "float32")
    model.load_weights(files.weights())
    bs = 16
    nblocks = -(-len(ids) // bs)
    kv = allocate_kv_cache(files.config, nblocks + 1, bs, model.kv_dtype)
    table = list(range(nblocks, 0, -1))  # non-contiguous, reversed block ids
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [table], bs, device=torch.device("cpu"))
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), meta, kv)
        return model.compute_logits(hidden)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("fmt", ["safetensors", "f32", "f16", "q8_0"])
def test_loaded_logits_match_transformers(arch, fmt, request):
    """Logits of our model loaded from each file format equal transformers' on the same file."""
    tiny = request.getfixturevalue(f"tiny_{arch}")
    ids = _prompt(tiny.vocab_size, 40, seed=1)
    if fmt == "safetensors":
        path, ref_model = tiny.hf_dir, tiny.model
    else:
        from transformers import AutoModelForCausalLM
        path = tiny.gguf_path(fmt)
        ref_model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    ref_model.eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    ours = _our_logits(path, ids)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama.hf_dir), dtype="float32", max_model_len=8192, num_blocks=1024,
               max_num_batched_tokens=8192)


def _greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_batched_equals_alone(llm, tiny_llama):
    prompts = [_prompt(tiny_llama.vocab_size, 5 + 7 * i, seed=i) for i in range(8)]
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(24))
    for p, out in zip(prompts, together):
        alone = llm.generate({"prompt_token_ids": p}, _greedy(24))[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == 24


def test_prefix_cache_hits_and_same_output(tiny_llama):
    vocab = tiny_llama.vocab_size
    prefix = _prompt(vocab, 1000, seed=3)
    a = prefix + _prompt(vocab, 20, seed=4)
    b = prefix + _prompt(vocab, 25, seed=5)
    results = {}
    for caching in (True, False):
        llm = LLM(str(tiny_llama.hf_dir), dtype="float32", enable_prefix_caching=caching,
                  num_blocks=512)
        first = llm.generate({"prompt_token_ids": a}, _greedy(8))[0]
        second = llm.generate({"prompt_token_ids": b}, _greedy(8))[0]
        results[caching] = (first, second)
        llm.engine.kv_manager.check_invariants()
    on_first, on_second = results[True]
    assert on_first.num_cached_tokens == 0
    assert on_second.num_cached_tokens >= 960
    assert results[False][1].num_cached_tokens == 0
    assert on_second.outputs[0].token_ids == results[False][1].outputs[0].token_ids
    assert on_first.outputs[0].token_ids == results[False][0].outputs[0].token_ids


def test_chunked_prefill_matches_unchunked(tiny_llama):
    ids = _prompt(tiny_llama.vocab_size, 6000, seed=7)
    outs = []
    for budget in (512, 8192):
        llm = LLM(str(tiny_llama.hf_dir), dtype="float32", max_model_len=8192,
                  max_num_batched_tokens=budget, num_blocks=400, enable_prefix_caching=False)
        outs.append(llm.generate({"prompt_token_ids": ids}, _greedy(16))[0].outputs[0].token_ids)
    assert outs[0] == outs[1]
    assert len(outs[0]) == 16


def test_preemption_all_finish_correctly(tiny_llama):
    vocab = tiny_llama.vocab_size
    prompts = [_prompt(vocab, 60 + i, seed=100 + i) for i in range(16)]
    params = _greedy(80)
    big = LLM(str(tiny_llama.hf_dir), dtype="float32", num_blocks=2048)
    expected = [o.outputs[0].token_ids for o in big.generate(
        [{"prompt_token_ids": p} for p in prompts], params)]
    # each request needs ~9 blocks of 16 tokens; 40 blocks hold only a few at once
    small = LLM(str(tiny_llama.hf_dir), dtype="float32", num_blocks=40)
    got = small.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in got] == expected
    assert small.engine.scheduler.num_preemptions > 0
    km = small.engine.kv_manager
    km.check_invariants()
    assert km.num_used_blocks == 0
    assert km.num_free_blocks == 40


def test_seeds(llm, tiny_llama):
    vocab = tiny_llama.vocab_size
    p = _prompt(vocab, 12, seed=11)
    others = [_prompt(vocab, 9 + i, seed=20 + i) for i in range(5)]

    def params(seed):
        return SamplingParams(temperature=1.0, max_tokens=20, seed=seed, ignore_eos=True)

    alone = llm.generate({"prompt_token_ids": p}, params(42))[0].outputs[0].token_ids
    again = llm.generate({"prompt_token_ids": p}, params(42))[0].outputs[0].token_ids
    batch = llm.generate([{"prompt_token_ids": q} for q in others[:2]] + [{"prompt_token_ids": p}]
                         + [{"prompt_token_ids": q} for q in others[2:]],
                         [params(1), params(2), params(42), params(3), params(4), params(5)])
    assert alone == again
    assert batch[2].outputs[0].token_ids == alone
    other_seed = llm.generate({"prompt_token_ids": p}, params(7))[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples_share_prompt_blocks(llm, tiny_llama):
    p = _prompt(tiny_llama.vocab_size, 100, seed=31)
    out = llm.generate({"prompt_token_ids": p},
                       SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10,
                                      ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    seqs = {tuple(c.token_ids) for c in out.outputs}
    assert len(seqs) > 1
    pc = llm.engine.kv_manager.prefix_cache_stats
    assert pc.hits >= 2 * 96  # siblings 1 and 2 reuse the prompt's 6 full blocks


def test_abort_mid_generation_frees_blocks(tiny_llama):
    llm = LLM(str(tiny_llama.hf_dir), dtype="float32", num_blocks=256)
    eng = llm.engine
    eng.add_request("a", _prompt(tiny_llama.vocab_size, 50, seed=1), _greedy(200))
    eng.add_request("b", _prompt(tiny_llama.vocab_size, 70, seed=2), _greedy(5))
    for _ in range(8):
        eng.step()
    assert eng.kv_manager.get_block_ids("a")
    out = eng.abort_request("a")
    assert out is not None and out.finished and out.outputs[0].finish_reason == "abort"
    assert eng.kv_manager.get_block_ids("a") == []
    while eng.has_unfinished_requests():
        eng.step()
    eng.kv_manager.check_invariants()
    assert eng.kv_manager.num_used_blocks == 0


def test_stop_string_and_max_tokens(llm, tiny_llama):
    p = _prompt(tiny_llama.vocab_size, 10, seed=41)
    full = llm.generate({"prompt_token_ids": p}, _greedy(30))[0].outputs[0]
    assert full.finish_reason == "length"
    text = full.text
    if len(text) < 6:
        pytest.skip("tiny model produced too little text")
    stop = text[3:6]
    out = llm.generate({"prompt_token_ids": p}, SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.text == text[:text.index(stop)]


def test_async_engine_stream_and_abort(tiny_llama):
    cfg = EngineConfig(model=str(tiny_llama.hf_dir), dtype="float32",
                       cache=CacheConfig(num_blocks=128),
                       scheduler=SchedulerConfig(max_num_seqs=8))
    eng = AsyncEngine(Engine(cfg))
    vocab = tiny_llama.vocab_size

    async def run():
        texts = []
        async for out in eng.generate(_prompt(vocab, 20, seed=1), _greedy(12), "r1"):
            texts.append(out.outputs[0].delta_text)
            last = out
        assert last.finished and last.outputs[0].finish_reason == "length"
        assert "".join(texts) == last.outputs[0].text
        assert len(last.outputs[0].token_ids) == 12
        # a consumer that walks away aborts its request
        agen = eng.generate(_prompt(vocab, 20, seed=2), _greedy(2000), "r2")
        await agen.__anext__()
        await agen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if eng.engine.kv_manager.num_used_blocks == 0 and not eng.engine.has_unfinished_requests():
                break
        assert eng.engine.kv_manager.num_used_blocks == 0

    try:
        asyncio.run(run())
    finally:
        eng.shutdown()
