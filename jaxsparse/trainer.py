"""The one training loop for every method: config in, adapter + metrics + plot out.

``train(cfg)`` builds the model and the adapter from a :class:`jaxsparse.config.Config`, tokenises
the data, and runs a jitted step over the adapter's trainable leaves only (the base parameters
are a frozen input, never in the optimizer). Along the way it evaluates every
``train.eval_every`` steps, shows a tqdm bar, appends metrics to ``<output>/metrics.jsonl``,
and writes an orbax checkpoint every ``train.checkpoint_every`` steps. Ctrl-C (SIGINT) or
SIGTERM checkpoints the current step and stops; ``resume=True`` continues from the latest
checkpoint to the same final parameters as an uninterrupted run (the data position is the step
number, see :func:`jaxsparse.data.batch_indices`).

Output directory::

    config.yaml        the resolved config (what --resume and `jaxsparse eval` read)
    metrics.jsonl      one JSON object per log/eval point
    metrics.png        loss and accuracy / perplexity curves
    checkpoints/       orbax checkpoints (step-numbered)
    adapter/           the final adapter in its PEFT (SHiRA) / SpaRTA format
    results.json       initial and final evaluation

Example (tiny run; ``jaxsparse train`` does the same with the embedded default):
    >>> from jaxsparse.config import load_config
    >>> cfg = load_config(None, ["train.steps=2"])            # doctest: +SKIP
    >>> result = train(cfg)                                   # doctest: +SKIP
    >>> result.final["accuracy"]                              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import config as config_lib
from jaxsparse import data as data_lib
from jaxsparse import delta as delta_lib
from jaxsparse import metrics as metrics_lib
from jaxsparse import train as train_lib
from jaxsparse import tree as tree_lib
from jaxsparse.checkpoint import Checkpointer
from jaxsparse.config import Config, ConfigError

PyTree = Any


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a SIGINT/SIGTERM has been honoured by writing a checkpoint."""

    def __init__(self, step: int, checkpoint_dir: str) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint in {checkpoint_dir}")
        self.step = step
        self.checkpoint_dir = checkpoint_dir


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a finished run produced."""

    output_dir: str
    adapter_dir: str
    plot_path: str
    metrics_path: str
    initial: dict[str, float]
    final: dict[str, float]
    steps: int
    num_trainable: int
    seconds: float
    adapter: Any = dataclasses.field(repr=False, default=None)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything a run needs before its first step: model, adapter, tokenised data."""

    model: Any
    adapter: delta_lib.Adapter
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    label_names: tuple[str, ...]
    tokenizer: Any


# ----------------------------------------------------------------------------- building


def load_tokenizer(model_path: str) -> Any:
    """The model's tokenizer (a Hugging Face directory or a ``.gguf`` file), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from jaxsparse.models import load_tokenizer as models_load_tokenizer
    except ImportError:
        models_load_tokenizer = None
    if models_load_tokenizer is not None:
        return models_load_tokenizer(model_path)
    from transformers import AutoTokenizer

    path = Path(model_path)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def load_model(cfg: Config, label_names: tuple[str, ...]) -> Any:
    """The base model for ``cfg.task`` (``seq_cls`` gets a fresh head with ``len(label_names)`` labels)."""
    from jaxsparse import models

    path = config_lib.resolve_model_path(cfg.model.path)
    kwargs: dict[str, Any] = {"task": cfg.task}
    if cfg.task == "seq_cls":
        kwargs["num_labels"] = len(label_names)
        kwargs["id2label"] = dict(enumerate(label_names))
    if cfg.model.dtype != "float32":
        kwargs["dtype"] = getattr(jnp, cfg.model.dtype)
    return models.from_pretrained(path, **kwargs)


def method_config(cfg: Config) -> Any:
    """The method's frozen config dataclass (``ShiraConfig`` / ``SpartaConfig``), or ``None`` for full FT."""
    a = cfg.adapter
    task_type = "SEQ_CLS" if cfg.task == "seq_cls" else "CAUSAL_LM"
    common = {
        "target_modules": a.target_modules,
        "exclude_modules": a.exclude_modules,
        "modules_to_save": a.modules_to_save if cfg.task == "seq_cls" else None,
        "task_type": task_type,
        "base_model_name_or_path": cfg.model.path,
    }
    if cfg.method == "shira":
        from jaxsparse.methods.shira import ShiraConfig

        return ShiraConfig(r=a.r, mask_type=a.mask_type, random_seed=cfg.seed, **common)
    if cfg.method == "lora":
        from jaxsparse.methods.lora import LoraConfig

        targets = "all-linear" if a.target_modules is None else a.target_modules
        return LoraConfig(r=a.r, lora_alpha=a.lora_alpha, **{**common, "target_modules": targets})
    if cfg.method == "sparta":
        from jaxsparse.methods.sparta import SpartaConfig

        return SpartaConfig(density=a.density, seed=cfg.seed, **common)
    return None


