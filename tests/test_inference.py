"""SequenceClassifier against PyTorch + PEFT on the same saved adapter (tiny BERT, fp32)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from jaxsparse import config as config_lib
from jaxsparse import trainer
from jaxsparse.inference import AdapterLoadError, SequenceClassifier

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_spec = importlib.util.spec_from_file_location(
    "_trainer_helpers", Path(__file__).with_name("test_trainer.py")
)
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

SENTENCES = ["the movie was good", "awful and dull plot", "quite superb acting and fun", "the"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    model_dir, data = helpers.write_tiny_bert(root)
    out = {}
    for method in ("shira", "sparta"):
        overrides = [
            *helpers.tiny_overrides(root, model_dir, data, method),
            "train.steps=8",
            f"output={root / method}",
        ]
        out[method] = trainer.train(config_lib.load_config(None, overrides), log=lambda m: None)
    return model_dir, out


def test_shira_classify_matches_peft(trained):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    model_dir, runs = trained
    clf = SequenceClassifier.from_adapter(runs["shira"].adapter_dir)
    probs = clf.classify(SENTENCES)
    assert probs.shape == (4, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)

    base = transformers.BertForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    ref = peft.PeftModel.from_pretrained(base, runs["shira"].adapter_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    with torch.no_grad():
        for sentence, row in zip(SENTENCES, probs, strict=True):
            logits = ref(**tok([sentence], return_tensors="pt")).logits
            np.testing.assert_allclose(row, torch.softmax(logits, -1)[0].numpy(), atol=1e-5)
    assert clf.decide_class(SENTENCES) == [clf.id2label[i] for i in probs.argmax(-1)]


def test_sparta_classify_matches_merged_numpy(trained):
    """SpaRTA: the probabilities equal a forward pass on weights merged by hand in NumPy."""
    from jaxsparse import models

    model_dir, runs = trained
    result = runs["sparta"]
    clf = SequenceClassifier.from_adapter(result.adapter_dir)
    base = models.from_pretrained(model_dir, task="seq_cls", num_labels=2)
    params = jax_tree_to_numpy(base.params)
    for path, d in result.adapter.deltas.items():
        leaf = get(params, path)
        flat = leaf.reshape(-1)
        flat[np.asarray(d.indices)] += np.asarray(d.values)
    for path, value in result.adapter.dense.items():
        get(params, path)[...] = np.asarray(value)
    tok = clf.tokenizer
    enc = tok(SENTENCES, padding="max_length", max_length=16, return_tensors="np")
    logits = np.asarray(base.apply_fn(params, enc["input_ids"], enc["attention_mask"]), np.float64)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(clf.classify(SENTENCES), want, atol=1e-5)


def jax_tree_to_numpy(tree):
    if isinstance(tree, dict):
        return {k: jax_tree_to_numpy(v) for k, v in tree.items()}
    return np.array(tree, copy=True)


def get(tree, path):
    from jaxsparse.tree import get_leaf

    return get_leaf(tree, path)


def test_repr_labels_and_batching(trained):
    _, runs = trained
    clf = SequenceClassifier.from_adapter(runs["shira"].adapter_dir, batch_size=3)
    assert clf.id2label == {0: "neg", 1: "pos"}
    text = repr(clf)
    assert "method='shira'" in text and "labels=['neg', 'pos']" in text and "tiny-model" in text
    # batching and padding do not change the answer
    many = SENTENCES * 2
    np.testing.assert_allclose(clf.classify(many)[:4], clf.classify(SENTENCES), atol=1e-6)
    assert clf.classify("the movie was good").shape == (1, 2)


def test_bad_adapter_dir_is_named(tmp_path):
    with pytest.raises(AdapterLoadError, match="not found"):
        SequenceClassifier.from_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        SequenceClassifier.from_adapter(tmp_path / "empty")
