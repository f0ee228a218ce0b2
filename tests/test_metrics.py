"""Metrics against closed forms computed by hand."""

import math

import numpy as np
import pytest

from jaxsparse import metrics


def test_accuracy_closed_form():
    assert metrics.accuracy([0, 1, 2, 2], [0, 2, 2, 2]) == 0.75
    assert metrics.accuracy(np.array([1]), np.array([0])) == 0.0


def test_macro_f1_closed_form():
    # class 0: tp=1 fp=0 fn=1 -> 2/3 ; class 1: tp=2 fp=1 fn=0 -> 4/5 ; class 2: tp=0 fp=0 fn=0 -> 0
    y, p = [0, 0, 1, 1], [0, 1, 1, 1]
    assert metrics.macro_f1(y, p) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert metrics.macro_f1(y, p, num_classes=3) == pytest.approx((2 / 3 + 4 / 5) / 3)
    assert metrics.macro_f1([0, 1, 2], [0, 1, 2]) == 1.0


def test_confusion_matrix():
    cm = metrics.confusion_matrix([0, 0, 1, 2], [0, 1, 1, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_perplexity_closed_form():
    # a uniform model over V tokens has perplexity V
    v, n = 7, 5
    assert metrics.perplexity(n * math.log(v), n) == pytest.approx(v)
    with pytest.raises(ValueError, match="at least one token"):
        metrics.perplexity(1.0, 0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="no examples"):
        metrics.accuracy([], [])
