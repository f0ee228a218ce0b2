"""MLM masking against transformers' DataCollatorForLanguageModeling, its 80/10/10 statistics (binomial
bounds), determinism per (seed, step), and the masked-token metrics against transformers' MLM loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsparse import mlm
from tests.tiny_mlm import SPECIAL, WORDS, write_tiny_distilbert_mlm


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


@pytest.mark.parametrize("method", ["lora", "shira"])
def test_peft_loads_a_masked_lm_adapter_and_gives_our_logits(tmp_path, method):
    """A (trained-like: nonzero) LoRA / SHiRA adapter on DistilBERT's q_lin/v_lin of a tiny
    DistilBertForMaskedLM, exported with task_type absent (PEFT has none for MLM), loads in PEFT
    on transformers' DistilBertForMaskedLM and gives our logits."""
    import jax
    import peft

    from jaxsparse import delta, models
    from jaxsparse.adapter_io import save_adapter
    from jaxsparse.methods import lora, shira

    config = transformers.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=16
    )
    torch.manual_seed(0)
    model = models.from_torch(transformers.DistilBertForMaskedLM(config))
    models.save_pretrained(model, tmp_path / "base")
    targets = ["q_lin", "v_lin"]
    if method == "lora":
        adapter = lora.init(
            model.params, lora.LoraConfig(r=4, lora_alpha=8, target_modules=targets), jax.random.key(0)
        )
    else:
        adapter = shira.init(model.params, shira.ShiraConfig(r=2, target_modules=targets), jax.random.key(0))
    rng = np.random.default_rng(0)
    leaves = delta.trainable(adapter)
    leaves["deltas"] = {
        p: {f: jnp.asarray(rng.normal(0, 0.2, np.shape(x)), jnp.float32) for f, x in fields.items()}
        for p, fields in leaves["deltas"].items()
    }
    adapter = delta.with_trainable(adapter, leaves)
    save_adapter(adapter, tmp_path / "adapter", model=model)
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert raw["task_type"] is None

    base = transformers.DistilBertForMaskedLM.from_pretrained(tmp_path / "base")
    tm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        ref = tm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    ours = np.asarray(model.apply_fn(delta.apply(model.params, adapter), jnp.asarray(ids), jnp.asarray(mask)))
    plain = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    keep = mask.astype(bool)
    assert np.abs(ours[keep] - plain[keep]).max() > 1e-2  # the adapter matters
    assert np.abs(ours[keep] - ref[keep]).max() <= 1e-5


# ----------------------------------------------------------------------------- through the trainer

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran far away",
    "the dog came back home",
    "a cat and a dog ran",
    "then the cat sat back",
]


@pytest.fixture(scope="module")
def tiny_mlm_assets(tmp_path_factory):
    """A tiny DistilBertForMaskedLM directory (with its BERT tokenizer) and a text file."""
    root = tmp_path_factory.mktemp("mlm-assets")
    model_dir = write_tiny_distilbert_mlm(root)
    rng = np.random.default_rng(0)
    text = root / "sentences.txt"
    text.write_text("\n".join(rng.choice(SENTENCES, 240)) + "\n")
    return model_dir, text


