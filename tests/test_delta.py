"""Delta leaves: apply against a NumPy oracle, gradients w.r.t. values, trainable-only optimisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse import delta as delta_lib
from jaxsparse.delta import Adapter, LowRankDelta, SparseDelta


def _sparse(rng, shape, k, dtype=np.float32):
    idx = np.sort(rng.choice(int(np.prod(shape)), size=k, replace=False)).astype(np.int32)
    return SparseDelta(jnp.asarray(idx), jnp.asarray(rng.standard_normal(k).astype(dtype)), tuple(shape))


def test_sparse_apply_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    d = _sparse(rng, w.shape, 9)
    want = w.copy().reshape(-1)
    want[np.asarray(d.indices)] += np.asarray(d.values)
    np.testing.assert_array_equal(np.asarray(d.apply(jnp.asarray(w))), want.reshape(w.shape))


def test_sparse_apply_on_bfloat16_sums_in_float32():
    w = jnp.asarray([[1.0, 256.0]], jnp.bfloat16)
    d = SparseDelta(jnp.array([0, 1], jnp.int32), jnp.array([0.00390625, 1.5], jnp.float32), (1, 2))
    out = d.apply(w)
    assert out.dtype == jnp.bfloat16
    want = (np.asarray(w, np.float32).reshape(-1) + np.array([0.00390625, 1.5], np.float32)).astype(
        jnp.bfloat16
    )
    np.testing.assert_array_equal(np.asarray(out).reshape(-1), want)


def test_low_rank_apply_matches_numpy_oracle():
    rng = np.random.default_rng(1)
    w, a, b = (rng.standard_normal(s).astype(np.float32) for s in ((6, 5), (6, 3), (3, 5)))
    rank_mask = np.array([1.0, 0.0, 1.0], np.float32)
    mask = rng.random((6, 5)) > 0.5
    d = LowRankDelta(jnp.asarray(a), jnp.asarray(b), jnp.asarray(rank_mask), jnp.asarray(mask), scale=0.5)
    want = w + np.where(mask, (a * rank_mask) @ b * 0.5, 0)
    np.testing.assert_allclose(np.asarray(d.apply(jnp.asarray(w))), want, atol=1e-5)
    assert d.rank == 3


def _loss(w, x, y):
    return jnp.sum((jnp.tanh(x @ w) - y) ** 2)


@settings(max_examples=6, deadline=None)
@given(shape=st.sampled_from([(1, 1), (3, 5), (8, 4)]), frac=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_grad_wrt_values_is_dense_grad_gathered(shape, frac, seed):
    m, n = shape
    rng = np.random.default_rng(seed)
    k = max(1, int(frac * m * n))
    w = jnp.asarray(rng.standard_normal((m, n)).astype(np.float32))
    d = _sparse(rng, (m, n), k)
    x = jnp.asarray(rng.standard_normal((3, m)).astype(np.float32))
    y = jnp.asarray(rng.standard_normal((3, n)).astype(np.float32))

    def via_values(values):
        return _loss(SparseDelta(d.indices, values, d.shape).apply(w), x, y)

    got = jax.grad(via_values)(d.values)
    dense = jax.grad(_loss)(d.apply(w), x, y)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(dense).reshape(-1)[np.asarray(d.indices)], atol=1e-5
    )


def _mlp_params(rng):
    return {
        "l1": {
            "kernel": jnp.asarray(rng.standard_normal((8, 16)).astype(np.float32) * 0.3),
            "bias": jnp.zeros(16),
        },
        "l2": {
            "kernel": jnp.asarray(rng.standard_normal((16, 4)).astype(np.float32) * 0.3),
            "bias": jnp.zeros(4),
        },
    }


def _mlp(params, x):
    h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
    return h @ params["l2"]["kernel"] + params["l2"]["bias"]


def test_apply_replaces_dense_leaves_and_leaves_others():
    rng = np.random.default_rng(2)
    params = _mlp_params(rng)
    adapter = Adapter({"l1.kernel": _sparse(rng, (8, 16), 5)}, dense={"l2.bias": jnp.ones(4)})
    out = delta_lib.apply(params, adapter)
    np.testing.assert_array_equal(np.asarray(out["l2"]["bias"]), np.ones(4))
    assert out["l2"]["kernel"] is params["l2"]["kernel"]
    assert int(jnp.sum(out["l1"]["kernel"] != params["l1"]["kernel"])) == 5


def test_optax_trains_only_the_selected_entries_with_state_of_size_k():
    rng = np.random.default_rng(3)
    params = _mlp_params(rng)
    x = jnp.asarray(rng.standard_normal((32, 8)).astype(np.float32))
    y = jnp.asarray(rng.standard_normal((32, 4)).astype(np.float32))
    d1 = SparseDelta(_sparse(rng, (8, 16), 12).indices, jnp.zeros(12), (8, 16))
    d2 = SparseDelta(_sparse(rng, (16, 4), 6).indices, jnp.zeros(6), (16, 4))
    adapter = Adapter({"l1.kernel": d1, "l2.kernel": d2}, dense={"l2.bias": jnp.zeros(4)})
    assert adapter.num_trainable() == 12 + 6 + 4

    def loss(leaves):
        effective = delta_lib.apply(params, delta_lib.with_trainable(adapter, leaves))
        return jnp.mean((_mlp(effective, x) - y) ** 2)

    opt = optax.adam(0.05)
    leaves = delta_lib.trainable(adapter)
    state = opt.init(leaves)
    sizes = {x.size for x in jax.tree_util.tree_leaves(state) if hasattr(x, "size")}
    assert max(sizes) <= 12  # nothing of a base weight's size (128 or 64 entries)

    @jax.jit
    def step(leaves, state):
        value, grads = jax.value_and_grad(loss)(leaves)
        updates, state = opt.update(grads, state, leaves)
        return optax.apply_updates(leaves, updates), state, value

    first = None
    for _ in range(20):
        leaves, state, value = step(leaves, state)
        first = value if first is None else first
    assert float(loss(leaves)) < 0.9 * float(first)
    trained = delta_lib.apply(params, delta_lib.with_trainable(adapter, leaves))
    for name, d in (("l1", d1), ("l2", d2)):
        changed = np.flatnonzero(np.asarray(trained[name]["kernel"] != params[name]["kernel"]).reshape(-1))
        assert set(changed) <= set(np.asarray(d.indices).tolist()) and len(changed) > 0


def test_trainable_round_trip_and_pytree_behaviour():
    rng = np.random.default_rng(4)
    adapter = Adapter({"l1.kernel": _sparse(rng, (8, 16), 3)}, config=("cfg",))
    leaves = delta_lib.trainable(adapter)
    assert set(leaves["deltas"]["l1.kernel"]) == {"values"}
    again = delta_lib.with_trainable(adapter, leaves)
    assert again.deltas["l1.kernel"].indices is adapter.deltas["l1.kernel"].indices
    doubled = jax.jit(lambda a: jax.tree_util.tree_map(lambda v: v * 2, a))(adapter)
    assert doubled.config == ("cfg",) and doubled.deltas["l1.kernel"].shape == (8, 16)
