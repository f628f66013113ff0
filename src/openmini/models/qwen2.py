"""Qwen2 / Qwen2.5 decoder, matching HF ``Qwen2ForCausalLM``.

Reference: Qwen Team 2024, "Qwen2 Technical Report" (arXiv:2407.10671). Same block as
Llama (``llama.py``) except that q/k/v projections always carry a bias and o_proj never
does; embeddings are usually tied (``config.tie_word_embeddings``). Sliding-window attention
is not used by the released Qwen2.5 configs (``use_sliding_window: false``) and is not
implemented.
"""

from __future__ import annotations

from openmini.config import ModelConfig
from openmini.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 decoder with a paged KV cache; interface as ``LlamaForCausalLM``."""

    @classmethod
    def _biases(cls, config: ModelConfig) -> tuple[bool, bool]:
        """(q/k/v bias, o_proj bias) as in HF ``Qwen2Attention``: always (True, False)."""
        return True, False
