"""The front door, ``import jaxsparse as js``: the public names are pinned, each resolves to what its
module defines, importing the package stays cheap (no jax), and a SHiRA adapter goes from init to
merge / unmerge / save / load through ``js.`` only."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import jaxsparse as js

PUBLIC = [
    "Adapter",
    "LoraConfig",
    "LowRankDelta",
    "SQFTConfig",
    "ShiraConfig",
    "SparseDelta",
    "SpartaConfig",
    "TrainState",
    "__version__",
    "adapter_format",
    "apply",
    "from_pretrained",
    "fuse",
    "init",
    "init_train_state",
    "load_adapter",
    "make_eval_step",
    "make_loss",
    "make_train_step",
    "merge",
    "merge_inplace",
    "models",
    "save_adapter",
    "switch",
    "unmerge",
    "validate",
]


def test_public_names_are_pinned():
    assert sorted(js.__all__) == PUBLIC
    assert set(PUBLIC) <= set(dir(js))


def test_every_name_resolves_to_its_modules_object():
    from jaxsparse import adapter_io, delta, merge, models, train, version
    from jaxsparse.methods import lora, registry, shira, sparta, sqft

    same = {
        "Adapter": delta.Adapter,
        "LowRankDelta": delta.LowRankDelta,
        "SparseDelta": delta.SparseDelta,
        "apply": delta.apply,
        "LoraConfig": lora.LoraConfig,
        "SQFTConfig": sqft.SQFTConfig,
        "ShiraConfig": shira.ShiraConfig,
        "SpartaConfig": sparta.SpartaConfig,
        "init": registry.init_adapter,
        "merge": merge,  # the module, callable as merge.merge (see test_merge_is_callable_...)
        "merge_inplace": merge.merge_inplace,
        "unmerge": merge.unmerge,
        "switch": merge.switch,
        "fuse": merge.fuse,
        "validate": merge.validate,
        "adapter_format": adapter_io.adapter_format,
        "load_adapter": adapter_io.load_adapter,
        "save_adapter": adapter_io.save_adapter,
        "models": models,
        "from_pretrained": models.from_pretrained,
        "TrainState": train.TrainState,
        "init_train_state": train.init_train_state,
        "make_eval_step": train.make_eval_step,
        "make_loss": train.make_loss,
        "make_train_step": train.make_train_step,
        "__version__": version.__version__,
    }
    assert sorted(same) == PUBLIC
    for name in PUBLIC:
        assert getattr(js, name) is same[name], name
    assert isinstance(js.__version__, str) and js.__version__


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        js.nope  # noqa: B018
    assert not hasattr(js, "ShiraConfigs")


def test_merge_is_callable_whatever_was_imported_first():
    """``jaxsparse.merge`` is both the submodule and the function: importing the submodule (which
    rebinds the package attribute) leaves ``js.merge(params, adapter)`` working."""
    import jaxsparse.merge  # noqa: F401
    from jaxsparse.merge import merge as merge_fn

    params = {"lin": {"kernel": jnp.arange(6.0).reshape(2, 3)}}
    adapter = js.Adapter(
        {"lin.kernel": js.SparseDelta(jnp.array([1, 5], jnp.int32), jnp.array([1.0, 2.0]), (2, 3))}
    )
    got, saved = js.merge(params, adapter)
    want, want_saved = merge_fn(params, adapter)
    np.testing.assert_array_equal(got["lin"]["kernel"], want["lin"]["kernel"])
    np.testing.assert_array_equal(got["lin"]["kernel"], [[0.0, 2.0, 2.0], [3.0, 4.0, 7.0]])
    np.testing.assert_array_equal(saved["deltas"]["lin.kernel"], want_saved["deltas"]["lin.kernel"])
    assert js.merge.unmerge is js.unmerge


@pytest.mark.parametrize(
    "command", ["import jaxsparse", "from jaxsparse.cli import build_parser; build_parser().format_help()"]
)
def test_import_and_cli_help_do_not_load_jax(command):
    """``import jaxsparse`` and the CLI's parser (what ``jaxsparse --help`` builds) import no jax,
    numpy or transformers: the public names load on first use."""
    heavy = "[m for m in sys.modules if m.split('.')[0] in ('jax', 'numpy', 'transformers', 'torch')]"
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; {command}; print({heavy})"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout


def _tiny_params():
    return {
        "enc": {"query": {"kernel": jax.random.normal(jax.random.key(1), (8, 6))}},
        "out": {"kernel": jax.random.normal(jax.random.key(2), (6, 4))},
    }


@pytest.mark.parametrize(
    ("config", "module_name", "delta_type"),
    [
        (js.ShiraConfig(r=1), "shira", js.SparseDelta),
        (js.SpartaConfig(density=0.25), "sparta", js.SparseDelta),
        (js.LoraConfig(r=2, target_modules=["query", "out"]), "lora", js.LowRankDelta),
    ],
)
def test_init_dispatches_on_the_config_type(config, module_name, delta_type):
    """``js.init`` gives exactly what the method's own ``init`` gives for the same key."""
    import importlib

    params = _tiny_params()
    key = jax.random.key(7)
    got = js.init(params, config, key)
    want = importlib.import_module(f"jaxsparse.methods.{module_name}").init(params, config, key)
    assert got.config == config and sorted(got.deltas) == sorted(want.deltas) and got.deltas
    for path, d in got.deltas.items():
        assert isinstance(d, delta_type)
        for a, b in zip(
            jax.tree_util.tree_leaves(d), jax.tree_util.tree_leaves(want.deltas[path]), strict=True
        ):
            np.testing.assert_array_equal(a, b)


