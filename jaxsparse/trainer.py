"""The one training loop for every method: config in, adapter + metrics + plot out.

``train(cfg)`` builds the model and the adapter from a :class:`jaxsparse.config.Config`, tokenises
the data, and runs a jitted step over the adapter's trainable leaves only (the base parameters
are a frozen input, never in the optimizer). Along the way it evaluates every
``train.eval_every`` steps, shows a tqdm bar, appends metrics to ``<output>/metrics.jsonl``,
and writes an orbax checkpoint every ``train.checkpoint_every`` steps. Ctrl-C (SIGINT) or
SIGTERM checkpoints the current step and stops; ``resume=True`` continues from the latest
checkpoint to the same final parameters as an uninterrupted run (the data position is the step
number, see :func:`jaxsparse.data.batch_indices`).

A run reads in four steps: :func:`check_output` (before anything heavy: the output directory
is new, empty, or a previous run to resume or overwrite; a user's files are never touched),
:func:`setup_run` (data, model, adapter, mesh, state, jitted steps, first evaluation),
:func:`run_steps` (the loop) and :func:`finalize` (final evaluation, plot, adapter, results).
With ``train.mesh`` the same loop runs on a device mesh (:mod:`jaxsparse.sharding`): batch over
``data``, base parameters FSDP-sharded, adapter replicated; checkpoints resume on any mesh.

Output directory (the marker ``.jaxsparse-output.json`` lists the entries a run owns)::

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

import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import atomic, host_memory
from jaxsparse import config as config_lib
from jaxsparse import data as data_lib
from jaxsparse import delta as delta_lib
from jaxsparse import metrics as metrics_lib
from jaxsparse import mlm as mlm_lib
from jaxsparse import sharding as sharding_lib
from jaxsparse import train as train_lib
from jaxsparse import tree as tree_lib
from jaxsparse.checkpoint import Checkpointer
from jaxsparse.config import Config, ConfigError
from jaxsparse.methods import registry
from jaxsparse.methods.sparta import SpartaBudgetError

PyTree = Any


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a SIGINT/SIGTERM has been honoured by writing a checkpoint."""

    def __init__(self, step: int, checkpoint_dir: str) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint in {checkpoint_dir}")
        self.step = step
        self.checkpoint_dir = checkpoint_dir


class TrainingDiverged(FloatingPointError):
    """A non-finite loss or gradient (or, with ``train.loss_spike_factor``, a loss spike) stopped the
    run at ``step``; every checkpoint written before it is kept (``last_checkpoint``, or ``None``)."""

    def __init__(self, message: str, step: int, last_checkpoint: int | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


# The held-out loss rising past this multiple of its value before training marks a run that
# diverged without a non-finite value (e.g. learning_rate=1e8: losses of 1e9, finite).
DIVERGED_FACTOR = 10.0
# How many of the latest step losses the loss-spike guard takes its running median over.
SPIKE_WINDOW = 50


@dataclasses.dataclass
class Progress:
    """What a run carries from one segment to the next in its checkpoints' metadata: the train time
    and number of segments so far, the losses of the open log window (so a resumed run logs the
    same means), the spike guard's recent losses and the count of skipped (non-finite) steps."""

    train_seconds: float = 0.0
    segments: int = 0
    window_losses: list[float] = dataclasses.field(default_factory=list)
    recent_losses: list[float] = dataclasses.field(default_factory=list)
    skipped_steps: int = 0

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> Progress:
        # Checkpoints of earlier versions carry none of these: one earlier segment of unknown time.
        return cls(
            train_seconds=float(extra.get("train_seconds", 0.0)),
            segments=int(extra.get("segments", 1)),
            window_losses=[float(x) for x in extra.get("window_losses", [])],
            recent_losses=[float(x) for x in extra.get("recent_losses", [])],
            skipped_steps=int(extra.get("skipped_steps", 0)),
        )


@dataclasses.dataclass
class EarlyStopping:
    """``train.patience``: the held-out evaluations so far, the best adapter by held-out loss, and
    whether to stop. An evaluation improves when its loss is below the best by more than
    ``min_delta``; ``patience`` evaluations in a row without one stop the run. The evaluation
    before training (step 0) counts, so an adapter that never beats the untrained one is not kept.
    Travels in the checkpoints (``to_extra`` in the metadata, ``best_trainable`` beside the state).

    Example:
        >>> from jaxsparse.delta import Adapter
        >>> stop, adapter = EarlyStopping(patience=2, min_delta=0.01), Adapter({}, dense={"w": jnp.zeros(2)})
        >>> [stop.update(s, {"loss": x}, adapter) for s, x in [(0, 0.7), (10, 0.5), (20, 0.495), (30, 0.6)]]
        [False, False, False, True]
        >>> stop.best_step, stop.best_metrics
        (10, {'loss': 0.5})
    """

    patience: int
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_step: int | None = None
    best_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    bad_evals: int = 0  # evaluations since the last improvement
    stopped_at: int | None = None
    best_trainable: PyTree = None  # delta.trainable of the best adapter (device arrays, a copy)

    def update(self, step: int, metrics: dict[str, float], adapter: delta_lib.Adapter) -> bool:
        """Record the evaluation of ``adapter`` at ``step``; whether the run must stop now."""
        self.last_metrics = dict(metrics)
        loss = float(metrics["loss"])
        if math.isfinite(loss) and loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.best_metrics = loss, step, dict(metrics)
            # A copy: the step donates the state's buffers, the adapter's among them.
            self.best_trainable = jax.tree.map(jnp.copy, delta_lib.trainable(adapter))
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience

    def to_extra(self) -> dict[str, Any]:
        """The JSON part (checkpoint metadata); the best adapter's arrays are saved beside the state."""
        return {
            "early_stopping": {
                "best_loss": self.best_loss,
                "best_step": self.best_step,
                "best_metrics": self.best_metrics,
                "last_metrics": self.last_metrics,
                "bad_evals": self.bad_evals,
                "stopped_at": self.stopped_at,
            }
        }

    @classmethod
    def from_extra(
        cls, patience: int, min_delta: float, extra: dict[str, Any], best_trainable: PyTree
    ) -> EarlyStopping:
        saved = extra.get("early_stopping") or {}
        return cls(
            patience=patience,
            min_delta=min_delta,
            best_loss=float(saved.get("best_loss", math.inf)),
            best_step=saved.get("best_step"),
            best_metrics=dict(saved.get("best_metrics") or {}),
            last_metrics=dict(saved.get("last_metrics") or {}),
            bad_evals=int(saved.get("bad_evals", 0)),
            stopped_at=saved.get("stopped_at"),
            best_trainable=best_trainable,
        )


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
    segments: int = 1  # 1 + the number of times the run was resumed
    skipped_steps: int = 0  # steps train.on_nonfinite=skip skipped
    warnings: tuple[str, ...] = ()
    # train.patience: the step the saved adapter (the best by held-out loss) comes from, and the
    # step the run stopped at (None: it ran all train.steps).
    best_step: int | None = None
    stopped_at: int | None = None


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything a run needs before its first step: model, adapter, tokenised data."""

    model: Any
    adapter: delta_lib.Adapter
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    label_names: tuple[str, ...]
    tokenizer: Any
    # task masked_lm: how training batches are masked (the held-out split is masked once, in ``eval``).
    masking: mlm_lib.MaskingConfig | None = None
    # adapter.quantization_aware: the GPTQ base's grids (module -> QuantizedWeight), see qa_base.
    grids: dict[str, Any] | None = None


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
    if cfg.task == "masked_lm":
        # A decoder-only model (or a GGUF file) has no masked-LM head: say so in terms of the config.
        try:
            return models.from_pretrained(path, **kwargs)
        except ValueError as e:
            if "masked_lm" not in str(e):
                raise
            raise ConfigError(
                f"'task' = 'masked_lm' needs an encoder with an MLM head (bert, distilbert); "
                f"'model.path' = {cfg.model.path!r}: {e}"
            ) from None
    if cfg.task == "seq_cls":
        saved = checkpoint_num_labels(path)
        if saved is not None and saved != len(label_names):
            return _load_with_fresh_head(cfg, path, kwargs, saved, label_names)
    return models.from_pretrained(path, **kwargs)


def checkpoint_num_labels(path: str) -> int | None:
    """The number of labels of the classifier head a Hugging Face directory holds (``None``: not a
    sequence classifier, or not a directory), read from its ``config.json``."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    if not any(str(a).endswith("ForSequenceClassification") for a in raw.get("architectures") or ()):
        return None
    if raw.get("id2label"):
        return len(raw["id2label"])
    return int(raw.get("num_labels", 2))  # transformers' default


def _load_with_fresh_head(
    cfg: Config, path: str, kwargs: dict[str, Any], saved: int, label_names: tuple[str, ...]
) -> Any:
    """A classifier checkpoint with ``saved`` labels for data with another number: its body with a
    fresh head (as transformers' ``ignore_mismatched_sizes``), or, with ``model.reset_head: false``,
    a :class:`ConfigError`."""
    import transformers

    from jaxsparse import models
    from jaxsparse.models import hub

    wanted = len(label_names)
    if not cfg.model.reset_head:
        raise ConfigError(
            f"'model.path' = {cfg.model.path!r} is a classifier with {saved} labels, but the data has "
            f"{wanted} ({list(label_names)}) and 'model.reset_head' is false; set model.reset_head=true "
            "to train a fresh head, or use data with the model's labels"
        )
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    hub.set_labels(config, wanted, dict(enumerate(label_names)))
    prefix = models.architecture(config.model_type).base_model_prefix + "."
    state = hub.read_checkpoint(path)
    # The head's output layer: outside the base model, its first axis the old label count.
    head = {
        k: tuple(np.shape(v))
        for k, v in state.items()
        if not k.startswith(prefix) and np.ndim(v) >= 1 and np.shape(v)[0] == saved
    }
    print(
        f"notice: {path} is a classifier with {saved} labels; the data has {wanted}: a fresh head "
        f"replaces {', '.join(f'{k} {list(s)}' for k, s in sorted(head.items()))} "
        "(set model.reset_head=false to refuse instead)",
        file=sys.stderr,
        flush=True,
    )
    body = {k: v for k, v in state.items() if k not in head}
    return hub.from_state_dict(
        config, body, task="seq_cls", dtype=kwargs.get("dtype", jnp.float32), source=str(path)
    )


def method_config(cfg: Config) -> Any:
    """The method's frozen config dataclass (``ShiraConfig``, ``SpartaConfig``, ``LoraConfig``, ...)
    from the training config, through :mod:`jaxsparse.methods.registry`; ``None`` for full FT."""
    if cfg.method == config_lib.FULL_FINETUNE:
        return None
    a = cfg.adapter
    common = {
        "target_modules": a.target_modules,
        "exclude_modules": a.exclude_modules,
        "modules_to_save": _modules_to_save(cfg),
        # PEFT has no task type for masked LM: its adapters record none (the base class instead).
        "task_type": {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}.get(cfg.task),
        "base_model_name_or_path": cfg.model.path,
    }
    return registry.get(cfg.method).config_from(config_lib.flatten(cfg), **common)


def _modules_to_save(cfg: Config) -> list[str] | None:
    """``adapter.modules_to_save`` where the task has such modules: the classifier head of seq_cls
    (the default), and for masked_lm what the user names (e.g. ``[cls.predictions.transform]``,
    the MLM head's transform, trained densely and exported in PEFT's ``modules_to_save``); the
    default ``[classifier]`` names no module of an MLM, so it means none there."""
    wanted = cfg.adapter.modules_to_save
    if cfg.task == "seq_cls":
        return wanted
    if cfg.task == "masked_lm" and wanted and list(wanted) != ["classifier"]:
        return wanted
    return None


def full_finetune_adapter(params: PyTree) -> delta_lib.Adapter:
    """Full fine-tuning as an adapter: every floating-point leaf is a dense trainable replacement."""
    dense = {
        p: x
        for p, x in tree_lib.leaf_paths(params).items()
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    }
    return delta_lib.Adapter(deltas={}, dense=dense, config=None)


def qa_base(cfg: Config, model: Any, label_names: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """QA-SparsePEFT's base (``adapter.quantization_aware``), as SQFT builds it: ``model`` (the GPTQ
    ``model.path``, loaded dequantized) with the targeted kernels replaced by those of the
    non-quantized sparse ``model.non_quant_path``, and the GPTQ grids of ``model.path``."""
    from jaxsparse.methods.lora import target_modules_of
    from jaxsparse.quant.qa_base import read_grids, with_non_quant_kernels

    non_quant_path = cfg.model.non_quant_path
    try:
        _, grids = read_grids(config_lib.resolve_model_path(cfg.model.path), what="'model.path'")
        non_quant = load_model(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=non_quant_path)), label_names
        )
        modules = target_modules_of(model.params, method_config(cfg))
        params = with_non_quant_kernels(
            model.params,
            non_quant.params,
            modules,
            gptq=f"'model.path' = {cfg.model.path!r}",
            non_quant=f"'model.non_quant_path' = {non_quant_path!r}",
        )
    except (ValueError, tree_lib.TargetError) as e:
        raise ConfigError(str(e)) from None
    return dataclasses.replace(model, params=params), grids


