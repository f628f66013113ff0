"""Plumbing shared by the eval tasks: common CLI flags, the client, a resumable result log,
a concurrent runner with a progress bar, and summary writers (JSON + Markdown).

Layout of one run (``--out`` defaults to ``evals/results``)::

    <out>/<task>/<model>/results.jsonl   one JSON record per finished item (append-only)
    <out>/<task>/<model>/summary.json    the task's scores
    <out>/<task>/<model>/summary.md      the same as a Markdown table

Re-running the same command skips items already in ``results.jsonl`` (resumable); items that
raised are not logged, so they are retried.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm import tqdm

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_OUT = "evals/results"
# openai exceptions that every item of a run would raise alike: stop at the first
FATAL_ERRORS = ("NotFoundError", "AuthenticationError", "PermissionDeniedError")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Add the flags every task takes: --base-url --model --api-key --concurrency --limit
    --seed --out --max-tokens --timeout --fresh."""
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL),
                   help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="model name sent to the server (default: the first it lists)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--concurrency", type=at_least(1), default=4, help="requests in flight")
    p.add_argument("--limit", type=at_least(1), default=None, help="score at most this many items (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling subsets and generated data")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder")
    p.add_argument("--timeout", type=positive_float, default=3600.0, help="per-request timeout, seconds")
    p.add_argument("--fresh", action="store_true",
                   help="start over: the run's earlier results.jsonl is replaced once a new item finishes")


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum`` (else a usage error naming the bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def require_items(items: Sequence[Any], what: str) -> None:
    """Raise ``ValueError`` when a run's selection is empty (so no summary is overwritten)."""
    if not items:
        raise ValueError(f"nothing to score: the options select no {what}")


def require_scored(done: Sequence[Any], errors: Sequence[tuple[str, str]], what: str) -> None:
    """Raise ``RuntimeError`` when no item of the selection has a result (so the earlier summary
    is kept rather than overwritten with an empty one); names the first error of this run."""
    if not done:
        first = f"; first: {errors[0][1][:200]}" if errors else ""
        raise RuntimeError(f"no {what} was scored ({len(errors)} failed{first})")


def make_client(args: argparse.Namespace):
    """Return an ``openai.OpenAI`` client for ``args.base_url`` (no retries: errors are logged)."""
    import openai
    return openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=0)


def resolve_model(client, model: str | None) -> str:
    """``model`` itself, or the id of the first model the server lists when it is None.

    Raises:
        RuntimeError: the server lists no model.
    """
    if model:
        return model
    models = list(client.models.list())
    if not models:
        raise RuntimeError("the server lists no model; pass --model")
    return models[0].id


def context_window(client, model: str) -> int | None:
    """The server's context window for ``model`` in tokens, from the ``max_model_len`` field of
    ``GET /models/{model}`` (OpenMini and vLLM report it); None when the server does not say."""
    try:
        window = getattr(client.models.retrieve(model), "max_model_len", None)
    except Exception:  # noqa: BLE001 - a peer without the route or the field: unknown
        return None
    return window if isinstance(window, int) and window > 0 else None


def check_lengths_fit(client, model: str, lengths: Iterable[int], reply_tokens: int) -> None:
    """Refuse prompt lengths that cannot fit the server's window with ``reply_tokens`` more.

    Raises:
        ValueError: a length plus ``reply_tokens`` exceeds `context_window` (when known).
    """
    window = context_window(client, model)
    if window is None:
        return
    too_long = [L for L in lengths if L + reply_tokens > window]
    if too_long:
        raise ValueError(f"length(s) {too_long} + --max-tokens {reply_tokens} exceed the context window of "
                         f"{model!r} on this server ({window} tokens)")


