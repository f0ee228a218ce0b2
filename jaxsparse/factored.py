"""Deltas applied beside the frozen weight inside linear layers, instead of merged into it.

:func:`jaxsparse.delta.apply` forms each targeted weight ``W + delta`` densely; autodiff then builds
the dense weight gradient ``x^T dy`` and keeps only what the delta needs of it. With
``apply(params, adapter, factored=True)`` every delta on a 2-D ``kernel`` leaf becomes an
:class:`AdaptedKernel` (frozen base plus delta), and the model's linear layers
(:func:`jaxsparse.models.layers.linear`) compute with it through :func:`matmul`:

- a :class:`~jaxsparse.delta.LowRankDelta` without an element mask runs as PEFT's LoRA layer does,
  ``x @ W + ((x @ a) @ b) * scale``: the dense update ``a @ b`` is never formed, and the gradients
  of ``a`` and ``b`` come from ``(in, r)`` and ``(r, out)`` products instead of an ``(in, out)`` one;
  a delta carrying a ``dropout_key`` (LoRA dropout, set on the training step's view only) drops the
  low-rank branch's input, ``x W + ((dropout(x) @ a) @ b) * scale``, as PEFT does (:func:`lora_dropout`);
- a :class:`~jaxsparse.delta.SparseDelta` whose density ``k / numel`` is at most
  ``sampled_max_density`` takes the *sampled product* gradient: the gradient of value ``j`` at
  kernel entry ``(i, o)`` is ``sum_t x[t, i] * dy[t, o]``, computed from the k gathered rows of
  ``x^T`` and ``dy^T`` instead of the whole ``x^T dy``. Gathers run far below matmul speed, so this
  only wins at low density (measured crossover on a 2-core CPU: 3-4%, see
  benchmarks/BENCHMARKS.md); denser deltas keep the dense gradient, which is exact either way.
  Without a ``sampled_max_density`` the threshold is the backend's
  (:func:`default_sampled_max_density`): 3% on CPU, where it was measured, and 0 (the dense
  gradient) on GPU and TPU, whose matmul units outrun a gather by much more.
  The frozen weight's own gradient is formed only if the caller differentiates it;
- anything else (a masked low-rank delta, SparsePEFT) is applied densely, as before.

Only models whose every ``kernel`` leaf is read by :func:`matmul` may take factored params: the
whole jaxsparse model zoo does. A hand-written model that reads ``params[...]["kernel"]`` directly
should use the default ``factored=False``.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxsparse.delta import LowRankDelta
    >>> w = jnp.eye(2)
    >>> d = LowRankDelta(a=jnp.ones((2, 1)), b=jnp.ones((1, 2)), scale=0.5)
    >>> matmul(jnp.array([[1.0, 2.0]]), AdaptedKernel(w, d)).tolist()
    [[2.5, 3.5]]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxsparse.delta_leaves import LowRankDelta, SparseDelta, pytree_dataclass, static

# Density at or below which a sparse delta's gradient is the sampled product on CPU, where it was
# measured (benchmarks/BENCHMARKS.md 2b, 2c, 2f: 0 and 5% are both slower in the step).
SAMPLED_MAX_DENSITY = 0.03

# The same on GPU/TPU until bench_weight_grad.py measures it there: the dense gradient. By the roofline
# (BENCHMARKS.md 2g) the sampled product reads 8 bytes per entry and token against 2 matmul FLOPs per
# weight entry and token, so it loses to tensor cores above ~0.2-1% density, and gathers run well
# below peak bandwidth.
ACCELERATOR_SAMPLED_MAX_DENSITY = 0.0


def default_sampled_max_density(backend: str | None = None) -> float:
    """The sampled-product threshold for ``backend`` (default: ``jax.default_backend()``).

    Example:
        >>> default_sampled_max_density("cpu"), default_sampled_max_density("gpu")
        (0.03, 0.0)
    """
    backend = jax.default_backend() if backend is None else backend
    return SAMPLED_MAX_DENSITY if backend == "cpu" else ACCELERATOR_SAMPLED_MAX_DENSITY


# Elements of the (rows, tokens) block the sampled product gathers at a time: blocks this small stay
# in cache and run 2-7x faster on a 2-core CPU than one pass over all k rows (which also bounds memory).
_SAMPLED_BLOCK_ELEMENTS = 1 << 19


@pytree_dataclass
class AdaptedKernel:
    """A frozen Flax kernel ``base`` (in, out) with its ``delta``, applied by :func:`matmul`.

    ``sampled_grad`` (static) chooses the sampled-product gradient for a :class:`SparseDelta`.
    """

    base: Float[Array, "fan_in fan_out"]
    delta: Any
    sampled_grad: bool = static(False)

    def dense(self) -> Array:
        """The effective kernel ``base + delta``, formed densely."""
        return self.delta.apply(self.base)


def adapt(base: Array, delta: Any, *, sampled_max_density: float | None = None) -> AdaptedKernel:
    """Pair a kernel with its delta, choosing the sparse gradient path by density.

    ``sampled_max_density=None`` takes :func:`default_sampled_max_density` of the default backend.

    Example:
        >>> from jaxsparse.delta import SparseDelta
        >>> d = SparseDelta(jnp.array([0], jnp.int32), jnp.array([1.0]), (100, 100))
        >>> adapt(jnp.zeros((100, 100)), d, sampled_max_density=0.03).sampled_grad
        True
        >>> adapt(jnp.zeros((100, 100)), d, sampled_max_density=0).sampled_grad
        False
    """
    if sampled_max_density is None:
        sampled_max_density = default_sampled_max_density()
    sampled = isinstance(delta, SparseDelta) and delta.k <= sampled_max_density * int(np.prod(base.shape))
    return AdaptedKernel(base=base, delta=delta, sampled_grad=bool(sampled))


def matmul(
    x: Float[Array, "... fan_in"], kernel: Any, *, precision: Any = None
) -> Float[Array, "... fan_out"]:
    """``x @ kernel`` for a plain array or an :class:`AdaptedKernel` (contracting ``x``'s last axis)."""
    if not isinstance(kernel, AdaptedKernel):
        return _dot(x, kernel, precision)
    delta = kernel.delta
    if hasattr(delta, "matmul_beside"):  # a delta that computes x @ (base + delta) itself (jaxsparse.serve)
        return delta.matmul_beside(x, kernel.base, precision)
    if isinstance(delta, LowRankDelta) and delta.mask is None:
        a = delta.a if delta.rank_mask is None else delta.a * delta.rank_mask.astype(delta.a.dtype)
        x_in = lora_dropout(x, delta)
        low_rank = _dot(_dot(x_in, a.astype(x.dtype), precision), delta.b.astype(x.dtype), precision)
        return _dot(x, kernel.base, precision) + low_rank * jnp.asarray(delta.scale, x.dtype)
    if isinstance(delta, LowRankDelta) and delta.dropout_key is not None:
        # A masked update (SparsePEFT) is formed densely; the dropout still reaches only its input.
        undropped = dataclasses.replace(delta, dropout_key=None)
        update = undropped.product().astype(x.dtype)
        return _dot(x, kernel.base, precision) + _dot(lora_dropout(x, delta), update, precision)
    if isinstance(delta, SparseDelta) and kernel.sampled_grad and precision is None:
        # The custom gradient uses the default precision; an explicit precision takes the dense path.
        return _sparse_matmul(x, kernel.base, delta.indices, delta.values)
    return _dot(x, kernel.dense(), precision)


def lora_dropout(x: Float[Array, "... fan_in"], delta: LowRankDelta) -> Float[Array, "... fan_in"]:
    """The adapter's input under PEFT's LoRA dropout: ``x`` with each entry zeroed with probability
    ``delta.dropout_rate`` and the rest scaled by ``1 / (1 - rate)`` (``torch.nn.Dropout``), drawn from
    ``delta.dropout_key``; ``x`` itself when the delta carries no key (evaluation, merge) or rate 0.

    Example:
        >>> import jax
        >>> d = LowRankDelta(jnp.ones((4, 1)), jnp.ones((1, 2)), dropout_key=jax.random.PRNGKey(0), dropout_rate=0.5)
        >>> sorted(set(lora_dropout(jnp.ones((2, 4)), d).reshape(-1).tolist())) in ([0.0, 2.0], [0.0], [2.0])
        True
    """
    if delta.dropout_key is None or delta.dropout_rate == 0:
        return x
    keep = jax.random.bernoulli(delta.dropout_key, 1.0 - delta.dropout_rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - delta.dropout_rate, x.dtype), jnp.zeros((), x.dtype))


