"""New tokens: add them to a tokenizer and grow the model's embedding (and untied output head).

New rows are initialised as the SpaRTA authors' trainer does (``peft_sparta.trainer.sft.model_loader``):

- ``"normal"`` (their classifiers): ``normal(0, 1) * config.initializer_range``;
- ``"mean"`` (their causal LMs, through transformers 5's ``resize_token_embeddings``, whose
  ``mean_resizing=True`` default it is): a multivariate normal with the old rows' mean and
  ``1e-9`` times their (biased) covariance, or the mean itself when that covariance is not
  positive definite (e.g. fewer rows than dimensions). An untied ``lm_head`` grows the same way.

Example:
    >>> import numpy as np
    >>> old = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> new_rows(old, 2, init="mean", std=0.02, seed=0).round(3).tolist()  # 4 rows < 3 dims + 1: the mean
    [[4.5, 5.5, 6.5], [4.5, 5.5, 6.5]]
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxsparse import tree as tree_lib

INITS = ("normal", "mean")
EMBEDDING_LEAVES = ("embed_tokens.embedding", "word_embeddings.embedding", "wte.embedding")
OUTPUT_HEADS = ("lm_head.kernel",)
# The Hugging Face config attribute counting the tokens added (written into saved config.json files).
ADDED_TOKENS_KEY = "jaxsparse_new_tokens"


class NewTokensError(ValueError):
    """New tokens that cannot be added (already in the vocabulary, or a tokenizer/embedding mismatch)."""


def add_tokens(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as additional special tokens (never split, as the authors'
    ``add_tokens``) and return their ids, in order. Tokens already known are refused.

    Example:
        >>> from tokenizers import Tokenizer, models
        >>> import transformers
        >>> tok = transformers.PreTrainedTokenizerFast(
        ...     tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")), unk_token="a")
        >>> add_tokens(tok, ["<q>", "<ans>"]), len(tok)
        ([2, 3], 4)
    """
    tokens = list(tokens)
    if not tokens or any(not isinstance(t, str) or not t for t in tokens):
        raise NewTokensError(f"new tokens must be a non-empty list of non-empty strings, got {tokens!r}")
    if len(set(tokens)) != len(tokens):
        raise NewTokensError(f"new tokens list a token twice: {tokens}")
    vocab = tokenizer.get_vocab()
    known = [t for t in tokens if t in vocab]
    if known:
        raise NewTokensError(f"new tokens {known} are already in the tokenizer's vocabulary")
    before = len(tokenizer)
    added = tokenizer.add_special_tokens(
        {"additional_special_tokens": tokens}, replace_extra_special_tokens=False
    )
    if added != len(tokens):
        raise NewTokensError(f"the tokenizer added {added} of the new tokens {tokens}")
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    if ids != list(range(before, before + len(tokens))):
        raise NewTokensError(
            f"new tokens {tokens} got ids {ids}, expected {before}..{before + len(tokens) - 1}"
        )
    return ids


def new_rows(old: np.ndarray, n: int, *, init: str, std: float, seed: int = 0) -> np.ndarray:
    """``n`` new rows (float32) for an embedding-like matrix ``old`` (rows = tokens), by ``init``
    (see the module docstring). Deterministic in ``seed``."""
    if init not in INITS:
        raise ValueError(f"new-token init must be one of {INITS}, got {init!r}")
    rng = np.random.default_rng(seed)
    old = np.asarray(old, np.float64)
    dim = old.shape[1]
    if init == "normal":
        return (rng.standard_normal((n, dim)) * std).astype(np.float32)
    mean = old.mean(axis=0)
    centred = old - mean
    covariance = 1e-9 * (centred.T @ centred) / old.shape[0]
    try:
        chol = np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:  # not positive definite: transformers falls back to the mean
        return np.repeat(mean[None, :], n, axis=0).astype(np.float32)
    return (mean + rng.standard_normal((n, dim)) @ chol.T).astype(np.float32)


def embedding_path(params: Any) -> str:
    """The input-embedding leaf of a model of the zoo (``NewTokensError`` if none)."""
    for path in sorted(tree_lib.leaf_paths(params)):
        if any(path == e or path.endswith("." + e) for e in EMBEDDING_LEAVES):
            return path
    raise NewTokensError(f"the model has no input embedding among {list(EMBEDDING_LEAVES)}")


def with_new_rows(model: Any, embedding_rows: np.ndarray, head_rows: np.ndarray | None = None) -> Any:
    """``model`` (a :class:`jaxsparse.models.Model`) with ``embedding_rows`` appended to its input
    embedding, and ``head_rows`` (in the embedding's layout, one row per token) appended to an untied
    ``lm_head``; ``config.vocab_size`` (and :data:`ADDED_TOKENS_KEY`) grow to match and the forward
    function is rebuilt."""
    from jaxsparse.models.base import architecture

    params = model.params
    leaves = tree_lib.leaf_paths(params)
    path = embedding_path(params)
    embedding = leaves[path]
    n = int(np.shape(embedding_rows)[0])
    new = {path: jnp.concatenate([embedding, jnp.asarray(embedding_rows, embedding.dtype)], axis=0)}
    for head in OUTPUT_HEADS:
        if head in leaves:
            if head_rows is None:
                raise NewTokensError(f"the model has an untied {head}: new rows for it are needed too")
            kernel = leaves[head]  # (hidden, vocab): new tokens are new columns
            new[head] = jnp.concatenate([kernel, jnp.asarray(head_rows, kernel.dtype).T], axis=1)
    config = copy.deepcopy(model.config)
    config.vocab_size = int(config.vocab_size) + n
    setattr(config, ADDED_TOKENS_KEY, int(getattr(config, ADDED_TOKENS_KEY, 0) or 0) + n)
    apply_fn, _ = architecture(config.model_type).build(config, model.task, embedding.dtype)
    return dataclasses.replace(
        model, config=config, params=tree_lib.replace_leaves(params, new), apply_fn=apply_fn
    )


def resize_token_embeddings(model: Any, n: int, *, init: str, seed: int = 0) -> tuple[Any, np.ndarray]:
    """``(model, embedding_rows)``: ``model`` grown by ``n`` tokens with rows drawn by ``init`` (and
    the same rule for an untied ``lm_head``), and the new embedding rows (what a SpaRTA export writes
    as ``new_embeddings_init.safetensors``).

    Example:
        >>> import transformers
        >>> from jaxsparse import models
        >>> cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        >>> m, rows = resize_token_embeddings(models.init_params(cfg, task="causal_lm"), 2, init="normal")
        >>> m.params["model"]["embed_tokens"]["embedding"].shape, m.config.vocab_size, rows.shape
        ((18, 8), 18, (2, 8))
    """
    leaves = tree_lib.leaf_paths(model.params)
    path = embedding_path(model.params)
    std = float(getattr(model.config, "initializer_range", 0.02))
    rows = new_rows(np.asarray(leaves[path], np.float32), n, init=init, std=std, seed=seed)
    head_rows = None
    for head in OUTPUT_HEADS:
        if head in leaves:
            head_rows = new_rows(np.asarray(leaves[head], np.float32).T, n, init=init, std=std, seed=seed + 1)
    return with_new_rows(model, rows, head_rows), rows
