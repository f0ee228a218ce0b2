"""Where one training step's time goes, op by op: jaxsparse (XLA CPU) vs PyTorch PEFT, side by side.

Builds the contenders of ``bench_train_step.py`` (real MiniLM-L6 sequence classification, the same
real Rotten Tomatoes batch, AdamW) and reports, for each:

1. **parts**, timed interleaved over ``--rounds`` rounds (one call of every part of every contender
   per round): ``forward`` (the loss), ``forward+backward`` (loss and gradients of the trainable
   leaves), ``optimizer`` (AdamW update of the trainable leaves alone) and ``step`` (the whole
   training step, as ``bench_train_step.py`` times it). In JAX each part is its own jitted program;
   in torch each part runs eagerly.
2. **ops**: one profiled run of ``--trace-steps`` steps. JAX: ``jax.profiler.trace`` (XLA's CPU
   thunk executor records one event per HLO op; the trace is read back with
   ``jax.profiler.ProfileData``, no TensorBoard needed) joined with the compiled step's HLO text,
   whose stack-frame metadata names the Python function each op came from. torch:
   ``torch.profiler`` self CPU time per ``aten::`` op, its phase from the enclosing autograd /
   optimizer scope. Both are broken down by phase (forward, backward, optimizer), by kind (matmul,
   elementwise, layout copy, gather/scatter) and by model part (linear layers, attention core,
   LayerNorm, GELU, sampled-product gradient, ...), in ms per step. JAX sums are over op events on
   every thread, so independent ops run side by side may add up to more than the wall time.

Examples::

    python benchmarks/profile_train_step.py                         # SHiRA r=8 and LoRA r=8, 16x128, both frameworks
    python benchmarks/profile_train_step.py --methods jax-shira peft-shira --seq-len 64 --rounds 3
    # XNNPACK instead of YNNPACK for the dots (set flags in the environment, never in library code):
    XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT' python benchmarks/profile_train_step.py --tag xnn-dot --out /tmp/p.json

Levers (JAX only; the defaults are what ``jaxsparse train`` runs): ``--remat``, ``--no-donate``,
``--sampled-max-density``. XLA flags go in the ``XLA_FLAGS`` environment variable (recorded in the
JSON). Writes ``benchmarks/results/train_step_profile.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

DEFAULT_METHODS = ("jax-shira", "jax-lora", "peft-shira", "peft-lora")

# Innermost Python function of an op (from the HLO's stack frames) -> the model part it belongs to.
# Checked innermost first, so e.g. the sampled product inside a linear layer counts as itself.
JAX_PARTS = (
    ("sampled_product", "sampled-product grad"),
    ("SparseDelta.apply", "sparse delta -> weight"),
    ("dot_product_attention", "attention core"),
    ("split_heads", "attention core"),
    ("merge_heads", "attention core"),
    ("padding_mask", "attention core"),
    ("LayerNorm.__call__", "LayerNorm"),
    ("gelu", "GELU"),
    ("softmax_cross_entropy_with_integer_labels", "loss + head"),
    ("BertPooler.__call__", "loss + head"),
    ("Embed.__call__", "embeddings"),
    ("BertEmbeddings.__call__", "embeddings"),
    ("global_norm", "optimizer (AdamW, grad norm)"),
    ("update_fn", "optimizer (AdamW, grad norm)"),
    ("apply_updates", "optimizer (AdamW, grad norm)"),
    ("with_trainable", "optimizer (AdamW, grad norm)"),
    ("_threefry_split", "rng split"),
    ("matmul", "linear layers"),
    ("Linear.__call__", "linear layers"),
    ("BertIntermediate.__call__", "GELU"),
    ("BertSelfOutput.__call__", "residual add"),
    ("loss_fn", "loss + head"),
)
_CONTAINERS = {
    "while",
    "call",
    "conditional",
    "tuple",
    "get-tuple-element",
    "parameter",
    "constant",
    "bitcast",
}


# ----------------------------------------------------------------------------- JAX: HLO + trace


def parse_hlo(text: str, rank: int | None = None) -> dict[str, dict[str, Any]]:
    """Every instruction of a compiled HLO module: ``{name: {opcode, kind, phase, part, shape, op_name}}``.

    ``kind`` is matmul / elementwise / layout copy / gather-scatter / loop / other; ``phase`` is
    forward / backward / optimizer from the op_name's ``jvp`` / ``transpose(jvp`` scopes; ``part`` is
    the model part of the innermost known function in the op's stack frame (see ``JAX_PARTS``).
    A matmul with a dimension equal to ``rank`` inside a linear layer is counted as the low-rank branch.
    """
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if line.startswith(("%", "ENTRY")):
            break
        if not line.strip():
            section = None
            continue
        m = re.match(r"(\d+) (.*)", line)
        if not m or section is None:
            continue
        i, rest = int(m.group(1)), m.group(2)
        if section == "FunctionNames":
            funcs[i] = rest.strip('"')
        elif section == "FileNames":
            files[i] = rest.strip('"')
        elif section == "FileLocations":
            locs[i] = int(re.search(r"function_name_id=(\d+)", rest).group(1))
        elif section == "StackFrames":
            loc = int(re.search(r"file_location_id=(\d+)", rest).group(1))
            parent = int(re.search(r"parent_frame_id=(\d+)", rest).group(1))
            frames[i] = (loc, parent)

    def chain(frame_id: int) -> list[str]:
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = frames[frame_id]
            out.append(funcs.get(locs.get(loc, -1), "?"))
            frame_id = parent - 1 if parent - 1 != frame_id else -1  # parent ids are printed 1-based
        return out

    # fused computations: name -> body text (to see what a fusion contains)
    bodies: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"%(\S+) \(", line)
        if m:
            current, bodies[current] = m.group(1), ""
        elif line.startswith("ENTRY"):
            current = None
        elif current is not None:
            bodies[current] += line + "\n"

    ops: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        m = re.match(r"\s+(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\(", line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        calls = re.search(r"calls=%([^\s,]+)", line)
        body = bodies.get(calls.group(1), "") if calls else ""
        op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]
        frame = re.search(r"stack_frame_id=(\d+)", line)
        fchain = chain(int(frame.group(1))) if frame else []
        if opcode in ("dot", "convolution") or " dot(" in body or " convolution(" in body:
            kind = "matmul"
        elif opcode in ("gather", "scatter", "dynamic-slice", "dynamic-update-slice") or re.search(
            r" (gather|scatter)\(", body
        ):
            kind = "gather/scatter"
        elif opcode in ("copy", "transpose") or (
            opcode == "fusion"
            and re.search(r" (copy|transpose)\(", body)
            and not re.search(r" (add|multiply|exponential|divide)\(", body)
        ):
            kind = "layout copy"
        elif opcode == "fusion" or opcode in (
            "add",
            "multiply",
            "reduce",
            "select",
            "compare",
            "exponential",
        ):
            kind = "elementwise/reduce"
        elif opcode == "while":
            kind = "loop"
        else:
            kind = "other"
        if "transpose(jvp" in op_name:
            phase = "backward"
        elif "jvp(" in op_name:
            phase = "forward"
        else:
            phase = "optimizer/other"
        part = "other"
        for fn in fchain:  # innermost first
            hit = next(
                (
                    label
                    for key, label in JAX_PARTS
                    if fn == key or fn.startswith(key + ".") or fn.endswith("." + key)
                ),
                None,
            )
            if hit is None and "gelu" in fn:
                hit = "GELU"
            if hit is not None:
                part = hit
                break
        if part == "linear layers" and phase == "backward" and "/while/" in op_name:
            part = (
                "sampled-product grad"  # custom-VJP ops carry the call site's frames; the loop is its blocks
            )
        if part == "linear layers" and kind == "matmul" and rank is not None:
            dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0])]
            operand_dims = (
                [
                    int(d)
                    for d in re.findall(r"\[([\d,]+)\]", body.split("\n", 1)[0])
                    for d in d.split(",")
                    if d
                ]
                if body
                else []
            )
            if rank in dims or rank in operand_dims:
                part = "LoRA low-rank products"
        ops[name] = {
            "opcode": opcode,
            "kind": kind,
            "phase": phase,
            "part": part,
            "shape": shape,
            "op_name": op_name,
            "frames": fchain[:4],
        }
    return ops


def trace_ops(fn: Any, steps: int) -> dict[str, list[float]]:
    """Run ``fn`` ``steps`` times under ``jax.profiler.trace``: ``{hlo_op: [durations ns]}`` of the
    module(s) it ran, read back with ``jax.profiler.ProfileData``."""
    import jax
    from jax.profiler import ProfileData

    durations: dict[str, list[float]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                fn()
        (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = ProfileData.from_file(path)
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    stats = dict(ev.stats)
                    if "hlo_op" in stats and "jit_step" in str(stats.get("hlo_module", "")):
                        durations[str(stats["hlo_op"])].append(float(ev.duration_ns))
    return durations


def jax_op_profile(contender: Any, steps: int, rank: int) -> dict[str, Any]:
    """Per-op breakdown (ms per step) of a jaxsparse contender's jitted train step."""
    p = contender.parts
    state = p["holder"]["state"]
    compiled = p["train_step"].lower(state, p["params"], p["batch"]).compile()
    ops = parse_hlo(compiled.as_text(), rank=rank)
    durations = trace_ops(contender.step, steps)
    rows = []
    for name, ds in durations.items():
        info = ops.get(
            name,
            {
                "opcode": "?",
                "kind": "other",
                "phase": "optimizer/other",
                "part": "other",
                "shape": "?",
                "op_name": "",
                "frames": [],
            },
        )
        if info["opcode"] in _CONTAINERS:  # a loop's time is its body's ops, counted themselves
            continue
        rows.append({"op": name, "ms": sum(ds) / 1e6 / steps, "calls": len(ds) / steps, **info})
    return summarize_rows(rows)


