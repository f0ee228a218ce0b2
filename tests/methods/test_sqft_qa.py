"""QA-SparsePEFT (jaxsparse.quant.qa_delta, jaxsparse.methods.sqft): the forward weight is the NumPy
oracle dequant(quant(W + s*BA*(W != 0))) on the GPTQ base's grid, the base's zeros stay zero, the
gradient is the straight-through one (closed form), LoRA dropout acts on the whole matmul's input as
in SQFT, the merged integer codes dequantize to the forward's weight, and a sparse_adapter loaded
against shape-only params still keeps the zeros when merged later."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import delta as delta_lib
from jaxsparse import merge as merge_lib
from jaxsparse.factored import lora_dropout
from jaxsparse.methods import sqft
from jaxsparse.methods.sqft import SQFTConfig
from jaxsparse.quant.gptq import gptq_quantize
from jaxsparse.quant.qa_base import with_non_quant_kernels
from jaxsparse.quant.qa_delta import QALowRankDelta, with_grids

SHAPES = {"q_proj": (32, 16), "v_proj": (32, 8), "o_proj": (16, 32)}
TARGETS = ["q_proj", "v_proj"]


def _sparse_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in SHAPES.items():
        w = rng.normal(size=shape).astype(np.float32)
        w[rng.random(shape) < 0.5] = 0.0  # a 50%-sparse base
        out[name] = {"kernel": jnp.asarray(w)}
    return {"layer": out}


def _grids(params: dict, *, act_order: bool = False) -> dict:
    """GPTQ grids of every kernel of :func:`_sparse_params` (4 bits, groups of 8), from a random
    input Hessian (computed once per ``act_order``: GPTQ compiles per shape)."""
    assert all(
        np.array_equal(params["layer"][n]["kernel"], _sparse_params()["layer"][n]["kernel"]) for n in SHAPES
    )
    return _gptq_grids(act_order)


@functools.cache
def _gptq_grids(act_order: bool) -> dict:
    params = _sparse_params()
    rng = np.random.default_rng(1)
    grids = {}
    for name, module in params["layer"].items():
        leaf = module["kernel"]
        x = rng.normal(size=(64, leaf.shape[0])).astype(np.float32)
        h = jnp.asarray(2 * x.T @ x / 64)
        grids[f"layer.{name}"] = gptq_quantize(leaf, h, bits=4, group_size=8, act_order=act_order)
    return grids


def _qa_adapter(params, grids, *, sparse=True, search_space=None, dropout=0.0, seed=0):
    cfg = SQFTConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights=False,  # a non-zero B, so the update is visible
        sparse_adapter=sparse,
        quantization_aware=True,
        search_space=search_space,
        lora_dropout=dropout,
    )
    return sqft.init(params, cfg, jax.random.key(seed), grids=grids)


def _oracle(w, a, b, scale, grid, *, sparse=True):
    """NumPy: dequant(quant(W + s * (a @ b) * (W != 0))) on ``grid``, and the integer codes."""
    w = np.asarray(w, np.float64)
    delta = scale * (np.asarray(a, np.float64) @ np.asarray(b, np.float64))
    merged = w + (delta * (w != 0) if sparse else delta)
    g = np.asarray(grid.g_idx)
    s = np.asarray(grid.scales, np.float64)[g]
    z = np.asarray(grid.zeros, np.float64)[g]
    codes = np.clip(np.round(merged.astype(np.float32) / s.astype(np.float32)) + z, 0, 2**grid.bits - 1)
    return s * (codes - z), codes


@pytest.mark.parametrize("act_order", [False, True])
def test_forward_weight_is_the_numpy_oracle_on_the_base_grid_and_keeps_every_zero(act_order):
    params = _sparse_params()
    grids = _grids(params, act_order=act_order)
    adapter = _qa_adapter(params, grids)
    effective = delta_lib.apply(params, adapter)
    for name in TARGETS:
        d = adapter.deltas[f"layer.{name}.kernel"]
        assert isinstance(d, QALowRankDelta) and d.mask is not None
        w = params["layer"][name]["kernel"]
        grid = grids[f"layer.{name}"]
        want, codes = _oracle(w, d.a, d.b, d.scale, grid)
        got = np.asarray(effective["layer"][name]["kernel"])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert np.all(got[np.asarray(w) == 0] == 0)  # every zero of the sparse base stays zero
        # the merge's integer codes are the oracle's and dequantize with the base's scales/zeros to it
        q = d.quantized(w)
        np.testing.assert_array_equal(np.asarray(q.codes), codes)
        np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(grid.scales))
        np.testing.assert_array_equal(np.asarray(q.zeros), np.asarray(grid.zeros))
        np.testing.assert_array_equal(np.asarray(q.g_idx), np.asarray(grid.g_idx))
        # the update moved some codes away from quant(W) (the adapter does something on the grid)
        _, codes_w = _oracle(w, d.a, d.b * 0, d.scale, grid)
        assert (codes != codes_w).any()
    # an untargeted layer is untouched; merge.merge gives the same dequantized weights
    np.testing.assert_array_equal(effective["layer"]["o_proj"]["kernel"], params["layer"]["o_proj"]["kernel"])
    merged, _ = merge_lib.merge(params, adapter)
    for name in TARGETS:
        np.testing.assert_array_equal(merged["layer"][name]["kernel"], effective["layer"][name]["kernel"])


def test_without_sparse_adapter_the_update_is_not_masked():
    params = _sparse_params()
    grids = _grids(params)
    adapter = _qa_adapter(params, grids, sparse=False)
    d = adapter.deltas["layer.q_proj.kernel"]
    w = params["layer"]["q_proj"]["kernel"]
    want, _ = _oracle(w, d.a, d.b, d.scale, grids["layer.q_proj"], sparse=False)
    np.testing.assert_allclose(np.asarray(d.apply(w)), want, rtol=0, atol=1e-6)
    assert (np.asarray(d.apply(w))[np.asarray(w) == 0] != 0).any()


def _loss(adapter, params, x, *, factored):
    eff = delta_lib.apply(params, adapter, factored=factored)
    from jaxsparse.factored import matmul

    y = matmul(x, eff["layer"]["q_proj"]["kernel"])
    return 0.5 * jnp.sum(y**2)


@pytest.mark.parametrize("factored", [False, True])
def test_gradient_is_the_straight_through_closed_form(factored):
    params = _sparse_params()
    grids = _grids(params)
    adapter = _qa_adapter(params, grids)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 32)).astype(np.float32))
    grads = jax.grad(lambda t: _loss(delta_lib.with_trainable(adapter, t), params, x, factored=factored))(
        delta_lib.trainable(adapter)
    )["deltas"]["layer.q_proj.kernel"]
    d = adapter.deltas["layer.q_proj.kernel"]
    w = np.asarray(params["layer"]["q_proj"]["kernel"], np.float64)
    dq, _ = _oracle(w, d.a, d.b, d.scale, grids["layer.q_proj"])
    # STE: d loss / d merged = x^T dy with y = x @ dq (the quantized forward); then through the mask.
    xs = np.asarray(x, np.float64)
    g = xs.T @ (xs @ dq) * (w != 0)
    a, b = np.asarray(d.a, np.float64), np.asarray(d.b, np.float64)
    np.testing.assert_allclose(np.asarray(grads["a"]), d.scale * g @ b.T, rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["b"]), d.scale * a.T @ g, rtol=2e-4, atol=1e-4)
    assert np.abs(np.asarray(grads["a"])).sum() > 0 and np.abs(np.asarray(grads["b"])).sum() > 0
    # the same as SQFT's construction merged + stop_gradient(dq - merged), differentiated by JAX
    mask = jnp.asarray(w != 0)

    def sqft_style(t):
        merged = params["layer"]["q_proj"]["kernel"] + jnp.where(mask, (t["a"] @ t["b"]) * d.scale, 0)
        y = x @ (merged + jax.lax.stop_gradient(jnp.asarray(dq, jnp.float32) - merged))
        return 0.5 * jnp.sum(y**2)

    ref = jax.grad(sqft_style)({"a": d.a, "b": d.b})
    np.testing.assert_allclose(np.asarray(grads["a"]), np.asarray(ref["a"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["b"]), np.asarray(ref["b"]), rtol=1e-4, atol=1e-4)


def test_training_view_drops_the_whole_matmul_input_as_sqft_and_nls_masks_ranks():
    params = _sparse_params()
    grids = _grids(params)
    adapter = _qa_adapter(params, grids, search_space=[4, 2], dropout=0.5)
    view = adapter.config.forward_view(adapter, jax.random.PRNGKey(3))
    d = view.deltas["layer.q_proj.kernel"]
    assert isinstance(d, QALowRankDelta) and d.dropout_key is not None and d.rank_mask is not None
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 32)).astype(np.float32))
    eff = delta_lib.apply(params, view, factored=True)
    from jaxsparse.factored import matmul

    got = matmul(x, eff["layer"]["q_proj"]["kernel"])
    w = params["layer"]["q_proj"]["kernel"]
    rank = int(np.asarray(d.rank_mask).sum())
    dq, _ = _oracle(w, np.asarray(d.a)[:, :rank], np.asarray(d.b)[:rank], d.scale, grids["layer.q_proj"])
    x_dropped = np.asarray(lora_dropout(x, d), np.float64)
    assert (x_dropped == 0).any()
    np.testing.assert_allclose(np.asarray(got), x_dropped @ dq, rtol=1e-5, atol=1e-5)
    # evaluation (no key) is the plain quantized forward, the same factored or not
    plain = delta_lib.apply(params, adapter, factored=True)
    dense = delta_lib.apply(params, adapter)
    np.testing.assert_allclose(
        np.asarray(matmul(x, plain["layer"]["q_proj"]["kernel"])),
        np.asarray(x @ dense["layer"]["q_proj"]["kernel"]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_train_step_moves_the_factors_through_the_rounding():
    import optax

    from jaxsparse import train as train_lib
    from jaxsparse.factored import matmul

    params = _sparse_params()
    adapter = _qa_adapter(params, _grids(params), search_space=[4, 2], dropout=0.1)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(6, 32)).astype(np.float32))

    def apply_model(p, batch):
        return matmul(batch, p["layer"]["q_proj"]["kernel"])

    step = train_lib.make_train_step(apply_model, lambda y, b: jnp.mean(y**2), optax.sgd(1e-2), factored=True)
    state = train_lib.init_train_state(adapter, optax.sgd(1e-2), jax.random.PRNGKey(0))
    before = np.asarray(state.adapter.deltas["layer.q_proj.kernel"].a).copy()
    state, metrics = step(state, params, x)
    after = state.adapter.deltas["layer.q_proj.kernel"]
    assert isinstance(after, QALowRankDelta) and float(metrics["grad_norm"]) > 0
    assert not np.array_equal(np.asarray(after.a), before)


def test_merged_gptq_layers_requantize_only_the_targets():
    params = _sparse_params()
    grids = _grids(params)
    adapter = _qa_adapter(params, grids)
    layers = sqft.merged_gptq_layers(params, adapter, grids)
    assert layers["layer.o_proj"] is grids["layer.o_proj"]
    for name in TARGETS:
        d = adapter.deltas[f"layer.{name}.kernel"]
        _, codes = _oracle(params["layer"][name]["kernel"], d.a, d.b, d.scale, grids[f"layer.{name}"])
        np.testing.assert_array_equal(layers[f"layer.{name}"].codes, codes)


def test_qa_base_params_take_the_non_quantized_weights_at_the_targets_only():
    sparse = _sparse_params()
    grids = _grids(sparse)
    from jaxsparse.quant.grid import dequantize

    gptq = {"layer": {n: {"kernel": dequantize(grids[f"layer.{n}"])} for n in SHAPES}}
    cfg = SQFTConfig(r=2, target_modules=TARGETS, quantization_aware=True, sparse_adapter=True)
    p = sqft.qa_base_params(gptq, sparse, cfg)
    for name in TARGETS:
        np.testing.assert_array_equal(p["layer"][name]["kernel"], sparse["layer"][name]["kernel"])
    np.testing.assert_array_equal(p["layer"]["o_proj"]["kernel"], gptq["layer"]["o_proj"]["kernel"])


def test_bad_input_is_refused_clearly():
    params = _sparse_params()
    grids = _grids(params)
    cfg = SQFTConfig(r=2, target_modules=TARGETS, quantization_aware=True)
    assert cfg.quantization_aware  # no longer refused
    with pytest.raises(ValueError, match="needs the GPTQ base's grids"):
        sqft.init(params, cfg, jax.random.key(0))
    # a targeted module that the GPTQ base did not quantize
    with pytest.raises(ValueError, match=r"'layer\.v_proj' is not quantized in the GPTQ base"):
        sqft.init(params, cfg, jax.random.key(0), grids={"layer.q_proj": grids["layer.q_proj"]})
    # a grid of another shape
    with pytest.raises(ValueError, match=r"is \(32, 8\) \(in, out\) in the GPTQ base"):
        sqft.init(params, cfg, jax.random.key(0), grids={**grids, "layer.q_proj": grids["layer.v_proj"]})
    # a non-quantized base of another shape
    other = jax.tree.map(lambda x: x, params)
    other["layer"]["q_proj"] = {"kernel": jnp.zeros((32, 12))}
    with pytest.raises(
        ValueError, match=r"'layer.q_proj.kernel' has shape \(32, 12\) but the GPTQ base has \(32, 16\)"
    ):
        with_non_quant_kernels(params, other, ["layer.q_proj"])
    with pytest.raises(ValueError, match="not quantization_aware"):
        sqft.with_qa_grids(
            sqft.init(params, SQFTConfig(r=2, target_modules=TARGETS), jax.random.key(0)), grids
        )
    with pytest.raises(TypeError, match="expected a QA delta"):
        sqft.merged_gptq_layers(
            params, sqft.init(params, SQFTConfig(r=2, target_modules=TARGETS), jax.random.key(0)), grids
        )


def test_peft_round_trip_keeps_the_flag_and_loads_onto_the_grid(tmp_path):
    from jaxsparse.convert.peft_lora import load_peft_lora, save_peft_lora

    params = _sparse_params()
    grids = _grids(params)
    adapter = _qa_adapter(params, grids)
    save_peft_lora(adapter, tmp_path / "qa")
    import json

    raw = json.loads((tmp_path / "qa" / "adapter_config.json").read_text())
    assert raw["quantization_aware"] is True and raw["sparse_adapter"] is True
    back = sqft.with_qa_grids(load_peft_lora(tmp_path / "qa", params), grids)
    assert back.config.quantization_aware
    a, b = delta_lib.apply(params, adapter), delta_lib.apply(params, back)
    for name in TARGETS:
        np.testing.assert_array_equal(a["layer"][name]["kernel"], b["layer"][name]["kernel"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sparse_adapter_loaded_on_shape_only_params_keeps_the_zeros_when_merged(tmp_path):
    from jaxsparse.convert.peft_lora import load_peft_lora, save_peft_lora
    from jaxsparse.factored import matmul

    params = _sparse_params()
    cfg = SQFTConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, sparse_adapter=True)
    save_peft_lora(sqft.init(params, cfg, jax.random.key(0)), tmp_path / "sp")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    lazy = load_peft_lora(tmp_path / "sp", abstract)
    assert all(isinstance(d, sqft.BaseMaskedDelta) for d in lazy.deltas.values())
    concrete = load_peft_lora(tmp_path / "sp", params)
    merged, _ = merge_lib.merge(params, lazy)
    want, _ = merge_lib.merge(params, concrete)
    for name in TARGETS:
        w = np.asarray(params["layer"][name]["kernel"])
        got = np.asarray(merged["layer"][name]["kernel"])
        np.testing.assert_array_equal(got, np.asarray(want["layer"][name]["kernel"]))
        assert (got == 0).sum() == (w == 0).sum() and np.array_equal(got == 0, w == 0)
    # the factored forward masks the same way
    x = jnp.ones((2, 32))
    eff = delta_lib.apply(params, lazy, factored=True)
    np.testing.assert_allclose(
        np.asarray(matmul(x, eff["layer"]["q_proj"]["kernel"])),
        np.asarray(x @ want["layer"]["q_proj"]["kernel"]),
        rtol=1e-5,
        atol=1e-5,
    )
    # and a plain unmasked delta would have filled the zeros (the check can fail)
    plain = dataclasses.replace(lazy, deltas={p: sqft.without_masks(concrete).deltas[p] for p in lazy.deltas})
    filled, _ = merge_lib.merge(params, plain)
    assert (np.asarray(filled["layer"]["q_proj"]["kernel"]) == 0).sum() < (
        np.asarray(params["layer"]["q_proj"]["kernel"]) == 0
    ).sum()


def test_with_grids_refuses_sparse_deltas():
    from jaxsparse.delta import Adapter, SparseDelta

    ad = Adapter({"fc.kernel": SparseDelta(jnp.array([0], jnp.int32), jnp.ones(1), (8, 4))})
    with pytest.raises(TypeError, match="adapts low-rank deltas only"):
        with_grids(ad, {}, mask_base=True)


def test_shipped_qa_config_builds_a_quantization_aware_sqft_method():
    from pathlib import Path

    from jaxsparse import config as config_lib
    from jaxsparse import trainer

    path = Path(__file__).parents[2] / "configs" / "sqft_qa_sparsepeft_nls_smollm2_bbc.yaml"
    cfg = config_lib.load_config(path, check_paths=False)
    assert cfg.model.non_quant_path and cfg.model.path != cfg.model.non_quant_path
    m = trainer.method_config(cfg)
    assert isinstance(m, SQFTConfig) and m.quantization_aware and m.sparse_adapter
    assert m.r == 16 and m.lora_alpha == 2 * m.r and m.lora_dropout == 0.1
    assert m.target_modules == ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    assert m.nls_target_modules == ("q_proj", "k_proj", "v_proj") and m.search_space == (16, 12, 8)
    plain = config_lib.load_config(path.with_name("sqft_sparsepeft_nls_smollm2_bbc.yaml"), check_paths=False)
    assert trainer.method_config(plain).lora_dropout == 0.1
