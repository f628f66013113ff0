"""The task registry of ``openmini eval TASK``: task name -> module, imported only when run.

Each task module exposes ``add_args(parser)`` (its flags, including `common.add_common_args`)
and ``run(args) -> int`` (the exit status). Lazy imports keep one task runnable while another
is missing or broken.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from types import ModuleType

TASKS: dict[str, str] = {
    "niah": "openmini.evals.niah",
    "mmlu": "openmini.evals.mmlu",
    "ifeval": "openmini.evals.ifeval",
    "graphwalks": "openmini.evals.graphwalks",
}


def load_task(name: str) -> ModuleType:
    """Import the module of task ``name``.

    Raises:
        KeyError: unknown task.
        ModuleNotFoundError: the task's module is not installed.
    """
    return importlib.import_module(TASKS[name])


def _usage() -> str:
    return ("usage: openmini eval TASK [options]   (openmini eval TASK --help for the options)\n"
            f"tasks: {', '.join(TASKS)}")


def eval_main(argv: list[str]) -> int:
    """``openmini eval TASK [options]``: run one task; one-line errors and exit 1 on failure."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name = argv[0]
    if name not in TASKS:
        print(f"openmini eval: error: unknown task {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = load_task(name)
    except ImportError as exc:
        print(f"openmini eval {name}: error: task not available ({exc})", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(prog=f"openmini eval {name}",
                                     description=(module.__doc__ or "").split("\n\n")[0])
    module.add_args(parser)
    args = parser.parse_args(argv[1:])
    return script_main(f"openmini eval {name}", lambda: module.run(args), getattr(args, "base_url", None))


def script_main(name: str, main: Callable[[], int], base_url: str | None = None) -> int:
    """Run ``main()`` (a task's run, or an eval script's main) with one-line errors: prints
    ``name: error: ...`` and returns 1 instead of a traceback; 130 on Ctrl-C. Connection errors
    and 404s also name ``base_url`` when given."""
    try:
        return int(main())
    except KeyboardInterrupt:
        print(f"{name}: interrupted (finished items are kept; rerun to resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - unreachable server, missing data or files: one line
        where = ""
        if base_url and type(exc).__name__ in ("APIConnectionError", "APITimeoutError", "NotFoundError"):
            where = f" [--base-url {base_url}]"
        print(f"{name}: error: {_one_line(exc)}{where}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """``exc`` as one line; connection errors name their cause (e.g. connection refused)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if type(exc).__name__ in ("APIConnectionError", "APITimeoutError") and cause is not None:
        text += f" ({type(cause).__name__}: {cause})"
    return " ".join(text.split())[:500]
