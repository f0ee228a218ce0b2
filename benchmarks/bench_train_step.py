"""Training-step time on real MiniLM sequence classification: jaxsparse vs PyTorch (PEFT), side by side.

Contenders (all AdamW, lr 1e-4, weight decay 0.01, the same real Rotten Tomatoes batch, the 2-way
classifier head trained in every configuration):

- ``jax-shira``: ``jaxsparse.methods.shira.init`` r=8 on every body linear (37 weights, k = r*(in+out)),
- ``jax-sparta``: ``jaxsparse.methods.sparta.init`` on the same weights at SHiRA r=8's density (k / numel),
- ``jax-lora``, ``jax-full``: jaxsparse LoRA r=8 (alpha 16) and full fine-tuning (for reference),
- ``jax-sparta-0.1``: SpaRTA at density 0.1% on the same weights (below the sampled-gradient
  threshold, so its weight gradient is the sampled product),
- ``*-dense`` (``jax-lora-dense``, ``jax-sparta-0.1-dense``): the same adapters with
  ``factored=False``: the delta is added to the weight and autodiff forms the dense weight gradient,
- ``peft-shira``, ``peft-lora``: PEFT ``ShiraConfig(r=8)`` / ``LoraConfig(r=8, lora_alpha=16)`` on
  ``query, key, value, dense`` (the same 37 weights), ``task_type="SEQ_CLS"``,
- ``torch-full``: every parameter of the transformers model.

jaxsparse steps come from ``jaxsparse.train.make_train_step`` / ``init_train_state`` (jitted, state
donated, ``factored=True`` as ``jaxsparse train`` runs them unless the name ends in ``-dense``); torch runs eagerly with ``torch.set_num_threads(2)``. Dropout is off in torch because our
BERT has none (same computation). Steps are interleaved (one step of each contender per round) after
warm-up; the first step (compile for JAX) is reported separately. Trainable parameter counts and
optimizer state bytes are recorded too (see bench_memory.py for peak RSS).

    python benchmarks/bench_train_step.py                               # 16x64 and 16x128, all contenders
    python benchmarks/bench_train_step.py --seq-lens 64 --steps 5 --methods jax-shira peft-shira

``--random-init`` builds MiniLM-L6's architecture from its config with random weights and times a
random-token batch (the same in both frameworks): what a machine without the asset packages (the
lent GPU machine, benchmarks/device_check.sh) can run. ``--torch-device cuda`` puts the PyTorch
contenders on the GPU; JAX uses its default backend.

Writes benchmarks/results/train_step.json and benchmarks/plots/train_step.png.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

JAX_METHODS = (
    "jax-shira",
    "jax-sparta",
    "jax-lora",
    "jax-lora-dense",
    "jax-sparta-0.1",
    "jax-sparta-0.1-dense",
    "jax-full",
)
TORCH_METHODS = ("peft-shira", "peft-lora", "torch-full")
METHODS = JAX_METHODS + TORCH_METHODS
R = 8
LR = 1e-4
WEIGHT_DECAY = 0.01
PEFT_TARGETS = ["query", "key", "value", "dense"]
# all-MiniLM-L6-v2's config.json (the asset's), for --random-init; dropout off as in every contender.
MINILM_CONFIG = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    hidden_act="gelu",
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    num_labels=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    classifier_dropout=0.0,
)


def minilm_config() -> Any:
    import transformers

    return transformers.BertConfig(**MINILM_CONFIG)


def random_batch(batch_size: int, seq_len: int, seed: int = 0) -> dict[str, Any]:
    """Random token ids (a quarter of each row padded), labels 0/1: int32 NumPy, for ``--random-init``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, MINILM_CONFIG["vocab_size"], (batch_size, seq_len), dtype=np.int32)
    mask = np.ones((batch_size, seq_len), np.int32)
    mask[:, seq_len - seq_len // 4 :] = 0
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "labels": rng.integers(0, 2, batch_size, dtype=np.int32),
    }


class Contender:
    """One configuration ready to step: ``step()`` runs one optimizer step and blocks until done."""

    def __init__(
        self,
        step: Callable[[], float],
        trainable: int,
        opt_state_bytes: Callable[[], int],
        parts: dict[str, Any] | None = None,
    ):
        self.step = step
        self.trainable = trainable
        self.opt_state_bytes = opt_state_bytes
        # what the step is made of, for benchmarks/profile_train_step.py (model, optimizer, batch ...)
        self.parts = parts or {}


