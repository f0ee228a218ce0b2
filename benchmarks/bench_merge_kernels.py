"""What a merge and a switch cost in XLA's scatter primitives, against the floor (issue 14).

The profile behind BENCHMARKS.md section 1d. On one flat float32 buffer of SmolLM2-135M's
targeted size (106M entries) with k sorted random entries (SHiRA r=8's 2.44M by default), jitted
and donated, interleaved round by round:

- ``floor k``: one scatter-add of k entries (the issue's floor); ``floor 2k``: of A's and B's
  2k entries (what a switch must write);
- ``merge``: what ``jaxsparse.merge`` runs per weight: gather the k originals (kept for the
  bit-exact unmerge), scatter-set ``old + v``;
- ``merge, chunked``: the same as one loop over blocks of entries (gather then set per block, so
  the set finds the gathered cache lines hot);
- ``switch, 3 ops``: what ``jaxsparse.switch`` runs: set A's saved entries, gather B's, set B's;
- ``switch, 1 scatter``: gather B's, then one scatter of A's and B's entries concatenated (the
  overlap correction left out, so this is the best a single-scatter switch could do);
- per-weight programs on SmolLM2's 210 weight shapes: the fixed cost of the merge program with 16
  entries per weight, and with SHiRA r's entries (``jaxsparse.merge._scatter_donate`` itself), plus
  the host time of a full ``merge.merge`` call (structure checks, dispatch, tree rebuild); the
  fixed cost taken apart: the 210 donated buffers passed through a program that does nothing, the
  16-entry merges with their index/value arrays packed into two arguments, and the same entries
  merged into one buffer.

    python benchmarks/bench_merge_kernels.py                 # k = 2,442,240 (SHiRA r=8), 11 rounds
    python benchmarks/bench_merge_kernels.py --rank 2 --repeats 21

Writes benchmarks/results/merge_kernels.json.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# SmolLM2-135M's targeted linear weights (in, out), 30 blocks: q, k, v, o, gate, up, down.
SMOLLM2_SHAPES = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))
BLOCKS = 30


def flat_contenders(rank: int, seed: int = 0) -> tuple[dict, dict]:
    """``(fns, info)``: the flat-buffer formulations above as zero-argument callables."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    numel = BLOCKS * sum(m * n for m, n in SMOLLM2_SHAPES)
    k = BLOCKS * sum(rank * (m + n) for m, n in SMOLLM2_SHAPES)
    rng = np.random.default_rng(seed)
    a_idx = jnp.asarray(np.sort(rng.choice(numel, k, replace=False)).astype(np.int32))
    b_idx = jnp.asarray(np.sort(rng.choice(numel, k, replace=False)).astype(np.int32))
    two_k = jnp.asarray(np.sort(rng.choice(numel, 2 * k, replace=False)).astype(np.int32))
    both = jnp.concatenate([a_idx, b_idx])
    vals = jnp.asarray(rng.standard_normal(2 * k).astype(np.float32))
    v, v2 = vals[:k], vals
    hint = dict(indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds")

    def floor(buf, idx, upd):
        return buf.at[idx].add(upd, **hint)

    def merge(buf, idx, upd):
        old = buf.at[idx].get(**hint)
        return buf.at[idx].set(old + upd, **hint)

    def merge_chunked(buf, idx, upd, block=16384):
        n = idx.shape[0] // block  # k is cut to a multiple of the block by the caller

        def body(i, buf):
            at = jax.lax.dynamic_slice(idx, (i * block,), (block,))
            old = buf.at[at].get(**hint)
            add = jax.lax.dynamic_slice(upd, (i * block,), (block,))
            return buf.at[at].set(old + add, **hint)

        return jax.lax.fori_loop(0, n, body, buf)

    def switch3(buf, a, saved_a, b, upd):
        buf = buf.at[a].set(saved_a, **hint)
        old = buf.at[b].get(**hint)
        return buf.at[b].set(old + upd, **hint)

    def switch1(buf, both, saved_a, b, upd):
        old = buf.at[b].get(**hint)
        return buf.at[both].set(jnp.concatenate([saved_a, old + upd]), mode="promise_in_bounds")

    jitted = {
        name: jax.jit(fn, donate_argnums=0)
        for name, fn in (
            ("floor", floor),
            ("merge", merge),
            ("chunked", merge_chunked),
            ("s3", switch3),
            ("s1", switch1),
        )
    }
    block_k = (k // 16384) * 16384
    state = {"buf": jnp.zeros(numel, jnp.float32)}

    def run(name: str, *args):
        def call() -> None:
            state["buf"] = jitted[name](state["buf"], *args)
            state["buf"].block_until_ready()

        return call

    fns = {
        "floor k": run("floor", a_idx, v),
        "floor 2k": run("floor", two_k, v2),
        "merge (gather + set)": run("merge", b_idx, v),
        "merge, chunked (k cut to 16384s)": run("chunked", b_idx[:block_k], v[:block_k]),
        "switch, 3 ops": run("s3", a_idx, v, b_idx, v),
        "switch, 1 scatter (no overlap fix)": run("s1", both, v, b_idx, v),
    }
    return fns, {"numel": numel, "k": k, "chunked_k": block_k}


def per_weight_contenders(rank: int, seed: int = 1) -> tuple[dict, dict]:
    """The merge program over 210 SmolLM2-shaped weights, and a full ``merge.merge`` call."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsparse import merge
    from jaxsparse.delta import Adapter, SparseDelta

    rng = np.random.default_rng(seed)
    params = {
        f"b{i}": {
            f"w{j}": {"kernel": jnp.asarray(rng.standard_normal(shape, dtype=np.float32))}
            for j, shape in enumerate(SMOLLM2_SHAPES)
        }
        for i in range(BLOCKS)
    }
    deltas, tiny = {}, {}
    for i in range(BLOCKS):
        for j, (m, n) in enumerate(SMOLLM2_SHAPES):
            k = rank * (m + n)
            idx = np.sort(rng.choice(m * n, k, replace=False)).astype(np.int32)
            deltas[f"b{i}.w{j}.kernel"] = SparseDelta(
                jnp.asarray(idx), jnp.asarray(rng.standard_normal(k).astype(np.float32)), (m, n)
            )
            small = np.sort(rng.choice(m * n, 16, replace=False)).astype(np.int32)
            tiny[f"b{i}.w{j}.kernel"] = (jnp.asarray(small), jnp.ones(16, jnp.float32))
    adapter = Adapter(deltas)
    merge.validate(params, adapter)  # as load_adapter does
    state = {"params": params}
    from jaxsparse.tree import get_leaf, replace_leaves

    def on_host_weights(paths, fn):
        """A call that looks ``paths`` up, runs ``fn`` on those weights and puts its result back."""

        def call() -> None:
            new = fn({p: get_leaf(state["params"], p) for p in paths})
            state["params"] = replace_leaves(state["params"], new)
            jax.block_until_ready(new)

        return call

    def program(do: dict):
        return on_host_weights(do, lambda weights: merge._scatter_donate(weights, {}, do, {})[0])

    host = []

    def full_merge() -> None:
        import time

        t0 = time.perf_counter()
        merged, saved = merge.merge(state["params"], adapter, donate=True)
        host.append(time.perf_counter() - t0)  # returns once dispatched: the host's share
        state["params"] = merge.unmerge(merged, adapter, saved, donate=True)
        jax.block_until_ready(state["params"])

    # The fixed cost of a 210-weight program, taken apart: passing the donated buffers through with
    # no work; the same 16-entry merges with the 420 index/value arrays packed into two (212
    # arguments instead of 630); the same 3,360 entries merged into one buffer of the same size.
    paths = list(tiny)
    offsets = np.cumsum([0] + [len(tiny[p][0]) for p in paths])
    packed_idx = jnp.concatenate([tiny[p][0] for p in paths])
    packed_val = jnp.concatenate([tiny[p][1] for p in paths])

    @partial(jax.jit, donate_argnums=0)
    def pass_through(weights):
        return {p: w + 0 for p, w in weights.items()}  # aliased in place: no copy, no scatter

    @partial(jax.jit, donate_argnums=0)
    def packed_merge(weights, idx, values):
        pieces = {
            p: (idx[offsets[j] : offsets[j + 1]], values[offsets[j] : offsets[j + 1]])
            for j, p in enumerate(paths)
        }
        return merge._scatter(weights, {}, pieces, {})[0]

    sizes = [int(np.prod(get_leaf(params, p).shape)) for p in paths]
    starts = np.cumsum([0, *sizes[:-1]])
    one_idx = jnp.asarray(
        np.concatenate([np.asarray(tiny[p][0]) + s for p, s in zip(paths, starts, strict=True)])
    )
    one = {"buf": jnp.zeros(sum(sizes), jnp.float32)}

    def one_buffer() -> None:
        new, _ = merge._scatter_donate({"buf": one["buf"]}, {}, {"buf": (one_idx, packed_val)}, {})
        one["buf"] = jax.block_until_ready(new["buf"])

    fns = {
        "210 donated weights passed through (no scatter)": on_host_weights(paths, pass_through),
        "per-weight program, 16 entries each, packed arguments": on_host_weights(
            paths, lambda weights: packed_merge(weights, packed_idx, packed_val)
        ),
        "one buffer, the same 3,360 entries": one_buffer,
        "per-weight program, 16 entries each": program(tiny),
        "per-weight program, SHiRA r entries": program({p: (d.indices, d.values) for p, d in deltas.items()}),
        "merge.merge + merge.unmerge (full calls)": full_merge,
    }
    k = sum(d.k for d in deltas.values())
    return fns, {"k": k, "weights": len(deltas), "host_s": host}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rank", type=int, default=8, help="SHiRA r: k = r (m + n) per weight")
    ap.add_argument("--repeats", type=int, default=11, help="timed rounds after one warm-up round")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "merge_kernels.json")
    args = ap.parse_args(argv)

    import numpy as np

    record = {"machine_before": common.machine(), "rank": args.rank, "repeats": args.repeats}
    print(common.load_line(record["machine_before"]), file=sys.stderr)
    flat, flat_info = flat_contenders(args.rank)
    record["flat"] = {**flat_info, "times": common.interleaved(flat, repeats=args.repeats, progress="flat")}
    del flat
    per, per_info = per_weight_contenders(args.rank)
    times = common.interleaved(per, repeats=args.repeats, progress="per weight")
    host = per_info.pop("host_s")[1:]  # the warm-up round's first call compiles
    record["per_weight"] = {
        **per_info,
        "times": times,
        "merge_host_ms (median)": 1e3 * float(np.median(host)),
        "merge_host_ms (min)": 1e3 * float(np.min(host)),
    }
    record["machine_after"] = common.machine()
    floor = record["flat"]["times"]["floor k"]["median_ms"]
    for name, t in record["flat"]["times"].items():
        print(
            f"{name:36s} {t['median_ms']:8.2f} ms (min {t['min_ms']:7.2f})  {t['median_ms'] / floor:5.2f} x floor k",
            file=sys.stderr,
        )
    for name, t in times.items():
        print(f"{name:40s} {t['median_ms']:8.2f} ms (min {t['min_ms']:7.2f})", file=sys.stderr)
    pw = record["per_weight"]
    print(
        f"merge.merge host share: {pw['merge_host_ms (median)']:.2f} ms (min {pw['merge_host_ms (min)']:.2f})",
        file=sys.stderr,
    )
    common.write_json(args.out, record)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