def _mlm_config(assets, output, *extra):
    from jaxsparse import config as config_lib

    model_dir, text = assets
    return config_lib.load_config(
        None,
        [
            "task=masked_lm",
            "method=lora",
            f"model.path={model_dir}",
            "data.source=text",
            f"data.path={text}",
            "data.max_length=16",
            "data.eval_size=0.2",
            "adapter.target_modules=[q_lin,v_lin]",
            "adapter.r=4",
            "adapter.lora_alpha=8",
            "train.steps=12",
            "train.batch_size=8",
            "train.eval_batch_size=16",
            "train.learning_rate=0.1",
            "train.warmup_steps=0",
            "train.eval_every=6",
            "train.log_every=2",
            "train.checkpoint_every=4",
            "train.progress=false",
            f"output={output}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def lora_mlm_run(tiny_mlm_assets, tmp_path_factory):
    from jaxsparse import trainer

    cfg = _mlm_config(tiny_mlm_assets, tmp_path_factory.mktemp("mlm-run") / "run")
    return cfg, trainer.train(cfg, log=lambda msg: None)


def test_trainer_masked_lm_lora_exports_what_peft_loads(tiny_mlm_assets, lora_mlm_run):
    """A LoRA run with task masked_lm: held-out masked-token perplexity falls; the adapter has no
    task_type and names DistilBertForMaskedLM; PEFT loads it on transformers' model with our logits."""
    import peft

    from jaxsparse import delta, models
    from jaxsparse.adapter_io import load_adapter

    _, result = lora_mlm_run
    assert set(result.final) == {"loss", "accuracy", "perplexity"}
    assert result.final["perplexity"] < result.initial["perplexity"]
    raw = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    assert raw["task_type"] is None
    assert raw["auto_mapping"]["base_model_class"] == "DistilBertForMaskedLM"

    model_dir, _ = tiny_mlm_assets
    model = models.from_pretrained(model_dir)
    assert model.task == "masked_lm"
    adapter = load_adapter(result.adapter_dir, model=model)
    tm = peft.PeftModel.from_pretrained(
        transformers.AutoModelForMaskedLM.from_pretrained(model_dir), result.adapter_dir
    ).eval()
    ids = np.array([[2, 5, 6, 7, 4, 9, 3], [2, 10, 4, 12, 3, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        ref = tm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    ours = np.asarray(model.apply_fn(delta.apply(model.params, adapter), jnp.asarray(ids), jnp.asarray(mask)))
    keep = mask.astype(bool)
    assert np.abs(ours[keep] - ref[keep]).max() <= 1e-5


def test_trainer_masked_lm_eval_matches_transformers_loss(tiny_mlm_assets, lora_mlm_run):
    """Held-out metrics before training equal transformers' MLM loss of the base model on the same
    fixed masking (one batch of all held-out blocks); `jaxsparse eval` reproduces the final metrics."""
    from jaxsparse import trainer

    cfg, result = lora_mlm_run
    prepared = trainer.prepare(cfg)
    ev = prepared.eval
    assert (ev["labels"] != -100).any()
    tm = transformers.AutoModelForMaskedLM.from_pretrained(tiny_mlm_assets[0]).eval()
    with torch.no_grad():
        out = tm(
            input_ids=torch.as_tensor(ev["input_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(ev["attention_mask"], dtype=torch.long),
            labels=torch.as_tensor(ev["labels"], dtype=torch.long),
        )
    keep = ev["labels"] != -100
    accuracy = (out.logits.numpy().argmax(-1)[keep] == ev["labels"][keep]).mean()
    assert result.initial["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert result.initial["perplexity"] == pytest.approx(math.exp(out.loss.item()), rel=1e-5)
    assert result.initial["accuracy"] == pytest.approx(accuracy)

    metrics = trainer.evaluate_adapter(cfg, result.adapter_dir)
    for key in ("loss", "accuracy", "perplexity"):
        assert metrics[key] == pytest.approx(result.final[key], rel=1e-6)
    assert metrics["perplexity_before"] == pytest.approx(result.initial["perplexity"], rel=1e-6)


def test_trainer_masked_lm_resume_is_exact(tiny_mlm_assets, lora_mlm_run, tmp_path):
    """Masking is a function of (seed, step): a run interrupted at step 6 and resumed ends with the
    adapter of the uninterrupted run, bit for bit."""
    import os
    import signal

    import jax

    from jaxsparse import trainer

    _, reference = lora_mlm_run
    cfg = _mlm_config(tiny_mlm_assets, tmp_path / "run")

    def interrupt(step, loss):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(trainer.TrainingInterrupted):
        trainer.train(cfg, log=lambda msg: None, on_step=interrupt)
    resumed = trainer.train(cfg, log=lambda msg: None, resume=True)
    for a, b in zip(jax.tree.leaves(reference.adapter), jax.tree.leaves(resumed.adapter), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.final == reference.final


def test_trainer_masked_lm_bad_input_is_a_config_error(tmp_path):
    from jaxsparse import config as config_lib
    from jaxsparse import models, trainer

    with pytest.raises(config_lib.ConfigError, match=r"'data.mlm_probability' must be in \(0, 1\), got 1.5"):
        config_lib.load_config(
            None, ["task=masked_lm", "data.source=bbc_text", "data.mlm_probability=1.5"], check_paths=False
        )
    gpt2 = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    models.save_pretrained(models.init_params(gpt2, task="causal_lm"), tmp_path / "gpt2")
    cfg = config_lib.load_config(
        None, ["task=masked_lm", f"model.path={tmp_path / 'gpt2'}", "data.source=bbc_text"], check_paths=False
    )
    with pytest.raises(config_lib.ConfigError, match="'task' = 'masked_lm' needs an encoder"):
        trainer.load_model(cfg, ())
