"""MLM masking against transformers' DataCollatorForLanguageModeling, its 80/10/10 statistics (binomial
bounds), determinism per (seed, step), and the masked-token metrics against transformers' MLM loss."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsparse import mlm

WORDS = ("the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "and", "then", "came", "back")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {w: i for i, w in enumerate([*SPECIAL, *WORDS])}
    return transformers.BertTokenizer(vocab=vocab)


def _examples(tokenizer, n=64, seed=0):
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, rng.integers(3, 30))) for _ in range(n)]
    return [{"input_ids": tokenizer(t)["input_ids"]} for t in texts]


def _torch_draws(seed, shape, vocab_size):
    """The draws transformers' collator makes with ``torch.Generator().manual_seed(seed)``: each
    ``torch.bernoulli(p, generator=g)`` is ``torch.rand(shape, generator=g) < p`` (checked below, and
    implied by the exact equality of the outputs), then ``torch.randint(len(tokenizer))``."""
    g = torch.Generator().manual_seed(seed)
    uniforms = [torch.rand(shape, generator=g).numpy() for _ in range(3)]
    return mlm.MaskingDraws(*uniforms, torch.randint(vocab_size, shape, generator=g).numpy())


def test_torch_bernoulli_is_a_uniform_comparison():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    p = torch.full((32, 40), 0.15)
    p[:, :3] = 0
    np.testing.assert_array_equal(
        torch.bernoulli(p, generator=g1).bool().numpy(), (torch.rand(p.shape, generator=g2) < p).numpy()
    )


@pytest.mark.parametrize(
    "probs", [{}, {"mlm_probability": 0.5, "mask_replace_prob": 0.6, "random_replace_prob": 0.3}]
)
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_collator_equals_transformers_on_the_same_draws(tokenizer, seed, probs):
    examples = _examples(tokenizer, seed=seed)
    collator = transformers.DataCollatorForLanguageModeling(
        tokenizer, mlm=True, seed=seed, return_tensors="pt", **probs
    )
    ref = {k: v.numpy() for k, v in collator(examples).items()}
    chosen = ref["labels"] != -100
    original = np.where(chosen, ref["labels"], ref["input_ids"])
    # every branch happened, so the comparison covers all of the rule
    assert (ref["input_ids"][chosen] == tokenizer.mask_token_id).any()
    assert (ref["input_ids"][chosen] == original[chosen]).any()
    assert ((ref["input_ids"] != original) & (ref["input_ids"] != tokenizer.mask_token_id)).any()
    assert (ref["attention_mask"] == 0).any()  # padding present

    cfg = mlm.masking_config(tokenizer, **probs)
    draws = _torch_draws(seed, original.shape, len(tokenizer))
    inputs, labels = mlm.apply_masking(
        original, mlm.no_mask_positions(original, ref["attention_mask"], cfg), draws, cfg
    )
    np.testing.assert_array_equal(inputs, ref["input_ids"])
    np.testing.assert_array_equal(labels, ref["labels"])


def _corpus(rows=256, cols=128, vocab=1000, seed=0):
    """Ids 10..vocab-1 with [CLS]=2 first, [SEP]=3 at each row's end and padding (0) after it."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, vocab, (rows, cols))
    lengths = rng.integers(cols // 2, cols + 1, rows)
    pos = np.arange(cols)[None, :]
    ids[:, 0] = 2
    ids[pos == lengths[:, None] - 1] = 3
    ids[pos >= lengths[:, None]] = 0
    return ids, (pos < lengths[:, None]).astype(np.int32)


def _within(k, n, p, sigmas=5.0):
    """``k`` successes of ``n`` Binomial(n, p) trials within ``sigmas`` standard deviations of n p
    (a 5-sigma two-sided bound fails with probability below 6e-7)."""
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_statistics_follow_80_10_10_within_binomial_bounds():
    vocab = 1000
    cfg = mlm.MaskingConfig(mask_token_id=4, vocab_size=vocab, special_ids=(0, 1, 2, 3, 4))
    ids, attention = _corpus(vocab=vocab)
    eligible = chosen = as_mask = unchanged = 0
    for step in range(20):
        inputs, labels = mlm.mask_tokens(ids, attention, cfg, seed=3, step=step)
        picked = labels != -100
        np.testing.assert_array_equal(labels[picked], ids[picked])
        np.testing.assert_array_equal(inputs[~picked], ids[~picked])  # only chosen tokens change
        eligible += int(((ids > 4) & (attention == 1)).sum())
        chosen += int(picked.sum())
        as_mask += int((inputs[picked] == 4).sum())
        unchanged += int((inputs[picked] == ids[picked]).sum())
    assert eligible > 400_000
    assert _within(chosen, eligible, 0.15), chosen / eligible
    assert _within(as_mask, chosen, 0.8), as_mask / chosen
    # kept: the 10% branch, plus a random draw that hits the original id (1 in vocab)
    p_unchanged = 0.1 + 0.1 / vocab
    assert _within(unchanged, chosen, p_unchanged), unchanged / chosen
    assert _within(chosen - as_mask - unchanged, chosen, 0.1 - 0.1 / vocab)


def test_special_and_padding_tokens_are_never_chosen():
    cfg = mlm.MaskingConfig(mask_token_id=4, vocab_size=50, special_ids=(0, 1, 2, 3, 4), mlm_probability=0.9)
    ids, attention = _corpus(rows=64, cols=32, vocab=50, seed=1)
    ids[:, 5] = 1  # an [UNK] inside the text
    never = (ids <= 4) | (attention == 0)
    for step in range(50):
        inputs, labels = mlm.mask_tokens(ids, attention, cfg, seed=0, step=step)
        assert (labels[never] == -100).all()
        np.testing.assert_array_equal(inputs[never], ids[never])
    # padding by attention mask alone (a pad id that is not listed as special) is never chosen either
    inputs, labels = mlm.mask_tokens(
        ids, attention, mlm.MaskingConfig(4, 50, mlm_probability=0.9), seed=0, step=0
    )
    assert (labels[attention == 0] == -100).all()


def test_masking_is_a_pure_function_of_seed_and_step():
    cfg = mlm.MaskingConfig(mask_token_id=4, vocab_size=100, special_ids=(0, 2, 3))
    ids, attention = _corpus(rows=8, cols=64, vocab=100)
    a = mlm.mask_tokens(ids, attention, cfg, seed=1, step=5)
    b = mlm.mask_tokens(ids.copy(), attention, cfg, seed=1, step=5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for other in (
        {"seed": 1, "step": 6},
        {"seed": 2, "step": 5},
        {"seed": 1, "step": 5, "stream": mlm.EVAL_STREAM},
    ):
        assert not np.array_equal(mlm.mask_tokens(ids, attention, cfg, **other)[1], a[1])


def test_held_out_masking_is_fixed_and_independent_of_batching():
    cfg = mlm.MaskingConfig(mask_token_id=4, vocab_size=100, special_ids=(0, 2, 3))
    ids, attention = _corpus(rows=10, cols=16, vocab=100)
    arrays = {"input_ids": ids, "attention_mask": attention}
    held = mlm.mask_arrays(arrays, cfg, seed=0)
    np.testing.assert_array_equal(held["labels"], mlm.mask_arrays(arrays, cfg, seed=0)["labels"])
    train0 = mlm.mask_batch(arrays, cfg, seed=0, step=0)
    assert not np.array_equal(held["labels"], train0["labels"])  # its own random stream
    np.testing.assert_array_equal(held["attention_mask"], attention)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5])
