"""``jaxsparse prune``: Wanda or magnitude pruning of a model's block linears into a new HF checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Prune the linear layers inside the transformer blocks (q/k/v/o/gate/up/down on a Llama; never the
embeddings or the head) and write a Hugging Face checkpoint (config.json + plain safetensors +
tokenizer) that transformers loads. MODEL is a local HF directory or a .gguf file.

  magnitude  zero the smallest |W| of each output row
  wanda      zero the smallest |W_ij| * ||X_j||_2 of each output row, X the layer's input on
             calibration text, captured block by block (pruned earlier blocks feed later ones)

--pattern unstructured zeroes floor(sparsity * in) weights in every output row; N:M (2:4, 4:8)
keeps the N largest of every M consecutive inputs (sparsity 1 - N/M). --calibration is a text
file, a .jsonl file ("text" field) or an offline corpus (bbc_news, rotten_tomatoes); --samples
windows of --seq-len tokens are drawn from it with --seed. The output directory appears complete or
not at all; it also holds pruning.json (the settings and the sparsity report).

examples:
  jaxsparse prune --model SmolLM2-135M-Instruct.Q4_1.gguf --method wanda --sparsity 0.5 \\
      --calibration bbc_news --samples 32 --seq-len 256 --output smollm2-wanda50/
  jaxsparse prune --model path/to/hf-model --method wanda --pattern 2:4 --calibration calib.jsonl --output out/
  jaxsparse prune --model path/to/hf-model --method magnitude --sparsity 0.3 --targets q_proj v_proj --output out/
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from jaxsparse.cli.common import add_calibration_args

    p = subparsers.add_parser(
        "prune",
        help="prune a model's block linears (Wanda or magnitude; unstructured or N:M)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="MODEL", help="a local HF directory or a .gguf file")
    p.add_argument("--method", required=True, choices=("wanda", "magnitude"), help="pruning score")
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        metavar="S",
        help="fraction of each output row to zero, in [0, 1) (required for unstructured; N:M implies 1-N/M)",
    )
    p.add_argument(
        "--pattern",
        default="unstructured",
        metavar="PATTERN",
        help="unstructured, 2:4 or 4:8 (any N:M with 0 < N < M) (default: %(default)s)",
    )
    add_calibration_args(p, used_by="Wanda")
    p.add_argument(
        "--targets",
        nargs="+",
        default=None,
        metavar="NAME",
        help="PEFT-style target_modules restricting which block linears are pruned (names or path suffixes)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="where to write the pruned checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a previous jaxsparse output in DIR (nothing else)"
    )
    p.add_argument("--json", action="store_true", help="print the sparsity report as JSON on stdout")
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace):
    from jaxsparse.cli.common import check_calibration_args
    from jaxsparse.prune import prune_spec

    spec = prune_spec(args.method, args.sparsity, args.pattern)
    check_calibration_args(args)
    return spec


def run(args: argparse.Namespace) -> int:
    from jaxsparse.cli.common import ERRORS, fail

    try:
        spec = _validate(args)
        from jaxsparse.atomic import atomic_dir, check_output_dir

        check_output_dir(args.output, overwrite=args.overwrite)  # before any model is loaded
        from jaxsparse.cli.common import tokenizer_and_calibration
        from jaxsparse.models import from_pretrained, save_pretrained
        from jaxsparse.prune import check_pattern_widths, prunable_linears, prune_model, sparsity_report

        model = from_pretrained(args.model)
        targets = prunable_linears(model, args.targets)
        check_pattern_widths(model, targets, spec.pattern)  # an N:M width error before calibration work
        tokenizer, cal, cal_settings = tokenizer_and_calibration(
            args, needed_by="Wanda" if spec.method == "wanda" else None
        )
        pruned = prune_model(
            model,
            method=spec.method,
            sparsity=spec.sparsity,
            pattern=spec.pattern,
            targets=args.targets,
            input_ids=None if cal is None else cal.input_ids,
            attention_mask=None if cal is None else cal.attention_mask,
            batch_size=args.batch_size,
        )
        report = sparsity_report(pruned.params, prunable_linears(pruned))
        settings = {
            "method": spec.method,
            "sparsity": spec.sparsity,
            "pattern": str(spec.pattern),
            "targets": targets,
            "model": str(args.model),
        }
        if cal_settings is not None:
            settings["calibration"] = cal_settings
        with atomic_dir(args.output, overwrite=args.overwrite, verb="prune") as tmp:
            save_pretrained(pruned, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            with open(f"{tmp}/pruning.json", "w", encoding="utf-8") as f:
                json.dump({"settings": settings, "report": report.to_json()}, f, indent=2)
                f.write("\n")
    except ERRORS as e:
        return fail("prune", e)
    if args.json:
        print(report.dumps())
    else:
        print(
            f"pruned {len(report.layers)} layers of {args.model} with {spec.method} ({spec.pattern}): "
            f"{report.overall.sparsity:.2%} of their weights are zero -> {args.output}",
            file=sys.stdout,
        )
    return 0