def build_adapter(cfg: Config, params: PyTree, grids: dict[str, Any] | None = None) -> delta_lib.Adapter:
    """Initialise the configured method's adapter over ``params`` (deterministic in ``cfg.seed``);
    ``grids``: the GPTQ grids of a quantization-aware adapter (:func:`qa_base`).

    A target specification that does not fit the model is a :class:`ConfigError` naming the keys."""
    if cfg.method == config_lib.FULL_FINETUNE:
        return full_finetune_adapter(params)
    extra = {} if grids is None else {"grids": grids}
    try:
        return registry.get(cfg.method).init(params, method_config(cfg), jax.random.key(cfg.seed), **extra)
    except SpartaBudgetError as e:
        raise ConfigError(f"{e.key!r}: {e}") from None
    except tree_lib.TargetError as e:
        a = cfg.adapter
        raise ConfigError(
            f"'adapter.target_modules' = {a.target_modules!r} (exclude_modules {a.exclude_modules!r}) does "
            f"not fit the model {cfg.model.path!r}: {e}"
        ) from None


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
    new_token_ids = add_new_tokens(cfg, tokenizer)
    masking = None
    padded_with_eos = False
    if cfg.task == "seq_cls":
        if len(text.label_names) < 2:
            raise ConfigError(
                f"'data.label_column': classification needs >= 2 classes, found {list(text.label_names)}"
            )
        padded_with_eos = pad_with_eos(cfg, tokenizer)
        train = data_lib.tokenize_classification(train_ds, tokenizer, d.max_length)
        ev = data_lib.tokenize_classification(eval_ds, tokenizer, d.max_length)
    elif cfg.task == "masked_lm":
        try:
            masking = mlm_lib.masking_config(tokenizer, mlm_probability=d.mlm_probability)
        except ValueError as e:
            raise ConfigError(f"'task' = 'masked_lm' with 'model.path' = {cfg.model.path!r}: {e}") from None
        # run_mlm.py's blocks: texts with their [CLS]/[SEP], concatenated, cut into max_length tokens.
        train = mlm_lib.group_texts(train_ds["text"], tokenizer, d.max_length)
        ev = mlm_lib.group_texts(eval_ds["text"], tokenizer, d.max_length)
        if d.max_eval_examples is not None:
            ev = {k: v[: d.max_eval_examples] for k, v in ev.items()}
        # One fixed masking of the held-out blocks (keyed by the split's seed, not the run's), so
        # before/after and runs with other seeds are scored on the same masked tokens.
        ev = mlm_lib.mask_arrays(ev, masking, seed=d.split_seed)
    else:
        if tokenizer.eos_token_id is None and tokenizer.pad_token_id is None:
            raise ConfigError("'model.path': the tokenizer has no EOS token to separate documents")
        train = data_lib.tokenize_causal_lm(train_ds, tokenizer, d.max_length)
        ev = data_lib.tokenize_causal_lm(eval_ds, tokenizer, d.max_length)
        if d.max_eval_examples is not None:
            ev = {k: v[: d.max_eval_examples] for k, v in ev.items()}
    if model is None:
        model = load_model(cfg, text.label_names)
    if new_token_ids:
        model = grow_embeddings(cfg, model, new_token_ids)
    if cfg.task == "seq_cls" and padded_with_eos:
        model = with_pad_token_id(cfg, model, tokenizer.pad_token_id)
    cfg = with_token_ids(cfg, tokenizer)
    grids = None
    if cfg.adapter.quantization_aware:
        model, grids = qa_base(cfg, model, text.label_names)
    adapter = build_adapter(cfg, model.params, grids)
    return Prepared(model, adapter, train, ev, text.label_names, tokenizer, masking, grids)


