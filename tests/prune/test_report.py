"""The sparsity report counts zeros exactly and aggregates per block and overall."""

from __future__ import annotations

import json

import numpy as np

from jaxsparse.prune import nm_pattern, sparsity_report


def test_counts_blocks_and_overall():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 4)) * (rng.random((8, 4)) > 0.3)
    b = rng.normal(size=(4, 6)) * (rng.random((4, 6)) > 0.6)
    c = rng.normal(size=(8, 8))
    params = {
        "layers": {0: {"a": {"kernel": a}, "b": {"kernel": b}}, 1: {"a": {"kernel": c}}},
        "head": {"kernel": c},
    }
    r = sparsity_report(params, ["layers.0.a", "layers.0.b", "layers.1.a"])
    assert [c_.zeros for c_ in r.layers] == [int((a == 0).sum()), int((b == 0).sum()), 0]
    assert [(x.name, x.zeros, x.total) for x in r.blocks] == [
        ("layers.0", int((a == 0).sum() + (b == 0).sum()), 56),
        ("layers.1", 0, 64),
    ]
    assert r.overall.total == 120 and r.overall.zeros == r.blocks[0].zeros
    data = json.loads(r.dumps())
    assert data["overall"]["sparsity"] == r.overall.zeros / 120
    assert data["layers"][0]["shape"] == [8, 4]
    assert "layers.0.b" in r.table() and "overall" in r.table()
    # default: every 2-D kernel, the head included
    assert {x.name for x in sparsity_report(params).layers} == {
        "layers.0.a",
        "layers.0.b",
        "layers.1.a",
        "head",
    }


def test_nm_pattern_detection():
    two_four = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0]])  # (in=4, out=2)
    assert nm_pattern(two_four) == "2:4"
    four_eight = np.concatenate([np.ones((4, 1)), np.zeros((4, 1))])  # 4 non-zeros then 4 zeros
    assert nm_pattern(four_eight) == "4:8"
    assert nm_pattern(np.ones((8, 2))) == "-"
    assert nm_pattern(np.ones((6, 2))) == "-"  # width not a multiple of 4
