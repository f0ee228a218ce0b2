"""``jaxsparse quantize``: RTN or GPTQ weight quantization of a model's block linears into a GPTQ checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Quantize the linear layers inside the transformer blocks (q/k/v/o/gate/up/down on a Llama; never the
embeddings or the head) to --bits integers in groups of --group-size inputs, and write a Hugging Face
directory in the GPTQ layout (qweight/qzeros/scales/g_idx, quantization_config in config.json, the
classic "gptq" checkpoint format that transformers/optimum, AutoGPTQ and gptqmodel read) plus the
tokenizer. With --dequantized the directory holds plain floating-point weights instead (the values
the quantized model computes), for tools without a GPTQ backend. MODEL is a local HF directory or a
.gguf file (dequantized on load).

  rtn   round each weight to the nearest point of its group's grid
  gptq  GPTQ (Frantar et al. 2022): quantize input rows one by one, compensating each rounding
        error on the remaining rows through the inverse Hessian 2 X^T X of the layer's inputs X,
        captured block by block on calibration text (quantized earlier blocks feed later ones)

Weights that are exactly zero stay exactly zero (a pruned model stays sparse). The grid is
asymmetric (a zero point per group) unless --sym. --group-size -1 means one group per output
column. --calibration is a text file, a .jsonl file ("text" field) or an offline corpus (bbc_news,
rotten_tomatoes). An already quantized model (quantization_config in config.json) is refused. The
output directory appears complete or not at all; it also holds quantization.json (the settings).

examples:
  jaxsparse quantize --model SmolLM2-135M-Instruct.Q4_1.gguf --method gptq --bits 4 --group-size 64 \\
      --calibration bbc_news --samples 32 --seq-len 256 --output smollm2-gptq4/
  jaxsparse quantize --model smollm2-wanda50/ --method gptq --group-size 64 --sym --desc-act --output sparse-int4/
  jaxsparse quantize --model path/to/hf-model --method rtn --bits 8 --group-size -1 --dequantized --output out/
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from jaxsparse.cli.common import add_calibration_args

    p = subparsers.add_parser(
        "quantize",
        help="quantize a model's block linears (RTN or GPTQ; 2/4/8 bits) into a GPTQ checkpoint",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="MODEL", help="a local HF directory or a .gguf file")
    p.add_argument("--method", required=True, choices=("rtn", "gptq"), help="quantization algorithm")
    p.add_argument("--bits", type=int, default=4, metavar="B", help="bits per weight: 2, 4 or 8 (default: 4)")
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        metavar="G",
        help="inputs sharing one scale/zero point; must divide every layer's input width, -1 for one "
        "group (default: 128)",
    )
    p.add_argument(
        "--sym", action="store_true", help="symmetric grid (zero point 2**(bits-1)) instead of asymmetric"
    )
    p.add_argument(
        "--desc-act",
        action="store_true",
        help="GPTQ act-order: quantize inputs by decreasing Hessian diagonal (written as desc_act + g_idx)",
    )
    p.add_argument(
        "--damp-percent",
        type=float,
        default=0.01,
        metavar="D",
        help="GPTQ damping, a fraction of the Hessian's mean diagonal added to it (default: 0.01)",
    )
    add_calibration_args(p, used_by="GPTQ")
    p.add_argument("--output", required=True, metavar="DIR", help="where to write the quantized checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a previous jaxsparse output in DIR (nothing else)"
    )
    p.add_argument(
        "--dequantized",
        action="store_true",
        help="write plain floating-point weights (the dequantized values) instead of the GPTQ layout",
    )
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> None:
    from jaxsparse.cli.common import check_calibration_args
    from jaxsparse.quant.grid import check_spec

    check_spec(args.bits, args.group_size)
    if not 0 <= args.damp_percent < 1:
        raise ValueError(f"--damp-percent must be in [0, 1), got {args.damp_percent}")
    check_calibration_args(args)
    if args.desc_act and args.method != "gptq":
        raise ValueError("--desc-act is a GPTQ option (act-order); it has no meaning for --method rtn")


def refuse_quantized(model_path: str) -> None:
    """``ValueError`` when ``model_path`` is an HF directory whose config.json declares a quantization."""
    import os

    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        return
    try:
        with open(config_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_file}: not readable JSON ({e})") from None
    qcfg = raw.get("quantization_config") if isinstance(raw, dict) else None
    if qcfg:
        method = qcfg.get("quant_method", "unknown") if isinstance(qcfg, dict) else "unknown"
        raise ValueError(
            f"{model_path} is already quantized (quantization_config.quant_method {method!r} in config.json); "
            "quantize the original floating-point model instead"
        )


def run(args: argparse.Namespace) -> int:
    from jaxsparse.cli.common import ERRORS, fail

    try:
        _validate(args)
        from jaxsparse.atomic import atomic_dir, check_output_dir

        check_output_dir(args.output, overwrite=args.overwrite)  # before any model is loaded
        refuse_quantized(args.model)
        from jaxsparse.cli.common import tokenizer_and_calibration
        from jaxsparse.models import from_pretrained, save_pretrained
        from jaxsparse.quant.quantizer import check_model_widths, quantizable_linears, quantize_model
        from jaxsparse.quant.save import save_gptq

        model = from_pretrained(args.model)
        paths = quantizable_linears(model)
        check_model_widths(model, paths, bits=args.bits, group_size=args.group_size)
        tokenizer, cal, cal_settings = tokenizer_and_calibration(
            args, needed_by="GPTQ" if args.method == "gptq" else None
        )
        quantized_model, layers = quantize_model(
            model,
            method=args.method,
            bits=args.bits,
            group_size=args.group_size,
            sym=args.sym,
            act_order=args.desc_act,
            damp_percent=args.damp_percent,
            input_ids=None if cal is None else cal.input_ids,
            attention_mask=None if cal is None else cal.attention_mask,
            batch_size=args.batch_size,
        )
        settings = {
            "method": args.method,
            "bits": args.bits,
            "group_size": args.group_size,
            "sym": args.sym,
            "desc_act": args.desc_act,
            "damp_percent": args.damp_percent,
            "layers": len(layers),
            "format": "dequantized" if args.dequantized else "gptq",
            "model": str(args.model),
        }
        if cal_settings is not None:
            settings["calibration"] = cal_settings
        with atomic_dir(args.output, overwrite=args.overwrite, verb="quantize") as tmp:
            if args.dequantized:
                save_pretrained(quantized_model, tmp)
            else:
                save_gptq(
                    model,
                    layers,
                    tmp,
                    desc_act=args.desc_act,
                    damp_percent=args.damp_percent,
                    method=args.method,
                )
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            with open(f"{tmp}/quantization.json", "w", encoding="utf-8") as f:
                json.dump({"settings": settings}, f, indent=2)
                f.write("\n")
    except ERRORS as e:
        return fail("quantize", e)
    kind = "plain dequantized weights" if args.dequantized else "GPTQ layout"
    print(
        f"quantized {len(layers)} layers of {args.model} with {args.method} to {args.bits} bits "
        f"(group size {args.group_size}, {'sym' if args.sym else 'asym'}) -> {args.output} ({kind})",
        file=sys.stdout,
    )
    return 0
