"""Merge / unmerge / switch of a SHiRA adapter: jaxsparse vs PyTorch PEFT, side by side, on real models.

Both frameworks hold the *same* adapter: PEFT builds two SHiRA adapters ("one", "two", random masks,
random values) on the torch model and saves them; jaxsparse loads those files with
``jaxsparse.adapter_io.load_adapter``. Then, interleaved per round:

- the floor: one jitted, donated scatter-add of the same k entries (sorted random positions) into
  one flat float32 buffer of the targeted weights' total size; every op is reported as a multiple
  of it (``x floor``) and as PEFT's time over ours, both from medians of the same run; a switch
  writes 2k entries (A's back, B's new), so it is also reported against the same scatter-add of
  2k entries;
- jaxsparse: ``merge.merge(params, a, donate=True)``, ``merge.switch(..., a, saved, c, donate=True)``
  where ``c`` has A's mask (equal index arrays) and B's values (``switch, shared mask``: one
  scatter per weight, compared with PEFT's switch, which costs the same whatever the masks),
  ``merge.switch(..., c, saved, b, donate=True)``,
  ``merge.unmerge(..., b, saved, donate=True)`` (jitted scatters, weights updated in place), plus
  ``merge.merge(params, a)`` without donation (copies every targeted weight; compared with one copy
  of the targeted weights, also timed, plus the floor) and ``merge.validate`` alone (run once on
  load; merge of a loaded adapter only re-checks paths and shapes on the host);
- PEFT: ``merge_adapter(["one"])``, switch = ``unmerge_adapter(); merge_adapter(["two"])``,
  ``unmerge_adapter()`` under ``torch.no_grad()`` with ``torch.set_num_threads(2)``;
- LoRA fusion of equal parameter count (LoRA rank r has r(m+n) parameters per linear, as SHiRA r
  has entries): PEFT ``merge_adapter`` of a LoRA adapter (B·A added to each weight) and jaxsparse
  ``merge.merge(..., donate=True)`` of the same factors;
- the path users feel, adapter files on disk to merged params: jaxsparse ``load_adapter`` +
  ``merge(..., donate=True)`` vs PEFT ``load_adapter`` + ``merge_adapter`` (each followed by an
  untimed reset: unmerge, and PEFT ``delete_adapter``).

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
    from jaxsparse.delta import Adapter, SparseDelta
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
    merge.validate(state["params"], b)  # as load_adapter did for `a` (b was loaded against ours.params too)

    rng = np.random.default_rng(0)
    floor_idx = jax.numpy.asarray(
        np.sort(rng.choice(numel_total, size=k_total, replace=False)).astype(np.int32)
    )
    floor_val = jax.numpy.asarray(rng.standard_normal(k_total).astype(np.float32))
    floor_scatter = jax.jit(
        lambda buf, idx, v: buf.at[idx].add(v, indices_are_sorted=True, unique_indices=True), donate_argnums=0
    )
    state["floor"] = floor_scatter(jax.numpy.zeros(numel_total, jax.numpy.float32), floor_idx, floor_val)
    # A switch writes A's k entries back and B's k entries: its floor is the same scatter-add of
    # 2k entries (a union of two random index sets, as A's and B's are).
    floor2_idx = jax.numpy.asarray(
        np.sort(rng.choice(numel_total, size=2 * k_total, replace=False)).astype(np.int32)
    )
    floor2_val = jax.numpy.asarray(rng.standard_normal(2 * k_total).astype(np.float32))
    copy_targets = jax.jit(lambda ws: {p: w.copy() for p, w in ws.items()})
    from jaxsparse.tree import get_leaf

    def targeted() -> dict:
        return {p: get_leaf(state["params"], p) for p in paths}

    def jax_floor() -> None:
        state["floor"] = floor_scatter(state["floor"], floor_idx, floor_val)
        state["floor"].block_until_ready()

    def jax_floor_2k() -> None:
        state["floor"] = floor_scatter(state["floor"], floor2_idx, floor2_val)
        state["floor"].block_until_ready()

    def jax_copy() -> None:
        jax.block_until_ready(copy_targets(targeted()))

    def jax_merge_copy() -> None:
        jax.block_until_ready(merge.merge(state["params"], a))

    def jax_validate() -> None:
        merge.validate(state["params"], a)

    def jax_merge() -> None:
        state["params"], state["saved"] = merge.merge(state["params"], a, donate=True)
        jax.block_until_ready(state["params"])

    # A third adapter on A's mask (equal copies of A's index arrays, as two files of adapters trained
    # from one mask load) with B's values: a switch between the two is one scatter per weight.
    shared = Adapter(
        {
            p: SparseDelta(jax.numpy.array(np.asarray(d.indices)), b.deltas[p].values, d.shape)
            for p, d in a.deltas.items()
        }
    )
    merge.validate(state["params"], shared)

    def jax_switch_shared() -> None:
        state["params"], state["saved"] = merge.switch(
            state["params"], a, state["saved"], shared, donate=True
        )
        jax.block_until_ready(state["params"])

    def jax_switch() -> None:
        state["params"], state["saved"] = merge.switch(
            state["params"], shared, state["saved"], b, donate=True
        )
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

    # LoRA of equal parameter count, on a second PEFT model (PEFT does not mix SHiRA and LoRA)
    lora_cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    pm_lora = peft.get_peft_model(copy.deepcopy(torch_base), lora_cfg, adapter_name="fused").eval()
    with tempfile.TemporaryDirectory() as tmp:
        pm_lora.save_pretrained(tmp)
        lora = load_adapter(Path(tmp) / "fused", ours.params)
    lora_params = sum(int(x.size) for d in lora.deltas.values() for x in (d.a, d.b))

    def jax_lora_merge_only() -> None:
        state["params"], state["saved"] = merge.merge(state["params"], lora, donate=True)
        jax.block_until_ready(state["params"])

    def jax_lora_reset() -> None:
        state["params"] = merge.unmerge(state["params"], lora, state["saved"], donate=True)
        jax.block_until_ready(state["params"])

    def peft_lora_merge() -> None:
        with torch.no_grad():
            pm_lora.merge_adapter(["fused"])

    def peft_lora_reset() -> None:
        with torch.no_grad():
            pm_lora.unmerge_adapter()

    # disk -> merged params
    disk = tempfile.TemporaryDirectory()
    pm.save_pretrained(disk.name)
    pm_disk = peft.get_peft_model(
        copy.deepcopy(torch_base),
        peft.ShiraConfig(r=r, target_modules=targets, init_weights=False, random_seed=1),
        adapter_name="base",
    ).eval()

    def jax_disk_merge() -> None:
        adapter = load_adapter(Path(disk.name) / "one", ours.params)
        state["params"], state["saved"] = merge.merge(state["params"], adapter, donate=True)
        state["disk_adapter"] = adapter
        jax.block_until_ready(state["params"])

    def jax_disk_reset() -> None:
        state["params"] = merge.unmerge(
            state["params"], state.pop("disk_adapter"), state["saved"], donate=True
        )
        jax.block_until_ready(state["params"])

    def peft_disk_merge() -> None:
        pm_disk.load_adapter(str(Path(disk.name) / "one"), adapter_name="disk")
        with torch.no_grad():
            pm_disk.merge_adapter(["disk"])

    def peft_disk_reset() -> None:
        with torch.no_grad():
            pm_disk.unmerge_adapter()
        pm_disk.delete_adapter("disk")

    fns = {
        "floor": jax_floor,
        "floor 2k (the switch's writes)": jax_floor_2k,
        "jax copy of targeted weights": jax_copy,
        "jax merge (copy, no donation)": jax_merge_copy,
        "jax validate only": jax_validate,
        "jax merge": jax_merge,
        "peft merge": torch_merge,
        "jax switch, shared mask": jax_switch_shared,
        "jax switch": jax_switch,
        "peft switch": torch_switch,
        "jax unmerge": jax_unmerge,
        "peft unmerge": torch_unmerge,
        "jax lora merge": jax_lora_merge_only,
        "jax lora reset (untimed use)": jax_lora_reset,
        "peft lora merge": peft_lora_merge,
        "peft lora reset (untimed use)": peft_lora_reset,
        "jax disk->merged": jax_disk_merge,
        "jax disk reset (untimed use)": jax_disk_reset,
        "peft disk->merged": peft_disk_merge,
        "peft disk reset (untimed use)": peft_disk_reset,
    }
    # The first round compiles each jitted scatter (timed separately here).
    compile_s = {}
    for name in ("jax merge", "jax switch, shared mask", "jax switch", "jax unmerge"):
        _, compile_s[name] = common.timed(fns[name])
    for name in ("peft merge", "peft switch", "peft unmerge"):
        fns[name]()
    times = common.interleaved(fns, repeats=repeats, warmup=1, progress=f"{model_name} r={r}")
    disk.cleanup()
    med = {name: t["median_ms"] for name, t in times.items()}
    ops = (*OPS, "lora merge", "disk->merged")
    ratios = {op: med[f"peft {op}"] / med[f"jax {op}"] for op in ops}
    floor = med["floor"]
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
        "floor_ms (median)": floor,
        "multiple_of_floor (median)": {
            **{f"jax {op}": med[f"jax {op}"] / floor for op in ops},
            **{f"peft {op}": med[f"peft {op}"] / floor for op in ops},
        },
        "floor_2k_ms (median)": med["floor 2k (the switch's writes)"],
        "switch_multiple_of_floor_2k (median)": med["jax switch"] / med["floor 2k (the switch's writes)"],
        # PEFT's switch costs the same whatever the masks (dense to_dense + add per weight).
        "shared_mask_switch": {
            "multiple_of_floor": med["jax switch, shared mask"] / floor,
            "peft_switch_over_jax": med["peft switch"] / med["jax switch, shared mask"],
        },
        "copy_merge_vs_copy_plus_floor": med["jax merge (copy, no donation)"]
        / (med["jax copy of targeted weights"] + floor),
        "shira_merge_speedup_over_lora_merge (median)": {
            "vs jax lora": med["jax lora merge"] / med["jax merge"],
            "vs peft lora": med["peft lora merge"] / med["jax merge"],
        },
        "lora_params": lora_params,
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
                + f"; floor {res['floor_ms (median)']:.2f} ms; x floor "
                + ", ".join(f"{k} {v:.2f}" for k, v in res["multiple_of_floor (median)"].items())
                + f"; shared-mask switch {t['jax switch, shared mask']['median_ms']:.2f} ms"
                + f" ({res['shared_mask_switch']['multiple_of_floor']:.2f}x floor,"
                + f" {res['shared_mask_switch']['peft_switch_over_jax']:.1f}x PEFT)"
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
