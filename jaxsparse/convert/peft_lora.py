"""Read and write PEFT 0.22 LoRA adapters (``peft_type: "LORA"``) exactly as PEFT does.

On disk (``save_pretrained`` of a ``PeftModel``):

- ``adapter_config.json``: every ``LoraConfig`` field PEFT writes (about 40 keys);
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``...lora_B.weight`` (out, r) per adapted module; ``modules_to_save`` leaves in full under their
  Hugging Face key (``base_model.model.classifier.weight``); trained biases of adapted modules as
  ``...<module>.base_layer.bias``.

In memory a :class:`~jaxsparse.delta.LowRankDelta` holds ``a = lora_A.T`` (in, r) and ``b =
lora_B.T`` (r, out) at ``<module>.kernel``. The LoRA factors never change layout with
``fan_in_fan_out`` (GPT-2 ``Conv1D``); only dense leaves go through the one naming rule
(:func:`jaxsparse.models.naming.hf_key`). Config fields we do not implement are refused by name.

Example:
    >>> import tempfile, jax, jax.numpy as jnp
    >>> from jaxsparse.methods import lora
    >>> params = {"model": {"q_proj": {"kernel": jnp.ones((4, 6))}}}
    >>> cfg = lora.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    >>> adapter = lora.init(params, cfg, jax.random.key(0))
    >>> out = tempfile.mkdtemp() + "/adapter"
    >>> save_peft_lora(adapter, out)
    >>> back = load_peft_lora(out, params)
    >>> bool(jnp.array_equal(back.deltas["model.q_proj.kernel"].a, adapter.deltas["model.q_proj.kernel"].a))
    True
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import tree as tree_lib
from jaxsparse.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from jaxsparse.convert import (
    DIFFERENT_BASE_HINT,
    NAME_LIST,
    NAMES,
    PEFT_VERSION,
    AdapterFormatError,
    check_dense,
    check_field_types,
    read_json,
    read_safetensors,
    write_safetensors_bytes,
)
from jaxsparse.delta import Adapter, LowRankDelta
from jaxsparse.methods import sqft
from jaxsparse.methods.lora import LoraConfig, dense_paths, target_modules_of
from jaxsparse.models.naming import hf_key, param_path

PyTree = Any

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

__all__ = [
    "AdapterFormatError",
    "load_peft_lora",
    "lora_config_from_peft",
    "lora_config_to_peft",
    "save_peft_lora",
]


# PEFT 0.22 LoraConfig fields we implement (name -> our LoraConfig field).
_SUPPORTED = (
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "task_type",
    "base_model_name_or_path",
)
# What PEFT's LoraConfig holds in each field we read (a hand-edited or corrupt file is refused).
_FIELD_KINDS = {
    "r": "int|null",
    "lora_alpha": "number|null",
    "target_modules": NAMES,
    "exclude_modules": NAMES,
    "lora_dropout": "number|null",
    "fan_in_fan_out": "bool|null",
    "bias": "str|null",
    "use_rslora": "bool|null",
    "modules_to_save": NAME_LIST,
    "init_lora_weights": "bool|str|null",
    "rank_pattern": "object|null",
    "alpha_pattern": "object|null",
    "task_type": "str|null",
    "base_model_name_or_path": "str|null",
}
# Fields that do not change what the saved weights mean.
_IGNORED = (
    "peft_type",
    "peft_version",
    "auto_mapping",
    "revision",
    "inference_mode",
    "megatron_core",
    "runtime_config",
)
# Fields we refuse unless they hold PEFT's default (the value that means "feature off").
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "use_dora": (False,),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "megatron_config": (None,),
    "loftq_config": ({}, None),
    "eva_config": (None,),
    "corda_config": (None,),
    "lora_ga_config": (None,),
    "velora_config": (None,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False,),
    "qalora_group_size": None,  # meaningful only with use_qalora
    "monteclora_config": (None,),
    "layer_replication": (None,),
    "lora_bias": (False,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "astra_config": (None,),
    "kasa_config": (None,),
    "ensure_weight_tying": (False,),
}
# Everything PEFT 0.22 writes besides our fields, with the value it writes when the feature is off.
_WRITTEN_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "astra_config": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "inference_mode": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": PEFT_VERSION,
    "qalora_group_size": 16,
    "revision": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "velora_config": None,
}
# init_lora_weights values that rewrite the *base* weights (PiSSA, OLoRA, ...): the adapter alone
# does not reproduce the model, so importing it would silently give wrong outputs.
_BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga", "orthogonal", "astra")


# --------------------------------------------------------------------------- config


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``adapter_dir``; clear errors for a missing/invalid file."""
    return read_json(os.path.join(os.fspath(adapter_dir), CONFIG_NAME))


