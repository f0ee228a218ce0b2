"""``jaxsparse extract-sub-adapter``: a fixed-rank PEFT LoRA from an SQFT NLS super-adapter."""

from __future__ import annotations

import argparse
import sys

from jaxsparse.cli.common import add_output_args

DESCRIPTION = """\
Extract a sub-adapter from an NLS super-adapter (jaxsparse train with method: sqft and
adapter.search_space; its directory holds SQFT's elastic_adapter_config.json). Each NLS group
(the elastic modules of one decoder layer) gets one rank from its search space: --version maximal
(the first, largest), heuristic (SQFT's rule: the middle, index (len-1)//2), minimal (the last) or
custom with --ranks (one rank for every group, or one per group, each in the group's space). The
output is a standard PEFT LoRA directory (rank_pattern/alpha_pattern where ranks differ from r, the
super-adapter's scaling kept) that peft.PeftModel and `jaxsparse merge` load; SQFT's
sparse_adapter flag is kept, so `jaxsparse merge` still keeps the base's zeros.

examples:
  jaxsparse extract-sub-adapter --adapter runs/sqft/adapter --version heuristic --output sub/
  jaxsparse extract-sub-adapter --adapter runs/sqft/adapter --version custom --ranks 24 16 --output sub/
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract-sub-adapter",
        help="extract a fixed-rank PEFT LoRA sub-adapter from an SQFT NLS super-adapter",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="the NLS super-adapter directory")
    p.add_argument(
        "--version",
        default="heuristic",
        choices=("heuristic", "maximal", "minimal", "custom"),
        help="which sub-adapter (default: %(default)s)",
    )
    p.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        metavar="W",
        help="with --version custom: one rank, or one per NLS group",
    )
    add_output_args(p, what="where to write the sub-adapter")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Errors reach the user as one line through :func:`jaxsparse.cli.main`."""
    from jaxsparse.convert.sqft_extract import describe_ranks, extract_sub_adapter

    chosen = extract_sub_adapter(
        args.adapter, args.output, version=args.version, ranks=args.ranks, overwrite=args.overwrite
    )
    print(
        f"extracted the {args.version} sub-adapter ({describe_ranks(chosen)}) of {args.adapter} -> {args.output}",
        file=sys.stdout,
    )
    return 0
