"""The gradient of a sparse delta's values: dense ``x^T dy`` then gather, vs the sampled product.

For each kernel shape (MiniLM's 384x384 and 384x1536, SmolLM2's 576x1536) and density, both ways of
computing ``(x^T dy).flat[indices]`` are jitted and timed interleaved on the same random ``x`` (T, in),
``dy`` (T, out) and sorted random indices:

- ``dense``: the full product, then a gather of k entries (what autodiff does for ``W + delta``);
- ``sampled``: :func:`jaxsparse.factored.sampled_product` (k length-T dots from gathered rows);
- with ``--token-chunks C ...``, also ``sampled, C-token chunks``: the same dots accumulated over
  chunks of C tokens (a scan), so each chunk's rows of ``x^T`` and ``dy^T`` stay in cache while the
  k entries gather from them (section 2f of BENCHMARKS.md: slower on the CPU, kept as a probe).

The density where the two cross is what ``SAMPLED_MAX_DENSITY`` in ``jaxsparse/factored.py`` (CPU) and
``ACCELERATOR_SAMPLED_MAX_DENSITY`` (GPU/TPU, 0 until measured) are set from, the thresholds behind
``train.sampled_grad_max_density: auto``; it depends on the device, so rerun this there.

    python benchmarks/bench_weight_grad.py                                   # T = 2048 (16 x 128 tokens)
    python benchmarks/bench_weight_grad.py --tokens 4096 --densities 0.001 0.01
    python benchmarks/bench_weight_grad.py --densities 0.01 0.026 0.042 --token-chunks 128 256

Writes benchmarks/results/weight_grad.json and benchmarks/plots/weight_grad.png.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SHAPES = ((384, 384), (384, 1536), (576, 1536))
DENSITIES = (0.001, 0.004, 0.01, 0.02, 0.03, 0.04, 0.08)


def token_chunked_sampled_product(x, dy, indices, chunk: int):
    """``(x^T dy).flat[indices]`` as a sum over chunks of ``chunk`` tokens (``tokens % chunk == 0``)."""
    import jax
    import jax.numpy as jnp

    fan_out = dy.shape[-1]
    n = x.shape[0] // chunk
    xc = x.reshape(n, chunk, -1).transpose(0, 2, 1)  # (chunks, in, chunk): a gathered row is contiguous
    dyc = dy.reshape(n, chunk, fan_out).transpose(0, 2, 1)
    rows, cols = indices // fan_out, indices % fan_out

    def add_chunk(acc, pair):
        xa, da = pair
        return acc + jnp.sum(xa[rows] * da[cols], axis=1), None

    out, _ = jax.lax.scan(add_chunk, jnp.zeros(indices.shape, jnp.float32), (xc, dyc))
    return out


def bench_shape(
    fan_in: int,
    fan_out: int,
    tokens: int,
    densities: list[float],
    repeats: int,
    token_chunks: tuple[int, ...] = (),
) -> list[dict]:
    """One row per density: median/min ms of each contender and its max abs difference from dense."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsparse.factored import sampled_product

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((tokens, fan_in)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((tokens, fan_out)), jnp.float32)
    dense = jax.jit(lambda x, dy, idx: (x.T @ dy).reshape(-1)[idx])
    sampled = jax.jit(sampled_product)
    chunked = {
        f"sampled, {c}-token chunks": jax.jit(partial(token_chunked_sampled_product, chunk=c))
        for c in token_chunks
    }
    rows = []
    for density in densities:
        k = max(1, round(density * fan_in * fan_out))
        idx = jnp.asarray(np.sort(rng.choice(fan_in * fan_out, k, replace=False)), jnp.int32)
        reference = dense(x, dy, idx)
        diff = float(jnp.abs(reference - sampled(x, dy, idx)).max())
        fns = {
            "dense": lambda idx=idx: dense(x, dy, idx).block_until_ready(),
            "sampled": lambda idx=idx: sampled(x, dy, idx).block_until_ready(),
        }
        diffs = {}
        for name, fn in chunked.items():
            diffs[name] = float(jnp.abs(reference - fn(x, dy, idx)).max())
            fns[name] = lambda idx=idx, fn=fn: fn(x, dy, idx).block_until_ready()
        stats = common.interleaved(fns, repeats=repeats)
        rows.append(
            {"density": density, "k": k, "max_abs_diff": diff, "max_abs_diff_chunked": diffs, **stats}
        )
        print(
            f"{fan_in}x{fan_out} T={tokens} density {density:.4f} (k={k}): dense {stats['dense']['median_ms']:.2f} ms, "
            f"sampled {stats['sampled']['median_ms']:.2f} ms, ratio {stats['sampled']['median_ms'] / stats['dense']['median_ms']:.2f}",
            file=sys.stderr,
        )
        for name in chunked:
            ratio = stats[name]["median_ms"] / stats["sampled"]["median_ms"]
            print(f"    {name}: {stats[name]['median_ms']:.2f} ms, {ratio:.2f}x sampled", file=sys.stderr)
    return rows


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for res in results:
        d = [r["density"] for r in res["rows"]]
        ratio = [r["sampled"]["median_ms"] / r["dense"]["median_ms"] for r in res["rows"]]
        ax.plot(d, ratio, marker="o", label=f"{res['fan_in']}x{res['fan_out']}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density k / numel")
    ax.set_ylabel("sampled / dense time (< 1: sampled wins)")
    ax.set_title(f"weight gradient at k entries, T={results[0]['tokens']} tokens", fontsize=10)
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=2048, help="rows of x and dy (batch x sequence)")
    ap.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--token-chunks",
        nargs="*",
        type=int,
        default=[],
        help="also time the sampled product summed over chunks of this many tokens (each must divide --tokens)",
    )
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "weight_grad.json")
    ap.add_argument("--plot", type=Path, default=common.PLOTS_DIR / "weight_grad.png")
    args = ap.parse_args(argv)
    if any(c <= 0 or args.tokens % c for c in args.token_chunks):
        ap.error(f"--token-chunks must divide --tokens ({args.tokens}), got {args.token_chunks}")

    record = {"machine_before": common.machine(), "tokens": args.tokens, "results": []}
    print(common.load_line(record["machine_before"]), file=sys.stderr)
    for fan_in, fan_out in SHAPES:
        rows = bench_shape(
            fan_in, fan_out, args.tokens, args.densities, args.repeats, tuple(args.token_chunks)
        )
        record["results"].append({"fan_in": fan_in, "fan_out": fan_out, "tokens": args.tokens, "rows": rows})
    record["machine_after"] = common.machine()
    common.write_json(args.out, record)
    plot(record["results"], args.plot)
    print(f"wrote {args.out} and {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
