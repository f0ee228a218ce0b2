"""Data loading, splitting, tokenising and resumable batching."""

import itertools
import json

import numpy as np
import pytest

from jaxsparse import data


def test_rotten_tomatoes_labels_from_ratings(tmp_path):
    f = tmp_path / "rt.txt"
    f.write_text(
        "id\tsentiment\ttext\r\n1\t2.5\tgreat\r\n2\t-0.1\tmeh\r\n3\t0.0\tneutral\r\n4\t-3\tawful\r\n"
    )
    ds = data.load_rotten_tomatoes(f)
    assert ds["text"] == ["great", "meh", "awful"] and ds["label"] == [1, 0, 0]
    f.write_text("bad header\n")
    with pytest.raises(data.DataError, match=r"rt.txt: expected header"):
        data.load_rotten_tomatoes(f)


@pytest.mark.real
def test_real_rotten_tomatoes_split_is_fixed():
    a = data.load_text_data("rotten_tomatoes", split_seed=0)
    b = data.load_text_data("rotten_tomatoes", split_seed=0)
    assert a.label_names == ("negative", "positive")
    assert len(a.train) + len(a.eval) == 10568  # 10,605 snippets minus the neutral ones
    assert a.eval["text"] == b.eval["text"]
    assert 0.4 < np.mean(a.train["label"]) < 0.6


@pytest.mark.real
def test_real_bbc_news_classes_in_sorted_order():
    ds, classes = data.load_bbc_news()
    assert classes == ("business", "entertainment", "politics", "sports", "tech")
    assert len(ds) == 2225 and np.bincount(ds["label"]).tolist() == [510, 386, 417, 511, 401]


def test_bbc_layout_and_text_stream(tmp_path):
    for cls, texts in {"b": ["x1", "x2"], "a": ["y1"]}.items():
        (tmp_path / cls).mkdir()
        for i, t in enumerate(texts):
            (tmp_path / cls / f"{i:03d}.txt").write_text(t)
    ds, classes = data.load_bbc_news(tmp_path)
    assert classes == ("a", "b") and ds["text"] == ["y1", "x1", "x2"] and ds["label"] == [0, 1, 1]


def test_local_csv_jsonl_text_and_label_encoding(tmp_path):
    (tmp_path / "d.csv").write_text("t,y\nhello,pos\nbye,neg\nhi,pos\n")
    td = data.load_text_data(
        "csv", path=str(tmp_path / "d.csv"), text_column="t", label_column="y", eval_size=1
    )
    assert td.label_names == ("neg", "pos") and len(td.train) == 2 and len(td.eval) == 1
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"s": f"s{i}", "c": i % 3}) + "\n" for i in range(9))
    )
    td = data.load_text_data(
        "jsonl", path=str(tmp_path / "d.jsonl"), text_column="s", label_column="c", eval_size=3
    )
    assert td.label_names == ("0", "1", "2") and len(td.eval) == 3
    with pytest.raises(data.DataError, match=r"column 'nope' not found; columns are \['s', 'c'\]"):
        data.load_local(tmp_path / "d.jsonl", "nope", None)
    (tmp_path / "d.txt").write_text("line one\n\nline two\n")
    assert data.load_local(tmp_path / "d.txt", "text", None)["text"] == ["line one", "line two"]


def test_batches_are_a_pure_function_of_the_step():
    n, bs = 10, 3
    first = [data.batch_indices(n, bs, seed=1, step=s) for s in range(9)]
    # each epoch (3 batches of 3, one example dropped) is part of a permutation
    for e in range(3):
        epoch = np.concatenate(first[3 * e : 3 * e + 3])
        assert len(set(epoch.tolist())) == 9
    assert not np.array_equal(np.concatenate(first[:3]), np.concatenate(first[3:6]))
    arrays = {"x": np.arange(n)}
    resumed = data.train_batches(arrays, bs, seed=1, start_step=4)
    for s in range(4, 9):
        np.testing.assert_array_equal(next(resumed)["x"], first[s])
    with pytest.raises(data.DataError, match="exceeds"):
        data.batch_indices(2, 3, seed=0, step=0)


def test_eval_batches_pad_with_zero_weight():
    arrays = {"x": np.arange(5)}
    batches = list(data.eval_batches(arrays, 2))
    assert [b["x"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 0]]
    assert batches[-1]["weight"].tolist() == [1.0, 0.0]


class _ToyTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True, **kw):
        return {"input_ids": [ord(c) for c in text]}


