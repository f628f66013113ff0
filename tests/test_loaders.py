"""Loaders against references: the HF state dict of tiny random models, ``transformers``' own
GGUF reader/dequantizer on the real SmolLM2 (and, opt-in, Qwen2.5) files, published configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from openmini.config import ModelConfig
from openmini.loaders import gguf_loader, registry
from openmini.loaders.gguf_loader import (
    GGUFFile,
    GGUFFormatError,
    gguf_model_config,
    iter_gguf_weights,
    read_gguf_metadata,
)
from openmini.loaders.hf_config import model_config_from_hf
from openmini.loaders.model_files import load_model_files, resolve_model
from openmini.loaders.safetensors_loader import hf_model_config, iter_safetensors_weights
from tiny_models import ALL_FORMATS, SPECIAL_TOKENS, TinyModel, make_tiny_model

ARCH_FIXTURES = ["tiny_llama", "tiny_qwen2"]

# Largest |dequantized - original| allowed, as a fraction of the row's max |w| (ggml block
# formats quantize 32-value blocks along the row; bounds are ~2x the worst rounding step).
QUANT_ROW_TOL = {"q8_0": 1 / 100, "q4_0": 1 / 7, "q4_1": 1 / 12, "q5_0": 1 / 14, "q5_1": 1 / 25}


@pytest.fixture(params=ARCH_FIXTURES)
def tiny(request) -> TinyModel:
    return request.getfixturevalue(request.param)


def expected_names(tm: TinyModel) -> set[str]:
    names = set(tm.state_dict)
    if tm.expected_config().tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


def assert_matches(got: torch.Tensor, ref: torch.Tensor, fmt: str, name: str) -> None:
    """``got`` equals ``ref`` up to the rounding of storage format ``fmt``."""
    assert got.dtype == torch.float32, name
    assert got.shape == ref.shape, name
    if fmt == "f32" or ref.dim() == 1:  # 1-D tensors are always stored F32
        assert torch.equal(got, ref), name
    elif fmt == "f16":
        torch.testing.assert_close(got, ref, rtol=2**-11, atol=1e-7, msg=name)
    elif fmt == "bf16":
        torch.testing.assert_close(got, ref, rtol=2**-8, atol=1e-30, msg=name)
    else:
        bound = ref.abs().amax(dim=-1, keepdim=True) * QUANT_ROW_TOL[fmt]
        err = (got - ref).abs()
        assert bool((err <= bound).all()), f"{name}: max err {err.max():.4g} over {fmt} bound"


# ----------------------------------------------------------------------------- the factory itself


@pytest.mark.parametrize("fmt", ["f32", "q8_0"])
def test_tiny_gguf_is_what_transformers_reads(tiny: TinyModel, fmt: str):
    """The tiny GGUFs follow llama.cpp's layout: transformers' GGUF loader gets the HF weights
    back (an independent check of the writer's Q/K permutation, so the loader test below
    cannot pass by a permute/unpermute pair that are both wrong)."""
    from transformers import AutoModelForCausalLM

    path = tiny.gguf_path(fmt)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    sd = model.state_dict()
    assert set(sd) == set(tiny.state_dict)
    for name, ref in tiny.state_dict.items():
        assert_matches(sd[name].float(), ref, fmt, name)


def test_tiny_gguf_tokenizer_is_what_transformers_reads(tiny: TinyModel):
    from transformers import AutoTokenizer

    path = tiny.gguf_path("f32")
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reference = tiny.hf_tokenizer()
    assert from_gguf.get_vocab() == reference.get_vocab()
    for text in ["Hello, world!", "The cat sat 12 times.", "<|im_start|>user\nhi<|im_end|>\n", "Café 🙂"]:
        assert from_gguf.encode(text) == reference.encode(text), text
    assert from_gguf.eos_token == "<|im_end|>"
    assert from_gguf.chat_template == tiny.chat_template


def test_tiny_model_is_deterministic(tmp_path, tiny_qwen2: TinyModel):
    again = make_tiny_model("qwen2", tmp_path, seed=0, formats=())
    assert again.tokenizer.to_str() == tiny_qwen2.tokenizer.to_str()
    for name, ref in tiny_qwen2.state_dict.items():
        assert torch.equal(again.state_dict[name], ref), name
    other = make_tiny_model("qwen2", tmp_path / "s1", seed=1, formats=())
    assert not torch.equal(other.state_dict["model.norm.weight"], ref)


def test_tiny_model_special_tokens(tiny: TinyModel):
    assert tiny.special_token_ids == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert 400 <= tiny.vocab_size <= 1000
    ids = tiny.tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2


# ----------------------------------------------------------------------------- weights


def test_safetensors_weights_equal_state_dict(tiny: TinyModel):
    seen = {}
    for name, tensor in iter_safetensors_weights(tiny.hf_dir):
        assert tensor.dtype == torch.float32
        seen[name] = tensor
    assert set(seen) == expected_names(tiny)
    for name, tensor in seen.items():
        assert torch.equal(tensor, tiny.state_dict[name]), name


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_gguf_weights_equal_state_dict(tiny: TinyModel, fmt: str):
    seen = dict(iter_gguf_weights(tiny.gguf_path(fmt)))
    assert set(seen) == expected_names(tiny)
    for name, tensor in seen.items():
        assert_matches(tensor, tiny.state_dict[name], fmt, name)


def test_gguf_llama_q_k_are_stored_permuted(tiny_llama: TinyModel):
    """The file really holds permuted rows, so the equality above proves the un-permutation."""
    gf = GGUFFile(tiny_llama.gguf_path("f32"))
    for gguf_name, hf_name in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                               ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight")]:
        raw = gf.dequantize(gguf_name)
        ref = tiny_llama.state_dict[hf_name]
        assert not torch.equal(raw, ref)
        assert torch.equal(raw.sort(dim=0).values, ref.sort(dim=0).values)  # same rows, reordered


def test_gguf_qwen2_q_k_are_not_permuted(tiny_qwen2: TinyModel):
    gf = GGUFFile(tiny_qwen2.gguf_path("f32"))
    assert torch.equal(gf.dequantize("blk.0.attn_q.weight"),
                       tiny_qwen2.state_dict["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(gf.dequantize("blk.0.attn_k.bias"),
                       tiny_qwen2.state_dict["model.layers.0.self_attn.k_proj.bias"])


def test_gguf_weights_are_read_lazily(tiny_llama: TinyModel, monkeypatch):
    calls = []
    original = GGUFFile.dequantize

    def counting(self, name):
        calls.append(name)
        return original(self, name)

    monkeypatch.setattr(GGUFFile, "dequantize", counting)
    it = iter_gguf_weights(tiny_llama.gguf_path("q8_0"))
    assert calls == []
    next(it)
    assert len(calls) == 1


# ----------------------------------------------------------------------------- configs


def test_configs_from_gguf_and_hf_dir(tiny: TinyModel):
    expected = tiny.expected_config()
    for fmt in ("f32", "q8_0"):
        assert gguf_model_config(tiny.gguf_path(fmt)) == expected.replace(name=f"tiny-{tiny.arch}")
    assert hf_model_config(tiny.hf_dir) == expected.replace(name="hf")


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    ],
)
def test_rope_scaling_from_gguf_and_hf_dir(tmp_path, scaling):
    tm = make_tiny_model("qwen2", tmp_path, formats=("f32",), rope_scaling=scaling)
    assert gguf_model_config(tm.gguf_path("f32")).rope_scaling == scaling
    from_hf = hf_model_config(tm.hf_dir).rope_scaling
    assert {k: from_hf[k] for k in scaling} == scaling


def test_hf_config_v4_style():
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 8.0},
        "eos_token_id": [2, 7], "bos_token_id": 1,
        "max_position_embeddings": 2048, "_name_or_path": "org/model",
    }
    c = model_config_from_hf(cfg)
    assert c.architecture == "llama"
    assert c.head_dim == 16 and c.num_key_value_heads == 4
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert c.eos_token_ids == (2, 7) and c.bos_token_id == 1
    assert not c.attention_bias and not c.tie_word_embeddings
    assert c.name == "org/model"
    assert model_config_from_hf({**cfg, "eos_token_id": 5}).eos_token_ids == (5,)


def test_hf_config_v5_style_and_qwen2_bias():
    cfg = {
        "model_type": "qwen2",
        "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "tie_word_embeddings": True,
    }
    c = model_config_from_hf(cfg, name="q")
    assert (c.architecture, c.head_dim, c.rope_theta, c.rope_scaling) == ("qwen2", 32, 1e6, None)
    assert c.attention_bias and c.tie_word_embeddings and c.name == "q"
    assert c.eos_token_ids == ()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["MistralForCausalLM"]}, "unsupported model architecture"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "sliding"),
    ],
)
def test_hf_config_rejects_unsupported(change, match):
    cfg = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
           "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, **change}
    with pytest.raises(ValueError, match=match):
        model_config_from_hf(cfg)


# ----------------------------------------------------------------------------- GGUF format errors


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    path = write_gguf(tmp_path / "f64.gguf", "llama", {"token_embd.weight": np.ones((8, 32), np.float64)})
    with pytest.raises(NotImplementedError, match=r"token_embd\.weight.*F64"):
        next(iter_gguf_weights(path))


def test_gguf_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", "gemma3", {"token_embd.weight": np.ones((8, 32), np.float32)})
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma3'"):
        gguf_model_config(path)


def test_gguf_unknown_tensor_name(tmp_path):
    path = write_gguf(tmp_path / "u.gguf", "llama", {"blk.0.attn_q_norm.weight": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match="attn_q_norm"):
        list(iter_gguf_weights(path))


def test_not_a_gguf_file(tmp_path, tiny_llama: TinyModel):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(GGUFFormatError, match="not a GGUF"):
        GGUFFile(bad)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(tiny_llama.gguf_path("f32").read_bytes()[:5000])
    with pytest.raises(GGUFFormatError):
        GGUFFile(truncated)


def test_read_gguf_metadata_plain_values(tiny: TinyModel):
    meta = read_gguf_metadata(tiny.gguf_path("q8_0"))
    vocab = tiny.tokenizer.get_vocab()
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert meta["tokenizer.chat_template"] == tiny.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tiny.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    merges = json.loads(tiny.tokenizer.to_str())["model"]["merges"]
    assert len(meta["tokenizer.ggml.merges"]) == len(merges)
    assert all(isinstance(m, str) and " " in m for m in meta["tokenizer.ggml.merges"])


# ----------------------------------------------------------------------------- model_files


def test_load_model_files_paths(tiny_qwen2: TinyModel, tmp_path):
    gguf_path = tiny_qwen2.gguf_path("q8_0")
    files = load_model_files(gguf_path)
    assert files.source.kind == "gguf" and files.source.path == gguf_path
    assert files.config == tiny_qwen2.expected_config().replace(name=gguf_path.stem)
    first = [name for name, _ in files.weights()]
    assert [name for name, _ in files.weights()] == first  # fresh iterator each call
    assert set(first) == expected_names(tiny_qwen2)

    hf = load_model_files(tiny_qwen2.hf_dir)
    assert hf.source.kind == "hf" and hf.config == tiny_qwen2.expected_config().replace(name="hf")
    assert {n for n, _ in hf.weights()} == expected_names(tiny_qwen2)

    one = tmp_path / "one"
    one.mkdir()
    (one / "m.gguf").write_bytes(gguf_path.read_bytes())
    assert resolve_model(one).kind == "gguf" and resolve_model(one).path == one / "m.gguf"

    with pytest.raises(FileNotFoundError, match=r"\d+ \.gguf files"):
        resolve_model(gguf_path.parent)  # several formats in one folder
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        resolve_model(tmp_path / "missing")


def test_load_model_files_registry_name(tiny_llama: TinyModel, monkeypatch):
    pulled = []

    def fake_pull(name, home=None, progress=True):
        pulled.append(name)
        return tiny_llama.gguf_path("f16")

    monkeypatch.setattr(registry, "pull", fake_pull)
    files = load_model_files("smollm2-135m-instruct")
    assert pulled == ["smollm2-135m-instruct"]
    assert files.source.name == "smollm2-135m-instruct" and files.config.name == "smollm2-135m-instruct"
    assert files.config.architecture == "llama"


# ----------------------------------------------------------------------------- real models


GGML_F32, GGML_Q5_0 = 0, 6


def reference_dequant_q5_0(raw: np.ndarray) -> torch.Tensor:
    """Q5_0 by the letter of ggml (``block_q5_0``: fp16 scale d, 32 high bits qh, 16 bytes of
    low nibbles; value j = ((low_j | high_j << 4) - 16) * d, low nibbles first, then high
    nibbles for j + 16). transformers 5.24's GGUF reader has no Q5_0; this is the reference."""
    blocks = raw.reshape(-1, 22)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
    qh = blocks[:, 2:6].copy().view("<u4")  # [nb, 1]
    qs = blocks[:, 6:].astype(np.int32)  # [nb, 16]
    high = (qh >> np.arange(32, dtype=np.uint32)) & 1  # [nb, 32]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [nb, 32]
    values = ((low | (high.astype(np.int32) << 4)) - 16) * d
    return torch.from_numpy(values.astype(np.float32).reshape(-1))


