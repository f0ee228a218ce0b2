"""Write a model with quantized linears as a Hugging Face GPTQ directory (the layout of
:mod:`jaxsparse.quant.checkpoint`), which :func:`jaxsparse.models.from_pretrained` reads back
dequantized.

Example:
    >>> import tempfile, jax.numpy as jnp, transformers
    >>> from jaxsparse.models import from_pretrained, init_params
    >>> from jaxsparse.quant.grid import dequantize, rtn_quantize
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    >>> model = init_params(cfg, task="causal_lm")
    >>> path = "model.layers.0.mlp.down_proj"
    >>> qw = rtn_quantize(model.params["model"]["layers"][0]["mlp"]["down_proj"]["kernel"], group_size=32)
    >>> out = tempfile.mkdtemp() + "/q"
    >>> save_gptq(model, {path: qw}, out, method="rtn")
    >>> back = from_pretrained(out)
    >>> bool(jnp.all(back.params["model"]["layers"][0]["mlp"]["down_proj"]["kernel"] == dequantize(qw)))
    True
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from jaxsparse.atomic import atomic_dir
from jaxsparse.models.base import Model, architecture
from jaxsparse.models.hub import parse_size, to_state_dict, write_checkpoint
from jaxsparse.models.naming import _is_fan_in_fan_out
from jaxsparse.quant.checkpoint import quantization_config
from jaxsparse.quant.grid import QuantizedWeight
from jaxsparse.quant.packing import to_gptq_tensors


def save_gptq(
    model: Model,
    quantized: Mapping[str, QuantizedWeight],
    out_dir: str | os.PathLike,
    *,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    checkpoint_format: str = "gptq",
    method: str = "gptq",
    max_shard_size: int | str = "50GB",
    overwrite: bool = False,
) -> None:
    """Write ``model`` with the linears named in ``quantized`` (module path -> kernel) in GPTQ layout.

    All quantized kernels must share ``bits``/``group_size``/``sym`` (one ``quantization_config``).
    Tensors above ``max_shard_size`` in all are sharded as :func:`jaxsparse.models.save_pretrained`
    shards them. The directory appears complete or not at all (:func:`jaxsparse.atomic.atomic_dir`).
    """
    max_bytes = parse_size(max_shard_size)
    if not quantized:
        raise ValueError("no quantized layers to write")
    specs = {(q.bits, q.group_size, q.sym) for q in quantized.values()}
    if len(specs) != 1:
        raise ValueError(f"all quantized layers must share bits/group_size/sym, got {sorted(specs)}")
    bits, group_size, sym = specs.pop()
    qcfg = quantization_config(
        bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, damp_percent=damp_percent,
        checkpoint_format=checkpoint_format, method=method,
    )  # fmt: skip
    arch = architecture(model.model_type)
    state = to_state_dict(model)
    for module, qw in quantized.items():
        key = f"{module}.weight"
        if key not in state:
            raise KeyError(f"quantized layer {module!r} has no weight {key!r} in the model's state dict")
        expected = (
            state[key].shape[::-1]
            if not _is_fan_in_fan_out(module, arch.fan_in_fan_out)
            else state[key].shape
        )
        if tuple(qw.shape) != tuple(expected):
            raise ValueError(
                f"{module}: quantized kernel {qw.shape} does not match the model's {tuple(expected)}"
            )
        del state[key]
        for name, tensor in to_gptq_tensors(qw, checkpoint_format=checkpoint_format).items():
            state[f"{module}.{name}"] = tensor
    config = copy.deepcopy(model.config)
    config.architectures = [arch.hf_class_name(config, model.task)]
    leaves = jax.tree_util.tree_leaves(model.params)
    if leaves:
        config.dtype = str(np.dtype(leaves[0].dtype))
    config.quantization_config = qcfg
    with atomic_dir(out_dir, overwrite=overwrite, format="huggingface-gptq") as tmp:
        config.save_pretrained(str(tmp))
        (Path(tmp) / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
        write_checkpoint(tmp, state, max_bytes)