def safe_name(text: str) -> str:
    """A file-name-safe form of ``text`` (model names may contain ``/`` or ``:``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def run_dir(args: argparse.Namespace, task: str, model: str) -> Path:
    """``<out>/<task>/<model>``, created."""
    d = Path(args.out) / task / safe_name(model)
    d.mkdir(parents=True, exist_ok=True)
    return d


def saved_log(args: argparse.Namespace, task: str) -> tuple[str, ResultLog]:
    """For ``--rescore``: the model named by ``--model`` and its saved ``results.jsonl``
    (nothing is created).

    Raises:
        SystemExit: no ``--model``.
        FileNotFoundError: no saved results for that model under ``--out``.
    """
    if not args.model:
        raise SystemExit("--rescore needs --model (the results folder name)")
    path = Path(args.out) / task / safe_name(args.model) / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no saved results to rescore: {path} does not exist")
    return args.model, ResultLog(path)


class ResultLog:
    """Append-only JSONL of finished items, keyed by the record's ``"id"`` (a string).

    Thread-safe appends; each line is flushed so a killed run loses at most the item in flight.
    A torn last line (killed mid-write) is ignored when loading. ``fresh``: earlier records are
    ignored, and the file is emptied only when the first new record arrives, so a fresh run
    that fails before any item finishes (server down, wrong URL) leaves the earlier file intact.
    """

    def __init__(self, path: Path, fresh: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._truncate = fresh
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists() and not fresh:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(rec, dict) and "id" in rec:
                        self.records[str(rec["id"])] = rec

    def append(self, record: dict[str, Any]) -> None:
        """Log one finished item (must carry ``"id"``)."""
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            self.records[str(record["id"])] = record
            with open(self.path, "w" if self._truncate else "a", encoding="utf-8") as f:
                f.write(line + "\n")
            self._truncate = False


def run_items(
    items: Sequence[tuple[str, Any]],
    fn: Callable[[Any], dict[str, Any]],
    log: ResultLog,
    concurrency: int,
    desc: str,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Run ``fn(item)`` for every ``(id, item)`` not yet in ``log``, ``concurrency`` at a time.

    ``fn`` returns the record to log (``"id"`` is added). Exceptions are collected, not raised,
    and their items are not logged (a later run retries them); except the `FATAL_ERRORS` that
    every other item would hit too (unknown model, bad API key): the run stops at the first.

    Raises:
        RuntimeError: an item raised one of `FATAL_ERRORS` (the rest are cancelled).

    Returns:
        (records of all items in ``items`` that are in the log, in ``items`` order;
         [(id, error message)] for items that raised in this run)
    """
    todo = [(i, it) for i, it in items if i not in log.records]
    errors: list[tuple[str, str]] = []
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="item") as bar:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = {pool.submit(fn, it): i for i, it in todo}
            for fut in as_completed(futures):
                item_id = futures[fut]
                try:
                    rec = fut.result()
                except Exception as exc:  # noqa: BLE001 - one bad item must not end the run
                    if type(exc).__name__ in FATAL_ERRORS:
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise RuntimeError(f"the server refused the run ({type(exc).__name__}: "
                                           f"{exc}); finished items are kept") from exc
                    errors.append((item_id, f"{type(exc).__name__}: {exc}"))
                else:
                    log.append({"id": item_id, **rec})
                bar.update(1)
    done = [log.records[i] for i, _ in items if i in log.records]
    if errors:
        tqdm.write(f"{len(errors)} items failed (retried on the next run); first: {errors[0][1][:300]}")
    return done, errors


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats are printed with 1 decimal place."""
    def cell(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_summary(directory: Path, summary: dict[str, Any], markdown: str) -> None:
    """Write ``summary.json`` and ``summary.md`` into ``directory`` and print the Markdown."""
    (directory / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (directory / "summary.md").write_text(markdown + "\n")
    print(markdown)


def int_list(text: str) -> list[int]:
    """argparse type: ``"1024,4096"`` -> ``[1024, 4096]`` (duplicates dropped; an empty item is an
    error)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return list(dict.fromkeys(values))  # duplicates dropped, order kept


def add_max_tokens(p: argparse.ArgumentParser, default: int, help_text: str) -> None:
    """``--max-tokens`` with a task's own default (also when the parser already has the flag)."""
    if "--max-tokens" not in p._option_string_actions:
        p.add_argument("--max-tokens", type=at_least(1), default=default, help=help_text)
    p.set_defaults(max_tokens=default)
