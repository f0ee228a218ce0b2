"""Llama, Mistral, Qwen2, Gemma and Phi-3 parity with transformers (fp32, left and right padding),
every head, tied and untied embeddings, parameter naming, bf16, save -> transformers load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsparse import models
from jaxsparse.models import llama
from jaxsparse.tree import leaf_paths

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    num_labels=3,
)


def make_config(model_type: str, **overrides):
    kw = dict(COMMON)
    if model_type == "llama":
        kw.update(attention_bias=True, mlp_bias=True)
    elif model_type == "mistral":
        kw.update(sliding_window=3)
    elif model_type == "qwen2":  # sliding window on layer 1 only (max_window_layers=1)
        kw.update(use_sliding_window=True, sliding_window=3, max_window_layers=1)
    elif model_type == "gemma":
        kw.update(head_dim=8)
    elif model_type == "phi3":
        kw.update(partial_rotary_factor=0.5, sliding_window=4)
    kw.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **kw)


def random_torch_model(cls, config, seed: int = 0, std: float = 0.2):
    """A transformers model with every parameter ~ normal(0, std): the default init (std 0.02, zero
    Gemma norms) would make the outputs too small for a parity check to mean anything."""
    torch.manual_seed(seed)
    model = cls.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


@pytest.fixture
def mixed_padding():
    """Right padding (row 1), left padding (row 2) and none (row 0); pad id 0; T=7 > sliding windows."""
    ids = np.array(
        [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 0, 0, 0], [0, 0, 3, 4, 5, 6, 7]], dtype=np.int64
    )
    return ids, (ids != 0).astype(np.int64)


HEADS = {
    "base": transformers.AutoModel,
    "causal_lm": transformers.AutoModelForCausalLM,
    "seq_cls": transformers.AutoModelForSequenceClassification,
}


@pytest.mark.parametrize("task", sorted(HEADS))
@pytest.mark.parametrize("model_type", llama.MODEL_TYPES)
def test_parity_with_padding(model_type, task, mixed_padding, parity):
    tm = random_torch_model(HEADS[task], make_config(model_type))
    model = models.from_torch(tm)
    assert model.task == task
    assert parity(tm, model, *mixed_padding) <= 1e-5


@pytest.mark.parametrize(
    "model_type,tied", [("llama", True), ("qwen2", True), ("gemma", False), ("phi3", False)]
)
def test_tied_and_untied_heads(model_type, tied, mixed_padding, parity):
    config = make_config(model_type, tie_word_embeddings=tied)
    tm = random_torch_model(transformers.AutoModelForCausalLM, config, seed=1)
    model = models.from_torch(tm)
    paths = leaf_paths(model.params)
    assert ("lm_head.kernel" in paths) is (not tied)
    assert parity(tm, model, *mixed_padding) <= 1e-5


def test_parameter_paths_follow_hugging_face_modules():
    model = models.init_params(make_config("llama", tie_word_embeddings=False), task="causal_lm")
    shapes = {p: tuple(x.shape) for p, x in leaf_paths(model.params).items()}
    assert shapes["model.embed_tokens.embedding"] == (64, 32)
    assert shapes["model.layers.0.self_attn.q_proj.kernel"] == (32, 32)  # (in, out)
    assert shapes["model.layers.0.self_attn.k_proj.kernel"] == (32, 16)  # 2 kv heads of 8
    assert shapes["model.layers.1.mlp.down_proj.kernel"] == (48, 32)
    assert shapes["model.layers.0.input_layernorm.scale"] == (32,)
    assert shapes["model.norm.scale"] == (32,)
    assert shapes["lm_head.kernel"] == (32, 64)
    phi3 = leaf_paths(models.init_params(make_config("phi3"), task="seq_cls").params)
    assert phi3["model.layers.0.self_attn.qkv_proj.kernel"].shape == (32, 64)  # q 32 + k 16 + v 16
    assert phi3["model.layers.0.mlp.gate_up_proj.kernel"].shape == (32, 96)
    assert phi3["score.kernel"].shape == (32, 3)
    base = leaf_paths(models.init_params(make_config("qwen2"), task="base").params)
    assert "layers.0.self_attn.q_proj.bias" in base and "layers.0.self_attn.o_proj.bias" not in base


def test_state_dict_keys_equal_transformers(mixed_padding):
    for model_type in llama.MODEL_TYPES:
        tm = random_torch_model(transformers.AutoModelForCausalLM, make_config(model_type))
        ours = models.to_state_dict(models.from_torch(tm))
        theirs = {
            k: v
            for k, v in tm.state_dict().items()
            if not (tm.config.tie_word_embeddings and k == "lm_head.weight")
        }
        assert set(ours) == set(theirs), model_type
        for k, v in theirs.items():
            np.testing.assert_array_equal(ours[k], v.numpy())


def test_sliding_window_changes_the_output(mixed_padding, our_output):
    # The parity tests only mean something for the window if the window matters at this length.
    tm = random_torch_model(transformers.AutoModelForCausalLM, make_config("mistral"))
    windowed = models.from_torch(tm)
    full_config = make_config("mistral", sliding_window=None)
    full = models.from_state_dict(full_config, tm.state_dict(), task="causal_lm")
    ids, mask = mixed_padding
    assert np.abs(our_output(windowed, ids, mask) - our_output(full, ids, mask)).max() > 1e-2
    assert llama.sliding_window(make_config("qwen2"), 0) is None
    assert llama.sliding_window(make_config("qwen2"), 1) == 3


def test_explicit_position_ids_match_transformers(mixed_padding, parity):
    tm = random_torch_model(transformers.AutoModelForCausalLM, make_config("llama"))
    ids, mask = mixed_padding
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    assert parity(tm, models.from_torch(tm), ids, mask, position_ids=positions) <= 1e-5


def test_gemma_init_is_zero_centred_norms():
    params = leaf_paths(models.init_params(make_config("gemma"), task="base").params)
    assert float(jnp.abs(params["norm.scale"]).max()) == 0.0
    assert float(jnp.abs(params["layers.0.input_layernorm.scale"]).max()) == 0.0


def test_bfloat16_params_and_compute(mixed_padding, our_output):
    tm = random_torch_model(transformers.AutoModelForCausalLM, make_config("qwen2"), std=0.1)
    fp32 = models.from_torch(tm)
    bf16 = models.from_torch(tm, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(bf16.params))
    ids, mask = mixed_padding
    out16 = our_output(bf16, ids, mask)
    assert out16.dtype == jnp.bfloat16
    keep = mask.astype(bool)
    ref = our_output(fp32, ids, mask)[keep]
    # bf16 has 8 mantissa bits: agreement to a few percent of the logit scale.
    assert np.abs(out16.astype(np.float32)[keep] - ref).max() <= 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("model_type,task", [("gemma", "causal_lm"), ("phi3", "seq_cls")])
def test_save_then_transformers_load_gives_same_logits(model_type, task, tmp_path, mixed_padding, our_output):
    config = make_config(model_type)
    tm = random_torch_model(HEADS[task], config, seed=2)
    model = models.from_torch(tm)
    models.save_pretrained(model, tmp_path / "out")
    back = HEADS[task].from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids, mask = mixed_padding
    with torch.no_grad():
        ref = back(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    ours = our_output(model, ids, mask)
    keep = mask.astype(bool) if ours.ndim == 3 else slice(None)
    assert np.abs(ours[keep] - ref[keep]).max() <= 1e-5


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="multiple of"):
        models.init_params(make_config("llama", num_key_value_heads=3), task="base")
    config = make_config("llama")
    config.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="unsupported rope_type 'proportional'"):
        models.init_params(config, task="base")


def test_causal_lm_directory_loads_as_base_and_seq_cls(tmp_path, mixed_padding, our_output):
    config = make_config("llama", tie_word_embeddings=False)
    tm = random_torch_model(transformers.AutoModelForCausalLM, config, seed=4)
    tm.save_pretrained(tmp_path / "lm")
    ids, mask = mixed_padding
    base_ref = transformers.AutoModel.from_pretrained(tmp_path / "lm", attn_implementation="eager").eval()
    with torch.no_grad():
        ref = base_ref(
            input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)
        ).last_hidden_state.numpy()
    base = models.from_pretrained(tmp_path / "lm", task="base")
    keep = mask.astype(bool)
    assert np.abs(our_output(base, ids, mask)[keep] - ref[keep]).max() <= 1e-5
    cls = models.from_pretrained(tmp_path / "lm", num_labels=5)
    assert cls.task == "seq_cls" and our_output(cls, ids, mask).shape == (3, 5)


@pytest.mark.parametrize("tie", [False, True])
def test_lm_head_dropped_only_when_tied_or_said(tie):
    """An untied lm_head.weight is a real weight: a causal LM keeps it; base/seq_cls drop it with a warning."""
    import warnings

    config = make_config("llama", tie_word_embeddings=tie)
    tm = random_torch_model(transformers.AutoModelForCausalLM, config, seed=5)
    state = {k: v for k, v in tm.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"].clone()  # present in the file either way
    lm = models.from_state_dict(config, state, task="causal_lm")
    assert ("lm_head" in lm.params) == (not tie)
    if not tie:
        np.testing.assert_array_equal(
            np.asarray(lm.params["lm_head"]["kernel"]).T, state["lm_head.weight"].numpy()
        )
    for task in ("base", "seq_cls"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models.from_state_dict(config, state, task=task)
        said = [str(w.message) for w in caught if "lm_head.weight" in str(w.message)]
        assert bool(said) == (not tie), (task, said)
