"""Tiny random models in every file format OpenMini reads — the shared test factory.

`make_tiny_model(arch, out_dir)` builds a HF ``transformers`` model with random float32 weights
(2 layers, hidden 64, MLP 128, 4 query / 2 KV heads of width 16, 4096-token window) and a tiny
byte-level BPE tokenizer, and writes:

* ``out_dir/hf/``: ``config.json``, ``model.safetensors``, ``generation_config.json``,
  ``tokenizer.json``, ``tokenizer_config.json`` (ChatML ``chat_template``, bos/eos tokens) —
  what ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load;
* ``out_dir/gguf/tiny-<arch>-<fmt>.gguf`` for each requested format (``f32``, ``f16``,
  ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``): written with ``gguf.GGUFWriter``
  the way llama.cpp's ``convert_hf_to_gguf.py`` writes these architectures — llama's
  ``q_proj``/``k_proj`` rows permuted (``LlamaModel.permute``), 1-D tensors (norms, biases)
  kept F32, tokenizer metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``) included,
  so ``transformers`` can load both the model and the tokenizer from the GGUF
  (``from_pretrained(dir, gguf_file=name)``).

Per architecture (mirroring the real models the product serves):

=========  =====================================  =========================================
           ``llama`` (like SmolLM2)               ``qwen2`` (like Qwen2.5)
=========  =====================================  =========================================
pre-tok.   digits split one by one, then GPT-2    Qwen2 split regex, then byte-level
           byte-level regex (llama.cpp "smollm")  (llama.cpp "qwen2")
specials   0 ``<|endoftext|>``, 1 ``<|im_start|>``, 2 ``<|im_end|>`` (both)
bos / eos  1 ``<|im_start|>`` / 2 ``<|im_end|>``  0 ``<|endoftext|>`` / 2 ``<|im_end|>``
biases     none                                   random non-zero q/k/v biases
lm_head    untied                                 tied to the embedding
rope_theta 10000                                  1e6
=========  =====================================  =========================================

Weights: every parameter is redrawn from a generator seeded with ``seed`` (so two calls with
the same arguments give identical models): linear weights ~ N(0, 1/in_features), embedding
~ N(0, 0.5^2), untied lm_head ~ N(0, 4/hidden) (logits of a few units, so greedy argmax has
clear margins), RMSNorm weights ~ 1 + N(0, 0.1^2), q/k/v biases ~ N(0, 0.2^2). The byte-level
BPE tokenizer is trained (``tokenizers``) on the fixed text `TRAINING_TEXT`, so the vocabulary
(and the model's ``vocab_size``) is the same on every run; all 256 bytes are in it, so any
UTF-8 text can be encoded.

Session-scoped pytest fixtures ``tiny_llama`` / ``tiny_qwen2`` (``tests/conftest.py``) build
each once per test run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from openmini.config import ModelConfig

ARCHS = ("llama", "qwen2")
DEFAULT_FORMATS = ("f32", "f16", "q8_0")
ALL_FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

HIDDEN = 64
INTERMEDIATE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
MAX_POSITIONS = 4096
RMS_EPS = 1e-6
TARGET_VOCAB = 640  # BPE trainer target; the real size is what the text yields

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Fixed English text the tokenizer is trained on (with digits, punctuation, code and a little
# non-ASCII so that merges exist for all of them).
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs
into the forest. A small model can still learn the shape of a language: the words that
come often, the spaces between them, and the punctuation that ends a sentence.
Hello, world! How are you today? I am fine, thank you. What is the weather like?
It is sunny and warm; the sky is blue and the wind is calm.
User: What is 12 + 30? Assistant: 12 + 30 = 42. The answer is 42.
There are 365 days in a year, 24 hours in a day, 60 minutes in an hour and 1000 meters
in a kilometer. In 2024 the team shipped version 1.2.3 of the service.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, 2))

{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
The weather in Paris is 18 degrees. The weather in Tokyo is 25 degrees.
Once upon a time there was a little cat who lived in a house near the river. Every
morning the cat walked to the river, looked at the water, and went back home to sleep.
The cat liked the river and the house, and the people in the house liked the cat.
Café, naïve, résumé — déjà vu. Grüße aus München! 你好，世界。こんにちは。 🙂 👍
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 256 1024 4096.
Lists: apples, oranges, bananas, pears and grapes. Colors: red, green, blue, yellow.
The server answers requests over HTTP. Each request has a model, messages and options.
A token is a piece of text; the tokenizer turns text into tokens and tokens into text.
"""