def full_finetune_adapter(params: PyTree) -> delta_lib.Adapter:
    """Full fine-tuning as an adapter: every floating-point leaf is a dense trainable replacement."""
    dense = {
        p: x
        for p, x in tree_lib.leaf_paths(params).items()
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    }
    return delta_lib.Adapter(deltas={}, dense=dense, config=None)


def build_adapter(cfg: Config, params: PyTree) -> delta_lib.Adapter:
    """Initialise the configured method's adapter over ``params`` (deterministic in ``cfg.seed``)."""
    if cfg.method == "full":
        return full_finetune_adapter(params)
    import importlib

    module = importlib.import_module(f"jaxsparse.methods.{cfg.method}")
    return module.init(params, method_config(cfg), jax.random.key(cfg.seed))


def prepare(cfg: Config, *, model: Any = None, tokenizer: Any = None) -> Prepared:
    """Load data, tokenizer, model and adapter for ``cfg`` (``model``/``tokenizer`` override loading)."""
    d = cfg.data
    text = data_lib.load_text_data(
        d.source,
        path=d.path,
        eval_path=d.eval_path,
        text_column=d.text_column,
        label_column=d.label_column if cfg.task == "seq_cls" else None,
        eval_size=int(d.eval_size) if d.eval_size >= 1 else d.eval_size,
        split_seed=d.split_seed,
        label_names=d.label_names,
    )
    train_ds, eval_ds = text.train, text.eval
    if d.max_train_examples is not None:
        train_ds = train_ds.select(range(min(d.max_train_examples, len(train_ds))))
    if d.max_eval_examples is not None:
        eval_ds = eval_ds.select(range(min(d.max_eval_examples, len(eval_ds))))
    if tokenizer is None:
        tokenizer = load_tokenizer(config_lib.resolve_model_path(cfg.model.path))
    if cfg.task == "seq_cls":
        if len(text.label_names) < 2:
            raise ConfigError(
                f"'data.label_column': classification needs >= 2 classes, found {list(text.label_names)}"
            )
        train = data_lib.tokenize_classification(train_ds, tokenizer, d.max_length)
        ev = data_lib.tokenize_classification(eval_ds, tokenizer, d.max_length)
    else:
        if tokenizer.eos_token_id is None and tokenizer.pad_token_id is None:
            raise ConfigError("'model.path': the tokenizer has no EOS token to separate documents")
        train = data_lib.tokenize_causal_lm(train_ds, tokenizer, d.max_length)
        ev = data_lib.tokenize_causal_lm(eval_ds, tokenizer, d.max_length)
        if d.max_eval_examples is not None:
            ev = {k: v[: d.max_eval_examples] for k, v in ev.items()}
    if model is None:
        model = load_model(cfg, text.label_names)
    adapter = build_adapter(cfg, model.params)
    return Prepared(model, adapter, train, ev, text.label_names, tokenizer)


