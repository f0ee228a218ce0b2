"""Index selection: counts, ordering, determinism, uniformity, oracles, and each bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse import masks


def _assert_valid(idx, numel, k):
    idx = np.asarray(idx)
    assert idx.dtype == np.int32 and idx.shape == (k,)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < numel


@settings(max_examples=20, deadline=None)
@given(
    shape=st.sampled_from([(1, 1), (3, 7), (16, 16), (64, 48), (5,), (2, 3, 4)]),
    density=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_density_count_order_and_range(shape, density, seed):
    numel = int(np.prod(shape))
    idx = masks.random_density(jax.random.key(seed), shape, density)
    _assert_valid(idx, numel, max(1, round(density * numel)))


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 8), seed=st.integers(0, 1000))
def test_shira_count_is_r_times_m_plus_n(m, n, r, seed):
    if r * (m + n) > m * n:
        with pytest.raises(ValueError, match=r"layer\.kernel: SHiRA r="):
            masks.shira_count((m, n), r, path="layer.kernel")
        return
    k = masks.shira_count((m, n), r, path="layer.kernel")
    assert k == r * (m + n)
    _assert_valid(masks.random_count(jax.random.key(seed), (m, n), k), m * n, k)


def test_shira_count_needs_2d_and_positive_r():
    with pytest.raises(ValueError, match="2-D"):
        masks.shira_count((4, 4, 4), 1, path="x")
    with pytest.raises(ValueError, match="r must be >= 1"):
        masks.shira_count((4, 4), 0, path="x")


def test_random_is_deterministic_per_key_and_differs_per_path():
    key = jax.random.key(7)
    ka, kb = masks.path_key(key, "a.kernel"), masks.path_key(key, "b.kernel")
    a1 = masks.random_density(ka, (64, 64), 0.05)
    a2 = masks.random_density(masks.path_key(jax.random.key(7), "a.kernel"), (64, 64), 0.05)
    b = masks.random_density(kb, (64, 64), 0.05)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    assert not np.array_equal(np.asarray(a1), np.asarray(b))
    legacy = masks.random_density(masks.path_key(jax.random.PRNGKey(7), "a.kernel"), (64, 64), 0.05)
    assert legacy.shape == a1.shape  # raw uint32 keys work too


@pytest.mark.parametrize("numel,k", [(40, 3), (8, 5)])  # the oversampling path and the shuffle path
def test_random_count_is_uniform(numel, k):
    trials = 400
    counts = np.zeros(numel)
    for t in range(trials):
        counts[np.asarray(masks.random_count(jax.random.key(t), (numel,), k))] += 1
    expected = trials * k / numel
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    # chi-square with numel-1 dof: mean numel-1, sd sqrt(2(numel-1)); 6 sd above is a real bias.
    assert chi2 < (numel - 1) + 6 * np.sqrt(2 * (numel - 1)), counts


def test_random_count_large_weight_low_density_is_exact_and_fast():
    idx = masks.random_count(jax.random.key(0), (2048, 2048), 4000)
    _assert_valid(idx, 2048 * 2048, 4000)


def test_random_count_rejects_bad_k_and_huge_weights_without_x64():
    with pytest.raises(ValueError, match="k=0"):
        masks.random_count(jax.random.key(0), (4, 4), 0)
    with pytest.raises(ValueError, match="k=17"):
        masks.random_count(jax.random.key(0), (4, 4), 17)
    with pytest.raises(ValueError, match="density"):
        masks.random_density(jax.random.key(0), (4, 4), 0.0)
    with pytest.raises(ValueError, match="int64"):
        masks.random_count(jax.random.key(0), (2**16, 2**16), 1)


def test_top_magnitude_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 9)).astype(np.float32)
    got = masks.top_magnitude(jnp.asarray(w), 20)
    want = np.sort(np.argsort(-np.abs(w).reshape(-1), kind="stable")[:20])
    np.testing.assert_array_equal(np.asarray(got), want)
    _assert_valid(got, w.size, 20)


def test_top_score_rejects_nan_and_bad_k():
    scores = jnp.array([[1.0, jnp.nan]])
    with pytest.raises(ValueError, match=r"q\.kernel: scores contain NaN"):
        masks.top_score(scores, 1, path="q.kernel")
    with pytest.raises(ValueError, match="k=3"):
        masks.top_score(jnp.ones((1, 2)), 3, path="q.kernel")


def test_accumulate_grad_scores_matches_closed_form():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    params = {"lin": {"kernel": jnp.asarray(w)}, "other": {"kernel": jnp.zeros((2, 2))}}
    batches = [
        (rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32))
        for _ in range(3)
    ]

    def loss(p, batch):
        x, y = batch
        return jnp.sum((x @ p["lin"]["kernel"] - y) ** 2)

    scores = masks.accumulate_grad_scores(jax.grad(loss), params, batches, ["lin.kernel"])
    want = sum(np.abs(2 * x.T @ (x @ w - y)) for x, y in batches)
    np.testing.assert_allclose(np.asarray(scores["lin.kernel"]), want, rtol=1e-5, atol=1e-5)
    assert list(scores) == ["lin.kernel"]
    with pytest.raises(ValueError, match="no batch"):
        masks.accumulate_grad_scores(jax.grad(loss), params, [], ["lin.kernel"])
    with pytest.raises(ValueError, match=r"lin\.kernel: grad_fn returned a gradient of shape \(3, 5\)"):
        bad = lambda p, b: {"lin": {"kernel": jnp.zeros((3, 5))}}  # noqa: E731
        masks.accumulate_grad_scores(bad, params, batches, ["lin.kernel"])


def _first_k(k):
    return lambda w, r, key: (np.arange(w.size) < k).reshape(w.shape)


def test_from_mask_fn_accepts_bool_and_01_masks():
    w = jnp.zeros((6, 4))
    k = 10
    got = masks.from_mask_fn(_first_k(k), w, 1, jax.random.key(0), path="p")
    np.testing.assert_array_equal(np.asarray(got), np.arange(k))
    as_float = lambda w, r, key: _first_k(k)(w, r, key).astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(
        np.asarray(masks.from_mask_fn(as_float, w, 1, None, path="p")), np.arange(k)
    )


def test_from_mask_fn_passes_weight_r_and_key():
    seen = {}

    def fn(w, r, key):
        seen.update(shape=w.shape, r=r, key=key)
        return _first_k(r * sum(w.shape))(w, r, key)

    key = jax.random.key(3)
    masks.from_mask_fn(fn, jnp.zeros((8, 8)), 2, key, path="p")
    assert seen["shape"] == (8, 8) and seen["r"] == 2 and seen["key"] is key


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda w, r, key: np.ones((4, 6), bool), r"mlp\.kernel: mask_fn returned shape \(4, 6\)"),
        (lambda w, r, key: np.full(w.shape, 0.5), "bool or 0/1 mask"),
        (lambda w, r, key: np.ones(w.shape, bool), r"selected 24 entries, expected exactly r\*\(m\+n\) = 10"),
        (_first_k(9), "selected 9 entries"),
    ],
)
def test_from_mask_fn_errors_name_the_path(fn, match):
    with pytest.raises(ValueError, match=match):
        masks.from_mask_fn(fn, jnp.zeros((6, 4)), 1, jax.random.key(0), path="mlp.kernel")