def pad_with_eos(cfg: Config, tokenizer: Any) -> bool:
    """Pad classification batches with EOS when the tokenizer has no pad token (GPT-2, SmolLM2):
    what transformers users do. Returns whether it did (the model's ``pad_token_id`` follows)."""
    from jaxsparse.models.hub import pad_with_eos as pad_tokenizer

    try:
        return pad_tokenizer(tokenizer)
    except ValueError as e:
        raise ConfigError(f"'model.path' = {cfg.model.path!r}: {e}") from None


def with_pad_token_id(cfg: Config, model: Any, pad_token_id: int) -> Any:
    """``model`` with ``config.pad_token_id`` set where it has none, so a decoder classifier pools each
    row's last token that is not padding, as transformers' ``*ForSequenceClassification`` does with
    ``model.config.pad_token_id = tokenizer.pad_token_id``; the saved ``config.json`` carries it, so
    transformers loads the export and takes batches. A model whose config names a pad id keeps it."""
    from jaxsparse import models

    if not hasattr(model.config, "pad_token_id") or model.config.pad_token_id is not None:
        return model
    config = copy.deepcopy(model.config)
    config.pad_token_id = int(pad_token_id)
    apply_fn, _ = models.architecture(model.model_type).build(
        config, model.task, getattr(jnp, cfg.model.dtype)
    )
    return dataclasses.replace(model, config=config, apply_fn=apply_fn)


def add_new_tokens(cfg: Config, tokenizer: Any) -> list[int]:
    """The ids of ``model.new_tokens``, added to ``tokenizer`` (special tokens, never split)."""
    from jaxsparse.models import new_tokens

    if not cfg.model.new_tokens:
        return []
    try:
        return new_tokens.add_tokens(tokenizer, cfg.model.new_tokens)
    except new_tokens.NewTokensError as e:
        raise ConfigError(f"'model.new_tokens': {e}") from None


def grow_embeddings(cfg: Config, model: Any, ids: list[int]) -> Any:
    """``model`` with rows for the new token ``ids``, initialised as the SpaRTA authors' trainer does:
    scaled normal for classifiers, transformers' mean resizing for language models."""
    from jaxsparse.models import new_tokens

    rows = int(np.shape(tree_lib.get_leaf(model.params, new_tokens.embedding_path(model.params)))[0])
    if ids[0] != rows:
        raise ConfigError(
            f"'model.new_tokens': the tokenizer gives the new tokens ids {ids[0]}..{ids[-1]}, but the model's "
            f"embedding has {rows} rows: new tokens need a tokenizer exactly as long as the embedding"
        )
    init = "normal" if cfg.task == "seq_cls" else "mean"
    model, _ = new_tokens.resize_token_embeddings(model, len(ids), init=init, seed=cfg.seed)
    return model


def with_token_ids(cfg: Config, tokenizer: Any) -> Config:
    """``cfg`` with the token strings of ``adapter.trainable_tokens`` replaced by their ids."""
    tokens = cfg.adapter.trainable_tokens
    if not tokens or all(isinstance(t, int) for t in tokens):
        return cfg
    vocab = tokenizer.get_vocab()
    unknown = [t for t in tokens if isinstance(t, str) and t not in vocab]
    if unknown:
        raise ConfigError(
            f"'adapter.trainable_tokens': {unknown} are not tokens of the tokenizer (add them with model.new_tokens)"
        )
    ids = [t if isinstance(t, int) else int(vocab[t]) for t in tokens]
    return dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, trainable_tokens=ids))


def make_optimizer(t: config_lib.TrainConfig) -> optax.GradientTransformation:
    """AdamW/Adam/SGD with warmup + constant/linear/cosine decay, optional clipping, and a separate
    learning rate for dense leaves (the head) when ``head_learning_rate`` is set.

    The linear and cosine schedules decay to ``lr_min`` (the SpaRTA authors' floor; 0 by default),
    the head's to the same fraction ``lr_min / learning_rate`` of its own peak.

    Example:
        >>> t = config_lib.TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-3, lr_min=1e-4)
        >>> opt = make_optimizer(t)
        >>> [round(float(learning_rate(t)(s)), 6) for s in (0, 5, 10)]
        [0.001, 0.00055, 0.0001]
    """
    lr = learning_rate(t)
    head_lr = None if t.head_learning_rate is None else learning_rate(t, t.head_learning_rate)

    def base(schedule: optax.Schedule) -> optax.GradientTransformation:
        if t.optimizer == "adamw":
            return optax.adamw(schedule, weight_decay=t.weight_decay)
        if t.optimizer == "adam":
            return optax.adam(schedule)
        return optax.sgd(schedule)

    if head_lr is None:
        opt = base(lr)
    else:
        opt = optax.multi_transform(
            {"deltas": base(lr), "dense": base(head_lr)},
            lambda tree: {
                "deltas": jax.tree.map(lambda _: "deltas", tree["deltas"]),
                "dense": jax.tree.map(lambda _: "dense", tree["dense"]),
            },
        )
    if t.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(t.max_grad_norm), opt)
    if t.on_nonfinite == "skip":
        # Outermost, so it sees the raw gradient: a non-finite one leaves parameters and optimizer
        # state as they were. Its counters (notfinite_count, total_notfinite) are read by run_steps,
        # which stops before the (max_consecutive_skips + 1)-th, the one apply_if_finite would let through.
        opt = optax.apply_if_finite(opt, max_consecutive_errors=t.max_consecutive_skips)
    return opt


def learning_rate(t: config_lib.TrainConfig, peak: float | None = None) -> optax.Schedule:
    """The learning rate at each step for a peak rate (default ``t.learning_rate``): a linear warm-up
    from 0, then constant, or linear/cosine decay to ``peak * lr_min / learning_rate`` at the last step."""
    peak = t.learning_rate if peak is None else peak
    warmup = config_lib.warmup_steps(t)
    floor = peak * t.lr_min / t.learning_rate

    def schedule(peak: float) -> optax.Schedule:
        decay_steps = max(t.steps - warmup, 1)
        if t.schedule == "constant":
            decay = optax.constant_schedule(peak)
        elif t.schedule == "linear":
            decay = optax.linear_schedule(peak, floor, decay_steps)
        else:
            decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=floor / peak if peak else 0.0)
        if warmup == 0:
            return decay
        warm = optax.linear_schedule(0.0, peak, warmup)
        return optax.join_schedules([warm, decay], [warmup])

    return schedule(peak)


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


