"""Fake quantization: forward = dequant(quant(w)) on a fixed grid (NumPy oracle), gradient = identity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.quant.fake_quant import fake_quant, fake_quant_like
from jaxsparse.quant.grid import dequantize, rtn_quantize


def test_forward_is_round_trip_on_the_base_grid():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(32, 8)).astype(np.float32)
    qw = rtn_quantize(base, bits=4, group_size=16)
    np.testing.assert_array_equal(fake_quant_like(jnp.asarray(base), qw), dequantize(qw))
    w = base + rng.normal(size=base.shape).astype(np.float32) * 0.05
    w[3, 2] = 0.0
    s, z = np.asarray(qw.scales)[np.arange(32) // 16], np.asarray(qw.zeros)[np.arange(32) // 16]
    expect = s * (np.clip(np.round(w / s) + z, 0, 15) - z)
    got = np.asarray(fake_quant(jnp.asarray(w), qw.scales, qw.zeros, 4, 16))
    np.testing.assert_array_equal(got, expect.astype(np.float32))
    assert got[3, 2] == 0.0


def test_straight_through_gradient():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(16, 4)).astype(np.float32))
    qw = rtn_quantize(w, bits=2, group_size=8)
    c = jnp.asarray(rng.normal(size=(16, 4)).astype(np.float32))

    def loss(v, scales):
        return jnp.sum(fake_quant(v * 3.0, scales, qw.zeros, 2, 8) * c)  # includes clipped values

    gw, gs = jax.grad(loss, argnums=(0, 1))(w, qw.scales)
    np.testing.assert_allclose(gw, 3.0 * c, rtol=1e-6)
    assert np.all(np.asarray(gs) == 0.0)  # the grid is frozen
    jax.jit(jax.grad(loss))(w, qw.scales)  # traceable


def test_act_order_g_idx_and_shape_errors():
    w = jnp.ones((16, 8))
    qw = rtn_quantize(w, bits=4, group_size=8)
    perm_g = jnp.asarray(np.r_[np.ones(8, np.int32), np.zeros(8, np.int32)])
    out = fake_quant(w, qw.scales, qw.zeros, 4, 8, g_idx=perm_g)
    assert out.shape == (16, 8)
    with pytest.raises(ValueError, match="do not fit a"):
        fake_quant(w, qw.scales[:1], qw.zeros[:1], 4, 8)
