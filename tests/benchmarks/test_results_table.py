"""benchmarks/results_table.py: merging a subset's runs into the existing rows, and the summary lines."""

from __future__ import annotations

import statistics

import pytest

from tests.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def rt():
    return load_benchmark("results_table")


def row(method: str, seed: int, acc: float, **more) -> dict:
    return {
        "method": method,
        "seed": seed,
        "steps": 120,
        "batch_size": 16,
        "max_length": 64,
        "learning_rate": 1e-3,
        "trainable": 1000,
        "accuracy": acc,
        "macro_f1": acc - 0.01,
        "seconds": 1.0,
        "overrides": [],
        **more,
    }


def test_merged_keeps_other_methods_and_replaces_same_method_and_seed(rt):
    old = [row("lora", 0, 0.80), row("shira", 1, 0.81), row("shira", 0, 0.82), row("sparse_lora", 0, 0.5)]
    new = [row("sparse_lora", 1, 0.71), row("sparse_lora", 0, 0.70)]
    got = rt.merged(old, new)
    # METHODS order (shira, sparta, lora, full, sparse_lora, ...), then seed; the old sparse_lora seed 0
    # row (0.5) is replaced by the new one, every other old row survives.
    assert [(r["method"], r["seed"], r["accuracy"]) for r in got] == [
        ("shira", 0, 0.82),
        ("shira", 1, 0.81),
        ("lora", 0, 0.80),
        ("sparse_lora", 0, 0.70),
        ("sparse_lora", 1, 0.71),
    ]


def test_summary_mean_sd_nonzero_and_pruned_lines(rt):
    pruned = {"retain_ratio": 0.125, "trainable": 100}
    rows = [
        row("sparse_lora", 0, 0.70, nonzero=600),
        row("sparse_lora", 1, 0.74, nonzero=600),
        row("rank_sparse_lora", 0, 0.80, pruned={**pruned, "accuracy": 0.79, "macro_f1": 0.78}),
        row("rank_sparse_lora", 1, 0.84, pruned={**pruned, "accuracy": 0.83, "macro_f1": 0.82}),
    ]
    lines = rt.summary(rows).splitlines()[2:]
    assert len(lines) == 3
    sd = statistics.stdev([0.70, 0.74])  # the sample sd, as the README states
    assert lines[0].startswith("| sparse_lora | 1,000 (600 non-zero) |")
    assert f"0.7200 ± {sd:.4f}" in lines[0]
    # no non-zero key (or all non-zero): the plain count
    assert lines[1].startswith("| rank_sparse_lora | 1,000 |")
    assert lines[2].startswith("| rank_sparse_lora, pruned (retain 0.125) | 100 |")
    assert f"0.8100 ± {sd:.4f}" in lines[2]
    every = rt.table(rows).splitlines()[2:]
    assert len(every) == 6  # one line per run plus one per pruned export
