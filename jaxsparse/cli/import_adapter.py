"""``jaxsparse import``: bring a PEFT (SHiRA/LoRA) or SpaRTA adapter into jaxsparse, checked against its base model.

The base-model loading it shares with ``export`` and ``merge`` is in :mod:`jaxsparse.cli.common`.
"""

from __future__ import annotations

import argparse
import os

from jaxsparse.cli.common import add_output_args, describe, load_base_for_adapter

DESCRIPTION = """\
Import an adapter written by PEFT (SHiRA or LoRA) or by the SpaRTA authors' code. It is checked
against the base model (architecture, every target exists, shapes, index ranges, finite values)
and written to --output in its native format with the weight shapes recorded, so jaxsparse (and
PEFT / SpaRTA) can load it. The written config records the base model it was checked against (its
absolute path: base_model_name_or_path, or sparta_pretrained_model), so `jaxsparse export` and
`jaxsparse merge` of the result find it without --model. Nothing is written if any check fails;
--output must be a new or empty directory (--overwrite replaces a previous jaxsparse output).

examples:
  jaxsparse import --adapter peft-lora-dir --model path/to/hf-model --output adapters/lora
  jaxsparse import --adapter sparta-dir --model SmolLM2-135M-Instruct.Q4_1.gguf --output adapters/sparta
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import",
        help="import a PEFT SHiRA/LoRA or SpaRTA adapter, validated against its base model",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter directory (PEFT or SpaRTA layout)"
    )
    p.add_argument(
        "--model", required=True, metavar="MODEL", help="base model: a local HF directory or a .gguf file"
    )
    add_output_args(p, what="where to write the imported adapter")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Errors reach the user as one line through :func:`jaxsparse.cli.main`."""
    from jaxsparse.adapter_io import load_adapter, save_adapter
    from jaxsparse.atomic import check_output_dir

    check_output_dir(args.output, overwrite=args.overwrite)  # before any model is loaded
    model, hints = load_base_for_adapter(args.model, args.adapter)
    adapter = load_adapter(args.adapter, model=model)
    # The base it was validated against, as a path transformers and `jaxsparse export` can open.
    base = hints.get("model_path") or os.path.abspath(args.model)
    save_adapter(
        adapter,
        args.output,
        format=hints["format"],
        model=model,
        base_model_name_or_path=base,
        overwrite=args.overwrite,
    )
    print(f"imported {hints['format']} adapter ({describe(adapter)}) -> {args.output}")
    return 0
