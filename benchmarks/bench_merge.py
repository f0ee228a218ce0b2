"""Merge / unmerge / switch of a SHiRA adapter: jaxsparse vs PyTorch PEFT, side by side, on real models.

Both frameworks hold the *same* adapter: PEFT builds two SHiRA adapters ("one", "two", random masks,
random values) on the torch model and saves them; jaxsparse loads those files with
``jaxsparse.adapter_io.load_adapter``. Then, interleaved per round:

- jaxsparse: ``merge.merge(params, a, donate=True)``, ``merge.switch(..., a, saved, b, donate=True)``,
  ``merge.unmerge(..., b, saved, donate=True)`` (jitted scatters, weights updated in place), plus
  ``merge.merge(params, a)`` without donation (copies every targeted weight) and ``merge.validate``
  alone (the checks every public call runs first);
- PEFT: ``merge_adapter(["one"])``, switch = ``unmerge_adapter(); merge_adapter(["two"])``,
  ``unmerge_adapter()`` under ``torch.no_grad()`` with ``torch.set_num_threads(2)``.

Sanity lines: the merged weights of both frameworks (max abs diff over every targeted weight) and how
far each framework's weights are from the originals after merge + unmerge (PEFT subtracts the delta
back; jaxsparse writes the saved entries back).

    python benchmarks/bench_merge.py                         # MiniLM and SmolLM2-135M, r = 8 and 32
    python benchmarks/bench_merge.py --models minilm --ranks 8 --repeats 5

Writes benchmarks/results/merge.json and benchmarks/plots/merge.png.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

OPS = ("merge", "switch", "unmerge")


def load_models(name: str) -> tuple[object, object, list[str]]:
    """(torch model, jaxsparse Model, PEFT target module names) for ``name``."""
    import torch
    import transformers

    from jaxsparse import models

    if name == "minilm":
        path = common.minilm_dir()
        torch_model = transformers.AutoModel.from_pretrained(str(path), dtype=torch.float32)
        ours = models.from_pretrained(path)
        targets = ["query", "key", "value", "dense"]
    elif name == "smollm2":
        path = common.smollm_gguf()
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        ours = models.from_pretrained(path)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    else:
        raise SystemExit(f"unknown model {name!r}; choose minilm or smollm2")
    # fp32 on both sides; transformers refuses .float() on a GGUF-loaded model, hence dtype= above
    return torch_model.eval(), ours, targets


def _torch_weights(peft_model: object) -> dict[str, object]:
    """The base weights of a PEFT model by Hugging Face key (``.base_layer`` removed), as tensors."""
    out = {}
    for key, t in peft_model.base_model.model.state_dict().items():
        if "shira_" not in key:
            out[key.replace(".base_layer.", ".")] = t
    return out


def _max_diff_torch_vs_ours(torch_w: dict, params: object, paths: list[str]) -> float:
    import numpy as np

    from jaxsparse.models.naming import hf_key
    from jaxsparse.tree import get_leaf

    worst = 0.0
    for path in paths:
        key, transposed = hf_key(path)
        ours = np.asarray(get_leaf(params, path))
        ours = ours.T if transposed else ours
        worst = max(worst, float(np.abs(torch_w[key].numpy() - ours).max()))
    return worst


def _max_diff_trees(a: object, b: object, paths: list[str]) -> float:
    import numpy as np

    from jaxsparse.tree import get_leaf

    return max(float(np.abs(np.asarray(get_leaf(a, p)) - np.asarray(get_leaf(b, p))).max()) for p in paths)


def bench_one(
    model_name: str, torch_base: object, ours: object, targets: list[str], r: int, repeats: int
) -> dict:
    import jax
    import numpy as np
    import peft
    import torch

    from jaxsparse import merge
    from jaxsparse.adapter_io import load_adapter
    from jaxsparse.models.naming import hf_key

    base = copy.deepcopy(torch_base)
    pm = peft.get_peft_model(
        base,
        peft.ShiraConfig(r=r, target_modules=targets, init_weights=False, random_seed=1),
        adapter_name="one",
    )
    pm.add_adapter("two", peft.ShiraConfig(r=r, target_modules=targets, init_weights=False, random_seed=2))
    pm.eval()
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        a = load_adapter(Path(tmp) / "one", ours.params)
        b = load_adapter(Path(tmp) / "two", ours.params)
    paths = sorted(a.deltas)
    k_total = sum(d.k for d in a.deltas.values())
    numel_total = sum(int(np.prod(d.shape)) for d in a.deltas.values())

    # ---- sanity: same merged weights, and how exact each unmerge is
    original_torch = {k: v.clone() for k, v in _torch_weights(pm).items()}
    original_ours = jax.tree.map(np.asarray, ours.params)
    with torch.no_grad():
        pm.merge_adapter(["one"])
    merged_ours, saved = merge.merge(ours.params, a)
    merged_diff = _max_diff_torch_vs_ours(_torch_weights(pm), merged_ours, paths)
    with torch.no_grad():
        pm.unmerge_adapter()
    after_torch = _torch_weights(pm)
    torch_unmerge_err = max(
        float((after_torch[hf] - original_torch[hf]).abs().max()) for hf in {hf_key(p)[0] for p in paths}
    )
    ours_unmerge_err = _max_diff_trees(merge.unmerge(merged_ours, a, saved), original_ours, paths)
    del merged_ours, saved, original_torch, after_torch

    # ---- timing: one call of each op per round, in this order
    state: dict = {"params": jax.tree.map(lambda x: x.copy(), ours.params)}

    def jax_merge_copy() -> None:
        jax.block_until_ready(merge.merge(state["params"], a))

    def jax_validate() -> None:
        merge.validate(state["params"], a)

    def jax_merge() -> None:
        state["params"], state["saved"] = merge.merge(state["params"], a, donate=True)
        jax.block_until_ready(state["params"])

    def jax_switch() -> None:
        state["params"], state["saved"] = merge.switch(state["params"], a, state["saved"], b, donate=True)
        jax.block_until_ready(state["params"])

    def jax_unmerge() -> None:
        state["params"] = merge.unmerge(state["params"], b, state["saved"], donate=True)
        jax.block_until_ready(state["params"])

    def torch_merge() -> None:
        with torch.no_grad():
            pm.merge_adapter(["one"])

    def torch_switch() -> None:
        with torch.no_grad():
            pm.unmerge_adapter()
            pm.merge_adapter(["two"])

    def torch_unmerge() -> None:
        with torch.no_grad():
            pm.unmerge_adapter()

    fns = {
        "jax merge (copy, no donation)": jax_merge_copy,
        "jax validate only": jax_validate,
        "jax merge": jax_merge,
        "peft merge": torch_merge,
        "jax switch": jax_switch,
        "peft switch": torch_switch,
        "jax unmerge": jax_unmerge,
        "peft unmerge": torch_unmerge,
    }
    # The first round compiles each jitted scatter (timed separately here).
    compile_s = {}
    for name in ("jax merge", "jax switch", "jax unmerge"):
        _, compile_s[name] = common.timed(fns[name])
    for name in ("peft merge", "peft switch", "peft unmerge"):
        fns[name]()
    times = common.interleaved(fns, repeats=repeats, warmup=1, progress=f"{model_name} r={r}")
    ratios = {op: times[f"peft {op}"]["median_ms"] / times[f"jax {op}"]["median_ms"] for op in OPS}
    return {
        "model": model_name,
        "r": r,
        "modules": len(paths),
        "k_total": k_total,
        "targeted_weight_numel": numel_total,
        "density": k_total / numel_total,
        "times": times,
        "first_call_s (compile included)": compile_s,
        "ratio_peft_over_jax (median)": ratios,
        "max_abs_diff_merged_peft_vs_jax": merged_diff,
        "max_abs_err_after_unmerge": {"peft": torch_unmerge_err, "jax": ours_unmerge_err},
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(OPS), figsize=(4 * len(OPS), 3.2), sharey=True)
    labels = [f"{r['model']}\nr={r['r']}" for r in results]
    x = np.arange(len(results))
    for ax, op in zip(axes, OPS, strict=True):
        for dx, who, color in ((-0.2, "jax", "tab:blue"), (0.2, "peft", "tab:orange")):
            med = [r["times"][f"{who} {op}"]["median_ms"] for r in results]
            ax.bar(x + dx, med, 0.4, label="jaxsparse" if who == "jax" else "PEFT", color=color)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(op)
    axes[0].set_ylabel("ms per op (median, log)")
    axes[0].legend(fontsize=8)
    fig.suptitle("SHiRA merge / switch / unmerge: jaxsparse (donated scatter) vs PEFT", fontsize=10)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "merge.json")
    ap.add_argument("--plot", type=Path, default=common.PLOTS_DIR / "merge.png")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    record = {
        "machine_before": common.machine(),
        "threads": args.threads,
        "repeats": args.repeats,
        "results": [],
    }
    print(common.load_line(record["machine_before"]), file=sys.stderr)
    for name in args.models:
        torch_model, ours, targets = load_models(name)
        for r in args.ranks:
            res = bench_one(name, torch_model, ours, targets, r, args.repeats)
            record["results"].append(res)
            t = res["times"]
            print(
                f"{name} r={r}: "
                + ", ".join(
                    f"{op} jax {t[f'jax {op}']['median_ms']:.2f} / peft {t[f'peft {op}']['median_ms']:.2f} ms"
                    for op in OPS
                )
                + f"; merged diff {res['max_abs_diff_merged_peft_vs_jax']:.1e}",
                file=sys.stderr,
            )
        del torch_model, ours
    record["machine_after"] = common.machine()
    common.write_json(args.out, record)
    plot(record["results"], args.plot)
    print(f"wrote {args.out} and {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
