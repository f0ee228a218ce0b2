"""GPTQ: equals a plain NumPy GPTQ, beats RTN on the layer's own inputs, keeps pruned zeros at zero."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.quant.gptq import gptq_quantize, hessian, update_hessian
from jaxsparse.quant.grid import dequantize, rtn_quantize
from tests.quant import reference


def _layer(n_in=64, n_out=24, tokens=400, seed=0):
    rng = np.random.default_rng(seed)
    # Correlated inputs with a few loud features: the case GPTQ's compensation is made for.
    x = rng.normal(size=(tokens, n_in)) @ rng.normal(size=(n_in, n_in)) * 0.3
    x[:, :4] *= 8.0
    w = rng.normal(size=(n_in, n_out)) * 0.05
    return x.astype(np.float32), w.astype(np.float32)


def _err(x, w, v):
    return float(np.linalg.norm(x @ w - x @ np.asarray(v, np.float64)))


@pytest.mark.parametrize(
    "bits,group_size,sym,act_order",
    [
        (4, 16, False, False),
        (4, 16, True, True),
        (4, -1, False, True),
        (3 + 5, 32, False, False),
        (2, 64, True, False),
    ],
)
def test_gptq_matches_numpy_reference(bits, group_size, sym, act_order):
    x, w = _layer()
    h = np.asarray(hessian(x), np.float64)
    qw = gptq_quantize(w, h, bits=bits, group_size=group_size, sym=sym, act_order=act_order, block_size=32)
    codes, scales, zeros, g_idx = reference.gptq(
        w, h, bits=bits, group_size=group_size, sym=sym, act_order=act_order
    )
    np.testing.assert_array_equal(np.asarray(qw.g_idx), g_idx)
    # float32 (ours) vs float64 (reference): a rare rounding tie may flip one code, nothing more.
    assert np.mean(np.asarray(qw.codes) != codes) < 0.01
    np.testing.assert_allclose(np.asarray(qw.scales), scales, rtol=2e-3)
    assert np.mean(np.asarray(qw.zeros) != zeros) < 0.02
    ours, ref = _err(x, w, dequantize(qw)), _err(x, w, reference.dequant(codes, scales, zeros, g_idx))
    assert ours == pytest.approx(ref, rel=0.02)


@pytest.mark.parametrize("bits,group_size", [(4, 16), (2, 32), (8, -1)])
def test_gptq_beats_rtn_on_layer_inputs(bits, group_size):
    x, w = _layer(seed=1)
    h = hessian(x)
    rtn = _err(x, w, dequantize(rtn_quantize(w, bits=bits, group_size=group_size)))
    for act_order in (False, True):
        ours = _err(
            x, w, dequantize(gptq_quantize(w, h, bits=bits, group_size=group_size, act_order=act_order))
        )
        assert ours < 0.9 * rtn, (act_order, ours, rtn)


def test_block_size_does_not_change_the_result():
    x, w = _layer(seed=2)
    h = hessian(x)
    a = gptq_quantize(w, h, bits=4, group_size=16, block_size=16)
    b = gptq_quantize(w, h, bits=4, group_size=16, block_size=128)
    c = gptq_quantize(w, h, bits=4, group_size=-1, block_size=48)  # blocks of 32 inside one group
    d = gptq_quantize(w, h, bits=4, group_size=-1, block_size=64)
    np.testing.assert_allclose(dequantize(a), dequantize(b), atol=1e-5)
    np.testing.assert_allclose(dequantize(c), dequantize(d), atol=1e-5)


def test_pruned_zeros_stay_exactly_zero():
    x, w = _layer(seed=3)
    rng = np.random.default_rng(0)
    w[rng.random(w.shape) < 0.5] = 0.0  # unstructured 50%
    w[:, :2] = 0.0
    w[:8, 5] = 0.0
    h = hessian(x)
    for sym in (False, True):
        for act_order in (False, True):
            qw = gptq_quantize(w, h, bits=4, group_size=16, sym=sym, act_order=act_order)
            deq = np.asarray(dequantize(qw))
            assert np.all(deq[w == 0] == 0.0)
            np.testing.assert_array_equal(
                np.asarray(qw.codes)[w == 0], np.asarray(qw.zeros[qw.g_idx])[w == 0]
            )
            # The compensation went into the kept weights: still better than RTN of the sparse layer.
            rtn = dequantize(rtn_quantize(w, bits=4, group_size=16, sym=sym))
            assert _err(x, w, deq) < _err(x, w, rtn)
    # An explicit mask prunes while quantizing (the SparseGPT-style joint step).
    keep = rng.random(w.shape) < 0.7
    deq = np.asarray(dequantize(gptq_quantize(w, h, bits=4, group_size=16, mask=keep)))
    assert np.all(deq[~keep] == 0.0)


def test_dead_inputs_and_reference_agree():
    x, w = _layer(seed=4)
    x[:, 10] = 0.0  # a feature that never fires
    h = hessian(x)
    qw = gptq_quantize(w, h, bits=4, group_size=16)
    assert np.all(np.asarray(dequantize(qw))[10] == 0.0)
    codes = reference.gptq(w, np.asarray(h, np.float64), bits=4, group_size=16, sym=False)[0]
    assert np.mean(np.asarray(qw.codes) != codes) < 0.01


def test_running_hessian_equals_batch():
    x, _ = _layer()
    h, n = jnp.zeros((64, 64)), 0
    for chunk in np.array_split(x, 3):
        h, n = update_hessian(h, n, chunk)
    assert n == 400
    np.testing.assert_allclose(h, 2 * x.astype(np.float64).T @ x / 400, rtol=1e-4, atol=1e-3)


def test_bad_input():
    x, w = _layer()
    h = hessian(x)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, h, bits=3)
    with pytest.raises(ValueError, match="does not divide the input width 64"):
        gptq_quantize(w, h, group_size=48)
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(w, h[:10, :10], group_size=16)
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(w, -jnp.eye(64), group_size=16, damp_percent=0.0)
