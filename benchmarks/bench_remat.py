"""``train.remat`` modes side by side: XLA temp memory and step time of one training step.

For each model and method, the step is built three times, with ``train.remat: false``, ``"dots"``
(the default: each block's matmul outputs kept, the elementwise work recomputed in the backward)
and ``true`` (each block recomputed from its input), compiled as ``jaxsparse train`` compiles it
(:func:`jaxsparse.train.make_train_step`, donated state, the CPU memory-optimized scheduler), and
timed interleaved (one step of each mode per round). The XLA temp buffer comes from the compiled
step's ``memory_analysis()``: it holds the activations the backward pass needs.

Models: ``minilm`` (real MiniLM-L6 seq-cls, the 16x128 Rotten Tomatoes batch of
``bench_train_step.py``, targets ``query/key/value/dense``) and ``smollm2`` (real SmolLM2-135M
causal LM from its GGUF, a 4x128 batch of random token ids, every projection of the 30 blocks).
Methods: ``lora`` (r=8) and ``shira`` (r=8).

    python benchmarks/bench_remat.py                                  # both models, both methods
    python benchmarks/bench_remat.py --models minilm --methods shira --rounds 3

Writes ``benchmarks/results/remat.json`` (``--out``); section 3c of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

MODES: tuple[bool | str, ...] = (False, "dots", True)
MODELS = ("minilm", "smollm2")
METHODS = ("lora", "shira")
TARGETS = {
    "minilm": r".*(query|key|value|dense)",
    "smollm2": r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
}


def load_case(model_name: str, method_name: str) -> dict[str, Any]:
    """The model, batch, loss and r=8 adapter one (model, method) pair is measured on; loaded once
    and shared by the three remat modes' steps."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxsparse import models
    from jaxsparse.methods import registry
    from jaxsparse.trainer import causal_lm_nll

    if model_name == "minilm":
        model = models.from_pretrained(common.minilm_dir(), task="seq_cls", num_labels=2)
        raw = common.rotten_tomatoes_batch(16, 128)
        batch = {k: jnp.asarray(v) for k, v in raw.items()}

        def loss_fn(logits: jax.Array, b: dict[str, jax.Array]) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    else:
        model = models.from_pretrained(common.smollm_gguf(), task="causal_lm")
        ids = np.random.default_rng(0).integers(1, model.config.vocab_size, (4, 128))
        batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.ones((4, 128), jnp.int32)}

        def loss_fn(logits: jax.Array, b: dict[str, jax.Array]) -> jax.Array:
            total, count = causal_lm_nll(logits, b["input_ids"], b["attention_mask"])
            return total / count

    method = registry.get(method_name)
    adapter = method.init(
        model.params, method.config_class(r=8, target_modules=TARGETS[model_name]), jax.random.key(0)
    )
    return {"model": model, "batch": batch, "loss_fn": loss_fn, "adapter": adapter}


def build_step(case: dict[str, Any], mode: bool | str) -> tuple[Any, float]:
    """A ``step()`` closure running one training step of ``case`` with ``train.remat: mode``, and
    the compiled step's XLA temp in MiB."""
    import jax
    import optax

    from jaxsparse import train as train_lib
    from jaxsparse.models import layers

    model, batch = case["model"], case["batch"]

    def apply_model(p: Any, b: dict[str, jax.Array]) -> jax.Array:
        with layers.remat_blocks(mode):
            return model.apply_fn(p, b["input_ids"], b["attention_mask"])

    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    holder = {"state": train_lib.init_train_state(case["adapter"], optimizer, rng=0)}
    train_step = train_lib.make_train_step(apply_model, case["loss_fn"], optimizer, factored=True)
    compiled = train_step.lower(holder["state"], model.params, batch).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20

    def step() -> float:
        holder["state"], metrics = train_step(holder["state"], model.params, batch)
        return float(metrics["loss"])  # blocks until the step is done

    step()
    return step, temp_mib


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--rounds", type=int, default=6, help="timed interleaved rounds per model and method")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "remat.json")
    args = ap.parse_args(argv)

    import numpy as np

    record: dict[str, Any] = {"machine_before": common.machine(), "runs": []}
    print(common.load_line(record["machine_before"]), file=sys.stderr)
    for model_name in args.models:
        for method_name in args.methods:
            case = load_case(model_name, method_name)
            steps, temps = {}, {}
            for mode in MODES:
                steps[mode], temps[mode] = build_step(case, mode)
            times: dict[Any, list[float]] = {mode: [] for mode in MODES}
            for _ in range(args.rounds):
                for mode in MODES:
                    start = time.perf_counter()
                    steps[mode]()
                    times[mode].append((time.perf_counter() - start) * 1e3)
            for mode in MODES:
                row = {
                    "model": model_name,
                    "method": method_name,
                    "remat": mode,
                    "temp_mib": round(temps[mode], 1),
                    "median_ms": float(np.median(times[mode])),
                    "min_ms": float(min(times[mode])),
                    "times_ms": times[mode],
                }
                record["runs"].append(row)
                print(
                    f"{model_name:8s} {method_name:6s} remat={mode!s:5s} temp {row['temp_mib']:7.1f} MiB  "
                    f"step median {row['median_ms']:6.0f} ms  min {row['min_ms']:6.0f} ms",
                    file=sys.stderr,
                )
    record["machine_after"] = common.machine()
    common.write_json(args.out, record)
    print(
        f"load {record['machine_before']['loadavg']} -> {record['machine_after']['loadavg']}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
