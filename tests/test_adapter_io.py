"""Format detection, save/load through one entry point with a real (tiny) model, and named errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

from jaxsparse import adapter_io, models
from jaxsparse.adapter_io import adapter_format, load_adapter, save_adapter
from jaxsparse.convert import AdapterFormatError
from jaxsparse.delta import Adapter, SparseDelta
from jaxsparse.methods import shira, sparta
from jaxsparse.train import init_train_state, make_train_step


@pytest.fixture(scope="module")
def model():
    cfg = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    return models.init_params(cfg, task="seq_cls", seed=0)


def trained(model, adapter, steps=3):
    """A few real optimizer steps so values (and the head) are non-trivial."""
    ids = jax.random.randint(jax.random.key(0), (4, 6), 1, 40)
    batch = {"input_ids": ids, "labels": jnp.array([0, 1, 1, 0])}

    def apply_model(p, b):
        return model.apply_fn(p, b["input_ids"])

    def loss_fn(logits, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    opt = optax.adam(1e-2)
    state = init_train_state(adapter, opt, 0)
    step = make_train_step(apply_model, loss_fn, opt)
    for _ in range(steps):
        state, _ = step(state, model.params, batch)
    return state.adapter


def assert_same(a, b):
    assert sorted(a.deltas) == sorted(b.deltas) and sorted(a.dense) == sorted(b.dense)
    for p, d in a.deltas.items():
        np.testing.assert_array_equal(np.asarray(b.deltas[p].indices), np.asarray(d.indices))
        np.testing.assert_array_equal(np.asarray(b.deltas[p].values), np.asarray(d.values))
    for p, v in a.dense.items():
        np.testing.assert_array_equal(np.asarray(b.dense[p]), np.asarray(v))


@pytest.mark.parametrize(
    ("make", "fmt"),
    [
        (lambda p: shira.init(p, shira.ShiraConfig(r=1, target_modules=["q_proj", "v_proj"], modules_to_save=["score"],
                                                   task_type="SEQ_CLS")), "peft_shira"),
        (lambda p: sparta.init(p, sparta.SpartaConfig(density=0.1, target_modules=["v_proj", "o_proj"],
                                                      modules_to_save=["score"], task_type="SEQ_CLS")), "sparta"),
    ],
)  # fmt: skip
def test_train_save_detect_load(tmp_path, model, make, fmt):
    adapter = trained(model, make(model.params))
    assert any(float(jnp.abs(d.values).max()) > 0 for d in adapter.deltas.values())
    assert save_adapter(adapter, tmp_path / "a", model=model) == fmt
    assert adapter_format(tmp_path / "a") == fmt
    assert_same(adapter, load_adapter(tmp_path / "a", model=model))
    assert_same(adapter, load_adapter(tmp_path / "a"))
    if fmt == "sparta":
        cfg = json.loads((tmp_path / "a" / "config.json").read_text())
        assert cfg["model_type"] == "llama" and "sparta_pretrained_model" in cfg


def test_format_override_and_unknown(tmp_path, model):
    adapter = shira.init(model.params, shira.ShiraConfig(r=1, target_modules=["q_proj"]))
    assert save_adapter(adapter, tmp_path / "s", format="sparta") == "sparta"
    assert_same(adapter, load_adapter(tmp_path / "s", model.params))
    with pytest.raises(ValueError, match="unknown adapter format"):
        save_adapter(adapter, tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match="pass format="):
        save_adapter(dataclasses.replace(adapter, config=None), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_validates_against_params_and_writes_nothing(tmp_path, model):
    adapter = sparta.init(model.params, sparta.SpartaConfig(density=0.1, target_modules=["v_proj"]))
    path, d = next(iter(adapter.deltas.items()))
    bad = dataclasses.replace(
        adapter, deltas={path: SparseDelta(d.indices, d.values.at[0].set(jnp.nan), d.shape)}
    )
    with pytest.raises(ValueError, match="v_proj"):
        save_adapter(bad, tmp_path / "out", model=model)
    assert list(tmp_path.iterdir()) == []


def test_detection_errors(tmp_path):
    with pytest.raises(AdapterFormatError, match="does not exist"):
        adapter_format(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterFormatError, match="not a directory"):
        adapter_format(tmp_path / "file")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFormatError, match=r"not an adapter directory.*model\.safetensors"):
        load_adapter(plain)
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterFormatError, match="unsupported peft_type 'IA3'"):
        load_adapter(ia3)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert adapter_format(lora) == "peft_lora"
    with pytest.raises(AdapterFormatError, match="pass the base model's params"):
        load_adapter(lora)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "sparse_deltas.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFormatError, match=r"no config\.json"):
        adapter_format(orphan)


def test_adapter_that_does_not_fit_the_model(tmp_path, model):
    adapter = sparta.init(model.params, sparta.SpartaConfig(density=0.1, target_modules=["v_proj"],
                                                            modules_to_save=["score"]))  # fmt: skip
    save_adapter(adapter, tmp_path / "a")
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), model.params)
    with pytest.raises(AdapterFormatError, match="does not fit the model"):
        load_adapter(tmp_path / "a", half)
    assert isinstance(load_adapter(tmp_path / "a", model.params), Adapter)
    assert adapter_io.FORMATS == ("peft_shira", "peft_lora", "sparta")
