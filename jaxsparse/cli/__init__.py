"""The ``jaxsparse`` command. Each verb lives in its own module ``jaxsparse.cli.<verb>`` exposing
``add_parser(subparsers)`` (which registers the verb, its ``--help`` and a ``func``); heavy imports
(jax, transformers) happen inside the verb's function so ``--help`` stays instant.

Errors are handled here, once for every verb: an error a config, a path or a file can cause
(:func:`jaxsparse.cli.common.is_user_error`) is one line on stderr and exit status 2; anything else
is a bug and keeps its traceback. ``JAXSPARSE_DEBUG=1`` shows the traceback of the former too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Before transformers is first imported: its advisory notices (e.g. "PyTorch was not found. Models
# won't be available ...") speak of transformers' own models, which jaxsparse does not use: they
# only concern the user who imports transformers themselves. Its real warnings stay on.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Module per verb, in the order `jaxsparse --help` lists them.
VERB_MODULES = (
    "train",
    "eval",
    "info",
    "classify",
    "generate",
    "export",
    "import_adapter",
    "merge",
    "prune",
    "quantize",
    "check_sparsity",
    "extract_sub_adapter",
)


EPILOG = """\
outputs:
  Verbs that write (train, export, import, merge) never delete or change a file they did not write.
  --output must be a new or empty directory (`--output .` works in an empty folder); a non-empty one
  is refused before any work. --overwrite replaces a previous jaxsparse output only: a directory
  holding the marker .jaxsparse-output.json and nothing the marker does not list. An output appears
  complete or not at all, with the permissions your umask gives.

errors:
  A mistake in a config, a path or a file is one line on stderr and exit status 2
  (JAXSPARSE_DEBUG=1 shows the traceback).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxsparse",
        description="Sparse parameter-efficient fine-tuning in JAX: train, evaluate, convert and merge adapters.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    from jaxsparse.cli.common import DEBUG_ENV, fail, is_user_error

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
    except Exception as e:
        if not is_user_error(e) or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        return fail(args.verb, e)


if __name__ == "__main__":
    sys.exit(main())
