"""Read and write PEFT 0.22 SHiRA adapters (``peft_type: "SHIRA"``) exactly as PEFT does.

On disk (what ``PeftModel.save_pretrained`` writes, checked against peft 0.22.0):

- ``adapter_config.json``: ``auto_mapping``, ``base_model_name_or_path``, ``fan_in_fan_out``,
  ``inference_mode``, ``init_weights``, ``mask_type``, ``modules_to_save``, ``peft_type``,
  ``peft_version``, ``r``, ``random_seed``, ``revision``, ``target_modules``, ``task_type``;
- ``adapter_model.safetensors``: per adapted linear module ``base_model.model.<module>.shira_indices``
  int32 (2, k) -- row 0 the output index, row 1 the input index, sorted row-major -- and
  ``...shira_weight`` float32 (k,), with k = r * (in + out); ``modules_to_save`` leaves in full
  as ``base_model.model.<Hugging Face key>`` (e.g. ``classifier.weight`` (out, in)).

In memory a SHiRA module is a :class:`~jaxsparse.delta.SparseDelta` at ``<module>.kernel`` with
flat indices into our (in, out) kernel; :func:`jaxsparse.convert.to_hf_coords` is the one place
that swaps the pairs. We also record each weight's shape in the safetensors metadata (PEFT ignores
it), so our own files load without the base model; PEFT's files need ``params``.

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from jaxsparse.delta import Adapter, SparseDelta
    >>> from jaxsparse.methods.shira import ShiraConfig
    >>> d = SparseDelta(jnp.arange(0, 16, 2, dtype=jnp.int32), jnp.arange(8.0), (4, 4))
    >>> adapter = Adapter({"model.q_proj.kernel": d}, config=ShiraConfig(r=1, target_modules=["q_proj"]))
    >>> out = tempfile.mkdtemp() + "/adapter"
    >>> save_peft_shira(adapter, out)
    >>> back = load_peft_shira(out)
    >>> back.deltas["model.q_proj.kernel"].indices.tolist(), back.config.r
    ([0, 2, 4, 6, 8, 10, 12, 14], 1)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

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
    check_values,
    from_hf_coords,
    layout_metadata,
    param_shapes,
    read_json,
    read_layout,
    read_safetensors,
    resolve_param,
    to_hf_coords,
    write_safetensors_bytes,
)
from jaxsparse.delta import Adapter, SparseDelta
from jaxsparse.methods.shira import ShiraConfig
from jaxsparse.models import naming

PyTree = Any
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
INDICES, WEIGHT = ".shira_indices", ".shira_weight"


def _check_linear(path: str, delta: SparseDelta, fan_in_fan_out: Sequence[str]) -> None:
    if tree_lib.leaf_name(path) != "kernel" or len(delta.shape) != 2:
        raise ValueError(
            f"{path}: PEFT SHiRA adapts linear weights only, this delta is on a {len(delta.shape)}-D "
            f"{tree_lib.leaf_name(path)!r}; export it with --format sparta"
        )
    if not naming.hf_key(path, fan_in_fan_out=fan_in_fan_out)[1]:
        raise ValueError(
            f"{tree_lib.module_of(path)}: a GPT-2 style Conv1D (fan_in_fan_out) layer; PEFT SHiRA supports "
            "only torch.nn.Linear (its get_peft_model raises TypeError for Conv1D), so this adapter cannot "
            "be written as PEFT SHiRA; export it with --format sparta"
        )


def to_shira_layout(adapter: Adapter, *, fan_in_fan_out: Sequence[str] = ()) -> Adapter:
    """The same sparse adapter with a :class:`ShiraConfig` and ``k = r * (in + out)`` entries per module.

    ``r`` is the smallest integer with ``r * (in + out) >= k`` for every module; missing entries are
    zeros at the lowest unused flat positions. A module too small for that ``r`` (``r * (in + out) >
    in * out``, which PEFT rejects) is a ``ValueError`` naming it. ``fan_in_fan_out`` lists the base
    model's Conv1D modules (``Model.fan_in_fan_out``), which are refused.
    """
    if not adapter.deltas:
        raise ValueError("the adapter has no deltas; nothing to write as PEFT SHiRA")
    for path, d in adapter.deltas.items():
        if not isinstance(d, SparseDelta):
            raise ValueError(
                f"{path}: PEFT SHiRA holds sparse deltas; got {type(d).__name__} (use the LoRA layout)"
            )
        _check_linear(path, d, fan_in_fan_out)
    r = max(math.ceil(d.k / (d.shape[0] + d.shape[1])) for d in adapter.deltas.values())
    r = max(r, 1)
    deltas: dict[str, SparseDelta] = {}
    for path, d in sorted(adapter.deltas.items()):
        fan_in, fan_out = d.shape
        k = r * (fan_in + fan_out)
        if k > fan_in * fan_out:
            raise ValueError(
                f"{path}: PEFT SHiRA would need r={r} (for the densest module) and r * (in + out) = {k} entries, "
                f"more than this {d.shape} weight has; PEFT cannot load it, export it with --format sparta"
            )
        indices = np.asarray(d.indices, np.int64)
        values = np.asarray(d.values)
        extra = np.setdiff1d(np.arange(k, dtype=np.int64), indices, assume_unique=True)[: k - d.k]
        all_indices = np.concatenate([indices, extra])
        order = np.argsort(all_indices, kind="stable")
        all_values = np.concatenate([values, np.zeros(extra.shape, values.dtype)])[order]
        deltas[path] = SparseDelta(
            indices=jnp.asarray(all_indices[order].astype(np.asarray(d.indices).dtype)),
            values=jnp.asarray(all_values),
            shape=d.shape,
        )
    source = adapter.config
    if isinstance(source, ShiraConfig):
        return Adapter(deltas=deltas, dense=dict(adapter.dense), config=dataclasses.replace(source, r=r))
    config = ShiraConfig(
        r=r,
        target_modules=sorted(tree_lib.module_of(p) for p in deltas),
        init_weights=getattr(source, "init_weights", True),
        random_seed=getattr(source, "random_seed", None),
        mask_type=getattr(source, "mask_type", "random"),
        modules_to_save=sorted({tree_lib.module_of(p) for p in adapter.dense}) or None,
        task_type=getattr(source, "task_type", None),
        base_model_name_or_path=getattr(source, "base_model_name_or_path", None),
    )
    return Adapter(deltas=deltas, dense=dict(adapter.dense), config=config)


def _shira_rank(adapter: Adapter) -> int:
    """The single r with k = r * (in + out) for every delta (PEFT sizes shira_weight from r)."""
    config = adapter.config
    ranks: dict[str, int] = {}
    for path, d in adapter.deltas.items():
        if not isinstance(d, SparseDelta) or len(d.shape) != 2 or tree_lib.leaf_name(path) != "kernel":
            raise ValueError(
                f"{path}: the PEFT SHiRA format holds sparse deltas of 2-D linear kernels only, "
                f"got {type(d).__name__} of shape {getattr(d, 'shape', None)}; save it in the SpaRTA format"
            )
        fan = d.shape[0] + d.shape[1]
        if d.k % fan:
            raise ValueError(
                f"{path}: k={d.k} is not r * (in + out) = r * {fan} for any r; PEFT SHiRA could not load "
                "it (its shira_weight has r * (in + out) entries); save it in the SpaRTA format"
            )
        ranks[path] = d.k // fan
    wanted = config.r if isinstance(config, ShiraConfig) else None
    distinct = set(ranks.values()) | ({wanted} if wanted is not None and ranks else set())
    if len(distinct) > 1:
        raise ValueError(
            f"PEFT SHiRA needs one r for all modules, got k / (in + out) = {ranks} (config r={wanted})"
        )
    if distinct:
        return distinct.pop()
    return wanted if wanted is not None else 1


def _module_list(value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    return sorted(value)


def peft_shira_config(
    adapter: Adapter, *, base_model_name_or_path: str | None = None, base_model_class: str | None = None
) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT writes for this adapter (same keys, same value types).

    ``adapter`` must already have PEFT's layout (:func:`to_shira_layout`). Without a ``task_type``
    PEFT records the model's class in ``auto_mapping`` (``base_model_class``, else the config's).
    """
    from jaxsparse.convert.peft_lora import _parent_library

    config = adapter.config if isinstance(adapter.config, ShiraConfig) else ShiraConfig()
    task_type = config.task_type
    base_class = base_model_class or config.base_model_class
    auto_mapping = None
    if base_class and task_type is None:
        auto_mapping = {"base_model_class": base_class, "parent_library": _parent_library(base_class)}
    modules = sorted({tree_lib.module_of(p) for p in adapter.deltas})
    # PEFT has no exclude_modules for SHiRA and its default target differs from ours: when the
    # user's names alone would not reproduce our selection, list the adapted modules explicitly.
    targets = config.target_modules
    if targets is None or config.exclude_modules:
        targets = modules
    modules_to_save = config.modules_to_save
    if modules_to_save is None and adapter.dense:
        modules_to_save = sorted({tree_lib.module_of(p) for p in adapter.dense})
    return {
        "auto_mapping": auto_mapping,
        "base_model_name_or_path": base_model_name_or_path or config.base_model_name_or_path,
        "fan_in_fan_out": bool(config.fan_in_fan_out),
        "inference_mode": True,
        "init_weights": bool(config.init_weights),
        "mask_type": config.mask_type,
        "modules_to_save": _module_list(modules_to_save),
        "peft_type": "SHIRA",
        "peft_version": PEFT_VERSION,
        "r": _shira_rank(adapter),
        "random_seed": config.random_seed,
        "revision": None,
        "target_modules": _module_list(targets),
        "task_type": task_type,
    }


