"""Engine-side post-processing: incremental detokenization, stop strings, output deltas.

Runs on the engine thread right after ``Scheduler.update_from_output`` (step 9 of the
request's life in docs/architecture.md). A matched stop string finishes the sequence in
the scheduler at once, so no further tokens are generated for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openmini.engine.request import Request, RequestStatus
from openmini.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from openmini.tokenizer.detokenizer import IncrementalDetokenizer
from openmini.tokenizer.tokenizer import Tokenizer


@dataclass
class _SeqState:
    """Per-sequence progress seen by the caller."""

    detok: IncrementalDetokenizer
    text: str = ""
    num_tokens_seen: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class _ParentState:
    """One caller request: its ``n`` sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Request]
    states: list[_SeqState] = field(default_factory=list)


class OutputProcessor:
    """Builds ``RequestOutput`` deltas for changed sequences.

    Args:
        tokenizer: used for detokenization and for logprob token texts.
        finish: callback ``(seq_request_ids, status)`` that finishes sequences in the
            scheduler (used when a stop string matches).
    """

    def __init__(self, tokenizer: Tokenizer, finish):
        self.tokenizer = tokenizer
        self._finish = finish
        self._parents: dict[str, _ParentState] = {}
        self._parent_of: dict[str, str] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            seqs: list[Request]) -> None:
        """Start tracking a caller request and its sequences."""
        params = seqs[0].sampling_params
        parent = _ParentState(request_id, prompt, prompt_token_ids, seqs)
        for seq in seqs:
            detok = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output)
            parent.states.append(_SeqState(
                detok, logprobs=[] if params.logprobs is not None else None))
            self._parent_of[seq.request_id] = request_id
        self._parents[request_id] = parent

    def seq_ids(self, request_id: str) -> list[str]:
        """Sequence ids of a tracked caller request (empty if unknown)."""
        parent = self._parents.get(request_id)
        return [s.request_id for s in parent.seqs] if parent else []

    def has(self, request_id: str) -> bool:
        return request_id in self._parents

    def process(self, changed: list[Request]) -> list[RequestOutput]:
        """Turn the scheduler's changed sequences into one delta output per caller request.

        Args:
            changed: sequences that got a token and/or finished this step (any order).

        Returns:
            RequestOutputs for the caller requests that changed; finished ones are
            forgotten after this call.
        """
        touched: dict[str, dict[int, CompletionOutput]] = {}
        for seq in changed:
            parent_id = self._parent_of.get(seq.request_id)
            if parent_id is None:
                continue
            parent = self._parents[parent_id]
            delta = self._advance(parent, seq)
            if delta is not None:
                touched.setdefault(parent_id, {})[seq.index] = delta
        outputs = []
        for parent_id, deltas in touched.items():
            parent = self._parents[parent_id]
            outputs.append(self._build(parent, deltas))
        return outputs

    def _advance(self, parent: _ParentState, seq: Request) -> CompletionOutput | None:
        state = parent.states[seq.index]
        if state.finish_reason is not None:
            return None
        new_ids = seq.output_token_ids[state.num_tokens_seen:]
        state.num_tokens_seen = seq.num_output_tokens
        delta_text = ""
        delta_lp: list[TokenLogprobs] | None = None
        if new_ids:
            d = state.detok.add_tokens(new_ids)
            delta_text = d.text
            if d.stop_matched is not None:
                state.finish_reason = "stop"
                state.stop_reason = d.stop_matched
                if not seq.is_finished:
                    self._finish([seq.request_id], RequestStatus.FINISHED_STOPPED)
        if state.finish_reason is None and seq.is_finished:
            delta_text += state.detok.flush()
            state.finish_reason = seq.finish_reason
            state.stop_reason = seq.stop_reason
        if state.logprobs is not None and seq.logprobs is not None:
            start = len(state.logprobs)
            delta_lp = [self._decorate(lp) for lp in seq.logprobs[start:]]
            state.logprobs.extend(delta_lp)
        state.text += delta_text
        return CompletionOutput(
            index=seq.index, text=state.text, token_ids=list(seq.output_token_ids),
            finish_reason=state.finish_reason, stop_reason=state.stop_reason,
            logprobs=state.logprobs, delta_text=delta_text, delta_token_ids=new_ids,
            delta_logprobs=delta_lp)

    def _decorate(self, lp: TokenLogprobs) -> TokenLogprobs:
        """Fill in token texts for logprobs."""
        for item in [lp.sampled, *lp.top]:
            if not item.decoded:
                item.decoded = self.tokenizer.decode([item.token_id], skip_special_tokens=False)
        return lp

    def _build(self, parent: _ParentState, deltas: dict[int, CompletionOutput]) -> RequestOutput:
        completions = []
        for i, state in enumerate(parent.states):
            if i in deltas:
                completions.append(deltas[i])
            else:
                completions.append(CompletionOutput(
                    index=i, text=state.text,
                    token_ids=list(parent.seqs[i].output_token_ids),
                    finish_reason=state.finish_reason, stop_reason=state.stop_reason,
                    logprobs=state.logprobs))
        finished = all(s.finish_reason is not None for s in parent.states)
        cached = max(parent.seqs[0].num_cached_tokens, 0)
        out = RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids,
                            num_cached_tokens=cached, outputs=completions, finished=finished)
        if finished:
            self.forget(parent.request_id)
        return out

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark every unfinished sequence of a caller request aborted; return the final output."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        deltas = {}
        for i, state in enumerate(parent.states):
            if state.finish_reason is None:
                state.finish_reason = "abort"
                deltas[i] = CompletionOutput(
                    index=i, text=state.text, token_ids=list(parent.seqs[i].output_token_ids),
                    finish_reason="abort", logprobs=state.logprobs)
        return self._build(parent, deltas)

    def forget(self, request_id: str) -> None:
        parent = self._parents.pop(request_id, None)
        if parent:
            for seq in parent.seqs:
                self._parent_of.pop(seq.request_id, None)
