"""Data loading, splitting, tokenising and resumable batching."""

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
