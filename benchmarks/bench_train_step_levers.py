"""Training-step levers of issue 14, before and after, in one process: jaxsparse vs PyTorch PEFT.

Every contender is built by ``bench_train_step.py`` (MiniLM-L6 seq-cls, 16x128 real batch, AdamW) and
timed interleaved (one step of each per round). "before" variants trace the step with the
``factored._dot`` this issue replaced (:func:`old_dot`, contracting the 3-D input), patched in while
tracing. ``-headsmajor`` variants trace it with the attention layout that was tried and reverted
(:func:`heads_major_attention`: faster here, but the KV-cache decode then drifts from a full
recomputation by more than 1e-5; BENCHMARKS.md 2c). The other levers (sampled-gradient threshold,
remat, donation, LoRA dense form) use the current code.

    python benchmarks/bench_train_step_levers.py                      # all 16 contenders, 5 rounds
    python benchmarks/bench_train_step_levers.py --only lora-before lora-after peft-lora --rounds 3

Writes ``benchmarks/results/train_step_levers_run.json`` (``--out``); section 2c of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# name: (bench_train_step method, (heads-major attention, legacy _dot), build_jax keyword levers)
VARIANTS: dict[str, tuple[str, tuple[bool, bool] | None, dict[str, Any]]] = {
    "shira-before": ("jax-shira", (False, True), {}),
    "shira-after": ("jax-shira", (False, False), {}),
    "shira-after-headsmajor": ("jax-shira", (True, False), {}),
    "shira-after-densegrad": ("jax-shira", (False, False), {"sampled_max_density": 0.0}),
    "shira-after-sampled5%": ("jax-shira", (False, False), {"sampled_max_density": 0.05}),
    "shira-after-remat": ("jax-shira", (False, False), {"remat": True}),
    "shira-after-nodonate": ("jax-shira", (False, False), {"donate": False}),
    "lora-before": ("jax-lora", (False, True), {}),
    "lora-after": ("jax-lora", (False, False), {}),
    "lora-after-headsmajor": ("jax-lora", (True, False), {}),
    "lora-after-dense": ("jax-lora-dense", (False, False), {}),
    "full-before": ("jax-full", (False, True), {}),
    "full-after": ("jax-full", (False, False), {}),
    "peft-shira": ("peft-shira", None, {}),
    "peft-lora": ("peft-lora", None, {}),
    "torch-full": ("torch-full", None, {}),
}


def heads_major_attention(
    query, key, value, *, mask=None, scale=None, softcap=None, dropout=None, dropout_rate=0.0
):
    """``layers.dot_product_attention`` on heads-major (B, N, T, D) operands: the reverted lever
    (no grouped-query repeat: BERT has none)."""
    import jax
    import jax.numpy as jnp

    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    q, k, v = (jnp.swapaxes(t.astype(jnp.float32), 1, 2) for t in (query, key, value))
    scores = jnp.einsum("bnqd,bnkd->bnqk", q, k) * jnp.float32(scale)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        weights = dropout(weights, dropout_rate)
    return jnp.swapaxes(jnp.einsum("bnqk,bnkd->bnqd", weights, v), 1, 2).astype(query.dtype)


def old_dot(x, w, precision):
    """``factored._dot`` before issue 14: contracts the last axis of an N-D ``x`` directly."""
    import jax

    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


@contextlib.contextmanager
def patched(heads_major: bool, legacy_dot: bool) -> Iterator[None]:
    """Trace inside this context to get the chosen attention and ``_dot``."""
    from jaxsparse import factored
    from jaxsparse.models import layers

    saved = layers.dot_product_attention, factored._dot
    if heads_major:
        layers.dot_product_attention = heads_major_attention
    if legacy_dot:
        factored._dot = old_dot
    try:
        yield
    finally:
        layers.dot_product_attention, factored._dot = saved


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="a subset of the contenders")
    ap.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "train_step_levers_run.json")
    args = ap.parse_args(argv)

    import bench_train_step as bench
    import torch

    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {"machine_before": common.machine(), "threads": args.threads}
    print(common.load_line(record["machine_before"]), file=sys.stderr)
    batch = common.rotten_tomatoes_batch(16, args.seq_len)
    steps = {}
    for name in args.only or list(VARIANTS):
        method, patches, levers = VARIANTS[name]
        if patches is None:
            contender = bench.build_torch(method, batch)
            contender.step()
        else:
            with patched(*patches):
                contender = bench.build_jax(method, batch, **levers)
                contender.step()  # trace and compile with the chosen implementation
        steps[name] = contender.step
    record["steps"] = common.interleaved(steps, repeats=args.rounds, warmup=1, progress="levers")
    record["machine_after"] = common.machine()
    common.write_json(args.out, record)
    for name, s in record["steps"].items():
        print(f"{name:24s} median {s['median_ms']:7.0f} ms  min {s['min_ms']:7.0f} ms", file=sys.stderr)
    print(
        f"load {record['machine_before']['loadavg']} -> {record['machine_after']['loadavg']}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
