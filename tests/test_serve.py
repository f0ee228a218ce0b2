"""Per-row adapters in one batch (jaxsparse.serve) against a NumPy oracle and the merged models: every
row's output equals the model merged with that row's adapter (<= 1e-5, fp32), for classification,
causal-LM logits and greedy generation with the KV cache; one compilation serves any rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxsparse import delta as delta_lib
from jaxsparse import merge as merge_lib
from jaxsparse import models, serve
from jaxsparse.delta import Adapter, LowRankDelta, SparseDelta
from jaxsparse.factored import matmul
from jaxsparse.methods import lora, shira, sparta
from jaxsparse.models.generate import generate


def _noisy(adapter: Adapter, seed: int, scale: float = 0.3) -> Adapter:
    """The adapter with random trained-looking leaves (init gives zeros or tiny values)."""
    leaves = delta_lib.trainable(adapter)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(leaves))))
    noisy = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype), leaves)
    return delta_lib.with_trainable(adapter, noisy)


def _np_linear(x, w, b, adapter, path="lin"):
    """Oracle: the adapter merged densely in NumPy, then x @ W + bias."""
    w = np.array(w, np.float64)
    b = np.array(b, np.float64)
    d = adapter.deltas.get(f"{path}.kernel")
    if isinstance(d, SparseDelta):
        np.add.at(w.reshape(-1), np.asarray(d.indices), np.asarray(d.values, np.float64))
    elif isinstance(d, LowRankDelta):
        w = w + np.asarray(d.a, np.float64) @ np.asarray(d.b, np.float64) * d.scale
    w = np.asarray(adapter.dense.get(f"{path}.kernel", w), np.float64)
    b = np.asarray(adapter.dense.get(f"{path}.bias", b), np.float64)
    return np.asarray(x, np.float64) @ w + b


def test_row_delta_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    w, bias = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    params = {"lin": {"kernel": jnp.asarray(w), "bias": jnp.asarray(bias)}}
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    adapters = [
        Adapter({"lin.kernel": SparseDelta(jnp.array([0, 7, 19], jnp.int32), f32(3), (5, 4))}),
        Adapter({"lin.kernel": SparseDelta(jnp.array([3, 4, 5, 6, 12], jnp.int32), f32(5), (5, 4))}),
        Adapter({"lin.kernel": LowRankDelta(f32(5, 2), f32(2, 4), scale=0.7)}),
        Adapter({}, {"lin.kernel": f32(5, 4), "lin.bias": f32(4)}),
        Adapter({"lin.kernel": SparseDelta(jnp.array([1], jnp.int32), f32(1), (5, 4))}, {"lin.bias": f32(4)}),
    ]
    bank = serve.stack_adapters(params, adapters)
    rows = np.array([0, 1, 2, 3, 4, -1, 2, 0])
    x = rng.standard_normal((len(rows), 3, 5)).astype(np.float32)
    served = serve.per_row_params(params, bank, jnp.asarray(rows))
    got = np.asarray(matmul(jnp.asarray(x), served["lin"]["kernel"])) + bias  # the layer adds the base bias
    for i, n in enumerate(rows):
        want = _np_linear(x[i], w, bias, adapters[n] if n >= 0 else Adapter({}))
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def _bert():
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
    )
    return models.init_params(config, task="seq_cls", seed=0)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=None,
    )
    return models.init_params(config, task="causal_lm", seed=0)


def _assert_rows_equal_merged(model, adapters, rows, outputs, ids, mask):
    for n in sorted(set(rows.tolist())):
        params = model.params if n < 0 else merge_lib.merge(model.params, adapters[n])[0]
        want = np.asarray(model.apply_fn(params, ids, mask))
        for i in np.flatnonzero(rows == n):
            np.testing.assert_allclose(np.asarray(outputs[i]), want[i], rtol=1e-5, atol=1e-5)


def test_classifier_rows_equal_merged_models_with_their_own_heads():
    model = _bert()
    key = jax.random.key(1)
    targets = ["query", "value", "dense"]
    adapters = [
        _noisy(
            shira.init(
                model.params,
                shira.ShiraConfig(r=2, target_modules=targets, modules_to_save=["classifier"]),
                key,
            ),
            1,
        ),
        _noisy(
            shira.init(
                model.params,
                shira.ShiraConfig(r=3, target_modules=["key"], modules_to_save=["classifier"]),
                key,
            ),
            2,
        ),
        _noisy(sparta.init(model.params, sparta.SpartaConfig(density=0.05), key), 3, scale=0.1),
        _noisy(lora.init(model.params, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]), key), 4),
    ]
    bank = serve.stack_adapters(model.params, adapters)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 50, (7, 9)))
    mask = jnp.asarray((np.arange(9)[None, :] < rng.integers(3, 10, (7, 1))).astype(np.int32))

    @jax.jit
    def forward(bank, rows, ids, mask):
        return model.apply_fn(serve.per_row_params(model.params, bank, rows), ids, mask)

    rows = np.array([0, 1, 2, 3, -1, 0, 2])
    logits = forward(bank, jnp.asarray(rows), ids, mask)
    _assert_rows_equal_merged(model, adapters, rows, logits, ids, mask)
    other = np.array([3, 3, 0, -1, 1, 2, 1])
    _assert_rows_equal_merged(model, adapters, other, forward(bank, jnp.asarray(other), ids, mask), ids, mask)
    assert forward._cache_size() == 1  # one program for any assignment of adapters to rows


def test_causal_lm_rows_and_greedy_generation_equal_merged_models():
    model = _llama()
    key = jax.random.key(2)
    adapters = [
        _noisy(
            shira.init(
                model.params,
                shira.ShiraConfig(
                    r=2,
                    target_modules=[
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ],
                ),
                key,
            ),
            5,
            scale=0.5,
        ),
        _noisy(
            shira.init(model.params, shira.ShiraConfig(r=2, target_modules=["q_proj", "down_proj"]), key),
            6,
            scale=0.5,
        ),
        _noisy(
            lora.init(model.params, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]), key), 7
        ),
    ]
    bank = serve.stack_adapters(model.params, adapters)
    rows = np.array([0, 1, 2, -1, 1])
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(1, 64, (5, 6)))
    mask = jnp.ones_like(ids).at[1, :2].set(0)
    served = serve.per_row_params(model.params, bank, jnp.asarray(rows))
    _assert_rows_equal_merged(model, adapters, rows, model.apply_fn(served, ids, mask), ids, mask)

    tokens = np.asarray(generate(model, ids, mask, max_new_tokens=6, params=served))
    distinct = set()
    for n in sorted(set(rows.tolist())):
        params = model.params if n < 0 else merge_lib.merge(model.params, adapters[n])[0]
        want = np.asarray(generate(model, ids, mask, max_new_tokens=6, params=params))
        for i in np.flatnonzero(rows == n):
            np.testing.assert_array_equal(tokens[i], want[i])
        distinct.add(tuple(want[0, 6:]))
    assert len(distinct) > 1  # the adapters change what is generated, so the test can tell rows apart


def test_errors_name_what_is_wrong():
    params = {"lin": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}, "norm": {"scale": jnp.ones(2)}}
    ok = Adapter({"lin.kernel": SparseDelta(jnp.array([1], jnp.int32), jnp.ones(1), (3, 2))})
    with pytest.raises(serve.ServeError, match=r"'norm\.scale' is not one"):
        serve.stack_adapters(params, [ok, Adapter({}, {"norm.scale": jnp.ones(2)})])
    with pytest.raises(merge_lib.AdapterError, match=r"indices must lie in \[0, 6\)"):
        serve.stack_adapters(
            params, [Adapter({"lin.kernel": SparseDelta(jnp.array([6], jnp.int32), jnp.ones(1), (3, 2))})]
        )
    with pytest.raises(serve.ServeError, match="at least one adapter"):
        serve.stack_adapters(params, [])
    bank = serve.stack_adapters(params, [ok])
    with pytest.raises(serve.ServeError, match=r"rows must lie in \[-1, 1\).*found 1"):
        serve.per_row_params(params, bank, [0, 1])
    served = serve.per_row_params(params, bank, [0, -1])
    with pytest.raises(serve.ServeError, match="batch of 2 rows, got"):
        matmul(jnp.ones((3, 3)), served["lin"]["kernel"])
