"""BERT parity with transformers (fp32, padded batch), save/load round trip, real MiniLM weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsparse import models
from jaxsparse.tree import leaf_paths


@pytest.fixture
def config():
    return transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        type_vocab_size=2,
        num_labels=3,
    )


def _torch_model(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls(config).eval()


def test_base_parity_with_padding_and_token_types(config, padded_batch, parity):
    tm = _torch_model(transformers.BertModel, config)
    model = models.from_torch(tm)
    ids, mask = padded_batch
    token_types = np.array([[0, 0, 0, 1, 1, 1]] * 3)
    assert model.task == "base"
    assert parity(tm, model, ids, mask, token_type_ids=token_types) <= 1e-5


def test_seq_cls_parity_and_param_paths(config, padded_batch, parity):
    tm = _torch_model(transformers.BertForSequenceClassification, config)
    model = models.from_torch(tm)
    assert model.task == "seq_cls"
    assert parity(tm, model, *padded_batch) <= 1e-5
    paths = leaf_paths(model.params)
    q = paths["bert.encoder.layer.0.attention.self.query.kernel"]
    np.testing.assert_array_equal(
        np.asarray(q), tm.bert.encoder.layer[0].attention.self.query.weight.detach().numpy().T
    )
    assert paths["classifier.kernel"].shape == (32, 3)
    assert "bert.embeddings.LayerNorm.scale" in paths
    assert "bert.embeddings.word_embeddings.embedding" in paths


def test_apply_fn_is_differentiable_in_params(config, padded_batch):
    config.num_hidden_layers = 1
    model = models.init_params(config, task="seq_cls", seed=1)
    ids, mask = (jnp.asarray(a) for a in padded_batch)

    def loss(params):
        return jnp.sum(model.apply_fn(params, ids, mask) ** 2)

    grads = jax.jit(jax.grad(loss))(model.params)
    g = leaf_paths(grads)["bert.encoder.layer.0.attention.self.value.kernel"]
    assert g.shape == (32, 32) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize(
    "task,auto", [("base", "AutoModel"), ("seq_cls", "AutoModelForSequenceClassification")]
)
def test_save_pretrained_loads_in_transformers(
    config, padded_batch, tmp_path, task, auto, our_output, torch_output
):
    model = models.init_params(config, task=task, seed=3)
    models.save_pretrained(model, tmp_path / "out")
    tm = getattr(transformers, auto).from_pretrained(tmp_path / "out").eval()
    ids, mask = padded_batch
    ours = our_output(model, ids, mask)
    ref = torch_output(tm, ids, mask)
    keep = mask.astype(bool) if ours.ndim == 3 else slice(None)
    assert np.abs(ours[keep] - ref[keep]).max() <= 1e-5
    back = models.from_pretrained(tmp_path / "out")
    assert back.task == task
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, model.params)


def test_fresh_head_from_base_checkpoint(config):
    base = models.init_params(config, task="base", seed=0)
    sd = models.to_state_dict(base)
    a = models.from_state_dict(config, sd, task="seq_cls", seed=7)
    b = models.from_state_dict(config, sd, task="seq_cls", seed=7)
    c = models.from_state_dict(config, sd, task="seq_cls", seed=8)
    w = np.asarray(a.params["classifier"]["kernel"])
    np.testing.assert_array_equal(w, np.asarray(b.params["classifier"]["kernel"]))
    assert not np.array_equal(w, np.asarray(c.params["classifier"]["kernel"]))
    assert np.all(np.asarray(a.params["classifier"]["bias"]) == 0)
    # normal(0, initializer_range): 96 draws, the sample std is within 30% of 0.02
    assert 0.014 < w.std() < 0.026
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params["bert"], base.params)


def test_init_params_like_transformers(config):
    config.pad_token_id = 0
    p = leaf_paths(models.init_params(config, task="base", seed=0).params)
    assert np.all(np.asarray(p["embeddings.word_embeddings.embedding"][0]) == 0)
    assert np.all(np.asarray(p["encoder.layer.0.output.LayerNorm.scale"]) == 1)
    assert np.all(np.asarray(p["encoder.layer.0.output.dense.bias"]) == 0)


def test_bf16_params_and_compute(config, padded_batch, our_output):
    tm = _torch_model(transformers.BertModel, config)
    f32 = models.from_torch(tm)
    bf16 = models.from_torch(tm, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    ids, mask = padded_batch
    out = our_output(bf16, ids, mask)
    assert out.dtype == jnp.bfloat16
    ref = our_output(f32, ids, mask)
    keep = mask.astype(bool)
    # LayerNorm outputs are O(1); bf16 has ~3 significant digits
    assert np.abs(out.astype(np.float32)[keep] - ref[keep]).max() < 0.1


@pytest.mark.real
def test_real_minilm_matches_transformers(minilm_dir, our_output, torch_output):
    tok = models.load_tokenizer(minilm_dir)
    batch = tok(["A man is eating food.", "Sparse fine-tuning of a sentence encoder in JAX"], padding=True)
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    assert (mask == 0).any()  # padding present
    tm = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    model = models.from_pretrained(minilm_dir)
    assert model.task == "base" and model.config.num_hidden_layers == 6
    ours = our_output(model, ids, mask, token_type_ids=np.asarray(batch["token_type_ids"]))
    ref = torch_output(tm, ids, mask, token_type_ids=np.asarray(batch["token_type_ids"]))
    assert np.abs(ours[mask.astype(bool)] - ref[mask.astype(bool)]).max() <= 1e-4

    clf = models.from_pretrained(minilm_dir, id2label={0: "neg", 1: "pos"})
    assert clf.task == "seq_cls" and clf.config.id2label == {0: "neg", 1: "pos"}
    assert clf.params["classifier"]["kernel"].shape == (384, 2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, clf.params["bert"], model.params)


def test_matmul_precision_follows_jax_config():
    """No layer pins a precision: jax.default_matmul_precision decides (float32 parity needs 'highest')."""
    import transformers

    from jaxsparse.models import init_params

    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    model = init_params(config, task="seq_cls", seed=0)
    ids = jnp.ones((1, 4), jnp.int32)

    def dot_precisions(setting):
        with jax.default_matmul_precision(setting):
            jaxpr = jax.make_jaxpr(model.apply_fn)(model.params, ids)
        eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
        return {str(e.params["precision"]) for e in eqns}, len(eqns)

    highest, n = dot_precisions("highest")
    assert n == 10  # q, k, v, scores, weighted values, attention output, intermediate, output, pooler, head
    assert all("HIGHEST" in p for p in highest), highest
    fastest, _ = dot_precisions("bfloat16")
    assert not any("HIGHEST" in p for p in fastest), fastest


def _dropout_config(hidden=0.0, attention=0.0, classifier=None):
    return transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        hidden_dropout_prob=hidden,
        attention_probs_dropout_prob=attention,
        classifier_dropout=classifier,
    )


def test_dropout_is_off_without_a_key_and_at_rate_zero(padded_batch):
    ids, mask = padded_batch
    for rates, key in [((0.1, 0.1, None), None), ((0.0, 0.0, 0.0), jax.random.key(0))]:
        model = models.init_params(_dropout_config(*rates), task="seq_cls", seed=0)
        plain = model.apply_fn(model.params, jnp.asarray(ids), jnp.asarray(mask))
        keyed = model.apply_fn(model.params, jnp.asarray(ids), jnp.asarray(mask), dropout_rng=key)
        np.testing.assert_array_equal(np.asarray(keyed), np.asarray(plain))


def test_dropout_masks_follow_the_key(padded_batch):
    ids, mask = jnp.asarray(padded_batch[0]), jnp.asarray(padded_batch[1])
    model = models.init_params(_dropout_config(0.2, 0.2), task="seq_cls", seed=0)
    run = jax.jit(lambda p, k: model.apply_fn(p, ids, mask, dropout_rng=k))
    plain = model.apply_fn(model.params, ids, mask)
    a, b, c = (np.asarray(run(model.params, jax.random.key(s))) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4 and np.abs(a - np.asarray(plain)).max() > 1e-4
    grads = jax.grad(lambda p: run(p, jax.random.key(1)).sum())(model.params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_classifier_dropout_matches_numpy_oracle(padded_batch):
    """Only the classifier drops (rate 0.5): logits = (pooled * mask / 0.5) @ W + b, the mask drawn
    as Dropout's first site from the key; pooled from the deterministic model."""
    ids, mask = jnp.asarray(padded_batch[0]), jnp.asarray(padded_batch[1])
    model = models.init_params(_dropout_config(classifier=0.5), task="seq_cls", seed=0)
    key = jax.random.key(3)
    got = np.asarray(model.apply_fn(model.params, ids, mask, dropout_rng=key))
    base = models.init_params(_dropout_config(), task="base", seed=0)
    base_params = model.params["bert"]
    hidden = base.apply_fn(base_params, ids, mask)
    pooler = base_params["pooler"]["dense"]
    pooled = np.tanh(np.asarray(hidden)[:, 0] @ np.asarray(pooler["kernel"]) + np.asarray(pooler["bias"]))
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, pooled.shape))
    head = model.params["classifier"]
    want = (pooled * keep / 0.5) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    assert 0 < keep.mean() < 1
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