def stored_tensors(path: Path, names: list[str]) -> tuple[str, dict[str, tuple[torch.Tensor, int, tuple]]]:
    """(architecture, {name: (stored bytes as uint8, ggml type id, torch shape)}) found by a
    GGUF parser other than ours: transformers' header reader (its metadata and tensor-table
    functions; ``GgufHeader.from_file`` itself refuses files holding Q5_0), else gguf-py's
    ``GGUFReader`` (slow on large vocabularies)."""
    try:
        from transformers.integrations.gguf.reader import _mapped, _read_metadata, _read_tensor_table
    except ImportError:
        reader = gguf.GGUFReader(path)
        found = {t.name: t for t in reader.tensors}
        return reader.fields["general.architecture"].contents(), {
            n: (torch.from_numpy(np.array(found[n].data).view(np.uint8)), int(found[n].tensor_type),
                tuple(int(d) for d in reversed(found[n].shape.tolist())))
            for n in names
        }
    blob = _mapped(str(path))
    metadata, count, pos = _read_metadata(blob, str(path))
    entries, pos = _read_tensor_table(blob, count, pos)
    align = metadata.get("general.alignment", 32)
    data_start = (pos + align - 1) // align * align
    out = {}
    for name, shape, ggml_type, offset in entries:
        if name in names:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            nbytes = int(np.prod(shape)) // block * type_size
            start = data_start + offset
            out[name] = (torch.from_numpy(np.array(blob[start : start + nbytes])), ggml_type, tuple(shape))
    return metadata["general.architecture"], out


