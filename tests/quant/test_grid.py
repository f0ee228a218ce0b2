"""RTN group quantization: every value on its group's grid, within scale/2 of the original, grids equal
to an independent NumPy derivation, zeros exactly zero."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.quant.grid import ceil_to_float16, check_spec, dequantize, group_grid, rtn_quantize
from tests.quant import reference


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [16, 64, -1])
def test_rtn_on_grid_and_within_half_a_step(bits, sym, group_size):
    rng = np.random.default_rng(bits * 10 + sym)
    w = rng.normal(size=(64, 24)).astype(np.float32) * rng.uniform(0.01, 2.0, size=(1, 24)).astype(np.float32)
    w[:16, 3] = np.abs(w[:16, 3])  # a group with no negative value (asymmetric zero point 1)
    w[16:32, 4] = 0.0  # an all-zero group
    w[5, 7] = 0.0
    qw = rtn_quantize(w, bits=bits, group_size=group_size, sym=sym)
    codes, scales, zeros, g_idx = (np.asarray(a) for a in (qw.codes, qw.scales, qw.zeros, qw.g_idx))
    g = 64 if group_size == -1 else group_size
    np.testing.assert_array_equal(g_idx, np.arange(64) // g)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert np.all(scales.astype(np.float16).astype(np.float32) == scales)  # float16-exact
    if sym:
        assert np.all(zeros == 2 ** (bits - 1))
    else:
        assert zeros.min() >= 1 and zeros.max() <= 2**bits - 1  # storable as zero - 1
    deq = np.asarray(dequantize(qw))
    step = scales[g_idx]
    np.testing.assert_array_equal(deq, step * (codes.astype(np.float32) - zeros[g_idx]))  # on the grid
    assert np.all(np.abs(deq - w) <= step / 2 * (1 + 1e-6))
    assert deq[5, 7] == 0.0 and np.all(deq[16:32, 4] == 0.0)
    # The grid of each group equals the NumPy derivation of the documented rules.
    for k in range(64 // g):
        s, z = reference.grid(w[k * g : (k + 1) * g].astype(np.float64), bits, sym)
        np.testing.assert_allclose(scales[k], s, rtol=1e-3)
        assert np.mean(zeros[k] != z) <= 1 / 24


def test_rtn_equals_numpy_round_to_nearest():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(32, 8)).astype(np.float32)
    qw = rtn_quantize(w, bits=4, group_size=16)
    s, z = np.asarray(qw.scales)[qw.g_idx], np.asarray(qw.zeros)[qw.g_idx]
    expect = np.clip(np.round(w / s) + z, 0, 15)
    np.testing.assert_array_equal(np.asarray(qw.codes), expect)


def test_mask_forces_exact_zeros():
    w = np.ones((16, 8), np.float32)
    mask = np.zeros((16, 8), bool)
    mask[::2] = True
    deq = np.asarray(dequantize(rtn_quantize(w, bits=4, group_size=8, mask=mask)))
    assert np.all(deq[~mask] == 0.0) and np.all(deq[mask] != 0.0)


def test_group_grid_examples_and_float16_ceiling():
    s, z = group_grid(jnp.array([[0.0], [1.5]]), bits=4, sym=False)  # all >= 0: zero point 1
    assert int(z[0]) == 1 and float(s[0]) >= 1.5 / 14
    s, z = group_grid(jnp.zeros((4, 1)), bits=4, sym=True)  # all zero: range [-1, 1]
    assert int(z[0]) == 8 and float(s[0]) == pytest.approx(2 / 15, rel=1e-3)
    x = jnp.array([0.1, 1e-9, 3.0e4], jnp.float32)
    c = np.asarray(ceil_to_float16(x))
    assert np.all(c >= np.asarray(x)) and np.all(c.astype(np.float16).astype(np.float32) == c)


@pytest.mark.parametrize(
    ("bits", "group", "width", "message"),
    [
        (3, 128, 256, "bits must be one of (2, 4, 8), got 3"),
        (4, 0, 256, "group size must be a positive integer or -1"),
        (4, 96, 256, "group size 96 does not divide the input width 256"),
    ],
)
def test_bad_spec(bits, group, width, message):
    with pytest.raises(ValueError) as e:
        check_spec(bits, group, width)
    assert message in str(e.value)
    with pytest.raises(ValueError):
        rtn_quantize(np.ones((width, 8), np.float32), bits=bits, group_size=group)
