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

SQFT adapters: a "sparse_adapter" one keeps MODEL's zeros (the update is masked by them); a
"quantization_aware" (QA-SparsePEFT) one takes the GPTQ MODEL plus --non-quant-model, the
non-quantized sparse model it was quantized from (SQFT's merge arguments), and writes a GPTQ
checkpoint: each adapted layer is quantize(W + masked update) on MODEL's own grid (scales, zeros,
g_idx unchanged), the other layers MODEL's, so the result is sparse and INT-k.

examples:
  jaxsparse merge --model path/to/hf-model --adapter runs/shira/adapter --output merged/
  jaxsparse merge --model runs/gptq --non-quant-model runs/sparse --adapter runs/sqft_qa/adapter --output merged/
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
    p.add_argument(
        "--non-quant-model",
        metavar="DIR",
        help="for a quantization_aware (QA-SparsePEFT) adapter: the non-quantized sparse model the GPTQ "
        "--model was quantized from (its weights are what the update is added to before rounding)",
    )
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
    from jaxsparse.cli.quantization_aware import check_non_quant_args
    from jaxsparse.models import load_tokenizer, save_pretrained
    from jaxsparse.models.hub import parse_size

    # A bad size or output fails before any model is loaded.
    parse_size(args.max_shard_size)
    check_output_dir(args.output, overwrite=args.overwrite)
    if check_non_quant_args([args.adapter], args.non_quant_model, verb="merge"):
        return _merge_quantization_aware(args)
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


def _merge_quantization_aware(args: argparse.Namespace) -> int:
    """QA-SparsePEFT's merge (SQFT's ``utils/merge.py`` with ``--non_quant_base_model_path``): a GPTQ
    checkpoint whose adapted layers hold ``quantize(W + masked update)`` on the GPTQ base's grid."""
    from jaxsparse import tree as tree_lib
    from jaxsparse.atomic import atomic_dir
    from jaxsparse.cli.common import describe
    from jaxsparse.cli.quantization_aware import load_quantization_aware
    from jaxsparse.methods import sqft
    from jaxsparse.models import load_tokenizer
    from jaxsparse.quant.save import save_gptq

    qa = load_quantization_aware(args.model, args.non_quant_model, args.adapter, verb="merge")
    adapter, qconfig = qa.adapter, qa.qconfig
    layers = sqft.merged_gptq_layers(qa.model.params, adapter, qa.layers)
    # Unquantized leaves are written from the GPTQ model, with the adapter's full tensors
    # (modules_to_save, e.g. a classifier head) in place.
    model = dataclasses.replace(
        qa.gptq_model, params=tree_lib.replace_leaves(qa.gptq_model.params, adapter.dense)
    )
    try:
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None
    meta = qconfig.get("meta") if isinstance(qconfig.get("meta"), dict) else {}
    with atomic_dir(args.output, overwrite=args.overwrite, verb="merge") as tmp:
        save_gptq(
            model,
            layers,
            tmp,
            desc_act=bool(qconfig.get("desc_act", False)),
            damp_percent=float(qconfig.get("damp_percent", 0.01)),
            checkpoint_format=qconfig.get("checkpoint_format") or "gptq",
            method=str(meta.get("method", "gptq")),
            max_shard_size=args.max_shard_size,
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    print(
        f"merged {describe(adapter)} into {args.model} on its GPTQ grid ({len(adapter.deltas)} of "
        f"{len(layers)} quantized layers re-quantized from {args.non_quant_model}) -> {args.output}",
        file=sys.stdout,
    )
    return 0
