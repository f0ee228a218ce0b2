"""GPT-2 parity with transformers (fp32, padded batch), Conv1D layout, tied head, save/load round trip."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxsparse import models
from jaxsparse.models.hub import read_safetensors
from jaxsparse.tree import leaf_paths


@pytest.fixture
def config():
    return transformers.GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        num_labels=3,
    )


@pytest.mark.parametrize(
    "cls",
    [transformers.GPT2Model, transformers.GPT2LMHeadModel, transformers.GPT2ForSequenceClassification],
)
def test_parity_with_right_padding(config, padded_batch, parity, cls):
    torch.manual_seed(0)
    tm = cls(config).eval()
    model = models.from_torch(tm)
    assert parity(tm, model, *padded_batch) <= 1e-5


def test_seq_cls_parity_with_left_padding_and_positions(config, parity):
    torch.manual_seed(1)
    tm = transformers.GPT2ForSequenceClassification(config).eval()
    model = models.from_torch(tm)
    ids = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).astype(np.int64)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    assert parity(tm, model, ids, mask, position_ids=positions) <= 1e-5


def test_scale_attn_by_inverse_layer_idx(config, padded_batch, parity):
    config.scale_attn_by_inverse_layer_idx = True
    torch.manual_seed(2)
    tm = transformers.GPT2LMHeadModel(config).eval()
    assert parity(tm, models.from_torch(tm), *padded_batch) <= 1e-5


def test_conv1d_layout_and_tied_head(config):
    tm = transformers.GPT2LMHeadModel(config)
    model = models.from_torch(tm)
    paths = leaf_paths(model.params)
    # Conv1D weights are (in, out) in PyTorch already: no transpose
    w = tm.transformer.h[0].attn.c_attn.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(paths["transformer.h.0.attn.c_attn.kernel"]), w)
    assert not any(p.startswith("lm_head") for p in paths)
    assert "lm_head.weight" not in models.to_state_dict(model)
    assert model.fan_in_fan_out == ("c_attn", "c_proj", "c_fc")


def test_old_checkpoint_buffers_are_ignored(config):
    model = models.init_params(config, task="base")
    sd = models.to_state_dict(model)
    sd["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), bool))
    sd["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    back = models.from_state_dict(config, sd, task="base")
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, model.params)


def test_seq_cls_without_pad_token_uses_attention_mask(config, padded_batch, our_output):
    model = models.init_params(config, task="seq_cls", seed=4)
    ids, mask = padded_batch
    with_pad = our_output(model, ids, mask)
    config_nopad = type(config).from_dict({**config.to_dict(), "pad_token_id": None})
    nopad = models.from_state_dict(config_nopad, models.to_state_dict(model), task="seq_cls")
    np.testing.assert_allclose(our_output(nopad, ids, mask), with_pad, atol=1e-6)


@pytest.mark.parametrize(
    "task,auto", [("causal_lm", "AutoModelForCausalLM"), ("seq_cls", "AutoModelForSequenceClassification")]
)
def test_save_pretrained_loads_in_transformers(
    config, padded_batch, tmp_path, task, auto, our_output, torch_output
):
    model = models.init_params(config, task=task, seed=5)
    models.save_pretrained(model, tmp_path / "g")
    assert "lm_head.weight" not in read_safetensors(tmp_path / "g" / "model.safetensors")
    tm = getattr(transformers, auto).from_pretrained(tmp_path / "g").eval()
    ids, mask = padded_batch
    ours, ref = our_output(model, ids, mask), torch_output(tm, ids, mask)
    keep = mask.astype(bool) if ours.ndim == 3 else slice(None)
    assert np.abs(ours[keep] - ref[keep]).max() <= 1e-5
