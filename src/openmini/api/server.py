"""``openmini serve``: load the engine, run the app under uvicorn, shut down cleanly.

SIGTERM / SIGINT stop accepting connections, let in-flight requests finish for up to
``--graceful-timeout`` seconds, then stop the engine thread and exit with status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys

from openmini.api.settings import DEFAULT_MODEL_ALIASES, ServerSettings
from openmini.config import CacheConfig, EngineConfig, SchedulerConfig

logger = logging.getLogger("openmini.server")

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
               "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
               "tib": 2**40}


def parse_size(text: str) -> int:
    """``"512MiB"`` / ``"2G"`` / ``"1073741824"`` -> bytes (decimal and binary units).

    Raises:
        argparse.ArgumentTypeError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB, 1e9 bytes)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _default_model() -> str:
    try:
        from openmini.loaders.registry import DEFAULT_MODEL
        return DEFAULT_MODEL
    except ImportError:  # pragma: no cover - registry not importable
        return EngineConfig().model


def build_parser() -> argparse.ArgumentParser:
    """The ``openmini serve`` command line."""
    p = argparse.ArgumentParser(
        prog="openmini serve",
        description="Serve a model behind the OpenAI Chat Completions and Responses APIs.")
    p.add_argument("--model", default=None,
                   help="embedded model name, GGUF file or HF directory (default: the embedded "
                        "default model, downloaded on first use)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' (repeatable; default: "
                        "$OPENMINI_API_KEY, comma-separated; none = no auth)")
    p.add_argument("--served-model-name", default=None,
                   help="model id shown in /v1/models and responses (default: the model name)")
    p.add_argument("--model-alias", action="append", default=None,
                   help="extra model id that resolves to the served model (repeatable; "
                        f"default: {', '.join(DEFAULT_MODEL_ALIASES)}; '' disables aliases)")
    p.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs,
                   help="sequences generated at once (default %(default)s)")
    p.add_argument("--kv-cache-memory", type=parse_size, default=CacheConfig.kv_cache_memory,
                   help="bytes for the paged KV cache, e.g. 512MiB, 2GiB (default 1GiB)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context window in tokens (default: the model's)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait beyond --max-num-seqs before 429 "
                        "(default %(default)s; -1 = unbounded)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32"],
                   help="'auto' (fast) or 'float32' (exact)")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data-dir", default=None,
                   help="folder for persistent state (stored Responses API responses, "
                        "responses.sqlite3; default: $OPENMINI_HOME/data)")
    p.add_argument("--graceful-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on shutdown (default 10)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    return p


def api_keys_from(args_keys: list[str] | None, environ: dict[str, str]) -> tuple[str, ...]:
    """Keys from ``--api-key`` flags, else from ``$OPENMINI_API_KEY`` (comma-separated)."""
    if args_keys:
        return tuple(k for k in args_keys if k)
    return tuple(k.strip() for k in environ.get("OPENMINI_API_KEY", "").split(",") if k.strip())


def default_data_dir() -> str:
    """``$OPENMINI_HOME/data`` (``~/.cache/openmini/data`` when OPENMINI_HOME is unset)."""
    from openmini.loaders.registry import openmini_home
    return str(openmini_home() / "data")


RESPONSES_DB = "responses.sqlite3"
"""File name of the Responses API store inside ``--data-dir``."""


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """Bind a TCP listening socket for ``host:port`` before the (slow) model load.

    A port already in use is then reported at once instead of after loading the model,
    and the bound socket is handed to uvicorn (no window for another process to take it).

    Raises:
        OSError: the address cannot be resolved or bound (e.g. ``EADDRINUSE``).
    """
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def serve_main(argv: list[str] | None = None) -> int:
    """Run ``openmini serve``; returns the process exit status.

    Exit status: 0 after a clean shutdown, 1 when the address cannot be bound (checked before
    the model loads) or the model or the data directory cannot be loaded, 2 for bad arguments.
    """
    args = build_parser().parse_args(argv)
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = args.model or _default_model()
    if args.max_num_seqs < 1:
        print("--max-num-seqs must be at least 1", file=sys.stderr)
        return 2

    import uvicorn

    from openmini.api.app import create_app
    from openmini.engine.async_engine import AsyncEngine
    from openmini.store import SQLiteResponseStore, StoreError

    try:
        listen_socket = bind_listen_socket(args.host, args.port)
    except OSError as exc:
        print(f"openmini serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    data_dir = args.data_dir or default_data_dir()
    try:
        store = SQLiteResponseStore(os.path.join(data_dir, RESPONSES_DB))
    except StoreError as exc:
        print(f"openmini serve: {exc}", file=sys.stderr)
        listen_socket.close()
        return 1

    config = EngineConfig(
        model=model, dtype=args.dtype, num_threads=args.num_threads,
        max_model_len=args.max_model_len,
        cache=CacheConfig(kv_cache_memory=args.kv_cache_memory),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs))
    logger.info("loading %s", model)
    try:
        engine = AsyncEngine.from_config(config)
    except Exception as exc:  # noqa: BLE001 - missing files, failed pull, bad format...
        logger.debug("model load failed", exc_info=True)
        print(f"openmini serve: cannot load model {model!r}: {exc}", file=sys.stderr)
        store.close()
        listen_socket.close()
        return 1
    try:
        name = args.served_model_name or (
            os.path.basename(os.path.normpath(model)) if os.path.exists(model) else model)
        aliases = (DEFAULT_MODEL_ALIASES if args.model_alias is None
                   else tuple(a for a in args.model_alias if a))
        settings = ServerSettings(
            served_model_name=name, model_aliases=aliases,
            api_keys=api_keys_from(args.api_key, dict(os.environ)),
            max_num_seqs=args.max_num_seqs,
            max_queue=None if args.max_queue < 0 else args.max_queue)
        app = create_app(engine, settings, store)
        server = uvicorn.Server(uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
            timeout_graceful_shutdown=args.graceful_timeout))
        logger.info("serving %s (aliases: %s) on http://%s:%d/v1%s", name,
                    ", ".join(aliases) or "none", args.host, args.port,
                    " (API key required)" if settings.api_keys else "")
        # uvicorn handles SIGTERM/SIGINT while it runs (graceful stop) and re-raises the
        # signal once it has stopped; a no-op SIGTERM handler (and catching the
        # KeyboardInterrupt of SIGINT) lets the engine shut down and the exit status be 0.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            server.run(sockets=[listen_socket])
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        engine.shutdown()
        store.close()
        listen_socket.close()
    logger.info("shut down cleanly")
    return 0
