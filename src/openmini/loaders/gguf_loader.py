"""GGUF file -> `ModelConfig` + HF-named float32 tensors.

Format: the GGUF spec (ggml repository, ``docs/gguf.md``): a little-endian header
(magic ``GGUF``, version, tensor count, metadata count), typed key/value metadata, a tensor
table (name, dims in ggml order ``ne[0]`` = innermost, ggml type, data offset) and the aligned
tensor data. The header is parsed here with ``struct`` (the ``gguf`` package's ``GGUFReader``
builds a numpy view per string and needs ~6 s for a 49k-token vocabulary, ~16 s for Qwen's
152k); tensor data is memory-mapped and dequantized with ``gguf.quants.dequantize``.

Weight layout: llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) reorders the
rows of ``q_proj`` / ``k_proj`` of the ``llama`` architecture from HF's "rotate half" RoPE
layout to ggml's interleaved-pair layout. `iter_gguf_weights` undoes it; ``qwen2`` files are
not permuted (``Qwen2Model`` in the converter; ``transformers``' GGUF loader agrees).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from openmini.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Architectures whose Q/K rows llama.cpp's converter permutes (LlamaModel.permute).
PERMUTED_QK_ARCHITECTURES = ("llama",)

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types (spec: gguf_metadata_value_type) -> struct format.
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_NUMPY_DTYPES = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}
_TYPE_STRING, _TYPE_ARRAY = 8, 9

# GGUF tensor names -> HF names (llama.cpp gguf-py tensor_mapping.py, reversed).
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this loader can read (bad magic, version, truncated)."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of a GGUF tensor table.

    Attributes:
        name: GGUF tensor name, e.g. ``blk.0.attn_q.weight``.
        shape: numpy / torch order (GGUF ``ne`` reversed): ``[out_features, in_features]``.
        ggml_type: storage type (F32, F16, Q8_0, Q4_K, ...).
        offset: absolute byte offset of the data in the file.
        nbytes: size of the stored data in bytes.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    nbytes: int


class _Cursor:
    """Sequential little-endian reader over the mapped header bytes."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise ValueError("truncated string")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _TYPE_STRING:
            return self.string()
        if vtype == _TYPE_ARRAY:
            item_type = self.unpack("<I")
            count = self.unpack("<Q")
            if item_type == _TYPE_STRING:
                return [self.string() for _ in range(count)]
            if item_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[item_type]).newbyteorder("<")
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return arr.tolist()
            return [self.value(item_type) for _ in range(count)]
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        raise ValueError(f"unknown metadata value type {vtype}")


