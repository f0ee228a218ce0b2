"""DistilBERT (``model_type="distilbert"``): ``DistilBertModel``, ``DistilBertForSequenceClassification``
and ``DistilBertForMaskedLM``.

Paths follow transformers: ``transformer.layer.0.attention.q_lin.kernel`` (also ``k_lin``, ``v_lin``,
``out_lin``), ``transformer.layer.0.ffn.lin1.kernel``, ``...sa_layer_norm.scale``; under
``distilbert.`` plus ``pre_classifier`` and ``classifier`` for ``"seq_cls"``, or ``vocab_transform``,
``vocab_layer_norm`` and ``vocab_projector.bias`` for ``"masked_lm"`` (the projector's weight is the
word embedding itself unless ``config.tie_word_embeddings`` is false). No dropout.

Example:
    >>> import jax.numpy as jnp, transformers
    >>> from jaxsparse.models import init_params
    >>> cfg = transformers.DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    >>> init_params(cfg, task="seq_cls")(jnp.array([[1, 2, 3]]), jnp.array([[1, 1, 0]])).shape
    (1, 2)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsparse.models import layers
from jaxsparse.models.base import Architecture, nnx_build, register
from jaxsparse.models.bert import init_zero_padding_row
from jaxsparse.tree import leaf_paths, replace_leaves

_LAYER_NORM_EPS = 1e-12  # hard-coded in transformers' DistilBERT


class Embeddings(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        std, d = config.initializer_range, config.dim
        self.word_embeddings = layers.embed(config.vocab_size, d, std=std, dtype=dtype, rngs=rngs)
        self.position_embeddings = layers.embed(
            config.max_position_embeddings, d, std=std, dtype=dtype, rngs=rngs
        )
        self.LayerNorm = layers.layer_norm(d, eps=_LAYER_NORM_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, position_ids=None):
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(position_ids))


class MultiHeadSelfAttention(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        d, std = config.dim, config.initializer_range
        if d % config.n_heads:
            raise ValueError(f"config.n_heads {config.n_heads} must divide config.dim {d} evenly")
        self.n_heads = config.n_heads
        self.q_lin = layers.linear(d, d, std=std, dtype=dtype, rngs=rngs)
        self.k_lin = layers.linear(d, d, std=std, dtype=dtype, rngs=rngs)
        self.v_lin = layers.linear(d, d, std=std, dtype=dtype, rngs=rngs)
        self.out_lin = layers.linear(d, d, std=std, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask):
        q, k, v = (layers.split_heads(f(x), self.n_heads) for f in (self.q_lin, self.k_lin, self.v_lin))
        return self.out_lin(
            layers.merge_heads(layers.dot_product_attention(q, k, v, mask=mask, heads_major=True))
        )


class FFN(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        std = config.initializer_range
        self.lin1 = layers.linear(config.dim, config.hidden_dim, std=std, dtype=dtype, rngs=rngs)
        self.lin2 = layers.linear(config.hidden_dim, config.dim, std=std, dtype=dtype, rngs=rngs)
        self.activation = layers.activation(config.activation)

    def __call__(self, x):
        return self.lin2(self.activation(self.lin1(x)))


class TransformerBlock(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        self.attention = MultiHeadSelfAttention(config, dtype, rngs)
        self.sa_layer_norm = layers.layer_norm(config.dim, eps=_LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.ffn = FFN(config, dtype, rngs)
        self.output_layer_norm = layers.layer_norm(config.dim, eps=_LAYER_NORM_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask):
        x = self.sa_layer_norm(self.attention(x, mask) + x)
        return self.output_layer_norm(self.ffn(x) + x)


class Transformer(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        self.layer = nnx.List([TransformerBlock(config, dtype, rngs) for _ in range(config.n_layers)])

    def __call__(self, x, mask):
        for block in self.layer:
            x = layers.call_block(block, x, mask)
        return x


class DistilBertModel(nnx.Module):
    """``transformers.DistilBertModel``; ``__call__`` returns the last hidden state."""

    def __init__(self, config: Any, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        self.embeddings = Embeddings(config, dtype, rngs)
        self.transformer = Transformer(config, dtype, rngs)

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None):
        return self.transformer(self.embeddings(input_ids, position_ids), layers.padding_mask(attention_mask))


class DistilBertForSequenceClassification(nnx.Module):
    """``transformers.DistilBertForSequenceClassification``: token 0 -> pre_classifier -> ReLU -> classifier."""

    def __init__(self, config: Any, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        d, std = config.dim, config.initializer_range
        self.distilbert = DistilBertModel(config, dtype, rngs=rngs)
        self.pre_classifier = layers.linear(d, d, std=std, dtype=dtype, rngs=rngs)
        self.classifier = layers.linear(d, config.num_labels, std=std, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None):
        hidden = self.distilbert(input_ids, attention_mask, position_ids=position_ids)
        return self.classifier(jax.nn.relu(self.pre_classifier(hidden[:, 0])))


class TiedVocabProjector(nnx.Module):
    """``vocab_projector`` when tied: logits ``x @ word_embeddings.T + bias``. The embedding is the one
    weight (no copy), so the two cannot come untied in training or saving."""

    def __init__(self, config: Any, dtype: Any):
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), dtype))

    def __call__(self, x, word_embeddings):
        return layers.tied_logits(x, word_embeddings) + self.bias[...].astype(x.dtype)


class DistilBertForMaskedLM(nnx.Module):
    """``transformers.DistilBertForMaskedLM``: ``vocab_transform`` -> activation -> ``vocab_layer_norm``
    -> ``vocab_projector``, (B, T, vocab) logits."""

    def __init__(self, config: Any, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        d = config.dim
        self.distilbert = DistilBertModel(config, dtype, rngs=rngs)
        self.vocab_transform = layers.linear(d, d, std=config.initializer_range, dtype=dtype, rngs=rngs)
        self.activation = layers.activation(config.activation)
        self.vocab_layer_norm = layers.layer_norm(d, eps=_LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        if self.tied:
            self.vocab_projector = TiedVocabProjector(config, dtype)
        else:
            self.vocab_projector = layers.linear(
                d, config.vocab_size, std=config.initializer_range, dtype=dtype, rngs=rngs
            )

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None):
        hidden = self.distilbert(input_ids, attention_mask, position_ids=position_ids)
        x = self.vocab_layer_norm(self.activation(self.vocab_transform(hidden)))
        if self.tied:
            return self.vocab_projector(x, self.distilbert.embeddings.word_embeddings.embedding[...])
        return self.vocab_projector(x)


def sinusoidal_positions(n_pos: int, dim: int) -> np.ndarray:
    """DistilBERT's fixed position table: ``sin`` on even, ``cos`` on odd features (float32)."""
    pos = np.arange(n_pos)[:, None]
    j = np.arange(dim)[None, :]
    angles = pos / np.power(10000, 2 * (j // 2) / dim)
    table = np.where(j % 2 == 0, np.sin(angles), np.cos(angles))
    return table.astype(np.float32)


def _init(config: Any, abstract_params: Any, seed: int = 0) -> Any:
    params = init_zero_padding_row(config, abstract_params, seed)
    if not getattr(config, "sinusoidal_pos_embds", False):
        return params
    table = {
        p: jnp.asarray(sinusoidal_positions(*x.shape), x.dtype)
        for p, x in leaf_paths(params).items()
        if p.endswith("position_embeddings.embedding")
    }
    return replace_leaves(params, table)


def _factory(config: Any, task: str, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    if task == "masked_lm":
        return DistilBertForMaskedLM(config, dtype, rngs=rngs)
    cls = DistilBertForSequenceClassification if task == "seq_cls" else DistilBertModel
    return cls(config, dtype, rngs=rngs)


ARCHITECTURE = register(
    Architecture(
        model_type="distilbert",
        tasks=("base", "seq_cls", "masked_lm"),
        build=nnx_build(_factory),
        base_model_prefix="distilbert",
        # transformers' ``_tied_weights_keys``: a checkpoint's copy of the tied projector weight.
        tied={"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"},
        init=_init,
    )
)