def test_mlm_probability_outside_the_open_interval_is_refused(p):
    with pytest.raises(ValueError, match=r"mlm_probability must be in \(0, 1\)"):
        mlm.MaskingConfig(mask_token_id=4, vocab_size=10, mlm_probability=p)


def test_other_bad_configs_are_refused(tokenizer):
    with pytest.raises(ValueError, match="at most 1"):
        mlm.MaskingConfig(4, 10, mask_replace_prob=0.8, random_replace_prob=0.3)
    with pytest.raises(ValueError, match="below vocab_size"):
        mlm.MaskingConfig(12, 10)

    class DecoderTokenizer:
        mask_token_id = None
        name_or_path = "gpt2-like"

    with pytest.raises(ValueError, match="'gpt2-like' has no mask token"):
        mlm.masking_config(DecoderTokenizer())
    cfg = mlm.masking_config(tokenizer)
    assert (
        cfg.mask_token_id == 4
        and cfg.vocab_size == len(tokenizer)
        and set(cfg.special_ids) == {0, 1, 2, 3, 4}
    )


def test_group_texts_concatenates_and_cuts_blocks(tokenizer):
    texts = ["the cat sat", "on a mat", "dog"]
    flat = [i for t in texts for i in tokenizer(t)["input_ids"]]
    out = mlm.group_texts(texts, tokenizer, 4)
    n = len(flat) // 4
    np.testing.assert_array_equal(out["input_ids"], np.asarray(flat[: 4 * n]).reshape(n, 4))
    assert (out["attention_mask"] == 1).all()
    padded = mlm.group_texts(texts, tokenizer, 4, return_remainder=True)
    assert padded["input_ids"].shape == (n + 1, 4)
    assert padded["attention_mask"].sum() == len(flat)
    with pytest.raises(ValueError, match="fewer than one block"):
        mlm.group_texts(["dog"], tokenizer, 100)