def build_jax(
    method: str,
    batch: dict[str, Any],
    *,
    sampled_max_density: float | None = None,
    remat: bool | str = "dots",
    donate: bool = True,
    extra_compiler_options: dict[str, str] | None = None,
    random_init: bool = False,
) -> Contender:
    """A jaxsparse contender on MiniLM seq_cls: adapter, AdamW state and jitted donated train step.

    ``sampled_max_density`` (None: the library default), ``remat`` (``train.remat``: ``"dots"``,
    the default, ``True`` for every block fully recomputed, ``False`` off), ``donate`` (the
    state's buffers reused) and ``extra_compiler_options`` (XLA options added to the step's own,
    :func:`jaxsparse.train.step_compiler_options`) are levers for benchmarks/profile_train_step.py
    and bench_train_step_levers.py; the defaults are what ``jaxsparse train`` runs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxsparse import models
    from jaxsparse.delta import Adapter, trainable
    from jaxsparse.methods import lora, shira, sparta
    from jaxsparse.train import init_train_state, make_train_step, step_compiler_options
    from jaxsparse.tree import leaf_paths

    if random_init:
        model = models.init_params(minilm_config(), task="seq_cls", seed=0)
    else:
        model = models.from_pretrained(common.minilm_dir(), task="seq_cls", num_labels=2)
    params = model.params
    head = ["classifier"]
    key = jax.random.key(0)
    shira_adapter = shira.init(
        params, shira.ShiraConfig(r=R, random_seed=0, target_modules=PEFT_TARGETS, modules_to_save=head), key
    )
    base_method = method.removesuffix("-dense")
    if base_method == "jax-shira":
        adapter = shira_adapter
    elif base_method == "jax-sparta-0.1":
        adapter = sparta.init(
            params,
            sparta.SpartaConfig(density=0.001, seed=0, target_modules=PEFT_TARGETS, modules_to_save=head),
            key,
        )
    elif base_method == "jax-sparta":
        k = sum(d.k for d in shira_adapter.deltas.values())
        numel = sum(int(np.prod(d.shape)) for d in shira_adapter.deltas.values())
        adapter = sparta.init(
            params,
            sparta.SpartaConfig(density=k / numel, seed=0, target_modules=PEFT_TARGETS, modules_to_save=head),
            key,
        )
    elif base_method == "jax-lora":
        adapter = lora.init(
            params,
            lora.LoraConfig(r=R, lora_alpha=2 * R, target_modules=PEFT_TARGETS, modules_to_save=head),
            key,
        )
    elif base_method == "jax-full":
        # every float leaf trains, as a dense replacement (what `jaxsparse train method=full` does)
        adapter = Adapter(
            deltas={}, dense={p: x for p, x in leaf_paths(params).items() if x.dtype.kind == "f"}
        )
    else:
        raise ValueError(f"unknown jax method {method!r}; choose from {JAX_METHODS}")
    del shira_adapter

    from jaxsparse.models import layers

    def apply_model(p: Any, b: dict[str, jax.Array]) -> jax.Array:
        with layers.remat_blocks(remat):
            return model.apply_fn(p, b["input_ids"], b["attention_mask"])

    def loss_fn(logits: jax.Array, b: dict[str, jax.Array]) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), b["labels"]).mean()

    optimizer = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    holder = {"state": init_train_state(adapter, optimizer, rng=0)}
    factored = not method.endswith("-dense")
    compiler_options = {**step_compiler_options(), **(extra_compiler_options or {})}
    train_step = make_train_step(
        apply_model,
        loss_fn,
        optimizer,
        factored=factored,
        sampled_max_density=sampled_max_density,
        jit=donate,
        compiler_options=compiler_options,
    )
    if not donate:  # the same program as make_train_step jits, minus the donation
        train_step = jax.jit(train_step, compiler_options=compiler_options or None)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    n_trainable = sum(int(x.size) for x in jax.tree.leaves(trainable(adapter)))

    def step() -> float:
        holder["state"], metrics = train_step(holder["state"], params, jbatch)
        return float(metrics["loss"])  # blocks until the step is done

    def opt_bytes() -> int:
        return sum(int(x.nbytes) for x in jax.tree.leaves(holder["state"].opt_state) if hasattr(x, "nbytes"))

    parts = {
        "train_step": train_step,
        "holder": holder,
        "params": params,
        "batch": jbatch,
        "apply_model": apply_model,
        "loss_fn": loss_fn,
        "optimizer": optimizer,
        "factored": factored,
        "sampled_max_density": sampled_max_density,
    }
    return Contender(step, n_trainable, opt_bytes, parts)


def build_torch(
    method: str, batch: dict[str, Any], *, random_init: bool = False, device: str = "cpu"
) -> Contender:
    """A PyTorch contender on MiniLM ``BertForSequenceClassification`` (dropout off), eager AdamW."""
    import torch
    import transformers

    if random_init:
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_config(minilm_config())
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(common.minilm_dir()),
            num_labels=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0,
        )
    if method == "peft-shira":
        import peft

        cfg = peft.ShiraConfig(r=R, target_modules=PEFT_TARGETS, random_seed=0, task_type="SEQ_CLS")
        model = peft.get_peft_model(model, cfg)
    elif method == "peft-lora":
        import peft

        cfg = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=PEFT_TARGETS, task_type="SEQ_CLS")
        model = peft.get_peft_model(model, cfg)
    elif method != "torch-full":
        raise ValueError(f"unknown torch method {method!r}; choose from {TORCH_METHODS}")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    tb = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"], labels=tb["labels"])
        out.loss.backward()
        optimizer.step()
        return float(out.loss)

    def opt_bytes() -> int:
        return sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )

    parts = {"model": model, "optimizer": optimizer, "batch": tb}
    return Contender(step, sum(p.numel() for p in params), opt_bytes, parts)


def build(
    method: str, batch: dict[str, Any], *, random_init: bool = False, torch_device: str = "cpu"
) -> Contender:
    if method in JAX_METHODS:
        return build_jax(method, batch, random_init=random_init)
    return build_torch(method, batch, random_init=random_init, device=torch_device)


def plot(results: list[dict], path: Path, where: str = "2 CPU cores") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 3.8))
    methods = list(results[0]["steps"])
    x = np.arange(len(methods))
    width = 0.8 / len(results)
    for i, res in enumerate(results):
        med = [res["steps"][m]["median_ms"] / 1e3 for m in methods]
        mins = [res["steps"][m]["min_ms"] / 1e3 for m in methods]
        ax.bar(x + (i - (len(results) - 1) / 2) * width, med, width, label=f"16x{res['seq_len']} median")
        ax.scatter(x + (i - (len(results) - 1) / 2) * width, mins, color="k", s=8, zorder=3)
    ax.set_xticks(x, methods, fontsize=8, rotation=30, ha="right")
    ax.set_ylabel("s per train step (dots: min)")
    ax.set_title(f"MiniLM seq-cls train step, AdamW, {where}", fontsize=10)
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per contender (interleaved rounds)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first step")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument(
        "--random-init",
        action="store_true",
        help="MiniLM's architecture, random weights and tokens (no assets)",
    )
    ap.add_argument("--torch-device", default="cpu", help="where the PyTorch contenders run: cpu or cuda")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "train_step.json")
    ap.add_argument("--plot", type=Path, default=common.PLOTS_DIR / "train_step.png")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import jax

    record: dict[str, Any] = {
        "machine_before": common.machine(),
        "threads": args.threads,
        "jax_device": str(jax.devices()[0]),
        "torch_device": args.torch_device,
        "random_init": args.random_init,
        "results": [],
    }
    print(common.load_line(record["machine_before"]), file=sys.stderr)
    for seq_len in args.seq_lens:
        if args.random_init:
            batch = random_batch(args.batch_size, seq_len)
        else:
            batch = common.rotten_tomatoes_batch(args.batch_size, seq_len)
        contenders, first_step_s, build_s = {}, {}, {}
        for m in args.methods:
            contenders[m], build_s[m] = common.timed(
                lambda m=m, b=batch: build(m, b, random_init=args.random_init, torch_device=args.torch_device)
            )
            _, first_step_s[m] = common.timed(contenders[m].step)  # JAX: trace + compile + one step
        steps = common.interleaved(
            {m: c.step for m, c in contenders.items()},
            repeats=args.steps,
            warmup=args.warmup,
            progress=f"16x{seq_len}",
        )
        res = {
            "batch_size": args.batch_size,
            "seq_len": seq_len,
            "real_tokens": int(batch["attention_mask"].sum()),
            "steps": steps,
            "first_step_s": first_step_s,
            "build_s": build_s,
            "trainable": {m: c.trainable for m, c in contenders.items()},
            "opt_state_bytes": {m: c.opt_state_bytes() for m, c in contenders.items()},
        }
        record["results"].append(res)
        for m in args.methods:
            s = steps[m]
            print(
                f"16x{seq_len} {m:20s} median {s['median_ms'] / 1e3:.3f} s  min {s['min_ms'] / 1e3:.3f} s  "
                f"first {first_step_s[m]:.2f} s  trainable {res['trainable'][m]:,}  "
                f"opt state {res['opt_state_bytes'][m] / 2**20:.2f} MiB",
                file=sys.stderr,
            )
        del contenders
    record["machine_after"] = common.machine()
    common.write_json(args.out, record)
    where = (
        "2 CPU cores"
        if args.torch_device == "cpu"
        else f"JAX {record['jax_device']}, torch {args.torch_device}"
    )
    plot(record["results"], args.plot, where)
    print(f"wrote {args.out} and {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