class GGUFFile:
    """A parsed GGUF header; tensor data is memory-mapped when first read.

    Attributes:
        path: the file.
        version: GGUF format version (2 or 3).
        metadata: every key/value as plain Python values (arrays as lists).
        tensors: tensor table in file order, keyed by GGUF name.

    Raises:
        GGUFFormatError: bad magic, unsupported version (v1, big-endian) or truncated file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.stat().st_size < 24:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (only {self.path.stat().st_size} bytes)")
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                self._parse(buf)
            except GGUFFormatError:
                raise
            except (struct.error, ValueError) as exc:
                raise GGUFFormatError(f"{self.path}: truncated or corrupt GGUF header ({exc})") from exc
        self._data: np.memmap | None = None

    def _parse(self, buf: mmap.mmap) -> None:
        cur = _Cursor(buf)
        if buf[:4] != _MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        cur.pos = 4
        self.version = cur.unpack("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(
                f"{self.path}: unsupported GGUF version {self.version} (need 2 or 3, little-endian)"
            )
        n_tensors = cur.unpack("<Q")
        n_kv = cur.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            ne = [cur.unpack("<Q") for _ in range(n_dims)]
            raw_type = cur.unpack("<I")
            rel_offset = cur.unpack("<Q")
            infos.append((name, ne, raw_type, rel_offset))
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        self.metadata = metadata
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ne, raw_type, rel_offset in infos:
            try:
                gtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise GGUFFormatError(
                    f"{self.path}: tensor {name!r} has unknown ggml type id {raw_type}"
                ) from None
            block, type_size = GGML_QUANT_SIZES[gtype]
            n_elems = int(np.prod(ne)) if ne else 1
            self.tensors[name] = GGUFTensorInfo(
                name=name,
                shape=tuple(int(d) for d in reversed(ne)),
                ggml_type=gtype,
                offset=data_start + rel_offset,
                nbytes=n_elems // block * type_size,
            )
        size = len(buf)
        for info in self.tensors.values():
            if info.offset + info.nbytes > size:
                raise GGUFFormatError(f"{self.path}: tensor {info.name!r} runs past end of file")

    @property
    def architecture(self) -> str:
        """``general.architecture`` (e.g. ``"llama"``)."""
        return str(self.metadata.get("general.architecture", ""))

    def raw(self, name: str) -> np.ndarray:
        """Stored bytes of a tensor as a read-only uint8 view ``[rows, row_bytes]``.

        ``rows`` = product of all but the innermost dimension; this is the layout
        ``gguf.quants.dequantize`` takes.
        """
        info = self.tensors[name]
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        flat = self._data[info.offset : info.offset + info.nbytes]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return flat.reshape(rows, info.nbytes // rows)

    def dequantize(self, name: str) -> torch.Tensor:
        """One tensor as a float32 torch tensor of shape ``info.shape`` (owns its memory).

        Raises:
            NotImplementedError: the ``gguf`` package has no dequantizer for the tensor's type
                (message names the tensor and the type).
        """
        info = self.tensors[name]
        try:
            values = dequantize(self.raw(name), info.ggml_type)
        except NotImplementedError:
            raise NotImplementedError(
                f"{self.path}: tensor {name!r} is stored as {info.ggml_type.name}, "
                "which this loader cannot dequantize"
            ) from None
        if info.ggml_type == GGMLQuantizationType.F32:
            values = values.copy()  # F32 "dequantization" is a view of the read-only mapping
        return torch.from_numpy(values.reshape(info.shape))


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not 9.99e-07)."""
    return float(str(np.float32(value)))


