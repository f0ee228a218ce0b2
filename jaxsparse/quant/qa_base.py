"""The two bases of QA-SparsePEFT, as SQFT pairs them: a GPTQ directory (its grids, and every layer
the adapter does not target) and the non-quantized sparse model it was quantized from (the weight
``W`` each targeted layer adds its delta to).

SQFT (``run_sqft.py`` / ``utils/merge.py``) loads ``--model_name_or_path`` (the GPTQ model) and
``--non_quant_model_name_or_path`` (the sparse model) and hands each quantization-aware layer the
non-quantized weight of the same name; untargeted layers stay the GPTQ model's. We do the same on
parameter trees: :func:`read_grids` reads a GPTQ directory's grids (``scales``/``zeros``/``g_idx``
per quantized linear), :func:`with_non_quant_kernels` swaps the targeted kernels of the (dequantized)
GPTQ params for the non-quantized ones after checking that the two models have the same shapes.

Example:
    >>> import jax.numpy as jnp
    >>> gptq = {"fc": {"kernel": jnp.zeros((4, 2))}, "head": {"kernel": jnp.ones((2, 3))}}
    >>> sparse = {"fc": {"kernel": jnp.ones((4, 2))}, "head": {"kernel": jnp.full((2, 3), 2.0)}}
    >>> p = with_non_quant_kernels(gptq, sparse, ["fc"])
    >>> float(p["fc"]["kernel"][0, 0]), float(p["head"]["kernel"][0, 0])  # only the targeted kernel
    (1.0, 1.0)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxsparse import tree as tree_lib
from jaxsparse.quant.checkpoint import read_gptq_layers
from jaxsparse.quant.grid import QuantizedWeight

PyTree = Any


def gptq_config(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``quantization_config`` of a Hugging Face directory's ``config.json`` when it is a GPTQ
    checkpoint (``quant_method: "gptq"``), else ``None`` (a plain model, a ``.gguf`` file, no config).

    Example:
        >>> import tempfile
        >>> gptq_config(tempfile.mkdtemp()) is None
        True
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    qconfig = raw.get("quantization_config") if isinstance(raw, dict) else None
    if isinstance(qconfig, dict) and qconfig.get("quant_method") == "gptq":
        return qconfig
    return None


def read_grids(
    model_dir: str | os.PathLike, *, what: str = "the GPTQ base"
) -> tuple[dict, dict[str, QuantizedWeight]]:
    """``(quantization_config, {module: QuantizedWeight})`` of a GPTQ directory (codes, scales, zeros,
    ``g_idx``, NumPy leaves); ``ValueError`` naming ``what`` when ``model_dir`` is not a GPTQ checkpoint."""
    from jaxsparse.models.hub import read_checkpoint

    qconfig = gptq_config(model_dir)
    if qconfig is None:
        raise ValueError(
            f"{what} {os.fspath(model_dir)!r} is not a GPTQ checkpoint (its config.json has no quantization_config "
            "with quant_method 'gptq'); QA-SparsePEFT needs the GPTQ model (jaxsparse quantize --method gptq) "
            "and, separately, the non-quantized sparse model it was quantized from"
        )
    state = read_checkpoint(model_dir)
    return qconfig, read_gptq_layers(state, qconfig, source=os.fspath(model_dir))


def with_non_quant_kernels(
    params: PyTree,
    non_quant_params: PyTree,
    modules: Sequence[str],
    *,
    gptq: str = "the GPTQ base",
    non_quant: str = "the non-quantized base",
) -> PyTree:
    """``params`` (the GPTQ model, dequantized) with the ``kernel`` of each of ``modules`` replaced by
    the one of ``non_quant_params`` (cast to its dtype). Every leaf of ``params`` must exist in
    ``non_quant_params`` with the same shape: otherwise a ``ValueError`` names the first that differs
    (the two must be the same architecture and size: the sparse model and its GPTQ quantization)."""
    ours = tree_lib.leaf_paths(params)
    theirs = tree_lib.leaf_paths(non_quant_params)
    for path, leaf in ours.items():
        other = theirs.get(path)
        if other is None:
            raise ValueError(
                f"{non_quant} has no parameter {path!r} of {gptq}: the non-quantized model must be the sparse "
                "model the GPTQ base was quantized from (same architecture and size)"
            )
        if tuple(other.shape) != tuple(leaf.shape):
            raise ValueError(
                f"{non_quant}: {path!r} has shape {tuple(other.shape)} but {gptq} has {tuple(leaf.shape)}; the "
                "non-quantized model must be the sparse model the GPTQ base was quantized from"
            )
    new = {}
    for module in modules:
        path = f"{module}.kernel"
        if path not in ours:
            raise ValueError(f"{gptq} has no kernel {path!r} to adapt")
        new[path] = theirs[path].astype(ours[path].dtype)
    return tree_lib.replace_leaves(params, new)