def _dot(x: Array, w: Array, precision: Any) -> Array:
    # Flatten the leading (batch, time) axes first: the gradient of a kernel (or of LoRA's ``a``/``b``)
    # then contracts one token axis, not two. XLA's CPU backend canonicalises a two-axis contraction by
    # physically transposing the (tokens, out) cotangent, fused with whatever produced it (for
    # MiniLM's FFN: the GELU backward, strided). Removing it took the MiniLM LoRA step from 1.79 s
    # to 1.3 s (benchmarks/BENCHMARKS.md, section 2c). Same products over the same tokens.
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def sampled_product(
    x: Float[Array, "... fan_in"], dy: Float[Array, "... fan_out"], indices: Int[Array, " k"]
) -> Float[Array, " k"]:
    """``(x^T dy).flat[indices]`` without forming ``x^T dy``: one length-T dot per index.

    The gathered rows are processed in blocks, so memory stays bounded for long batches.

    Example:
        >>> x, dy = jnp.arange(6.0).reshape(3, 2), jnp.ones((3, 2))
        >>> sampled_product(x, dy, jnp.array([0, 3], jnp.int32)).tolist(), (x.T @ dy).reshape(-1)[jnp.array([0, 3])].tolist()
        ([6.0, 9.0], [6.0, 9.0])
    """
    fan_in, fan_out = x.shape[-1], dy.shape[-1]
    xt = x.reshape(-1, fan_in).T.astype(jnp.float32)  # (in, T): gathering rows reads contiguous memory
    dyt = dy.reshape(-1, fan_out).T.astype(jnp.float32)
    rows, cols = indices // fan_out, indices % fan_out
    k, tokens = indices.shape[0], xt.shape[1]
    block = max(1, min(k, _SAMPLED_BLOCK_ELEMENTS // max(tokens, 1)))
    if block >= k:
        return jnp.sum(xt[rows] * dyt[cols], axis=1)
    pad = (-k) % block
    rows = jnp.pad(rows, (0, pad)).reshape(-1, block)
    cols = jnp.pad(cols, (0, pad)).reshape(-1, block)
    out = jax.lax.map(lambda rc: jnp.sum(xt[rc[0]] * dyt[rc[1]], axis=1), (rows, cols))
    return out.reshape(-1)[:k]


@jax.custom_vjp
def _sparse_matmul(x: Array, base: Array, indices: Array, values: Array) -> Array:
    return _dot(x, SparseDelta(indices, values, tuple(base.shape)).apply(base), None)


def _sparse_matmul_fwd(x, base, indices, values):
    # symbolic_zeros: each argument arrives wrapped with whether it is being differentiated, so the
    # dense x^T dy is formed only when the caller really asks for the base weight's gradient.
    weight = SparseDelta(indices.value, values.value, tuple(base.value.shape)).apply(base.value)
    residuals = (x.value, weight, indices.value, values.value, x.perturbed, base.perturbed, values.perturbed)
    return _dot(x.value, weight, None), residuals


def _sparse_matmul_bwd(residuals, dy):
    x, weight, indices, values, x_perturbed, base_perturbed, values_perturbed = residuals
    dx = (
        jax.lax.dot_general(dy, weight, (((dy.ndim - 1,), (1,)), ((), ()))).astype(x.dtype)
        if x_perturbed
        else None
    )
    dbase = None
    if base_perturbed:
        dbase = jax.lax.dot_general(
            x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ()))
        ).astype(weight.dtype)
    dvalues = sampled_product(x, dy, indices).astype(values.dtype) if values_perturbed else None
    return dx, dbase, None, dvalues


_sparse_matmul.defvjp(_sparse_matmul_fwd, _sparse_matmul_bwd, symbolic_zeros=True)
