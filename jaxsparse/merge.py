"""Merge adapters into parameters and back, exactly, as jitted scatters.

Merging k entries into a weight is a scatter whose floor is the bytes it touches: nothing here
ever builds a dense delta. :func:`merge` returns the merged params and ``saved``, the entries it
replaced, so :func:`unmerge` restores the original bits (it writes the saved values back rather
than subtracting, which would round). :func:`switch` goes from one merged adapter to another in one
jitted call; :func:`fuse` adds several adapters into one.

``saved`` is a plain pytree ``{"deltas": {path: array}, "dense": {path: array}}``: for a
:class:`SparseDelta` the k original entries (weight dtype), for a :class:`LowRankDelta` the
original weight (a low-rank merge touches every entry), for a dense (``modules_to_save``) leaf the
original leaf.

Each scatter is compiled once per adapter structure (paths, shapes, dtypes): ``jax.jit`` caches on
the treedef of the ``{path: ...}`` dicts it is given. With ``donate=True`` (or :func:`merge_inplace`)
the targeted weights of the ``params`` you pass are donated and updated in place: **those arrays are
invalid afterwards** (using them raises); keep only the returned tree.

The module itself is callable as :func:`merge`: ``jaxsparse.merge(params, adapter)`` (what
``import jaxsparse as js; js.merge(...)`` calls) is ``jaxsparse.merge.merge(params, adapter)``.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxsparse.delta import Adapter, SparseDelta
    >>> params = {"lin": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}}
    >>> adapter = Adapter({"lin.kernel": SparseDelta(jnp.array([1, 2], jnp.int32), jnp.array([10.0, 20.0]), (2, 2))})
    >>> merged, saved = merge(params, adapter)
    >>> merged["lin"]["kernel"].tolist(), saved["deltas"]["lin.kernel"].tolist()
    ([[1.0, 12.0], [23.0, 4.0]], [2.0, 3.0])
    >>> unmerge(merged, adapter, saved)["lin"]["kernel"].tolist()
    [[1.0, 2.0], [3.0, 4.0]]
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import tree as tree_lib
from jaxsparse.delta import Adapter, LowRankDelta, SparseDelta

PyTree = Any
Saved = dict[str, dict[str, jax.Array]]


class AdapterError(ValueError):
    """An adapter does not fit the parameters it is applied to (the message names the path)."""


# --------------------------------------------------------------------------------------------
# validation


@jax.jit
def _device_stats(indices: dict[str, jax.Array], floats: dict[str, jax.Array]) -> tuple[dict, dict]:
    # One compiled pass per adapter structure; only a few scalars per leaf come back to the host.
    sparse = {}
    for p, idx in indices.items():
        if idx.shape[0] > 1:
            bad = idx[1:] <= idx[:-1]
            first_bad = jnp.where(jnp.any(bad), jnp.argmax(bad) + 1, -1).astype(idx.dtype)
        else:
            first_bad = jnp.array(-1, idx.dtype)
        sparse[p] = jnp.stack([idx.min(), idx.max(), first_bad])
    nonfinite = {p: jnp.sum(~jnp.isfinite(x)) for p, x in floats.items()}
    return sparse, nonfinite


class _Leaves:
    """The leaves of ``params`` by path, each walked to once per call: merge, unmerge and switch
    consult the same few hundred weights in their checks and in the scatter."""

    def __init__(self, params: PyTree) -> None:
        self.params = params
        self._found: dict[str, Any] = {}

    def __call__(self, path: str) -> Any:
        found = self._found.get(path)
        if found is None:
            found = self._found[path] = tree_lib.get_leaf(self.params, path)
        return found


def _weight(leaves: _Leaves, path: str, what: str) -> Any:
    try:
        weight = leaves(path)
    except KeyError as e:
        raise AdapterError(f"adapter {what} {path!r} is not a parameter of the model: {e.args[0]}") from None
    if not hasattr(weight, "shape") or not hasattr(weight, "dtype"):
        raise AdapterError(
            f"adapter {what} {path!r}: the model's leaf there is not an array ({type(weight).__name__})"
        )
    return weight


def _check_sparse(path: str, d: SparseDelta, weight: Any) -> None:
    if tuple(d.shape) != tuple(weight.shape):
        raise AdapterError(
            f"adapter delta {path!r}: made for shape {tuple(d.shape)}, the weight is {tuple(weight.shape)}"
        )
    if not jnp.issubdtype(weight.dtype, jnp.floating):
        raise AdapterError(
            f"adapter delta {path!r}: the weight has dtype {weight.dtype}, expected a float dtype"
        )
    if d.indices.ndim != 1 or not jnp.issubdtype(d.indices.dtype, jnp.integer):
        raise AdapterError(
            f"adapter delta {path!r}: indices must be a 1-D integer array, got {d.indices.dtype} {tuple(d.indices.shape)}"
        )
    if d.values.ndim != 1 or not jnp.issubdtype(d.values.dtype, jnp.floating):
        raise AdapterError(
            f"adapter delta {path!r}: values must be a 1-D float array, got {d.values.dtype} {tuple(d.values.shape)}"
        )
    if d.values.shape[0] != d.indices.shape[0]:
        raise AdapterError(
            f"adapter delta {path!r}: {d.indices.shape[0]} indices but {d.values.shape[0]} values"
        )
    if d.indices.shape[0] > weight.size:
        raise AdapterError(
            f"adapter delta {path!r}: k={d.indices.shape[0]} entries exceed the weight's {weight.size}"
        )


def _check_low_rank(path: str, d: LowRankDelta, weight: Any) -> None:
    if weight.ndim != 2:
        raise AdapterError(
            f"adapter delta {path!r}: a low-rank delta needs a 2-D weight, got {tuple(weight.shape)}"
        )
    fan_in, fan_out = weight.shape
    if d.a.shape[0] != fan_in or d.b.shape[1] != fan_out or d.a.shape[1] != d.b.shape[0]:
        raise AdapterError(
            f"adapter delta {path!r}: a {tuple(d.a.shape)} @ b {tuple(d.b.shape)} does not give the weight's "
            f"{tuple(weight.shape)} (expected a ({fan_in}, r), b (r, {fan_out}))"
        )


def _immutable(arrays: Sequence[Any]) -> bool:
    # Only concrete jax Arrays cannot change after a check: NumPy arrays can be written in place,
    # tracers are transient. What the caches below remember must be all of the former.
    return all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) for x in arrays)


class _Checked:
    """Objects that passed a check for a given fingerprint (a weight's shape, its dtype), by identity.

    Only jax Arrays (or frozen deltas holding only jax Arrays) are remembered: they cannot change
    after the check, so it stays true. NumPy arrays can change in place and tracers are transient;
    those are checked every time. Keyed by ``id``; the weak reference drops the entry when the
    object is freed (so a new object at the same address is never taken for it).
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    def remember(self, obj: Any, fingerprint: Any, arrays: tuple[Any, ...]) -> None:
        if not _immutable(arrays):
            return
        key = id(obj)
        ref = weakref.ref(obj, lambda _, key=key: self._entries.pop(key, None))
        self._entries[key] = (ref, fingerprint)

    def holds(self, obj: Any, fingerprint: Any) -> bool:
        entry = self._entries.get(id(obj))
        return entry is not None and entry[0]() is obj and entry[1] == fingerprint


# Index arrays already checked by :func:`validate` (in range, sorted, unique) for a weight shape:
# merge, unmerge and switch then run only the host-side structural checks (no device pass, no host
# round trip).
_CHECKED_INDICES = _Checked()
# Sparse deltas whose structural and index checks passed for a weight (shape, dtype): SparseDelta is
# frozen, so merge/switch/unmerge then skip even the per-path checks (a few microseconds each, but a
# few hundred paths per call).
_FITTED = _Checked()


def _indices_checked(indices: Any, shape: tuple[int, ...]) -> bool:
    return _CHECKED_INDICES.holds(indices, tuple(shape))


def _fit_of(weight: Any) -> tuple[tuple[int, ...], Any]:
    return tuple(weight.shape), weight.dtype


def _check_structure(leaves: _Leaves, adapter: Adapter) -> bool:
    """The host-side checks of :func:`validate` (paths, shapes, dtypes, k); no device work.

    Returns whether the adapter has sparse deltas and every one's indices were already checked by
    :func:`validate` for its weight's shape; if not, the caller runs the full :func:`validate` (an
    adapter without sparse deltas, LoRA or dense leaves only, has only its NaN/inf check to run).
    """
    if adapter.dense and adapter.deltas and not set(adapter.deltas).isdisjoint(adapter.dense):
        return False  # validate() names the overlapping paths
    checked = any(isinstance(d, SparseDelta) for d in adapter.deltas.values())
    for path, d in adapter.deltas.items():
        weight = _weight(leaves, path, "delta")
        if isinstance(d, SparseDelta):
            if _FITTED.holds(d, _fit_of(weight)):
                continue
            _check_sparse(path, d, weight)
            passed = d.indices.shape[0] == 0 or _indices_checked(d.indices, weight.shape)
            if passed:
                _FITTED.remember(d, _fit_of(weight), (d.indices, d.values))
            checked = checked and passed
        elif isinstance(d, LowRankDelta):
            _check_low_rank(path, d, weight)
        else:
            raise AdapterError(f"adapter delta {path!r}: unknown delta type {type(d).__name__}")
    for path, leaf in adapter.dense.items():
        _check_dense(path, leaf, _weight(leaves, path, "dense leaf"))
    return checked


def _ensure_valid(leaves: _Leaves, adapter: Adapter) -> None:
    # Full validation once per index array (at load, or the first merge of a hand-built adapter);
    # afterwards only the structural checks, which cost microseconds per path.
    if not _check_structure(leaves, adapter):
        validate(leaves.params, adapter)


def _check_dense(path: str, leaf: Any, weight: Any) -> None:
    if tuple(leaf.shape) != tuple(weight.shape) or leaf.dtype != weight.dtype:
        raise AdapterError(
            f"adapter dense leaf {path!r}: {leaf.dtype} {tuple(leaf.shape)}, the model's is "
            f"{weight.dtype} {tuple(weight.shape)}"
        )


def validate(params: PyTree, adapter: Adapter) -> None:
    """Check that ``adapter`` fits ``params``; ``AdapterError`` (a ``ValueError``) naming the path.

    Checks: every path exists in ``params``; a sparse delta's shape equals the weight's, the weight
    and values are float, indices are 1-D integers, sorted, unique, in ``[0, numel)``, k <= numel;
    a low-rank delta's factors fit the weight; dense leaves match shape and dtype exactly; no
    NaN/inf anywhere; no path both a delta and a dense leaf. Call it outside ``jit``.

    The index checks are remembered per index array (jax Arrays are immutable): :func:`merge`,
    :func:`unmerge` and :func:`switch` of an adapter whose indices passed here (as
    :func:`jaxsparse.adapter_io.load_adapter` does on load) run only the host-side structural checks;
    any other adapter (hand-built, or new index arrays) is validated in full on its first merge.
    Values are checked for NaN/inf here, not on every merge (training changes them every step).

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"lin": {"kernel": jnp.zeros((2, 2))}}
        >>> bad = Adapter({"lin.kernel": SparseDelta(jnp.array([2, 1], jnp.int32), jnp.zeros(2), (2, 2))})
        >>> try:
        ...     validate(params, bad)
        ... except AdapterError as e:
        ...     print(e)
        adapter delta 'lin.kernel': indices must be sorted and unique (entry 1 is 1, after 2)
    """
    both = sorted(set(adapter.deltas) & set(adapter.dense))
    if both:
        raise AdapterError(
            f"adapter paths {both} are both a delta and a dense leaf; each path is one or the other"
        )
    indices: dict[str, jax.Array] = {}
    floats: dict[str, jax.Array] = {}
    numel: dict[str, int] = {}
    leaves = _Leaves(params)
    for path, d in adapter.deltas.items():
        weight = _weight(leaves, path, "delta")
        if isinstance(d, SparseDelta):
            _check_sparse(path, d, weight)
            if d.indices.shape[0]:
                indices[path] = d.indices
                numel[path] = int(weight.size)
            floats[f"{path} values"] = d.values
        elif isinstance(d, LowRankDelta):
            _check_low_rank(path, d, weight)
            floats[f"{path} a"], floats[f"{path} b"] = d.a, d.b
        else:
            raise AdapterError(f"adapter delta {path!r}: unknown delta type {type(d).__name__}")
    for path, leaf in adapter.dense.items():
        weight = _weight(leaves, path, "dense leaf")
        _check_dense(path, leaf, weight)
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            floats[f"{path} dense"] = leaf
    sparse, nonfinite = jax.device_get(_device_stats(indices, floats))
    for path, (lo, hi, first_bad) in sparse.items():
        if lo < 0 or hi >= numel[path]:
            raise AdapterError(
                f"adapter delta {path!r}: indices must lie in [0, {numel[path]}) for a weight of shape "
                f"{tuple(adapter.deltas[path].shape)}, found {lo if lo < 0 else hi}"
            )
        if first_bad >= 0:
            idx = adapter.deltas[path].indices
            raise AdapterError(
                f"adapter delta {path!r}: indices must be sorted and unique "
                f"(entry {first_bad} is {int(idx[first_bad])}, after {int(idx[first_bad - 1])})"
            )
    for name, count in nonfinite.items():
        if count:
            path, _, field = name.rpartition(" ")
            raise AdapterError(f"adapter {path!r}: {field} contain {int(count)} NaN/inf entries")
    for d in adapter.deltas.values():
        if isinstance(d, SparseDelta):
            _CHECKED_INDICES.remember(d.indices, tuple(d.shape), (d.indices,))


def _check_saved(leaves: _Leaves, adapter: Adapter, saved: Saved) -> None:
    if not isinstance(saved, Mapping) or set(saved) != {"deltas", "dense"}:
        raise AdapterError("`saved` must be the second value merge() returned: {'deltas': ..., 'dense': ...}")
    for group, paths in (("deltas", adapter.deltas), ("dense", adapter.dense)):
        if set(saved[group]) != set(paths):
            raise AdapterError(
                f"`saved[{group!r}]` holds paths {sorted(saved[group])[:5]} but the adapter has "
                f"{sorted(paths)[:5]}: was it saved by merging this adapter?"
            )
    for path, d in adapter.deltas.items():
        weight = leaves(path)
        old = saved["deltas"][path]
        want = (d.indices.shape[0],) if isinstance(d, SparseDelta) else tuple(weight.shape)
        if tuple(old.shape) != want or old.dtype != weight.dtype:
            raise AdapterError(
                f"`saved` for {path!r} is {old.dtype} {tuple(old.shape)}, expected {weight.dtype} {want}"
            )


# --------------------------------------------------------------------------------------------
# the scatter


# Every index reaching the scatter has passed validate() (directly or remembered): in range,
# sorted, unique. So the gathers and scatters are lax's own, promised in bounds with the sorted and
# unique hints: jnp's ``.at[]`` would add a pass per op that maps negative indices (10-20% of a
# SmolLM2 merge, BENCHMARKS.md 1d).
_GATHER_DIMS = jax.lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))
_SCATTER_DIMS = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
)
_IN_BOUNDS = dict(
    indices_are_sorted=True, unique_indices=True, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
)


