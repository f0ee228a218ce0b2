"""The GPTQ checkpoint format of a Hugging Face directory: its ``quantization_config`` and its
tensors, read back dequantized (:mod:`jaxsparse.quant.save` writes it; packing is in
:mod:`jaxsparse.quant.packing`).

A GPTQ directory holds ``config.json`` with ``quantization_config`` (``quant_method: "gptq"``,
``bits``, ``group_size``, ``desc_act``, ``sym``, ``damp_percent``, ``static_groups: false``,
``true_sequential: true``, ``checkpoint_format``), the same object as ``quantize_config.json``
(what AutoGPTQ reads), and ``model.safetensors`` where every quantized linear ``X`` has
``X.qweight``/``X.qzeros``/``X.scales``/``X.g_idx`` (and ``X.bias`` when it has one) instead of
``X.weight``; every other tensor is written as :func:`jaxsparse.models.hub.to_state_dict` gives it.

Reading (:func:`dequantize_gptq_state`, used by :func:`jaxsparse.models.from_pretrained` when
``config.json`` says ``quant_method: "gptq"``) accepts the classic ``"gptq"`` format (zero points
stored minus one, the default when ``checkpoint_format`` is absent) and gptqmodel's ``"gptq_v2"``.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxsparse.quant.grid import rtn_quantize
    >>> qw = rtn_quantize(jnp.ones((16, 8)), bits=4, group_size=8)
    >>> sd = {f"fc.{k}": v for k, v in to_gptq_tensors(qw).items()}
    >>> sorted(read_gptq_layers(sd, quantization_config(bits=4, group_size=8, sym=False)))
    ['fc']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxsparse.models.naming import _is_fan_in_fan_out
from jaxsparse.quant.grid import BITS, QuantizedWeight
from jaxsparse.quant.packing import (
    CHECKPOINT_FORMATS,
    dequantize_numpy,
    from_gptq_tensors,
    to_gptq_tensors,  # noqa: F401  (used by the doctests)
)

GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def quantization_config(
    *,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    checkpoint_format: str = "gptq",
    method: str = "gptq",
) -> dict[str, Any]:
    """The ``quantization_config`` object of ``config.json`` (transformers' ``GPTQConfig`` fields).

    Example:
        >>> quantization_config(bits=4, group_size=128, sym=True)["quant_method"]
        'gptq'
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": bool(desc_act),
        "sym": bool(sym),
        "damp_percent": float(damp_percent),
        "static_groups": False,
        "true_sequential": True,
        "checkpoint_format": checkpoint_format,
        "meta": {"quantizer": ["jaxsparse"], "method": method},
    }


def quantized_modules(state: Mapping[str, Any]) -> list[str]:
    """Module paths that hold a ``qweight`` in a state dict."""
    return sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))


def read_gptq_layers(
    state: Mapping[str, Any], qconfig: Mapping[str, Any], *, source: str = "checkpoint"
) -> dict[str, QuantizedWeight]:
    """Every quantized linear of a GPTQ state dict as a :class:`QuantizedWeight` (NumPy leaves)."""
    qconfig = dict(qconfig)
    method = qconfig.get("quant_method")
    if method != "gptq":
        raise ValueError(
            f"{source}: quantization_config.quant_method {method!r} is not supported (only 'gptq')"
        )
    bits = qconfig.get("bits")
    if bits not in BITS:
        raise ValueError(f"{source}: quantization_config.bits is {bits!r}; supported: {BITS}")
    group_size = int(qconfig.get("group_size", -1))
    fmt = qconfig.get("checkpoint_format") or "gptq"
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"{source}: quantization_config.checkpoint_format {fmt!r} is not supported; expected one of "
            f"{CHECKPOINT_FORMATS}"
        )
    sym = bool(qconfig.get("sym", True))
    out = {}
    for module in quantized_modules(state):
        tensors = {s: state.get(f"{module}.{s}") for s in GPTQ_SUFFIXES}
        out[module] = from_gptq_tensors(
            tensors,
            bits=bits,
            group_size=group_size,
            sym=sym,
            checkpoint_format=fmt,
            name=f"{source}: {module}",
        )
    if not out:
        raise ValueError(
            f"{source}: config.json declares a GPTQ model but the weights hold no '*.qweight' tensor"
        )
    return out


def dequantize_gptq_state(
    state: Mapping[str, Any],
    qconfig: Mapping[str, Any],
    *,
    fan_in_fan_out: Sequence[str] = (),
    source: str = "checkpoint",
) -> dict[str, np.ndarray]:
    """A plain state dict: each GPTQ linear's tensors replaced by its float32 ``X.weight`` in the
    Hugging Face layout ((out, in), or (in, out) for ``fan_in_fan_out`` modules such as GPT-2's Conv1D).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxsparse.quant.grid import rtn_quantize
        >>> qw = rtn_quantize(jnp.ones((16, 8)), bits=4, group_size=8, sym=True)
        >>> sd = {f"fc.{k}": v for k, v in to_gptq_tensors(qw).items()}
        >>> cfg = quantization_config(bits=4, group_size=8, sym=True)
        >>> w = dequantize_gptq_state(sd, cfg)["fc.weight"]
        >>> w.shape, round(float(w.max()), 3)  # 1.0 on the symmetric grid: 7 steps of 2/15 (fp16)
        ((8, 16), 0.934)
    """
    layers = read_gptq_layers(state, qconfig, source=source)
    drop = {f"{m}.{s}" for m in layers for s in GPTQ_SUFFIXES}
    out = {k: v for k, v in state.items() if k not in drop}
    for module, qw in layers.items():
        kernel = dequantize_numpy(qw)
        out[f"{module}.weight"] = (
            kernel if _is_fan_in_fan_out(module, fan_in_fan_out) else np.ascontiguousarray(kernel.T)
        )
    return out
