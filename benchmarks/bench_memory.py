"""Memory of each training configuration of bench_train_step.py: trainable parameters, optimizer
state bytes and peak RSS, each configuration alone in a fresh subprocess.

Optimizer state bytes: jaxsparse sums the ``nbytes`` of every ``opt_state`` leaf (AdamW's mu, nu and
count); torch sums every tensor in ``optimizer.state`` (exp_avg, exp_avg_sq, step). Peak RSS is the
child's ``VmHWM`` (/proc/self/status; ``ru_maxrss`` is also recorded, but Linux carries it over from the
parent at fork, so it is not clean) after model load + ``--steps`` training steps, with the peak after
imports and after building the model/optimizer alongside. The child imports only its own framework's
stack, except that ``import transformers`` (5.x) imports torch whenever it is installed, so JAX children
load torch too (recorded); the batch comes in as an .npz so no tokenizer or dataset library is loaded.

JAX children install :func:`jaxsparse.host_memory.trim_after_compiles` first, as ``jaxsparse train``
does, and compile the step as :func:`jaxsparse.train.make_train_step` does (on CPU, the
memory-optimized XLA scheduler).

``--stages`` instead breaks the peak down (issue 14): each *variant* runs alone in a fresh subprocess
that records ``VmRSS``/``VmHWM`` (and anonymous/file RSS, threads, the bytes of ``jax.live_arrays()``)
after each stage: imports, the transformers config (which imports torch when it is installed),
model load, adapter, optimizer state, ``lower``, ``compile`` (with XLA's ``memory_analysis()``:
temp/argument/output bytes), step 1 and step 2. A variant is a method plus levers, joined by ``+``:
``concurrency`` (XLA's default CPU scheduler instead of the memory-optimized one), ``notrim`` (no
trim after compiles), ``notorch`` (torch hidden, as in a JAX-only install: transformers then
imports no torch), ``noremat`` (``train.remat: false``; the default is ``jaxsparse train``'s,
``"dots"``: each block's matmul outputs kept, the rest recomputed), ``remat`` (``train.remat:
true``: every block recomputed from its input).

    python benchmarks/bench_memory.py                       # every configuration at 16x128
    python benchmarks/bench_memory.py --methods jax-shira peft-shira --seq-len 64
    python benchmarks/bench_memory.py --stages              # the stage breakdown, default variants
    python benchmarks/bench_memory.py --stages --variants jax-shira+concurrency+notrim jax-shira peft-shira

Writes benchmarks/results/memory.json and benchmarks/plots/memory.png (``--stages``:
benchmarks/results/memory_stages.json).
"""

from __future__ import annotations

import argparse
import json
import os
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

        from jaxsparse import host_memory

        host_memory.trim_after_compiles()  # as `jaxsparse train` does
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


LEVERS = ("concurrency", "notrim", "notorch", "noremat", "remat")
STAGE_METHODS = ("jax-shira", "jax-lora", "peft-shira", "peft-lora")
DEFAULT_VARIANTS = (
    "jax-shira+concurrency+notrim+noremat",  # the step as it was compiled before issue 14
    "jax-shira+noremat",  # session 7's defaults
    "jax-shira",
    "jax-shira+notorch",
    "jax-shira+notorch+remat",
    "jax-shira+remat",
    "jax-lora+noremat",
    "jax-lora",
    "jax-lora+notorch",
    "jax-lora+notorch+remat",
    "peft-shira",
    "peft-lora",
)


def parse_variant(variant: str) -> tuple[str, set[str]]:
    """``"jax-shira+notorch+remat"`` -> ``("jax-shira", {"notorch", "remat"})``, checked."""
    method, *levers = variant.split("+")
    if method not in STAGE_METHODS:
        raise argparse.ArgumentTypeError(f"variant {variant!r}: method must be one of {STAGE_METHODS}")
    bad = [lv for lv in levers if lv not in LEVERS]
    if bad or (method.startswith("peft") and levers):
        allowed = LEVERS if method.startswith("jax") else "none for PyTorch"
        raise argparse.ArgumentTypeError(f"variant {variant!r}: levers {bad or levers} (allowed: {allowed})")
    if {"remat", "noremat"} <= set(levers):
        raise argparse.ArgumentTypeError(f"variant {variant!r}: choose one of the levers remat and noremat")
    return method, set(levers)