def test_loss_equals_transformers_masked_lm_loss(tokenizer):
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    torch.manual_seed(0)
    tm = transformers.BertForMaskedLM(config).eval()
    batch = transformers.DataCollatorForLanguageModeling(tokenizer, seed=0, return_tensors="pt")(
        _examples(tokenizer, n=8)
    )
    with torch.no_grad():
        out = tm(**batch)
    logits, labels = out.logits.numpy(), batch["labels"].numpy()
    assert abs(float(mlm.masked_lm_loss(jnp.asarray(logits), jnp.asarray(labels))) - out.loss.item()) <= 1e-6

    sums = mlm.masked_lm_sums(jnp.asarray(logits), jnp.asarray(labels))
    keep = labels != -100
    assert int(sums["count"]) == keep.sum()
    assert int(sums["correct"]) == (logits.argmax(-1)[keep] == labels[keep]).sum()  # NumPy oracle
    # metrics over batches are token-weighted: the split into batches does not change them
    halves = [
        mlm.masked_lm_sums(jnp.asarray(logits[s]), jnp.asarray(labels[s])) for s in (slice(0, 3), slice(3, 8))
    ]
    whole, parts = mlm.masked_lm_metrics(sums), mlm.masked_lm_metrics(halves)
    assert whole["accuracy"] == parts["accuracy"] and whole["tokens"] == parts["tokens"]
    assert abs(whole["loss"] - out.loss.item()) <= 1e-6 and abs(parts["loss"] - whole["loss"]) <= 1e-6
    assert whole["perplexity"] == pytest.approx(math.exp(out.loss.item()), rel=1e-6)


def test_sums_skip_weight_zero_rows_and_empty_batches_give_zero_loss():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    labels = jnp.array([[1, -100, 2], [3, 4, -100]])
    both = mlm.masked_lm_sums(logits, labels)
    first = mlm.masked_lm_sums(logits, labels, weight=jnp.array([1.0, 0.0]))
    assert int(both["count"]) == 4 and int(first["count"]) == 2
    assert float(first["nll"]) == pytest.approx(float(mlm.masked_lm_sums(logits[:1], labels[:1])["nll"]))
    assert float(mlm.masked_lm_loss(logits, jnp.full((2, 3), -100))) == 0.0
    with pytest.raises(ValueError, match="no masked token"):
        mlm.masked_lm_metrics({"nll": 0.0, "correct": 0, "count": 0})