def transformers_gguf_tensors(path: Path, config: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """Selected tensors as transformers' GGUF loader produces them (its torch dequantizer, its
    per-architecture Q/K processor), without dequantizing the whole file. Q5_0, which
    transformers cannot dequantize, goes through `reference_dequant_q5_0`."""
    from transformers.integrations.gguf.dequant import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    arch, stored = stored_tensors(path, names)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    out = {}
    for name, (raw, ggml_type, shape) in stored.items():
        if ggml_type == GGML_Q5_0:
            values = reference_dequant_q5_0(raw.numpy()).reshape(shape)
        elif ggml_type == GGML_F32:
            values = raw.view(torch.float32).reshape(shape)
        else:
            values = dequantize(raw.reshape(-1), ggml_type).reshape(shape)
        out[name] = torch.as_tensor(processor.process(values.numpy(), name).weights)
    return out


def check_against_transformers(path: Path, config: ModelConfig, gguf_names: list[str]) -> None:
    ref = transformers_gguf_tensors(
        path,
        {"num_attention_heads": config.num_attention_heads,
         "num_key_value_heads": config.num_key_value_heads},
        gguf_names,
    )
    to_gguf = {gguf_loader.hf_tensor_name(g): g for g in gguf_names}
    mine = {to_gguf[hf]: t for hf, t in iter_gguf_weights(path, only=set(to_gguf))}
    assert set(mine) == set(gguf_names)
    for name in gguf_names:
        assert torch.equal(mine[name], ref[name]), name


SMOLLM2_CONFIG = ModelConfig(  # HuggingFaceTB/SmolLM2-135M-Instruct config.json
    architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    rms_norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None, max_position_embeddings=8192,
    tie_word_embeddings=True, attention_bias=False, bos_token_id=1, eos_token_ids=(2,),
)


@pytest.mark.real_model
def test_smollm2_config_and_weights_match_transformers(smollm2_gguf: Path):
    config = gguf_model_config(smollm2_gguf)
    assert config.replace(name="") == SMOLLM2_CONFIG
    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
             "blk.0.attn_v.weight", "blk.0.attn_norm.weight"]
    check_against_transformers(smollm2_gguf, config, names)


