"""Memory of each training configuration of bench_train_step.py: trainable parameters, optimizer
state bytes and peak RSS, each configuration alone in a fresh subprocess.

Optimizer state bytes: jaxsparse sums the ``nbytes`` of every ``opt_state`` leaf (AdamW's mu, nu and
count); torch sums every tensor in ``optimizer.state`` (exp_avg, exp_avg_sq, step). Peak RSS is the
child's ``VmHWM`` (/proc/self/status; ``ru_maxrss`` is also recorded, but Linux carries it over from the
parent at fork, so it is not clean) after model load + ``--steps`` training steps, with the peak after
imports and after building the model/optimizer alongside. The child imports only its own framework's
stack, except that ``import transformers`` (5.x) imports torch whenever it is installed, so JAX children
load torch too (recorded); the batch comes in as an .npz so no tokenizer or dataset library is loaded.

    python benchmarks/bench_memory.py                       # every configuration at 16x128
    python benchmarks/bench_memory.py --methods jax-shira peft-shira --seq-len 64

Writes benchmarks/results/memory.json and benchmarks/plots/memory.png.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

MARK = "BENCH_MEMORY_RESULT "


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_mib() -> float:
    # VmHWM is the peak RSS of this process image. ru_maxrss would be wrong here: Linux carries it
    # over from the parent at fork (the parent holds a tokenizer and `datasets`), so small children
    # would report the parent's peak.
    return _status_mib("VmHWM")


def child(method: str, batch_npz: Path, steps: int, threads: int) -> None:
    """Build one configuration, run ``steps`` steps, print one JSON line with its memory record."""
    import bench_train_step as bts
    import numpy as np

    # Import the framework first so "after imports" is a fair baseline. `import transformers` (5.x)
    # imports torch whenever it is installed, so JAX configurations carry torch's import cost too.
    import transformers  # noqa: F401

    if method in bts.TORCH_METHODS:
        import peft  # noqa: F401
        import torch

        torch.set_num_threads(threads)
    else:
        import jax  # noqa: F401
        import optax  # noqa: F401
    with np.load(batch_npz) as z:
        batch = {k: z[k] for k in z.files}
    baseline = _peak_mib()
    contender = bts.build(method, batch)
    after_build = _peak_mib()
    for _ in range(steps):
        contender.step()
    record = {
        "method": method,
        "trainable": contender.trainable,
        "opt_state_bytes": contender.opt_state_bytes(),
        "peak_rss_mib_after_imports": baseline,
        "peak_rss_mib_after_build": after_build,
        "peak_rss_mib": _peak_mib(),
        "rss_mib_end": _status_mib("VmRSS"),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_imported": "torch" in sys.modules,
        "jax_imported": "jax" in sys.modules,
    }
    print(MARK + json.dumps(record), flush=True)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    names = [r["method"] for r in rows]
    colors = ["tab:blue" if n.startswith("jax") else "tab:orange" for n in names]
    ax1.bar(names, [r["peak_rss_mib"] for r in rows], color=colors)
    ax1.set_ylabel("peak RSS (MiB)")
    ax2.bar(names, [max(r["opt_state_bytes"], 1) / 2**20 for r in rows], color=colors)
    ax2.set_yscale("log")
    ax2.set_ylabel("optimizer state (MiB, log)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    fig.suptitle("MiniLM seq-cls training memory (blue: jaxsparse, orange: PyTorch)", fontsize=10)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    import bench_train_step as bts

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--methods", nargs="+", default=list(bts.METHODS), choices=bts.METHODS)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="training steps before reading the peak")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "memory.json")
    ap.add_argument("--plot", type=Path, default=common.PLOTS_DIR / "memory.png")
    ap.add_argument("--child", choices=bts.METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--batch-npz", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.batch_npz, args.steps, args.threads)
        return

    import numpy as np
    from tqdm import tqdm

    record = {"machine_before": common.machine(), "seq_len": args.seq_len, "batch_size": args.batch_size}
    print(common.load_line(record["machine_before"]), file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "batch.npz"
        np.savez(npz, **common.rotten_tomatoes_batch(args.batch_size, args.seq_len))
        for method in tqdm(args.methods, desc="configurations"):
            cmd = [sys.executable, __file__, "--child", method, "--batch-npz", str(npz)]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{method}: child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            row = json.loads(lines[-1][len(MARK) :])
            rows.append(row)
            print(
                f"{method:11s} trainable {row['trainable']:>11,}  opt state {row['opt_state_bytes'] / 2**20:8.2f} MiB  "
                f"peak RSS {row['peak_rss_mib']:7.0f} MiB (after build {row['peak_rss_mib_after_build']:.0f})",
                file=sys.stderr,
            )
    record["results"] = rows
    record["machine_after"] = common.machine()
    common.write_json(args.out, record)
    plot(rows, args.plot)
    print(f"wrote {args.out} and {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
