"""``jaxsparse check-sparsity``: zeros per layer, per block and overall in a model's block linears."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Count the exact zeros in a model's linear layers: per layer (with the N:M pattern its zeros
satisfy, 2:4 or 4:8, if any), per block and overall. By default the linears inside the transformer
blocks (what `jaxsparse prune` prunes); --all-linears counts every 2-D kernel (heads included).
MODEL is a local HF directory or a .gguf file.

examples:
  jaxsparse check-sparsity --model smollm2-wanda50/
  jaxsparse check-sparsity --model smollm2-wanda50/ --json > sparsity.json
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check-sparsity",
        help="report zeros per layer / block / overall in a model's linear layers",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="MODEL", help="a local HF directory or a .gguf file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--all-linears", action="store_true", help="every 2-D kernel, not only the block linears")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxsparse.cli.common import ERRORS, fail

    try:
        from jaxsparse.calibration import BLOCK_RUNNERS, linear_paths
        from jaxsparse.models import from_pretrained
        from jaxsparse.prune import sparsity_report

        model = from_pretrained(args.model)
        modules = None
        if not args.all_linears and model.model_type in BLOCK_RUNNERS:
            modules = linear_paths(model)
        report = sparsity_report(model.params, modules)
    except ERRORS as e:
        return fail("check-sparsity", e)
    print(report.dumps() if args.json else report.table())
    return 0
