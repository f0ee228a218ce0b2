"""PEFT LoRA files: byte-exact round trip of what PEFT writes, config mapping, and clear refusals."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from jaxsparse.convert import PEFT_VERSION, AdapterFormatError  # noqa: E402
from jaxsparse.convert.peft_lora import (  # noqa: E402
    load_peft_lora,
    lora_config_from_peft,
    lora_config_to_peft,
    save_peft_lora,
)
from jaxsparse.methods import lora  # noqa: E402
from jaxsparse.models import from_torch  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def peft_dir(llama, tmp_path_factory):
    """A PEFT-written LoRA adapter with rank/alpha patterns and trained biases."""
    import copy

    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        init_lora_weights=False,
        rank_pattern={"layers.1.self_attn.v_proj": 2},
        alpha_pattern={"gate_proj": 5},
        lora_dropout=0.1,
    )
    model = peft.get_peft_model(copy.deepcopy(llama), config)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(out))
    return out


def test_peft_file_round_trips_byte_for_byte(llama, peft_dir, tmp_path):
    ours = from_torch(llama)
    adapter = load_peft_lora(peft_dir, ours.params)
    d = adapter.deltas["model.layers.1.self_attn.v_proj.kernel"]
    assert d.a.shape == (16, 2) and d.b.shape == (2, 8) and d.scale == 4.0
    assert adapter.deltas["model.layers.0.mlp.gate_proj.kernel"].scale == 5 / 4
    save_peft_lora(adapter, tmp_path / "again", base_model_class="LlamaForCausalLM")
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        peft_dir / "adapter_model.safetensors"
    ).read_bytes()
    theirs = json.loads((peft_dir / "adapter_config.json").read_text())
    mine = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert sorted(mine) == sorted(theirs)
    theirs["target_modules"] = sorted(theirs["target_modules"])  # PEFT saves a set, in arbitrary order
    mine["target_modules"] = sorted(mine["target_modules"])
    assert mine == theirs


def test_config_maps_field_for_field():
    cfg = lora.LoraConfig(
        r=2, lora_alpha=3, target_modules=["a"], use_rslora=True, bias="all", task_type="SEQ_CLS"
    )
    raw = lora_config_to_peft(cfg)
    assert raw["modules_to_save"] == ["classifier", "score"]
    back = lora_config_from_peft(raw)
    assert (back.r, back.lora_alpha, back.use_rslora, back.bias, back.target_modules) == (
        2,
        3,
        True,
        "all",
        ("a",),
    )
    # the same keys the pinned PEFT release writes (the test extra pins it: jaxsparse.convert.PEFT_VERSION)
    assert set(raw) == set(peft.LoraConfig().to_dict()) - {"runtime_config"}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_dora", True),
        ("layers_to_transform", [0]),
        ("lora_bias", True),
        ("megatron_config", {"x": 1}),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "astra"),
        ("astra_config", {"rank": 4}),
        ("layer_replication", [[0, 1]]),
        ("brand_new_feature", 7),
    ],
)
def test_unsupported_features_are_refused_by_name(key, value):
    with pytest.raises(AdapterFormatError, match=key):
        lora_config_from_peft({"peft_type": "LORA", "target_modules": ["q_proj"], key: value})


def test_files_of_the_previous_peft_release_read_the_same():
    """PEFT 0.21.2 wrote no ``astra_config`` and its own ``peft_version``: such files still load."""
    cfg = lora.LoraConfig(r=2, lora_alpha=3, target_modules=["a"], alpha_pattern={"a": 5})
    raw = lora_config_to_peft(cfg)
    assert raw["astra_config"] is None and raw["peft_version"] == PEFT_VERSION == peft.__version__
    older = {k: v for k, v in raw.items() if k != "astra_config"} | {"peft_version": "0.21.2"}
    assert lora_config_from_peft(older) == lora_config_from_peft(raw) == cfg


def test_inference_only_fields_are_accepted():
    cfg = lora_config_from_peft(
        {"peft_type": "LORA", "target_modules": ["q"], "lora_dropout": 0.3, "eva_config": None}
    )
    assert cfg.lora_dropout == 0.3


def _copy(src, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    return dst


def test_bad_files_name_the_problem(llama, peft_dir, tmp_path):
    params = from_torch(llama).params
    bad = _copy(peft_dir, tmp_path)
    weights = bad / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match="corrupt or truncated"):
        load_peft_lora(bad, params)
    weights.write_bytes(b"\x00" * 40)
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors"):
        load_peft_lora(bad, params)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json"):
        load_peft_lora(bad, params)


def test_adapter_for_another_model_is_refused(peft_dir):
    torch.manual_seed(0)
    wider = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=24,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(
        AdapterFormatError, match=r"lora_A \(4, 16\).*expected \(4, 24\).*different base model\?"
    ):
        load_peft_lora(peft_dir, from_torch(wider).params)
    shallower = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(AdapterFormatError, match="not a linear layer of the base model"):
        load_peft_lora(peft_dir, from_torch(shallower).params)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(AdapterFormatError, match="target_modules"):
        load_peft_lora(peft_dir, from_torch(bert).params)


def test_rank_scale_inconsistent_with_config_is_not_written(tmp_path):
    params = {"q": {"kernel": jnp.ones((4, 4))}}
    adapter = lora.init(params, lora.LoraConfig(r=2, target_modules=["q"]), jax.random.key(0))
    import dataclasses

    wrong = dataclasses.replace(adapter, config=lora.LoraConfig(r=3, target_modules=["q"]))
    with pytest.raises(ValueError, match="disagree with the config"):
        save_peft_lora(wrong, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    np.testing.assert_array_equal(np.asarray(adapter.deltas["q.kernel"].b), 0)