# HF name -> GGUF name (llama.cpp gguf-py ``tensor_mapping.py``), written out here on its own
# so that the loader under test does not share a table with the files it reads.
_GLOBAL_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_FORMAT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
}


@dataclass(frozen=True)
class ArchSpec:
    """Per-architecture choices of the tiny model (see the module docstring's table)."""

    hf_class: str
    gguf_pre: str
    bos_token: str
    eos_token: str
    tie_word_embeddings: bool
    attention_bias: bool
    rope_theta: float


ARCH_SPECS = {
    "llama": ArchSpec("LlamaForCausalLM", "smollm", "<|im_start|>", "<|im_end|>", False, False, 10000.0),
    "qwen2": ArchSpec("Qwen2ForCausalLM", "qwen2", "<|endoftext|>", "<|im_end|>", True, True, 1e6),
}


@dataclass
class TinyModel:
    """A tiny random model and every file written for it.

    Attributes:
        arch: ``"llama"`` or ``"qwen2"``.
        model: the HF ``transformers`` model (float32, eval mode) — the numerical reference.
        state_dict: its parameters by HF name, float32 clones; includes ``lm_head.weight``
            even when tied (then equal to the embedding).
        hf_dir: HF directory (config.json, model.safetensors, tokenizer files).
        gguf_paths: format (``"f32"``, ``"q8_0"``, ...) -> GGUF file.
        tokenizer: the trained ``tokenizers.Tokenizer`` (same as ``hf_dir/tokenizer.json``).
        bos_token_id / eos_token_id: ids of the bos / eos tokens (see module docstring).
        special_token_ids: special token string -> id (``<|endoftext|>`` 0, ``<|im_start|>``
            1, ``<|im_end|>`` 2).
        chat_template: the Jinja chat template in both the HF dir and the GGUFs.
        add_bos_token: whether the tokenizer prepends bos when encoding.
        rope_scaling: HF rope_scaling dict the model was built with, or None.
        seed: the seed that made the weights.
    """

    arch: str
    model: Any
    state_dict: dict[str, torch.Tensor]
    hf_dir: Path
    gguf_paths: dict[str, Path]
    tokenizer: Tokenizer
    bos_token_id: int
    eos_token_id: int
    special_token_ids: dict[str, int]
    chat_template: str
    add_bos_token: bool
    rope_scaling: dict[str, Any] | None
    seed: int

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding = tokenizer vocabulary size, in tokens."""
        return self.tokenizer.get_vocab_size()

    def gguf_path(self, fmt: str = "f32") -> Path:
        """Path of the GGUF written in format ``fmt``; KeyError if it was not requested."""
        return self.gguf_paths[fmt]

    def expected_config(self) -> ModelConfig:
        """The `ModelConfig` a loader should produce for these files (``name`` left empty)."""
        spec = ARCH_SPECS[self.arch]
        return ModelConfig(
            architecture=self.arch,
            vocab_size=self.vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            num_key_value_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM,
            rms_norm_eps=RMS_EPS,
            rope_theta=spec.rope_theta,
            rope_scaling=self.rope_scaling,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=spec.tie_word_embeddings,
            attention_bias=spec.attention_bias,
            bos_token_id=self.bos_token_id,
            eos_token_ids=(self.eos_token_id,),
            name="",
        )

    def hf_tokenizer(self) -> Any:
        """``transformers.AutoTokenizer`` loaded from `hf_dir` (a reference tokenizer)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.hf_dir)


# ----------------------------------------------------------------------------- tokenizer


