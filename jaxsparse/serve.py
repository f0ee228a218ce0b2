"""Serve many adapters in one batch without merging: every row of a batch runs with its own adapter.

:func:`stack_adapters` validates N adapters against the base ``params`` once and stacks them, per
targeted linear layer, into an :class:`AdapterBank` (a pytree of ``(N, ...)`` arrays).
:func:`per_row_params` pairs each targeted kernel with a :class:`RowDelta` that carries the
bank's arrays and ``rows``, the adapter index of each batch row; the zoo's linear layers
(:func:`jaxsparse.factored.matmul`) then compute, for row ``b`` with adapter ``n = rows[b]``::

    y[b] = x[b] @ W + sparse_n(x[b]) + (x[b] @ a_n) @ b_n + (bias_n - bias)

where ``sparse_n(x)[t, o] = sum_j x[t, in_j] * v_j`` over adapter ``n``'s entries ``(in_j, o)``:
the k inputs are gathered per row and segment-summed into the outputs (no dense delta, O(k) work
per token and row). Dense replacements (``modules_to_save`` such as a classifier head) become a
per-row kernel ``x[b] @ K_n`` and a bias shift. Every row's output equals the model merged with
that row's adapter, up to float32 rounding (the tests check <= 1e-5).

Adapters of any structure mix (their entries are zero-padded to the largest k per layer), so one
compiled program serves any ``rows`` for a bank; a row index of ``-1`` runs the base model.
Greedy generation with the KV cache works the same way: pass the per-row params to
:func:`jaxsparse.models.generate.generate` (``params=``).

Example:
    >>> import jax.numpy as jnp
    >>> from jaxsparse.delta import Adapter, SparseDelta
    >>> from jaxsparse.factored import matmul
    >>> params = {"lin": {"kernel": jnp.zeros((2, 2))}}
    >>> one = Adapter({"lin.kernel": SparseDelta(jnp.array([1], jnp.int32), jnp.array([3.0]), (2, 2))})
    >>> two = Adapter({"lin.kernel": SparseDelta(jnp.array([2], jnp.int32), jnp.array([5.0]), (2, 2))})
    >>> bank = stack_adapters(params, [one, two])
    >>> served = per_row_params(params, bank, jnp.array([0, 1, -1]))
    >>> matmul(jnp.ones((3, 2)), served["lin"]["kernel"]).tolist()
    [[0.0, 3.0], [5.0, 0.0], [0.0, 0.0]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxsparse import merge as merge_lib
from jaxsparse import tree as tree_lib
from jaxsparse.delta import Adapter, LowRankDelta, SparseDelta
from jaxsparse.delta_leaves import pytree_dataclass, static
from jaxsparse.factored import AdaptedKernel

PyTree = Any


class ServeError(ValueError):
    """Adapters that cannot be served together per row (the message names the path)."""


@pytree_dataclass
class RowDelta:
    """The stacked deltas of one linear layer for N adapters (+ the base as index N), and ``rows``.

    ``in_index`` / ``out_index`` / ``values`` (N+1, k): each adapter's sparse entries as (input,
    output) positions of the (in, out) kernel, zero-padded; ``a`` (N+1, in, r) and ``b``
    (N+1, r, out) low-rank factors with the scale folded into ``b``; ``kernels`` (N+1, in, out)
    per-adapter dense kernels; ``bias_shift`` (N+1, out) each adapter's bias minus the base's.
    Parts no adapter uses are ``None``. ``rows`` (B,) picks the adapter of each batch row.
    """

    in_index: Int[Array, "N k"] | None = None
    out_index: Int[Array, "N k"] | None = None
    values: Float[Array, "N k"] | None = None
    a: Float[Array, "N fan_in r"] | None = None
    b: Float[Array, "N r fan_out"] | None = None
    kernels: Float[Array, "N fan_in fan_out"] | None = None
    bias_shift: Float[Array, "N fan_out"] | None = None
    rows: Int[Array, " B"] | None = None
    fan_out: int = static(0)

    def matmul_beside(self, x: Array, base: Array, precision: Any = None) -> Array:
        """``x @ (W_n + delta_n)`` for each row's adapter ``n``; ``x`` is (B, ..., in)."""
        rows = self.rows
        if rows is None or x.ndim < 2 or x.shape[0] != rows.shape[0]:
            got = None if rows is None else rows.shape[0]
            raise ServeError(
                f"per-row adapters: the input's leading axis must be the batch of {got} rows, got {x.shape}"
            )
        batch, fan_in, fan_out = x.shape[0], base.shape[0], base.shape[1]
        if self.kernels is None:
            y = jax.lax.dot_general(
                x, base.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())), precision=precision
            )
        else:
            y = jnp.einsum("b...i,bio->b...o", x, self.kernels[rows].astype(x.dtype), precision=precision)
        x3 = x.reshape(batch, -1, fan_in).astype(jnp.float32)
        extra = jnp.zeros((batch, x3.shape[1], fan_out), jnp.float32)
        if self.values is not None:
            extra = extra + jax.vmap(_sparse_row, in_axes=(0, 0, 0, 0, None))(
                x3, self.in_index[rows], self.out_index[rows], self.values[rows], fan_out
            )
        if self.a is not None:
            h = jnp.einsum("bti,bir->btr", x3, self.a[rows].astype(jnp.float32), precision=precision)
            extra = extra + jnp.einsum(
                "btr,bro->bto", h, self.b[rows].astype(jnp.float32), precision=precision
            )
        if self.bias_shift is not None:
            extra = extra + self.bias_shift[rows][:, None, :].astype(jnp.float32)
        return (y.astype(jnp.float32) + extra.reshape(y.shape)).astype(y.dtype)


