"""Weight quantization of our parameter trees: INT2/4/8 group quantization (round-to-nearest and
GPTQ), the GPTQ checkpoint layout the PyTorch ecosystem reads, and fake quantization for training.

One concept per module: :mod:`~jaxsparse.quant.grid` (the integer grid of a group, quantize and
dequantize, RTN), :mod:`~jaxsparse.quant.gptq` (GPTQ on one kernel given its input Hessian),
:mod:`~jaxsparse.quant.quantizer` (a whole model, layer by layer on calibration data),
:mod:`~jaxsparse.quant.packing` (int32 words), :mod:`~jaxsparse.quant.checkpoint` (the config and
reading a GPTQ state dict), :mod:`~jaxsparse.quant.save` (writing a GPTQ directory) and
:mod:`~jaxsparse.quant.fake_quant` (straight-through rounding for QA training).
See docs/compression.md.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxsparse import quant
    >>> qw = quant.rtn_quantize(jnp.array([[0.5, -1.0], [0.25, 0.0]]), bits=8, group_size=-1)
    >>> [round(v, 3) for v in quant.dequantize(qw)[1].tolist()]  # within half a step; 0 stays 0
    [0.25, 0.0]
"""

from jaxsparse.quant.checkpoint import dequantize_gptq_state, quantization_config, read_gptq_layers
from jaxsparse.quant.fake_quant import fake_quant, fake_quant_like
from jaxsparse.quant.gptq import gptq_quantize, hessian, update_hessian
from jaxsparse.quant.grid import BITS, QuantizedWeight, check_spec, dequantize, group_grid, rtn_quantize
from jaxsparse.quant.packing import (
    from_gptq_tensors,
    pack_cols,
    pack_rows,
    to_gptq_tensors,
    unpack_cols,
    unpack_rows,
)
from jaxsparse.quant.quantizer import METHODS, check_model_widths, quantizable_linears, quantize_model

__all__ = [
    "BITS",
    "METHODS",
    "QuantizedWeight",
    "check_model_widths",
    "check_spec",
    "dequantize",
    "dequantize_gptq_state",
    "fake_quant",
    "fake_quant_like",
    "from_gptq_tensors",
    "gptq_quantize",
    "group_grid",
    "hessian",
    "pack_cols",
    "pack_rows",
    "quantizable_linears",
    "quantization_config",
    "quantize_model",
    "read_gptq_layers",
    "rtn_quantize",
    "to_gptq_tensors",
    "unpack_cols",
    "unpack_rows",
    "update_hessian",
]
