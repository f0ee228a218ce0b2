"""Export any adapter to the PEFT layout PyTorch users load: LoRA as ``LORA``, sparse deltas as ``SHIRA``.

A sparse adapter (SpaRTA, SHiRA, ...) is index/value deltas on linear weights, which is what PEFT's
SHiRA holds, with one constraint: PEFT sizes every module's ``shira_weight`` as ``r * (in + out)``
with a single ``r``. :func:`to_shira_layout` meets it exactly by choosing the smallest such ``r``
and padding each module with zero-valued entries at unused positions (a zero delta changes
nothing, so the model is bit-identical). PEFT SHiRA adapts ``nn.Linear`` only: deltas on GPT-2's
``Conv1D`` are refused here, as PEFT's ``get_peft_model`` refuses them.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxsparse.delta import Adapter, SparseDelta
    >>> from jaxsparse.methods.sparta import SpartaConfig
    >>> d = SparseDelta(jnp.array([0, 5], jnp.int32), jnp.array([1.0, 2.0]), (4, 4))
    >>> shira = to_shira_layout(Adapter({"q.kernel": d}, config=SpartaConfig(density=0.125)))
    >>> shira.config.r, shira.deltas["q.kernel"].k, shira.deltas["q.kernel"].values.tolist()
    (1, 8, [1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0])
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxsparse import tree as tree_lib
from jaxsparse.delta import Adapter, LowRankDelta, SparseDelta
from jaxsparse.methods.shira import ShiraConfig
from jaxsparse.models import naming


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


def peft_format(adapter: Adapter) -> str:
    """``"peft_lora"`` for low-rank adapters, ``"peft_shira"`` for sparse ones; mixed adapters are refused."""
    kinds = {type(d) for d in adapter.deltas.values()}
    if kinds == {LowRankDelta}:
        return "peft_lora"
    if kinds == {SparseDelta}:
        return "peft_shira"
    raise ValueError(
        f"a PEFT adapter holds one kind of delta, this one has {sorted(k.__name__ for k in kinds) or 'none'}"
    )


def save_peft(
    adapter: Adapter,
    out_dir: str | os.PathLike,
    *,
    model: Any = None,
    params: Any = None,
    fan_in_fan_out: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
) -> str:
    """Write ``adapter`` in the PEFT layout ``PeftModel.from_pretrained`` loads; returns the format used.

    Low-rank adapters go to PEFT LoRA unchanged; sparse adapters to PEFT SHiRA, whose writer
    (:func:`jaxsparse.convert.peft_shira.save_peft_shira`) pads or refuses via :func:`to_shira_layout`. ``model`` (or ``params`` + ``fan_in_fan_out``) validates the adapter first.
    """
    from jaxsparse.adapter_io import save_adapter

    fmt = peft_format(adapter)
    if fan_in_fan_out is None and model is not None:
        fan_in_fan_out = tuple(model.fan_in_fan_out)
    fan_in_fan_out = tuple(fan_in_fan_out or ())
    return save_adapter(
        adapter,
        out_dir,
        format=fmt,
        model=model,
        params=params,
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_model_name_or_path,
    )