def _sparse_row(x: Array, in_index: Array, out_index: Array, values: Array, fan_out: int) -> Array:
    # x (T, in): gather the k input columns as rows of x^T (contiguous reads), scale, and sum them
    # into their output columns (a segment sum over out_index).
    contributions = x.T[in_index] * values[:, None].astype(jnp.float32)  # (k, T)
    return jnp.zeros((fan_out, x.shape[0]), jnp.float32).at[out_index].add(contributions).T


@pytree_dataclass
class AdapterBank:
    """N adapters stacked per targeted kernel path (a pytree); built by :func:`stack_adapters`."""

    layers: dict[str, RowDelta]
    num_adapters: int = static(0)


def _kernel_path_of(path: str, params: PyTree) -> str:
    module, leaf = tree_lib.module_of(path), tree_lib.leaf_name(path)
    kernel_path = f"{module}.kernel" if module else "kernel"
    if leaf not in ("kernel", "bias"):
        raise ServeError(
            f"per-row serving handles deltas and dense leaves of linear layers (kernel, bias); {path!r} is not one"
        )
    try:
        kernel = tree_lib.get_leaf(params, kernel_path)
    except KeyError:
        kernel = None
    if kernel is None or getattr(kernel, "ndim", None) != 2:
        raise ServeError(
            f"per-row serving: {path!r} is not in a linear layer with a 2-D kernel {kernel_path!r}"
        )
    return kernel_path


def stack_adapters(params: PyTree, adapters: Sequence[Adapter]) -> AdapterBank:
    """Validate ``adapters`` against ``params`` (once) and stack them per linear layer.

    Adapters may differ in targets, k, method (sparse, LoRA without an element mask) and dense
    leaves; each layer's arrays are padded to the largest k / rank. Dense leaves must be a linear
    layer's ``kernel`` or ``bias`` (e.g. a classifier head); anything else is refused
    (:class:`ServeError`), as are bad adapters (:class:`jaxsparse.merge.AdapterError`).

    Example:
        >>> from jaxsparse.delta import Adapter, SparseDelta
        >>> params = {"lin": {"kernel": jnp.zeros((2, 3))}}
        >>> d = SparseDelta(jnp.array([0, 4], jnp.int32), jnp.array([1.0, 2.0]), (2, 3))
        >>> bank = stack_adapters(params, [Adapter({"lin.kernel": d})])
        >>> bank.num_adapters, bank.layers["lin.kernel"].in_index.tolist(), bank.layers["lin.kernel"].out_index.tolist()
        (1, [[0, 1], [0, 0]], [[0, 1], [0, 0]])
    """
    adapters = list(adapters)
    if not adapters:
        raise ServeError("stack_adapters() needs at least one adapter")
    for adapter in adapters:
        merge_lib.validate(params, adapter)
    slots = len(adapters) + 1  # the last slot is the base model (row index -1)
    by_kernel: dict[str, list[dict[str, Any]]] = {}
    for n, adapter in enumerate(adapters):
        for path, d in adapter.deltas.items():
            kernel_path = _kernel_path_of(path, params)
            if path != kernel_path:
                raise ServeError(f"per-row serving: a delta on {path!r}; only kernels take deltas")
            if isinstance(d, LowRankDelta) and d.mask is not None:
                raise ServeError(f"per-row serving: {path!r} has a masked low-rank delta (not supported)")
            by_kernel.setdefault(kernel_path, [{} for _ in range(slots)])[n]["delta"] = d
        for path, leaf in adapter.dense.items():
            kernel_path = _kernel_path_of(path, params)
            part = "kernel" if path == kernel_path else "bias"
            by_kernel.setdefault(kernel_path, [{} for _ in range(slots)])[n][part] = leaf
    layers = {p: _stack_layer(params, p, parts) for p, parts in by_kernel.items()}
    return AdapterBank(layers=layers, num_adapters=len(adapters))


