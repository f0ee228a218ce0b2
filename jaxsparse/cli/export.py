"""``jaxsparse export``: write an adapter in the layout PyTorch tools load (PEFT or SpaRTA)."""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Export an adapter for PyTorch users.

  --format peft    LoRA adapters as PEFT LoRA; sparse adapters (SHiRA, SpaRTA, ...) as PEFT SHiRA
                   (padded with zero entries to PEFT's r * (in + out) per weight: same model, and
                   peft.PeftModel.from_pretrained loads it). PEFT SHiRA supports nn.Linear only, so
                   sparse deltas on GPT-2 Conv1D layers are refused (use --format sparta).
  --format sparta  sparse adapters in the SpaRTA authors' layout (config.json + sparse_deltas.safetensors).

The base model (--model, or the local path the adapter records) is needed for PEFT LoRA inputs and
for a complete SpaRTA config.json; adapters written by jaxsparse export without it otherwise.
The output directory appears complete or not at all.

examples:
  jaxsparse export --adapter runs/shira/adapter --format peft --output exported/peft
  jaxsparse export --adapter runs/sparta/adapter --format sparta --model path/to/hf-model --output exported/sparta
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export an adapter as PEFT (LoRA/SHiRA) or SpaRTA",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory")
    p.add_argument("--format", required=True, choices=("peft", "sparta"), help="output layout")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--model",
        metavar="MODEL",
        help="base model (local HF directory or .gguf); default: the one the adapter records",
    )
    p.set_defaults(func=run)


def recorded_fan_in_fan_out(adapter_dir: str) -> tuple[str, ...]:
    """Modules our own files record as stored (in, out) in Hugging Face (GPT-2 Conv1D), from the layout
    metadata jaxsparse writes; empty for files other tools wrote."""
    from jaxsparse import tree as tree_lib
    from jaxsparse.convert import read_layout, read_safetensors

    for name in ("adapter_model.safetensors", "sparse_deltas.safetensors"):
        path = os.path.join(adapter_dir, name)
        if os.path.isfile(path):
            _, metadata = read_safetensors(path)
            layout = read_layout(metadata, path) or {}
            return tuple(
                sorted(
                    tree_lib.module_of(v["path"])
                    for v in layout.values()
                    if tree_lib.leaf_name(v["path"]) == "kernel" and not v["transposed"]
                )
            )
    return ()


def run(args: argparse.Namespace) -> int:
    from jaxsparse.cli.common import ERRORS, describe, fail, load_base_for_adapter

    try:
        from jaxsparse.adapter_io import load_adapter, save_adapter
        from jaxsparse.convert.peft import save_peft
        from jaxsparse.delta import LowRankDelta

        model = None
        try:
            model, _ = load_base_for_adapter(args.model, args.adapter, verb="export")
        except ValueError as e:
            if args.model is not None or "pass --model" not in str(e):
                raise
        fan_in_fan_out = model.fan_in_fan_out if model is not None else recorded_fan_in_fan_out(args.adapter)
        try:
            adapter = load_adapter(args.adapter, model=model, fan_in_fan_out=fan_in_fan_out)
        except ValueError as e:
            if model is None and "params" in str(e):
                raise ValueError(f"{e} (pass --model)") from None
            raise
        if args.format == "peft":
            written = save_peft(adapter, args.output, model=model, fan_in_fan_out=fan_in_fan_out)
        else:
            if any(isinstance(d, LowRankDelta) for d in adapter.deltas.values()):
                raise ValueError(
                    f"{args.adapter}: a LoRA adapter is not sparse, and the SpaRTA layout holds index/value deltas "
                    "only; export it with --format peft (or merge it into the model with `jaxsparse merge`)"
                )
            written = save_adapter(
                adapter, args.output, format="sparta", model=model, fan_in_fan_out=fan_in_fan_out
            )
            if model is None:
                print(
                    "jaxsparse export: note: without --model, config.json holds no base model config and no empty "
                    "entries for untouched parameters, which the SpaRTA authors' loaders expect",
                    file=sys.stderr,
                )
    except ERRORS as e:
        return fail("export", e)
    print(f"exported {describe(adapter)} as {written} -> {args.output}")
    return 0