def model_fn(model: Any, *, dropout: bool = False, remat: bool | str = False) -> Callable[..., jax.Array]:
    """``apply_model(params, batch) -> logits`` for :mod:`jaxsparse.train`; with ``dropout``,
    ``apply_model(params, batch, rng)`` with the model's dropout on (``takes_rng=True``); with
    ``remat`` (``True``/``"full"`` or ``"dots"``), every transformer block under ``jax.checkpoint``
    (:func:`jaxsparse.models.layers.remat_blocks`, entered here, inside the traced function)."""
    from jaxsparse.models import layers

    if dropout:

        def apply_model_dropout(params: PyTree, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
            with layers.remat_blocks(remat):
                return model.apply_fn(params, batch["input_ids"], batch["attention_mask"], dropout_rng=rng)

        return apply_model_dropout

    def apply_model(params: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
        with layers.remat_blocks(remat):
            return model.apply_fn(params, batch["input_ids"], batch["attention_mask"])

    return apply_model


def uses_dropout(t: config_lib.TrainConfig) -> bool:
    """Whether training steps draw dropout masks: ``train.dropout``, or a non-zero ``train.attention_dropout``."""
    return t.dropout or bool(t.attention_dropout)


def check_dropout(cfg: Config, model: Any) -> None:
    """``train.dropout`` and ``train.attention_dropout`` need a model whose architecture implements dropout."""
    from jaxsparse import models

    t = cfg.train
    arch = models.ARCHITECTURES.get(model.model_type)
    if uses_dropout(t) and not (arch is not None and arch.dropout):
        supported = sorted(m for m, a in models.ARCHITECTURES.items() if a.dropout)
        key = (
            "'train.dropout' = true" if t.dropout else f"'train.attention_dropout' = {t.attention_dropout:g}"
        )
        raise ConfigError(
            f"{key}: model_type {model.model_type!r} has no dropout in jaxsparse; "
            f"supported: {supported} (or set train.dropout=false, train.attention_dropout=null)"
        )


# The model config keys of the attention-probability dropout rate (BERT's; Llama's and DistilBERT's),
# and of the other dropout sites, which train.attention_dropout alone (without train.dropout) turns off.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")
OTHER_DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "classifier_dropout",
    "dropout",
    "seq_classif_dropout",
    "resid_pdrop",
    "embd_pdrop",
)


def training_model(cfg: Config, model: Any) -> Any:
    """The model the train and eval steps run: ``model`` itself, or (``train.precision: bfloat16``)
    the same architecture computing in bfloat16 over its floating-point weights cast to bfloat16,
    and/or (``train.attention_dropout``) with the config's attention dropout rate replaced (the
    other dropout sites at zero unless ``train.dropout``). The loaded ``model`` is left as it was
    (saving and export use it).

    Example:
        >>> import transformers
        >>> from jaxsparse.models import init_params
        >>> tiny = init_params(transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1), task="causal_lm")
        >>> cfg = config_lib.load_config(None, ["train.precision=bfloat16"], check_paths=False)
        >>> m = training_model(cfg, tiny)
        >>> m.params["lm_head"]["kernel"].dtype, m(jnp.array([[1, 2]])).dtype
        (dtype(bfloat16), dtype(bfloat16))
    """
    t = cfg.train
    if t.precision == "float32" and t.attention_dropout is None:
        return model
    from jaxsparse import models

    config = copy.deepcopy(model.config)
    if t.attention_dropout is not None:
        for key in ATTENTION_DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, float(t.attention_dropout))
        if not t.dropout:
            for key in OTHER_DROPOUT_KEYS:
                if getattr(config, key, None):
                    setattr(config, key, 0.0)
    params = model.params
    dtype = getattr(jnp, cfg.model.dtype)
    if t.precision == "bfloat16":
        dtype = jnp.bfloat16
        params = jax.tree.map(
            lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
        )
    apply_fn, _ = models.architecture(model.model_type).build(config, model.task, dtype)
    return dataclasses.replace(model, config=config, params=params, apply_fn=apply_fn)


def float32_trainable(adapter: delta_lib.Adapter) -> delta_lib.Adapter:
    """``adapter`` with its floating-point trainable leaves in float32 (the master copy that
    ``train.precision: bfloat16`` keeps, with float32 gradients and optimizer state)."""
    leaves = jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        delta_lib.trainable(adapter),
    )
    return delta_lib.with_trainable(adapter, leaves)


