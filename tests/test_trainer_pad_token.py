"""Classification with a tokenizer that has no pad token (GPT-2, SmolLM2 and Llama style): the trainer
pads with EOS and sets the model's ``pad_token_id`` to it, as transformers users do, so the classifier
pools each row's last token that is not padding exactly as transformers' ``LlamaForSequenceClassification``
does, and the export carries the pad id (tiny Llama + BPE tokenizer, seconds)."""

from __future__ import annotations

import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxsparse import config as config_lib
from jaxsparse import models, trainer
from jaxsparse.inference import SequenceClassifier
from tests.cli.tiny_llama import tiny_llama

torch = pytest.importorskip("torch")

SENTENCES = ["the quick brown fox jumps", "the lazy dog sleeps on the mat", "birds sing", "the cat"]


@pytest.fixture(scope="module")
def padless(tmp_path_factory):
    """A tiny Llama whose tokenizer has an EOS token but no pad token, and a 2-class csv."""
    root = tmp_path_factory.mktemp("padless")
    model_dir = root / "llama"
    tiny_llama(model_dir).save_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tok.pad_token is None and tok.eos_token == "</s>"
    assert transformers.AutoConfig.from_pretrained(model_dir).pad_token_id is None
    data = root / "data.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(24):
            w.writerow([SENTENCES[i % 4], "animal" if i % 4 in (1, 3) else "other"])
    return model_dir, data, tok.eos_token_id


def overrides(tmp_path, model_dir, data) -> list[str]:
    return [
        "method=sparta",
        "task=seq_cls",
        f"model.path={model_dir}",
        "data.source=csv",
        f"data.path={data}",
        "data.max_length=10",
        "data.eval_size=8",
        "adapter.density=0.2",
        "adapter.target_modules=[v_proj]",
        "adapter.modules_to_save=[score]",
        "train.steps=2",
        "train.batch_size=4",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "train.progress=false",
        f"output={tmp_path / 'run'}",
    ]


def test_prepare_pads_with_eos_and_pools_like_transformers(padless, tmp_path):
    model_dir, data, eos = padless
    prepared = trainer.prepare(config_lib.load_config(None, overrides(tmp_path, model_dir, data)))
    assert prepared.tokenizer.pad_token_id == eos and prepared.model.config.pad_token_id == eos
    ids, mask = prepared.train["input_ids"], prepared.train["attention_mask"]
    assert (ids[mask == 0] == eos).all() and (mask == 0).any()  # right-padded with EOS

    # transformers' classifier with the same weights and pad id, on right-padded rows of several
    # lengths and one row ending in a real (attended) EOS, which both skip as padding.
    models.save_pretrained(prepared.model, tmp_path / "hf")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.pad_token_id == eos
    batch = np.array(ids[:4])
    batch_mask = np.array(mask[:4])
    n = int(batch_mask[0].sum())
    batch[0, n - 1], batch_mask[0, : n + 1], batch[0, n] = eos, 1, eos  # "... </s></s>" attended
    with torch.no_grad():
        want = theirs(
            input_ids=torch.tensor(batch, dtype=torch.long), attention_mask=torch.tensor(batch_mask)
        ).logits.numpy()
    got = np.asarray(prepared.model(jnp.asarray(batch), jnp.asarray(batch_mask)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # without the pad id our classifier would pool the attended EOS of row 0 instead: not the same
    unset = models.from_pretrained(model_dir, task="seq_cls", num_labels=2)
    unset = type(unset)(unset.config, prepared.model.params, unset.apply_fn, unset.task)
    assert np.abs(np.asarray(unset(jnp.asarray(batch), jnp.asarray(batch_mask)))[0] - want[0]).max() > 1e-4


def test_a_padless_tokenizer_trains_and_its_export_classifies(padless, tmp_path):
    model_dir, data, eos = padless
    cfg = config_lib.load_config(None, overrides(tmp_path, model_dir, data))
    result = trainer.train(cfg, log=lambda msg: None)
    saved = json.loads((tmp_path / "run" / "adapter" / "config.json").read_text())
    assert saved["pad_token_id"] == eos
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter")
    assert tok.pad_token == "</s>"
    # the saved run classifies a batch of several lengths; each row as when it is alone
    clf = SequenceClassifier.from_adapter(result.adapter_dir)
    together = clf.classify(SENTENCES)
    alone = np.concatenate([clf.classify([s]) for s in SENTENCES])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_a_tokenizer_without_pad_or_eos_is_one_config_error(padless, tmp_path):
    model_dir, data, _ = padless
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.eos_token = None
    cfg = config_lib.load_config(None, overrides(tmp_path, model_dir, data))
    with pytest.raises(
        config_lib.ConfigError, match=r"'model.path' = .*neither a pad token nor an EOS token"
    ):
        trainer.prepare(cfg, tokenizer=tok)
