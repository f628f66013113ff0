"""`Tokenizer`: a fast (Rust, HF ``tokenizers``) tokenizer plus the model's special tokens.

Two encodings matter for a chat server:

* `Tokenizer.encode` -- *plain text*: special-token strings typed by a user (``"<|im_end|>"``)
  are cut into ordinary vocabulary pieces and never become control-token ids (case C17). This
  is llama.cpp's ``parse_special=false`` and HF's ``split_special_tokens=True``.
* `Tokenizer.encode_with_special` -- *template scaffolding*: special-token strings are parsed to
  their ids, as HF does for a rendered chat template.

Neither adds BOS; `openmini.tokenizer.chat_template` decides about BOS.

Sources of truth:
* a HF model directory (``tokenizer.json`` + ``tokenizer_config.json``), or
* a GGUF file: llama.cpp's ``tokenizer.ggml.*`` metadata, converted once with ``transformers``'
  GGUF tokenizer conversion and cached as ``tokenizer.json`` + a small metadata JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tokenizers


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE).

    Source: GPT-2 ``encoder.py`` (Radford et al., 2019). Printable Latin-1 bytes map to
    themselves; the other 68 bytes map to ``chr(256 + n)`` in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


#: Byte-level BPE character -> byte (inverse of GPT-2's ``bytes_to_unicode``).
BYTE_LEVEL_DECODER = MappingProxyType({c: b for b, c in _gpt2_bytes_to_unicode().items()})

#: SentencePiece byte-fallback token, e.g. ``<0xE4>``.
_BYTE_FALLBACK_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

#: SentencePiece word-boundary marker (U+2581), a space in the decoded text.
_SPIECE_UNDERLINE = "\u2581"

#: Special tokens that end an assistant turn in common chat formats (ChatML, Llama 3, Gemma,
#: Phi-3, Mistral, gpt-oss). Those present in a vocabulary as special tokens join
#: `Tokenizer.eos_token_ids`.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
    "<end_of_turn>", "<|end|>", "<|return|>", "</s>",
)

#: Version of the GGUF conversion cache layout; bump to invalidate old caches.
_CACHE_VERSION = 1
_CACHE_META = "openmini_tokenizer.json"
_CACHE_TOKENIZER = "tokenizer.json"
#: Bytes of the GGUF file hashed for the cache fingerprint (the metadata, incl. the
#: vocabulary, sits at the start of the file).
_FINGERPRINT_BYTES = 32 << 20


class Tokenizer:
    """A HF ``tokenizers.Tokenizer`` with plain-text encoding and the model's special ids.

    Args:
        backend: the Rust tokenizer (vocabulary, merges, pre-tokenizer, added tokens). It is
            owned by this object afterwards (its ``encode_special_tokens`` flag is managed here).
        bos_token / eos_token: token strings, or None if the model has none.
        chat_template: the model's Jinja chat template source, or None.
        add_bos_token: whether a prompt must start with BOS (llama.cpp
            ``tokenizer.ggml.add_bos_token`` / HF ``add_bos_token``).
        extra_eos_token_ids: further ids that end generation (e.g. from
            ``generation_config.json``).
        tokenizer_json_path: the ``tokenizer.json`` the backend was read from, if any.

    Thread safety: encode/decode may be called from several threads (an internal lock
    guards the backend's special-token flag).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, chat_template: str | None = None,
                 add_bos_token: bool = False, extra_eos_token_ids: Iterable[int] = (),
                 tokenizer_json_path: Path | None = None):
        self._backend = backend
        self._backend.encode_special_tokens = True  # default mode: plain text
        self._lock = threading.Lock()
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        self.tokenizer_json_path = tokenizer_json_path
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._added_content = {i: t.content for i, t in added.items()}
        self.special_token_ids = frozenset(i for i, t in added.items() if t.special)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self._token_id_or_none(bos_token)
        self.eos_token_id = self._token_id_or_none(eos_token)
        eos = {i for i in [self.eos_token_id, *extra_eos_token_ids] if i is not None}
        for text in END_OF_TURN_TOKENS:
            tid = backend.token_to_id(text)
            if tid is not None and tid in self.special_token_ids:
                eos.add(tid)
        self.eos_token_ids = frozenset(eos)
        decoder_types = _component_types(backend.decoder)
        self._byte_level = "ByteLevel" in decoder_types
        self._byte_fallback = "ByteFallback" in decoder_types

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja`` /
        ``chat_template.json``, ``generation_config.json``, ``config.json``) from a HF directory.

        Raises:
            FileNotFoundError: no ``tokenizer.json`` in ``path``.
            ValueError: a JSON file is malformed.
        """
        root = Path(path)
        tj = root / _CACHE_TOKENIZER
        if not tj.is_file():
            raise FileNotFoundError(f"{tj} not found (only fast tokenizers are supported)")
        backend = tokenizers.Tokenizer.from_file(str(tj))
        cfg = _read_json(root / "tokenizer_config.json")
        gen = _read_json(root / "generation_config.json")
        model_cfg = _read_json(root / "config.json")

        bos = _token_content(cfg.get("bos_token"))
        eos = _token_content(cfg.get("eos_token"))
        if bos is None and isinstance(model_cfg.get("bos_token_id"), int):
            bos = backend.id_to_token(model_cfg["bos_token_id"])
        extra_eos = [*_as_id_list(gen.get("eos_token_id")),
                     *_as_id_list(model_cfg.get("eos_token_id"))]
        if eos is None and extra_eos:
            eos = backend.id_to_token(extra_eos[0])

        template = _chat_template_from_config(cfg.get("chat_template"))
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        elif template is None and (root / "chat_template.json").is_file():
            template = _chat_template_from_config(
                _read_json(root / "chat_template.json").get("chat_template"))

        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # infer from the post-processor (e.g. Llama 3 adds BOS there)
            bos_id = backend.token_to_id(bos) if bos else None
            ids = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(ids) and ids[0] == bos_id
        return cls(backend, bos_token=bos, eos_token=eos, chat_template=template,
                   add_bos_token=bool(add_bos), extra_eos_token_ids=extra_eos,
                   tokenizer_json_path=tj)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                  ) -> "Tokenizer":
        """Build the tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata.

        The conversion (``transformers``' GGUF tokenizer builder: vocabulary, merges, llama.cpp
        pre-tokenizer regex, control tokens) takes seconds, so with ``cache_dir`` its result is
        written there as ``tokenizer.json`` + ``openmini_tokenizer.json`` (BOS/EOS, template,
        add_bos_token, a fingerprint of the GGUF file) and reused while the fingerprint
        (file size + SHA-256 of its first 32 MiB) matches.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file's tokenizer type is not supported by ``transformers``.
        """
        gguf_path = Path(path)
        if not gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file {gguf_path} not found")
        cache = Path(cache_dir) if cache_dir is not None else None
        fingerprint = _gguf_fingerprint(gguf_path) if cache is not None else None
        if cache is not None:
            loaded = _load_cached(cache, fingerprint)
            if loaded is not None:
                backend, meta = loaded
                return cls(backend, tokenizer_json_path=cache / _CACHE_TOKENIZER, **meta)
        backend, meta = _convert_gguf_with_transformers(gguf_path)
        json_path = None
        if cache is not None:
            json_path = _store_cache(cache, fingerprint, backend, meta)
        return cls(backend, tokenizer_json_path=json_path, **meta)

    # ---- encoding -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text; never adds BOS/EOS.

        Special-token strings inside ``text`` are encoded as ordinary pieces, never as
        their control ids. Non-special added tokens (e.g. Qwen's ``<tool_call>``) are still
        matched whole, as in llama.cpp and HF.
        """
        return self.encode_with_offsets(text, parse_special=False)[0]

    def encode_with_special(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token strings parsed to their ids (template
        scaffolding); never adds BOS/EOS."""
        return self.encode_with_offsets(text, parse_special=True)[0]

    def encode_with_offsets(self, text: str, parse_special: bool
                            ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and their ``(start, end)`` character offsets in ``text``.

        Args:
            parse_special: True parses special-token strings to control ids
                (`encode_with_special`), False keeps them as text (`encode`).
        """
        with self._lock:
            if parse_special:
                self._backend.encode_special_tokens = False
            try:
                enc = self._backend.encode(text, add_special_tokens=False)
            finally:
                self._backend.encode_special_tokens = True
        return enc.ids, enc.offsets

    def encode_without_added_tokens(self, text: str) -> list[int]:
        """Token ids of ``text`` from the base vocabulary alone: no added token (special or
        not, e.g. ``<tool_call>``) is matched. Runs normalizer -> pre-tokenizer -> model
        piece by piece, so it is slower than `encode`; used for user text that contains
        added-token strings a chat template uses as scaffolding."""
        b = self._backend
        normalized = b.normalizer.normalize_str(text) if b.normalizer is not None else text
        pieces = (b.pre_tokenizer.pre_tokenize_str(normalized) if b.pre_tokenizer is not None
                  else [(normalized, (0, len(normalized)))])
        ids: list[int] = []
        for piece, _ in pieces:
            ids.extend(tok.id for tok in b.model.tokenize(piece))
        return ids

    # ---- decoding -------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences become U+FFFD (lossy, as HF)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of one id (byte-level tokens in GPT-2's alphabet, e.g. ``Ġhi``).

        Raises:
            IndexError: ``token_id`` is not in the vocabulary.
        """
        tok = self._backend.id_to_token(int(token_id))
        if tok is None:
            raise IndexError(f"token id {token_id} is not in the vocabulary")
        return tok

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string, or None."""
        return self._backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw UTF-8 bytes of one token (OpenAI logprobs ``bytes``; may be a partial character).

        Byte-level BPE tokens map back through GPT-2's byte-to-unicode table; SentencePiece
        byte-fallback tokens ``<0xNN>`` are the byte NN; ``▁`` is a space; added tokens are
        their content.

        Raises:
            IndexError: ``token_id`` is not in the vocabulary.
        """
        content = self._added_content.get(token_id)
        if content is not None:
            return content.encode("utf-8")
        tok = self.id_to_token(token_id)
        if self._byte_level:
            try:
                return bytes(BYTE_LEVEL_DECODER[c] for c in tok)
            except KeyError:
                return tok.encode("utf-8")
        if self._byte_fallback:
            m = _BYTE_FALLBACK_RE.match(tok)
            if m:
                return bytes([int(m.group(1), 16)])
        return tok.replace(_SPIECE_UNDERLINE, " ").encode("utf-8")

    # ---- vocabulary -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (may be below the model's
        embedding rows, ``ModelConfig.vocab_size``)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def added_tokens(self) -> dict[int, str]:
        """Added tokens (special or not) as ``{id: content}``."""
        return dict(self._added_content)

    def _token_id_or_none(self, token: str | None) -> int | None:
        return self._backend.token_to_id(token) if token else None

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, eos_token_ids={sorted(self.eos_token_ids)})")


# ---- helpers ------------------------------------------------------------------------------------


def _component_types(component: Any) -> set[str]:
    """``type`` names inside a serialized decoder (recursing into ``Sequence``)."""
    if component is None:
        return set()
    try:
        state = json.loads(component.__getstate__())
    except Exception:  # noqa: BLE001 - unknown component: treat as opaque
        return set()
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(state)
    return found


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token from ``tokenizer_config.json``: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _chat_template_from_config(value: Any) -> str | None:
    """``chat_template`` is a string, or a list of ``{name, template}`` (pick ``default``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def _gguf_fingerprint(path: Path) -> str:
    """File size + SHA-256 of the first 32 MiB (where GGUF keeps its metadata)."""
    h = hashlib.sha256()
    h.update(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
    return h.hexdigest()


def _convert_gguf_with_transformers(path: Path) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """Run ``transformers``' GGUF tokenizer conversion; returns the backend + metadata kwargs."""
    from transformers import PreTrainedTokenizerFast  # heavy import, only when converting

    hf = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    add_bos = hf.init_kwargs.get("add_bos_token", getattr(hf, "add_bos_token", False))
    meta = {
        "bos_token": hf.bos_token,
        "eos_token": hf.eos_token,
        "chat_template": hf.chat_template if isinstance(hf.chat_template, str) else None,
        "add_bos_token": bool(add_bos),
    }
    backend = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    return backend, meta


def _load_cached(cache: Path, fingerprint: str | None
                 ) -> tuple[tokenizers.Tokenizer, dict[str, Any]] | None:
    meta_path, tok_path = cache / _CACHE_META, cache / _CACHE_TOKENIZER
    if not (meta_path.is_file() and tok_path.is_file()):
        return None
    try:
        stored = json.loads(meta_path.read_text(encoding="utf-8"))
        if stored.get("version") != _CACHE_VERSION or stored.get("fingerprint") != fingerprint:
            return None
        backend = tokenizers.Tokenizer.from_file(str(tok_path))
    except Exception:  # noqa: BLE001 - a corrupt cache is rebuilt, never fatal
        return None
    meta = {k: stored.get(k) for k in ("bos_token", "eos_token", "chat_template")}
    meta["add_bos_token"] = bool(stored.get("add_bos_token"))
    return backend, meta


def _store_cache(cache: Path, fingerprint: str | None, backend: tokenizers.Tokenizer,
                 meta: dict[str, Any]) -> Path:
    """Write ``tokenizer.json`` then the metadata file (the commit marker), each atomically."""
    cache.mkdir(parents=True, exist_ok=True)
    tok_path = cache / _CACHE_TOKENIZER
    tmp = cache / f".{_CACHE_TOKENIZER}.{os.getpid()}.tmp"
    tmp.write_text(backend.to_str(), encoding="utf-8")
    os.replace(tmp, tok_path)
    record = {"version": _CACHE_VERSION, "fingerprint": fingerprint, **meta}
    tmp = cache / f".{_CACHE_META}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, cache / _CACHE_META)
    return tok_path
