"""HF ``config.json`` (as a dict) -> `ModelConfig`.

Reads both config generations of HF ``transformers``: v4 (``rope_theta`` + ``rope_scaling``)
and v5 (``rope_parameters`` holding ``rope_theta``, ``rope_type`` and the scaling keys).
Field meanings follow ``LlamaConfig`` / ``Qwen2Config`` in ``transformers``.
"""

from __future__ import annotations

from typing import Any

from openmini.config import ModelConfig

# HF ``architectures[0]`` -> our architecture key (see openmini.models.registry).
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
# HF ``model_type`` -> our architecture key, used when ``architectures`` is absent.
HF_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
}


def _architecture(cfg: dict[str, Any]) -> str:
    """Our architecture key for a HF config; ValueError when unsupported."""
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[arch]
    if not archs and cfg.get("model_type") in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[cfg["model_type"]]
    found = archs or [cfg.get("model_type")]
    raise ValueError(
        f"unsupported model architecture {found!r}; supported: "
        f"{sorted(HF_ARCHITECTURES)} (model_type {sorted(HF_MODEL_TYPES)})"
    )


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from a v4 or v5 HF config.

    The returned scaling dict always carries ``rope_type`` (v4 files may spell it ``type``)
    and never ``rope_theta``; ``None`` means plain RoPE (Su et al. 2021, RoFormer).
    """
    params = cfg.get("rope_parameters")
    theta = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", theta))
        if scaling is None:
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if not scaling:
        return theta, None
    scaling = dict(scaling)
    if "rope_type" not in scaling and "type" in scaling:
        scaling["rope_type"] = scaling["type"]
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def model_config_from_hf(cfg: dict[str, Any], name: str = "") -> ModelConfig:
    """Build a `ModelConfig` from a parsed HF ``config.json``.

    Args:
        cfg: the JSON object of ``config.json``.
        name: display name; defaults to ``cfg["_name_or_path"]`` or ``""``.

    Returns:
        The config. ``head_dim`` defaults to ``hidden_size // num_attention_heads``;
        ``num_key_value_heads`` to ``num_attention_heads``; ``eos_token_id`` (int or list)
        becomes the tuple ``eos_token_ids``; qwen2 always has q/k/v biases.

    Raises:
        ValueError: unsupported architecture, activation other than SiLU, Llama ``mlp_bias``,
            or Qwen2 sliding-window attention (none of which the model layer implements).
    """
    arch = _architecture(cfg)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU MLP) is implemented")
    if cfg.get("mlp_bias"):
        raise ValueError("unsupported config: mlp_bias=true")
    if cfg.get("use_sliding_window"):
        raise ValueError("unsupported config: use_sliding_window=true (sliding-window attention)")

    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta, scaling = _rope(cfg)
    attention_bias = True if arch == "qwen2" else bool(cfg.get("attention_bias", False))
    bos = cfg.get("bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        name=name or str(cfg.get("_name_or_path", "")),
    )