def shira_state_dict(
    adapter: Adapter, *, fan_in_fan_out: Sequence[str] = ()
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """``(tensors, layout)``: PEFT's SHiRA tensors by key, and our path/shape per Hugging Face name."""
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, dict[str, Any]] = {}
    for path, d in adapter.deltas.items():
        name, transposed = naming.hf_key(path, fan_in_fan_out=fan_in_fan_out)
        coords, order = to_hf_coords(np.asarray(d.indices), d.shape, transposed=transposed)
        module = name[: -len(".weight")]
        tensors[PREFIX + module + INDICES] = np.ascontiguousarray(coords.T.astype(np.int32))
        tensors[PREFIX + module + WEIGHT] = np.asarray(d.values)[order]
        layout[name] = {"path": path, "shape": list(d.shape), "transposed": transposed}
    for path, value in adapter.dense.items():
        name, transposed = naming.hf_key(path, fan_in_fan_out=fan_in_fan_out)
        value = np.asarray(value)
        tensors[PREFIX + name] = value.T if transposed else value
        layout[name] = {"path": path, "shape": list(value.shape), "transposed": transposed}
    return tensors, layout


def save_peft_shira(
    adapter: Adapter,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: Sequence[str] = (),
    overwrite: bool = False,
    base_model_class: str | None = None,
) -> None:
    """Write ``adapter`` as a PEFT SHiRA directory (``PeftModel.from_pretrained`` loads it).

    Any sparse adapter goes through :func:`to_shira_layout` first: modules
    whose k is not ``r * (in + out)`` are padded with zero-valued entries, and what PEFT cannot load
    (a delta on a GPT-2 ``Conv1D``, a module too small for the common ``r``) is refused before
    anything is written. ``fan_in_fan_out``: the base model's modules stored (in, out) in Hugging
    Face (``Model.fan_in_fan_out``). The directory appears complete or not at all; an existing
    non-empty one is refused unless ``overwrite`` and it is a previous jaxsparse output
    (see :func:`jaxsparse.atomic.atomic_dir`). ``base_model_class`` (e.g. ``"BertForMaskedLM"``)
    fills PEFT's ``auto_mapping`` for an adapter without a ``task_type``, as PEFT does.
    """
    adapter = to_shira_layout(adapter, fan_in_fan_out=fan_in_fan_out)
    config = peft_shira_config(
        adapter, base_model_name_or_path=base_model_name_or_path, base_model_class=base_model_class
    )
    tensors, layout = shira_state_dict(adapter, fan_in_fan_out=fan_in_fan_out)
    data = write_safetensors_bytes(tensors, layout_metadata(layout))
    with atomic_dir(out_dir, overwrite=overwrite, format="peft_shira") as tmp:
        atomic_write_text(os.path.join(tmp, CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True) + "\n")
        atomic_write_bytes(os.path.join(tmp, WEIGHTS_NAME), data)


