"""``jaxsparse merge``: write base model + adapter as one Hugging Face checkpoint transformers loads."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jaxsparse.cli.common import add_output_args

DESCRIPTION = """\
Merge an adapter (jaxsparse, PEFT SHiRA/LoRA or SpaRTA) into its base model and write a Hugging
Face checkpoint (config.json + model.safetensors, sharded above --max-shard-size, and the base
model's tokenizer when it has one) that transformers.AutoModel*.from_pretrained loads with no
adapter library. MODEL is a local Hugging Face directory or a .gguf file (dequantized on load; the
merged checkpoint is full precision). A sequence-classification adapter gives a
*ForSequenceClassification checkpoint with its head. --output must be a new or empty directory
(--overwrite replaces a previous jaxsparse output, nothing else); it appears complete or not at all.

examples:
  jaxsparse merge --model path/to/hf-model --adapter runs/shira/adapter --output merged/
  jaxsparse merge --model SmolLM2-135M-Instruct.Q4_1.gguf --adapter runs/sparta/adapter --output merged/
  jaxsparse merge --model big-model/ --adapter runs/shira/adapter --output merged/ --max-shard-size 5GB
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge an adapter into its base model and write a Hugging Face checkpoint",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, metavar="MODEL", help="base model: a local HF directory or a .gguf file"
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory")
    add_output_args(p, what="where to write the merged checkpoint")
    p.add_argument(
        "--max-shard-size",
        default="50GB",
        metavar="SIZE",
        help="largest safetensors file, e.g. 5GB or 500MiB (transformers' units); above it the weights "
        "are sharded with a model.safetensors.index.json (default: %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Errors reach the user as one line through :func:`jaxsparse.cli.main`."""
    from jaxsparse import merge
    from jaxsparse.adapter_io import load_adapter
    from jaxsparse.atomic import atomic_dir, check_output_dir
    from jaxsparse.cli.common import describe, load_base_for_adapter
    from jaxsparse.models import load_tokenizer, save_pretrained
    from jaxsparse.models.hub import parse_size

    # A bad size or output fails before any model is loaded.
    parse_size(args.max_shard_size)
    check_output_dir(args.output, overwrite=args.overwrite)
    model, _ = load_base_for_adapter(args.model, args.adapter, verb="merge")
    adapter = load_adapter(args.adapter, model=model)
    merged_params, _ = merge.merge(model.params, adapter)
    merged = dataclasses.replace(model, params=merged_params)
    try:
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None  # a bare weights directory (or a GGUF without a vocabulary): nothing to copy
    # One output directory for the weights and the tokenizer: save_pretrained writes into the
    # (empty) temporary directory, and the whole lands in --output at once.
    with atomic_dir(args.output, overwrite=args.overwrite, verb="merge") as tmp:
        save_pretrained(merged, tmp, max_shard_size=args.max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    note = "" if tokenizer is not None else " (the base model has no tokenizer to copy)"
    print(f"merged {describe(adapter)} into {args.model} -> {args.output}{note}", file=sys.stdout)
    return 0