def _variant(text: str) -> str:
    parse_variant(text)
    return text


class Stages:
    """Records the process's memory after each named stage (``/proc/self/status``)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.backend_started = False

    def mark(self, stage: str, **extra: object) -> None:
        fields = {"VmRSS": "rss_mib", "VmHWM": "peak_mib", "RssAnon": "anon_mib", "RssFile": "file_mib"}
        row: dict = {"stage": stage}
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in fields:
                    row[fields[key]] = round(int(line.split()[1]) / 1024, 1)
                elif key == "Threads":
                    row["threads"] = int(line.split()[1])
        if self.backend_started:  # jax.live_arrays() would start XLA's CPU client itself
            import jax

            row["jax_live_mib"] = round(sum(a.nbytes for a in jax.live_arrays()) / 2**20, 1)
        row["torch_loaded"] = sys.modules.get("torch") is not None
        row.update(extra)
        self.rows.append(row)


def stage_child_jax(method: str, levers: set[str], batch_npz: Path, steps: int) -> dict:
    """The stages of one jaxsparse variant (see the module docstring); returns its record."""
    stages = Stages()
    stages.mark("start")
    if "notorch" in levers:
        # What a JAX-only install sees: transformers finds no torch (find_spec returns None).
        sys.modules["torch"] = None  # type: ignore[assignment]
    import jax
    import jax.numpy as jnp
    import numpy as np

    stages.mark("import jax")
    import optax

    from jaxsparse import host_memory, models
    from jaxsparse.methods import lora, shira
    from jaxsparse.models import layers
    from jaxsparse.train import init_train_state, make_train_step

    stages.mark("import jaxsparse")
    if "notrim" not in levers:
        host_memory.trim_after_compiles()
    import transformers

    transformers.AutoConfig.from_pretrained(str(common.minilm_dir()), local_files_only=True)
    stages.mark("transformers config")
    model = models.from_pretrained(common.minilm_dir(), task="seq_cls", num_labels=2)
    params = model.params
    stages.backend_started = True  # placing the weights started it
    stages.mark("model load", params_mib=round(sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20, 1))
    head, targets = ["classifier"], ["query", "key", "value", "dense"]
    key = jax.random.key(0)
    if method == "jax-shira":
        cfg = shira.ShiraConfig(r=8, random_seed=0, target_modules=targets, modules_to_save=head)
        adapter = shira.init(params, cfg, key)
    else:
        cfg = lora.LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=head)
        adapter = lora.init(params, cfg, key)
    stages.mark("adapter")
    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    state = init_train_state(adapter, optimizer, rng=0)
    del adapter
    stages.mark("optimizer state")
    remat = True if "remat" in levers else False if "noremat" in levers else "dots"

    def apply_model(p, b):
        with layers.remat_blocks(remat):
            return model.apply_fn(p, b["input_ids"], b["attention_mask"])

    def loss_fn(logits, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), b["labels"]).mean()

    options = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}
    step = make_train_step(
        apply_model,
        loss_fn,
        optimizer,
        factored=True,
        compiler_options=options if "concurrency" in levers else None,
    )
    with np.load(batch_npz) as z:
        batch = {k: jnp.asarray(z[k]) for k in z.files}
    lowered = step.lower(state, params, batch)
    stages.mark("lower")
    compiled = lowered.compile()
    ma = compiled.memory_analysis()
    xla = {
        "temp_mib": round(ma.temp_size_in_bytes / 2**20, 1),
        "argument_mib": round(ma.argument_size_in_bytes / 2**20, 1),
        "output_mib": round(ma.output_size_in_bytes / 2**20, 1),
        "alias_mib": round(ma.alias_size_in_bytes / 2**20, 1),
    }
    stages.mark("compile", **xla)
    for i in range(steps):
        state, metrics = compiled(state, params, batch)
        stages.mark(f"step {i + 1}", loss=float(metrics["loss"]))
    return {"xla": xla, "stages": stages.rows}


def stage_child_torch(method: str, batch_npz: Path, steps: int, threads: int) -> dict:
    """The stages of one PyTorch/PEFT contender, built as bench_train_step.py builds it."""
    stages = Stages()
    stages.mark("start")
    import torch

    torch.set_num_threads(threads)
    stages.mark("import torch")
    import bench_train_step as bts
    import numpy as np
    import peft  # noqa: F401
    import transformers  # noqa: F401

    stages.mark("import transformers+peft")
    with np.load(batch_npz) as z:
        batch = {k: z[k] for k in z.files}
    contender = bts.build(method, batch)  # model load + PEFT wrap + AdamW
    stages.mark("model+adapter+optimizer")
    for i in range(steps):
        loss = contender.step()
        stages.mark(f"step {i + 1}", loss=loss)
    return {"stages": stages.rows}


def run_stages(variants: list[str], npz: Path, steps: int, threads: int) -> list[dict]:
    """Each variant in a fresh subprocess; prints each one's stage table as it comes."""
    rows = []
    for variant in variants:
        cmd = [sys.executable, __file__, "--stage-child", variant, "--batch-npz", str(npz)]
        cmd += ["--steps", str(steps), "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{variant}: child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rec = json.loads(lines[-1][len(MARK) :])
        rec["variant"] = variant
        rec["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        rows.append(rec)
        print(
            f"\n{variant}" + (f"  (XLA temp {rec['xla']['temp_mib']:.0f} MiB)" if "xla" in rec else ""),
            file=sys.stderr,
        )
        for r in rec["stages"]:
            print(
                f"  {r['stage']:26s} RSS {r['rss_mib']:7.0f}  peak {r['peak_mib']:7.0f}  anon {r['anon_mib']:6.0f}  "
                f"file {r['file_mib']:5.0f}  threads {r['threads']:3d}  jax live {r.get('jax_live_mib', 0):6.1f}  "
                f"torch {r['torch_loaded']}",
                file=sys.stderr,
            )
    return rows


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
    ap.add_argument(
        "--stages",
        action="store_true",
        help="break the peak down stage by stage, one subprocess per --variants",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        type=_variant,
        default=list(DEFAULT_VARIANTS),
        help=f"with --stages: METHOD[+LEVER...], METHOD in {STAGE_METHODS}, LEVER in {LEVERS}",
    )
    ap.add_argument("--child", choices=bts.METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--stage-child", type=_variant, help=argparse.SUPPRESS)
    ap.add_argument("--batch-npz", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.batch_npz, args.steps, args.threads)
        return
    if args.stage_child:
        method, levers = parse_variant(args.stage_child)
        if method.startswith("jax"):
            rec = stage_child_jax(method, levers, args.batch_npz, args.steps)
        else:
            rec = stage_child_torch(method, args.batch_npz, args.steps, args.threads)
        print(MARK + json.dumps(rec), flush=True)
        return
    if args.stages and args.out == common.RESULTS_DIR / "memory.json":
        args.out = common.RESULTS_DIR / "memory_stages.json"

    import numpy as np
    from tqdm import tqdm

    record = {"machine_before": common.machine(), "seq_len": args.seq_len, "batch_size": args.batch_size}
    print(common.load_line(record["machine_before"]), file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "batch.npz"
        np.savez(npz, **common.rotten_tomatoes_batch(args.batch_size, args.seq_len))
        if args.stages:
            record["steps"] = args.steps
            record["variants"] = run_stages(args.variants, npz, args.steps, args.threads)
            record["machine_after"] = common.machine()
            common.write_json(args.out, record)
            print(f"wrote {args.out}", file=sys.stderr)
            return
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