def shira_config_from_peft(raw: dict[str, Any], where: str) -> ShiraConfig:
    """Our :class:`ShiraConfig` from PEFT's ``adapter_config.json`` dict."""
    if raw.get("peft_type") != "SHIRA":
        raise AdapterFormatError(f"{where}: peft_type is {raw.get('peft_type')!r}, expected 'SHIRA'")
    r = raw.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterFormatError(f"{where}: 'r' must be a positive integer, got {r!r}")
    fields = (
        "mask_type",
        "random_seed",
        "target_modules",
        "fan_in_fan_out",
        "init_weights",
        "modules_to_save",
        "task_type",
        "base_model_name_or_path",
    )
    check_field_types(raw, _FIELD_KINDS, where)
    kwargs = {f: raw[f] for f in fields if f in raw}
    auto_mapping = raw.get("auto_mapping")
    if auto_mapping is not None:
        base_class = auto_mapping.get("base_model_class") if isinstance(auto_mapping, dict) else None
        if not isinstance(base_class, str):
            raise AdapterFormatError(
                f"{where}: 'auto_mapping' must be null or an object with a 'base_model_class' string, "
                f"got {auto_mapping!r}"
            )
        kwargs["base_model_class"] = base_class
    return ShiraConfig(r=r, **kwargs)