def _pre_tokenizer(arch: str) -> pre_tokenizers.PreTokenizer:
    """The split rules of the real model each tiny arch imitates (see module docstring)."""
    if arch == "llama":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_tokenizer(arch: str, add_bos_token: bool = False) -> Tokenizer:
    """Train the deterministic tiny byte-level BPE on `TRAINING_TEXT`.

    Special tokens get ids 0..2 in `SPECIAL_TOKENS` order, then the 256 byte symbols, then
    merges. With ``add_bos_token`` a post-processor prepends the arch's bos token.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(arch)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = TRAINING_TEXT.splitlines(keepends=True)
    tok.train_from_iterator(lines * 3, trainer=trainer)
    if add_bos_token:
        from tokenizers.processors import TemplateProcessing

        bos = ARCH_SPECS[arch].bos_token
        tok.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def _merges(tok: Tokenizer) -> list[str]:
    """Merges as ``"left right"`` strings, in priority order (tokenizer.json may use pairs)."""
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in merges]


def _write_tokenizer_files(tok: Tokenizer, arch: str, hf_dir: Path, chat_template: str, add_bos: bool) -> None:
    spec = ARCH_SPECS[arch]
    tok.save(str(hf_dir / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": spec.bos_token,
        "eos_token": spec.eos_token,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
    }
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------- model


def _hf_config(arch: str, vocab: int, tok: Tokenizer, rope_scaling: dict[str, Any] | None) -> Any:
    import transformers

    spec = ARCH_SPECS[arch]
    cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=RMS_EPS,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tok.token_to_id(spec.bos_token),
        eos_token_id=tok.token_to_id(spec.eos_token),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        hidden_act="silu",
    )
    if rope_scaling is not None:
        kwargs["rope_scaling"] = dict(rope_scaling)
    return cls(**kwargs)


@torch.no_grad()
def _randomize(model: Any, seed: int) -> None:
    """Redraw every parameter from a seeded generator (see module docstring for the laws)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        elif name == "model.embed_tokens.weight":
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        elif name == "lm_head.weight":
            p.copy_(2.0 / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=gen))
        else:  # linear [out, in]
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def build_hf_model(
    arch: str, tok: Tokenizer, seed: int = 0, rope_scaling: dict[str, Any] | None = None
) -> Any:
    """The random float32 HF model for ``arch`` whose vocabulary is ``tok``'s."""
    import transformers

    config = _hf_config(arch, tok.get_vocab_size(), tok, rope_scaling)
    cls = getattr(transformers, ARCH_SPECS[arch].hf_class)
    model = cls(config).to(torch.float32)
    _randomize(model, seed)
    if ARCH_SPECS[arch].tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


