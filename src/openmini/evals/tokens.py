"""Count tokens the way the served model does, through any OpenAI-compatible server.

Chat Completions has no tokenize route, so a text is measured by what the server reports:
``usage.prompt_tokens`` of a ``max_tokens=1`` request whose messages carry the text, minus
the same for an empty text. The difference is the text's length in the served model's tokens
(template and question excluded), exact up to merges across the text's two edges (0-1 token).

Counts are cached per text (sha256 key) in a JSON file, so a resumed run probes nothing twice.
A probe costs one prefill of the text, so long texts should be measured in pieces
(``count_many``) and summed: token counts of texts cut at whitespace add up to within about
one token per cut.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MessagesFor = Callable[[str], list[dict[str, Any]]]


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ServerTokenCounter:
    """Token counts of texts placed into a fixed chat prompt, measured by the server.

    Args:
        client: an ``openai.OpenAI`` client.
        model: the model id sent with each probe.
        messages_for: ``text -> messages`` — the task's prompt with ``text`` in its variable slot.
        cache_path: JSON file of earlier counts (created / updated); None keeps them in memory.
        concurrency: probes in flight in ``count_many``.
    """

    def __init__(self, client, model: str, messages_for: MessagesFor,
                 cache_path: Path | None = None, concurrency: int = 2) -> None:
        self.client = client
        self.model = model
        self.messages_for = messages_for
        self.cache_path = cache_path
        self.concurrency = max(1, concurrency)
        self._lock = threading.Lock()
        self._cache: dict[str, int] = {}
        if cache_path is not None and cache_path.is_file():
            try:
                self._cache = {str(k): int(v) for k, v in json.loads(cache_path.read_text()).items()}
            except (ValueError, AttributeError):
                self._cache = {}
        self._base: int | None = None

    def prompt_tokens(self, text: str) -> int:
        """Total prompt tokens (template + question + ``text``) the server counts; cached."""
        key = "prompt:" + _key(text)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        resp = self.client.chat.completions.create(
            model=self.model, messages=self.messages_for(text), max_tokens=1, temperature=0)
        if resp.usage is None or not resp.usage.prompt_tokens:
            raise RuntimeError("the server reports no usage.prompt_tokens; cannot count tokens")
        n = int(resp.usage.prompt_tokens)
        with self._lock:
            self._cache[key] = n
        return n

    def overhead(self) -> int:
        """Prompt tokens of the prompt with an empty text (template, instructions, question)."""
        if self._base is None:
            self._base = self.prompt_tokens("")
        return self._base

    def count(self, text: str) -> int:
        """Tokens ``text`` adds to the prompt (>= 0)."""
        return max(0, self.prompt_tokens(text) - self.overhead())

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """``count`` of each text, ``concurrency`` probes at a time; saves the cache after."""
        self.overhead()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            counts = list(pool.map(self.count, texts))
        self.save()
        return counts

    def save(self) -> None:
        """Write the cache file (atomic replace)."""
        if self.cache_path is None:
            return
        with self._lock:
            data = json.dumps(self._cache, sort_keys=True)
        tmp = self.cache_path.with_name(self.cache_path.name + ".partial")
        tmp.write_text(data)
        tmp.replace(self.cache_path)