# What PEFT's SHiRA config holds in each field we read (a hand-edited or corrupt file is refused).
_FIELD_KINDS = {
    "mask_type": "str",
    "random_seed": "int|null",
    "target_modules": NAMES,
    "fan_in_fan_out": "bool",
    "init_weights": "bool",
    "modules_to_save": NAME_LIST,
    "task_type": "str|null",
    "base_model_name_or_path": "str|null",
}


def load_peft_shira(
    adapter_dir: str | os.PathLike, params: PyTree | None = None, *, fan_in_fan_out: Sequence[str] = ()
) -> Adapter:
    """A PEFT SHiRA directory as our :class:`~jaxsparse.delta.Adapter`.

    ``params`` (arrays or ``jax.ShapeDtypeStruct``) is the base model, with the right task head; it
    resolves key names and shapes and is required for files PEFT wrote (they record no shapes).
    Indices in any order are accepted and sorted; out-of-range or duplicate indices, wrong dtypes
    or shapes, NaN/inf, keys without the ``base_model.model.`` prefix, and a module with only one of
    its two tensors are each an :class:`AdapterFormatError` naming the file and key.
    """
    adapter_dir = os.fspath(adapter_dir)
    cfg_path = os.path.join(adapter_dir, CONFIG_NAME)
    config = shira_config_from_peft(read_json(cfg_path), cfg_path)
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    tensors, metadata = read_safetensors(weights_path)
    layout = read_layout(metadata, weights_path)
    shapes = param_shapes(params) if params is not None else None

    modules: dict[str, dict[str, np.ndarray]] = {}
    dense_keys: list[str] = []
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{weights_path}: key {key!r} does not start with {PREFIX!r}")
        name = key[len(PREFIX) :]
        for suffix in (INDICES, WEIGHT):
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[suffix] = value
                break
        else:
            dense_keys.append(name)

    deltas: dict[str, SparseDelta] = {}
    for module, parts in sorted(modules.items()):
        where = f"{weights_path}: {PREFIX}{module}"
        for suffix in (INDICES, WEIGHT):
            if suffix not in parts:
                raise AdapterFormatError(
                    f"{where}{suffix} missing (a SHiRA module needs both {INDICES} and {WEIGHT})"
                )
        path, shape, transposed = resolve_param(
            module + ".weight", shapes=shapes, layout=layout, fan_in_fan_out=fan_in_fan_out, where=where
        )
        if tree_lib.leaf_name(path) != "kernel" or len(shape) != 2:
            raise AdapterFormatError(f"{where}: SHiRA targets linear layers; {path!r} has shape {shape}")
        pairs = parts[INDICES]
        if pairs.ndim != 2 or pairs.shape[0] != 2:
            raise AdapterFormatError(f"{where}{INDICES}: expected shape (2, k), got {pairs.shape}")
        flat, order = from_hf_coords(pairs.T, shape, transposed=transposed, where=where + INDICES)
        values = check_values(parts[WEIGHT], pairs.shape[1], where + WEIGHT)
        expected_k = config.r * (shape[0] + shape[1])
        if pairs.shape[1] != expected_k:
            raise AdapterFormatError(
                f"{where}: {pairs.shape[1]} entries, but PEFT SHiRA with r={config.r} on a {shape} weight "
                f"has r * (in + out) = {expected_k} {DIFFERENT_BASE_HINT}"
            )
        deltas[path] = SparseDelta(jnp.asarray(flat), jnp.asarray(values[order]), shape)

    dense: dict[str, Any] = {}
    for name in sorted(dense_keys):
        where = f"{weights_path}: {PREFIX}{name}"
        path, shape, transposed = resolve_param(
            name, shapes=shapes, layout=layout, fan_in_fan_out=fan_in_fan_out, where=where
        )
        value = check_dense(tensors[PREFIX + name], where)
        value = value.T if transposed else value
        if value.shape != shape:
            raise AdapterFormatError(
                f"{where}: expected shape {tuple(reversed(shape)) if transposed else shape}, "
                f"got {tensors[PREFIX + name].shape} {DIFFERENT_BASE_HINT}"
            )
        dense[path] = jnp.asarray(value)
    return Adapter(deltas, dense, config=config)
