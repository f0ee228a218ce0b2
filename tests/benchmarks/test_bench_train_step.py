"""benchmarks/bench_train_step.py --random-init: the asset-free MiniLM the GPU device check times."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bts():
    return load_benchmark("bench_train_step")


def test_random_init_config_is_the_minilm_asset_architecture(bts):
    # The shipped all-MiniLM-L6-v2 config.json is the reference: every architectural field agrees.
    shipped = json.loads((bts.common.minilm_dir() / "config.json").read_text())
    for key in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
    ):  # fmt: skip
        assert bts.MINILM_CONFIG[key] == shipped[key], key


def test_random_batch_is_padded_token_ids_and_binary_labels(bts):
    batch = bts.random_batch(4, 16, seed=3)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 16)
    assert {x.dtype for x in batch.values()} == {np.dtype(np.int32)}
    assert batch["attention_mask"][:, :12].all() and not batch["attention_mask"][:, 12:].any()
    assert (batch["input_ids"][:, 12:] == 0).all() and (batch["input_ids"][:, :12] >= 1000).all()
    assert set(batch["labels"].tolist()) <= {0, 1}
    assert all(
        np.array_equal(a, b)
        for a, b in zip(batch.values(), bts.random_batch(4, 16, seed=3).values(), strict=True)
    )


def test_random_init_contenders_train_the_same_parameters_in_both_frameworks(bts):
    batch = bts.random_batch(2, 8)
    ours = bts.build_jax("jax-shira", batch, random_init=True)
    peft = bts.build_torch("peft-shira", batch, random_init=True)
    assert ours.trainable == peft.trainable == 338_690  # SHiRA r=8 on the 37 body linears + the head
    assert np.isfinite(peft.step())