def train_loss_fn(task: str) -> Callable[[jax.Array, dict[str, jax.Array]], jax.Array]:
    """Mean cross-entropy (``seq_cls``), mean next-token NLL (``causal_lm``) or mean masked-token
    cross-entropy (``masked_lm``: the batch carries ``labels``, -100 where nothing was masked)."""

    def loss_fn(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        if task == "seq_cls":
            return classification_loss(logits, batch["labels"])
        if task == "masked_lm":
            return mlm_lib.masked_lm_loss(logits, batch["labels"])
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
        if task == "masked_lm":
            sums = mlm_lib.masked_lm_sums(logits, batch["labels"], batch["weight"])
            return sums["nll"], {"tokens": sums["count"], "correct": sums["correct"]}
        mask = batch["attention_mask"] * batch["weight"][:, None].astype(batch["attention_mask"].dtype)
        total, count = causal_lm_nll(logits, batch["input_ids"], mask)
        return total, {"tokens": count}

    return loss_fn


def make_eval_step(
    model: Any, task: str, mesh: jax.sharding.Mesh | None = None
) -> Callable[[delta_lib.Adapter, PyTree, Any], dict[str, jax.Array]]:
    """``eval_step(adapter, base_params, batch) -> {"loss": sum, "predictions" | "tokens"}``, jitted.

    With a ``mesh``, the host batch is split over its ``data`` axis and the outputs come back
    replicated (every process can read them)."""
    if mesh is None:
        return train_lib.make_eval_step(model_fn(model), eval_loss_fn(task), factored=True)
    step = jax.jit(
        train_lib.make_eval_step(model_fn(model), eval_loss_fn(task), factored=True, jit=False),
        out_shardings=sharding_lib.replicated(mesh),
    )

    def eval_step(adapter: delta_lib.Adapter, base_params: PyTree, batch: Any) -> dict[str, jax.Array]:
        return step(adapter, base_params, sharding_lib.shard_batch(batch, mesh))

    return eval_step


def padding_buckets(cfg: Config) -> tuple[int, ...] | None:
    """The lengths classification batches are cut to (``data.trim_padding``), or ``None``: other
    tasks' blocks are full, and ``trim_padding: false`` keeps every batch at ``data.max_length``."""
    if cfg.task != "seq_cls" or not cfg.data.trim_padding:
        return None
    return data_lib.length_buckets(cfg.data.max_length)


def evaluate(
    eval_step: Callable,
    adapter: delta_lib.Adapter,
    base_params: PyTree,
    arrays: dict[str, np.ndarray],
    task: str,
    batch_size: int,
    num_labels: int = 0,
    buckets: Sequence[int] | None = None,
) -> dict[str, float]:
    """Loss and accuracy/macro-F1 (``seq_cls``), perplexity (``causal_lm``) or masked-token
    accuracy and perplexity (``masked_lm``, on the masking ``arrays`` carry) over ``arrays``.
    ``buckets``: classification batches are cut to these lengths (:func:`jaxsparse.data.trim_padding`)."""
    n = data_lib.num_examples(arrays)
    batch_size = min(batch_size, n)
    if task == "seq_cls":
        total, preds = 0.0, []
        for batch in data_lib.eval_batches(arrays, batch_size):
            if buckets:
                batch = data_lib.trim_padding(batch, buckets)
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
    if task == "masked_lm":
        sums = []
        for batch in data_lib.eval_batches(arrays, batch_size):
            out = eval_step(adapter, base_params, batch)
            sums.append({"nll": out["loss"], "correct": out["correct"], "count": out["tokens"]})
        m = mlm_lib.masked_lm_metrics(sums)
        return {"loss": m["loss"], "accuracy": m["accuracy"], "perplexity": m["perplexity"]}
    nll, tokens = 0.0, 0.0
    for batch in data_lib.eval_batches(arrays, batch_size):
        out = eval_step(adapter, base_params, batch)
        nll, tokens = nll + float(out["loss"]), tokens + float(out["tokens"])
    return {"loss": nll / tokens, "perplexity": metrics_lib.perplexity(nll, int(tokens))}


def evaluate_adapter(cfg: Config, adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Held-out metrics of the adapter (or full fine-tuned model) in ``adapter_dir`` on ``cfg``'s
    data; for causal and masked LM also the base model's perplexity (``perplexity_before``)."""
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
        if prepared.grids is not None:
            from jaxsparse.quant.qa_delta import with_grids

            # A QA adapter runs on the GPTQ grid, masked by the non-quantized base's zeros.
            sparse = bool(getattr(adapter.config, "sparse_adapter", False))
            adapter = with_grids(adapter, prepared.grids, mask_base=sparse, source=str(adapter_dir))
    eval_step = make_eval_step(model, cfg.task)
    run = functools.partial(
        evaluate,
        eval_step,
        base_params=model.params,
        arrays=prepared.eval,
        task=cfg.task,
        batch_size=cfg.train.eval_batch_size,
        num_labels=len(prepared.label_names),
        buckets=padding_buckets(cfg),
    )
    metrics: dict[str, Any] = {"examples": data_lib.num_examples(prepared.eval), **run(adapter)}
    if cfg.task in ("causal_lm", "masked_lm"):
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
    """Append-only ``metrics.jsonl``; on resume, records past the restored step are dropped.

    ``enabled=False`` (every process of a multi-host run but the first) writes nothing."""

    def __init__(
        self, path: Path, resume_step: int | None, *, enabled: bool = True, final_step: int | None = None
    ) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is not None and path.exists():
            # Each step once: what the interrupted segment logged after its checkpoint is logged
            # again by this one (and, resuming a run that had reached its last step, the final
            # evaluation too), so it is dropped here rather than duplicated.
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill mid-write
                final_eval = rec.get("split") == "eval" and rec.get("step") == final_step
                if rec.get("step", 0) < resume_step or (rec.get("step") == resume_step and not final_eval):
                    kept.append(line)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
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


# Keys that may change between an interrupted run and its resumption without changing the result
# (the mesh changes where arrays live, not what is computed: a run may resume on other devices;
# remat recomputes the same activations in the backward pass instead of keeping them, so a run
# may resume with gradient checkpointing turned on or off to fit another memory budget; the
# sampled-product threshold picks how a sparse delta's gradient is summed, not its value, and its
# "auto" default differs by backend, so a run begun on CPU may resume on a GPU).
RESUME_FREE_KEYS = frozenset(
    {
        "output",
        "train.progress",
        "train.steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.mesh",
        "train.adapter_sharding",
        "train.remat",
        "train.sampled_grad_max_density",
    }
)


def config_record(cfg: Config) -> dict[str, Any]:
    """The keys of ``cfg`` that decide a run's result (all but :data:`RESUME_FREE_KEYS`), as JSON
    values: what a checkpoint records of the config it was written under."""
    return {
        k: v
        for k, v in sorted(config_lib.flatten(cfg).items())
        if k not in RESUME_FREE_KEYS | {"train.steps"}
    }


def config_hash(record: dict[str, Any]) -> str:
    """A short stable hash of a :func:`config_record`.

    Example:
        >>> config_hash(config_record(Config())) == config_hash(config_record(Config(output="elsewhere")))
        True
    """
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _differing(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    # A key added since the checkpoint was written is read at its default (what that run used).
    defaults = json.loads(json.dumps(config_lib.flatten(Config()), default=str))
    return sorted(
        k
        for k in set(saved) | set(now)
        if k not in RESUME_FREE_KEYS and saved.get(k, defaults.get(k)) != now.get(k, defaults.get(k))
    )


def _refuse_or_note(differ: list[str], where: str, force: bool, log: Callable[[str], None] | None) -> None:
    if not differ:
        return
    if force:
        if log is not None:
            log(f"--resume --force: continuing although the config differs from {where} at {differ}")
        return
    raise ConfigError(
        f"--resume: the config differs from the one in {where} at {differ}; resume with the same config, "
        "pass --force to continue with this one, or train into a new --output"
    )


def _check_checkpoint_config(
    cfg: Config, extra: dict[str, Any], where: str, force: bool, log: Callable[[str], None]
) -> None:
    """The restored checkpoint was written under this config (its recorded hash and keys), unless
    ``force``. Checkpoints from before the record carry none: nothing to compare."""
    saved = extra.get("config")
    if not isinstance(saved, dict) or extra.get("config_hash") == config_hash(config_record(cfg)):
        return
    # Through JSON, as the saved record went: tuples are lists, keys are strings.
    now = json.loads(json.dumps(config_record(cfg), default=str))
    _refuse_or_note(_differing(saved, now), where, force, log)


def _check_resume_config(
    cfg: Config, saved_path: Path, *, force: bool = False, log: Callable[[str], None] | None = None
) -> None:
    import yaml

    raw = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    try:
        # Read like any config (keys added since that run take their defaults), without path checks.
        saved = config_lib.flatten(config_lib.from_dict(raw, check_paths=False))
    except ConfigError as e:
        raise ConfigError(f"--resume: {saved_path} is not a valid saved config: {e}") from None
    now = config_lib.flatten(cfg)
    differ = sorted(k for k in now if k not in RESUME_FREE_KEYS and saved.get(k) != now[k])
    if saved["train.steps"] != now["train.steps"] and not _schedule_ignores_steps(saved, now):
        differ = sorted({*differ, "train.steps"})
    _refuse_or_note(differ, str(saved_path), force, log)


def _schedule_ignores_steps(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether changing ``train.steps`` leaves every step's learning rate as it was: a constant
    schedule with a warm-up of a fixed length (a run may then be extended)."""
    return (
        saved["train.schedule"] == now["train.schedule"] == "constant"
        and saved.get("train.warmup_steps") is not None
        and saved.get("train.warmup_steps") == now["train.warmup_steps"]
    )


# ----------------------------------------------------------------------------- the output directory

# What a run writes into its output directory: the only entries `--overwrite` may replace.
TRAIN_ENTRIES = ("config.yaml", "metrics.jsonl", "metrics.png", "checkpoints", "adapter", "results.json")


def _is_previous_run(path: Path) -> bool:
    """A directory a ``jaxsparse train`` wrote: its marker says so, or (runs from before the marker)
    it holds a ``config.yaml``, a ``checkpoints/`` directory and nothing but run entries."""
    marker = atomic.read_marker(path)
    if marker is not None:
        return marker.get("verb") == "train"
    names = set(os.listdir(path))
    return {"config.yaml", "checkpoints"} <= names and names <= set(TRAIN_ENTRIES)


def check_output(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> str:
    """How a run may use its output directory, decided before any heavy work: ``"new"`` (absent or
    empty), ``"resume"`` or ``"overwrite"`` (a previous ``jaxsparse train`` output, with the flag
    that says what to do with it). Anything else is a :class:`ConfigError` and nothing is touched:
    a file, a directory holding anything but a previous run (a user's files, another verb's
    output), a previous run without ``resume``/``overwrite``, ``overwrite`` where entries a run
    did not write sit beside the run's, or a directory that cannot be written.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> check_output(root / "run")
        'new'
        >>> _ = (root / "notes.txt").write_text("mine")
        >>> try:
        ...     check_output(root, overwrite=True)
        ... except ConfigError as e:
        ...     print(str(e)[:38])
        refusing to write the output directory
    """
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: pass one of them")
    path = Path(path).absolute()
    if os.path.lexists(path) and not path.is_dir():
        raise ConfigError(f"'output' = {str(path)!r} exists and is not a directory; choose a directory path")
    names = sorted(os.listdir(path)) if path.is_dir() else []
    mode = "new"
    if names:
        if not _is_previous_run(path):
            marker = atomic.read_marker(path)
            what = (
                f"is a jaxsparse {marker.get('verb', 'output')} output, not a train run"
                if marker is not None
                else f"is not empty ({len(names)} entries: {_show(names)}) and was not written by jaxsparse train"
            )
            raise ConfigError(
                f"refusing to write the output directory {str(path)!r}: it {what} (--resume and --overwrite "
                "apply only to a previous run); nothing was changed. Choose a new or empty --output"
            )
        if resume:
            if not _has_checkpoint(path / "checkpoints"):
                raise ConfigError(
                    f"--resume: the run in {str(path)!r} has no checkpoint to resume from (it stopped before "
                    f"its first one, train.checkpoint_every); start it again with --overwrite"
                )
            mode = "resume"
        elif overwrite:
            foreign = [
                n for n in names if n not in (*TRAIN_ENTRIES, atomic.MARKER) and not _is_own_leftover(n)
            ]
            if foreign:
                raise ConfigError(
                    f"--overwrite: refusing to replace the run in {str(path)!r}: it also holds entries "
                    f"jaxsparse train did not write ({_show(foreign)}); nothing was changed. Move them "
                    "away or choose another --output"
                )
            mode = "overwrite"
        else:
            raise ConfigError(
                f"output directory {str(path)!r} is not empty: it holds a previous jaxsparse train run; pass "
                "--resume to continue it, --overwrite to replace it, or choose another --output"
            )
    elif resume:
        raise ConfigError(
            f"--resume: no checkpoint to resume from in {str(path)!r} ("
            + ("it is empty" if path.is_dir() else "it does not exist")
            + "); drop --resume to start a new run there, or give the --output of the run to continue"
        )
    writable = path if path.is_dir() else _nearest_existing(path.parent)
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the output {str(path)!r}: {str(writable)!r} is not writable")
    return mode


def _has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds an orbax step directory (a complete save is named by its step)."""
    return directory.is_dir() and any(n.isdigit() for n in os.listdir(directory))


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _show(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


# Where `--overwrite` keeps the previous run until the new one has finished (inside the output
# directory: its parent may not be writable). One left by a killed run is ours to delete.
PREVIOUS_PREFIX = ".jaxsparse-previous-"


def _is_own_leftover(name: str) -> bool:
    return name.startswith(PREVIOUS_PREFIX) and name.endswith(".old")


def open_output(path: Path, mode: str) -> Path | None:
    """Make the output directory ready for a run in ``mode`` (see :func:`check_output`): create it
    (permissions from the umask) and write the marker listing the entries the run creates. On
    ``"overwrite"`` the previous run's own entries (and only those) are moved into a hidden
    directory, returned: :func:`settle_previous` deletes it when the new run ends, or puts the
    previous run back when the new one fails."""
    previous = None
    if mode == "overwrite":
        for leftover in [n for n in os.listdir(path) if _is_own_leftover(n)]:
            shutil.rmtree(path / leftover, ignore_errors=True)
        previous = Path(tempfile.mkdtemp(prefix=PREVIOUS_PREFIX, suffix=".old", dir=path))
        for name in TRAIN_ENTRIES:
            if os.path.lexists(path / name):
                os.replace(path / name, previous / name)
    path.mkdir(parents=True, exist_ok=True)
    atomic.write_marker(path, list(TRAIN_ENTRIES), verb="train")
    return previous


def settle_previous(path: Path, previous: Path | None, *, restore: bool) -> None:
    """Delete the run ``--overwrite`` set aside, or (``restore``: the new run failed) put it back in
    place of whatever the new run wrote."""
    if previous is None or not previous.is_dir():
        return
    if restore:
        for name in TRAIN_ENTRIES:
            entry = path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif os.path.lexists(entry):
                entry.unlink()
            if os.path.lexists(previous / name):
                os.replace(previous / name, entry)
    shutil.rmtree(previous, ignore_errors=True)


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """Everything a run needs between its setup and its report (built by :func:`setup_run`)."""

    cfg: Config
    out: Path
    prepared: Prepared
    base_params: PyTree
    state: train_lib.TrainState
    start_step: int
    checkpointer: Checkpointer
    metrics_log: MetricsLog
    train_step: Callable[[train_lib.TrainState, PyTree, Any], tuple[train_lib.TrainState, dict]]
    evaluate: Callable[[delta_lib.Adapter], dict[str, float]]
    initial: dict[str, float] | None
    num_trainable: int
    mesh: jax.sharding.Mesh | None
    primary: bool
    log: Callable[[str], None]
    previous: Path | None = None  # the run --overwrite replaces, until this one has finished
    progress: Progress = dataclasses.field(default_factory=Progress)  # from the earlier segments
    started: float = dataclasses.field(default_factory=time.time)  # when this segment started
    stopping: EarlyStopping | None = None  # train.patience: the best adapter so far and the count

    def checkpoint_extra(self, window: list[float], recent: Any) -> dict[str, Any]:
        """The metadata every checkpoint carries: the config it was written under (its hash and
        the keys that decide the result), and the :class:`Progress` up to it."""
        record = config_record(self.cfg)
        return {
            "config_hash": config_hash(record),
            "config": record,
            "train_seconds": self.progress.train_seconds + (time.time() - self.started),
            "segments": self.progress.segments + 1,
            "window_losses": list(window),
            "recent_losses": list(recent),
            "skipped_steps": self.progress.skipped_steps,
            **({} if self.stopping is None else self.stopping.to_extra()),
        }

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def place_batch(self, batch: dict[str, np.ndarray]) -> Any:
        return batch if self.mesh is None else sharding_lib.shard_batch(batch, self.mesh)


def make_mesh(cfg: Config) -> jax.sharding.Mesh | None:
    """The device mesh ``train.mesh`` asks for (``None``: one device); a :class:`ConfigError` when it
    does not fit the devices there are."""
    if cfg.train.mesh is None:
        return None
    try:
        mesh = sharding_lib.make_mesh(cfg.train.mesh)
    except ValueError as e:
        raise ConfigError(f"'train.mesh' = {cfg.train.mesh!r}: {e}") from None
    data = mesh.shape["data"]
    if cfg.train.batch_size % data:
        raise ConfigError(
            f"'train.batch_size' = {cfg.train.batch_size} is not divisible by the mesh's data axis ({data})"
        )
    return mesh


def setup_run(
    cfg: Config,
    mode: str,
    *,
    model: Any = None,
    tokenizer: Any = None,
    log: Callable[[str], None],
    force: bool = False,
) -> Run:
    """Everything before the first step: data, model and adapter; the mesh and where arrays live;
    the output directory; the state (restored on ``"resume"`` from the newest checkpoint that reads
    back whole, written under the same config unless ``force``); the jitted steps; and the
    evaluation before training."""
    out = Path(cfg.output)
    config_path = out / "config.yaml"
    if mode == "resume" and config_path.is_file():
        _check_resume_config(cfg, config_path, force=force, log=log)
    mesh = make_mesh(cfg)
    primary = jax.process_index() == 0
    # The compiler's freed scratch back to the OS before each program's buffers (BENCHMARKS.md 3b).
    host_memory.trim_after_compiles()

    log(f"loading data ({cfg.data.source}) and model ({cfg.model.path}) ...")
    prepared = prepare(cfg, model=model, tokenizer=tokenizer)
    check_dropout(cfg, prepared.model)
    # Every process has checked the directory (in train()) before the first one writes to it.
    _barrier("jaxsparse: output checked")
    if primary:
        # Checked again: the directory may have changed while the model loaded.
        check_output(out, resume=mode == "resume", overwrite=mode == "overwrite")
        previous = open_output(out, mode)
    else:
        previous = None
    _barrier("jaxsparse: output ready")
    try:
        t = cfg.train
        optimizer = make_optimizer(t)
        adapter = prepared.adapter
        run_model = training_model(cfg, prepared.model)
        if t.precision == "bfloat16":
            adapter = float32_trainable(adapter)
        state = train_lib.init_train_state(adapter, optimizer, cfg.seed)
        base_params = run_model.params
        state_shardings = None
        if mesh is not None:
            state, base_params, state_shardings = place_on_mesh(state, base_params, mesh, t.adapter_sharding)
            log(
                f"mesh {sharding_lib.describe(dict(mesh.shape))} over {mesh.size} devices ({jax.process_count()} processes)"
            )
        num_trainable = adapter.num_trainable()
        log(
            f"{cfg.method}: {num_trainable:,} trainable parameters; {data_lib.num_examples(prepared.train)} train / "
            f"{data_lib.num_examples(prepared.eval)} eval examples of {cfg.data.max_length} tokens"
        )

        ckpt_dir = out / "checkpoints"
        ckpt = Checkpointer(ckpt_dir, save_every=t.checkpoint_every, keep=t.keep_checkpoints)
        start_step = 0
        progress = Progress()
        stopping = None if t.patience is None else EarlyStopping(t.patience, t.min_delta)
        if mode == "resume":
            # Restored into the template's shardings: a run may resume on another device count.
            # A newer checkpoint that does not read back whole is named and left on disk.
            best_template = None if stopping is None else delta_lib.trainable(state.adapter)
            restored, skipped = ckpt.restore_newest_readable(state, best_template)
            for bad, why in skipped:
                log(
                    f"--resume: skipped checkpoint step {bad} in {ckpt_dir}: it does not read back whole "
                    f"({why}); left on disk"
                )
            _check_checkpoint_config(cfg, restored.extra, f"{ckpt_dir} step {restored.step}", force, log)
            state, start_step = restored.state, restored.step
            progress = Progress.from_extra(restored.extra)
            if stopping is not None:
                stopping = EarlyStopping.from_extra(t.patience, t.min_delta, restored.extra, restored.aux)
            log(f"resumed from step {start_step} ({ckpt_dir})")
        if primary:
            config_lib.save_config(cfg, config_path)
        # A resumed run keeps the records up to its checkpoint; a fresh start (or a resume that found no
        # checkpoint) starts the file anew.
        metrics_log = MetricsLog(
            out / "metrics.jsonl", start_step or None, enabled=primary, final_step=t.steps
        )

        train_step, evaluate_fn = make_steps(
            cfg, prepared, optimizer, base_params, mesh, state_shardings, model=run_model
        )
        if start_step == 0:
            initial = evaluate_fn(state.adapter)
            metrics_log.write({"split": "eval", "step": 0, **initial})
            log(f"before training: {_fmt(initial)}")
            if stopping is not None:
                stopping.update(0, initial, state.adapter)
        else:
            initial = _initial_eval(out / "metrics.jsonl")
    except BaseException:
        settle_previous(out, previous, restore=True)
        raise
    return Run(
        cfg=cfg,
        out=out,
        prepared=prepared,
        base_params=base_params,
        state=state,
        start_step=start_step,
        checkpointer=ckpt,
        metrics_log=metrics_log,
        train_step=train_step,
        evaluate=evaluate_fn,
        initial=initial,
        num_trainable=num_trainable,
        mesh=mesh,
        primary=primary,
        log=log,
        previous=previous,
        progress=progress,
        stopping=stopping,
    )


def make_steps(
    cfg: Config,
    prepared: Prepared,
    optimizer: optax.GradientTransformation,
    base_params: PyTree,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    model: Any = None,
) -> tuple[Callable, Callable[[delta_lib.Adapter], dict[str, float]]]:
    """``(train_step, evaluate)``: the jitted step ``(state, base_params, batch) -> (state, metrics)``
    and ``evaluate(adapter) -> metrics`` over the held-out split. On a mesh the step keeps the
    state in ``state_shardings`` and returns replicated metrics. ``model`` is the one the steps run
    (default: :func:`training_model` of ``prepared.model``; ``base_params`` are its params)."""
    t = cfg.train
    model = training_model(cfg, prepared.model) if model is None else model
    train_step = train_lib.make_train_step(
        model_fn(model, dropout=uses_dropout(t), remat=t.remat),
        train_loss_fn(cfg.task),
        optimizer,
        takes_rng=uses_dropout(t),
        factored=True,
        sampled_max_density=None if t.sampled_grad_max_density == "auto" else t.sampled_grad_max_density,
        jit=mesh is None,
    )
    if mesh is not None:
        # Fixed output shardings: the state keeps its layout step after step (and in checkpoints).
        train_step = jax.jit(
            train_step,
            donate_argnums=(0,),
            out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
            compiler_options=train_lib.step_compiler_options() or None,
        )
    evaluate_fn = functools.partial(
        evaluate,
        make_eval_step(model, cfg.task, mesh),
        base_params=base_params,
        arrays=prepared.eval,
        task=cfg.task,
        batch_size=t.eval_batch_size,
        num_labels=len(prepared.label_names),
        buckets=padding_buckets(cfg),
    )
    return train_step, evaluate_fn


def _barrier(name: str) -> None:
    """Wait for every process of a multi-host run (nothing to wait for on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def place_on_mesh(
    state: train_lib.TrainState, base_params: PyTree, mesh: jax.sharding.Mesh, adapter_sharding: str
) -> tuple[train_lib.TrainState, PyTree, train_lib.TrainState]:
    """``(state, base_params, state_shardings)`` on ``mesh``: the base FSDP-sharded, the adapter and
    its optimizer state replicated (or split over ``fsdp``), the step counter and PRNG key replicated."""
    shardings = train_lib.TrainState(
        step=sharding_lib.replicated(mesh),
        adapter=sharding_lib.tree_shardings(state.adapter, mesh, adapter_sharding),
        opt_state=sharding_lib.tree_shardings(state.opt_state, mesh, adapter_sharding),
        rng=sharding_lib.replicated(mesh),
    )
    return sharding_lib.place(state, shardings), sharding_lib.shard_params(base_params, mesh), shardings


def run_steps(run: Run, on_step: Callable[[int, float], None] | None = None) -> train_lib.TrainState:
    """The step loop from ``run.start_step`` to ``train.steps``: log, evaluate and checkpoint on
    their schedules; a SIGINT/SIGTERM (or, on a multi-process run, orbax's preemption sync point)
    checkpoints the step and raises :class:`TrainingInterrupted`. A non-finite loss or gradient
    raises :class:`TrainingDiverged` (``train.on_nonfinite: stop``) or is skipped by
    ``optax.apply_if_finite`` (``skip``) until ``train.max_consecutive_skips`` in a row; so does a
    loss above ``train.loss_spike_factor`` times the running median of the latest losses."""
    t = run.cfg.train
    state = run.state
    batches: Iterator[dict[str, np.ndarray]] = data_lib.train_batches(
        run.prepared.train, t.batch_size, seed=run.cfg.seed, start_step=run.start_step
    )
    buckets = padding_buckets(run.cfg)
    bar = _progress(t, run.start_step)
    progress = run.progress
    running: list[float] = list(progress.window_losses)
    recent: collections.deque[float] = collections.deque(progress.recent_losses, maxlen=SPIKE_WINDOW)
    stopping = run.stopping
    steps = range(run.start_step + 1, t.steps + 1)
    if stopping is not None and stopping.stopped_at is not None:
        steps = range(0)  # resumed after it stopped early: nothing left to train
    with run.checkpointer as ckpt, _StopSignals() as stop:
        for step in steps:
            batch = next(batches)
            if buckets:
                batch = data_lib.trim_padding(batch, buckets)
            if run.prepared.masking is not None:
                # masked_lm: the masking is a function of (seed, batch index) like the batch itself,
                # so a resumed run masks every batch exactly as an uninterrupted one.
                batch = mlm_lib.mask_batch(batch, run.prepared.masking, seed=run.cfg.seed, step=step - 1)
            state, step_metrics = run.train_step(state, run.base_params, run.place_batch(batch))
            loss, grad_norm = float(step_metrics["loss"]), float(step_metrics["grad_norm"])
            if on_step is not None:
                on_step(step, loss)
            problem = _step_problem(run, state, loss, grad_norm, recent)
            if problem is not None:
                if bar is not None:
                    bar.close()
                raise _diverged(run, step, problem, ckpt)
            if math.isfinite(loss) and math.isfinite(grad_norm):
                running.append(loss)
                recent.append(loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if (step % t.log_every == 0 or step == t.steps) and running:
                record: dict[str, Any] = {"split": "train", "step": step, "loss": float(np.mean(running))}
                if t.on_nonfinite == "skip":
                    record["skipped_steps"] = progress.skipped_steps
                run.metrics_log.write(record)
                running = []
            stop_early = False
            if step % t.eval_every == 0 and step != t.steps:
                ev = run.evaluate(state.adapter)
                run.metrics_log.write({"split": "eval", "step": step, **ev})
                if bar is not None:
                    bar.write(f"step {step}: {_fmt(ev)}")
                if stopping is not None and stopping.update(step, ev, state.adapter):
                    stopping.stopped_at, stop_early = step, True
                    if running:  # the open logging window ends here
                        run.metrics_log.write(
                            {"split": "train", "step": step, "loss": float(np.mean(running))}
                        )
                        running = []
                    run.log(
                        f"early stopping at step {step}: no held-out loss improvement by more than "
                        f"{t.min_delta:g} in {t.patience} evaluations (train.patience); the best is "
                        f"step {stopping.best_step}, loss {stopping.best_loss:.4f}"
                    )
            extra = run.checkpoint_extra(running, recent)
            best = None if stopping is None else stopping.best_trainable
            ckpt.save(state, batch_index=step, force=step == t.steps or stop_early, extra=extra, aux=best)
            # Every process of a multi-host run reaches the same preemption sync point at the same
            # step (orbax's own check), so all of them save that step together.
            if stop.received is not None or _reached_preemption_sync_point(step):
                ckpt.save(state, batch_index=step, force=True, extra=extra, aux=best)
                if bar is not None:
                    bar.close()
                raise TrainingInterrupted(step, str(run.checkpoint_dir))
            if stop_early:
                break
    if bar is not None:
        bar.close()
    return state


def _reached_preemption_sync_point(step: int) -> bool:
    """Whether the cluster announced a preemption and ``step`` is the step every process stops at
    (``jax.distributed``'s preemption service; one process, or the service off: never)."""
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the preemption sync manager is not running on this cluster
        return False


def _step_problem(
    run: Run, state: train_lib.TrainState, loss: float, grad_norm: float, recent: Any
) -> str | None:
    """Why the run must stop after this step (``None``: it goes on); under ``on_nonfinite: skip``
    also counts the step ``apply_if_finite`` skipped."""
    t = run.cfg.train
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    what = f"loss became {loss:g} (gradient norm {grad_norm:g})"
    if not finite and t.on_nonfinite == "skip":
        guard = state.opt_state  # optax.ApplyIfFiniteState: the outermost transformation
        skipped = int(guard.total_notfinite)
        if skipped == run.progress.skipped_steps:
            return what  # the gradient was finite, so the update went through: nothing was skipped
        run.progress.skipped_steps = skipped
        in_a_row = int(guard.notfinite_count)
        if in_a_row >= t.max_consecutive_skips:
            return f"{what}: {in_a_row} steps in a row skipped (train.max_consecutive_skips = {t.max_consecutive_skips})"
        return None
    if not finite:
        return what
    if t.loss_spike_factor is not None and recent:
        median = float(np.median(recent))
        if loss > t.loss_spike_factor * median:
            return (
                f"loss {loss:g} is {loss / median:.3g} times the running median {median:.4g} of the last "
                f"{len(recent)} steps (train.loss_spike_factor = {t.loss_spike_factor:g})"
            )
    return None


def _diverged(run: Run, step: int, problem: str, ckpt: Checkpointer) -> TrainingDiverged:
    """The one-line report of a run stopped at ``step``: what happened, the last good checkpoint
    (kept), and what to do."""
    t = run.cfg.train
    saved = [s for s in ckpt.all_steps() if s < step]
    last = max(saved) if saved else None
    where = (
        f"the last good checkpoint is step {last} in {run.checkpoint_dir} (kept)"
        if last is not None
        else "no checkpoint was written before it"
    )
    fixes = [f"lower train.learning_rate (now {t.learning_rate:g})"]
    if t.max_grad_norm is None:
        fixes.append("set train.max_grad_norm")
    if t.on_nonfinite == "stop" and "loss became" in problem:
        fixes.append("set train.on_nonfinite=skip to skip such steps")
    then = (
        f"then continue from step {last} with --resume --force, or start again with --overwrite"
        if last is not None
        else "then start again with --overwrite"
    )
    return TrainingDiverged(
        f"{problem} at step {step}; stopped: {where}. Fix: {', or '.join(fixes)}; {then}", step, last
    )


def finalize(run: Run, state: train_lib.TrainState, seconds: float) -> RunResult:
    """The report: the final evaluation, the plot, the adapter in its on-disk format and
    ``results.json`` (written by the first process only)."""
    cfg, out = run.cfg, run.out
    trained = state.adapter if run.mesh is None else sharding_lib.gather(state.adapter, run.mesh)
    stopping = run.stopping
    if stopping is not None and stopping.stopped_at is not None:
        last = stopping.last_metrics  # evaluated (and logged) at the step it stopped
    else:
        last = run.evaluate(trained)
        run.metrics_log.write({"split": "eval", "step": cfg.train.steps, **last})
        if stopping is not None:
            stopping.update(cfg.train.steps, last, trained)
    final = last
    if stopping is not None and stopping.best_trainable is not None:
        # The adapter saved is the best by held-out loss, and its metrics are the run's result.
        best = stopping.best_trainable
        if run.mesh is not None:
            best = sharding_lib.gather(best, run.mesh)
        trained = delta_lib.with_trainable(trained, best)
        final = stopping.best_metrics
    steps_run = cfg.train.steps if stopping is None or stopping.stopped_at is None else stopping.stopped_at
    total_seconds = run.progress.train_seconds + seconds
    segments = run.progress.segments + 1
    warnings = divergence_warnings(cfg, run.initial, final, run.progress.skipped_steps)
    for warning in warnings:
        run.log(f"warning: {warning}")
    metrics_path = out / "metrics.jsonl"
    plot_path = str(out / "metrics.png")
    adapter_dir = str(out / "adapter")
    if run.primary:
        from jaxsparse.plot import plot_metrics

        plot_path = plot_metrics(
            metrics_path, title=f"{cfg.method} · {Path(cfg.model.path).name} · {cfg.data.source}"
        )
        adapter_dir = save_final_adapter(trained, out / "adapter", run.prepared, cfg)
        summary = {
            "initial": run.initial,
            "final": final,
            "steps": cfg.train.steps,
            "num_trainable": run.num_trainable,
            "method": cfg.method,
            "seed": cfg.seed,
            "seconds": total_seconds,  # train time over every segment (up to each one's checkpoint)
            "segments": segments,
            "skipped_steps": run.progress.skipped_steps,
            "warnings": list(warnings),
        }
        if stopping is not None:
            summary["early_stopping"] = {
                "patience": cfg.train.patience,
                "min_delta": cfg.train.min_delta,
                "metric": "loss",  # held-out loss, lower is better
                "best_step": stopping.best_step,
                "stopped_at": stopping.stopped_at,
                "last": last,  # the metrics of the last step's adapter (not saved unless it is the best)
            }
            summary["steps"] = steps_run
        results_path = out / "results.json"
        tmp = results_path.with_name(f".{results_path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        os.replace(tmp, results_path)
    return RunResult(
        str(out),
        adapter_dir,
        plot_path,
        str(metrics_path),
        run.initial or {},
        final,
        steps_run,
        run.num_trainable,
        total_seconds,
        trained,
        segments,
        run.progress.skipped_steps,
        tuple(warnings),
        best_step=None if stopping is None else stopping.best_step,
        stopped_at=None if stopping is None else stopping.stopped_at,
    )


def divergence_warnings(
    cfg: Config, initial: dict[str, float] | None, final: dict[str, float], skipped_steps: int = 0
) -> list[str]:
    """What a finished run's user must hear although nothing stopped it: a held-out loss that rose
    past :data:`DIVERGED_FACTOR` times its value before training (or is not finite), and steps
    skipped for a non-finite loss or gradient.

    Example:
        >>> divergence_warnings(Config(), {"loss": 0.69}, {"loss": 6e9})[0][:52]
        'the held-out loss rose from 0.6900 before training t'
    """
    out = []
    before, after = (initial or {}).get("loss"), final.get("loss")
    if (
        before is not None
        and after is not None
        and (not math.isfinite(after) or after > DIVERGED_FACTOR * max(before, 1e-12))
    ):
        out.append(
            f"the held-out loss rose from {before:.4f} before training to {after:.4g}: training diverged "
            f"and the adapter is worse than none; lower train.learning_rate (now "
            f"{cfg.train.learning_rate:g}), or set train.loss_spike_factor (e.g. 10) to stop such a run"
        )
    if skipped_steps:
        out.append(
            f"{skipped_steps} of {cfg.train.steps} steps were skipped for a non-finite loss or gradient "
            "(train.on_nonfinite = skip)"
        )
    return out


def train(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    model: Any = None,
    tokenizer: Any = None,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    force: bool = False,
) -> RunResult:
    """Run ``cfg`` end to end; see the module docstring for what lands in ``cfg.output``.

    The output directory is checked first (:func:`check_output`: a user's files are never
    touched); then :func:`setup_run`, :func:`run_steps`, :func:`finalize`. ``resume`` continues
    the run in ``cfg.output`` from its latest checkpoint, ``overwrite`` replaces it.
    ``model``/``tokenizer`` replace loading ``cfg.model.path``; ``on_step(step, loss)`` is called
    after every step (before the stop-signal check, so it may itself send SIGINT). ``force`` lets
    ``resume`` continue a run whose config differs (the differing keys are logged).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.time()
    if force and not resume:
        raise ConfigError("--force applies to --resume only (continue a run whose config differs)")
    mode = check_output(cfg.output, resume=resume, overwrite=overwrite)
    run = setup_run(cfg, mode, model=model, tokenizer=tokenizer, log=log, force=force)
    run.started = start
    try:
        state = run_steps(run, on_step)
        result = finalize(run, state, time.time() - start)
    except (TrainingInterrupted, TrainingDiverged):
        settle_previous(run.out, run.previous, restore=False)  # the new run is the one to --resume
        raise
    except BaseException:
        settle_previous(run.out, run.previous, restore=True)  # a failed --overwrite keeps the old run
        raise
    settle_previous(run.out, run.previous, restore=False)
    return result


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
