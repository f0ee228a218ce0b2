"""Greedy and sampled text generation with a static-shape KV cache for the causal LMs.

One compiled program does the whole generation: a prefill over the prompt writes the cache, then a
``lax.while_loop`` runs the jitted decode step (one token per row) until every row has produced an
end-of-sequence token or ``max_new_tokens`` are done. The cache has a fixed length
(prompt + ``max_new_tokens``), so the step compiles once; compiled programs are reused across calls
with the same model and settings.

Semantics follow ``transformers``' ``generate``: logits are processed by temperature, then top-k,
then top-p (:func:`process_logits`); rows that have finished emit ``pad_token_id``; padded prompts
get position ids ``cumsum(attention_mask) - 1``. Prompts may be padded on either side: they are
left-aligned first (the returned prompt part is left-padded).

Example:
    >>> import jax.numpy as jnp, transformers
    >>> from jaxsparse.models import init_params
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, eos_token_id=None)
    >>> model = init_params(cfg, task="causal_lm")
    >>> out = generate(model, jnp.array([[1, 2, 3]]), max_new_tokens=4)
    >>> out.shape
    (1, 7)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxsparse.models.base import Model
from jaxsparse.models.llama import init_cache


def process_logits(
    logits: Float[Array, "B V"],
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Float[Array, "B V"]:
    """Temperature, then top-k, then top-p filtering, as transformers' logits warpers (removed = ``-inf``).

    Top-k keeps every token whose logit ties the k-th largest; top-p keeps the smallest set of most
    likely tokens whose probability reaches ``top_p`` (at least one token).

    Example:
        >>> process_logits(jnp.array([[1.0, 3.0, 2.0]]), top_k=2).tolist()
        [[-inf, 3.0, 2.0]]
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use do_sample=False for greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / jnp.float32(temperature)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, like transformers
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cumulative <= 1 - top_p
        remove_sorted = remove_sorted.at[..., -1].set(False)
        remove = (
            jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        )
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def next_token(
    logits: Float[Array, "B V"],
    key: jax.Array | None,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Int[Array, " B"]:
    """The argmax (greedy) or a sample from the processed distribution (``key`` required)."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    processed = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)


def left_align(
    input_ids: Int[Array, "B T"], attention_mask: Int[Array, "B T"]
) -> tuple[Int[Array, "B T"], Int[Array, "B T"]]:
    """Move each row's padding to the left, keeping the order of its real tokens.

    Example:
        >>> ids, mask = left_align(jnp.array([[5, 6, 0]]), jnp.array([[1, 1, 0]]))
        >>> ids.tolist(), mask.tolist()
        ([[0, 5, 6]], [[0, 1, 1]])
    """
    order = jnp.argsort(attention_mask != 0, axis=-1, stable=True)
    return jnp.take_along_axis(input_ids, order, axis=-1), jnp.take_along_axis(attention_mask, order, axis=-1)


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(int(v) for v in value)


@functools.lru_cache(maxsize=32)
def _compiled(
    apply_fn: Callable[..., Any],
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos: tuple[int, ...],
    pad: int,
    cache_dtype: Any,
    config: Any,
) -> Callable[..., Any]:
    pick = functools.partial(
        next_token, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p
    )
    eos_ids = jnp.asarray(eos or (-1,), jnp.int32)

    def run(params, input_ids, attention_mask, key):
        b, t = input_ids.shape
        total = t + max_new_tokens
        mask = jnp.concatenate([attention_mask, jnp.ones((b, max_new_tokens), attention_mask.dtype)], axis=1)
        positions = jnp.where(attention_mask != 0, jnp.cumsum(attention_mask, axis=-1) - 1, 1)
        cache = init_cache(config, b, total, cache_dtype)
        logits, cache = apply_fn(params, input_ids, mask, position_ids=positions, cache=cache)
        tokens = jnp.full((b, total), pad, jnp.int32).at[:, :t].set(input_ids.astype(jnp.int32))
        key, sub = jax.random.split(key)
        first = pick(logits[:, -1], sub)
        tokens = tokens.at[:, t].set(first)
        done = jnp.isin(first, eos_ids)

        def cond(carry):
            step, _, _, done, _, _ = carry
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            # ``step`` tokens are written; feed the last one, pick and write the next.
            step, tokens, cache, done, pos, key = carry
            last = jax.lax.dynamic_slice_in_dim(tokens, t + step - 1, 1, axis=1)
            pos = pos + 1
            logits, cache = apply_fn(params, last, mask, position_ids=pos[:, None], cache=cache)
            key, sub = jax.random.split(key)
            token = jnp.where(done, pad, pick(logits[:, -1], sub))
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t + step))
            return step + 1, tokens, cache, done | jnp.isin(token, eos_ids), pos, key

        carry = (jnp.int32(1), tokens, cache, done, positions[:, -1], key)
        steps, tokens, _, _, _, _ = jax.lax.while_loop(cond, body, carry)
        return tokens, steps

    return jax.jit(run)


def generate(
    model: Model,
    input_ids: Int[Array, "B T"],
    attention_mask: Int[Array, "B T"] | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | jax.Array = 0,
    params: Any = None,
) -> Int[Array, "B L"]:
    """Prompt + generated tokens (B, T + n), n <= ``max_new_tokens`` (fewer when every row hit eos).

    ``eos_token_id``/``pad_token_id`` default to the config's (pad falls back to eos, then 0).
    ``seed`` is an int or a ``jax.random`` key (sampling only). ``params`` overrides
    ``model.params`` (e.g. with an adapter applied).

    Example:
        >>> import transformers
        >>> from jaxsparse.models import init_params
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, eos_token_id=None)
        >>> m = init_params(cfg, task="causal_lm")
        >>> generate(m, jnp.array([[1, 2]]), do_sample=True, top_p=0.9, max_new_tokens=3).shape
        (1, 5)
    """
    if model.task != "causal_lm":
        raise ValueError(f"generate needs a causal_lm model, got task {model.task!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, time), got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    input_ids, attention_mask = left_align(input_ids, attention_mask)
    config = model.config
    eos = _as_ids(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    params = model.params if params is None else params
    leaves = jax.tree_util.tree_leaves(params)
    cache_dtype = leaves[0].dtype if leaves else jnp.float32
    run = _compiled(
        model.apply_fn,
        int(max_new_tokens),
        bool(do_sample),
        float(temperature),
        None if top_k is None else int(top_k),
        None if top_p is None else float(top_p),
        eos,
        int(pad_token_id),
        jnp.dtype(cache_dtype),
        _Hashed(config),
    )
    key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    tokens, steps = run(params, input_ids, attention_mask, key)
    return tokens[:, : input_ids.shape[1] + int(steps)]


class _Hashed:
    """A config wrapped to be an lru_cache key by identity (transformers configs are unhashable)."""

    def __init__(self, config: Any):
        self.config = config

    def __hash__(self) -> int:
        return id(self.config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Hashed) and other.config is self.config

    def __getattr__(self, name: str) -> Any:
        return getattr(self.config, name)