def test_init_refuses_a_config_of_no_method():
    with pytest.raises(ValueError, match="not the config of a registered method"):
        js.init(_tiny_params(), {"r": 8}, jax.random.key(0))


def test_shira_end_to_end_through_the_front_door(tmp_path):
    """A tiny BERT classifier: from_pretrained, a SHiRA adapter, two train steps, apply == merge
    (same bits), unmerge bit-exact, save / load round trip, all with ``js.`` names only."""
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    js.models.save_pretrained(js.models.init_params(cfg, task="seq_cls", seed=0), tmp_path / "base")
    model = js.from_pretrained(tmp_path / "base")
    ids = jnp.array([[1, 5, 7, 2], [1, 9, 3, 2]])
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": jnp.array([0, 1])}

    config = js.ShiraConfig(r=1, modules_to_save=["classifier"])
    adapter = js.init(model.params, config, jax.random.key(0))
    assert all(d.k == 16 + d.shape[1] for d in adapter.deltas.values() if d.shape[0] == 16)

    def apply_model(params, b):
        return model.apply_fn(params, b["input_ids"], b["attention_mask"])

    def loss_fn(logits, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    optimizer = optax.adam(1e-2)
    step = js.make_train_step(apply_model, loss_fn, optimizer)
    state = js.init_train_state(adapter, optimizer, 0)
    assert isinstance(state, js.TrainState)
    for _ in range(2):
        state, _ = step(state, model.params, batch)
    trained = state.adapter
    assert all(bool(jnp.any(d.values != 0)) for d in trained.deltas.values())

    effective = js.apply(model.params, trained)
    merged, saved = js.merge(model.params, trained)
    for a, b in zip(jax.tree_util.tree_leaves(effective), jax.tree_util.tree_leaves(merged), strict=True):
        np.testing.assert_array_equal(a, b)
    restored = js.unmerge(merged, trained, saved)
    for a, b in zip(
        jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(model.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)

    assert js.save_adapter(trained, tmp_path / "adapter", model=model) == "peft_shira"
    assert js.adapter_format(tmp_path / "adapter") == "peft_shira"
    loaded = js.load_adapter(tmp_path / "adapter", model=model)
    assert sorted(loaded.deltas) == sorted(trained.deltas) and sorted(loaded.dense) == sorted(trained.dense)
    for path, d in trained.deltas.items():
        np.testing.assert_array_equal(loaded.deltas[path].indices, d.indices)
        np.testing.assert_array_equal(loaded.deltas[path].values, d.values)
    for path, leaf in trained.dense.items():
        np.testing.assert_array_equal(loaded.dense[path], leaf)
    eval_step = js.make_eval_step(apply_model, loss_fn)
    np.testing.assert_array_equal(
        eval_step(loaded, model.params, batch)["loss"], eval_step(trained, model.params, batch)["loss"]
    )