def lora_config_from_peft(raw: Mapping[str, Any], *, source: str = CONFIG_NAME) -> LoraConfig:
    """Our :class:`LoraConfig` from PEFT's ``adapter_config.json`` dict, refusing unsupported features by key.

    Example:
        >>> lora_config_from_peft({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).scaling("q_proj")
        2.0
        >>> try:
        ...     lora_config_from_peft({"peft_type": "LORA", "use_dora": True})
        ... except AdapterFormatError as e:
        ...     print(str(e)[:61])
        adapter_config.json: 'use_dora' = True is not supported (only
    """
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{source}: peft_type is {peft_type!r}, expected 'LORA'")
    for key, value in raw.items():
        if key in _SUPPORTED or key in _IGNORED:
            continue
        if key in sqft.PEFT_FLAGS:  # SQFT's LoraConfig fields (jaxsparse.methods.sqft)
            if not isinstance(value, bool):
                raise AdapterFormatError(f"{source}: {key!r} must be true or false, got {value!r}")
            continue
        if key in _OFF_VALUES:
            allowed = _OFF_VALUES[key]
            if allowed is None or value in allowed:
                continue
            raise AdapterFormatError(
                f"{source}: {key!r} = {value!r} is not supported (only {' or '.join(map(repr, allowed))}); "
                "jaxsparse imports plain LoRA (optionally rsLoRA, rank/alpha patterns, biases, modules_to_save)"
            )
        if value in (None, False, {}, []):
            continue  # a newer PEFT's feature, switched off
        raise AdapterFormatError(
            f"{source}: unknown LoRA config key {key!r} = {value!r} (written by a newer PEFT?)"
        )
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterFormatError(
            f"{source}: init_lora_weights={init!r} rewrites the base model's weights, which the adapter alone "
            "cannot reproduce; convert it to plain LoRA in PEFT first"
        )
    if init not in (True, False, "gaussian"):
        init = True  # eva and other init-only schemes: the saved factors are all that matters
    if raw.get("use_qalora"):
        raise AdapterFormatError(f"{source}: use_qalora is not supported")
    check_field_types(raw, _FIELD_KINDS, source)
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = raw.get(name) or {}
        check_field_types(pattern, dict.fromkeys(pattern, "number"), f"{source}: {name}")
    kwargs = {k: raw[k] for k in _SUPPORTED if k in raw and raw[k] is not None}
    kwargs["init_lora_weights"] = init
    for name in ("rank_pattern", "alpha_pattern"):
        kwargs[name] = raw.get(name) or {}
    flags = {k: raw[k] for k in sqft.PEFT_FLAGS if raw.get(k)}
    try:
        return sqft.SQFTConfig(**kwargs, **flags) if flags else LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise AdapterFormatError(f"{source}: {e}") from None


def lora_config_to_peft(config: LoraConfig, *, base_model_class: str | None = None) -> dict[str, Any]:
    """PEFT 0.22's ``adapter_config.json`` dict for ``config`` (keys sorted like PEFT writes them)."""
    out: dict[str, Any] = dict(_WRITTEN_DEFAULTS)
    out.update(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=_json_list(config.target_modules),
        exclude_modules=_json_list(config.exclude_modules),
        lora_dropout=config.lora_dropout,
        fan_in_fan_out=config.fan_in_fan_out,
        bias=config.bias,
        use_rslora=config.use_rslora,
        modules_to_save=_json_list(config.modules_to_save),
        init_lora_weights=config.init_lora_weights,
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
    )
    if isinstance(config, sqft.SQFTConfig):
        out.update({k: getattr(config, k) for k in sqft.PEFT_FLAGS})  # as SQFT's patched LoraConfig
    if config.task_type == "SEQ_CLS":
        # PeftModelForSequenceClassification adds the head names and writes them.
        heads = list(out["modules_to_save"] or [])
        out["modules_to_save"] = heads + [h for h in ("classifier", "score") if h not in heads]
    out["auto_mapping"] = (
        {"base_model_class": base_model_class, "parent_library": _parent_library(base_model_class)}
        if base_model_class and config.task_type is None
        else None
    )
    return dict(sorted(out.items()))


