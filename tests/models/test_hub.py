"""Loading/saving infrastructure: safetensors I/O, sharded checkpoints, prefix handling, clear errors,
atomic writes."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from jaxsparse import models
from jaxsparse.atomic import OutputExistsError
from jaxsparse.models import hub
from jaxsparse.models.hub import CheckpointError


@pytest.fixture
def config():
    return transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=8,
    )


@pytest.fixture
def state(config):
    return models.to_state_dict(models.init_params(config, task="base", seed=0))


def test_safetensors_round_trip_against_the_library(tmp_path):
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([1, 2], np.int32)}
    models.write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    ref = safetensors.numpy.load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(ref[k], v)
    safetensors.numpy.save_file(tensors, tmp_path / "y.safetensors")
    ours = models.read_safetensors(tmp_path / "y.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(ours[k], v)


def test_bf16_safetensors_against_torch(tmp_path):
    t = torch.randn(3, 4, dtype=torch.bfloat16)
    safetensors.torch.save_file({"w": t}, tmp_path / "t.safetensors")
    ours = models.read_safetensors(tmp_path / "t.safetensors")["w"]
    assert ours.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.astype(np.float32), t.float().numpy())
    models.write_safetensors(tmp_path / "u.safetensors", {"w": ours})
    back = safetensors.torch.load_file(tmp_path / "u.safetensors")["w"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)


def test_sharded_checkpoint(config, state, tmp_path):
    keys = sorted(state)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    for name, ks in shards.items():
        models.write_safetensors(tmp_path / name, {k: state[k] for k in ks})
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    config.architectures = ["BertModel"]
    config.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    back = models.to_state_dict(model)
    assert sorted(back) == keys
    for k in keys:
        np.testing.assert_array_equal(back[k], state[k])


def test_prefixed_checkpoint_loads_as_base_dropping_head_with_warning(config):
    cls = models.init_params(config, task="seq_cls", seed=1)
    with pytest.warns(UserWarning, match="classifier"):
        base = models.from_state_dict(config, models.to_state_dict(cls), task="base")
    jax.tree_util.tree_map(np.testing.assert_array_equal, base.params, cls.params["bert"])


def test_config_dict_and_labels(config, state):
    model = models.from_state_dict(config.to_dict(), state, task="seq_cls")
    assert model.config.model_type == "bert" and model.params["classifier"]["kernel"].shape == (16, 2)
    hub.set_labels(model.config, None, {"0": "a", "1": "b", "2": "c"})
    assert model.config.num_labels == 3 and model.config.label2id == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ValueError, match=r"0\.\.n-1"):
        hub.set_labels(model.config, None, {1: "a"})


def test_missing_key_is_named(config, state):
    del state["encoder.layer.0.attention.self.query.weight"]
    with pytest.raises(
        CheckpointError, match=r"missing keys: 'encoder\.layer\.0\.attention\.self\.query\.weight'"
    ):
        models.from_state_dict(config, state, task="base")


def test_unexpected_key_is_named(config, state):
    state["encoder.layer.0.attention.self.extra.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(
        CheckpointError, match=r"unexpected keys: 'encoder\.layer\.0\.attention\.self\.extra\.weight'"
    ):
        models.from_state_dict(config, state, task="base")


def test_wrong_shape_is_named(config, state):
    state["pooler.dense.weight"] = np.zeros((16, 15), np.float32)
    with pytest.raises(
        CheckpointError, match=r"'pooler\.dense\.weight': expected \(16, 16\), got \(16, 15\)"
    ):
        models.from_state_dict(config, state, task="base")


def test_missing_base_weight_in_seq_cls_is_not_silently_initialised(config, state):
    del state["pooler.dense.bias"]
    with pytest.raises(CheckpointError, match=r"bert\.pooler\.dense\.bias"):
        models.from_state_dict(config, state, task="seq_cls")


def test_unsupported_model_type_and_task(config, state):
    with pytest.raises(ValueError, match=r"unsupported model_type 't5'; supported: \[.*'bert'"):
        models.from_state_dict(transformers.T5Config(), {}, task="base")
    with pytest.raises(ValueError, match="supports tasks"):
        models.from_state_dict(config, state, task="causal_lm")
    with pytest.raises(ValueError, match="unknown task"):
        models.init_params(config, task="mlm")


def test_bad_directories(tmp_path, config):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        models.from_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        models.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        models.from_pretrained(tmp_path)


def test_save_is_atomic(config, tmp_path, monkeypatch):
    model = models.init_params(config, task="base")
    out = tmp_path / "out"
    models.save_pretrained(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        models.save_pretrained(models.init_params(config, task="base", seed=9), out, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        models.save_pretrained(model, tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_save_replaces_a_previous_output_only_with_overwrite(config, tmp_path):
    out = tmp_path / "out"
    models.save_pretrained(models.init_params(config, task="base", seed=0), out)
    model = models.init_params(config, task="seq_cls", seed=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="not empty"):
        models.save_pretrained(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    models.save_pretrained(model, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    back = models.from_pretrained(out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, model.params)


def test_sharded_save_matches_transformers_layout_and_loads_everywhere(config, tmp_path):
    model = models.init_params(config, task="seq_cls", seed=3)
    state = models.to_state_dict(model)
    models.save_pretrained(model, tmp_path / "sharded", max_shard_size="2KiB")
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors" not in files
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in state.values())
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # every shard within the limit, unless it holds one bigger tensor alone
        tensors = safetensors.numpy.load_file(tmp_path / "sharded" / shard)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 2 * 1024
    # transformers reads the index, and so do we: the same weights and logits
    tm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "sharded").eval()
    for key, value in tm.state_dict().items():
        if key in state:
            np.testing.assert_array_equal(value.numpy(), state[key])
    back = models.from_pretrained(tmp_path / "sharded")
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, model.params)
    # under the limit: one model.safetensors, as before
    models.save_pretrained(model, tmp_path / "single", max_shard_size="1GB")
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == [
        ".jaxsparse-output.json",
        "config.json",
        "model.safetensors",
    ]


@pytest.mark.parametrize("size", ["5 parsecs", "GB", "-1", 0, "1.5GB"])
def test_bad_shard_size_is_refused(config, tmp_path, size):
    with pytest.raises(ValueError, match="shard size"):
        models.save_pretrained(models.init_params(config, task="base"), tmp_path / "x", max_shard_size=size)
    assert not (tmp_path / "x").exists()


def test_shards_split_in_key_order_with_big_tensors_alone():
    sd = {"a": np.zeros(4, np.float32), "b": np.zeros(100, np.float32), "c": np.zeros(2, np.float32)}
    assert [list(s) for s in hub.shard_state_dict(sd, 32)] == [["a"], ["b"], ["c"]]
    assert [list(s) for s in hub.shard_state_dict(sd, 10_000)] == [["a", "b", "c"]]
    assert hub.parse_size("2KiB") == 2048 and hub.parse_size("3mb") == 3_000_000


def test_bf16_save_and_load(config, tmp_path):
    model = models.init_params(config, task="base", dtype=jnp.bfloat16)
    models.save_pretrained(model, tmp_path / "bf")
    tm = transformers.AutoModel.from_pretrained(tmp_path / "bf")
    assert tm.dtype == torch.bfloat16
    back = models.from_pretrained(tmp_path / "bf", dtype=jnp.bfloat16)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, model.params)


@pytest.mark.real
def test_load_tokenizer(minilm_dir):
    tok = models.load_tokenizer(minilm_dir)
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id
