"""Grammar-constrained generation in the engine, on the tiny random llama (fp32).

A random model follows no format by itself, so everything it emits under a grammar being
valid is the grammar's doing: outputs must validate (jsonschema), end with "stop" exactly
where the grammar ends, and stay the same across n > 1 siblings, batching and preemption.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from openmini import LLM, SamplingParams
from openmini.sampling_params import JsonSchemaConstraint, StructuredOutputSpec
from openmini.structured.errors import StructuredOutputError

SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"},
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "tag": {"enum": ["alpha", "beta"]},
    "note": {"type": ["string", "null"], "maxLength": 6}},
    "required": ["ok", "n", "tag", "note"], "additionalProperties": False}
SPEC = StructuredOutputSpec(answer=JsonSchemaConstraint(json.dumps(SCHEMA)))


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama.hf_dir), dtype="float32", kv_cache_memory=32 << 20)


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 400, "structured_output": SPEC, **kw})


def test_every_output_validates_and_stops_where_the_grammar_ends(llm):
    outs = llm.generate(["hello", "Give me data", "x"],
                        _params(n=3, temperature=1.0, seed=7))
    eos = set(llm.get_tokenizer().eos_token_ids)
    for out in outs:
        assert len(out.outputs) == 3
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)
            # finished by the grammar, not by an EOS token
            assert c.token_ids[-1] not in eos
        assert len({c.text for c in out.outputs}) > 1  # siblings have their own state


def test_eos_is_allowed_only_where_the_grammar_can_end(llm):
    """Even a model that wants to stop at once (EOS at +100) writes the whole object."""
    bias = {i: 100.0 for i in llm.get_tokenizer().eos_token_ids}
    out = llm.generate(["hi"], _params(temperature=0, logit_bias=bias))[0].outputs[0]
    jsonschema.validate(json.loads(out.text), SCHEMA)
    # a free-text answer (tools in auto mode) may end at once
    from openmini.sampling_params import ToolCallConstraint
    tool = ToolCallConstraint("f", JsonSchemaConstraint('{"type": "object"}'))
    auto = StructuredOutputSpec(tools=(tool,))
    out = llm.generate(["hi"], _params(temperature=0, logit_bias=bias,
                                       structured_output=auto))[0].outputs[0]
    assert out.text == "" and out.finish_reason == "stop"


def test_seeded_grammar_output_is_the_same_alone_and_batched(llm):
    p = _params(temperature=0.8, seed=11)
    alone = llm.generate(["Give me data"], p)[0].outputs[0].text
    batch = llm.generate(["other prompt", "Give me data", "third"], p)
    assert batch[1].outputs[0].text == alone


def test_preemption_keeps_the_grammar_state(tiny_llama):
    """A KV pool so small that sequences are preempted and recomputed: same outputs."""
    prompts = [f"prompt number {i} " * 3 for i in range(6)]
    p = _params(temperature=0.9, seed=3, max_tokens=60)
    roomy = LLM(str(tiny_llama.hf_dir), dtype="float32", kv_cache_memory=32 << 20)
    tight = LLM(str(tiny_llama.hf_dir), dtype="float32", num_blocks=14, block_size=8)
    a = [o.outputs[0].text for o in roomy.generate(prompts, p)]
    b = [o.outputs[0].text for o in tight.generate(prompts, p)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert a == b


def test_uncompilable_spec_fails_before_queueing(llm):
    bad = StructuredOutputSpec(answer=JsonSchemaConstraint('{"not": {}}'))
    with pytest.raises(StructuredOutputError):
        llm.engine.add_request("bad-1", [1, 2, 3], _params(structured_output=bad))
    assert not llm.engine.has_unfinished_requests()


class _RejectingGrammar:
    """Allows every token but accepts none (a grammar/mask disagreement)."""

    def __init__(self, size):
        self.size = size

    def allowed_token_mask(self):
        return torch.ones(self.size, dtype=torch.bool)

    def accept_token(self, token_id):
        return False

    def is_terminated(self):
        return False


class _DeadGrammar(_RejectingGrammar):
    """A grammar in an error state: allows nothing."""

    error = "broken"

    def allowed_token_mask(self):
        return torch.zeros(self.size, dtype=torch.bool)


@pytest.mark.parametrize("grammar_cls", [_RejectingGrammar, _DeadGrammar])
def test_broken_grammar_aborts_only_its_request(llm, monkeypatch, grammar_cls):
    engine = llm.engine
    size = engine.model_config.vocab_size
    monkeypatch.setattr(engine.structured, "new_matcher", lambda spec, **kw: grammar_cls(size))
    engine.add_request("broken", [5, 6, 7], _params(temperature=0))
    engine.add_request("fine", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0))
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0]
    assert finals["broken"].finish_reason == "abort"
    assert finals["broken"].token_ids == []  # a rejected token is never appended
    assert finals["fine"].finish_reason == "length" and len(finals["fine"].token_ids) == 4
    assert engine.kv_manager.num_used_blocks == 0
