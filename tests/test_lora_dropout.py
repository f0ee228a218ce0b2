"""LoRA dropout as PEFT applies it: ``x W + (dropout(x) @ a @ b) * scale``, training only.

The oracle is NumPy on a mask read back from the layer itself (a probe with ``W = 0``, ``a = b = I``
returns ``dropout(x)``), so the formula, the scaling, and that the base branch is never dropped
are checked independently of how the mask is drawn."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import delta as delta_lib
from jaxsparse import factored
from jaxsparse import train as train_lib
from jaxsparse.delta import LowRankDelta
from jaxsparse.methods import lora, sparse_lora, sqft

RATE = 0.25


def _probe_mask(key, shape, rate):
    """``dropout(ones)`` read back through a layer with ``W = 0`` and ``a = b = I``: the keep mask."""
    fan_in = shape[-1]
    probe = LowRankDelta(a=jnp.eye(fan_in), b=jnp.eye(fan_in), scale=1.0, dropout_key=key, dropout_rate=rate)
    out = np.asarray(factored.matmul(jnp.ones(shape), factored.adapt(jnp.zeros((fan_in, fan_in)), probe)))
    assert set(np.unique(out)) <= {0.0, np.float32(1 / (1 - rate))}  # dropped, or scaled by 1/(1-p)
    return out != 0


def test_adapter_branch_equals_the_numpy_oracle_on_the_dropout_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 12)).astype(np.float32)
    w = rng.normal(size=(12, 7)).astype(np.float32)
    a = rng.normal(size=(12, 4)).astype(np.float32)
    b = rng.normal(size=(4, 7)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    d = LowRankDelta(a=jnp.asarray(a), b=jnp.asarray(b), scale=0.5, dropout_key=key, dropout_rate=RATE)
    ours = np.asarray(factored.matmul(jnp.asarray(x), factored.adapt(jnp.asarray(w), d)))
    keep = _probe_mask(key, x.shape, RATE)
    assert 0 < keep.mean() < 1
    expected = x @ w + ((np.where(keep, x / (1 - RATE), 0)) @ a @ b) * 0.5
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    # The dropout reaches only the adapter: the base branch sees the whole input.
    no_adapter = dataclasses.replace(d, a=jnp.zeros_like(d.a))
    np.testing.assert_allclose(
        np.asarray(factored.matmul(jnp.asarray(x), factored.adapt(jnp.asarray(w), no_adapter))),
        x @ w,
        rtol=1e-5,
        atol=1e-5,
    )


def test_dropped_fraction_is_the_rate_and_the_expectation_is_the_undropped_branch():
    """Over many draws a fraction p of inputs is dropped (binomial 5-sigma bound) and the mean of
    the adapter branch is the branch without dropout (unbiased, CLT bound)."""
    keep = _probe_mask(jax.random.PRNGKey(0), (64, 256), RATE)
    n = keep.size
    assert abs((1 - keep.mean()) - RATE) <= 5 * np.sqrt(RATE * (1 - RATE) / n)

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    base = jnp.zeros((6, 4))

    def branch(key):
        d = LowRankDelta(a=a, b=b, scale=2.0, dropout_key=key, dropout_rate=RATE)
        return factored.matmul(x, factored.adapt(base, d))

    draws = 20000
    samples = np.asarray(jax.vmap(branch)(jax.random.split(jax.random.PRNGKey(7), draws)))
    exact = np.asarray(x @ a @ b * 2.0)
    stderr = samples.std(axis=0) / np.sqrt(draws)
    assert np.all(np.abs(samples.mean(axis=0) - exact) <= 5 * stderr + 1e-6)


def _tiny_params():
    rng = np.random.default_rng(0)
    return {
        "q": {"kernel": jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)},
        "v": {"kernel": jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)},
    }


def _apply_model(params, batch):
    h = factored.matmul(batch["x"], params["q"]["kernel"])
    return factored.matmul(jnp.tanh(h), params["v"]["kernel"])


def _loss(out, batch):
    return jnp.mean((out - batch["y"]) ** 2)


@pytest.mark.parametrize("config_class", [lora.LoraConfig, sqft.SQFTConfig, sparse_lora.SparseLoraConfig])
def test_forward_view_gives_each_layer_its_own_key_and_training_only(config_class):
    params = _tiny_params()
    extra = {"total_steps": 10} if config_class is sparse_lora.SparseLoraConfig else {}
    cfg = config_class(r=2, target_modules=["q", "v"], init_lora_weights=False, lora_dropout=0.5, **extra)
    adapter = lora.init(params, cfg, jax.random.key(0))
    view = cfg.forward_view(adapter, jax.random.PRNGKey(1))
    keys = [np.asarray(view.deltas[p].dropout_key) for p in ("q.kernel", "v.kernel")]
    assert not np.array_equal(keys[0], keys[1])
    assert all(view.deltas[p].dropout_rate == 0.5 for p in view.deltas)
    batch = {"x": jnp.ones((4, 6)), "y": jnp.zeros((4, 6))}
    f = train_lib.value_and_grad(_apply_model, _loss, factored=True)
    (with_rng, _), _ = f(adapter, params, batch, jax.random.PRNGKey(1))
    (without, _), _ = f(adapter, params, batch)
    assert float(with_rng) != float(without)  # the step's loss sees the dropout
    # Evaluation (no rng) is the plain adapter, as make_eval_step's.
    evaluate = train_lib.make_eval_step(_apply_model, _loss, factored=True)
    plain = dataclasses.replace(cfg, lora_dropout=0.0)
    ref = train_lib.make_eval_step(_apply_model, _loss, factored=True)(
        dataclasses.replace(adapter, config=plain), params, batch
    )
    assert float(evaluate(adapter, params, batch)["loss"]) == float(ref["loss"])
    assert float(ref["loss"]) == pytest.approx(float(without), rel=1e-6)  # jitted vs not


def test_rate_zero_is_exactly_plain_lora():
    params = _tiny_params()
    cfg = lora.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False)
    adapter = lora.init(params, cfg, jax.random.key(0))
    assert cfg.forward_view(adapter, jax.random.PRNGKey(1)) is adapter
    batch = {"x": jnp.ones((4, 6)), "y": jnp.zeros((4, 6))}
    f = train_lib.value_and_grad(_apply_model, _loss, factored=True)
    assert float(f(adapter, params, batch, jax.random.PRNGKey(1))[0][0]) == float(
        f(adapter, params, batch)[0][0]
    )


def test_sqft_view_composes_dropout_and_nls_ranks():
    params = {"layers": {"0": {"q": {"kernel": jnp.ones((6, 6))}}}}
    cfg = sqft.SQFTConfig(r=4, target_modules=["q"], search_space=[4, 2], lora_dropout=0.1)
    view = cfg.forward_view(sqft.init(params, cfg, jax.random.key(0)), jax.random.PRNGKey(2))
    d = view.deltas["layers.0.q.kernel"]
    assert d.dropout_key is not None and d.rank_mask is not None and d.dropout_rate == 0.1


def test_masked_update_takes_the_dropout_on_its_input_only():
    """A SparsePEFT-masked delta is formed densely; its input still gets the same dropout mask."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    w = rng.normal(size=(6, 6)).astype(np.float32)
    mask = rng.random((6, 6)) < 0.5
    a, b = rng.normal(size=(6, 2)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)
    key = jax.random.PRNGKey(5)
    d = LowRankDelta(
        jnp.asarray(a), jnp.asarray(b), None, jnp.asarray(mask), scale=1.5, dropout_key=key, dropout_rate=RATE
    )
    ours = np.asarray(factored.matmul(jnp.asarray(x), factored.adapt(jnp.asarray(w), d)))
    keep = _probe_mask(key, x.shape, RATE)
    expected = x @ w + np.where(keep, x / (1 - RATE), 0) @ np.where(mask, a @ b * 1.5, 0)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_the_dense_path_refuses_input_dropout():
    params = _tiny_params()
    cfg = lora.LoraConfig(r=2, target_modules=["q"], lora_dropout=0.1)
    view = cfg.forward_view(lora.init(params, cfg, jax.random.key(0)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="LoRA dropout acts on the layer's input"):
        delta_lib.apply(params, view)


def test_bad_rates_are_refused():
    from jaxsparse import config as config_lib

    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"LoraConfig.lora_dropout must be in \[0, 1\)"):
            lora.LoraConfig(target_modules=["q"], lora_dropout=rate)
        with pytest.raises(config_lib.ConfigError, match=r"'adapter.lora_dropout' must be in \[0, 1\)"):
            config_lib.load_config(None, [f"adapter.lora_dropout={rate}"], check_paths=False)


