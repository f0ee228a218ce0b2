"""DistilBERT parity with transformers (fp32, padded batch) and save/load round trip."""

from __future__ import annotations

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
