"""Export any adapter to the PEFT layout PyTorch users load: LoRA as ``LORA``, sparse deltas as ``SHIRA``.

A sparse adapter (SpaRTA, SHiRA, ...) is index/value deltas on linear weights, which is what PEFT's
SHiRA holds, with one constraint: PEFT sizes every module's ``shira_weight`` as ``r * (in + out)``
with a single ``r``. :func:`to_shira_layout` meets it exactly by choosing the smallest such ``r``
and padding each module with zero-valued entries at unused positions (a zero delta changes
nothing, so the model is bit-identical). PEFT SHiRA adapts ``nn.Linear`` only: deltas on GPT-2's
``Conv1D`` are refused here, as PEFT's ``get_peft_model`` refuses them.

:func:`to_shira_layout` lives in :mod:`jaxsparse.convert.peft_shira` (whose writer applies it) and is
re-exported here; this module sits above :mod:`jaxsparse.adapter_io`, which it calls to write.

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

import os
from collections.abc import Sequence
from typing import Any

from jaxsparse.adapter_io import save_adapter
from jaxsparse.convert.peft_shira import to_shira_layout
from jaxsparse.delta import Adapter, LowRankDelta, SparseDelta

__all__ = ["peft_format", "save_peft", "to_shira_layout"]


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
    overwrite: bool = False,
) -> str:
    """Write ``adapter`` in the PEFT layout ``PeftModel.from_pretrained`` loads; returns the format used.

    Low-rank adapters go to PEFT LoRA unchanged; sparse adapters to PEFT SHiRA, whose writer
    (:func:`jaxsparse.convert.peft_shira.save_peft_shira`) pads or refuses via :func:`to_shira_layout`. ``model`` (or ``params`` + ``fan_in_fan_out``) validates the adapter first.
    ``overwrite``: as in :func:`jaxsparse.adapter_io.save_adapter` (only a previous jaxsparse output is replaced).
    """
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
        overwrite=overwrite,
    )
