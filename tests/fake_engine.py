"""A small deterministic ``EngineClient`` for API-layer tests that need control over timing.

Byte-level tokenizer (token id = one UTF-8 byte; 256 = ``<|im_start|>``, 257 =
``<|im_end|>`` = EOS), a ChatML-like template, and replies that are a pure function of
(prompt, temperature, seed, completion index). Multi-byte characters span several tokens,
so delta text is produced with an incremental UTF-8 decoder, as the real engine does.
"""

from __future__ import annotations

import asyncio
import codecs
import random
from dataclasses import dataclass, field

from openmini.config import ModelConfig
from openmini.engine.errors import ContextLengthExceededError
from openmini.engine.protocol import EngineStats
from openmini.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from openmini.sampling_params import SamplingParams

IM_START, IM_END = 256, 257
_WORDS = ("cat", "dog", "owl", "fox", "bee", "elk", "yak", "emu", "ant", "koi", "霓虹", "🦊")


class FakeTokenizer:
    """Bytes as tokens plus two special tokens."""

    vocab_size = 258
    eos_token_ids = (IM_END,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        if token_id == IM_START:
            return b"<|im_start|>"
        if token_id == IM_END:
            return b"<|im_end|>"
        return bytes([token_id])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.token_bytes(i) for i in ids
                        if i < 256 or not skip_special_tokens).decode("utf-8", "replace")


class FakeChatTemplate:
    """ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message; content as bytes."""

    def __init__(self, tokenizer: FakeTokenizer):
        self.tok = tokenizer

    def render_ids(self, messages, tools=None, add_generation_prompt=True) -> list[int]:
        ids: list[int] = []
        for m in messages:
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"unsupported role {m['role']}")
            ids += [IM_START] + self.tok.encode(f"{m['role']}\n{m.get('content') or ''}")
            ids += [IM_END] + self.tok.encode("\n")
        if add_generation_prompt:
            ids += [IM_START] + self.tok.encode("assistant\n")
        return ids


@dataclass
class _Seq:
    reply: bytes
    pos: int = 0
    decoder: object = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")())
    text: str = ""            # emitted text
    pending: str = ""         # decoded but held back (may start a stop string)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None


class FakeEngine:
    """Implements ``EngineClient``; one token per sequence per step.

    Args:
        max_model_len: the context window in tokens.
        step_delay: seconds each step sleeps (0 = just yield to the event loop).
        endless: replies never end with EOS (they run to ``max_tokens``).
    """

    def __init__(self, max_model_len: int = 4096, step_delay: float = 0.0,
                 endless: bool = False):
        self.tokenizer = FakeTokenizer()
        self.chat_template = FakeChatTemplate(self.tokenizer)
        self.model_config = ModelConfig(
            architecture="fake", vocab_size=258, hidden_size=8, intermediate_size=8,
            num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=max_model_len, eos_token_ids=(IM_END,), name="fake")
        self.max_model_len = max_model_len
        self.step_delay = step_delay
        self.endless = endless
        self.active: dict[str, int] = {}      # request id -> tokens held (prompt + output)
        self.aborted: set[str] = set()
        self.seen_prompts: list[list[int]] = []
        self.num_requests = 0

    # -- EngineClient ---------------------------------------------------------------------

    def reply_for(self, prompt_ids: list[int], params: SamplingParams, index: int) -> bytes:
        """The full reply (before stop strings / max_tokens) of completion ``index``."""
        if params.temperature < 1e-5:
            tail = bytes(t for t in prompt_ids[-40:] if t < 256).decode("utf-8", "replace")
            return f"Echo of {len(prompt_ids)} tokens: {tail.strip()} The end.".encode()
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        rng = random.Random(f"{seed}|{index}|{bytes(t for t in prompt_ids if t < 256)!r}")
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))).encode()

    async def generate(self, prompt_token_ids, sampling_params, request_id, prompt=None):
        p = sampling_params
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("The prompt is empty.")
        if n_prompt >= self.max_model_len:
            raise ContextLengthExceededError(n_prompt, 0, self.max_model_len)
        max_tokens = p.max_tokens if p.max_tokens is not None else self.max_model_len - n_prompt
        if n_prompt + max_tokens > self.max_model_len:
            raise ContextLengthExceededError(n_prompt, max_tokens, self.max_model_len)
        cached = self._cached(prompt_token_ids)
        self.seen_prompts.append(list(prompt_token_ids))
        self.num_requests += 1
        seqs = [_Seq(self.reply_for(prompt_token_ids, p, i),
                     logprobs=[] if p.logprobs is not None else None) for i in range(p.n)]
        self.active[request_id] = n_prompt
        try:
            while True:
                await asyncio.sleep(self.step_delay)
                if request_id in self.aborted:
                    return
                outs = [self._step(i, s, p, max_tokens) for i, s in enumerate(seqs)]
                self.active[request_id] = n_prompt + max(len(s.token_ids) for s in seqs)
                finished = all(s.finish_reason for s in seqs)
                yield RequestOutput(request_id, prompt, list(prompt_token_ids), cached, outs,
                                    finished)
                if finished:
                    return
        finally:
            self.active.pop(request_id, None)
            self.aborted.discard(request_id)

    def abort(self, request_id: str) -> None:
        if request_id in self.active:
            self.aborted.add(request_id)

    def stats(self) -> EngineStats:
        used = sum(-(-t // 16) for t in self.active.values())
        return EngineStats(num_running=len(self.active), kv_blocks_used=used,
                           kv_blocks_total=1000)

    # -- internals ------------------------------------------------------------------------

    def _cached(self, ids: list[int]) -> int:
        best = 0
        for old in self.seen_prompts:
            k = 0
            while k < min(len(old), len(ids)) - 1 and old[k] == ids[k]:
                k += 1
            best = max(best, k // 16 * 16)
        return best

    def _step(self, idx: int, s: _Seq, p: SamplingParams, max_tokens: int) -> CompletionOutput:
        if s.finish_reason is not None:
            return CompletionOutput(idx, s.text, list(s.token_ids), s.finish_reason,
                                    logprobs=s.logprobs)
        if self.endless:
            tok = s.reply[s.pos % len(s.reply)]
        else:
            tok = s.reply[s.pos] if s.pos < len(s.reply) else IM_END
        s.pos += 1
        s.token_ids.append(tok)
        lp = None
        if s.logprobs is not None:
            top = [Logprob((tok + k) % 256, -0.1 * (k + 1)) for k in range(p.logprobs or 0)]
            lp = [TokenLogprobs(Logprob(tok, -0.1), top)]
            s.logprobs.extend(lp)
        before = s.text
        if tok == IM_END:
            s.finish_reason = "stop"
            s.text += s.pending
            s.pending = ""
        else:
            s.pending += s.decoder.decode(bytes([tok]))
            hit = [st for st in p.stop if st in s.pending]
            if hit:
                cut = min(s.pending.index(st) for st in hit)
                s.text += s.pending[:cut]
                s.pending = ""
                s.finish_reason = "stop"
            else:
                hold = max((k for st in p.stop for k in range(1, len(st))
                            if s.pending.endswith(st[:k])), default=0)
                emit = len(s.pending) - hold
                s.text += s.pending[:emit]
                s.pending = s.pending[emit:]
                if len(s.token_ids) >= max_tokens:
                    s.text += s.pending
                    s.pending = ""
                    s.finish_reason = "length"
        return CompletionOutput(idx, s.text, list(s.token_ids), s.finish_reason,
                                logprobs=s.logprobs, delta_text=s.text[len(before):],
                                delta_token_ids=[tok], delta_logprobs=lp)
