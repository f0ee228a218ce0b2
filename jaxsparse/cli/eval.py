"""``jaxsparse eval``: evaluate an adapter on a config's held-out data."""

from __future__ import annotations

import argparse
import json

from jaxsparse.cli.train import add_config_args, load

DESCRIPTION = """\
Evaluate the adapter in --adapter DIR on the held-out split of the config's data (the same split
training used). Classification prints loss, accuracy and macro-F1; causal-LM prints perplexity
before (base model) and after (with the adapter); masked-LM (task masked_lm) prints masked-token
loss, accuracy and perplexity on one fixed masking of the held-out split, and perplexity before.

examples:
  jaxsparse eval --adapter runs/default/adapter
  jaxsparse eval --config configs/sparta_minilm_bbc_news.yaml --adapter runs/bbc/adapter --json
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate an adapter on a config's held-out data",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter directory written by `jaxsparse train`"
    )
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load(args)
    from jaxsparse.trainer import evaluate_adapter

    # A bad adapter or data is one line on stderr and exit 2, via jaxsparse.cli.main.
    metrics = evaluate_adapter(cfg, args.adapter)
    if args.json:
        print(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return 0
