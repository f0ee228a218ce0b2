"""Many adapters in one batch: jaxsparse per-row sparse adapters vs merging per adapter vs PEFT mixed LoRA.

Greedy generation with the KV cache on the real SmolLM2-135M (GGUF, fp32 in both frameworks), a
batch of ``--batch`` prompts of ``--prompt-len`` random tokens, ``--new-tokens`` new tokens each (no
early stop), rows assigned round-robin to N adapters, for each N in ``--adapters``:

- ``jax per-row``: N SHiRA r adapters stacked once (:func:`jaxsparse.serve.stack_adapters`), one
  ``generate`` call over the whole batch with :func:`jaxsparse.serve.per_row_params`;
- ``jax merge per adapter``: for each adapter, merge it in place (donated scatter), generate its
  rows, unmerge (what serving without per-row adapters does);
- ``peft mixed LoRA``: PEFT's mixed-adapter batch, N LoRA adapters of rank r (the same parameter
  count as SHiRA r: r(m+n) per linear), ``generate(..., adapter_names=[...])``.

Reported: tokens/s (batch x new tokens / median seconds); and, as a sanity check, whether the
per-row tokens equal the merge-per-adapter tokens.

    python benchmarks/bench_serve.py                        # N = 1, 4, 16; batch 16
    python benchmarks/bench_serve.py --adapters 4 --repeats 2

Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bench_merge import load_models


def bench_n(torch_base, ours, targets, n_adapters, args) -> dict:
    import copy

    import jax
    import jax.numpy as jnp
    import numpy as np
    import peft
    import torch

    from jaxsparse import delta as delta_lib
    from jaxsparse import merge, serve
    from jaxsparse.methods import shira
    from jaxsparse.models.generate import generate

    adapters = []
    for i in range(n_adapters):
        a = shira.init(ours.params, shira.ShiraConfig(r=args.rank, target_modules=targets), jax.random.key(i))
        leaves = delta_lib.trainable(a)
        keys = iter(jax.random.split(jax.random.key(100 + i), len(jax.tree.leaves(leaves))))
        leaves = jax.tree.map(
            lambda x, ks=keys: x + 0.02 * jax.random.normal(next(ks), x.shape, x.dtype), leaves
        )
        adapters.append(delta_lib.with_trainable(a, leaves))
    bank = serve.stack_adapters(ours.params, adapters)  # validates each adapter once
    rows = np.arange(args.batch) % n_adapters
    rng = np.random.default_rng(0)
    ids = rng.integers(1, ours.config.vocab_size, (args.batch, args.prompt_len))
    ids_j = jnp.asarray(ids)
    gen = dict(max_new_tokens=args.new_tokens, eos_token_id=-1)  # -1: never stops early
    state = {"params": jax.tree.map(lambda x: x.copy(), ours.params)}
    out: dict = {}

    def jax_per_row() -> None:
        served = serve.per_row_params(state["params"], bank, jnp.asarray(rows))
        out["per_row"] = np.asarray(generate(ours, ids_j, params=served, **gen))

    def jax_merge_per_adapter() -> None:
        tokens = np.zeros((args.batch, args.prompt_len + args.new_tokens), np.int64)
        for n, adapter in enumerate(adapters):
            state["params"], saved = merge.merge(state["params"], adapter, donate=True)
            tokens[rows == n] = np.asarray(generate(ours, ids_j[rows == n], params=state["params"], **gen))
            state["params"] = merge.unmerge(state["params"], adapter, saved, donate=True)
        out["merged"] = tokens

    pm = None
    for i in range(n_adapters):
        cfg = peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, init_lora_weights=False
        )
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(torch_base), cfg, adapter_name=f"a{i}")
        else:
            pm.add_adapter(f"a{i}", cfg)
    pm.eval()
    ids_t = torch.as_tensor(ids)
    names = [f"a{n}" for n in rows]

    def peft_mixed() -> None:
        with torch.no_grad():
            pm.generate(
                input_ids=ids_t,
                attention_mask=torch.ones_like(ids_t),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                adapter_names=names,
                pad_token_id=0,
            )

    fns = {
        "jax per-row": jax_per_row,
        "jax merge per adapter": jax_merge_per_adapter,
        "peft mixed LoRA": peft_mixed,
    }
    compile_s = {name: common.timed(fns[name])[1] for name in ("jax per-row", "jax merge per adapter")}
    times = common.interleaved(fns, repeats=args.repeats, warmup=0, progress=f"N={n_adapters}")
    tokens = args.batch * args.new_tokens
    return {
        "adapters": n_adapters,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "shira_entries_per_adapter": sum(d.k for d in adapters[0].deltas.values()),
        "times": times,
        "tokens_per_s (median)": {name: tokens / (t["median_ms"] / 1e3) for name, t in times.items()},
        "first_call_s (compile included)": compile_s,
        "per_row_tokens_equal_merged": bool(np.array_equal(out["per_row"], out["merged"])),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--adapters", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "serve.json")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    record = {"machine_before": common.machine(), "args": vars(args) | {"out": str(args.out)}, "results": []}
    print(common.load_line(record["machine_before"]), file=sys.stderr)
    torch_model, ours, targets = load_models("smollm2")
    for n in args.adapters:
        res = bench_n(torch_model, ours, targets, n, args)
        record["results"].append(res)
        print(
            f"N={n}: "
            + ", ".join(f"{k} {v:.1f} tok/s" for k, v in res["tokens_per_s (median)"].items())
            + f"; per-row tokens == merged: {res['per_row_tokens_equal_merged']}",
            file=sys.stderr,
        )
    record["machine_after"] = common.machine()
    common.write_json(args.out, record)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
