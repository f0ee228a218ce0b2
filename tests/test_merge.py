"""merge / unmerge / switch / fuse against a NumPy oracle, bit-exactness, donation, and validation errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse import delta as delta_lib
from jaxsparse import merge as merge_lib
from jaxsparse.delta import Adapter, LowRankDelta, SparseDelta
from jaxsparse.merge import AdapterError

SHAPES = {"a.kernel": (6, 5), "b.kernel": (4, 9), "c.kernel": (7, 3), "c.bias": (3,)}


def _params(rng, dtype=np.float32):
    tree: dict = {}
    for path, shape in SHAPES.items():
        module, leaf = path.split(".")
        tree.setdefault(module, {})[leaf] = jnp.asarray((rng.standard_normal(shape) * 3).astype(dtype))
    return tree


def _sparse(rng, shape, k, scale=1.0):
    idx = np.sort(rng.choice(int(np.prod(shape)), size=k, replace=False)).astype(np.int32)
    return SparseDelta(
        jnp.asarray(idx), jnp.asarray((rng.standard_normal(k) * scale).astype(np.float32)), shape
    )


def _adapter(rng, paths=("a.kernel", "b.kernel"), dense=("c.bias",), scale=1.0):
    # A fixed k per path keeps shapes (and so compilations) few; indices and values vary.
    deltas = {p: _sparse(rng, SHAPES[p], int(np.prod(SHAPES[p])) // 3, scale) for p in paths}
    return Adapter(deltas, {p: jnp.asarray(rng.standard_normal(SHAPES[p]).astype(np.float32)) for p in dense})


def _np_merge(params, adapter):
    """Oracle: w.flat[idx] = (float32(w.flat[idx]) + values) cast back; dense leaves replaced."""
    out = {m: {k: np.array(v) for k, v in leaves.items()} for m, leaves in params.items()}
    for path, d in adapter.deltas.items():
        module, leaf = path.split(".")
        w = out[module][leaf]
        flat = w.reshape(-1)
        idx = np.asarray(d.indices)
        flat[idx] = (flat[idx].astype(np.float32) + np.asarray(d.values)).astype(w.dtype)
    for path, leaf in adapter.dense.items():
        module, name = path.split(".")
        out[module][name] = np.asarray(leaf)
    return out


def _bits_equal(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _assert_tree_bits(got, want):
    flat_got, flat_want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(flat_got) == len(flat_want)
    for g, w in zip(flat_got, flat_want, strict=True):
        assert _bits_equal(g, w)


DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_merge_matches_oracle_and_unmerge_is_bit_identical(seed, dtype, scale):
    rng = np.random.default_rng(seed)
    params = _params(rng, dtype)
    adapter = _adapter(rng, scale=scale)
    adapter = Adapter(adapter.deltas, {p: v.astype(dtype) for p, v in adapter.dense.items()})
    merged, saved = merge_lib.merge(params, adapter)
    _assert_tree_bits(merged, _np_merge(params, adapter))
    _assert_tree_bits(merged, delta_lib.apply(params, adapter))  # merge == apply bit for bit
    _assert_tree_bits(merge_lib.unmerge(merged, adapter, saved), params)


def test_unmerge_restores_bits_that_subtraction_would_not():
    params = {"w": {"kernel": jnp.array([[1.0, 3.0]], jnp.bfloat16)}}
    adapter = Adapter(
        {"w.kernel": SparseDelta(jnp.array([0, 1], jnp.int32), jnp.array([1000.3, 0.01]), (1, 2))}
    )
    merged, saved = merge_lib.merge(params, adapter)
    subtracted = delta_lib.apply(
        merged,
        Adapter(
            {
                "w.kernel": SparseDelta(
                    jnp.array([0, 1], jnp.int32), -adapter.deltas["w.kernel"].values, (1, 2)
                )
            }
        ),
    )
    assert not _bits_equal(subtracted["w"]["kernel"], params["w"]["kernel"])  # the test can tell
    _assert_tree_bits(merge_lib.unmerge(merged, adapter, saved), params)


def test_saved_holds_the_replaced_entries_and_dense_originals():
    rng = np.random.default_rng(0)
    params = _params(rng)
    adapter = _adapter(rng)
    _, saved = merge_lib.merge(params, adapter)
    for path, d in adapter.deltas.items():
        module, leaf = path.split(".")
        want = np.asarray(params[module][leaf]).reshape(-1)[np.asarray(d.indices)]
        assert _bits_equal(saved["deltas"][path], want)
    assert saved["dense"]["c.bias"] is params["c"]["bias"]


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), donate=st.booleans())
def test_switch_equals_unmerge_then_merge(seed, donate):
    rng = np.random.default_rng(seed)
    params = _params(rng)
    first = _adapter(rng, paths=("a.kernel", "b.kernel"), dense=("c.bias",))
    second = _adapter(rng, paths=("b.kernel", "c.kernel"), dense=())
    snapshot = jax.tree_util.tree_map(np.array, params)
    merged, saved = merge_lib.merge(params, first)
    want, want_saved = merge_lib.merge(merge_lib.unmerge(merged, first, saved), second)
    got, got_saved = merge_lib.switch(merged, first, saved, second, donate=donate)
    _assert_tree_bits(got, want)
    _assert_tree_bits(got_saved, want_saved)
    # `merged` shares untouched leaves with `params`: donating them invalidates both, hence the snapshot.
    _assert_tree_bits(merge_lib.unmerge(got, second, got_saved), snapshot)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), donate=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_switch_between_adapters_sharing_a_mask_is_one_scatter_and_exact(seed, donate, dtype):
    # Adapters trained from one mask (same seed) share their indices: the switch writes the saved
    # originals plus B's values in one scatter per weight. Same bits as unmerge + merge, whether the
    # indices are the same arrays, equal copies (as from two files) or differ on some paths.
    rng = np.random.default_rng(seed)
    params = _params(rng, dtype)
    first = _adapter(rng, paths=("a.kernel", "b.kernel", "c.kernel"), dense=())
    values = lambda d: jnp.asarray(rng.standard_normal(d.k).astype(np.float32))  # noqa: E731
    fa, fb, fc = (first.deltas[p] for p in ("a.kernel", "b.kernel", "c.kernel"))
    second = Adapter(
        {
            "a.kernel": SparseDelta(fa.indices, values(fa), fa.shape),  # the same index array
            "b.kernel": SparseDelta(jnp.array(np.asarray(fb.indices)), values(fb), fb.shape),  # an equal copy
            "c.kernel": SparseDelta(
                jnp.asarray(np.setdiff1d(np.arange(21), fc.indices)[: fc.k].astype(np.int32)),
                values(fc),
                fc.shape,
            ),
        }
    )
    snapshot = jax.tree_util.tree_map(np.array, params)
    merged, saved = merge_lib.merge(params, first)
    want, want_saved = merge_lib.merge(merge_lib.unmerge(merged, first, saved), second)
    got, got_saved = merge_lib.switch(merged, first, saved, second, donate=donate)
    pairs = {p: (first.deltas[p].indices, second.deltas[p].indices) for p in second.deltas}
    assert merge_lib._shared_indices(pairs) == {"a.kernel", "b.kernel"}  # c: another mask
    _assert_tree_bits(got, want)
    _assert_tree_bits(got_saved, want_saved)
    _assert_tree_bits(merge_lib.unmerge(got, second, got_saved), snapshot)


def test_index_equality_is_compared_once_per_pair_of_arrays(monkeypatch):
    rng = np.random.default_rng(11)
    params = _params(rng)
    first = _adapter(rng, paths=("a.kernel",), dense=())
    d = first.deltas["a.kernel"]
    second = Adapter({"a.kernel": SparseDelta(jnp.array(np.asarray(d.indices)), d.values + 1, d.shape)})
    other = Adapter(
        {"a.kernel": SparseDelta(jnp.array(np.asarray(d.indices)[::-1].copy()), d.values, d.shape)}
    )
    calls = []
    real = merge_lib._indices_equal
    monkeypatch.setattr(merge_lib, "_indices_equal", lambda pairs: calls.append(sorted(pairs)) or real(pairs))
    merged, saved = merge_lib.merge(params, first)
    for _ in range(3):
        merged, saved = merge_lib.switch(merged, first, saved, second)
        merged, saved = merge_lib.switch(merged, second, saved, first)
    assert calls == [["a.kernel"], ["a.kernel"]]  # first -> second, second -> first; then remembered
    assert merge_lib._shared_indices({"a.kernel": (d.indices, other.deltas["a.kernel"].indices)}) == set()
    _assert_tree_bits(merged, merge_lib.merge(params, first)[0])


def test_merge_inplace_donates_the_targeted_weights_only():
    rng = np.random.default_rng(1)
    params = _params(rng)
    expected = _np_merge(params, _adapter(np.random.default_rng(2)))
    adapter = _adapter(np.random.default_rng(2))
    a_before, c_kernel = params["a"]["kernel"], params["c"]["kernel"]
    merged, saved = merge_lib.merge_inplace(params, adapter)
    _assert_tree_bits(merged, expected)
    assert a_before.is_deleted()
    assert not c_kernel.is_deleted() and merged["c"]["kernel"] is c_kernel
    restored = merge_lib.unmerge(merged, adapter, saved, donate=True)
    assert merged["a"]["kernel"].is_deleted()
    assert _bits_equal(restored["c"]["kernel"], c_kernel)


def test_merge_without_donation_keeps_callers_arrays():
    rng = np.random.default_rng(3)
    params = _params(rng)
    snapshot = jax.tree_util.tree_map(np.array, params)
    merge_lib.merge(params, _adapter(rng))
    _assert_tree_bits(params, snapshot)


def test_compiled_once_per_adapter_structure():
    rng = np.random.default_rng(4)
    params = _params(rng)
    adapter = _adapter(rng)
    merge_lib.merge(params, adapter)
    size = merge_lib._scatter_copy._cache_size()
    same_structure = Adapter(
        {p: SparseDelta(d.indices, d.values * 2, d.shape) for p, d in adapter.deltas.items()}, adapter.dense
    )
    merge_lib.merge(params, same_structure)
    assert merge_lib._scatter_copy._cache_size() == size


def test_low_rank_merge_goes_through_apply_and_unmerges_exactly():
    rng = np.random.default_rng(5)
    params = _params(rng)
    lr = LowRankDelta(
        jnp.asarray(rng.standard_normal((6, 2)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 5)), jnp.float32),
        scale=0.5,
    )
    adapter = Adapter({"a.kernel": lr, "b.kernel": _sparse(rng, (4, 9), 5)})
    merged, saved = merge_lib.merge(params, adapter)
    want = np.asarray(params["a"]["kernel"]) + np.asarray(lr.a) @ np.asarray(lr.b) * 0.5
    np.testing.assert_allclose(np.asarray(merged["a"]["kernel"]), want, atol=1e-5)
    _assert_tree_bits(merge_lib.unmerge(merged, adapter, saved), params)


def _np_dense_delta(adapter, path):
    d = adapter.deltas[path]
    out = np.zeros(int(np.prod(d.shape)), np.float32)
    np.add.at(out, np.asarray(d.indices), np.asarray(d.values))
    return out


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4))
def test_fuse_adds_overlapping_entries(seed, n):
    rng = np.random.default_rng(seed)
    adapters = [
        _adapter(
            rng, paths=tuple(rng.choice(["a.kernel", "b.kernel", "c.kernel"], 2, replace=False)), dense=()
        )
        for _ in range(n)
    ]
    weights = [float(w) for w in rng.standard_normal(n)]
    fused = merge_lib.fuse(adapters, weights)
    for path, d in fused.deltas.items():
        idx = np.asarray(d.indices)
        assert idx.dtype == np.int32 and np.all(np.diff(idx) > 0)
        want = sum(
            w * _np_dense_delta(a, path) for a, w in zip(adapters, weights, strict=True) if path in a.deltas
        )
        union = np.unique(
            np.concatenate([np.asarray(a.deltas[path].indices) for a in adapters if path in a.deltas])
        )
        np.testing.assert_array_equal(idx, union)
        np.testing.assert_allclose(want[idx], np.asarray(d.values), rtol=1e-5, atol=1e-5)
    assert set(fused.deltas) == {p for a in adapters for p in a.deltas}


def test_fuse_of_one_is_itself_and_merging_a_fusion_is_merging_the_sum():
    rng = np.random.default_rng(6)
    params = _params(rng)
    a, b = _adapter(rng, dense=()), _adapter(rng, dense=("c.bias",))
    single = merge_lib.fuse([a])
    for p in a.deltas:
        _assert_tree_bits(single.deltas[p], a.deltas[p])
    merged, _ = merge_lib.merge(params, merge_lib.fuse([a, b]))
    both = delta_lib.apply(delta_lib.apply(params, a), b)
    for x, y in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(both), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_fuse_errors():
    rng = np.random.default_rng(7)
    a = _adapter(rng)
    with pytest.raises(AdapterError, match=r"dense leaf 'c\.bias' is in several adapters"):
        merge_lib.fuse([a, a])
    wrong = Adapter({"a.kernel": SparseDelta(jnp.array([0], jnp.int32), jnp.ones(1), (5, 6))})
    with pytest.raises(AdapterError, match=r"'a\.kernel' disagree on the weight shape"):
        merge_lib.fuse([Adapter(a.deltas), wrong])
    with pytest.raises(ValueError, match="at least one"):
        merge_lib.fuse([])
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        merge_lib.fuse([a, a], [1.0])


def _one(indices, values, shape=(6, 5), path="a.kernel", dtype=jnp.int32):
    return Adapter({path: SparseDelta(jnp.asarray(indices, dtype), jnp.asarray(values, jnp.float32), shape)})


@pytest.mark.parametrize(
    "adapter,match",
    [
        (_one([0], [1.0], path="a.weight"), r"'a\.weight' is not a parameter of the model"),
        (_one([0], [1.0], path="zz.kernel"), r"'zz\.kernel' is not a parameter"),
        (_one([0], [1.0], shape=(5, 6)), r"made for shape \(5, 6\), the weight is \(6, 5\)"),
        (_one([0, 30], [1.0, 1.0]), r"'a\.kernel': indices must lie in \[0, 30\).*found 30"),
        (_one([-1, 3], [1.0, 1.0]), "found -1"),
        (_one([3, 2], [1.0, 1.0]), r"sorted and unique \(entry 1 is 2, after 3\)"),
        (_one([2, 2, 4], [1.0, 1.0, 1.0]), r"sorted and unique \(entry 1 is 2, after 2\)"),
        (_one([1, 2], [1.0, float("nan")]), r"'a\.kernel': values contain 1 NaN/inf"),
        (_one([1, 2], [float("inf"), float("-inf")]), "values contain 2 NaN/inf"),
        (_one(list(range(31)), [0.0] * 31), "k=31 entries exceed the weight's 30"),
        (_one([1, 2], [1.0]), "2 indices but 1 values"),
        (
            Adapter({"a.kernel": SparseDelta(jnp.array([1.0]), jnp.ones(1), (6, 5))}),
            "indices must be a 1-D integer",
        ),
        (
            Adapter({"a.kernel": SparseDelta(jnp.array([1]), jnp.array([1]), (6, 5))}),
            "values must be a 1-D float",
        ),
        (
            Adapter({}, {"c.bias": jnp.zeros(4)}),
            r"dense leaf 'c\.bias': float32 \(4,\), the model's is float32 \(3,\)",
        ),
        (Adapter({}, {"c.bias": jnp.zeros(3, jnp.float16)}), "float16"),
        (Adapter({}, {"c.bias": jnp.array([0.0, jnp.nan, 0.0])}), r"'c\.bias': dense contain 1 NaN"),
        (
            Adapter({"c.bias": _one([0], [1.0], (3,)).deltas["a.kernel"]}, {"c.bias": jnp.zeros(3)}),
            "both a delta and a dense",
        ),
        (Adapter({"a.kernel": LowRankDelta(jnp.ones((5, 2)), jnp.ones((2, 5)))}), r"a \(5, 2\) @ b \(2, 5\)"),
    ],
)
def test_validation_errors_name_path_and_expectation(adapter, match):
    params = _params(np.random.default_rng(0))
    with pytest.raises(AdapterError, match=match):
        merge_lib.validate(params, adapter)
    with pytest.raises(AdapterError, match=match):
        merge_lib.merge(params, adapter)


def test_integer_weight_is_rejected():
    params = {"a": {"kernel": jnp.zeros((6, 5), jnp.int32)}}
    with pytest.raises(AdapterError, match="dtype int32, expected a float dtype"):
        merge_lib.validate(params, _one([0], [1.0]))


def test_unmerge_and_switch_check_saved():
    rng = np.random.default_rng(8)
    params = _params(rng)
    a, b = _adapter(rng), _adapter(rng, paths=("c.kernel",), dense=())
    merged, saved = merge_lib.merge(params, a)
    with pytest.raises(AdapterError, match="was it saved by merging this adapter"):
        merge_lib.unmerge(merged, b, saved)
    with pytest.raises(AdapterError, match="second value merge"):
        merge_lib.unmerge(merged, a, {"deltas": saved["deltas"]})
    bad = {"deltas": dict(saved["deltas"]), "dense": saved["dense"]}
    bad["deltas"]["a.kernel"] = (
        bad["deltas"]["a.kernel"][:-1] if bad["deltas"]["a.kernel"].shape[0] > 1 else jnp.zeros(2)
    )
    with pytest.raises(AdapterError, match=r"`saved` for 'a\.kernel'"):
        merge_lib.switch(merged, a, bad, b)


def _count_device_checks(monkeypatch):
    calls = []
    original = merge_lib._device_stats

    def counting(indices, floats):
        calls.append(sorted(indices))
        return original(indices, floats)

    monkeypatch.setattr(merge_lib, "_device_stats", counting)
    return calls


def test_full_validation_runs_once_per_index_array(monkeypatch):
    # validate() (what load_adapter runs) remembers the checked indices: merge / switch / unmerge of
    # that adapter then do only the host-side structural checks, with the same results.
    rng = np.random.default_rng(9)
    params = _params(rng)
    a, b = _adapter(rng, dense=()), _adapter(rng, dense=())
    calls = _count_device_checks(monkeypatch)
    merge_lib.validate(params, a)
    assert len(calls) == 1
    merged, saved = merge_lib.merge(params, a)
    merged, saved = merge_lib.switch(merged, a, saved, b)  # b was never validated: checked in full now
    assert len(calls) == 2
    merged, saved = merge_lib.switch(merged, b, saved, a)
    _assert_tree_bits(merge_lib.unmerge(merged, a, saved), params)
    trained = Adapter({p: SparseDelta(d.indices, d.values + 1.0, d.shape) for p, d in a.deltas.items()})
    merge_lib.merge(params, trained)  # new values, same index arrays: no device pass
    assert len(calls) == 2
    _assert_tree_bits(merge_lib.merge(params, trained)[0], _np_merge(params, trained))


def test_remembered_indices_still_get_the_structural_checks():
    rng = np.random.default_rng(10)
    params = _params(rng)
    a = _adapter(rng, paths=("a.kernel",), dense=())
    merge_lib.validate(params, a)
    d = a.deltas["a.kernel"]
    with pytest.raises(AdapterError, match=r"made for shape \(5, 6\), the weight is \(6, 5\)"):
        merge_lib.merge(params, Adapter({"a.kernel": SparseDelta(d.indices, d.values, (5, 6))}))
    with pytest.raises(AdapterError, match=r"'b\.kernel': made for shape \(6, 5\)"):
        merge_lib.merge(params, Adapter({"b.kernel": d}))
    with pytest.raises(AdapterError, match=r"10 indices but 3 values"):
        merge_lib.merge(params, Adapter({"a.kernel": SparseDelta(d.indices, d.values[:3], d.shape)}))


def test_a_fitted_delta_skips_the_per_path_checks_only_for_the_weight_it_fitted(monkeypatch):
    # After one merge of a validated adapter, later merges skip the per-path checks (a few hundred
    # paths per call on a real model); a weight of another dtype or shape is checked again.
    rng = np.random.default_rng(12)
    params = _params(rng)
    a = _adapter(rng, dense=())
    merge_lib.validate(params, a)
    merge_lib.merge(params, a)
    checks = []
    real = merge_lib._check_sparse
    monkeypatch.setattr(merge_lib, "_check_sparse", lambda *args: (checks.append(args[0]), real(*args)))
    merged, _ = merge_lib.merge(params, a)
    assert checks == []
    _assert_tree_bits(merged, _np_merge(params, a))
    as_ints = {**params, "a": {**params["a"], "kernel": params["a"]["kernel"].astype(jnp.int32)}}
    with pytest.raises(
        AdapterError, match=r"'a\.kernel': the weight has dtype int32, expected a float dtype"
    ):
        merge_lib.merge(as_ints, a)
    assert checks == ["a.kernel"]
    other = _params(rng, dtype=np.float16)  # float16 weights fit too: checked once, then remembered
    merge_lib.merge(other, a)
    assert checks == ["a.kernel", "a.kernel", "b.kernel"]


def test_indices_checked_for_one_shape_are_checked_again_for_another():
    # The same index array, in range for a 36-entry weight, is out of range for the 30-entry one.
    params = _params(np.random.default_rng(11))
    indices = jnp.array([1, 33], jnp.int32)
    big = {"a": {"kernel": jnp.zeros((6, 6))}}
    merge_lib.validate(big, Adapter({"a.kernel": SparseDelta(indices, jnp.ones(2), (6, 6))}))
    with pytest.raises(AdapterError, match=r"indices must lie in \[0, 30\).*found 33"):
        merge_lib.merge(params, Adapter({"a.kernel": SparseDelta(indices, jnp.ones(2), (6, 5))}))


def test_numpy_indices_are_checked_on_every_merge(monkeypatch):
    # A NumPy array can change in place after a check, so it is never remembered.
    params = _params(np.random.default_rng(12))
    indices = np.array([1, 3], np.int32)
    adapter = Adapter({"a.kernel": SparseDelta(indices, jnp.ones(2), (6, 5))})
    calls = _count_device_checks(monkeypatch)
    merge_lib.merge(params, adapter)
    indices[1] = 30
    with pytest.raises(AdapterError, match="found 30"):
        merge_lib.merge(params, adapter)
    assert len(calls) == 2
