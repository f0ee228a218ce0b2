"""BERT parity with transformers (fp32, padded batch), save/load round trip, real MiniLM weights."""

from __future__ import annotations

import dataclasses
import math

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


# ----------------------------------------------------------------------------- masked LM


def _perturbed(torch_model, seed=0):
    """Every parameter moved off its init (biases 0 and norms 1 at init would hide a missing or
    misplaced bias or scale); tied parameters are one tensor, so they move together."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return torch_model.eval()


def _mlm_config(config, tie=True):
    config.tie_word_embeddings = tie
    return config


@pytest.mark.parametrize("tie", [True, False])
def test_masked_lm_parity_with_padding(config, padded_batch, parity, tie):
    tm = _perturbed(_torch_model(transformers.BertForMaskedLM, _mlm_config(config, tie)))
    model = models.from_torch(tm)
    assert model.task == "masked_lm"
    ids, mask = padded_batch
    token_types = np.array([[0, 0, 0, 1, 1, 1]] * 3)
    assert parity(tm, model, ids, mask, token_type_ids=token_types) <= 1e-5
    paths = leaf_paths(model.params)
    assert paths["cls.predictions.transform.dense.kernel"].shape == (32, 32)
    assert paths["cls.predictions.transform.LayerNorm.scale"].shape == (32,)
    assert paths["cls.predictions.bias"].shape == (64,)
    assert not any(p.startswith("bert.pooler") for p in paths)  # BertForMaskedLM has no pooler
    decoder = {p for p in paths if ".decoder." in p}
    # tied: the decoder is the word embedding, no parameter of its own
    assert decoder == (set() if tie else {"cls.predictions.decoder.kernel", "cls.predictions.decoder.bias"})


@pytest.mark.parametrize("tie", [True, False])
def test_masked_lm_saves_as_transformers_bert_for_masked_lm(
    config, padded_batch, tmp_path, our_output, torch_output, tie
):
    model = models.from_torch(
        _perturbed(_torch_model(transformers.BertForMaskedLM, _mlm_config(config, tie)))
    )
    models.save_pretrained(model, tmp_path / "mlm")
    keys = set(models.read_checkpoint(tmp_path / "mlm"))
    assert ("cls.predictions.decoder.weight" in keys) == (not tie)  # transformers writes no tied copy
    tm = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    assert type(tm).__name__ == "BertForMaskedLM"
    assert (tm.cls.predictions.decoder.weight is tm.bert.embeddings.word_embeddings.weight) == tie
    ids, mask = padded_batch
    keep = mask.astype(bool)
    assert np.abs(our_output(model, ids, mask)[keep] - torch_output(tm, ids, mask)[keep]).max() <= 1e-5
    back = models.from_pretrained(tmp_path / "mlm")
    assert back.task == "masked_lm"
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, model.params)


def test_masked_lm_fresh_head_on_an_encoder_checkpoint(config, padded_batch, tmp_path):
    """An encoder-only checkpoint (BertModel, pooler included, like the MiniLM asset) loads as
    masked_lm: the pooler is dropped with a warning, the transform is new (transformers' init) and the
    decoder is the word embedding: logits = LayerNorm(gelu(h W + b)) @ E^T + bias (NumPy oracle)."""
    base = models.init_params(config, task="base", seed=0)
    models.save_pretrained(base, tmp_path / "enc")
    with pytest.warns(UserWarning, match=r"BertForMaskedLM has no parameter for 'bert\.pooler"):
        model = models.from_pretrained(tmp_path / "enc", task="masked_lm", seed=4)
    p = leaf_paths(model.params)
    for path, x in leaf_paths(base.params).items():
        if not path.startswith("pooler."):
            np.testing.assert_array_equal(np.asarray(p["bert." + path]), np.asarray(x))
    w = np.asarray(p["cls.predictions.transform.dense.kernel"])
    assert 0.014 < w.std() < 0.026  # normal(0, initializer_range), 1024 draws
    assert np.all(np.asarray(p["cls.predictions.bias"]) == 0)
    assert np.all(np.asarray(p["cls.predictions.transform.LayerNorm.scale"]) == 1)

    ids, mask = (jnp.asarray(a) for a in padded_batch)
    h = np.asarray(base(ids, mask), np.float64)
    t = h @ w + np.asarray(p["cls.predictions.transform.dense.bias"])
    t = t * 0.5 * (1 + np.vectorize(math.erf)(t / math.sqrt(2)))  # exact gelu (hidden_act "gelu")
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + config.layer_norm_eps)
    want = t @ np.asarray(p["bert.embeddings.word_embeddings.embedding"], np.float64).T
    got = np.asarray(model(ids, mask))
    keep = np.asarray(mask).astype(bool)
    assert np.abs(got[keep] - want[keep]).max() <= 1e-5


def test_tied_decoder_stays_tied_through_a_training_step_and_saving(
    config, tmp_path, our_output, torch_output
):
    """The gradient of the MLM loss w.r.t. the word embedding is transformers' (input + decoder paths
    of the one tied tensor); after the same SGD step in both, logits agree and the saved model is
    still tied in transformers."""
    from jaxsparse import mlm

    config.num_hidden_layers = 1
    tm = _perturbed(_torch_model(transformers.BertForMaskedLM, config))
    model = models.from_torch(tm)
    ids = np.random.default_rng(0).integers(5, 64, (4, 8))
    ids[:, 0], ids[:, -1] = 2, 3
    cfg = mlm.MaskingConfig(mask_token_id=4, vocab_size=64, special_ids=(0, 1, 2, 3, 4), mlm_probability=0.5)
    inputs, labels = mlm.mask_tokens(ids, np.ones_like(ids), cfg, seed=0, step=0)
    attention = np.ones_like(ids)

    out = tm(
        input_ids=torch.as_tensor(inputs),
        attention_mask=torch.as_tensor(attention),
        labels=torch.as_tensor(labels),
    )
    out.loss.backward()

    def loss(params):
        return mlm.masked_lm_loss(
            model.apply_fn(params, jnp.asarray(inputs), jnp.asarray(attention)), jnp.asarray(labels)
        )

    value, grads = jax.jit(jax.value_and_grad(loss))(model.params)
    assert abs(float(value) - out.loss.item()) <= 1e-5
    g = leaf_paths(grads)
    emb = tm.bert.embeddings.word_embeddings.weight.grad.numpy()
    np.testing.assert_allclose(
        np.asarray(g["bert.embeddings.word_embeddings.embedding"]), emb, atol=1e-6, rtol=0
    )
    bias = tm.cls.predictions.bias.grad.numpy()
    np.testing.assert_allclose(np.asarray(g["cls.predictions.bias"]), bias, atol=1e-6, rtol=0)

    lr = 0.5
    with torch.no_grad():
        for p in tm.parameters():
            p.sub_(lr * p.grad)
    stepped = dataclasses.replace(
        model, params=jax.tree_util.tree_map(lambda p, d: p - lr * d, model.params, grads)
    )
    keep = attention.astype(bool)
    assert (
        np.abs(our_output(stepped, inputs, attention)[keep] - torch_output(tm, inputs, attention)[keep]).max()
        <= 1e-5
    )
    models.save_pretrained(stepped, tmp_path / "stepped")
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "stepped").eval()
    assert back.cls.predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(
        back.cls.predictions.decoder.weight, tm.cls.predictions.decoder.weight, atol=1e-6, rtol=0
    )


def test_masked_lm_is_refused_for_a_decoder_only_model():
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    with pytest.raises(ValueError, match=r"model_type 'gpt2' supports tasks .* not 'masked_lm'"):
        models.init_params(cfg, task="masked_lm")


@pytest.mark.real
def test_real_minilm_as_masked_lm(minilm_dir, tmp_path, our_output, torch_output):
    """The MiniLM asset is an encoder only: it gets a fresh tied MLM head, and the saved model is a
    BertForMaskedLM for transformers with our logits."""
    with pytest.warns(UserWarning, match="pooler"):
        model = models.from_pretrained(minilm_dir, task="masked_lm")
    assert "cls.predictions.decoder.kernel" not in leaf_paths(model.params)
    models.save_pretrained(model, tmp_path / "minilm-mlm")
    tm = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "minilm-mlm").eval()
    assert tm.cls.predictions.decoder.weight is tm.bert.embeddings.word_embeddings.weight
    tok = models.load_tokenizer(minilm_dir)
    batch = tok(["A man is [MASK] food.", "Sparse fine-tuning"], padding=True)
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    keep = mask.astype(bool)
    assert np.abs(our_output(model, ids, mask)[keep] - torch_output(tm, ids, mask)[keep]).max() <= 1e-4