def test_causal_lm_chunking():
    ds = data.Dataset.from_dict({"text": ["abc", "de"]})
    out = data.tokenize_causal_lm(ds, _ToyTokenizer(), 3)
    # a b c EOS d e EOS -> 7 tokens -> 2 blocks of 3
    assert out["input_ids"].tolist() == [[97, 98, 99], [0, 100, 101]]
    with pytest.raises(data.DataError, match="fewer than one block"):
        data.tokenize_causal_lm(ds, _ToyTokenizer(), 64)


def test_length_buckets_grow_by_at_most_half_then_end_at_max_length():
    assert data.length_buckets(64) == (16, 24, 32, 48, 64)
    assert data.length_buckets(100) == (16, 24, 32, 48, 64, 96, 100)
    assert data.length_buckets(16) == (16,)
    assert data.length_buckets(20) == (16, 20)
    assert data.length_buckets(12) == (12,)
    assert data.length_buckets(128, smallest=8) == (8, 12, 16, 24, 32, 48, 64, 96, 128)
    for n in (17, 64, 100, 512):  # each bucket at most 1.5x the one before
        b = data.length_buckets(n)
        assert list(b) == sorted(set(b)) and all(y <= 1.5 * x for x, y in itertools.pairwise(b))


def _right_padded(lengths, width, pad=0):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 50, (len(lengths), width)).astype(np.int32)
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return {
        "input_ids": np.where(mask == 1, ids, pad).astype(np.int32),
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(mask),
        "labels": np.arange(len(lengths), dtype=np.int32),
        "weight": np.ones(len(lengths), np.float32),
    }


@pytest.mark.parametrize(
    ("lengths", "want"),
    [
        ([3, 9, 5], 16),
        ([17, 2], 24),
        ([25, 3], 32),
        ([33], 48),
        ([49, 1], 64),
        ([64, 1], 64),
        ([0, 0], 16),
        ([16], 16),
    ],
)
def test_trim_padding_cuts_trailing_padding_to_the_shortest_bucket(lengths, want):
    batch = _right_padded(lengths, 64)
    out = data.trim_padding(batch, data.length_buckets(64))
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert out[key].shape == (len(lengths), want)
        np.testing.assert_array_equal(out[key], batch[key][:, :want])
    assert not batch["attention_mask"][:, want:].any()  # only padding was cut
    assert out["labels"] is batch["labels"] and out["weight"] is batch["weight"]
    assert int(out["attention_mask"].sum()) == sum(lengths)  # every real token kept


def test_trim_padding_leaves_full_and_left_padded_batches_alone():
    full = _right_padded([64, 64], 64)
    assert data.trim_padding(full, (16, 32, 64)) is full
    left = {k: v[:, ::-1].copy() if v.ndim == 2 else v for k, v in _right_padded([5, 7], 64).items()}
    assert data.trim_padding(left, (16, 32, 64)) is left
    no_mask = {"input_ids": np.ones((2, 8), np.int32)}
    assert data.trim_padding(no_mask, (4, 8)) is no_mask
    # real tokens beyond every bucket: nothing shorter holds them
    assert data.trim_padding(_right_padded([40], 48), (16, 32))["input_ids"].shape == (1, 48)


@pytest.mark.parametrize("model_type", ["bert", "llama", "gpt2"])
def test_trimmed_batches_give_the_models_the_same_logits(model_type):
    # The claim trim_padding rests on: cutting all-padding columns on the right changes no output
    # (absolute positions from the left, masked keys, last-real-token pooling), on our real zoo.
    import transformers

    from jaxsparse import models

    tiny = dict(vocab_size=60, num_labels=3, pad_token_id=0)
    config = {
        "bert": transformers.BertConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **tiny
        ),
        "llama": transformers.LlamaConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            head_dim=8,
            **tiny,
        ),
        "gpt2": transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, **tiny),
    }[model_type]
    model = models.init_params(config, task="seq_cls", seed=1)
    batch = _right_padded([5, 11, 2, 9], 32)
    trimmed = data.trim_padding(batch, data.length_buckets(32, smallest=4))
    assert trimmed["input_ids"].shape == (4, 12)
    full = np.asarray(model(batch["input_ids"], batch["attention_mask"]))
    cut = np.asarray(model(trimmed["input_ids"], trimmed["attention_mask"]))
    np.testing.assert_allclose(cut, full, atol=1e-6, rtol=0)
