"""The ``jaxsparse`` command. Each verb lives in its own module ``jaxsparse.cli.<verb>`` exposing
``add_parser(subparsers)`` (which registers the verb, its ``--help`` and a ``func``); heavy imports
(jax, transformers) happen inside the verb's function so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Module per verb, in the order `jaxsparse --help` lists them.
VERB_MODULES = (
    "train",
    "eval",
    "info",
    "classify",
    "export",
    "import_adapter",
    "merge",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxsparse",
        description="Sparse parameter-efficient fine-tuning in JAX: train, evaluate, convert and merge adapters.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(f"jaxsparse.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`jaxsparse info DIR | head`): not an error of ours. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
