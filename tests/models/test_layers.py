"""Shared layers: dropout's rate and scaling (closed form), its keys per call site, and rate checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.models import layers


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_rate_and_scale(rate):
    n = 200_000
    y = np.asarray(layers.Dropout(jax.random.key(0))(jnp.full((n,), 2.0), rate))
    dropped = float((y == 0).mean())
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n)  # five binomial standard deviations
    np.testing.assert_allclose(y[y != 0], 2.0 / (1 - rate), rtol=1e-6)
    assert abs(float(y.mean()) - 2.0) < 0.05  # unbiased: E[y] = x


def test_each_call_site_draws_its_own_mask_and_the_key_reproduces_them():
    x = jnp.ones((64,))
    drop = layers.Dropout(jax.random.key(1))
    first, second = drop(x, 0.5), drop(x, 0.5)
    assert not np.array_equal(np.asarray(first), np.asarray(second))
    again = layers.Dropout(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(again(x, 0.5)), np.asarray(first))
    assert again(x, 0.0) is x  # rate 0 draws nothing and leaves the site count alone
    np.testing.assert_array_equal(np.asarray(again(x, 0.5)), np.asarray(second))


def test_dropout_refuses_a_rate_outside_zero_one():
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1.0"):
        layers.Dropout(jax.random.key(0))(jnp.ones(3), 1.0)


def test_attention_dropout_drops_probabilities():
    q = k = v = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    plain = layers.dot_product_attention(q, k, v)
    same = layers.dot_product_attention(q, k, v, dropout=layers.Dropout(jax.random.key(2)), dropout_rate=0.0)
    dropped = layers.dot_product_attention(
        q, k, v, dropout=layers.Dropout(jax.random.key(2)), dropout_rate=0.5
    )
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
    assert np.abs(np.asarray(dropped) - np.asarray(plain)).max() > 1e-3
