"""The GPTQ int32 layout: pack -> unpack is exact, and our words equal an independent bit-by-bit packing
written from the documented spec (AutoGPTQ's QuantLinear layout)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxsparse.quant.grid import QuantizedWeight, rtn_quantize
from jaxsparse.quant.packing import (
    from_gptq_tensors,
    pack_cols,
    pack_rows,
    to_gptq_tensors,
    unpack_cols,
    unpack_rows,
)


def spec_word(values, bits):
    """One 32-bit word from 32/bits codes, the first in the lowest bits, as a signed int32 (Python ints)."""
    word = 0
    for j, v in enumerate(values):
        word |= int(v) << (bits * j)
    return word - (1 << 32) if word >= 1 << 31 else word


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_exact_and_matches_spec(bits):
    rng = np.random.default_rng(bits)
    k = 32 // bits
    codes = rng.integers(0, 2**bits, size=(4 * k, 3))
    words = pack_rows(codes, bits)
    assert words.dtype == np.int32 and words.shape == (4, 3)
    np.testing.assert_array_equal(unpack_rows(words, bits), codes)
    for r in range(4):
        for o in range(3):
            assert int(words[r, o]) == spec_word(codes[r * k : (r + 1) * k, o], bits)
    zeros = rng.integers(0, 2**bits, size=(2, 2 * k))
    zw = pack_cols(zeros, bits)
    assert zw.shape == (2, 2)
    np.testing.assert_array_equal(unpack_cols(zw, bits), zeros)
    assert int(zw[1, 1]) == spec_word(zeros[1, k:], bits)


def test_worked_example_from_the_docs():
    # docs/compression.md: input rows 0..7 of one output hold codes 1..8 -> 0x87654321.
    word = pack_rows(np.arange(1, 9).reshape(8, 1), 4)
    assert int(word.view(np.uint32)[0, 0]) == 0x87654321
    # symmetric 4-bit zero point 8, classic format stores 7 in each nibble
    assert int(pack_cols(np.full((1, 8), 8 - 1), 4)[0, 0]) == 0x77777777


def _independent_dequant(t, bits, classic):
    """AutoGPTQ's dequantization, re-derived with Python integers from the layout table."""
    k, mask = 32 // bits, 2**bits - 1
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"].astype(np.float32), t["g_idx"]
    n_in, n_out = qweight.shape[0] * k, qweight.shape[1]
    w = np.zeros((n_out, n_in), np.float32)  # PyTorch (out, in)
    for i in range(n_in):
        for o in range(n_out):
            q = (int(qweight[i // k, o]) & 0xFFFFFFFF) >> (bits * (i % k)) & mask
            g = int(g_idx[i])
            z = (int(qzeros[g, o // k]) & 0xFFFFFFFF) >> (bits * (o % k)) & mask
            z = z + 1 if classic else z
            w[o, i] = scales[g, o] * (q - z)
    return w


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (2, False), (8, True)])
def test_tensors_follow_the_layout(fmt, bits, sym):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(32, 16)).astype(np.float32)
    qw = rtn_quantize(w, bits=bits, group_size=16, sym=sym)
    t = to_gptq_tensors(qw, checkpoint_format=fmt)
    k = 32 // bits
    assert t["qweight"].shape == (32 // k, 16) and t["qweight"].dtype == np.int32
    assert t["qzeros"].shape == (2, 16 // k) and t["qzeros"].dtype == np.int32
    assert t["scales"].shape == (2, 16) and t["scales"].dtype == np.float16
    assert t["g_idx"].tolist() == [i // 16 for i in range(32)]
    from jaxsparse.quant.grid import dequantize

    np.testing.assert_array_equal(_independent_dequant(t, bits, fmt == "gptq"), np.asarray(dequantize(qw)).T)
    back = from_gptq_tensors(t, bits=bits, group_size=16, sym=sym, checkpoint_format=fmt)
    for name in ("codes", "scales", "zeros", "g_idx"):
        np.testing.assert_array_equal(
            np.asarray(getattr(back, name)), np.asarray(getattr(qw, name)), err_msg=name
        )


def test_classic_format_refuses_zero_point_zero_and_bad_tensors():
    qw = QuantizedWeight(
        codes=np.zeros((8, 8), np.uint8),
        scales=np.ones((1, 8), np.float32),
        zeros=np.zeros((1, 8), np.int32),
        g_idx=np.zeros(8, np.int32),
        bits=4,
        group_size=-1,
        sym=False,
    )
    with pytest.raises(ValueError, match="zero point of 0 cannot be stored"):
        to_gptq_tensors(qw)
    t = to_gptq_tensors(qw, checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match=r"layer.*g_idx"):
        from_gptq_tensors({**t, "g_idx": np.zeros(5, np.int32)}, bits=4, group_size=-1)
    with pytest.raises(ValueError, match=r"\['qzeros'\] are missing"):
        from_gptq_tensors({"qweight": t["qweight"], "scales": t["scales"]}, bits=4, group_size=-1)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        pack_rows(np.zeros((12, 2), np.int64), 4)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_rows(np.full((8, 1), 16), 4)
