"""SHiRA init: default targets, counts, mask strategies, determinism, and PEFT's parameter count."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import delta as delta_lib
from jaxsparse import masks
from jaxsparse.methods import shira
from jaxsparse.methods.shira import ShiraConfig
from jaxsparse.tree import TargetError


def _bert_like(rng):
    def lin(i, o):
        return {"kernel": jnp.asarray(rng.standard_normal((i, o)).astype(np.float32)), "bias": jnp.zeros(o)}

    layer = {
        "attention": {"self": {"query": lin(16, 16), "value": lin(16, 16)}, "output": {"dense": lin(16, 16)}}
    }
    return {
        "bert": {
            "embeddings": {
                "word_embeddings": {"embedding": jnp.zeros((30, 16))},
                "LayerNorm": {"scale": jnp.ones(16)},
            },
            "encoder": {"layer": {"0": layer}},
            "pooler": {"dense": lin(16, 16)},
        },
        "classifier": lin(16, 3),
        "lm_head": lin(16, 30),
    }


def test_default_targets_every_linear_except_heads():
    params = _bert_like(np.random.default_rng(0))
    adapter = shira.init(params, ShiraConfig(r=1))
    assert sorted(adapter.deltas) == [
        "bert.encoder.layer.0.attention.output.dense.kernel",
        "bert.encoder.layer.0.attention.self.query.kernel",
        "bert.encoder.layer.0.attention.self.value.kernel",
        "bert.pooler.dense.kernel",
    ]
    assert adapter.dense == {}
    for d in adapter.deltas.values():
        assert d.k == 1 * (16 + 16) and d.shape == (16, 16)
        np.testing.assert_array_equal(np.asarray(d.values), 0.0)
        assert d.values.dtype == jnp.float32 and d.indices.dtype == jnp.int32


def test_modules_to_save_are_dense_copies_and_never_deltas():
    params = _bert_like(np.random.default_rng(0))
    adapter = shira.init(
        params, ShiraConfig(r=1, target_modules=["dense", "query"], modules_to_save=["classifier"])
    )
    assert sorted(adapter.dense) == ["classifier.bias", "classifier.kernel"]
    np.testing.assert_array_equal(
        np.asarray(adapter.dense["classifier.kernel"]), np.asarray(params["classifier"]["kernel"])
    )
    assert adapter.dense["classifier.kernel"] is not params["classifier"]["kernel"]
    assert "bert.pooler.dense.kernel" in adapter.deltas  # "dense" matches by suffix, as in PEFT
    assert adapter.num_trainable() == 3 * 32 + 16 * 3 + 3


def test_target_errors():
    params = _bert_like(np.random.default_rng(0))
    with pytest.raises(TargetError, match="q_proj"):
        shira.init(params, ShiraConfig(r=1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"bert\.pooler\.dense\.kernel: SHiRA r=9"):
        shira.init(params, ShiraConfig(r=9, target_modules=["pooler.dense"]))
    with pytest.raises(ValueError, match="mask_type 'snip'"):
        shira.init(params, ShiraConfig(r=1, mask_type="snip"))
    with pytest.raises(ValueError, match="needs grad_fn"):
        shira.init(params, ShiraConfig(r=1, mask_type="gradient"))


def test_random_mask_is_reproducible_and_differs_per_layer_and_seed():
    params = _bert_like(np.random.default_rng(0))
    a = shira.init(params, ShiraConfig(r=2, random_seed=5))
    b = shira.init(params, ShiraConfig(r=2, random_seed=5))
    c = shira.init(params, ShiraConfig(r=2, random_seed=6))
    d = shira.init(params, ShiraConfig(r=2), key=jax.random.key(5))
    for path in a.deltas:
        np.testing.assert_array_equal(np.asarray(a.deltas[path].indices), np.asarray(b.deltas[path].indices))
        np.testing.assert_array_equal(np.asarray(a.deltas[path].indices), np.asarray(d.deltas[path].indices))
        assert not np.array_equal(np.asarray(a.deltas[path].indices), np.asarray(c.deltas[path].indices))
    q, v = (
        np.asarray(a.deltas[f"bert.encoder.layer.0.attention.self.{m}.kernel"].indices)
        for m in ("query", "value")
    )
    assert not np.array_equal(q, v)


def test_init_weights_false_draws_normal_values():
    params = _bert_like(np.random.default_rng(0))
    values = np.concatenate(
        [
            np.asarray(d.values)
            for d in shira.init(params, ShiraConfig(r=2, init_weights=False)).deltas.values()
        ]
    )
    assert np.all(values != 0) and abs(values.mean()) < 0.2 and 0.8 < values.std() < 1.2


def test_magnitude_mask_picks_largest_entries():
    params = _bert_like(np.random.default_rng(1))
    adapter = shira.init(params, ShiraConfig(r=1, mask_type="magnitude", target_modules=["query"]))
    (path,) = adapter.deltas
    w = np.abs(
        np.asarray(params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"])
    ).reshape(-1)
    chosen = np.asarray(adapter.deltas[path].indices)
    assert w[chosen].min() >= np.delete(w, chosen).max()


def test_gradient_mask_picks_largest_accumulated_gradients():
    rng = np.random.default_rng(2)
    params = {"l1": {"kernel": jnp.asarray(rng.standard_normal((8, 8)).astype(np.float32))}}
    batches = [jnp.asarray(rng.standard_normal((4, 8)).astype(np.float32)) for _ in range(3)]

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["l1"]["kernel"]) ** 2)

    adapter = shira.init(
        params, ShiraConfig(r=1, mask_type="gradient"), grad_fn=jax.grad(loss), batches=batches
    )
    scores = sum(np.abs(np.asarray(jax.grad(loss)(params, x)["l1"]["kernel"])) for x in batches).reshape(-1)
    chosen = np.asarray(adapter.deltas["l1.kernel"].indices)
    assert len(chosen) == 16 and scores[chosen].min() >= np.delete(scores, chosen).max()


def test_custom_mask_fn_overrides_mask_type_and_is_validated():
    params = _bert_like(np.random.default_rng(0))

    def diagonal_band(w, r, key):
        return np.arange(w.size).reshape(w.shape) < r * sum(w.shape)

    adapter = shira.init(
        params, ShiraConfig(r=1, mask_type="custom", mask_fn=diagonal_band, target_modules=["query"])
    )
    np.testing.assert_array_equal(np.asarray(next(iter(adapter.deltas.values())).indices), np.arange(32))
    with pytest.raises(ValueError, match=r"self\.query\.kernel: mask_fn selected 256"):
        shira.init(
            params, ShiraConfig(r=1, mask_fn=lambda w, r, k: np.ones(w.shape, bool), target_modules=["query"])
        )


def test_apply_changes_exactly_the_chosen_entries():
    params = _bert_like(np.random.default_rng(0))
    adapter = shira.init(params, ShiraConfig(r=1, init_weights=False, target_modules=["value"]))
    out = delta_lib.apply(params, adapter)
    (path,) = adapter.deltas
    changed = np.flatnonzero(
        np.asarray(
            out["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["value"]["kernel"]
            != params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["value"]["kernel"]
        )
    )
    np.testing.assert_array_equal(changed, np.asarray(adapter.deltas[path].indices))


def test_counts_match_peft_shira_on_a_tiny_llama():
    """PEFT's own SHiRA on the same modules trains the same number of entries per module."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import ShiraConfig as PeftShiraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg), PeftShiraConfig(r=2, target_modules=["q_proj", "k_proj", "down_proj"])
    )
    peft_counts = {
        name.removeprefix("base_model.model.").removesuffix(".shira_weight.default"): p.numel()
        for name, p in model.named_parameters()
        if "shira_weight" in name
    }
    # Our params for the same model: every Linear as a Flax (in, out) kernel.
    params: dict = {}
    for name, module in model.base_model.model.named_modules():
        if type(module).__name__ == "Linear" or (
            hasattr(module, "base_layer") and "shira" in type(module).__module__
        ):
            weight = module.base_layer.weight if hasattr(module, "base_layer") else module.weight
            node = params
            for part in name.split("."):
                node = node.setdefault(part, {})
            node["kernel"] = jnp.zeros(tuple(weight.shape[::-1]))
    ours = shira.init(params, ShiraConfig(r=2, target_modules=["q_proj", "k_proj", "down_proj"]))
    assert {p.removesuffix(".kernel"): d.k for p, d in ours.deltas.items()} == peft_counts
    assert all(k == masks.shira_count(ours.deltas[p + ".kernel"].shape, 2) for p, k in peft_counts.items())