def _take(flat: jax.Array, idx: jax.Array) -> jax.Array:
    return jax.lax.gather(flat, idx[:, None], _GATHER_DIMS, (1,), **_IN_BOUNDS)


def _put(flat: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
    # A set, never an add: after the gather of the same entries, XLA copies the whole weight to
    # scatter-add in place (20x slower, measured), while gather + set stays in place.
    return jax.lax.scatter(flat, idx[:, None], values, _SCATTER_DIMS, **_IN_BOUNDS)


def _scatter(
    weights: dict[str, jax.Array],
    undo: dict[str, tuple[jax.Array, jax.Array]],
    do: dict[str, tuple[jax.Array, jax.Array]],
    swap: dict[str, tuple[jax.Array, jax.Array, jax.Array]],
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    new, saved = {}, {}
    for path, weight in weights.items():
        flat = weight.reshape(-1)
        if path in swap:
            # A switch between adapters with the same indices: the entries' originals are already
            # saved, so one scatter writes (original + B's value), bit for bit what unmerging A
            # and merging B gives, with no gather.
            idx, old, values = swap[path]
            new[path] = _put(flat, idx, _added(old, values, weight.dtype)).reshape(weight.shape)
            continue
        if path in undo:
            idx, old = undo[path]
            flat = _put(flat, idx, old)
        if path in do:
            idx, values = do[path]
            old = _take(flat, idx)
            saved[path] = old
            flat = _put(flat, idx, _added(old, values, weight.dtype))
        new[path] = flat.reshape(weight.shape)
    return new, saved


def _added(old: jax.Array, values: jax.Array, dtype: Any) -> jax.Array:
    # The same rule as SparseDelta.apply (float32 sum, cast back), so merge == apply bit for bit.
    return (old.astype(jnp.float32) + values.astype(jnp.float32)).astype(dtype)


@jax.jit
def _indices_equal(pairs: dict[str, tuple[jax.Array, jax.Array]]) -> dict[str, jax.Array]:
    return {p: jnp.array_equal(a, b) for p, (a, b) in pairs.items()}


class _EqualPairs:
    """Whether two index arrays hold the same entries, remembered per pair of jax Arrays.

    Like :class:`_Checked`: only immutable jax Arrays are remembered, by identity, and an entry
    goes when either array is freed. A switch between adapters loaded from files compares their
    index arrays once (one program for all paths), not on every switch.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, bool]] = {}

    def lookup(self, a: Any, b: Any) -> bool | None:
        entry = self._entries.get((id(a), id(b)))
        if entry is None or entry[0]() is not a or entry[1]() is not b:
            return None
        return entry[2]

    def remember(self, a: Any, b: Any, equal: bool) -> None:
        key = (id(a), id(b))
        drop = lambda _, key=key: self._entries.pop(key, None)  # noqa: E731
        self._entries[key] = (weakref.ref(a, drop), weakref.ref(b, drop), equal)


_EQUAL_PAIRS = _EqualPairs()


def _shared_indices(pairs: dict[str, tuple[Any, Any]]) -> set[str]:
    """The paths whose two index arrays are equal (the same object, or compared on device once)."""
    same, unknown = set(), {}
    for path, (a, b) in pairs.items():
        if a is b:
            same.add(path)
        elif a.shape == b.shape and a.dtype == b.dtype:
            known = _EQUAL_PAIRS.lookup(a, b)
            if known is None:
                unknown[path] = (a, b)
            elif known:
                same.add(path)
    if unknown and _immutable([x for ab in unknown.values() for x in ab]):
        for path, equal in jax.device_get(_indices_equal(unknown)).items():
            a, b = unknown[path]
            _EQUAL_PAIRS.remember(a, b, bool(equal))
            if equal:
                same.add(path)
    return same


_scatter_copy = jax.jit(_scatter)
_scatter_donate = jax.jit(_scatter, donate_argnums=0)
_apply_low_rank = jax.jit(lambda weight, delta: delta.apply(weight))


def _transition(
    leaves: _Leaves,
    undo_adapter: Adapter | None,
    saved: Saved | None,
    do_adapter: Adapter | None,
    donate: bool,
) -> tuple[PyTree, Saved]:
    current: dict[str, Any] = {}  # path -> its value after this call

    def now(path: str) -> Any:
        return current[path] if path in current else leaves(path)

    undo: dict[str, tuple[jax.Array, jax.Array]] = {}
    if undo_adapter is not None:
        assert saved is not None
        for path, d in undo_adapter.deltas.items():
            if isinstance(d, SparseDelta):
                undo[path] = (d.indices, saved["deltas"][path])
            else:
                current[path] = saved["deltas"][path]
        current.update(saved["dense"])
    do_deltas = {} if do_adapter is None else do_adapter.deltas
    do = {p: (d.indices, d.values) for p, d in do_deltas.items() if isinstance(d, SparseDelta)}
    swap: dict[str, tuple[jax.Array, jax.Array, jax.Array]] = {}
    saved_to: Saved = {"deltas": {}, "dense": {}}
    for path in _shared_indices({p: (undo[p][0], do[p][0]) for p in undo.keys() & do.keys()}):
        (idx, old), (_, values) = undo.pop(path), do.pop(path)
        swap[path] = (idx, old, values)
        saved_to["deltas"][path] = old  # the same originals: B's saved entries are A's
    scattered = list(dict.fromkeys([*undo, *do, *swap]))
    if scattered:
        weights = {p: now(p) for p in scattered}
        new, saved_new = (_scatter_donate if donate else _scatter_copy)(weights, undo, do, swap)
        saved_to["deltas"].update(saved_new)
        current.update(new)
    for path, d in do_deltas.items():
        if not isinstance(d, SparseDelta):
            saved_to["deltas"][path] = now(path)
            current[path] = _apply_low_rank(now(path), d)
    if do_adapter is not None:
        for path, leaf in do_adapter.dense.items():
            saved_to["dense"][path] = now(path)
            current[path] = leaf
    return tree_lib.replace_leaves(leaves.params, current), saved_to


# --------------------------------------------------------------------------------------------
# public API


def merge(params: PyTree, adapter: Adapter, *, donate: bool = False) -> tuple[PyTree, Saved]:
    """``(merged_params, saved)``: the adapter written into the weights; ``saved`` undoes it exactly.

    Sparse entries become ``(w + v)`` computed in float32 and cast to the weight's dtype (the same
    bits as :func:`jaxsparse.delta.apply`); dense leaves replace the model's. Checks paths, shapes
    and dtypes first, and validates the adapter in full (:func:`validate`) unless its indices
    already passed :func:`validate` (as on load): index checks run once per adapter, not per merge.
    ``donate=True`` updates the targeted weights in place (see :func:`merge_inplace`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxsparse.delta import Adapter, SparseDelta
        >>> p = {"w": {"kernel": jnp.zeros((2, 2))}}
        >>> a = Adapter({"w.kernel": SparseDelta(jnp.array([0], jnp.int32), jnp.array([1.5]), (2, 2))})
        >>> merge(p, a)[0]["w"]["kernel"].tolist()
        [[1.5, 0.0], [0.0, 0.0]]
    """
    leaves = _Leaves(params)
    _ensure_valid(leaves, adapter)
    return _transition(leaves, None, None, adapter, donate)


def merge_inplace(params: PyTree, adapter: Adapter) -> tuple[PyTree, Saved]:
    """:func:`merge` with the targeted weights of ``params`` donated: O(k) work and no weight copy.

    The caller's arrays at the targeted paths are **invalidated** (deleted) by this call; use only
    the returned params from then on.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxsparse.delta import Adapter, SparseDelta
        >>> p = {"w": {"kernel": jnp.zeros((2, 2))}}
        >>> a = Adapter({"w.kernel": SparseDelta(jnp.array([3], jnp.int32), jnp.array([2.0]), (2, 2))})
        >>> merged, saved = merge_inplace(p, a)
        >>> merged["w"]["kernel"].tolist()
        [[0.0, 0.0], [0.0, 2.0]]
    """
    return merge(params, adapter, donate=True)


def unmerge(merged_params: PyTree, adapter: Adapter, saved: Saved, *, donate: bool = False) -> PyTree:
    """The params before :func:`merge`, bit for bit: the saved entries are written back.

    ``donate=True`` updates ``merged_params``' targeted weights in place (they become invalid).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxsparse.delta import Adapter, SparseDelta
        >>> p = {"w": {"kernel": jnp.array([[0.1, 0.2]])}}
        >>> a = Adapter({"w.kernel": SparseDelta(jnp.array([1], jnp.int32), jnp.array([1e-3]), (1, 2))})
        >>> merged, saved = merge(p, a)
        >>> bool(jnp.array_equal(unmerge(merged, a, saved)["w"]["kernel"], p["w"]["kernel"]))
        True
    """
    leaves = _Leaves(merged_params)
    _ensure_valid(leaves, adapter)
    _check_saved(leaves, adapter, saved)
    params, _ = _transition(leaves, adapter, saved, None, donate)
    return params


def switch(
    params: PyTree, from_adapter: Adapter, saved: Saved, to_adapter: Adapter, *, donate: bool = False
) -> tuple[PyTree, Saved]:
    """Unmerge ``from_adapter`` (with its ``saved``) and merge ``to_adapter`` in one jitted scatter.

    Returns ``(params, saved_to)``; the result equals ``merge(unmerge(params, from, saved), to)``
    bit for bit. With ``donate=True`` the targeted weights of ``params`` are updated in place.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxsparse.delta import Adapter, SparseDelta
        >>> p = {"w": {"kernel": jnp.zeros((1, 3))}}
        >>> a = Adapter({"w.kernel": SparseDelta(jnp.array([0], jnp.int32), jnp.array([1.0]), (1, 3))})
        >>> b = Adapter({"w.kernel": SparseDelta(jnp.array([2], jnp.int32), jnp.array([5.0]), (1, 3))})
        >>> merged, saved = merge(p, a)
        >>> switch(merged, a, saved, b)[0]["w"]["kernel"].tolist()
        [[0.0, 0.0, 5.0]]
    """
    leaves = _Leaves(params)
    _ensure_valid(leaves, from_adapter)
    _check_saved(leaves, from_adapter, saved)
    _ensure_valid(leaves, to_adapter)
    return _transition(leaves, from_adapter, saved, to_adapter, donate)


def fuse(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """One adapter equal to the sum of ``adapters`` (each scaled by ``weights[i]``, default 1).

    Per path, the sparse deltas' index sets are united and values at shared indices add (in
    adapter order, in the values' dtype); the result is sorted and unique. A low-rank delta or a
    dense leaf may come from one adapter only (a sum of replacements is not defined). The fused
    config is the adapters' common config, or ``None`` if they differ.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxsparse.delta import Adapter, SparseDelta
        >>> a = Adapter({"w": SparseDelta(jnp.array([0, 2], jnp.int32), jnp.array([1.0, 2.0]), (4,))})
        >>> b = Adapter({"w": SparseDelta(jnp.array([2, 3], jnp.int32), jnp.array([10.0, 20.0]), (4,))})
        >>> f = fuse([a, b]).deltas["w"]
        >>> f.indices.tolist(), f.values.tolist()
        ([0, 2, 3], [1.0, 12.0, 20.0])
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("fuse() needs at least one adapter")
    scales = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(scales) != len(adapters):
        raise ValueError(f"fuse(): {len(adapters)} adapters but {len(scales)} weights")
    paths = list(dict.fromkeys(p for a in adapters for p in a.deltas))
    deltas: dict[str, Any] = {}
    for path in paths:
        parts = [(a.deltas[path], s) for a, s in zip(adapters, scales, strict=True) if path in a.deltas]
        if any(not isinstance(d, SparseDelta) for d, _ in parts):
            if len(parts) > 1:
                raise NotImplementedError(f"fuse(): {path!r} has a low-rank delta in several adapters")
            d, s = parts[0]
            deltas[path] = d if s == 1.0 else dataclasses.replace(d, b=d.b * s)
            continue
        shapes = {tuple(d.shape) for d, _ in parts}
        if len(shapes) > 1:
            raise AdapterError(
                f"fuse(): the deltas for {path!r} disagree on the weight shape: {sorted(shapes)}"
            )
        deltas[path] = _fuse_sparse([d for d, _ in parts], [s for _, s in parts])
    dense: dict[str, jax.Array] = {}
    for a in adapters:
        for path, leaf in a.dense.items():
            if path in dense:
                raise AdapterError(
                    f"fuse(): dense leaf {path!r} is in several adapters; replacements do not add"
                )
            dense[path] = leaf
    configs = {a.config for a in adapters}
    return Adapter(deltas=deltas, dense=dense, config=adapters[0].config if len(configs) == 1 else None)


def _fuse_sparse(parts: list[SparseDelta], scales: list[float]) -> SparseDelta:
    dtype = functools.reduce(np.promote_types, [np.dtype(d.values.dtype) for d in parts])
    indices = np.concatenate([np.asarray(d.indices) for d in parts])
    values = np.concatenate(
        [np.asarray(d.values).astype(dtype) * dtype.type(s) for d, s in zip(parts, scales, strict=True)]
    )
    union, where = np.unique(indices, return_inverse=True)
    summed = np.zeros(union.shape, dtype)
    np.add.at(summed, where, values)  # unbuffered: shared indices add, in adapter order
    return SparseDelta(
        indices=jnp.asarray(union, dtype=parts[0].indices.dtype),
        values=jnp.asarray(summed),
        shape=tuple(parts[0].shape),
    )


class _CallableModule(types.ModuleType):
    """This module, callable as its :func:`merge`.

    The front door exports ``jaxsparse.merge`` as the merge function, and a package attribute cannot
    differ from its submodule of the same name (importing ``jaxsparse.merge`` rebinds it to the
    module). So the module answers both: ``js.merge(params, adapter)`` and ``js.merge.unmerge``.
    """

    def __call__(self, params: PyTree, adapter: Adapter, *, donate: bool = False) -> tuple[PyTree, Saved]:
        return merge(params, adapter, donate=donate)


sys.modules[__name__].__class__ = _CallableModule