def test_peft_eval_parity_is_unaffected_by_dropout(tmp_path):
    """A LoRA adapter with lora_dropout 0.1 (recorded in adapter_config.json) gives PEFT's eval-mode
    logits on a tiny DistilBERT: dropout is a training-only view."""
    import peft
    import torch
    import transformers

    from jaxsparse import models
    from jaxsparse.adapter_io import save_adapter

    config = transformers.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=16
    )
    torch.manual_seed(0)
    model = models.from_torch(transformers.DistilBertForMaskedLM(config))
    models.save_pretrained(model, tmp_path / "base")
    cfg = lora.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], lora_dropout=0.1, init_lora_weights=False
    )
    adapter = lora.init(model.params, cfg, jax.random.key(0))
    save_adapter(adapter, tmp_path / "adapter", model=model)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    tm = peft.PeftModel.from_pretrained(
        transformers.DistilBertForMaskedLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    ids = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        ref = tm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    ev = train_lib.make_eval_step(
        lambda p, b: model.apply_fn(p, b["ids"], b["mask"]),
        lambda out, b: (jnp.zeros(()), {"out": out}),
        factored=True,
    )
    ours = np.asarray(ev(adapter, model.params, {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask)})["out"])
    keep = mask.astype(bool)
    assert np.abs(ours[keep] - ref[keep]).max() <= 1e-5
