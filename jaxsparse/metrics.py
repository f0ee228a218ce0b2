"""Evaluation metrics on plain arrays: accuracy, macro-F1, perplexity.

Example:
    >>> accuracy([0, 1, 1, 0], [0, 1, 0, 0])
    0.75
    >>> round(macro_f1([0, 1, 1, 0], [0, 1, 0, 0]), 4)
    0.7333
    >>> round(perplexity(total_nll=4.0, num_tokens=2), 4)  # exp(2)
    7.3891
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from jaxtyping import ArrayLike


def accuracy(labels: ArrayLike, predictions: ArrayLike) -> float:
    """Fraction of ``predictions`` equal to ``labels`` (both (n,) integer class ids)."""
    labels, predictions = _pair(labels, predictions)
    return float(np.mean(labels == predictions))


def confusion_matrix(labels: ArrayLike, predictions: ArrayLike, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    labels, predictions = _pair(labels, predictions)
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (labels, predictions), 1)
    return out


def macro_f1(labels: ArrayLike, predictions: ArrayLike, num_classes: int | None = None) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN).

    Classes are ``0..num_classes-1`` if given, else the classes present in ``labels`` or
    ``predictions`` (scikit-learn's default); a class with no true and no predicted example
    scores 0 (only possible when ``num_classes`` is given).
    """
    labels, predictions = _pair(labels, predictions)
    classes: Sequence[int] = (
        range(num_classes) if num_classes is not None else np.union1d(labels, predictions).tolist()
    )
    scores = []
    for c in classes:
        tp = int(np.sum((labels == c) & (predictions == c)))
        fp = int(np.sum((labels != c) & (predictions == c)))
        fn = int(np.sum((labels == c) & (predictions != c)))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def perplexity(total_nll: float, num_tokens: int) -> float:
    """``exp(total_nll / num_tokens)``: the exponentiated mean next-token negative log-likelihood."""
    if num_tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got num_tokens={num_tokens}")
    return math.exp(total_nll / num_tokens)


def _pair(labels: ArrayLike, predictions: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in length")
    if labels.size == 0:
        raise ValueError("no examples to score")
    return labels, predictions
