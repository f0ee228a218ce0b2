"""LoraConfig/init: target selection, scaling and init distributions against PEFT itself and closed forms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import delta as delta_lib
from jaxsparse.methods.lora import FrozenDict, LoraConfig, init, target_modules_of


def _params():
    def lin(i, o, bias=True):
        d = {"kernel": jnp.asarray(np.random.default_rng(i * 31 + o).normal(size=(i, o)), jnp.float32)}
        if bias:
            d["bias"] = jnp.zeros(o)
        return d

    layer = {"self_attn": {"q_proj": lin(16, 16), "v_proj": lin(16, 8), "o_proj": lin(16, 16, False)}}
    return {
        "model": {"layers": {"0": layer, "1": layer}, "embed_tokens": {"embedding": jnp.ones((10, 16))}},
        "lm_head": lin(16, 10, False),
        "score": lin(16, 3),
    }


def test_targets_suffix_regex_all_linear_and_modules_to_save_excluded():
    p = _params()
    assert target_modules_of(p, LoraConfig(target_modules=["q_proj"])) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert target_modules_of(p, LoraConfig(target_modules=r".*1\.self_attn\.v_proj")) == [
        "model.layers.1.self_attn.v_proj"
    ]
    all_linear = target_modules_of(p, LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in all_linear and "score" not in all_linear and len(all_linear) == 6
    # PEFT never adapts a module it saves in full.
    cfg = LoraConfig(target_modules=["q_proj", "score"], modules_to_save=["score"])
    assert "score" not in target_modules_of(p, cfg)
    with pytest.raises(ValueError, match="target_modules"):
        target_modules_of(p, LoraConfig(target_modules=None))
    with pytest.raises(ValueError, match="nope"):
        target_modules_of(p, LoraConfig(target_modules=["nope"]))


def test_rank_alpha_patterns_match_peft_get_pattern_key():
    from peft.utils.other import get_pattern_key

    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 4},
        alpha_pattern={"q_proj": 3},
    )
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]:
        r_key = get_pattern_key(cfg.rank_pattern.keys(), module)
        a_key = get_pattern_key(cfg.alpha_pattern.keys(), module)
        want = (cfg.rank_pattern.get(r_key, 8), cfg.alpha_pattern.get(a_key, 16))
        assert cfg.rank_and_alpha(module) == want
    assert cfg.scaling("model.layers.1.self_attn.q_proj") == 3 / 2
    assert LoraConfig(r=4, lora_alpha=8, use_rslora=True).scaling("x") == 8 / math.sqrt(4)


def test_config_is_hashable_and_validated():
    cfg = LoraConfig(target_modules=["q"], rank_pattern={"q": 2})
    assert hash(cfg) == hash(LoraConfig(target_modules=("q",), rank_pattern=FrozenDict(q=2)))
    with pytest.raises(TypeError):
        cfg.rank_pattern["q"] = 3
    with pytest.raises(ValueError, match="bias"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="use_rslora"):
        LoraConfig(use_rslora=True, rank_pattern={"q": 2})
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="pissa")


def test_init_shapes_and_distributions_match_torch_defaults():
    p = _params()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    ad = init(p, cfg, jax.random.key(0))
    d = ad.deltas["model.layers.0.self_attn.v_proj.kernel"]
    assert d.a.shape == (16, 2) and d.b.shape == (2, 8) and d.scale == 4.0
    assert d.a.dtype == jnp.float32
    # PEFT: kaiming_uniform(a=sqrt(5)) on lora_A -> U(-1/sqrt(in), 1/sqrt(in)); zero lora_B.
    big = init(
        {"w": {"kernel": jnp.zeros((400, 50))}}, LoraConfig(r=64, target_modules=["w"]), jax.random.key(1)
    )
    a = np.asarray(big.deltas["w.kernel"].a)
    bound = 1 / math.sqrt(400)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert abs(a.var() - bound**2 / 3) < 0.1 * bound**2 / 3  # variance of U(-b, b)
    assert not np.any(np.asarray(big.deltas["w.kernel"].b))
    nonzero = init(
        {"w": {"kernel": jnp.zeros((400, 50))}},
        LoraConfig(r=64, target_modules=["w"], init_lora_weights=False),
        jax.random.key(1),
    )
    b = np.asarray(nonzero.deltas["w.kernel"].b)
    assert np.abs(b).max() <= 1 / 8 and b.std() > 0.05
    g = init(
        {"w": {"kernel": jnp.zeros((400, 50))}},
        LoraConfig(r=64, target_modules=["w"], init_lora_weights="gaussian"),
        jax.random.key(1),
    )
    assert abs(float(g.deltas["w.kernel"].a.std()) - 1 / 64) < 0.1 / 64


def test_apply_is_the_closed_form_and_dense_leaves():
    p = _params()
    cfg = LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=["q_proj"],
        modules_to_save=["score"],
        bias="lora_only",
        init_lora_weights=False,
    )
    ad = init(p, cfg, jax.random.key(3))
    assert sorted(ad.dense) == [
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.1.self_attn.q_proj.bias",
        "score.bias",
        "score.kernel",
    ]
    eff = delta_lib.apply(p, ad)
    path = "model.layers.1.self_attn.q_proj.kernel"
    d = ad.deltas[path]
    want = (
        np.asarray(p["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"])
        + np.asarray(d.a) @ np.asarray(d.b) * 3.0
    )
    np.testing.assert_allclose(
        np.asarray(eff["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"]), want, atol=1e-6
    )
    all_bias = init(p, LoraConfig(target_modules=["q_proj"], bias="all"), jax.random.key(0))
    assert len(all_bias.dense) == 2 + 2 + 1  # q_proj and v_proj biases in both layers, plus score.bias
    # SEQ_CLS adds the head to modules_to_save like PEFT, and never adapts it.
    cls = init(p, LoraConfig(target_modules=["q_proj"], task_type="SEQ_CLS"), jax.random.key(0))
    assert sorted(cls.dense) == ["score.bias", "score.kernel"]


def test_init_is_jittable_and_trains_only_factors():
    p = _params()
    ad = init(p, LoraConfig(r=2, target_modules=["o_proj"]), jax.random.key(0))
    leaves = delta_lib.trainable(ad)
    assert set(leaves["deltas"]["model.layers.0.self_attn.o_proj.kernel"]) == {"a", "b"}
    assert ad.num_trainable() == 2 * (16 * 2 + 2 * 16)