# ----------------------------------------------------------------------------- torch


_TORCH_KINDS = (
    (
        (
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::baddbmm",
            "aten::addbmm",
            "aten::_mkl_",
            "aten::mkldnn",
        ),
        "matmul",
    ),
    (
        (
            "aten::index",
            "aten::scatter",
            "aten::gather",
            "aten::_sparse",
            "aten::sparse",
            "aten::to_dense",
            "aten::_to_dense",
            "aten::coalesce",
            "aten::_coalesce",
            "aten::index_put",
            "aten::_index_put",
            "aten::embedding",
            "aten::masked_select",
            "aten::nonzero",
            "aten::_indices",
            "aten::_values",
        ),
        "gather/scatter",
    ),
    (
        (
            "aten::copy_",
            "aten::clone",
            "aten::contiguous",
            "aten::_to_copy",
            "aten::to",
            "aten::transpose",
            "aten::permute",
            "aten::view",
            "aten::t",
            "aten::reshape",
            "aten::expand",
            "aten::as_strided",
            "aten::_reshape_alias",
            "aten::unsqueeze",
            "aten::select",
            "aten::slice",
        ),
        "layout copy",
    ),
)
_TORCH_PARTS = (
    ("scaled_dot_product", "attention core"),
    ("softmax", "attention core"),
    ("layer_norm", "LayerNorm"),
    ("gelu", "GELU"),
    ("cross_entropy", "loss + head"),
    ("nll_loss", "loss + head"),
    ("embedding", "embeddings"),
    ("tanh", "loss + head"),
)