def make_optimizer(t: config_lib.TrainConfig) -> optax.GradientTransformation:
    """AdamW/Adam/SGD with warmup + constant/linear/cosine decay, optional clipping, and a separate
    learning rate for dense leaves (the head) when ``head_learning_rate`` is set."""

    def schedule(peak: float) -> optax.Schedule:
        decay_steps = max(t.steps - t.warmup_steps, 1)
        if t.schedule == "constant":
            decay = optax.constant_schedule(peak)
        elif t.schedule == "linear":
            decay = optax.linear_schedule(peak, 0.0, decay_steps)
        else:
            decay = optax.cosine_decay_schedule(peak, decay_steps)
        if t.warmup_steps == 0:
            return decay
        warm = optax.linear_schedule(0.0, peak, t.warmup_steps)
        return optax.join_schedules([warm, decay], [t.warmup_steps])

    def base(peak: float) -> optax.GradientTransformation:
        lr = schedule(peak)
        if t.optimizer == "adamw":
            return optax.adamw(lr, weight_decay=t.weight_decay)
        if t.optimizer == "adam":
            return optax.adam(lr)
        return optax.sgd(lr)

    if t.head_learning_rate is None:
        opt = base(t.learning_rate)
    else:
        opt = optax.multi_transform(
            {"deltas": base(t.learning_rate), "dense": base(t.head_learning_rate)},
            lambda tree: {
                "deltas": jax.tree.map(lambda _: "deltas", tree["deltas"]),
                "dense": jax.tree.map(lambda _: "dense", tree["dense"]),
            },
        )
    if t.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(t.max_grad_norm), opt)
    return opt


# ----------------------------------------------------------------------------- steps


