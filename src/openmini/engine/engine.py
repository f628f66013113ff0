"""The synchronous engine: ``step()`` = schedule -> run -> sample -> update -> outputs.

Reads top to bottom like nano-vllm's step, with vLLM v1's scheduler output (a plain
``{request: num_scheduled_tokens}`` list), so prefill, chunked prefill, decode and
prefix-cache hits are one mechanism.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from openmini.config import EngineConfig, ModelConfig, SchedulerConfig
from openmini.engine.errors import ContextLengthExceededError
from openmini.engine.kv_cache_manager import KVCacheManager, num_blocks_from_memory
from openmini.engine.memory import trim_process_heap
from openmini.engine.model_runner import ModelRunner
from openmini.engine.output_processor import OutputProcessor
from openmini.engine.protocol import EngineStats
from openmini.engine.request import Request, RequestStatus
from openmini.engine.sampler import NoAllowedTokenError, Sampler
from openmini.engine.scheduler import Scheduler
from openmini.loaders.model_files import ModelFiles, load_model_files
from openmini.models.attention import kv_cache_bytes_per_block
from openmini.models.registry import build_model
from openmini.outputs import RequestOutput
from openmini.sampling_params import SamplingParams
from openmini.structured.llguidance_backend import LLGuidanceBackend
from openmini.tokenizer.chat_template import ChatTemplate
from openmini.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def openmini_home() -> Path:
    """``$OPENMINI_HOME`` or ``~/.cache/openmini``."""
    return Path(os.environ.get("OPENMINI_HOME") or Path.home() / ".cache" / "openmini")


def load_tokenizer(files: ModelFiles) -> Tokenizer:
    """Build the tokenizer from the model's own files (GGUF metadata or tokenizer.json).

    A GGUF tokenizer conversion is cached under ``$OPENMINI_HOME/tokenizers/<key>``, where
    the key hashes the file's absolute path, size and mtime.
    """
    src = files.source
    if src.kind == "gguf":
        st = Path(src.path).stat()
        key = hashlib.sha256(f"{Path(src.path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
                             .encode()).hexdigest()[:16]
        return Tokenizer.from_gguf(src.path, cache_dir=openmini_home() / "tokenizers" / key)
    return Tokenizer.from_hf_dir(src.path)


class Engine:
    """Owns model, KV pool, scheduler, sampler and output processing. Not thread-safe:
    ``AsyncEngine`` drives it from one thread.

    Args:
        config: model name/path, dtype mode, cache and scheduler limits.

    Raises:
        FileNotFoundError / ValueError: model files missing or unsupported.
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        t0 = time.perf_counter()
        files = load_model_files(config.model)
        self.model_files = files
        self.model_config: ModelConfig = files.config
        self.tokenizer = load_tokenizer(files)
        self.chat_template = ChatTemplate(self.tokenizer.chat_template, self.tokenizer)
        dtype_mode = "float32" if config.dtype in ("float32", "fp32") else "auto"
        self.model = build_model(self.model_config, dtype_mode)
        self.model.load_weights(files.weights())
        self.model.eval()
        trim_process_heap()  # the float32 copies made while loading: ~250 MiB of RSS

        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        cache_cfg = config.cache
        if cache_cfg.num_blocks:
            num_blocks = cache_cfg.num_blocks
        else:
            per_block = kv_cache_bytes_per_block(self.model_config, cache_cfg.block_size,
                                                 self.model.kv_dtype)
            num_blocks = num_blocks_from_memory(cache_cfg.kv_cache_memory, per_block)
        self.kv_manager = KVCacheManager(num_blocks, cache_cfg.block_size,
                                         cache_cfg.enable_prefix_caching)
        sched_cfg = SchedulerConfig(
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_model_len=self.max_model_len,
            prefill_chunk_size=config.scheduler.prefill_chunk_size)
        self.scheduler = Scheduler(sched_cfg, self.kv_manager)
        self.runner = ModelRunner(self.model, self.model_config, cache_cfg, num_blocks)
        self.sampler = Sampler(self.tokenizer.vocab_size, base_seed=config.seed)
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler.finish_requests)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(
            self.model_config.eos_token_ids)
        self.num_blocks = num_blocks
        #: grammar backend for ``SamplingParams.structured_output``; its token view is
        #: built now (~0.5 s for a 150k vocabulary) so no request waits for it later
        self.structured = LLGuidanceBackend(self.tokenizer, self.model_config.vocab_size,
                                            self.eos_token_ids)
        self.structured.ll_tokenizer()
        logger.info("loaded %s (%s) in %.1fs: %d KV blocks of %d tokens",
                    config.model, self.model_config.architecture, time.perf_counter() - t0,
                    num_blocks, cache_cfg.block_size)

    # ---- requests -------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Validate a request before queueing it; return its resolved ``max_tokens``.

        Raises:
            ValueError: empty prompt, or the prompt needs more KV blocks than the pool has.
            ContextLengthExceededError: prompt (+ max_tokens) longer than the window.
        """
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("The prompt is empty.")
        if n_prompt >= self.max_model_len:
            raise ContextLengthExceededError(n_prompt, 0, self.max_model_len)
        if params.max_tokens is None:
            max_tokens = self.max_model_len - n_prompt
        else:
            max_tokens = params.max_tokens
            if n_prompt + max_tokens > self.max_model_len:
                raise ContextLengthExceededError(n_prompt, max_tokens, self.max_model_len)
        need = -(-(n_prompt + 1) // self.kv_manager.block_size)
        if need > self.num_blocks:
            raise ValueError(f"The prompt needs {need} KV cache blocks but the pool has only "
                             f"{self.num_blocks}; raise --kv-cache-memory.")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"Prompt token id {bad[0]} is outside the vocabulary.")
        return max_tokens

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        """Queue a request (``params.n`` sequences sharing the prompt's blocks).

        With ``params.structured_output`` each sequence gets its own grammar matcher (the
        grammar is compiled once, cached by spec).

        Raises:
            ValueError / ContextLengthExceededError: see ``check_request``; also a duplicate id.
            StructuredOutputError: the structured output cannot be enforced.
        """
        if self.output_processor.has(request_id):
            raise ValueError(f"Duplicate request id {request_id!r}.")
        max_tokens = self.check_request(prompt_token_ids, params)
        spec = params.structured_output
        if spec is not None:
            self.structured.compile(spec)  # fail before anything is queued
        seqs = []
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seqs.append(Request(
                request_id=seq_id, prompt_token_ids=list(prompt_token_ids),
                sampling_params=params, eos_token_ids=self.eos_token_ids,
                max_tokens=max_tokens, parent_id=request_id, index=i,
                wait_for_prefill_of=seqs[0].request_id if i > 0 else None,
                logprobs=[] if params.logprobs is not None else None,
                grammar=(self.structured.new_matcher(spec, max_tokens=max_tokens)
                         if spec is not None else None)))
        self.output_processor.add(request_id, prompt, list(prompt_token_ids), seqs)
        for seq in seqs:
            self.scheduler.add_request(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort every sequence of a caller request and free its KV blocks at once.

        Returns the final (aborted) output, or None for an unknown or finished id.
        """
        seq_ids = self.output_processor.seq_ids(request_id)
        if not seq_ids:
            return None
        self.scheduler.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, update requests; return changed outputs."""
        sched_out = self.scheduler.schedule()
        if sched_out.total_num_scheduled_tokens == 0:
            return []
        run_out = self.runner.execute(sched_out, self.kv_manager.get_block_ids)
        aborted: list[Request] = []
        sampled = self._sample(run_out.logits, run_out.requests, aborted)
        changed = self.scheduler.update_from_output(sched_out, sampled)
        return self.output_processor.process(changed + aborted)

    def _sample(self, logits: torch.Tensor, requests: list[Request],
                aborted: list[Request]) -> dict[str, tuple[int, object]]:
        """Sample one token per row; grammar masks come from each request's matcher.

        A request whose grammar allows no token at all (an internal grammar error) is
        aborted and the others are sampled without it; the scheduler then skips it.

        Args:
            logits: ``[B, W]`` float32, one row per request.
            requests: the B sampling requests, in row order.
            aborted: receives the requests aborted here.

        Returns:
            request id -> (token id, logprobs or None) for the requests that sampled.
        """
        rows = list(range(len(requests)))
        while rows:
            reqs = [requests[i] for i in rows]
            masks = None
            if any(r.grammar is not None for r in reqs):
                masks = [r.grammar.allowed_token_mask() if r.grammar is not None else None
                         for r in reqs]
            try:
                out = self.sampler(logits[rows] if len(rows) < len(requests) else logits,
                                   reqs, masks)
            except NoAllowedTokenError as exc:
                bad = next(i for i in rows if requests[i].request_id == exc.request_id)
                logger.error("grammar of %s allows no token (%s); aborting it",
                             exc.request_id, getattr(requests[bad].grammar, "error", ""))
                aborted += self.scheduler.finish_requests([exc.request_id],
                                                          RequestStatus.FINISHED_ABORTED)
                rows.remove(bad)
                continue
            return {r.request_id: (tok, lp)
                    for r, tok, lp in zip(reqs, out.token_ids, out.logprobs)}
        return {}

    def stats(self) -> EngineStats:
        """Occupancy and counters for /metrics."""
        pc = self.kv_manager.prefix_cache_stats
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=self.kv_manager.num_used_blocks,
            kv_blocks_total=self.num_blocks,
            prefix_cache_queries=pc.queries, prefix_cache_hits=pc.hits,
            num_preemptions=getattr(self.scheduler, "num_preemptions", 0))
