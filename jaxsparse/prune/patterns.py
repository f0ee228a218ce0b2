"""Sparsity patterns: which weights to zero given a score, per output row.

"Row" means a PyTorch output row (``weight[i, :]``, all the inputs of output ``i``): a column of
our Flax (in, out) kernel. Both patterns choose by the score within that row:

- ``unstructured``: the ``floor(sparsity * in)`` lowest-scoring weights of each row are zeroed,
  exactly that many per row (as Wanda's reference implementation does).
- ``N:M`` (``2:4``, ``4:8``): in every group of ``M`` consecutive inputs of a row, only the ``N``
  highest-scoring weights are kept (at most ``N`` non-zeros per group); sparsity is ``1 - N/M``.

Ties are broken toward the lower input index being pruned first (a stable sort), so masks are
deterministic.

Example:
    >>> import jax.numpy as jnp
    >>> score = jnp.array([[1.0], [4.0], [2.0], [3.0]])  # in=4, out=1
    >>> keep_mask(score, Pattern.parse("2:4")).ravel().tolist()
    [False, True, False, True]
    >>> keep_mask(score, Pattern.parse("unstructured"), sparsity=0.25).ravel().tolist()
    [False, True, True, True]
"""

from __future__ import annotations

import dataclasses
import re
from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

#: The patterns the command line offers (any ``N:M`` with 0 < N < M is accepted by :meth:`Pattern.parse`).
CLI_PATTERNS = ("unstructured", "2:4", "4:8")


@dataclasses.dataclass(frozen=True)
class Pattern:
    """``unstructured`` (``n = m = 0``) or ``N:M`` (at most ``n`` non-zeros per ``m`` consecutive inputs)."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (``1 - N/M``); ``None`` for unstructured."""
        return 1.0 - self.n / self.m if self.structured else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """``"unstructured"`` or ``"N:M"`` with ``0 < N < M``; ``ValueError`` otherwise.

        Example:
            >>> Pattern.parse("4:8"), Pattern.parse("4:8").sparsity
            (Pattern(n=4, m=8), 0.5)
        """
        if text == "unstructured":
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"pattern {text!r}: expected 'unstructured' or 'N:M' such as '2:4'")
        n, m = int(match.group(1)), int(match.group(2))
        if n > m:
            raise ValueError(f"pattern {text!r}: N ({n}) must not exceed M ({m})")
        if not 0 < n < m:
            raise ValueError(
                f"pattern {text!r}: need 0 < N < M (N={n} keeps {'all' if n == m else 'no'} weights)"
            )
        return cls(n, m)

    def check_width(self, in_features: int, where: str = "layer") -> None:
        """``ValueError`` unless ``M`` divides the input width (N:M groups must tile each row)."""
        if self.structured and in_features % self.m:
            raise ValueError(
                f"{where}: pattern {self}: M={self.m} does not divide the input width {in_features}"
            )


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float in [0, 1); ``ValueError`` otherwise.

    Example:
        >>> check_sparsity(0.5)
        0.5
    """
    value = float(sparsity)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity {sparsity} must lie in [0, 1)")
    return value


def pruned_per_row(in_features: int, sparsity: float) -> int:
    """How many weights an unstructured mask zeroes in each row: ``floor(sparsity * in)``.

    Computed in float64 with a small tolerance so ``0.3 * 10`` gives 3, not 2.

    Example:
        >>> pruned_per_row(10, 0.3), pruned_per_row(7, 0.5)
        (3, 3)
    """
    return int(sparsity * in_features + 1e-9)


def _rank_in_group(groups: jax.Array) -> jax.Array:
    """Rank (0 = lowest) of each score within its group along the last axis, ties broken by index.

    M x M comparisons per group instead of a sort: M is small (4, 8) and XLA's CPU sort is slow.
    """
    m = groups.shape[-1]
    idx = jnp.arange(m)
    other, this = groups[..., None, :], groups[..., :, None]
    below = (other < this) | ((other == this) & (idx[None, :] < idx[:, None]))
    return below.sum(-1)


@partial(jax.jit, static_argnames=("pattern", "sparsity"))
def keep_mask(score: Float[Array, "i o"], pattern: Pattern, sparsity: float = 0.0) -> Bool[Array, "i o"]:
    """Which weights survive (``True``) for a kernel-layout (in, out) ``score``.

    Unstructured: the ``floor(sparsity * in)`` lowest scores of each output column are dropped.
    ``N:M``: the ``N`` highest scores of each group of ``M`` consecutive inputs are kept
    (``sparsity`` is ignored: the pattern fixes it).
    """
    in_features, out_features = score.shape
    rows = score.T.astype(jnp.float32)  # (out, in): one PyTorch row per output
    if pattern.structured:
        pattern.check_width(in_features)
        groups = rows.reshape(out_features, in_features // pattern.m, pattern.m)
        keep = (_rank_in_group(groups) >= pattern.m - pattern.n).reshape(out_features, in_features)
    else:
        k = pruned_per_row(in_features, sparsity)
        keep = jnp.ones(rows.shape, bool)
        if k:
            # top_k, not a full argsort: XLA's CPU sort is several times slower. Among equal scores
            # top_k returns the lower index first, so the lower input is pruned first.
            _, pruned = jax.lax.top_k(-rows, k)
            keep = keep.at[jnp.arange(out_features)[:, None], pruned].set(False)
    return keep.T