def classification_loss(logits: jax.Array, labels: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy over the (weighted) examples of a batch."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if weight is None:
        return losses.mean()
    return (losses * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def causal_lm_nll(
    logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    targets = input_ids[:, 1:]
    mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
    return (nll * mask).sum(), mask.sum()


def model_fn(model: Any, *, dropout: bool = False) -> Callable[..., jax.Array]:
    """``apply_model(params, batch) -> logits`` for :mod:`jaxsparse.train`; with ``dropout``,
    ``apply_model(params, batch, rng)`` with the model's dropout on (``takes_rng=True``)."""
    if dropout:

        def apply_model_dropout(params: PyTree, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
            return model.apply_fn(params, batch["input_ids"], batch["attention_mask"], dropout_rng=rng)

        return apply_model_dropout

    def apply_model(params: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
        return model.apply_fn(params, batch["input_ids"], batch["attention_mask"])

    return apply_model


def check_dropout(cfg: Config, model: Any) -> None:
    """``train.dropout`` needs a model whose architecture implements dropout."""
    from jaxsparse import models

    arch = models.ARCHITECTURES.get(model.model_type)
    if cfg.train.dropout and not (arch is not None and arch.dropout):
        supported = sorted(m for m, a in models.ARCHITECTURES.items() if a.dropout)
        raise ConfigError(
            f"'train.dropout' = true: model_type {model.model_type!r} has no dropout in jaxsparse; "
            f"supported: {supported} (or set train.dropout=false)"
        )


def train_loss_fn(task: str) -> Callable[[jax.Array, dict[str, jax.Array]], jax.Array]:
    """Mean cross-entropy (``seq_cls``) or mean next-token NLL (``causal_lm``) of a batch."""

    def loss_fn(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        if task == "seq_cls":
            return classification_loss(logits, batch["labels"])
        total, count = causal_lm_nll(logits, batch["input_ids"], batch["attention_mask"])
        return total / jnp.maximum(count, 1.0)

    return loss_fn


def eval_loss_fn(task: str) -> Callable[[jax.Array, dict[str, jax.Array]], tuple[jax.Array, dict[str, Any]]]:
    """Per-batch *sums* over real (``weight`` 1) examples, plus predictions or token counts."""

    def loss_fn(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, Any]]:
        if task == "seq_cls":
            losses = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), batch["labels"]
            )
            return (losses * batch["weight"]).sum(), {"predictions": jnp.argmax(logits, axis=-1)}
        mask = batch["attention_mask"] * batch["weight"][:, None].astype(batch["attention_mask"].dtype)
        total, count = causal_lm_nll(logits, batch["input_ids"], mask)
        return total, {"tokens": count}

    return loss_fn


def make_eval_step(model: Any, task: str) -> Callable[[delta_lib.Adapter, PyTree, Any], dict[str, jax.Array]]:
    """``eval_step(adapter, base_params, batch) -> {"loss": sum, "predictions" | "tokens"}``, jitted."""
    return train_lib.make_eval_step(model_fn(model), eval_loss_fn(task), factored=True)


def evaluate(
    eval_step: Callable,
    adapter: delta_lib.Adapter,
    base_params: PyTree,
    arrays: dict[str, np.ndarray],
    task: str,
    batch_size: int,
    num_labels: int = 0,
) -> dict[str, float]:
    """Loss and accuracy/macro-F1 (``seq_cls``) or perplexity (``causal_lm``) over ``arrays``."""
    n = data_lib.num_examples(arrays)
    batch_size = min(batch_size, n)
    if task == "seq_cls":
        total, preds = 0.0, []
        for batch in data_lib.eval_batches(arrays, batch_size):
            out = eval_step(adapter, base_params, batch)
            total += float(out["loss"])
            preds.append(np.asarray(out["predictions"])[batch["weight"] > 0])
        predictions = np.concatenate(preds)
        labels = arrays["labels"]
        return {
            "loss": total / n,
            "accuracy": metrics_lib.accuracy(labels, predictions),
            "macro_f1": metrics_lib.macro_f1(labels, predictions, num_labels or None),
        }
    nll, tokens = 0.0, 0.0
    for batch in data_lib.eval_batches(arrays, batch_size):
        out = eval_step(adapter, base_params, batch)
        nll, tokens = nll + float(out["loss"]), tokens + float(out["tokens"])
    return {"loss": nll / tokens, "perplexity": metrics_lib.perplexity(nll, int(tokens))}


def evaluate_adapter(cfg: Config, adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Held-out metrics of the adapter (or full fine-tuned model) in ``adapter_dir`` on ``cfg``'s
    data; for causal LM also the base model's perplexity (``perplexity_before``)."""
    from jaxsparse import inference, models
    from jaxsparse.adapter_io import load_adapter

    prepared = prepare(cfg)
    model = prepared.model
    if cfg.task == "seq_cls":
        saved = inference.adapter_labels(adapter_dir)
        if saved is not None and [saved[i] for i in sorted(saved)] != list(prepared.label_names):
            raise ConfigError(
                f"{adapter_dir}: the adapter's labels {[saved[i] for i in sorted(saved)]} differ from the "
                f"data's {list(prepared.label_names)} ('data' section)"
            )
    if inference.is_full_model(adapter_dir):
        adapter = full_finetune_adapter(models.from_pretrained(adapter_dir, task=cfg.task).params)
    else:
        adapter = load_adapter(adapter_dir, model=model)
    eval_step = make_eval_step(model, cfg.task)
    run = functools.partial(
        evaluate,
        eval_step,
        base_params=model.params,
        arrays=prepared.eval,
        task=cfg.task,
        batch_size=cfg.train.eval_batch_size,
        num_labels=len(prepared.label_names),
    )
    metrics: dict[str, Any] = {"examples": data_lib.num_examples(prepared.eval), **run(adapter)}
    if cfg.task == "causal_lm":
        before = run(delta_lib.Adapter(deltas={}))
        metrics["perplexity_before"] = before["perplexity"]
    return metrics


# ----------------------------------------------------------------------------- outputs


def base_model_name(cfg: Config) -> str:
    """How an adapter names its base model: the asset name as given (portable across machines),
    else the absolute path."""
    if cfg.model.path in config_lib.ASSET_MODELS:
        return cfg.model.path
    return str(Path(cfg.model.path).absolute())


def save_final_adapter(adapter: delta_lib.Adapter, directory: Path, prepared: Prepared, cfg: Config) -> str:
    """The trained adapter in its on-disk format (PEFT SHiRA / SpaRTA; full FT: a full Hugging Face
    model), plus the tokenizer and, for classification, the model's ``config.json`` (its
    ``id2label``). Written to a temporary directory beside ``directory`` and renamed into place."""
    from jaxsparse import adapter_io, models

    model = prepared.model
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if cfg.method == "full":
            models.save_pretrained(
                dataclasses.replace(model, params=delta_lib.apply(model.params, adapter)), tmp
            )
        else:
            adapter_io.save_adapter(adapter, tmp, model=model, base_model_name_or_path=base_model_name(cfg))
            if cfg.task == "seq_cls" and not (tmp / "config.json").exists():
                # PEFT adapter files carry no labels; the model config beside them does (PEFT ignores it).
                hf_config = copy.deepcopy(model.config)
                hf_config.architectures = [
                    models.architecture(model.model_type).hf_class_name(hf_config, "seq_cls")
                ]
                hf_config.save_pretrained(str(tmp))
        prepared.tokenizer.save_pretrained(str(tmp))
        old = directory.with_name(f".{directory.name}.old{os.getpid()}")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(directory)


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records past the restored step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


class _StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (restored on exit)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_resume_config(cfg: Config, saved_path: Path) -> None:
    import yaml

    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    now = config_lib.to_dict(cfg)
    # Keys that may change between an interrupted run and its resumption without changing the result.
    free = {
        "output",
        "train.progress",
        "train.steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
    }

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, prefix + k + "."))
            else:
                out[prefix + k] = v
        return out

    a, b = flat(saved), flat(now)
    differ = sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))
    if differ:
        raise ConfigError(
            f"--resume: the config differs from the one in {saved_path} at {differ}; "
            "resume with the same config or train into a new --output"
        )
    if a.get("train.steps") != b.get("train.steps") and a.get("train.schedule") != "constant":
        raise ConfigError("--resume: 'train.steps' changed, which changes the learning-rate schedule")


