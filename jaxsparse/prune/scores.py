"""Pruning scores: how much each weight matters, in the kernel's own (in, out) layout.

- Magnitude: ``|W|``.
- Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, the weight times the L2 norm over calibration
  tokens of its input feature ``j``. In the PyTorch (out, in) layout that is row ``i``, column
  ``j``; our Flax kernels are (in, out), so the norm scales the kernel's *rows* (axis 0).

Both are compared within one output (a PyTorch row, a column of our kernel) by
:mod:`jaxsparse.prune.patterns`.

Example:
    >>> import jax.numpy as jnp
    >>> kernel = jnp.array([[1.0, -2.0], [3.0, 0.5]])  # (in=2, out=2)
    >>> wanda_score(kernel, sq_norm=jnp.array([4.0, 1.0])).tolist()
    [[2.0, 4.0], [3.0, 0.5]]
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

METHODS = ("magnitude", "wanda")


def magnitude_score(kernel: Float[Array, "i o"]) -> Float[Array, "i o"]:
    """``|W|`` in float32.

    Example:
        >>> magnitude_score(jnp.array([[-1.5, 2.0]])).tolist()
        [[1.5, 2.0]]
    """
    return jnp.abs(kernel.astype(jnp.float32))


def wanda_score(kernel: Float[Array, "i o"], sq_norm: Float[Array, " i"]) -> Float[Array, "i o"]:
    """Wanda's ``|W_ij| * ||X_j||_2`` for a Flax kernel (in, out) and the per-input-feature squared norm
    ``sum_t X[t, j]**2`` (:attr:`jaxsparse.calibration.LinearStats.sq_norm`)."""
    if sq_norm.shape != kernel.shape[:1]:
        raise ValueError(
            f"sq_norm shape {sq_norm.shape} does not match the kernel's input width {kernel.shape[0]}"
        )
    return magnitude_score(kernel) * jnp.sqrt(sq_norm.astype(jnp.float32))[:, None]
