"""Index selection: which entries of a weight an adapter trains.

Every strategy returns **sorted, unique int32 flat indices** into the weight in its own layout
(for a Flax kernel, the (in, out) layout), ready for :class:`jaxsparse.delta.SparseDelta`.
Random strategies are deterministic for a given PRNG key; :func:`path_key` folds a parameter path
into a key so that every layer draws a different, reproducible set.

Example:
    >>> import jax, jax.numpy as jnp
    >>> key = path_key(jax.random.key(0), "model.layers.0.self_attn.q_proj.kernel")
    >>> idx = random_density(key, (8, 16), 0.25)
    >>> idx.shape, idx.dtype.name
    ((32,), 'int32')
    >>> bool(jnp.all(jnp.diff(idx) > 0))
    True
    >>> shira_count((8, 16), r=1)
    24
    >>> top_magnitude(jnp.array([[0.1, -3.0], [2.0, 0.0]]), 2).tolist()
    [1, 2]
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from jaxsparse import tree as tree_lib

PyTree = Any
Shape = Sequence[int]

# Above this fraction of the weight, drawing with replacement wastes more than it saves: shuffle instead.
_DENSE_FRACTION = 0.25


def path_key(key: Array, path: str) -> Array:
    """``key`` with a stable hash of ``path`` folded in: distinct per layer, identical across runs."""
    digest = hashlib.sha256(path.encode()).digest()
    return jax.random.fold_in(key, int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)


def _numel(shape: Shape) -> int:
    return math.prod(int(s) for s in shape)


def _index_dtype(numel: int) -> Any:
    if numel < 2**31:
        return jnp.int32
    if not jax.config.jax_enable_x64:
        raise ValueError(
            f"a weight with {numel} entries needs int64 indices: enable jax_enable_x64 "
            "(jax.config.update('jax_enable_x64', True))"
        )
    return jnp.int64


def _check_count(k: int, numel: int, what: str) -> None:
    if not 1 <= k <= numel:
        raise ValueError(f"{what}: cannot choose k={k} entries from a weight of {numel} entries")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _shuffle_choice(key: Array, numel: int, k: int) -> Array:
    # Uniform random keys, stable argsort: a uniform k-subset in O(numel) memory.
    bits = jax.random.bits(key, (numel,), jnp.uint32)
    return jnp.sort(jnp.argsort(bits, stable=True)[:k])


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _oversample_choice(key: Array, numel: int, draws: int, k: int) -> tuple[Array, Array]:
    # Draw with replacement, keep the distinct values, then a uniform k-subset of those. The set of
    # distinct draws is exchangeable over [0, numel), so given its size it is a uniform subset, and a
    # uniform k-subset of it is a uniform k-subset of [0, numel): exact, in O(k) time and memory.
    draw_key, pick_key = jax.random.split(key)
    sampled = jnp.sort(jax.random.randint(draw_key, (draws,), 0, numel, dtype=jnp.int32))
    first = jnp.concatenate([jnp.ones((1,), bool), sampled[1:] != sampled[:-1]])
    priority = jnp.where(first, jax.random.uniform(pick_key, (draws,)), -1.0)
    _, pos = jax.lax.top_k(priority, k)
    return jnp.sort(sampled[pos]), first.sum()


def random_count(key: Array, shape: Shape, k: int) -> Int[Array, " k"]:
    """``k`` distinct flat positions of a weight of ``shape``, uniformly at random, sorted.

    Like ``jax.random.choice(key, numel, (k,), replace=False)`` but O(k) time and memory when
    ``k`` is a small fraction of the weight (the usual case), O(numel) otherwise.

    Example:
        >>> import jax
        >>> random_count(jax.random.key(1), (4, 4), 3).shape
        (3,)
    """
    numel = _numel(shape)
    _check_count(int(k), numel, f"random_count(shape={tuple(shape)})")
    dtype = _index_dtype(numel)
    k = int(k)
    if k >= _DENSE_FRACTION * numel or dtype != jnp.int32:
        return _shuffle_choice(key, numel, k).astype(dtype)
    # Expected repeats among d draws are about d^2 / (2 numel); a margin of 4x that plus 32 makes a
    # retry vanishingly rare, and a retry (with a derived key) keeps the result deterministic.
    expected_repeats = k * k / (2 * numel)
    draws = min(numel, k + math.ceil(4 * expected_repeats) + 32)
    for attempt in range(64):
        attempt_key = key if attempt == 0 else jax.random.fold_in(key, attempt)
        idx, distinct = _oversample_choice(attempt_key, numel, draws, k)
        if int(distinct) >= k:
            return idx
        draws = min(numel, 2 * draws)
    return _shuffle_choice(key, numel, k)


def density_count(shape: Shape, density: float) -> int:
    """SpaRTA's count: ``round(density * numel)`` entries, at least 1."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, round(density * _numel(shape)))


def random_density(key: Array, shape: Shape, density: float) -> Int[Array, " k"]:
    """A uniform random fraction ``density`` of the entries (k = ``round(density * numel)``, >= 1)."""
    return random_count(key, shape, density_count(shape, density))


