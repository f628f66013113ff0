"""One entry point for model files: registry names, GGUF paths and HF directories.

`resolve_model` decides what a user-given model string points at; `load_model_files` turns it
into a `ModelFiles` (config + a weight iterator factory). Tokenizers are built by
``openmini.tokenizer`` from ``ModelFiles.source`` (``Tokenizer.from_gguf`` /
``Tokenizer.from_hf_dir``), not here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from openmini.config import ModelConfig
from openmini.loaders import registry
from openmini.loaders.gguf_loader import GGUFFile, gguf_model_config, iter_gguf_weights
from openmini.loaders.safetensors_loader import hf_model_config, iter_safetensors_weights

SourceKind = Literal["gguf", "hf"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are.

    Attributes:
        kind: ``"gguf"`` (one GGUF file) or ``"hf"`` (directory with config.json + safetensors).
        path: the GGUF file or the HF directory.
        name: display name (registry name, GGUF file stem or directory name).
    """

    kind: SourceKind
    path: Path
    name: str


@dataclass(frozen=True)
class ModelFiles:
    """A resolved model: its config and a factory of weight iterators.

    Attributes:
        config: architecture hyper-parameters.
        source: where the files are (the tokenizer is built from this).
    """

    config: ModelConfig
    source: ModelSource
    _weights: Callable[[], Iterator[tuple[str, torch.Tensor]]] = field(repr=False, compare=False)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """A fresh iterator of ``(hf_name, float32 tensor)`` in HF layout, one tensor at a time."""
        return self._weights()


def resolve_model(
    name_or_path: str | os.PathLike[str],
    home: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ModelSource:
    """Find the files behind a model string.

    Accepted, in this order: a registry name (pulled into the cache when missing), a ``.gguf``
    file, a directory with ``config.json`` (HF), a directory holding exactly one ``.gguf``.

    Raises:
        FileNotFoundError: neither a registry name nor an existing usable path (message lists
            the registry names).
        registry.RegistryError: pulling a registry model failed.
    """
    text = str(name_or_path)
    if text in registry.MODELS:
        return ModelSource("gguf", registry.pull(text, home=home, progress=progress), text)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", path, path.stem)
        raise FileNotFoundError(f"{path}: not a .gguf file (give a GGUF file or a model directory)")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf", path, path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], path.name)
        if len(ggufs) > 1:
            raise FileNotFoundError(
                f"{path}: {len(ggufs)} .gguf files, name one of them: {[g.name for g in ggufs]}"
            )
        raise FileNotFoundError(f"{path}: no config.json and no .gguf file")
    raise FileNotFoundError(
        f"model {text!r} is neither a registry name ({sorted(registry.MODELS)}) nor an existing path"
    )


def load_model_files(
    name_or_path: str | os.PathLike[str],
    home: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ModelFiles:
    """Resolve ``name_or_path`` and read its config; weights are read lazily by ``weights()``.

    Raises:
        FileNotFoundError / registry.RegistryError: see `resolve_model`.
        ValueError: unsupported architecture or malformed metadata.
    """
    source = resolve_model(name_or_path, home=home, progress=progress)
    if source.kind == "gguf":
        gf = GGUFFile(source.path)  # header parsed once, shared by config and weights()
        config = gguf_model_config(gf, name=source.name)
        return ModelFiles(config, source, lambda: iter_gguf_weights(gf))
    config = hf_model_config(source.path, name=source.name)
    return ModelFiles(config, source, lambda: iter_safetensors_weights(source.path))
