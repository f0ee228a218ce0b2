"""SpaRTA exports of adapters trained with the authors' budget and with tokens added to the vocabulary:
their loaders (``SpaRTAforSequenceClassification``, ``SpaRTAforCausalLM``) read our files and give our
logits (bf16 tolerance: they load the base in bfloat16); our own loader grows the base from
``new_embeddings_init`` and gives them exactly; new rows are initialised as the authors' trainer does."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxsparse.delta import Adapter, SparseDelta, apply
from jaxsparse.methods import sparta
from jaxsparse.methods.sparta import SpartaConfig
from tests.convert.test_sparta import BF16_LOGIT_TOL, TINY_VOCAB, _tiny_llama_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_sparta = pytest.importorskip("peft_sparta")

NEW = ["<q>", "<ans>"]
ID2LABEL = {0: "negative", 1: "neutral", 2: "positive"}


def _with_values(adapter: Adapter, seed: int = 0) -> Adapter:
    """Non-zero deltas (a larger spread on the head), well above bf16 rounding."""
    rng = np.random.default_rng(seed)
    deltas = {
        p: SparseDelta(
            d.indices,
            jnp.asarray(rng.normal(scale=0.5 if p.startswith("score") else 0.1, size=d.k), jnp.float32),
            d.shape,
        )
        for p, d in adapter.deltas.items()
    }
    return Adapter(deltas, adapter.dense, config=adapter.config)


def _grown(model_dir, task, **kwargs):
    from jaxsparse import models
    from jaxsparse.models import new_tokens

    model = models.from_pretrained(model_dir, task=task, **kwargs)
    tokenizer = models.load_tokenizer(model_dir)
    ids = new_tokens.add_tokens(tokenizer, NEW)
    assert ids == [TINY_VOCAB, TINY_VOCAB + 1]
    model, rows = new_tokens.resize_token_embeddings(
        model, len(ids), init="normal" if task == "seq_cls" else "mean", seed=0
    )
    return model, tokenizer, ids, rows


def test_authors_classifier_reads_our_export_with_two_added_tokens(tmp_path):
    from jaxsparse import models
    from jaxsparse.adapter_io import load_adapter, save_adapter
    from jaxsparse.convert.sparta import grow_for_adapter

    base = _tiny_llama_dir(tmp_path / "base", tie=True)
    model, tokenizer, ids, rows = _grown(base, "seq_cls", id2label=ID2LABEL)
    config = SpartaConfig(sparsity=0.95, trainable_tokens=ids, task_type="SEQ_CLS")
    adapter = _with_values(sparta.init(model.params, config))
    out = tmp_path / "exported"
    save_adapter(adapter, out, model=model, base_model_name_or_path=str(base), tokenizer=tokenizer)

    # their trainer's file (torch.save of the rows), which their loader reads with any safetensors
    saved = torch.load(out / "new_embeddings_init.pt", weights_only=True)
    np.testing.assert_array_equal(saved.numpy(), rows)
    raw = json.loads((out / "config.json").read_text())
    assert raw["jaxsparse_num_parameters"] == sum(
        int(np.prod(np.shape(x))) for x in __import__("jax").tree_util.tree_leaves(model.params)
    )
    # the trainable-token rows are whole in the file: every (row, column) of the two new tokens
    emb = load_file(str(out / "sparse_deltas.safetensors"))["indices.model.embed_tokens.weight"]
    assert {tuple(x) for x in emb.tolist()} == {(t, c) for t in ids for c in range(32)}

    theirs = peft_sparta.SpaRTAforSequenceClassification(str(out))
    assert theirs.tokenizer.convert_tokens_to_ids(NEW) == ids  # the tokenizer beside the adapter
    batch = np.array([[3, 64, 9, 4, 65, 17], [11, 12, 65, 13, 64, 14]])
    their_logits = theirs(torch.from_numpy(batch)).numpy()
    ours = np.asarray(model.apply_fn(apply(model.params, adapter), jnp.asarray(batch)))
    tol = BF16_LOGIT_TOL * np.abs(ours).max()
    np.testing.assert_allclose(their_logits, ours, atol=tol, rtol=0)
    # the new tokens' trained rows matter far above that tolerance
    untrained = dict(adapter.deltas)
    embedding = untrained.pop("model.embed_tokens.embedding")
    keep = np.asarray(embedding.indices) < TINY_VOCAB * 32
    untrained["model.embed_tokens.embedding"] = SparseDelta(
        embedding.indices, jnp.where(jnp.asarray(keep), embedding.values, 0.0), embedding.shape
    )
    other = np.asarray(
        model.apply_fn(apply(model.params, Adapter(untrained, config=config)), jnp.asarray(batch))
    )
    assert np.abs(other - ours).max() > 10 * tol

    # Our loader: the original base, grown from new_embeddings_init, then the adapter: exact logits.
    fresh = models.from_pretrained(base, task="seq_cls", id2label=ID2LABEL)
    grown = grow_for_adapter(fresh, out)
    assert grown.config.vocab_size == TINY_VOCAB + 2
    back = load_adapter(out, model=grown)
    again = np.asarray(grown.apply_fn(apply(grown.params, back), jnp.asarray(batch)))
    np.testing.assert_allclose(again, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_authors_causal_lm_reads_our_sparsity_export(tmp_path, tie):
    """Their causal-LM loader has no new-token support (it loads the base's vocabulary only): the
    authors' budget on a causal LM (an untied lm_head is sampled, not frozen) with their loader."""
    from jaxsparse import models
    from jaxsparse.adapter_io import save_adapter

    base = _tiny_llama_dir(tmp_path / "base", tie=tie)
    model = models.from_pretrained(base)
    config = SpartaConfig(sparsity=0.9, task_type="CAUSAL_LM")
    adapter = _with_values(sparta.init(model.params, config))
    assert ("lm_head.kernel" in adapter.deltas) == (not tie)
    out = tmp_path / "exported"
    save_adapter(adapter, out, model=model, base_model_name_or_path=str(base))
    theirs = peft_sparta.SpaRTAforCausalLM(str(out))
    ids = np.array([[3, 9, 4, 17, 5, 60, 2, 8]])
    with torch.no_grad():
        their_logits = theirs(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    ours = np.asarray(model.apply_fn(apply(model.params, adapter), jnp.asarray(ids)))
    base_logits = np.asarray(model.apply_fn(model.params, jnp.asarray(ids)))
    tol = BF16_LOGIT_TOL * np.abs(ours).max()
    np.testing.assert_allclose(their_logits, ours, atol=tol, rtol=0)
    assert np.abs(ours - base_logits).max() > 10 * tol


def test_untied_causal_lm_with_new_tokens_round_trips_through_our_loader(tmp_path):
    from jaxsparse import models
    from jaxsparse.adapter_io import load_adapter, save_adapter
    from jaxsparse.convert.sparta import grow_for_adapter

    base = _tiny_llama_dir(tmp_path / "base", tie=False)
    model, tokenizer, ids, _ = _grown(base, "causal_lm")
    adapter = _with_values(sparta.init(model.params, SpartaConfig(sparsity=0.9, trainable_tokens=ids)))
    out = tmp_path / "exported"
    save_adapter(adapter, out, model=model, base_model_name_or_path=str(base), tokenizer=tokenizer)
    head_rows = load_file(str(out / "new_lm_head_init.safetensors"))["new_lm_head"]
    np.testing.assert_array_equal(head_rows, np.asarray(model.params["lm_head"]["kernel"])[:, -2:].T)
    grown = grow_for_adapter(models.from_pretrained(base), out)
    back = load_adapter(out, model=grown)
    batch = jnp.asarray([[3, 64, 9, 65, 4]])
    np.testing.assert_allclose(
        np.asarray(grown.apply_fn(apply(grown.params, back), batch)),
        np.asarray(model.apply_fn(apply(model.params, adapter), batch)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_new_rows_follow_the_authors_initialisations(tmp_path):
    """Classifiers: normal(0, 1) * initializer_range (their resize_token_embeddings); causal LMs:
    transformers 5's mean resizing (torch oracle: the model's own resize_token_embeddings)."""
    from jaxsparse.models import new_tokens

    rng = np.random.default_rng(0)
    old = rng.normal(size=(200, 16)).astype(np.float32) + 3.0
    normal = new_tokens.new_rows(old, 4000, init="normal", std=0.02, seed=0)
    assert abs(normal.mean()) < 0.001 and normal.std() == pytest.approx(0.02, rel=0.02)

    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(torch.from_numpy(old))
    hf.resize_token_embeddings(203)  # mean_resizing=True by default in transformers 5
    theirs = hf.model.embed_tokens.weight.detach().numpy()[200:]
    ours = new_tokens.new_rows(old, 3, init="mean", std=0.02, seed=0)
    scale = old.std()
    np.testing.assert_allclose(ours, theirs, atol=1e-3 * scale)  # both the mean, up to 1e-9 covariance noise
    assert np.abs(ours - old.mean(axis=0)).max() > 0  # a sample, not the bare mean, when positive definite
    few = new_tokens.new_rows(old[:8], 2, init="mean", std=0.02, seed=0)  # 8 rows < 16 dims: the mean
    np.testing.assert_allclose(few, np.repeat(old[:8].mean(axis=0)[None], 2, axis=0), rtol=1e-6)


def test_add_tokens_refuses_known_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxsparse.models import new_tokens

    word_level = Tokenizer(models.WordLevel({f"t{i}": i for i in range(4)}, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="t0")
    with pytest.raises(new_tokens.NewTokensError, match=r"\['t2'\] are already in the tokenizer"):
        new_tokens.add_tokens(tok, ["<x>", "t2"])
    assert new_tokens.add_tokens(tok, ["<x>"]) == [4]
    assert tok("t1 <x> t2")["input_ids"] == [1, 4, 2]  # never split