# ----------------------------------------------------------------------------- the loop


def train(
    cfg: Config,
    *,
    resume: bool = False,
    model: Any = None,
    tokenizer: Any = None,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Run ``cfg`` end to end; see the module docstring for what lands in ``cfg.output``.

    ``model``/``tokenizer`` replace loading ``cfg.model.path``; ``on_step(step, loss)`` is called
    after every step (before the stop-signal check, so it may itself send SIGINT).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.time()
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"
    config_path = out / "config.yaml"
    has_checkpoint = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if has_checkpoint and not resume:
        raise ConfigError(
            f"'output' = {str(out)!r} already holds checkpoints; pass --resume to continue that run "
            "or choose another --output"
        )
    if resume and config_path.is_file():
        _check_resume_config(cfg, config_path)
    out.mkdir(parents=True, exist_ok=True)

    log(f"loading data ({cfg.data.source}) and model ({cfg.model.path}) ...")
    prepared = prepare(cfg, model=model, tokenizer=tokenizer)
    model, adapter = prepared.model, prepared.adapter
    check_dropout(cfg, model)
    base_params = model.params
    task, t = cfg.task, cfg.train
    num_labels = len(prepared.label_names)
    optimizer = make_optimizer(t)
    state = train_lib.init_train_state(adapter, optimizer, cfg.seed)
    n_trainable = adapter.num_trainable()
    log(
        f"{cfg.method}: {n_trainable:,} trainable parameters; {data_lib.num_examples(prepared.train)} train / "
        f"{data_lib.num_examples(prepared.eval)} eval examples of {cfg.data.max_length} tokens"
    )

    ckpt = Checkpointer(ckpt_dir, save_every=t.checkpoint_every, keep=t.keep_checkpoints)
    start_step = 0
    if resume and ckpt.latest_step() is not None:
        restored = ckpt.restore(state)
        state, start_step = restored.state, restored.step
        log(f"resumed from step {start_step} ({ckpt_dir})")
    elif resume:
        log(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
    config_lib.save_config(cfg, config_path)
    metrics_log = MetricsLog(out / "metrics.jsonl", start_step if resume else None)

    train_step = train_lib.make_train_step(
        model_fn(model, dropout=t.dropout),
        train_loss_fn(task),
        optimizer,
        takes_rng=t.dropout,
        factored=True,
        sampled_max_density=t.sampled_grad_max_density,
    )
    eval_step = make_eval_step(model, task)
    do_eval = functools.partial(
        evaluate,
        eval_step,
        base_params=base_params,
        arrays=prepared.eval,
        task=task,
        batch_size=t.eval_batch_size,
        num_labels=num_labels,
    )
    results_path = out / "results.json"
    initial = None
    if start_step == 0:
        initial = do_eval(state.adapter)
        metrics_log.write({"split": "eval", "step": 0, **initial})
        log(f"before training: {_fmt(initial)}")
    else:
        initial = _initial_eval(out / "metrics.jsonl")

    batches: Iterator[dict[str, np.ndarray]] = data_lib.train_batches(
        prepared.train, t.batch_size, seed=cfg.seed, start_step=start_step
    )
    bar = _progress(t, start_step)
    running: list[float] = []
    step = start_step
    with ckpt, _StopSignals() as stop:
        for step in range(start_step + 1, t.steps + 1):
            state, step_metrics = train_step(state, base_params, next(batches))
            running.append(float(step_metrics["loss"]))
            if on_step is not None:
                on_step(step, running[-1])
            if not math.isfinite(running[-1]):
                raise FloatingPointError(
                    f"loss became {running[-1]} at step {step}; lower train.learning_rate"
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running[-1]:.4f}")
            if step % t.log_every == 0 or step == t.steps:
                metrics_log.write({"split": "train", "step": step, "loss": float(np.mean(running))})
                running = []
            if step % t.eval_every == 0 and step != t.steps:
                ev = do_eval(state.adapter)
                metrics_log.write({"split": "eval", "step": step, **ev})
                if bar is not None:
                    bar.write(f"step {step}: {_fmt(ev)}")
            ckpt.save(state, batch_index=step, force=step == t.steps)
            if stop.received is not None:
                ckpt.save(state, batch_index=step, force=True)
                if bar is not None:
                    bar.close()
                raise TrainingInterrupted(step, str(ckpt_dir))
    if bar is not None:
        bar.close()

    trained = state.adapter
    final = do_eval(trained)
    metrics_log.write({"split": "eval", "step": t.steps, **final})
    from jaxsparse.plot import plot_metrics

    plot_path = plot_metrics(
        out / "metrics.jsonl", title=f"{cfg.method} · {Path(cfg.model.path).name} · {cfg.data.source}"
    )
    adapter_dir = save_final_adapter(trained, out / "adapter", prepared, cfg)
    seconds = time.time() - start
    summary = {
        "initial": initial,
        "final": final,
        "steps": t.steps,
        "num_trainable": n_trainable,
        "method": cfg.method,
        "seed": cfg.seed,
        "seconds": seconds,
    }
    tmp = results_path.with_name(f".{results_path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(tmp, results_path)
    return RunResult(
        str(out),
        adapter_dir,
        plot_path,
        str(out / "metrics.jsonl"),
        initial or {},
        final,
        t.steps,
        n_trainable,
        seconds,
        trained,
    )


def _initial_eval(path: Path) -> dict[str, float] | None:
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["split"] == "eval" and rec["step"] == 0:
            return {k: v for k, v in rec.items() if k not in ("split", "step")}
    return None


def _progress(t: config_lib.TrainConfig, start_step: int):
    if not t.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=t.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