def _stack_layer(params: PyTree, kernel_path: str, parts: list[dict[str, Any]]) -> RowDelta:
    base = tree_lib.get_leaf(params, kernel_path)
    fan_in, fan_out = (int(s) for s in base.shape)
    slots = len(parts)
    fields: dict[str, Any] = {"fan_out": fan_out}
    sparse = [p.get("delta") if isinstance(p.get("delta"), SparseDelta) else None for p in parts]
    if any(d is not None for d in sparse):
        k = max(d.k for d in sparse if d is not None)
        in_index = np.zeros((slots, k), np.int32)
        out_index = np.zeros((slots, k), np.int32)
        values = np.zeros((slots, k), np.float32)  # padding adds x * 0 to output 0
        for n, d in enumerate(sparse):
            if d is not None and d.k:
                flat = np.asarray(d.indices).astype(np.int64)
                in_index[n, : d.k], out_index[n, : d.k] = flat // fan_out, flat % fan_out
                values[n, : d.k] = np.asarray(d.values, np.float32)
        fields.update(
            in_index=jnp.asarray(in_index), out_index=jnp.asarray(out_index), values=jnp.asarray(values)
        )
    low_rank = [p.get("delta") if isinstance(p.get("delta"), LowRankDelta) else None for p in parts]
    if any(d is not None for d in low_rank):
        r = max(d.rank for d in low_rank if d is not None)
        a = np.zeros((slots, fan_in, r), np.float32)
        b = np.zeros((slots, r, fan_out), np.float32)
        for n, d in enumerate(low_rank):
            if d is not None:
                da = np.asarray(d.a, np.float32)
                if d.rank_mask is not None:
                    da = da * np.asarray(d.rank_mask, np.float32)
                a[n, :, : d.rank], b[n, : d.rank] = da, np.asarray(d.b, np.float32) * np.float32(d.scale)
        fields.update(a=jnp.asarray(a), b=jnp.asarray(b))
    if any("kernel" in p for p in parts):
        fields["kernels"] = jnp.stack([p.get("kernel", base) for p in parts])
    if any("bias" in p for p in parts):
        base_bias = np.asarray(tree_lib.get_leaf(params, kernel_path[: -len("kernel")] + "bias"), np.float32)
        shift = np.zeros((slots, fan_out), np.float32)
        for n, p in enumerate(parts):
            if "bias" in p:
                shift[n] = np.asarray(p["bias"], np.float32) - base_bias
        fields["bias_shift"] = jnp.asarray(shift)
    return RowDelta(**fields)


def per_row_params(params: PyTree, bank: AdapterBank, rows: Array | Sequence[int]) -> PyTree:
    """``params`` whose targeted kernels apply, for batch row ``b``, adapter ``rows[b]`` of ``bank``.

    ``rows`` holds adapter indices in ``[-1, N)`` (``-1``: the base model). Pure and jit-able (the
    range check runs when ``rows`` is concrete); pass the result to the model's ``apply_fn`` or
    to ``generate(..., params=)`` with a batch of ``len(rows)`` rows.
    """
    rows = jnp.asarray(rows, jnp.int32)
    if rows.ndim != 1:
        raise ServeError(f"rows must be a 1-D array of adapter indices, got shape {rows.shape}")
    if not isinstance(rows, jax.core.Tracer) and rows.size:
        lo, hi = int(rows.min()), int(rows.max())
        if lo < -1 or hi >= bank.num_adapters:
            raise ServeError(
                f"rows must lie in [-1, {bank.num_adapters}) (-1 is the base model), found {lo if lo < -1 else hi}"
            )
    rows = jnp.where(rows < 0, bank.num_adapters, rows)
    new = {}
    for path, layer in bank.layers.items():
        new[path] = AdaptedKernel(base=tree_lib.get_leaf(params, path), delta=_with_rows(layer, rows))
    return tree_lib.replace_leaves(params, new)


def _with_rows(layer: RowDelta, rows: Array) -> RowDelta:
    return dataclasses.replace(layer, rows=rows)
