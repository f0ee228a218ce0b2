"""Masks: exact zero counts per PyTorch output row (unstructured), at most N per M (N:M), bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse.prune import Pattern, check_sparsity, keep_mask, pruned_per_row


@settings(max_examples=25, deadline=None)
@given(
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 6),
    sparsity=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_unstructured_rows_have_exactly_the_requested_zeros(in_features, out_features, sparsity, seed):
    score = np.random.default_rng(seed).random((in_features, out_features)).astype(np.float32)
    keep = np.asarray(keep_mask(jnp.asarray(score), Pattern(), sparsity))
    k = int(np.floor(sparsity * in_features + 1e-9))
    # a PyTorch row is a column of the (in, out) kernel
    assert ((~keep).sum(axis=0) == k).all()
    for j in range(out_features):
        col = score[:, j]
        if 0 < k < in_features:  # every pruned score is below every kept one
            assert col[~keep[:, j]].max() <= col[keep[:, j]].min()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_masks_keep_the_n_best_of_every_m(n, m):
    rng = np.random.default_rng(n * 10 + m)
    score = rng.random((4 * m, 5)).astype(np.float32)
    keep = np.asarray(keep_mask(jnp.asarray(score), Pattern(n, m)))
    groups_keep = keep.T.reshape(5, 4, m)
    groups_score = score.T.reshape(5, 4, m)
    assert (groups_keep.sum(-1) == n).all()  # at most (here exactly) N non-zeros per M
    reference = np.argsort(groups_score, axis=-1)[..., m - n :]  # NumPy oracle: top-N indices
    expected = np.zeros_like(groups_keep)
    np.put_along_axis(expected, reference, True, axis=-1)
    np.testing.assert_array_equal(groups_keep, expected)


def test_nm_groups_run_along_the_input_dimension():
    # kernel (in=4, out=2): each output's 4 inputs form one group; a group across outputs would differ
    score = jnp.array([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]])
    keep = np.asarray(keep_mask(score, Pattern(2, 4)))
    np.testing.assert_array_equal(keep, [[False, True], [False, True], [True, False], [True, False]])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("5:4", r"N \(5\) must not exceed M \(4\)"),
        ("4:4", "0 < N < M"),
        ("0:4", "0 < N < M"),
        ("two:four", "expected 'unstructured' or 'N:M'"),
        ("2-4", "expected 'unstructured' or 'N:M'"),
    ],
)
def test_bad_patterns(text, match):
    with pytest.raises(ValueError, match=match):
        Pattern.parse(text)


def test_m_must_divide_the_input_width():
    with pytest.raises(ValueError, match="M=8 does not divide the input width 12"):
        keep_mask(jnp.ones((12, 3)), Pattern(4, 8))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        check_sparsity(bad)


def test_pruned_per_row_is_robust_to_float_rounding():
    assert pruned_per_row(10, 0.3) == 3 and pruned_per_row(100, 0.29) == 29 and pruned_per_row(5, 0.0) == 0
