"""The ``openmini`` command: pull | models | generate | serve | chat | eval."""

from __future__ import annotations

import argparse
import sys


def _cmd_pull(args: argparse.Namespace) -> int:
    from openmini.loaders.registry import pull
    path = pull(args.name)
    print(path)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from openmini.loaders.registry import list_models
    rows = list_models()
    for m in rows:
        print(f"{m.name:32s} {'pulled' if m.pulled else 'not pulled':10s} {m.description}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from openmini.entrypoints.llm import LLM
    from openmini.sampling_params import SamplingParams
    llm = LLM(model=args.model, dtype=args.dtype)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed)
    if args.raw:
        out = llm.generate(args.prompt, params)[0]
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    print(out.outputs[0].text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``openmini`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from openmini.api.server import serve_main
        return serve_main(argv[1:])
    if argv and argv[0] == "chat":
        from openmini.entrypoints.chat_cli import main as chat_main
        return chat_main(argv[1:])
    if argv and argv[0] == "eval":
        from openmini.evals.tasks import eval_main
        return eval_main(argv[1:])
    from openmini.loaders.registry import DEFAULT_MODEL
    parser = argparse.ArgumentParser(prog="openmini", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pull", help="download a named model into $OPENMINI_HOME")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=_cmd_pull)
    p = sub.add_parser("models", help="list the embedded models")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("generate", help="generate text for one prompt")
    p.add_argument("prompt")
    p.add_argument("--model", default=DEFAULT_MODEL, help="name, GGUF path or HF directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32"])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="no chat template: plain text completion")
    p.set_defaults(func=_cmd_generate)
    sub.add_parser("serve", help="run the OpenAI-compatible HTTP server (see `serve --help`)")
    sub.add_parser("chat", help="terminal chat (see `chat --help`)")
    sub.add_parser("eval", help="run an evaluation task against a server: niah | mmlu | ifeval | graphwalks "
                                "(see `eval TASK --help`)")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, RuntimeError) as exc:  # missing model, bad file, pull failure
        print(f"openmini {args.cmd}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
