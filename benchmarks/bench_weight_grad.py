"""The gradient of a sparse delta's values: dense ``x^T dy`` then gather, vs the sampled product.

For each kernel shape (MiniLM's 384x384 and 384x1536, SmolLM2's 576x1536) and density, both ways of
computing ``(x^T dy).flat[indices]`` are jitted and timed interleaved on the same random ``x`` (T, in),
``dy`` (T, out) and sorted random indices:

- ``dense``: the full product, then a gather of k entries (what autodiff does for ``W + delta``);
- ``sampled``: :func:`jaxsparse.factored.sampled_product` (k length-T dots from gathered rows).

The density where the two cross is what ``SAMPLED_MAX_DENSITY`` in ``jaxsparse/factored.py`` (and
``train.sampled_grad_max_density``) is set from; it depends on the accelerator, so rerun this there.

    python benchmarks/bench_weight_grad.py                                   # T = 2048 (16 x 128 tokens)
    python benchmarks/bench_weight_grad.py --tokens 4096 --densities 0.001 0.01

Writes benchmarks/results/weight_grad.json and benchmarks/plots/weight_grad.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SHAPES = ((384, 384), (384, 1536), (576, 1536))
DENSITIES = (0.001, 0.004, 0.01, 0.02, 0.03, 0.04, 0.08)


def bench_shape(fan_in: int, fan_out: int, tokens: int, densities: list[float], repeats: int) -> list[dict]:
    """One row per density: median/min ms of both contenders and their max abs difference."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsparse.factored import sampled_product

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((tokens, fan_in)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((tokens, fan_out)), jnp.float32)
    dense = jax.jit(lambda x, dy, idx: (x.T @ dy).reshape(-1)[idx])
    sampled = jax.jit(sampled_product)
    rows = []
    for density in densities:
        k = max(1, round(density * fan_in * fan_out))
        idx = jnp.asarray(np.sort(rng.choice(fan_in * fan_out, k, replace=False)), jnp.int32)
        diff = float(jnp.abs(dense(x, dy, idx) - sampled(x, dy, idx)).max())
        stats = common.interleaved(
            {
                "dense": lambda idx=idx: dense(x, dy, idx).block_until_ready(),
                "sampled": lambda idx=idx: sampled(x, dy, idx).block_until_ready(),
            },
            repeats=repeats,
        )
        rows.append({"density": density, "k": k, "max_abs_diff": diff, **stats})
        print(
            f"{fan_in}x{fan_out} T={tokens} density {density:.4f} (k={k}): dense {stats['dense']['median_ms']:.2f} ms, "
            f"sampled {stats['sampled']['median_ms']:.2f} ms, ratio {stats['sampled']['median_ms'] / stats['dense']['median_ms']:.2f}",
            file=sys.stderr,
        )
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
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "weight_grad.json")
    ap.add_argument("--plot", type=Path, default=common.PLOTS_DIR / "weight_grad.png")
    args = ap.parse_args(argv)

    record = {"machine_before": common.machine(), "tokens": args.tokens, "results": []}
    print(common.load_line(record["machine_before"]), file=sys.stderr)
    for fan_in, fan_out in SHAPES:
        rows = bench_shape(fan_in, fan_out, args.tokens, args.densities, args.repeats)
        record["results"].append({"fan_in": fan_in, "fan_out": fan_out, "tokens": args.tokens, "rows": rows})
    record["machine_after"] = common.machine()
    common.write_json(args.out, record)
    plot(record["results"], args.plot)
    print(f"wrote {args.out} and {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
