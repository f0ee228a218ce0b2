"""DistilBERT parity with transformers (fp32, padded batch), save/load round trip, the MLM head."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsparse import models
from jaxsparse.models.distilbert import sinusoidal_positions
from jaxsparse.tree import leaf_paths


@pytest.fixture
def config():
    return transformers.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=16, num_labels=3
    )


@pytest.mark.parametrize(
    "cls", [transformers.DistilBertModel, transformers.DistilBertForSequenceClassification]
)
def test_parity_with_padding(config, padded_batch, parity, cls):
    torch.manual_seed(0)
    tm = cls(config).eval()
    model = models.from_torch(tm)
    assert parity(tm, model, *padded_batch) <= 1e-5


def test_param_paths_follow_transformers(config):
    paths = leaf_paths(models.init_params(config, task="seq_cls").params)
    for name in ("q_lin", "k_lin", "v_lin", "out_lin"):
        assert paths[f"distilbert.transformer.layer.0.attention.{name}.kernel"].shape == (32, 32)
    assert paths["distilbert.transformer.layer.1.ffn.lin1.kernel"].shape == (32, 64)
    assert paths["pre_classifier.kernel"].shape == (32, 32)
    assert paths["classifier.kernel"].shape == (32, 3)


def test_sinusoidal_init_matches_transformers(config):
    config.sinusoidal_pos_embds = True
    tm = transformers.DistilBertModel(config)
    ref = tm.embeddings.position_embeddings.weight.detach().numpy()
    np.testing.assert_allclose(sinusoidal_positions(16, 32), ref, atol=1e-6)
    ours = models.init_params(config, task="base").params["embeddings"]["position_embeddings"]["embedding"]
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6)


def test_save_pretrained_loads_in_transformers(config, padded_batch, tmp_path, our_output, torch_output):
    model = models.init_params(config, task="seq_cls", seed=2)
    models.save_pretrained(model, tmp_path / "db")
    tm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "db").eval()
    assert type(tm).__name__ == "DistilBertForSequenceClassification"
    ids, mask = padded_batch
    assert np.abs(our_output(model, ids, mask) - torch_output(tm, ids, mask)).max() <= 1e-5


# ----------------------------------------------------------------------------- masked LM


def _perturbed_mlm(config, tie=True, seed=0):
    """A DistilBertForMaskedLM with every parameter moved off its init (zero biases and unit norms
    would hide a missing bias or scale); the tied projector weight is the embedding tensor itself."""
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    tm = transformers.DistilBertForMaskedLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return tm.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_masked_lm_parity_and_paths(config, padded_batch, parity, tie):
    tm = _perturbed_mlm(config, tie)
    model = models.from_torch(tm)
    assert model.task == "masked_lm"
    assert parity(tm, model, *padded_batch) <= 1e-5
    paths = leaf_paths(model.params)
    assert paths["vocab_transform.kernel"].shape == (32, 32)
    assert paths["vocab_layer_norm.scale"].shape == (32,)
    assert paths["vocab_projector.bias"].shape == (64,)
    assert ("vocab_projector.kernel" in paths) == (not tie)


@pytest.mark.parametrize("tie", [True, False])
def test_masked_lm_saves_as_transformers_distilbert_for_masked_lm(
    config, padded_batch, tmp_path, our_output, torch_output, tie
):
    model = models.from_torch(_perturbed_mlm(config, tie))
    models.save_pretrained(model, tmp_path / "mlm")
    assert ("vocab_projector.weight" in models.read_checkpoint(tmp_path / "mlm")) == (not tie)
    tm = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    assert type(tm).__name__ == "DistilBertForMaskedLM"
    assert (tm.vocab_projector.weight is tm.distilbert.embeddings.word_embeddings.weight) == tie
    ids, mask = padded_batch
    keep = mask.astype(bool)
    assert np.abs(our_output(model, ids, mask)[keep] - torch_output(tm, ids, mask)[keep]).max() <= 1e-5
    back = models.from_pretrained(tmp_path / "mlm")
    assert back.task == "masked_lm"
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, model.params)


def test_masked_lm_fresh_head_on_an_encoder_checkpoint(config, padded_batch, tmp_path):
    """A DistilBertModel checkpoint loads as masked_lm with a new head (transformers' init) whose
    projector is the word embedding: logits = LayerNorm(gelu(h W + b)) @ E^T (NumPy oracle)."""
    base = models.init_params(config, task="base", seed=0)
    models.save_pretrained(base, tmp_path / "enc")
    model = models.from_pretrained(tmp_path / "enc", task="masked_lm", seed=4)
    p = leaf_paths(model.params)
    for path, x in leaf_paths(base.params).items():
        np.testing.assert_array_equal(np.asarray(p["distilbert." + path]), np.asarray(x))
    w = np.asarray(p["vocab_transform.kernel"])
    assert 0.014 < w.std() < 0.026  # normal(0, initializer_range), 1024 draws
    assert np.all(np.asarray(p["vocab_projector.bias"]) == 0)
    assert np.all(np.asarray(p["vocab_layer_norm.scale"]) == 1)
    ids, mask = (jnp.asarray(a) for a in padded_batch)
    h = np.asarray(base(ids, mask), np.float64) @ w + np.asarray(p["vocab_transform.bias"])
    h = h * 0.5 * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))  # exact gelu (activation "gelu")
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-12)
    want = h @ np.asarray(p["distilbert.embeddings.word_embeddings.embedding"], np.float64).T
    keep = np.asarray(mask).astype(bool)
    assert np.abs(np.asarray(model(ids, mask))[keep] - want[keep]).max() <= 1e-5


def test_tied_projector_gradient_equals_transformers(config):
    """One tensor, two uses: the MLM loss gradient w.r.t. the word embedding (input + projector paths)
    and the projector bias equal transformers'."""
    from jaxsparse import mlm

    tm = _perturbed_mlm(config)
    model = models.from_torch(tm)
    ids = np.random.default_rng(1).integers(5, 64, (3, 8))
    labels = np.where(np.random.default_rng(2).random(ids.shape) < 0.4, ids, -100)
    attention = np.ones_like(ids)
    out = tm(
        input_ids=torch.as_tensor(ids),
        attention_mask=torch.as_tensor(attention),
        labels=torch.as_tensor(labels),
    )
    out.loss.backward()

    def loss(params):
        logits = model.apply_fn(params, jnp.asarray(ids), jnp.asarray(attention))
        return mlm.masked_lm_loss(logits, jnp.asarray(labels))

    value, grads = jax.jit(jax.value_and_grad(loss))(model.params)
    assert abs(float(value) - out.loss.item()) <= 1e-5
    g = leaf_paths(grads)
    emb = tm.distilbert.embeddings.word_embeddings.weight.grad.numpy()
    np.testing.assert_allclose(
        np.asarray(g["distilbert.embeddings.word_embeddings.embedding"]), emb, atol=1e-6, rtol=0
    )
    np.testing.assert_allclose(
        np.asarray(g["vocab_projector.bias"]), tm.vocab_projector.bias.grad.numpy(), atol=1e-6
    )
