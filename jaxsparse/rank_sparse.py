"""Rank-sparse high-rank LoRA's forward: score the r rank components on the batch, compute only the top k.

A :class:`RankSparseDelta` is a :class:`~jaxsparse.delta.LowRankDelta` (``a`` (in, r), ``b`` (r, out),
``scale``) that also carries ``importance`` (r,), the running mean of the components' contextual
scores over the training steps so far. Stored, it is plain LoRA: evaluation, merge and export read
``a`` and ``b`` whole. During a training step the method's ``forward_view`` swaps it for a
:class:`RankSparseView`, whose :meth:`~RankSparseView.matmul_beside` (called by
:func:`jaxsparse.factored.matmul` inside the model's linear layer) does, per module:

1. **contextual score** of component ``j`` on a fixed-size token subsample ``x_s`` (at most
   ``score_tokens`` rows of the flattened input, evenly strided; all of them when the batch is
   smaller), under ``stop_gradient``::

       c_j = ||(x_s a)[:, j]|| * (||b[j, :]|| + max_i ||b[i, :]|| + 1e-12),   c_hat = c / sum(c)

   The ``max ||b||`` floor keeps components whose ``b`` row is still zero (all of them at PEFT's
   ``B = 0`` start) in the competition by their activation: a trained row can at most double a
   component's score. With the bare product ``||(x a)_j|| * ||b_j||`` every score is 0 at the
   start, and from then on only the first step's k components have a non-zero ``b``: the selection
   would freeze onto them for ever (a static LoRA of rank k; measured, and what a smaller floor
   such as ``mean ||b||`` still does at density 0.1);
2. **mix** with the accumulated importance: ``s = (1 - lambda) * c_hat + lambda * importance``;
3. **select** the top ``k`` of ``s`` (``jax.lax.top_k``; k static, so shapes are static under
   ``jit``), **gather** ``a[:, idx]`` (in, k) and ``b[idx, :]`` (k, out), and compute
   ``x W + (x a_idx) b_idx * scale``: the adapter's forward and backward are k-wide, and the
   gradient of every component not selected is exactly zero (the gather's transpose scatters into
   zeros).

The scores must leave the forward to update ``importance``, but a linear layer returns only its
output. They leave through the gradient: ``importance`` is a *probe* leaf (``probe_fields``, see
:mod:`jaxsparse.train`), passed through an identity with a custom VJP whose cotangent for it is
``c_hat``. So ``jax.grad`` with respect to ``importance`` yields this step's normalised contextual
scores (summed if a layer runs twice), which the method's ``record_probes`` hook folds into the
running mean. The cost of scoring (``score_tokens x in x r`` per module) is what the token
subsample bounds; it is independent of the batch size.

Example:
    >>> import jax, jax.numpy as jnp
    >>> d = RankSparseDelta(a=jnp.eye(4), b=jnp.eye(4), importance=jnp.zeros(4), scale=1.0)
    >>> view = RankSparseView.of(d, k=2, importance_lambda=0.0, score_tokens=8)
    >>> x = jnp.array([[0.0, 3.0, 0.0, 1.0]])
    >>> select(view, x).tolist()  # components 1 and 3 are excited by x
    [1, 3]
    >>> view.matmul_beside(x, jnp.zeros((4, 4)), None).tolist()
    [[0.0, 3.0, 0.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxsparse.delta_leaves import LowRankDelta, pytree_dataclass, static
from jaxsparse.factored import lora_dropout

# Tokens of a batch the contextual score is computed on (per module and step), by default.
DEFAULT_SCORE_TOKENS = 64
_B_FLOOR_EPS = 1e-12


@pytree_dataclass
class RankSparseDelta(LowRankDelta):
    """LoRA factors plus ``importance`` (r,): the running mean of the step-normalised contextual scores.

    Everything that reads a :class:`~jaxsparse.delta.LowRankDelta` (forward, merge, PEFT export)
    reads it as one; ``importance`` is training state (checkpointed) and the probe through which
    each step's scores come out of the forward pass (:mod:`jaxsparse.train`'s ``probe_fields``).
    """

    importance: Float[Array, " r"] | None = None

    probe_fields: ClassVar[tuple[str, ...]] = ("importance",)


@pytree_dataclass
class RankSparseView:
    """A training step's view of a :class:`RankSparseDelta`: computes only ``k`` of its ``r`` components.

    ``dropout_key`` / ``dropout_rate`` are LoRA dropout's (set by ``LoraConfig.forward_view``): the
    adapter's input is dropped as PEFT does, the frozen weight's is not; the score uses the undropped
    input.
    """

    a: Float[Array, "fan_in r"]
    b: Float[Array, "r fan_out"]
    importance: Float[Array, " r"]
    dropout_key: Array | None = None
    scale: float = static(1.0)
    k: int = static(1)
    importance_lambda: float = static(0.0)
    score_tokens: int = static(DEFAULT_SCORE_TOKENS)
    dropout_rate: float = static(0.0)

    @classmethod
    def of(
        cls, delta: RankSparseDelta, *, k: int, importance_lambda: float, score_tokens: int
    ) -> RankSparseView:
        """The view of ``delta`` selecting ``k`` components per step."""
        if delta.mask is not None or delta.rank_mask is not None:
            raise ValueError("rank-sparse LoRA does not combine with an entry mask or a rank mask")
        if not 0 < k <= delta.rank:
            raise ValueError(f"rank-sparse LoRA: k={k} components per step is outside 1..r={delta.rank}")
        importance = delta.importance if delta.importance is not None else jnp.zeros(delta.rank, jnp.float32)
        return cls(
            a=delta.a,
            b=delta.b,
            importance=importance,
            dropout_key=delta.dropout_key,
            scale=delta.scale,
            k=int(k),
            importance_lambda=float(importance_lambda),
            score_tokens=int(score_tokens),
            dropout_rate=float(delta.dropout_rate),
        )

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def apply(self, weight: Array) -> Array:
        raise ValueError(
            "rank-sparse LoRA selects its components inside the linear layer from the layer's input: "
            "train it through the factored path (jaxsparse.train with factored=True, as jaxsparse.trainer does)"
        )

    def matmul_beside(self, x: Array, base: Array, precision: Any) -> Array:
        """``x @ (base + a_idx b_idx scale)`` with the step's top-k components (the factored hook)."""
        scores = contextual_scores(x, self.a, self.b, self.score_tokens)
        idx = _top_k(mix(scores, jax.lax.stop_gradient(self.importance), self.importance_lambda), self.k)
        a_sel = jnp.take(self.a, idx, axis=1).astype(x.dtype)
        b_sel = jnp.take(self.b, idx, axis=0).astype(x.dtype)
        dot = _dot_fn(precision)
        h = dot(lora_dropout(x, self), a_sel)
        h = _report(h, self.importance, scores)
        return dot(x, base) + dot(h, b_sel) * jnp.asarray(self.scale, x.dtype)


