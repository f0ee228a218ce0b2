"""BERT (``model_type="bert"``; covers MiniLM): ``BertModel``, ``BertForSequenceClassification`` and
``BertForMaskedLM``.

Parameter paths are the transformers module paths: ``embeddings.word_embeddings.embedding``,
``encoder.layer.0.attention.self.query.kernel``, ``pooler.dense.kernel`` for ``"base"``; the same under
``bert.`` plus ``classifier.kernel`` for ``"seq_cls"``. ``"masked_lm"`` has no pooler (as transformers'
``BertModel(add_pooling_layer=False)``) and the head ``cls.predictions.transform.dense.kernel``,
``cls.predictions.transform.LayerNorm.scale`` and ``cls.predictions.bias``; its decoder is the word
embedding itself (no parameter of its own) unless ``config.tie_word_embeddings`` is false, when
``cls.predictions.decoder.kernel``/``.bias`` exist as in transformers. Dropout (``hidden_dropout_prob``,
``attention_probs_dropout_prob``, ``classifier_dropout``) runs only when a ``dropout_rng`` is given.

Example:
    >>> import jax.numpy as jnp, transformers
    >>> from jaxsparse.models import init_params
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=32, num_labels=3)
    >>> m = init_params(cfg, task="seq_cls")
    >>> m(jnp.array([[1, 2, 3]]), jnp.array([[1, 1, 1]]), token_type_ids=jnp.zeros((1, 3), int)).shape
    (1, 3)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxsparse.models import layers
from jaxsparse.models.base import Architecture, default_init, nnx_build, register
from jaxsparse.tree import leaf_paths, replace_leaves


def _check_config(config: Any) -> None:
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        raise ValueError(f"BERT position_embedding_type {kind!r} is not supported (only 'absolute')")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("BERT as a decoder / with cross-attention is not supported")


class BertEmbeddings(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        std, h = config.initializer_range, config.hidden_size
        self.word_embeddings = layers.embed(config.vocab_size, h, std=std, dtype=dtype, rngs=rngs)
        self.position_embeddings = layers.embed(
            config.max_position_embeddings, h, std=std, dtype=dtype, rngs=rngs
        )
        self.token_type_embeddings = layers.embed(config.type_vocab_size, h, std=std, dtype=dtype, rngs=rngs)
        self.LayerNorm = layers.layer_norm(h, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.dropout_rate = config.hidden_dropout_prob

    def __call__(self, input_ids, token_type_ids=None, position_ids=None, drop=layers.NO_DROPOUT):
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(position_ids)
        )
        return drop(self.LayerNorm(x), self.dropout_rate)


class BertSelfAttention(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        h, std = config.hidden_size, config.initializer_range
        if h % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {h} is not a multiple of num_attention_heads {config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.query = layers.linear(h, h, std=std, dtype=dtype, rngs=rngs)
        self.key = layers.linear(h, h, std=std, dtype=dtype, rngs=rngs)
        self.value = layers.linear(h, h, std=std, dtype=dtype, rngs=rngs)
        self.dropout_rate = config.attention_probs_dropout_prob

    def __call__(self, x, mask, drop=layers.NO_DROPOUT):
        q, k, v = (layers.split_heads(f(x), self.num_heads) for f in (self.query, self.key, self.value))
        out = layers.dot_product_attention(
            q, k, v, mask=mask, dropout=drop, dropout_rate=self.dropout_rate, heads_major=True
        )
        return layers.merge_heads(out)


class BertSelfOutput(nnx.Module):
    """Projection, then ``LayerNorm(projection + residual)`` (also ``BertOutput``'s shape)."""

    def __init__(self, in_features: int, config: Any, dtype: Any, rngs: nnx.Rngs):
        h = config.hidden_size
        self.dense = layers.linear(in_features, h, std=config.initializer_range, dtype=dtype, rngs=rngs)
        self.LayerNorm = layers.layer_norm(h, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.dropout_rate = config.hidden_dropout_prob

    def __call__(self, x, residual, drop=layers.NO_DROPOUT):
        return self.LayerNorm(drop(self.dense(x), self.dropout_rate) + residual)


class BertAttention(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        self.self = BertSelfAttention(config, dtype, rngs)
        self.output = BertSelfOutput(config.hidden_size, config, dtype, rngs)

    def __call__(self, x, mask, drop=layers.NO_DROPOUT):
        return self.output(self.self(x, mask, drop), x, drop)


class BertIntermediate(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        self.dense = layers.linear(
            config.hidden_size, config.intermediate_size, std=config.initializer_range, dtype=dtype, rngs=rngs
        )
        self.act = layers.activation(config.hidden_act)

    def __call__(self, x):
        return self.act(self.dense(x))


class BertLayer(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        self.attention = BertAttention(config, dtype, rngs)
        self.intermediate = BertIntermediate(config, dtype, rngs)
        self.output = BertSelfOutput(config.intermediate_size, config, dtype, rngs)

    def __call__(self, x, mask, drop=layers.NO_DROPOUT):
        x = self.attention(x, mask, drop)
        return self.output(self.intermediate(x), x, drop)


class BertEncoder(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        self.layer = nnx.List([BertLayer(config, dtype, rngs) for _ in range(config.num_hidden_layers)])

    def __call__(self, x, mask, drop=layers.NO_DROPOUT):
        for layer in self.layer:
            x = layers.call_block(layer, x, mask, drop)
        return x


class BertPooler(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        h = config.hidden_size
        self.dense = layers.linear(h, h, std=config.initializer_range, dtype=dtype, rngs=rngs)

    def __call__(self, hidden):
        return jnp.tanh(self.dense(hidden[:, 0]))


class BertModel(nnx.Module):
    """``transformers.BertModel`` (with its pooler unless ``add_pooling_layer=False``); ``__call__``
    returns the last hidden state."""

    def __init__(
        self, config: Any, dtype: Any = jnp.float32, *, add_pooling_layer: bool = True, rngs: nnx.Rngs
    ):
        _check_config(config)
        self.embeddings = BertEmbeddings(config, dtype, rngs)
        self.encoder = BertEncoder(config, dtype, rngs)
        self.pooler = BertPooler(config, dtype, rngs) if add_pooling_layer else None

    def __call__(
        self, input_ids, attention_mask=None, *, token_type_ids=None, position_ids=None, dropout_rng=None
    ):
        return self.encode(
            input_ids, attention_mask, token_type_ids, position_ids, layers.Dropout(dropout_rng)
        )

    def encode(self, input_ids, attention_mask, token_type_ids, position_ids, drop):
        x = self.embeddings(input_ids, token_type_ids, position_ids, drop)
        return self.encoder(x, layers.padding_mask(attention_mask), drop)


class BertForSequenceClassification(nnx.Module):
    """``transformers.BertForSequenceClassification``: pooler output -> ``classifier``."""

    def __init__(self, config: Any, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        self.bert = BertModel(config, dtype, rngs=rngs)
        self.classifier = layers.linear(
            config.hidden_size, config.num_labels, std=config.initializer_range, dtype=dtype, rngs=rngs
        )
        rate = getattr(config, "classifier_dropout", None)
        self.dropout_rate = config.hidden_dropout_prob if rate is None else rate

    def __call__(
        self, input_ids, attention_mask=None, *, token_type_ids=None, position_ids=None, dropout_rng=None
    ):
        drop = layers.Dropout(dropout_rng)
        hidden = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids, drop)
        return self.classifier(drop(self.bert.pooler(hidden), self.dropout_rate))


class BertPredictionHeadTransform(nnx.Module):
    """``dense`` -> ``hidden_act`` -> ``LayerNorm``, the MLM head's transform of each hidden state."""

    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        h = config.hidden_size
        self.dense = layers.linear(h, h, std=config.initializer_range, dtype=dtype, rngs=rngs)
        self.act = layers.activation(config.hidden_act)
        self.LayerNorm = layers.layer_norm(h, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nnx.Module):
    """Transform, then vocabulary logits: ``x @ word_embeddings.T + bias`` when tied (one parameter
    shared with the input embedding, so training and saving cannot untie it), else its own ``decoder``.

    transformers keeps ``cls.predictions.bias`` even when untied (the decoder then uses its own bias);
    so do we, so that an untied checkpoint round-trips key for key.
    """

    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        self.transform = BertPredictionHeadTransform(config, dtype, rngs)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), dtype))
        tied = getattr(config, "tie_word_embeddings", True)
        h, v, std = config.hidden_size, config.vocab_size, config.initializer_range
        self.decoder = None if tied else layers.linear(h, v, std=std, dtype=dtype, rngs=rngs)

    def __call__(self, hidden, word_embeddings):
        x = self.transform(hidden)
        if self.decoder is not None:
            return self.decoder(x)
        return layers.tied_logits(x, word_embeddings) + self.bias[...].astype(x.dtype)


class BertOnlyMLMHead(nnx.Module):
    def __init__(self, config: Any, dtype: Any, rngs: nnx.Rngs):
        self.predictions = BertLMPredictionHead(config, dtype, rngs)

    def __call__(self, hidden, word_embeddings):
        return self.predictions(hidden, word_embeddings)


class BertForMaskedLM(nnx.Module):
    """``transformers.BertForMaskedLM``: encoder (no pooler) -> ``cls.predictions`` -> (B, T, vocab) logits."""

    def __init__(self, config: Any, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        self.bert = BertModel(config, dtype, add_pooling_layer=False, rngs=rngs)
        self.cls = BertOnlyMLMHead(config, dtype, rngs)

    def __call__(
        self, input_ids, attention_mask=None, *, token_type_ids=None, position_ids=None, dropout_rng=None
    ):
        drop = layers.Dropout(dropout_rng)
        hidden = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids, drop)
        return self.cls(hidden, self.bert.embeddings.word_embeddings.embedding[...])


def _factory(config: Any, task: str, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    if task == "masked_lm":
        return BertForMaskedLM(config, dtype, rngs=rngs)
    cls = BertForSequenceClassification if task == "seq_cls" else BertModel
    return cls(config, dtype, rngs=rngs)


def init_zero_padding_row(config: Any, abstract_params: Any, seed: int = 0) -> Any:
    """:func:`default_init`, then the ``pad_token_id`` row of ``word_embeddings`` zeroed, like
    ``nn.Embedding(padding_idx=...)`` in transformers."""
    params = default_init(config, abstract_params, seed)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        return params
    rows = {
        p: x.at[pad].set(0)
        for p, x in leaf_paths(params).items()
        if p.endswith("word_embeddings.embedding") and 0 <= pad < x.shape[0]
    }
    return replace_leaves(params, rows)


ARCHITECTURE = register(
    Architecture(
        model_type="bert",
        tasks=("base", "seq_cls", "masked_lm"),
        build=nnx_build(_factory),
        base_model_prefix="bert",
        # Checkpoint copies of the tied decoder (transformers' ``_tied_weights_keys``); when tied, our
        # decoder reads the embedding and ``cls.predictions.bias``, so these are dropped on load.
        tied={
            "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias",
        },
        # Keys a task's model has no parameter for, dropped with a warning as transformers does: the
        # pooler of an encoder checkpoint (BertForMaskedLM has none), the next-sentence head of a
        # BertForPreTraining checkpoint.
        unused_keys={"masked_lm": (r"^bert\.pooler\.", r"^cls\.seq_relationship\.")},
        init=init_zero_padding_row,
        dropout=True,
    )
)
