"""Masked language modeling: the data side (token blocks, masking) and the masked-token metrics.

Masking follows transformers' ``DataCollatorForLanguageModeling``: each token that is neither special
nor padding is chosen with probability ``mlm_probability`` (0.15); a chosen token becomes ``[MASK]``
with probability ``mask_replace_prob`` (0.8), else a uniformly random token id with probability
``random_replace_prob / (1 - mask_replace_prob)`` (so 0.1 overall), else stays as it is (0.1). Labels
are the original ids at chosen positions and ``-100`` elsewhere. The decision is split from the
randomness: :func:`apply_masking` is a pure function of uniform draws (the same comparisons
transformers makes against its ``torch.bernoulli`` draws), and :func:`draw_masking` makes those draws
from NumPy's generator seeded by ``(seed, stream, step)``, so the masking of training batch ``step``
is the same in a resumed run, and the held-out split (:func:`mask_arrays`, stream ``EVAL_STREAM``) is
masked once, independently of the evaluation batch size.

Example:
    >>> cfg = MaskingConfig(mask_token_id=4, vocab_size=30, special_ids=(0, 1, 2))
    >>> ids = np.array([[1, 10, 11, 12, 13, 14, 15, 2, 0, 0]] * 4)
    >>> inputs, labels = mask_tokens(ids, ids != 0, cfg, seed=0, step=3)
    >>> bool(np.all(labels[:, [0, 7, 8, 9]] == -100))  # [CLS], [SEP], padding: never chosen
    True
    >>> again, _ = mask_tokens(ids, ids != 0, cfg, seed=0, step=3)
    >>> bool(np.array_equal(inputs, again))  # a pure function of (seed, step)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int

from jaxsparse.metrics import perplexity

IGNORE_INDEX = -100  # transformers' label for positions without a loss
TRAIN_STREAM = 0  # random stream of training batches: key (seed, TRAIN_STREAM, step)
EVAL_STREAM = 1  # random stream of the held-out split's one fixed masking


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """What :func:`mask_tokens` needs: the ``[MASK]`` id, how many ids a random replacement draws
    from (``len(tokenizer)``, as transformers), the ids never chosen, and the three probabilities.

    Example:
        >>> MaskingConfig(mask_token_id=4, vocab_size=30, special_ids=(0,), mlm_probability=1.5)
        Traceback (most recent call last):
        ...
        ValueError: mlm_probability must be in (0, 1), got 1.5
    """

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...] = ()
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        for name in ("mask_replace_prob", "random_replace_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ValueError(
                f"mask_replace_prob + random_replace_prob must be at most 1, got "
                f"{self.mask_replace_prob} + {self.random_replace_prob}"
            )
        if self.vocab_size < 1 or not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} must be a token id below vocab_size {self.vocab_size}"
            )

    @property
    def random_given_not_masked(self) -> float:
        """Probability of a random token among chosen tokens not replaced by ``[MASK]`` (0.1 / 0.2)."""
        if self.mask_replace_prob >= 1.0:
            return 0.0
        return self.random_replace_prob / (1.0 - self.mask_replace_prob)


def masking_config(tokenizer: Any, **probabilities: float) -> MaskingConfig:
    """The :class:`MaskingConfig` of a transformers tokenizer (``[MASK]`` id, ``len(tokenizer)``, and
    its special ids, padding included); ``probabilities`` override the defaults.

    A tokenizer without a mask token (a decoder's) cannot do masked language modeling: ``ValueError``.
    """
    if getattr(tokenizer, "mask_token_id", None) is None:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(f"tokenizer {name!r} has no mask token: masked_lm needs an encoder's tokenizer")
    special = set(int(i) for i in tokenizer.all_special_ids)
    if tokenizer.pad_token_id is not None:
        special.add(int(tokenizer.pad_token_id))
    return MaskingConfig(
        mask_token_id=int(tokenizer.mask_token_id),
        vocab_size=len(tokenizer),
        special_ids=tuple(sorted(special)),
        **probabilities,
    )


class MaskingDraws(NamedTuple):
    """The random inputs of one masking: three uniforms in [0, 1) (float32, as torch's draws) and the
    candidate random token ids, each of the batch's shape."""

    select: np.ndarray
    replace: np.ndarray
    random: np.ndarray
    random_tokens: np.ndarray


def draw_masking(
    shape: tuple[int, ...], vocab_size: int, *, seed: int, step: int, stream: int = TRAIN_STREAM
) -> MaskingDraws:
    """The draws of masking ``step`` of ``stream``: NumPy's generator seeded by ``(seed, stream, step)``."""
    rng = np.random.default_rng([seed, stream, step])
    u = [rng.random(shape, dtype=np.float32) for _ in range(3)]
    return MaskingDraws(*u, rng.integers(0, vocab_size, shape, dtype=np.int64))


def no_mask_positions(
    input_ids: ArrayLike, attention_mask: ArrayLike | None, cfg: MaskingConfig
) -> np.ndarray:
    """Positions that are never chosen: special tokens and padding (``attention_mask`` 0)."""
    input_ids = np.asarray(input_ids)
    out = np.isin(input_ids, np.asarray(cfg.special_ids, input_ids.dtype))
    if attention_mask is not None:
        out |= np.asarray(attention_mask) == 0
    return out


def apply_masking(
    input_ids: ArrayLike, no_mask: ArrayLike, draws: MaskingDraws, cfg: MaskingConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Masked inputs and labels, from the draws: the decision rule of transformers' collator.

    Each ``torch.bernoulli(p)`` of transformers is ``uniform < p`` in float32; here the uniforms are
    given. Returns ``(inputs, labels)`` with ``labels`` ``-100`` at positions not chosen.
    """
    input_ids = np.asarray(input_ids)
    no_mask = np.asarray(no_mask, bool)
    chosen = (draws.select < np.float32(cfg.mlm_probability)) & ~no_mask
    labels = np.where(chosen, input_ids, IGNORE_INDEX).astype(input_ids.dtype)
    to_mask = chosen & (draws.replace < np.float32(cfg.mask_replace_prob))
    to_random = chosen & ~to_mask & (draws.random < np.float32(cfg.random_given_not_masked))
    inputs = np.where(to_mask, cfg.mask_token_id, input_ids)
    inputs = np.where(to_random, draws.random_tokens, inputs).astype(input_ids.dtype)
    return inputs, labels


def mask_tokens(
    input_ids: ArrayLike,
    attention_mask: ArrayLike | None,
    cfg: MaskingConfig,
    *,
    seed: int,
    step: int,
    stream: int = TRAIN_STREAM,
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)`` of masking ``step``: :func:`apply_masking` of :func:`draw_masking`."""
    input_ids = np.asarray(input_ids)
    draws = draw_masking(input_ids.shape, cfg.vocab_size, seed=seed, step=step, stream=stream)
    return apply_masking(input_ids, no_mask_positions(input_ids, attention_mask, cfg), draws, cfg)


def mask_batch(
    batch: Mapping[str, np.ndarray], cfg: MaskingConfig, *, seed: int, step: int, stream: int = TRAIN_STREAM
) -> dict[str, np.ndarray]:
    """``batch`` with ``input_ids`` masked and ``labels`` added (a training batch: ``stream`` 0).

    Example:
        >>> cfg = MaskingConfig(mask_token_id=4, vocab_size=30, special_ids=(0,))
        >>> b = mask_batch({"input_ids": np.full((2, 8), 9), "attention_mask": np.ones((2, 8))}, cfg,
        ...                seed=1, step=0)
        >>> sorted(b), b["labels"].shape
        (['attention_mask', 'input_ids', 'labels'], (2, 8))
    """
    inputs, labels = mask_tokens(
        batch["input_ids"], batch.get("attention_mask"), cfg, seed=seed, step=step, stream=stream
    )
    return {**batch, "input_ids": inputs, "labels": labels}


def mask_arrays(arrays: Mapping[str, np.ndarray], cfg: MaskingConfig, *, seed: int) -> dict[str, np.ndarray]:
    """The held-out split's one fixed masking (all rows at once, stream ``EVAL_STREAM``): the same
    masked tokens before and after training and for every evaluation batch size."""
    return mask_batch(arrays, cfg, seed=seed, step=0, stream=EVAL_STREAM)


def group_texts(
    texts: Iterable[str], tokenizer: Any, block_size: int, *, return_remainder: bool = False
) -> dict[str, np.ndarray]:
    """Token blocks for MLM as transformers' ``run_mlm.py`` makes them (``group_texts``): every text
    tokenized with its special tokens (``[CLS] ... [SEP]``), all concatenated, cut into full blocks of
    ``block_size`` (the remainder dropped unless ``return_remainder``, then right-padded).

    Example:
        >>> class Tok:  # a tokenizer stand-in: [CLS]=1, [SEP]=2, pad 0
        ...     pad_token_id = 0
        ...     def __call__(self, text):
        ...         return {"input_ids": [1, *[ord(c) for c in text], 2]}
        >>> group_texts(["ab", "c"], Tok(), 3)["input_ids"].tolist()
        [[1, 97, 98], [2, 1, 99]]
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
    n, rest = divmod(len(ids), block_size)
    if return_remainder and rest:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = ids + [pad] * (block_size - rest)
        mask = [1] * (n * block_size + rest) + [0] * (block_size - rest)
        n += 1
    else:
        ids = ids[: n * block_size]
        mask = [1] * len(ids)
    if n == 0:
        raise ValueError(f"only {len(ids)} tokens: fewer than one block of {block_size}")
    return {
        "input_ids": np.asarray(ids, np.int32).reshape(n, block_size),
        "attention_mask": np.asarray(mask, np.int32).reshape(n, block_size),
    }


# ----------------------------------------------------------------------------- metrics


def masked_lm_sums(
    logits: Float[Array, "B T V"], labels: Int[Array, "B T"], weight: Float[Array, " B"] | None = None
) -> dict[str, Array]:
    """Summed cross-entropy ``nll``, ``correct`` argmax predictions and ``count`` of labelled tokens
    (labels other than ``-100``; rows of ``weight`` 0, an evaluation batch's padding, excluded).
    Sums, so batches add up: see :func:`masked_lm_metrics`. Jit-able.

    Example:
        >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]]))
        >>> s = masked_lm_sums(logits, jnp.array([[0, -100]]))
        >>> round(float(s["nll"]), 4), int(s["correct"]), int(s["count"])  # -log 0.5
        (0.6931, 1, 1)
    """
    keep = labels != IGNORE_INDEX
    if weight is not None:
        keep = keep & (weight[:, None] > 0)
    safe = jnp.where(keep, labels, 0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    correct = (jnp.argmax(logits, axis=-1) == safe) & keep
    return {
        "nll": jnp.sum(jnp.where(keep, nll, 0.0)),
        "correct": jnp.sum(correct),
        "count": jnp.sum(keep),
    }


def masked_lm_loss(logits: Float[Array, "B T V"], labels: Int[Array, "B T"]) -> Array:
    """Mean cross-entropy over labelled tokens: transformers' MLM loss (``CrossEntropyLoss``, ignore
    index -100). A batch with no labelled token gives 0 (and zero gradients), not NaN."""
    s = masked_lm_sums(logits, labels)
    return s["nll"] / jnp.maximum(s["count"], 1)


def masked_lm_metrics(sums: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, float]:
    """``loss`` (mean masked-token cross-entropy), ``accuracy`` and ``perplexity`` (``exp(loss)``)
    from one or several :func:`masked_lm_sums` results (summed first: token-weighted over batches).

    Example:
        >>> m = masked_lm_metrics([{"nll": 2.0, "correct": 1, "count": 2}, {"nll": 1.0, "correct": 2, "count": 2}])
        >>> m["loss"], m["accuracy"], round(m["perplexity"], 4), m["tokens"]  # exp(0.75)
        (0.75, 0.75, 2.117, 4)
    """
    parts = [sums] if isinstance(sums, Mapping) else list(sums)
    nll = float(sum(float(jax.device_get(p["nll"])) for p in parts))
    correct = int(sum(int(jax.device_get(p["correct"])) for p in parts))
    count = int(sum(int(jax.device_get(p["count"])) for p in parts))
    if count == 0:
        raise ValueError("no masked token to evaluate: the held-out split has no labelled position")
    return {
        "loss": nll / count,
        "accuracy": correct / count,
        "perplexity": perplexity(nll, count),
        "tokens": count,
    }
