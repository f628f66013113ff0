"""HF model directory (``config.json`` + ``*.safetensors``) -> `ModelConfig` + float32 tensors.

Tensor files follow the safetensors format (huggingface/safetensors); a sharded checkpoint's
``model.safetensors.index.json`` is not needed: every ``*.safetensors`` file in the directory
is read, in sorted name order. Tensor names and layouts are already HF's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from openmini.config import ModelConfig
from openmini.loaders.hf_config import model_config_from_hf


def hf_model_config(model_dir: str | os.PathLike[str], name: str = "") -> ModelConfig:
    """`ModelConfig` from ``model_dir/config.json``.

    Raises:
        FileNotFoundError: no ``config.json``.
        ValueError: unsupported architecture / options (see `model_config_from_hf`).
    """
    path = Path(model_dir) / "config.json"
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    return model_config_from_hf(cfg, name=name or Path(model_dir).name)


def safetensors_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """Sorted ``*.safetensors`` files of a directory; FileNotFoundError when there are none."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    return files


def iter_safetensors_weights(model_dir: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` for every tensor of every ``*.safetensors`` file.

    One tensor is materialised at a time (safetensors memory-maps the file); bf16/fp16 tensors
    are up-cast to float32. Shapes are the checkpoint's (HF layout, ``[out, in]`` for linears).
    """
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor.to(torch.float32)
