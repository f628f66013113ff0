"""Architecture name -> model class."""

from __future__ import annotations

from torch import nn

from openmini.config import ModelConfig
from openmini.models.llama import LlamaForCausalLM
from openmini.models.qwen2 import Qwen2ForCausalLM

# keys: ModelConfig.architecture (GGUF ``general.architecture``) and HF class names
_MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def supported_architectures() -> list[str]:
    """Names ``get_model_class`` accepts."""
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    """Model class for an architecture name such as ``"llama"`` or ``"Qwen2ForCausalLM"``.

    Raises:
        ValueError: unknown architecture (the message lists the supported ones).
    """
    try:
        return _MODELS[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        ) from None


def build_model(config: ModelConfig, dtype_mode: str = "auto") -> nn.Module:
    """Instantiate the model for ``config.architecture`` (weights not loaded yet).

    Raises:
        ValueError: unknown architecture or dtype mode.
    """
    return get_model_class(config.architecture)(config, dtype_mode)
