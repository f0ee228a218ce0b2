"""Shared layers: dropout's rate and scaling (closed form), its keys per call site, and rate checks;
the exact GELU against PyTorch; heads-major attention against the (B, T, N, D) einsums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

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


def test_exact_gelu_and_its_gradient_equal_torch():
    x = np.linspace(-10, 10, 4001, dtype=np.float32)
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.gelu(tx).sum().backward()
    gelu = layers.activation("gelu")
    np.testing.assert_allclose(
        np.asarray(gelu(jnp.asarray(x))), torch.nn.functional.gelu(tx).detach().numpy(), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(jax.grad(lambda v: gelu(v).sum())(jnp.asarray(x))), tx.grad.numpy(), atol=1e-6
    )
    # and it stays within 1e-6 of the erfc formula everywhere (the relative error only grows where
    # both are below 1e-5 in magnitude, x < -4, as it does in torch's own kernel)
    np.testing.assert_allclose(
        np.asarray(gelu(jnp.asarray(x))),
        np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False)),
        atol=1e-6,
    )


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_heads_major_attention_equals_the_einsums_with_masks_and_gradients(kv_heads):
    q = jax.random.normal(jax.random.key(0), (2, 6, 4, 8))
    k, v = (jax.random.normal(jax.random.key(i), (2, 6, kv_heads, 8)) for i in (1, 2))
    mask = layers.combine_masks(
        layers.padding_mask(jnp.array([[1] * 6, [1] * 4 + [0] * 2])), layers.causal_mask(6, 6)
    )

    def run(heads_major):
        f = lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask, heads_major=heads_major)  # noqa: E731
        out, pull = jax.vjp(f, q, k, v)
        return out, pull(jnp.cos(out))

    (out, grads), (ref, ref_grads) = run(True), run(False)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)
