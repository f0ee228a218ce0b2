"""GPT-2 (``model_type="gpt2"``): ``GPT2Model``, ``GPT2LMHeadModel`` and ``GPT2ForSequenceClassification``.

Paths follow transformers: ``wte.embedding``, ``h.0.attn.c_attn.kernel``, ``h.0.mlp.c_fc.kernel``,
``ln_f.scale``; under ``transformer.`` for the task models, plus ``score.kernel`` (no bias) for
``"seq_cls"``. The LM head is tied to ``wte`` (no ``lm_head`` parameter). ``Conv1D`` weights are
stored (in, out) in PyTorch too, so the architecture lists ``c_attn``, ``c_proj`` and ``c_fc`` as
``fan_in_fan_out``. Position ids default to ``0..T-1`` as in transformers' forward (pass
``position_ids`` for left-padded batches). Inference only (no dropout).

Example:
    >>> import jax.numpy as jnp, transformers
    >>> from jaxsparse.models import init_params
    >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    >>> init_params(cfg, task="causal_lm")(jnp.array([[1, 2, 3]])).shape
    (1, 3, 50)
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxsparse.models import layers
from jaxsparse.models.base import Architecture, default_init, nnx_build, register
from jaxsparse.tree import leaf_paths, replace_leaves


def _check_config(config: Any) -> None:
    if getattr(config, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention is not supported")


class GPT2Attention(nnx.Module):
    def __init__(self, config: Any, layer_idx: int, dtype: Any, rngs: nnx.Rngs):
        e, std = config.n_embd, config.initializer_range
        if e % config.n_head:
            raise ValueError(f"n_embd {e} is not a multiple of n_head {config.n_head}")
        self.num_heads = config.n_head
        scale = 1.0 / math.sqrt(e // config.n_head) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scaling = scale
        self.c_attn = layers.linear(e, 3 * e, std=std, dtype=dtype, rngs=rngs)
        self.c_proj = layers.linear(e, e, std=std, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask):
        q, k, v = (layers.split_heads(t, self.num_heads) for t in jnp.split(self.c_attn(x), 3, axis=-1))
        out = layers.dot_product_attention(q, k, v, mask=mask, scale=self.scaling)
        return self.c_proj(layers.merge_heads(out))


class GPT2MLP(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        e, std = config.n_embd, config.initializer_range
        inner = config.n_inner if config.n_inner is not None else 4 * e
        self.c_fc = layers.linear(e, inner, std=std, dtype=dtype, rngs=rngs)
        self.c_proj = layers.linear(inner, e, std=std, dtype=dtype, rngs=rngs)
        self.act = layers.activation(config.activation_function)

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, config: Any, layer_idx: int, dtype: Any, rngs: nnx.Rngs):
        e, eps = config.n_embd, config.layer_norm_epsilon
        self.ln_1 = layers.layer_norm(e, eps=eps, dtype=dtype, rngs=rngs)
        self.attn = GPT2Attention(config, layer_idx, dtype, rngs)
        self.ln_2 = layers.layer_norm(e, eps=eps, dtype=dtype, rngs=rngs)
        self.mlp = GPT2MLP(config, dtype, rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nnx.Module):
    """``transformers.GPT2Model``; ``__call__`` returns the last hidden state (after ``ln_f``)."""

    def __init__(self, config: Any, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        _check_config(config)
        e, std = config.n_embd, config.initializer_range
        self.wte = layers.embed(config.vocab_size, e, std=std, dtype=dtype, rngs=rngs)
        self.wpe = layers.embed(config.n_positions, e, std=std, dtype=dtype, rngs=rngs)
        self.h = nnx.List([GPT2Block(config, i, dtype, rngs) for i in range(config.n_layer)])
        self.ln_f = layers.layer_norm(e, eps=config.layer_norm_epsilon, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None):
        t = input_ids.shape[1]
        if position_ids is None:
            position_ids = jnp.arange(t)[None, :]
        x = self.wte(input_ids) + self.wpe(position_ids)
        mask = layers.combine_masks(layers.padding_mask(attention_mask), layers.causal_mask(t, t))
        for block in self.h:
            x = layers.call_block(block, x, mask)
        return self.ln_f(x)


class GPT2LMHeadModel(nnx.Module):
    """``transformers.GPT2LMHeadModel``: logits (B, T, V) from the head tied to ``wte``."""

    def __init__(self, config: Any, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        self.transformer = GPT2Model(config, dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None):
        hidden = self.transformer(input_ids, attention_mask, position_ids=position_ids)
        return layers.tied_logits(hidden, self.transformer.wte.embedding[...])


class GPT2ForSequenceClassification(nnx.Module):
    """``transformers.GPT2ForSequenceClassification``: ``score`` on the last non-pad token."""

    def __init__(self, config: Any, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        self.pad_token_id = config.pad_token_id
        self.transformer = GPT2Model(config, dtype, rngs=rngs)
        self.score = layers.linear(
            config.n_embd,
            config.num_labels,
            std=config.initializer_range,
            use_bias=False,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None):
        hidden = self.transformer(input_ids, attention_mask, position_ids=position_ids)
        last = layers.last_token_index(input_ids, attention_mask, self.pad_token_id)
        return self.score(layers.gather_rows(hidden, last))


_CLASSES = {"base": GPT2Model, "causal_lm": GPT2LMHeadModel, "seq_cls": GPT2ForSequenceClassification}


def _factory(config: Any, task: str, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    return _CLASSES[task](config, dtype, rngs=rngs)


def _init(config: Any, abstract_params: Any, seed: int = 0) -> Any:
    # transformers' GPT-2 init: residual projections get std / sqrt(2 * n_layer) (GPT-2 paper).
    params = default_init(config, abstract_params, seed)
    shrink = 1.0 / math.sqrt(2 * config.n_layer)
    scaled = {p: x * shrink for p, x in leaf_paths(params).items() if p.endswith("c_proj.kernel")}
    return replace_leaves(params, scaled)


ARCHITECTURE = register(
    Architecture(
        model_type="gpt2",
        tasks=("base", "causal_lm", "seq_cls"),
        build=nnx_build(_factory),
        fan_in_fan_out=("c_attn", "c_proj", "c_fc"),
        base_model_prefix="transformer",
        tied={"lm_head.weight": "transformer.wte.weight"},
        ignore_keys=(r"\.attn\.bias$", r"\.attn\.masked_bias$"),
        hf_class_names={
            "base": "GPT2Model",
            "causal_lm": "GPT2LMHeadModel",
            "seq_cls": "GPT2ForSequenceClassification",
        },
        init=_init,
    )
)
