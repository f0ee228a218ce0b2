"""Rotary embeddings: inverse frequencies against transformers' ROPE_INIT_FUNCTIONS for every rope
type, rotation against transformers' apply_rotary_pos_emb, and whole-model parity per scaling type."""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary

from jaxsparse import models
from jaxsparse.models import rope
from tests.models.test_llama import random_torch_model

SCALINGS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 4,
    },
}


def llama_config(scaling: dict, **kw):
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=6,
        rope_parameters={"rope_theta": 500.0, **scaling},
        pad_token_id=0,
        **kw,
    )


def phi3_longrope_config():
    half = 8  # head_dim 32 * partial 0.5 = 16 rotary dims -> 8 frequencies
    return transformers.Phi3Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        original_max_position_embeddings=5,
        partial_rotary_factor=0.5,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 1000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.5 * i for i in range(half)],
            "original_max_position_embeddings": 5,
        },
        pad_token_id=0,
    )


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_inverse_frequencies_match_transformers(name):
    config = llama_config(SCALINGS[name])
    for seq_len in (None, 20):
        if name == "default":
            ref, ref_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        else:
            ref, ref_scale = ROPE_INIT_FUNCTIONS[name](config, None, seq_len=seq_len)
        ours, scale = rope.inv_frequencies(config, None if seq_len is None else jnp.int32(seq_len))
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)
        assert scale == pytest.approx(ref_scale)


def test_longrope_switches_to_long_factors_beyond_the_trained_context():
    config = phi3_longrope_config()
    short_ref, scale_ref = ROPE_INIT_FUNCTIONS["longrope"](config, None)
    long_ref, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=6)
    short, scale = rope.inv_frequencies(config, jnp.int32(5))
    long, _ = rope.inv_frequencies(config, jnp.int32(6))
    np.testing.assert_allclose(np.asarray(short), short_ref.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(long), long_ref.numpy(), rtol=1e-6)
    assert not np.allclose(short_ref.numpy(), long_ref.numpy())
    assert scale == pytest.approx(scale_ref) and scale > 1.0  # sqrt(1 + ln(16/5) / ln 5)


def test_partial_rotation_matches_transformers():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)  # (B, T, N, D), rotate 4 of 8 dims
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    config = transformers.Phi3Config(hidden_size=24, num_attention_heads=3, partial_rotary_factor=0.5)
    cos, sin = rope.rotary_cos_sin(config, jnp.asarray(positions))
    assert cos.shape == (2, 5, 4)
    ours = np.asarray(rope.apply_rotary(jnp.asarray(q), cos, sin))
    qt = torch.as_tensor(q).transpose(1, 2)
    ref, _ = phi3_apply_rotary(qt, qt, torch.tensor(np.array(cos)), torch.tensor(np.array(sin)))
    np.testing.assert_allclose(ours, ref.transpose(1, 2).numpy(), atol=1e-6)
    np.testing.assert_array_equal(ours[..., 4:], q[..., 4:])


def test_legacy_rope_scaling_is_read():
    # a pre-transformers-5 config: rope_theta + rope_scaling, no rope_parameters
    legacy = types.SimpleNamespace(
        hidden_size=16,
        num_attention_heads=2,
        rope_theta=100.0,
        rope_scaling={"type": "linear", "factor": 4.0},
    )
    p = rope.rope_parameters(legacy)
    assert p == {"type": "linear", "factor": 4.0, "rope_type": "linear", "rope_theta": 100.0}


# Sequences of 9 tokens > max_position_embeddings (6): dynamic NTK and longrope take their
# long-context branch; yarn and llama3 rescale the low frequencies.
@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_llama_model_parity_per_scaling(name, parity):
    tm = random_torch_model(transformers.AutoModelForCausalLM, llama_config(SCALINGS[name]))
    ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19, 0, 0, 0]])
    assert parity(tm, models.from_torch(tm), ids, (ids != 0).astype(np.int64)) <= 1e-5


@pytest.mark.parametrize("length", [4, 9])
def test_phi3_longrope_model_parity(length, parity):
    tm = random_torch_model(transformers.AutoModelForCausalLM, phi3_longrope_config())
    ids = np.arange(3, 3 + 2 * length).reshape(2, length)
    assert parity(tm, models.from_torch(tm), ids, np.ones_like(ids)) <= 1e-5