def _as_gguf(file_or_path: GGUFFile | str | os.PathLike[str]) -> GGUFFile:
    return file_or_path if isinstance(file_or_path, GGUFFile) else GGUFFile(file_or_path)


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All metadata of a GGUF file as plain Python values.

    Strings are ``str``, numbers ``int`` / ``float`` / ``bool``, arrays ``list``
    (e.g. ``tokenizer.ggml.tokens``: list[str], ``tokenizer.ggml.token_type``: list[int],
    ``tokenizer.chat_template``: str). Raises `GGUFFormatError` for unreadable files.
    """
    return dict(GGUFFile(path).metadata)


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """``{arch}.rope.scaling.*`` -> HF ``rope_scaling`` dict (or None for plain RoPE)."""
    prefix = f"{arch}.rope.scaling."
    rtype = meta.get(prefix + "type")
    if rtype is None and prefix + "factor" in meta:
        rtype = "linear"  # legacy files: factor without a type meant linear scaling
    if rtype in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": str(rtype)}
    keys = {
        "factor": "factor",
        "original_context_length": "original_max_position_embeddings",
        "attn_factor": "attention_factor",
        "yarn_beta_fast": "beta_fast",
        "yarn_beta_slow": "beta_slow",
    }
    for gguf_key, hf_key in keys.items():
        if prefix + gguf_key in meta:
            value = meta[prefix + gguf_key]
            scaling[hf_key] = _f32(value) if isinstance(value, float) else value
    return scaling


def gguf_model_config(file_or_path: GGUFFile | str | os.PathLike[str], name: str = "") -> ModelConfig:
    """`ModelConfig` from GGUF metadata (llama.cpp key names, ``{arch}.*``).

    ``head_dim`` = ``{arch}.attention.key_length``, else ``{arch}.rope.dimension_count``, else
    ``embedding_length // head_count``. ``vocab_size`` = rows of ``token_embd.weight`` (llama.cpp
    pads the token list to this size). Embeddings are tied when there is no ``output.weight``.
    ``eos_token_ids`` holds only ``tokenizer.ggml.eos_token_id``; chat-end tokens such as
    ``<|im_end|>`` are the tokenizer layer's business.

    Raises:
        ValueError: unsupported architecture, missing required keys, inconsistent Q shape,
            or llama3-style ``rope_freqs.weight`` (per-dimension RoPE factors, not supported).
    """
    gf = _as_gguf(file_or_path)
    meta = gf.metadata
    arch = gf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{gf.path}: unsupported GGUF architecture {arch!r}; supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    if "rope_freqs.weight" in gf.tensors:
        raise ValueError(
            f"{gf.path}: per-dimension RoPE factors (rope_freqs.weight, llama3 rope scaling) are not supported"
        )

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise ValueError(f"{gf.path}: GGUF metadata lacks {full!r}")
        return meta[full]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(
        meta.get(f"{arch}.attention.key_length")
        or meta.get(f"{arch}.rope.dimension_count")
        or hidden // heads
    )
    q = gf.tensors.get("blk.0.attn_q.weight")
    if q is not None and q.shape[0] != heads * head_dim:
        raise ValueError(
            f"{gf.path}: attn_q has {q.shape[0]} rows, expected heads*head_dim = {heads}*{head_dim}"
        )
    if "token_embd.weight" in gf.tensors:
        vocab = gf.tensors["token_embd.weight"].shape[0]
    elif f"{arch}.vocab_size" in meta:
        vocab = int(meta[f"{arch}.vocab_size"])
    else:
        vocab = len(meta.get("tokenizer.ggml.tokens", ()))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in gf.tensors,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in gf.tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        name=name or str(meta.get("general.name", "")) or gf.path.stem,
    )


def hf_tensor_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF name (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``).

    Raises:
        ValueError: a name outside the llama/qwen2 tensor set.
    """
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL_RE.fullmatch(gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} (no HF equivalent for llama/qwen2)")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``LlamaModel.permute`` on a q/k projection weight or bias.

    llama.cpp stores row ``h*D + 2*i + j`` (head h, pair i, j in {0,1}) what HF stores at row
    ``h*D + j*D/2 + i``. Shapes: ``[n_head * D, in]`` or ``[n_head * D]`` -> same shape.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    rest = tuple(w.shape[1:])
    return w.reshape(n_head, half, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


def check_dequantizable(gf: GGUFFile) -> None:
    """Fail fast, before any tensor is read, when some tensor type has no dequantizer.

    Raises:
        NotImplementedError: naming the first unsupported tensor and its ggml type.
    """
    checked: set[GGMLQuantizationType] = set()
    for info in gf.tensors.values():
        if info.ggml_type in checked:
            continue
        block, type_size = GGML_QUANT_SIZES[info.ggml_type]
        try:
            dequantize(np.zeros((1, type_size), dtype=np.uint8), info.ggml_type)
        except NotImplementedError:
            raise NotImplementedError(
                f"{gf.path}: tensor {info.name!r} is stored as {info.ggml_type.name}, "
                "which this loader cannot dequantize"
            ) from None
        checked.add(info.ggml_type)


def iter_gguf_weights(
    file_or_path: GGUFFile | str | os.PathLike[str],
    only: Container[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` for every tensor of a llama/qwen2 GGUF, one at a time.

    Tensors come in file order in HF layout (``[out_features, in_features]`` for linears,
    ``[vocab, hidden]`` for the embedding), Q/K rows un-permuted for ``llama``. Only one
    dequantized tensor is alive at a time on the loader's side. ``lm_head.weight`` is yielded
    only when the file has ``output.weight`` (otherwise embeddings are tied). ``only`` restricts
    the output to these HF names (the others are not read).

    Raises:
        ValueError: unsupported architecture or an unknown tensor name.
        NotImplementedError: a tensor type without dequantizer (checked before yielding).
    """
    gf = _as_gguf(file_or_path)
    cfg = gguf_model_config(gf)
    check_dequantizable(gf)
    names = {name: hf_tensor_name(name) for name in gf.tensors}  # validate all names first
    permuted = cfg.architecture in PERMUTED_QK_ARCHITECTURES
    for gguf_name, hf_name in names.items():
        if only is not None and hf_name not in only:
            continue
        tensor = gf.dequantize(gguf_name)
        if permuted and ".attn_q." in gguf_name:
            tensor = unpermute_qk(tensor, cfg.num_attention_heads)
        elif permuted and ".attn_k." in gguf_name:
            tensor = unpermute_qk(tensor, cfg.num_key_value_heads)
        yield hf_name, tensor