def shira_count(shape: Shape, r: int, *, path: str = "<weight>") -> int:
    """SHiRA's count ``r * (m + n)`` for a 2-D weight; ``ValueError`` naming ``path`` if it exceeds m*n."""
    if len(shape) != 2:
        raise ValueError(f"{path}: SHiRA needs a 2-D weight, got shape {tuple(shape)}")
    if r < 1:
        raise ValueError(f"{path}: SHiRA r must be >= 1, got {r}")
    m, n = (int(s) for s in shape)
    k = r * (m + n)
    if k > m * n:
        raise ValueError(
            f"{path}: SHiRA r={r} asks for r*(m+n)={k} entries but the {m}x{n} weight has only {m * n}; "
            f"use r <= {(m * n) // (m + n)}"
        )
    return k


@functools.partial(jax.jit, static_argnums=1)
def _top_k_flat(scores: Array, k: int) -> Array:
    _, idx = jax.lax.top_k(scores.reshape(-1).astype(jnp.float32), k)
    return jnp.sort(idx)


def top_score(scores: Array, k: int, *, path: str = "<weight>") -> Int[Array, " k"]:
    """Flat positions of the ``k`` largest ``scores`` (ties broken by lower position), sorted.

    Example:
        >>> import jax.numpy as jnp
        >>> top_score(jnp.array([[1.0, 5.0], [3.0, 2.0]]), 2).tolist()
        [1, 2]
    """
    numel = int(scores.size)
    _check_count(int(k), numel, path)
    if not bool(jnp.all(jnp.isfinite(scores))):
        raise ValueError(f"{path}: scores contain NaN or inf; cannot rank entries")
    return _top_k_flat(scores, int(k)).astype(_index_dtype(numel))


def top_magnitude(weight: Array, k: int, *, path: str = "<weight>") -> Int[Array, " k"]:
    """The ``k`` entries of largest ``|weight|``, sorted flat positions."""
    return top_score(jnp.abs(weight), k, path=path)


def accumulate_grad_scores(
    grad_fn: Callable[[PyTree, Any], PyTree],
    params: PyTree,
    batches: Iterable[Any],
    paths: Sequence[str],
) -> dict[str, Array]:
    """SHiRA-grad / SNIP-like scores: ``sum over batches of |d loss / d w|`` at each of ``paths``.

    ``grad_fn(params, batch)`` returns gradients with the structure of ``params`` (e.g.
    ``jax.grad(loss_fn)``). The scores are float32 arrays shaped like the weights; rank them with
    :func:`top_score`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"lin": {"kernel": jnp.ones((2, 2))}}
        >>> loss = lambda p, x: jnp.sum(x @ p["lin"]["kernel"])
        >>> s = accumulate_grad_scores(jax.grad(loss), params, [jnp.array([[1.0, -2.0]])], ["lin.kernel"])
        >>> s["lin.kernel"].tolist()
        [[1.0, 1.0], [2.0, 2.0]]
    """
    scores: dict[str, Array] | None = None
    for batch in batches:
        grads = grad_fn(params, batch)
        step: dict[str, Array] = {}
        for p in paths:
            g = tree_lib.get_leaf(grads, p)
            want = tree_lib.get_leaf(params, p).shape
            if tuple(g.shape) != tuple(want):
                raise ValueError(
                    f"{p}: grad_fn returned a gradient of shape {tuple(g.shape)}, expected {want}"
                )
            step[p] = jnp.abs(g).astype(jnp.float32)
        scores = step if scores is None else {p: scores[p] + step[p] for p in paths}
    if scores is None:
        raise ValueError("accumulate_grad_scores: `batches` yielded no batch")
    return scores


def from_mask_fn(
    fn: Callable[[Array, int, Array], Any],
    weight: Array,
    r: int,
    key: Array,
    *,
    path: str,
) -> Int[Array, " k"]:
    """Indices from a user mask ``fn(weight, r, key) -> mask`` (bool, or numeric 0/1, weight-shaped).

    The mask must select exactly ``r * (m + n)`` entries (PEFT SHiRA's contract); each violation
    raises ``ValueError`` naming ``path``. The weight is passed in its own layout (Flax (in, out)).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> first_rows = lambda w, r, key: jnp.arange(w.size).reshape(w.shape) < r * sum(w.shape)
        >>> from_mask_fn(first_rows, jnp.zeros((4, 4)), 1, jax.random.key(0), path="lin.kernel").tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    expected = shira_count(weight.shape, r, path=path)
    mask = np.asarray(fn(weight, r, key))
    if mask.shape != tuple(weight.shape):
        raise ValueError(
            f"{path}: mask_fn returned shape {mask.shape}, expected the weight's {tuple(weight.shape)}"
        )
    if mask.dtype != np.bool_:
        if not (np.issubdtype(mask.dtype, np.number) and np.all((mask == 0) | (mask == 1))):
            raise ValueError(
                f"{path}: mask_fn must return a bool or 0/1 mask, got dtype {mask.dtype} with other values"
            )
        mask = mask == 1
    count = int(mask.sum())
    if count != expected:
        raise ValueError(f"{path}: mask_fn selected {count} entries, expected exactly r*(m+n) = {expected}")
    return jnp.asarray(np.flatnonzero(mask), dtype=_index_dtype(mask.size))