def _json_list(value: Sequence[str] | str | None) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    return list(value)


def _parent_library(class_name: str) -> str:
    try:
        import transformers

        return getattr(transformers, class_name).__module__
    except (ImportError, AttributeError):
        return "transformers"


# --------------------------------------------------------------------------- tensors


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an adapter ``.safetensors`` file; a missing, truncated or corrupt file is a clear error."""
    path = os.fspath(path)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(os.path.dirname(path), "adapter_model.bin")):
        raise AdapterFormatError(
            f"{path}: not found; adapter_model.bin is a pickle, which we do not load (re-save with safetensors)"
        )
    return read_safetensors(path)[0]


def _hf_dense_key(path: str, fan_in_fan_out: Sequence[str], targets: set[str]) -> tuple[str, bool]:
    key, transposed = hf_key(path, fan_in_fan_out=fan_in_fan_out)
    module, _, leaf = key.rpartition(".")
    if module in targets:  # a LoRA-wrapped layer: PEFT keeps its own parameters under base_layer
        key = f"{module}.base_layer.{leaf}"
    return key, transposed


def lora_state_dict(adapter: Adapter, *, fan_in_fan_out: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The tensors PEFT saves for ``adapter`` (keys with ``base_model.model.``, PyTorch layouts)."""
    out: dict[str, np.ndarray] = {}
    targets = set()
    for path, delta in adapter.deltas.items():
        module = _lora_module(path, delta)
        targets.add(module)
        out[f"{KEY_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(delta.a).T)
        out[f"{KEY_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(delta.b).T)
    for path, leaf in adapter.dense.items():
        key, transposed = _hf_dense_key(path, fan_in_fan_out, targets)
        array = np.asarray(leaf)
        out[KEY_PREFIX + key] = np.ascontiguousarray(array.T if transposed else array)
    return out


def _lora_module(path: str, delta: Any) -> str:
    if not isinstance(delta, LowRankDelta):
        raise TypeError(f"{path}: a PEFT LoRA adapter holds LowRankDelta leaves, got {type(delta).__name__}")
    if delta.rank_mask is not None or delta.mask is not None:
        raise ValueError(
            f"{path}: PEFT LoRA cannot represent a rank mask or an entry mask; merge or drop it first"
        )
    if tree_lib.leaf_name(path) != "kernel":
        raise ValueError(f"{path}: PEFT LoRA adapts linear weights only (a 'kernel' leaf)")
    return tree_lib.module_of(path)


# --------------------------------------------------------------------------- save / load


def save_peft_lora(
    adapter: Adapter,
    out_dir: str | os.PathLike,
    *,
    fan_in_fan_out: Sequence[str] = (),
    base_model_class: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``adapter`` as a PEFT LoRA directory that ``peft.PeftModel.from_pretrained`` loads.

    ``fan_in_fan_out``: the base model's (in, out)-stored modules (``Model.fan_in_fan_out``), used to lay
    out dense leaves. ``base_model_class`` (e.g. ``"LlamaForCausalLM"``) fills PEFT's ``auto_mapping``.
    The directory appears complete or not at all; an existing non-empty one is refused unless
    ``overwrite`` and it is a previous jaxsparse output (see :func:`jaxsparse.atomic.atomic_dir`).
    """
    config = adapter.config
    if not isinstance(config, LoraConfig):
        raise TypeError(f"save_peft_lora needs an adapter with a LoraConfig, got {type(config).__name__}")
    elastic = None
    if isinstance(config, sqft.SQFTConfig):
        # SQFT stores the factors only: the SparsePEFT masks come from the base, the NLS ranks are
        # per-step samples; an NLS super-adapter records its search space as SQFT does.
        adapter = sqft.without_masks(adapter)
        if config.nls:
            elastic = sqft.elastic_adapter_config(config, [tree_lib.module_of(p) for p in adapter.deltas])
    for path, delta in adapter.deltas.items():
        module = _lora_module(path, delta)
        r, _ = config.rank_and_alpha(module)
        if delta.rank != r or not math.isclose(delta.scale, config.scaling(module), rel_tol=1e-6):
            raise ValueError(
                f"{path}: rank {delta.rank} / scale {delta.scale} disagree with the config "
                f"(r={r}, scaling={config.scaling(module)}); PEFT would apply a different update"
            )
    # A method may keep state PEFT has no field for in files of its own beside PEFT's (which PEFT
    # ignores): the config's optional peft_extra_files(adapter) -> {file name: bytes}.
    extra_files = getattr(config, "peft_extra_files", None)
    extra = dict(extra_files(adapter)) if extra_files is not None else {}
    data = write_safetensors_bytes(lora_state_dict(adapter, fan_in_fan_out=fan_in_fan_out), {"format": "pt"})
    with atomic_dir(out_dir, overwrite=overwrite, format="peft_lora") as tmp:
        for name, content in sorted(extra.items()):
            atomic_write_bytes(os.path.join(tmp, name), content)
        atomic_write_text(
            os.path.join(tmp, CONFIG_NAME),
            json.dumps(
                lora_config_to_peft(config, base_model_class=base_model_class), indent=2, sort_keys=True
            )
            + "\n",
        )
        atomic_write_bytes(os.path.join(tmp, WEIGHTS_NAME), data)
        if elastic is not None:
            atomic_write_text(
                os.path.join(tmp, sqft.ELASTIC_CONFIG_NAME), json.dumps(elastic, indent=4) + "\n"
            )


def load_peft_lora(
    adapter_dir: str | os.PathLike, params: PyTree, *, fan_in_fan_out: Sequence[str] = ()
) -> Adapter:
    """A PEFT LoRA directory as our :class:`~jaxsparse.delta.Adapter`, validated against the base ``params``.

    ``params`` (arrays or ``jax.ShapeDtypeStruct``) is the model the adapter is for, with the same task
    head (e.g. a sequence classifier's params for a SEQ_CLS adapter). Every tensor must name a parameter
    of the model with the right shape, every targeted module must have both factors with the configured
    rank, and the file's modules must be exactly those the config selects in this model; otherwise an
    :class:`AdapterFormatError` names the key and what was expected.
    """
    adapter_dir = os.fspath(adapter_dir)
    cfg_path = os.path.join(adapter_dir, CONFIG_NAME)
    config = lora_config_from_peft(read_adapter_config(adapter_dir), source=cfg_path)
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    tensors = read_adapter_tensors(weights_path)
    leaves = tree_lib.leaf_paths(params)

    factors: dict[str, dict[str, np.ndarray]] = {}
    dense_raw: dict[str, np.ndarray] = {}
    for key, array in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterFormatError(f"{weights_path}: key {key!r} does not start with {KEY_PREFIX!r}")
        name = key[len(KEY_PREFIX) :]
        for which in ("lora_A", "lora_B"):
            if name.endswith(f".{which}.weight"):
                factors.setdefault(name[: -len(f".{which}.weight")], {})[which] = array
                break
        else:
            if ".lora_" in name:
                raise AdapterFormatError(
                    f"{weights_path}: {key!r} is a LoRA tensor kind we do not support (only lora_A/lora_B of linear layers)"
                )
            dense_raw[name.replace(".base_layer.", ".")] = array

    try:
        expected = set(target_modules_of(params, config))
    except ValueError as e:
        raise AdapterFormatError(f"{cfg_path}: target_modules do not fit the base model: {e}") from None
    deltas: dict[str, LowRankDelta] = {}
    for module, pair in sorted(factors.items()):
        kernel_path = f"{module}.kernel"
        if kernel_path not in leaves or len(leaves[kernel_path].shape) != 2:
            raise AdapterFormatError(
                f"{weights_path}: LoRA target {module!r} is not a linear layer of the base model "
                f"(an adapter for a different architecture?); model modules look like {sorted(expected)[:3]}"
            )
        missing = {"lora_A", "lora_B"} - set(pair)
        if missing:
            raise AdapterFormatError(f"{weights_path}: {module!r} has no {sorted(missing)[0]}.weight")
        fan_in, fan_out = leaves[kernel_path].shape
        r, _ = config.rank_and_alpha(module)
        a, b = pair["lora_A"], pair["lora_B"]
        if a.shape != (r, fan_in) or b.shape != (fan_out, r):
            raise AdapterFormatError(
                f"{weights_path}: {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"expected ({r}, {fan_in}) and ({fan_out}, {r}) for r={r} and the base weight "
                f"(out={fan_out}, in={fan_in}) {DIFFERENT_BASE_HINT}"
            )
        a = check_dense(a, f"{weights_path}: {KEY_PREFIX}{module}.lora_A.weight")
        b = check_dense(b, f"{weights_path}: {KEY_PREFIX}{module}.lora_B.weight")
        deltas[kernel_path] = LowRankDelta(
            a=jnp.asarray(a.T), b=jnp.asarray(b.T), scale=float(config.scaling(module))
        )

    found = set(factors)
    if found != expected:
        extra, absent = sorted(found - expected), sorted(expected - found)
        raise AdapterFormatError(
            f"{adapter_dir}: the adapter's LoRA modules differ from what target_modules selects in the base "
            f"model {DIFFERENT_BASE_HINT}: only in the file {extra[:4]}, only in the model {absent[:4]}"
        )

    dense: dict[str, Any] = {}
    for key, array in sorted(dense_raw.items()):
        try:
            path = param_path(key, leaves)
        except KeyError:
            raise AdapterFormatError(
                f"{weights_path}: {KEY_PREFIX + key!r} names no parameter of the base model "
                "(an adapter for a different architecture or task head?)"
            ) from None
        _, transposed = hf_key(path, fan_in_fan_out=fan_in_fan_out)
        value = array.T if transposed else array
        if tuple(value.shape) != tuple(leaves[path].shape):
            raise AdapterFormatError(
                f"{weights_path}: {KEY_PREFIX + key!r} has shape {tuple(array.shape)}; the base model's "
                f"{path!r} needs {tuple(leaves[path].shape)}{' (transposed)' if transposed else ''} "
                f"{DIFFERENT_BASE_HINT}"
            )
        dense[path] = jnp.asarray(check_dense(value, f"{weights_path}: {KEY_PREFIX}{key}"))
    allowed = set(dense_paths_for_check(params, config, expected))
    stray = sorted(set(dense) - allowed)
    if stray:
        raise AdapterFormatError(
            f"{weights_path}: full tensors {stray[:4]} are neither in modules_to_save nor biases allowed by "
            f"bias={config.bias!r}"
        )
    adapter = Adapter(deltas=deltas, dense=dense, config=config)
    if getattr(config, "sparse_adapter", False):
        if any(isinstance(leaves[p], jax.ShapeDtypeStruct) for p in deltas):
            # Shape-only params have no zeros yet: each delta takes the mask of the weight it is
            # applied or merged into, so a later merge cannot silently drop the sparsity.
            adapter = sqft.mask_at_apply(adapter)
        else:
            # SparsePEFT: the update is masked by this base's zeros.
            adapter = sqft.with_base_masks(adapter, params, source=f"{cfg_path}: sparse_adapter")
    return adapter


def dense_paths_for_check(params: PyTree, config: LoraConfig, targets: set[str]) -> list[str]:
    """Leaves a PEFT LoRA file may hold in full for ``config`` (works on abstract params too)."""
    try:
        return dense_paths(params, config, sorted(targets), strict=False)
    except ValueError as e:
        raise AdapterFormatError(f"modules_to_save do not fit the base model: {e}") from None
