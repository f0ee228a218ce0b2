"""Quantizing a whole model: RTN (no data) or GPTQ (layer by layer on calibration tokens).

Which layers: every linear layer inside the transformer blocks
(:func:`jaxsparse.calibration.linear_paths`: q/k/v/o/gate/up/down on a Llama), never the embeddings
or the head (as AutoGPTQ and transformers' GPTQ integration do).

GPTQ runs :func:`jaxsparse.calibration.sequential_capture`: each block's Hessians ``2 X^T X / n``
are taken on inputs produced by the already-quantized earlier blocks (the GPTQ paper's sequential
procedure), every linear of a block on the block's input at once.

The returned model holds the *dequantized* kernels (what the quantized model computes), and the
:class:`~jaxsparse.quant.grid.QuantizedWeight` of each layer for :func:`jaxsparse.quant.save.save_gptq`.

Example:
    >>> import transformers
    >>> from jaxsparse.models import init_params
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = init_params(cfg, task="causal_lm")
    >>> new, layers = quantize_model(model, method="rtn", bits=4, group_size=32, progress=False)
    >>> len(layers), layers["model.layers.0.mlp.down_proj"].scales.shape
    (14, (2, 32))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxsparse import calibration
from jaxsparse.models.base import Model
from jaxsparse.quant.gptq import gptq_quantize
from jaxsparse.quant.grid import QuantizedWeight, check_spec, dequantize, rtn_quantize
from jaxsparse.tree import get_leaf, replace_leaves

METHODS = ("rtn", "gptq")


def quantizable_linears(model: Model) -> list[str]:
    """Module paths of the linears to quantize: those inside the transformer blocks."""
    return calibration.linear_paths(model)


def check_model_widths(model: Model, paths: list[str], *, bits: int, group_size: int) -> None:
    """``ValueError`` naming the first layer whose input width the group size does not divide, or whose
    widths cannot be packed into 32-bit words (input and output must be multiples of ``32 / bits``)."""
    per_word = 32 // bits if bits in (2, 4, 8) else 1
    for p in paths:
        n_in, n_out = get_leaf(model.params, p + ".kernel").shape
        try:
            check_spec(bits, group_size, int(n_in))
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        if n_in % per_word or n_out % per_word:
            raise ValueError(
                f"{p}: kernel ({n_in}, {n_out}) cannot be packed in the GPTQ layout at {bits} bits "
                f"(both widths must be multiples of {per_word})"
            )


def quantize_model(
    model: Model,
    *,
    method: str,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    input_ids: Any = None,
    attention_mask: Any = None,
    batch_size: int = 8,
    max_blocks: int | None = None,
    progress: bool = True,
) -> tuple[Model, dict[str, QuantizedWeight]]:
    """``(model with dequantized kernels, {module path: QuantizedWeight})`` for the block linears.

    GPTQ needs calibration ``input_ids`` (samples, seq_len) (see
    :func:`jaxsparse.calibration.load_calibration`); RTN ignores them. Weights that are exactly 0
    stay exactly 0 (a pruned model stays sparse). ``max_blocks`` limits the work to the first blocks
    (quick checks).
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose from {list(METHODS)}")
    paths = quantizable_linears(model)
    if max_blocks is not None:
        blocks = calibration.block_paths(model)[:max_blocks]
        paths = [p for p in paths if any(p.startswith(b + ".") for b in blocks)]
    check_model_widths(model, paths, bits=bits, group_size=group_size)
    chosen = set(paths)
    out: dict[str, QuantizedWeight] = {}
    if method == "rtn":
        from tqdm.auto import tqdm

        new = {}
        for p in tqdm(paths, desc="layers", unit="layer", disable=not progress):
            qw = rtn_quantize(
                get_leaf(model.params, p + ".kernel"), bits=bits, group_size=group_size, sym=sym
            )
            out[p] = qw
            new[p + ".kernel"] = dequantize(qw).astype(get_leaf(model.params, p + ".kernel").dtype)
        return dataclasses.replace(model, params=replace_leaves(model.params, new)), out
    if input_ids is None:
        raise ValueError("GPTQ needs calibration input_ids (see jaxsparse.calibration.load_calibration)")

    def update(block: calibration.BlockCapture) -> dict[str, jax.Array]:
        new = {}
        for p, kernel in block.kernels.items():
            if p not in chosen:
                continue
            qw = gptq_quantize(
                kernel, block.stats[p].hessian(), bits=bits, group_size=group_size, sym=sym,
                damp_percent=damp_percent, block_size=block_size, act_order=act_order,
            )  # fmt: skip
            out[p] = qw
            new[p] = dequantize(qw).astype(kernel.dtype)
        return new

    quantized = calibration.sequential_capture(
        model,
        np.asarray(input_ids),
        attention_mask,
        update=update,
        statistics=("xtx",),
        batch_size=batch_size,
        max_blocks=max_blocks,
        progress=progress,
    )
    return quantized, {p: out[p] for p in paths}
