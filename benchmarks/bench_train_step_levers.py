"""Training-step levers of issue 14, before and after, in one process: jaxsparse vs PyTorch PEFT.

Every contender is built by ``bench_train_step.py`` (MiniLM-L6 seq-cls, 16x128 real batch, AdamW) and
timed interleaved (one step of each per round). A variant may trace its step with earlier
implementations patched in (:func:`patched`), so one run compares the library with and without
each change:

- ``dot3d``: the ``factored._dot`` before issue 14, contracting the 3-D input (BENCHMARKS.md 2c);
- ``einsum-attention``: attention on (B, T, N, D) einsums, as before ``heads_major`` (2d);
- ``erfc-gelu``: ``jax.nn.gelu(approximate=False)``, which goes through ``erfc`` (2d).

``-s7`` variants carry the last two (the model code at the end of session 7), ``-before`` all
three; both with this tree's remat default.
The other levers (sampled-gradient threshold, remat: ``-remat`` every block recomputed,
``-noremat`` off, the default ``"dots"`` as ``jaxsparse train``; donation, LoRA dense form, the
XLA:CPU dot library) use the current code.

    python benchmarks/bench_train_step_levers.py                      # every contender, 5 rounds
    python benchmarks/bench_train_step_levers.py --only lora-s7 lora peft-lora --rounds 3

Writes ``benchmarks/results/train_step_levers_run.json`` (``--out``); sections 2c-2d of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

S7 = ("einsum-attention", "erfc-gelu")

# XNNPACK instead of YNNPACK for XLA:CPU's dots, as per-program compiler options (not XLA_FLAGS)
XNN_DOTS = {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
}
# neither library: XLA's own (Eigen) dot emitter
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# name: (bench_train_step method, patches (None: a PyTorch contender), build_jax keyword levers)
VARIANTS: dict[str, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {
    "shira-before": ("jax-shira", ("dot3d", *S7), {}),
    "shira-s7": ("jax-shira", S7, {}),
    "shira": ("jax-shira", (), {}),
    "shira-einsum-attention": ("jax-shira", ("einsum-attention",), {}),
    "shira-erfc-gelu": ("jax-shira", ("erfc-gelu",), {}),
    "shira-densegrad": ("jax-shira", (), {"sampled_max_density": 0.0}),
    "shira-sampled5%": ("jax-shira", (), {"sampled_max_density": 0.05}),
    "shira-remat": ("jax-shira", (), {"remat": True}),
    "shira-noremat": ("jax-shira", (), {"remat": False}),
    "shira-nodonate": ("jax-shira", (), {"donate": False}),
    "shira-xnndots": ("jax-shira", (), {"extra_compiler_options": XNN_DOTS}),
    "shira-eigendots": ("jax-shira", (), {"extra_compiler_options": EIGEN_DOTS}),
    "lora-before": ("jax-lora", ("dot3d", *S7), {}),
    "lora-s7": ("jax-lora", S7, {}),
    "lora": ("jax-lora", (), {}),
    "lora-dense": ("jax-lora-dense", (), {}),
    "lora-noremat": ("jax-lora", (), {"remat": False}),
    "lora-xnndots": ("jax-lora", (), {"extra_compiler_options": XNN_DOTS}),
    "lora-eigendots": ("jax-lora", (), {"extra_compiler_options": EIGEN_DOTS}),
    "full-s7": ("jax-full", S7, {}),
    "full": ("jax-full", (), {}),
    "peft-shira": ("peft-shira", None, {}),
    "peft-lora": ("peft-lora", None, {}),
    "torch-full": ("torch-full", None, {}),
}


def old_dot(x, w, precision):
    """``factored._dot`` before issue 14: contracts the last axis of an N-D ``x`` directly."""
    import jax

    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


@contextlib.contextmanager
def patched(patches: tuple[str, ...]) -> Iterator[None]:
    """Build and trace inside this context to get the earlier implementations named in ``patches``."""
    import jax

    from jaxsparse import factored
    from jaxsparse.models import layers

    unknown = set(patches) - {"dot3d", *S7}
    if unknown:
        raise ValueError(f"unknown patches {sorted(unknown)}")
    saved = (
        factored._dot,
        layers.dot_product_attention,
        dict(layers.ACTIVATIONS),
    )
    if "dot3d" in patches:
        factored._dot = old_dot
    if "einsum-attention" in patches:
        attention = layers.dot_product_attention
        layers.dot_product_attention = lambda *a, heads_major=False, **k: attention(*a, **k)
    if "erfc-gelu" in patches:
        layers.ACTIVATIONS["gelu"] = partial(jax.nn.gelu, approximate=False)
    try:
        yield
    finally:
        factored._dot, layers.dot_product_attention, activations = saved
        layers.ACTIVATIONS.clear()
        layers.ACTIVATIONS.update(activations)


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
            with patched(patches):
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