@pytest.mark.real_model
@pytest.mark.skipif(os.environ.get("OPENMINI_SLOW_TESTS") != "1", reason="set OPENMINI_SLOW_TESTS=1 (~30 s)")
def test_smollm2_all_weights_match_transformers_from_pretrained(smollm2_gguf: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    sd = model.state_dict()
    count = 0
    for name, tensor in iter_gguf_weights(smollm2_gguf):
        assert torch.equal(tensor, sd[name]), name
        count += 1
    assert count == len(sd) - 1  # all but the tied lm_head


QWEN_CONFIG = ModelConfig(  # Qwen/Qwen2.5-Coder-0.5B-Instruct config.json; this GGUF has its own output.weight
    architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
    rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=32768,
    tie_word_embeddings=False, attention_bias=True, bos_token_id=151643, eos_token_ids=(151645,),
)


@pytest.mark.real_model
def test_qwen_config_and_weights_match_transformers(qwen_gguf: Path):
    config = gguf_model_config(qwen_gguf)
    assert config.replace(name="") == QWEN_CONFIG
    gf = GGUFFile(qwen_gguf)
    names = ["blk.0.attn_q.weight", "blk.0.attn_q.bias", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
             "blk.0.attn_norm.weight", "blk.0.ffn_down.weight", "blk.11.ffn_down.weight"]
    types = {gf.tensors[n].ggml_type.name for n in names}
    assert types == {"Q8_0", "Q5_0", "F32", "Q6_K", "Q4_K"}
    check_against_transformers(qwen_gguf, config, names)