# ----------------------------------------------------------------------------- GGUF


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``LlamaModel.permute``: HF "rotate half" q/k rows -> ggml interleaved pairs.

    ``[n_head * D, ...]`` -> same shape; HF row ``h*D + j*D/2 + i`` moves to ``h*D + 2*i + j``.
    """
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensor_name(hf_name: str) -> str:
    """HF parameter name -> llama.cpp GGUF tensor name."""
    if hf_name in _GLOBAL_TO_GGUF:
        return _GLOBAL_TO_GGUF[hf_name]
    parts = hf_name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
    layer, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    return f"blk.{layer}.{_LAYER_TO_GGUF[module]}.{kind}"


def _gguf_data(arr: np.ndarray, fmt: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """Encode one float32 tensor for format ``fmt`` (1-D tensors stay F32, like llama.cpp)."""
    qtype = _FORMAT_TYPES[fmt][0]
    if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return arr.astype(np.float32), None
    if qtype == gguf.GGMLQuantizationType.F16:
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr, qtype), qtype


def write_gguf(
    tiny_arch: str,
    state_dict: dict[str, torch.Tensor],
    tok: Tokenizer,
    path: Path,
    fmt: str,
    chat_template: str,
    add_bos: bool,
    rope_scaling: dict[str, Any] | None,
) -> None:
    """Write one GGUF the way llama.cpp's converter would for this architecture."""
    spec = ARCH_SPECS[tiny_arch]
    w = gguf.GGUFWriter(str(path), tiny_arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"tiny-{tiny_arch}")
    w.add_block_count(NUM_LAYERS)
    w.add_context_length(MAX_POSITIONS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTERMEDIATE)
    w.add_head_count(NUM_HEADS)
    w.add_head_count_kv(NUM_KV_HEADS)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    if tiny_arch == "llama":
        w.add_vocab_size(tok.get_vocab_size())
        w.add_rope_dimension_count(HEAD_DIM)
    if rope_scaling is not None:
        rtype = rope_scaling["rope_type"]
        w.add_rope_scaling_type(gguf.RopeScalingType(rtype))
        w.add_rope_scaling_factor(float(rope_scaling["factor"]))
        if "original_max_position_embeddings" in rope_scaling:
            w.add_rope_scaling_orig_ctx_len(int(rope_scaling["original_max_position_embeddings"]))
    w.add_file_type(_FORMAT_TYPES[fmt][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    vocab = tok.get_vocab()
    tokens = [""] * len(vocab)
    for text, idx in vocab.items():
        tokens[idx] = text
    specials = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(spec.gguf_pre)
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(len(tokens))]
    )
    w.add_token_merges(_merges(tok))
    w.add_bos_token_id(tok.token_to_id(spec.bos_token))
    w.add_eos_token_id(tok.token_to_id(spec.eos_token))
    w.add_pad_token_id(tok.token_to_id("<|endoftext|>"))
    w.add_add_bos_token(add_bos)
    w.add_chat_template(chat_template)

    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and spec.tie_word_embeddings:
            continue  # tied: llama.cpp writes no output.weight
        arr = tensor.detach().to(torch.float32).numpy()
        if tiny_arch == "llama" and ".q_proj." in hf_name:
            arr = llama_cpp_permute(arr, NUM_HEADS)
        elif tiny_arch == "llama" and ".k_proj." in hf_name:
            arr = llama_cpp_permute(arr, NUM_KV_HEADS)
        data, raw_dtype = _gguf_data(np.ascontiguousarray(arr), fmt)
        w.add_tensor(gguf_tensor_name(hf_name), data, raw_dtype=raw_dtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- entry point


def make_tiny_model(
    arch: str,
    out_dir: str | Path,
    seed: int = 0,
    formats: Sequence[str] = DEFAULT_FORMATS,
    chat_template: str = CHATML_TEMPLATE,
    add_bos_token: bool = False,
    rope_scaling: dict[str, Any] | None = None,
) -> TinyModel:
    """Build the tiny ``arch`` model and write its HF directory and GGUF files under ``out_dir``.

    Args:
        arch: ``"llama"`` or ``"qwen2"``.
        out_dir: created if missing; gets ``hf/`` and ``gguf/``.
        seed: weight seed (the tokenizer does not depend on it).
        formats: GGUF formats to write, from `ALL_FORMATS` (``()`` writes none).
        chat_template: Jinja template stored in both tokenizer_config.json and the GGUFs.
        add_bos_token: tokenizer prepends bos (``tokenizer.ggml.add_bos_token``).
        rope_scaling: optional HF rope_scaling (``{"rope_type": "linear"|"yarn", "factor": f,
            ...}``), also written as ``{arch}.rope.scaling.*`` in the GGUFs.

    Returns:
        A `TinyModel`. Takes well under a second per format on one core.

    Raises:
        ValueError: unknown arch or format.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHS}")
    bad = [f for f in formats if f not in _FORMAT_TYPES]
    if bad:
        raise ValueError(f"unknown GGUF formats {bad}; choose from {ALL_FORMATS}")
    out = Path(out_dir)
    hf_dir = out / "hf"
    gguf_dir = out / "gguf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    gguf_dir.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(arch, add_bos_token=add_bos_token)
    model = build_hf_model(arch, tok, seed=seed, rope_scaling=rope_scaling)
    model.generation_config.do_sample = False
    model.save_pretrained(hf_dir)
    _write_tokenizer_files(tok, arch, hf_dir, chat_template, add_bos_token)
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if "lm_head.weight" not in state_dict:
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"].clone()

    paths = {}
    for fmt in formats:
        path = gguf_dir / f"tiny-{arch}-{fmt}.gguf"
        write_gguf(arch, state_dict, tok, path, fmt, chat_template, add_bos_token, rope_scaling)
        paths[fmt] = path

    spec = ARCH_SPECS[arch]
    return TinyModel(
        arch=arch,
        model=model,
        state_dict=state_dict,
        hf_dir=hf_dir,
        gguf_paths=paths,
        tokenizer=tok,
        bos_token_id=tok.token_to_id(spec.bos_token),
        eos_token_id=tok.token_to_id(spec.eos_token),
        special_token_ids={t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
        chat_template=chat_template,
        add_bos_token=add_bos_token,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
        seed=seed,
    )
