"""``jaxsparse import``: bring a PEFT (SHiRA/LoRA) or SpaRTA adapter into jaxsparse, checked against its base model.

The base-model loading it shares with ``export`` and ``merge`` is in :mod:`jaxsparse.cli.common`.
"""

from __future__ import annotations

import argparse

from jaxsparse.cli.common import ERRORS, describe, fail, load_base_for_adapter

DESCRIPTION = """\
Import an adapter written by PEFT (SHiRA or LoRA) or by the SpaRTA authors' code. It is checked
against the base model (architecture, every target exists, shapes, index ranges, finite values)
and written to --output in its native format with the weight shapes recorded, so jaxsparse (and
PEFT / SpaRTA) can load it. Nothing is written if any check fails.

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
    p.add_argument("--output", required=True, metavar="DIR", help="where to write the imported adapter")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from jaxsparse.adapter_io import load_adapter, save_adapter

        model, hints = load_base_for_adapter(args.model, args.adapter)
        adapter = load_adapter(args.adapter, model=model)
        save_adapter(
            adapter, args.output, format=hints["format"], model=model, base_model_name_or_path=args.model
        )
    except ERRORS as e:
        return fail("import", e)
    print(f"imported {hints['format']} adapter ({describe(adapter)}) -> {args.output}")
    return 0