def score_rows(num_tokens: int, score_tokens: int) -> np.ndarray:
    """The rows of the flattened (tokens, in) input the score reads: ``score_tokens`` evenly strided
    ones (static), or all of them when there are fewer.

    Example:
        >>> score_rows(10, 4).tolist(), score_rows(3, 4).tolist()
        ([0, 2, 5, 7], [0, 1, 2])
    """
    if num_tokens <= score_tokens:
        return np.arange(num_tokens)
    return np.arange(score_tokens) * num_tokens // score_tokens


def contextual_scores(
    x: Float[Array, "... fan_in"],
    a: Float[Array, "fan_in r"],
    b: Float[Array, "r fan_out"],
    score_tokens: int,
) -> Float[Array, " r"]:
    """The normalised contextual scores ``c_hat`` (r,) of the module docstring, without gradient."""
    x, a, b = (jax.lax.stop_gradient(t) for t in (x, a, b))
    flat = x.reshape(-1, x.shape[-1])
    rows = score_rows(flat.shape[0], score_tokens)
    sample = flat if rows.shape[0] == flat.shape[0] else flat[rows]
    h = jnp.dot(sample.astype(jnp.float32), a.astype(jnp.float32))
    activation = jnp.sqrt(jnp.sum(h * h, axis=0))
    b_norm = jnp.sqrt(jnp.sum(jnp.square(b.astype(jnp.float32)), axis=1))
    c = activation * (b_norm + jnp.max(b_norm) + _B_FLOOR_EPS)
    return c / jnp.maximum(jnp.sum(c), jnp.finfo(jnp.float32).tiny)


def mix(scores: Array, importance: Array, importance_lambda: float) -> Array:
    """The selection score: ``(1 - lambda) * scores + lambda * importance``."""
    return (1.0 - importance_lambda) * scores + importance_lambda * importance.astype(jnp.float32)


def _top_k(score: Array, k: int) -> Int[Array, " k"]:
    return jax.lax.top_k(score, k)[1]


def select(view: RankSparseView, x: Array) -> Int[Array, " k"]:
    """The component indices ``view`` computes on input ``x`` this step (sorted ascending)."""
    scores = contextual_scores(x, view.a, view.b, view.score_tokens)
    return jnp.sort(_top_k(mix(scores, view.importance, view.importance_lambda), view.k))


def num_selected(target_density: float, r: int) -> int:
    """``ceil(target_density * r)`` components per step (at least 1, at most r).

    Example:
        >>> num_selected(0.08, 1024), num_selected(0.08, 8)
        (82, 1)
    """
    # Round first so that 0.08 * 1000 = 80.00000000000001 does not become 81.
    return max(1, min(r, math.ceil(round(target_density * r, 9))))


def _dot_fn(precision: Any):
    def dot(x: Array, w: Array) -> Array:
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)

    return dot


@jax.custom_vjp
def _report(h: Array, probe: Array, scores: Array) -> Array:
    """``h`` unchanged; the cotangent of ``probe`` is ``scores`` (how the scores leave the forward)."""
    return h


def _report_fwd(h, probe, scores):
    return h, scores


def _report_bwd(scores, g):
    return g, scores, jnp.zeros_like(scores)


_report.defvjp(_report_fwd, _report_bwd)


def with_importance(delta: LowRankDelta, importance: Array | None = None) -> RankSparseDelta:
    """``delta`` as a :class:`RankSparseDelta` with ``importance`` (zeros by default)."""
    fields = {f.name: getattr(delta, f.name) for f in dataclasses.fields(LowRankDelta)}
    if importance is None:
        importance = jnp.zeros(delta.rank, jnp.float32)
    return RankSparseDelta(**fields, importance=jnp.asarray(importance, jnp.float32))
