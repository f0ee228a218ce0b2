"""The Llama family of decoders: Llama, Mistral, Qwen2, Gemma and Phi-3 (one module, five model types).

All five are the same pre-norm decoder (RMSNorm, rotary attention with grouped-query heads, gated
MLP); they differ in a few switches read from the config:

=========  ==============================================================================
Llama      ``attention_bias``/``mlp_bias``; covers SmolLM2
Mistral    sliding-window attention when ``config.sliding_window`` is set
Qwen2      q/k/v biases (no o_proj bias); sliding window on the ``layer_types`` that say so
Gemma      RMSNorm scaled by ``(1 + weight)``, embeddings scaled by ``sqrt(hidden_size)``,
           gelu-tanh MLP, LM head tied to the embedding by default
Phi-3      fused ``qkv_proj`` and ``gate_up_proj``, partial rotary, sliding window, longrope
=========  ==============================================================================

Parameter paths are the Hugging Face module paths with Flax leaves: ``model.embed_tokens.embedding``,
``model.layers.0.self_attn.q_proj.kernel`` (in, out), ``model.layers.0.input_layernorm.scale``,
``model.norm.scale``, ``lm_head.kernel`` (absent when ``tie_word_embeddings``), ``score.kernel``.
Params of the ``"base"`` task have no ``model.`` prefix, like ``LlamaModel``.

``apply_fn(params, input_ids, attention_mask=None, *, position_ids=None, cache=None)``:
position ids default to ``0..T-1`` like transformers' forward (pass them for left-padded batches;
:mod:`jaxsparse.models.generate` does). With a ``cache`` (see :func:`init_cache`) the call returns
``(output, new_cache)``: the new keys/values are written at ``cache["index"]`` into fixed-size
buffers, and ``attention_mask`` must then cover the whole cache (B, max_len).
``dropout_rng=`` (training) drops attention probabilities at ``config.attention_dropout``, as
transformers' eager attention does (the family's only dropout; Phi-3's others are not implemented).

Example:
    >>> import jax.numpy as jnp, transformers
    >>> from jaxsparse.models import init_params
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    >>> model = init_params(cfg, task="causal_lm")
    >>> model(jnp.array([[1, 2, 3]]), jnp.array([[1, 1, 1]])).shape
    (1, 3, 64)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxsparse.models import layers, rope
from jaxsparse.models.base import Architecture, default_init, nnx_build, register
from jaxsparse.tree import leaf_paths, replace_leaves

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "phi3")


def _check_config(config: Any) -> None:
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"llama.py builds model_types {MODEL_TYPES}, not {config.model_type!r}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({config.num_key_value_heads})"
        )
    rope.rope_parameters(config)  # unsupported rope types fail at build time


def sliding_window(config: Any, layer_idx: int) -> int | None:
    """The attention window of layer ``layer_idx`` (``None``: full causal attention).

    Mistral and Phi-3 apply ``config.sliding_window`` to every layer; Qwen2 only to the layers whose
    ``config.layer_types`` entry is ``"sliding_attention"``.
    """
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return int(window)


def init_cache(config: Any, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    """An empty KV cache: per layer ``(batch, max_len, kv_heads, head_dim)`` key and value buffers.

    Example:
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                                num_key_value_heads=2)
        >>> c = init_cache(cfg, 1, 10)
        >>> len(c["keys"]), c["keys"][0].shape, int(c["index"])
        (2, (1, 10, 2, 8), 0)
    """
    shape = (batch_size, max_len, config.num_key_value_heads, rope.head_dim(config))
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
    return {
        "keys": zeros,
        "values": tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
        "index": jnp.zeros((), jnp.int32),
    }


class RMSNorm(nnx.Module):
    """Llama's RMSNorm (``scale * normed``), or Gemma's (``normed * (1 + scale)``, zero-centred)."""

    def __init__(self, features: int, *, eps: float, unit_offset: bool, dtype: Any):
        self.scale = nnx.Param(jnp.zeros(features, dtype) if unit_offset else jnp.ones(features, dtype))
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...]
        if self.unit_offset:  # Gemma multiplies in float32, then casts
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return scale * normed.astype(x.dtype)


def _attention_mask(
    q_len: int, k_len: int, offset: Any, attention_mask: Any, window: int | None
) -> jax.Array:
    mask = layers.combine_masks(layers.causal_mask(q_len, k_len, offset), layers.padding_mask(attention_mask))
    if window is not None:
        q_pos = jnp.arange(q_len)[:, None] + offset
        k_pos = jnp.arange(k_len)[None, :]
        mask = jnp.logical_and(mask, (k_pos > q_pos - window)[None, None])
    return mask


class Attention(nnx.Module):
    def __init__(self, config: Any, layer_idx: int, dtype: Any, rngs: nnx.Rngs):
        h, std = config.hidden_size, config.initializer_range
        self.num_heads, self.num_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = rope.head_dim(config)
        self.window = sliding_window(config, layer_idx)
        self.fused = config.model_type == "phi3"
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv * self.head_dim
        qkv_bias = {"qwen2": True, "phi3": False, "mistral": False}.get(
            config.model_type, bool(getattr(config, "attention_bias", False))
        )
        o_bias = config.model_type in ("llama", "gemma") and bool(getattr(config, "attention_bias", False))

        def lin(i: int, o: int, bias: bool) -> nnx.Linear:
            return layers.linear(i, o, std=std, use_bias=bias, dtype=dtype, rngs=rngs)

        if self.fused:
            self.qkv_proj = lin(h, q_out + 2 * kv_out, False)
        else:
            self.q_proj = lin(h, q_out, qkv_bias)
            self.k_proj = lin(h, kv_out, qkv_bias)
            self.v_proj = lin(h, kv_out, qkv_bias)
        self.o_proj = lin(q_out, h, o_bias)
        # transformers' eager attention drops attention probabilities at this rate in training.
        self.dropout_rate = float(getattr(config, "attention_dropout", 0.0) or 0.0)

    def __call__(self, x, cos, sin, attention_mask, layer_cache, drop=layers.NO_DROPOUT):
        if self.fused:
            q_out, kv_out = self.num_heads * self.head_dim, self.num_kv * self.head_dim
            qkv = self.qkv_proj(x)
            q, k, v = qkv[..., :q_out], qkv[..., q_out : q_out + kv_out], qkv[..., q_out + kv_out :]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = rope.apply_rotary(layers.split_heads(q, self.num_heads), cos, sin)
        k = rope.apply_rotary(layers.split_heads(k, self.num_kv), cos, sin)
        v = layers.split_heads(v, self.num_kv)
        t = x.shape[1]
        if layer_cache is None:
            mask = _attention_mask(t, t, 0, attention_mask, self.window)
            new_cache = None
        else:
            cache_k, cache_v, index = layer_cache
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
            mask = _attention_mask(t, k.shape[1], index, attention_mask, self.window)
            new_cache = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        out = layers.dot_product_attention(q, k, v, mask=mask, dropout=drop, dropout_rate=self.dropout_rate)
        return self.o_proj(layers.merge_heads(out)), new_cache


class MLP(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        h, m, std = config.hidden_size, config.intermediate_size, config.initializer_range
        bias = config.model_type == "llama" and bool(getattr(config, "mlp_bias", False))
        self.fused = config.model_type == "phi3"
        if self.fused:
            self.gate_up_proj = layers.linear(h, 2 * m, std=std, use_bias=False, dtype=dtype, rngs=rngs)
        else:
            self.gate_proj = layers.linear(h, m, std=std, use_bias=bias, dtype=dtype, rngs=rngs)
            self.up_proj = layers.linear(h, m, std=std, use_bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = layers.linear(m, h, std=std, use_bias=bias, dtype=dtype, rngs=rngs)
        self.act = layers.activation(config.hidden_act)

    def __call__(self, x):
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, config: Any, layer_idx: int, dtype: Any, rngs: nnx.Rngs):
        h, eps, gemma = config.hidden_size, config.rms_norm_eps, config.model_type == "gemma"
        self.input_layernorm = RMSNorm(h, eps=eps, unit_offset=gemma, dtype=dtype)
        self.self_attn = Attention(config, layer_idx, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(h, eps=eps, unit_offset=gemma, dtype=dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, cos, sin, attention_mask, layer_cache, drop=layers.NO_DROPOUT):
        attn, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, layer_cache, drop)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class DecoderModel(nnx.Module):
    """``LlamaModel`` (and the Mistral/Qwen2/Gemma/Phi-3 equivalents): last hidden state after ``norm``."""

    def __init__(self, config: Any, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        _check_config(config)
        self.config = config
        self.dtype = dtype
        h = config.hidden_size
        self.embed_tokens = layers.embed(
            config.vocab_size, h, std=config.initializer_range, dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [DecoderLayer(config, i, dtype, rngs) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(h, eps=config.rms_norm_eps, unit_offset=config.model_type == "gemma", dtype=dtype)

    def __call__(
        self,
        input_ids: Int[Array, "B T"],
        attention_mask: Int[Array, "B S"] | None = None,
        *,
        position_ids: Int[Array, "B T"] | None = None,
        cache: dict[str, Any] | None = None,
        dropout_rng: jax.Array | None = None,
    ):
        b, t = input_ids.shape
        drop = layers.Dropout(dropout_rng)
        offset = 0 if cache is None else cache["index"]
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t)[None, :] + offset, (b, t))
        x = self.embed_tokens(input_ids)
        if (
            self.config.model_type == "gemma"
        ):  # the scale is rounded to the weights' dtype, as in transformers
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), dtype=x.dtype)
        cos, sin = rope.rotary_cos_sin(self.config, position_ids, dtype=x.dtype)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache["keys"][i], cache["values"][i], offset)
            x, new = layers.call_block(layer, x, cos, sin, attention_mask, layer_cache, drop)
            if new is not None:
                new_keys.append(new[0])
                new_values.append(new[1])
        x = self.norm(x)
        if cache is None:
            return x
        return x, {"keys": tuple(new_keys), "values": tuple(new_values), "index": cache["index"] + t}


def _with_cache(fn, out, *rest):
    return (fn(out[0], *rest), out[1]) if isinstance(out, tuple) else fn(out, *rest)


class ForCausalLM(nnx.Module):
    """``LlamaForCausalLM`` etc.: logits (B, T, V); the head reads the embedding when tied."""

    def __init__(self, config: Any, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        self.model = DecoderModel(config, dtype, rngs=rngs)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tied:
            self.lm_head = layers.linear(
                config.hidden_size,
                config.vocab_size,
                std=config.initializer_range,
                use_bias=False,
                dtype=dtype,
                rngs=rngs,
            )

    def _logits(self, hidden: Float[Array, "B T H"]) -> Float[Array, "B T V"]:
        if self.tied:
            return layers.tied_logits(hidden, self.model.embed_tokens.embedding[...])
        return self.lm_head(hidden)

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None, cache=None, dropout_rng=None):
        out = self.model(
            input_ids, attention_mask, position_ids=position_ids, cache=cache, dropout_rng=dropout_rng
        )
        return _with_cache(self._logits, out)


class ForSequenceClassification(nnx.Module):
    """``LlamaForSequenceClassification`` etc.: bias-free ``score`` on the last non-pad token."""

    def __init__(self, config: Any, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        self.pad_token_id = config.pad_token_id
        self.model = DecoderModel(config, dtype, rngs=rngs)
        self.score = layers.linear(
            config.hidden_size,
            config.num_labels,
            std=config.initializer_range,
            use_bias=False,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None, dropout_rng=None):
        hidden = self.model(input_ids, attention_mask, position_ids=position_ids, dropout_rng=dropout_rng)
        last = layers.last_token_index(input_ids, attention_mask, self.pad_token_id)
        return self.score(layers.gather_rows(hidden, last))


_CLASSES = {"base": DecoderModel, "causal_lm": ForCausalLM, "seq_cls": ForSequenceClassification}


def _factory(config: Any, task: str, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    return _CLASSES[task](config, dtype, rngs=rngs)


def _gemma_init(config: Any, abstract_params: Any, seed: int = 0) -> Any:
    # Gemma's norms compute (1 + weight): transformers initialises the weight to zero.
    params = default_init(config, abstract_params, seed)
    zeros = {p: jnp.zeros_like(x) for p, x in leaf_paths(params).items() if p.endswith(".scale")}
    return replace_leaves(params, zeros)


ARCHITECTURES = {
    model_type: register(
        Architecture(
            model_type=model_type,
            tasks=("base", "causal_lm", "seq_cls"),
            build=nnx_build(_factory),
            base_model_prefix="model",
            tied={"lm_head.weight": "model.embed_tokens.weight"},
            init=_gemma_init if model_type == "gemma" else None,
            # Attention-probability dropout (config.attention_dropout); Phi-3's residual and
            # embedding dropout are not implemented, so it refuses train.dropout.
            dropout=model_type != "phi3",
        )
    )
    for model_type in MODEL_TYPES
}