def _torch_kind(name: str) -> str:
    for prefixes, kind in _TORCH_KINDS:
        if any(name == p or (name.startswith(p) and p.endswith("_")) for p in prefixes):
            return kind
    return "elementwise/reduce" if name.startswith("aten::") else "other"


def torch_op_profile(contender: Any, steps: int) -> dict[str, Any]:
    """Per-op breakdown (self CPU ms per step) of a torch contender's eager step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            contender.step()
    rows = []
    for ev in prof.events():
        if not ev.name.startswith("aten::") or ev.self_cpu_time_total <= 0:
            continue
        phase, parent, scopes = "forward", ev.cpu_parent, []
        while parent is not None:
            scopes.append(parent.name)
            if parent.name.startswith("Optimizer.step") or "AdamW.step" in parent.name:
                phase = "optimizer/other"
                break
            if "autograd::engine::evaluate_function" in parent.name or parent.name.endswith("Backward0"):
                phase = "backward"
                break
            parent = parent.cpu_parent
        kind = _torch_kind(ev.name)
        context = " ".join([ev.name, *scopes]).lower()
        part = "linear layers" if kind == "matmul" else "other"
        for key, label in _TORCH_PARTS:
            if key in context:
                part = label
                break
        if phase == "optimizer/other":
            part = "optimizer (AdamW, grad norm)"
        elif kind == "matmul" and ("bmm" in ev.name):
            part = "attention core"
        elif kind == "gather/scatter" and part == "other":
            part = "sparse delta / gather"
        rows.append(
            {
                "op": ev.name,
                "ms": ev.self_cpu_time_total / 1e3 / steps,
                "calls": 1 / steps,
                "kind": kind,
                "phase": phase,
                "part": part,
                "shape": "",
                "op_name": scopes[0] if scopes else "",
            }
        )
    return summarize_rows(rows, merge_same_op=True)


# ----------------------------------------------------------------------------- shared


def summarize_rows(rows: list[dict[str, Any]], merge_same_op: bool = False) -> dict[str, Any]:
    """Totals by phase, kind, part and (phase, part), and the top ops."""
    out: dict[str, Any] = {"total_ms": sum(r["ms"] for r in rows)}
    for key in ("phase", "kind", "part"):
        acc: dict[str, float] = collections.defaultdict(float)
        for r in rows:
            acc[r[key]] += r["ms"]
        out[f"by_{key}"] = dict(sorted(acc.items(), key=lambda kv: -kv[1]))
    acc2: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        acc2[f"{r['phase']} / {r['part']} / {r['kind']}"] += r["ms"]
    out["by_phase_part_kind"] = dict(sorted(acc2.items(), key=lambda kv: -kv[1]))
    if merge_same_op:
        merged: dict[tuple, dict[str, Any]] = {}
        for r in rows:
            k = (r["op"], r["phase"], r["part"])
            m = merged.setdefault(k, {**r, "ms": 0.0, "calls": 0.0})
            m["ms"] += r["ms"]
            m["calls"] += r["calls"]
        rows = list(merged.values())
    top = sorted(rows, key=lambda r: -r["ms"])[:40]
    out["top_ops"] = [
        {k: r[k] for k in ("op", "ms", "calls", "kind", "phase", "part", "shape", "op_name")} for r in top
    ]
    return out


def jax_parts(contender: Any) -> dict[str, Any]:
    """Jitted sub-programs of a jaxsparse contender: forward, forward+backward, optimizer update."""
    import jax
    import optax

    from jaxsparse.delta import trainable
    from jaxsparse.train import make_loss

    p = contender.parts
    adapter_loss = make_loss(
        p["apply_model"], p["loss_fn"], factored=p["factored"], sampled_max_density=p["sampled_max_density"]
    )
    fwd = jax.jit(lambda t, a, params, b: adapter_loss(t, a, params, b, None)[0])
    fwd_bwd = jax.jit(jax.value_and_grad(lambda t, a, params, b: adapter_loss(t, a, params, b, None)[0]))
    optimizer = p["optimizer"]

    def _update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(_update)

    def state():
        return p["holder"]["state"]

    def run_fwd():
        s = state()
        return float(fwd(trainable(s.adapter), s.adapter, p["params"], p["batch"]))

    def run_fwd_bwd():
        s = state()
        loss, grads = fwd_bwd(trainable(s.adapter), s.adapter, p["params"], p["batch"])
        jax.block_until_ready(grads)
        return float(loss)

    grads_like = jax.tree.map(lambda x: x * 0 + 1e-3, trainable(state().adapter))

    def run_update():
        s = state()
        out = update(grads_like, s.opt_state, trainable(s.adapter))
        jax.block_until_ready(out)

    return {
        "forward": run_fwd,
        "forward+backward": run_fwd_bwd,
        "optimizer": run_update,
        "step": contender.step,
    }


def torch_parts(contender: Any) -> dict[str, Any]:
    """Eager sub-steps of a torch contender: forward, forward+backward, optimizer.step, whole step."""
    import torch

    p = contender.parts
    model, optimizer, tb = p["model"], p["optimizer"], p["batch"]

    def run_fwd():
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"], labels=tb["labels"])
        return float(out.loss)

    def run_fwd_bwd():
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"], labels=tb["labels"])
        out.loss.backward()
        return float(out.loss)

    run_fwd_bwd()  # gradients in place for the optimizer-only part

    def run_update():
        with torch.no_grad():
            optimizer.step()

    return {
        "forward": run_fwd,
        "forward+backward": run_fwd_bwd,
        "optimizer": run_update,
        "step": contender.step,
    }


def print_report(record: dict[str, Any], top: int) -> None:
    methods = list(record["parts"])
    parts = ["forward", "forward+backward", "optimizer", "step"]
    print(f"\nparts, median ms ({record['rounds']} interleaved rounds; min in brackets)")
    print(f"{'part':18s}" + "".join(f"{m:>22s}" for m in methods))
    for part in parts:
        cells = [
            f"{record['parts'][m][part]['median_ms']:.0f} ({record['parts'][m][part]['min_ms']:.0f})"
            for m in methods
        ]
        print(f"{part:18s}" + "".join(f"{c:>22s}" for c in cells))
    for key in ("by_phase", "by_kind", "by_part"):
        print(f"\nops {key[3:]}, ms per step (sum of op times)")
        labels = sorted(
            {lab for m in methods for lab in record["ops"][m][key]},
            key=lambda lab: -max(record["ops"][m][key].get(lab, 0) for m in methods),
        )
        print(f"{'':30s}" + "".join(f"{m:>14s}" for m in methods))
        for lab in labels:
            print(f"{lab[:30]:30s}" + "".join(f"{record['ops'][m][key].get(lab, 0):14.1f}" for m in methods))
        print(f"{'total':30s}" + "".join(f"{record['ops'][m]['total_ms']:14.1f}" for m in methods))
    for m in methods:
        print(f"\n{m}: top {top} ops (ms per step)")
        for r in record["ops"][m]["top_ops"][:top]:
            print(
                f"  {r['ms']:8.1f}  {r['phase'][:8]:8s} {r['part'][:24]:24s} {r['kind'][:12]:12s} "
                f"{r['op'][:28]:28s} {r['shape'][:30]}"
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    import bench_train_step as bench

    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=bench.METHODS)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds of every part")
    ap.add_argument("--trace-steps", type=int, default=2, help="steps under the op profilers")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument(
        "--remat",
        action="store_const",
        const=True,
        default="dots",
        help="JAX: every block fully recomputed (train.remat: true; default: 'dots', as jaxsparse train)",
    )
    ap.add_argument(
        "--no-remat", dest="remat", action="store_const", const=False, help="JAX: train.remat: false"
    )
    ap.add_argument("--no-donate", action="store_true", help="JAX: do not donate the train state")
    ap.add_argument(
        "--sampled-max-density",
        type=float,
        default=None,
        help="JAX: density threshold of the sampled-product gradient (default: the library's)",
    )
    ap.add_argument("--parts-only", action="store_true", help="skip the op profiles")
    ap.add_argument("--top", type=int, default=12, help="top ops printed per contender")
    ap.add_argument("--tag", default="", help="a label stored with the results (e.g. the lever tried)")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "train_step_profile.json")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "machine_before": common.machine(),
        "threads": args.threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "tag": args.tag,
        "levers": {
            "remat": args.remat,
            "donate": not args.no_donate,
            "sampled_max_density": args.sampled_max_density,
        },
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "trace_steps": args.trace_steps,
    }
    print(common.load_line(record["machine_before"]), file=sys.stderr)
    batch = common.rotten_tomatoes_batch(args.batch_size, args.seq_len)
    contenders, fns = {}, {}
    for m in args.methods:
        if m in bench.JAX_METHODS:
            c = bench.build_jax(
                m,
                batch,
                sampled_max_density=args.sampled_max_density,
                remat=args.remat,
                donate=not args.no_donate,
            )
            parts = jax_parts(c)
        else:
            c = bench.build_torch(m, batch)
            parts = torch_parts(c)
        contenders[m] = c
        for part, fn in parts.items():
            fn()  # compile / warm
            fns[(m, part)] = fn
    timed = common.interleaved(
        {f"{m}|{part}": fn for (m, part), fn in fns.items()}, repeats=args.rounds, warmup=1, progress="parts"
    )
    record["parts"] = {m: {} for m in args.methods}
    for key, stats in timed.items():
        m, part = key.split("|")
        record["parts"][m][part] = stats
    record["load_after_parts"] = [round(x, 2) for x in os.getloadavg()]
    if not args.parts_only:
        record["ops"] = {}
        rank = bench.R
        for m, c in contenders.items():
            c.step()
            record["ops"][m] = (
                jax_op_profile(c, args.trace_steps, rank)
                if m in bench.JAX_METHODS
                else torch_op_profile(c, args.trace_steps)
            )
    record["machine_after"] = common.machine()
    common.write_json(args.out, record)
    if "ops" in record:
        print_report(record, args.top)
    else:
        methods = list(record["parts"])
        for m in methods:
            print(m, {p: round(s["median_ms"]) for p, s in record["parts"][m].items()})
    print(
        f"\nload before {record['machine_before']['loadavg']} after {record['machine_after']['loadavg']}; "
        f"wrote {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
