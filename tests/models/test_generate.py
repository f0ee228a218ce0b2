"""Generation: greedy tokens identical to transformers' generate (left padding, eos stop), KV-cache
decoding equal to full recomputation, padding side, logits warpers vs transformers', sampling law."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxsparse import models
from jaxsparse.models.generate import generate, left_align, next_token, process_logits
from jaxsparse.models.llama import init_cache
from tests.models.test_llama import make_config, random_torch_model

# Weights ~ normal(0, 0.5): with smaller weights a random model repeats one token forever, which
# would make token-identity checks weak.
PROMPTS = np.array([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13], [0, 0, 0, 21, 22]])  # left padded, pad 0


def hf_greedy(tm, ids, max_new_tokens, **kw):
    with torch.no_grad():
        return tm.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor((ids != 0).astype(np.int64)),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            **kw,
        ).numpy()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "phi3"])
def test_greedy_tokens_identical_to_transformers(model_type):
    config = make_config(model_type, eos_token_id=None)
    tm = random_torch_model(transformers.AutoModelForCausalLM, config, std=0.5)
    model = models.from_torch(tm)
    ref = hf_greedy(tm, PROMPTS, 10)
    ours = np.asarray(generate(model, PROMPTS, PROMPTS != 0, max_new_tokens=10))
    np.testing.assert_array_equal(ours, ref)


def test_eos_stops_rows_and_pads_like_transformers():
    tm = random_torch_model(
        transformers.AutoModelForCausalLM, make_config("llama", eos_token_id=None), std=0.5
    )
    model = models.from_torch(tm)
    free = hf_greedy(tm, PROMPTS, 12)
    new = free[0, PROMPTS.shape[1] :].tolist()
    k = next(i for i in range(1, len(new)) if new[i] not in new[:i])  # row 0's first repeat-free later token
    eos = int(new[k])
    ref = hf_greedy(tm, PROMPTS, 12, eos_token_id=eos, pad_token_id=0)
    ours = np.asarray(
        generate(model, PROMPTS, PROMPTS != 0, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    )
    np.testing.assert_array_equal(ours, ref)
    assert (ours[0, PROMPTS.shape[1] + k + 1 :] == 0).all()  # row 0 finished: pads after its eos
    # every row ending early stops the loop early, with the shape transformers returns
    single = PROMPTS[:1]
    short_ref = hf_greedy(tm, single, 12, eos_token_id=eos, pad_token_id=0)
    short = np.asarray(
        generate(model, single, single != 0, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    )
    assert short.shape == short_ref.shape == (1, PROMPTS.shape[1] + k + 1)
    np.testing.assert_array_equal(short, short_ref)


def test_right_padded_prompts_generate_like_left_padded():
    model = models.from_torch(random_torch_model(transformers.AutoModelForCausalLM, make_config("qwen2")))
    left_mask = PROMPTS != 0
    right = np.array([[5, 6, 7, 0, 0], [9, 10, 11, 12, 13], [21, 22, 0, 0, 0]])
    a = generate(model, PROMPTS, left_mask, max_new_tokens=6, eos_token_id=[])
    b = generate(model, right, right != 0, max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids, mask = left_align(jnp.asarray(right), jnp.asarray(right != 0, jnp.int32))
    np.testing.assert_array_equal(np.asarray(ids), PROMPTS)
    np.testing.assert_array_equal(np.asarray(mask), left_mask)


@pytest.mark.parametrize("model_type", ["mistral", "phi3", "gemma"])
def test_kv_cache_decoding_equals_full_recomputation(model_type):
    # Prefill 4 tokens (row 1 left padded), then feed 5 more one at a time through the cache; each
    # step's logits must equal a full forward over the whole sequence (sliding window 3-4 < length).
    model = models.init_params(make_config(model_type), task="causal_lm", seed=3)
    model = type(model)(
        model.config, jax.tree_util.tree_map(lambda x: x * 5, model.params), model.apply_fn, model.task
    )
    seq = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13], [0, 0, 14, 15, 16, 17, 18, 19, 20]])
    mask = (seq != 0).astype(np.int32)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    full = np.asarray(model(jnp.asarray(seq), jnp.asarray(mask), position_ids=jnp.asarray(positions)))

    step = jax.jit(model.apply_fn)
    cache = init_cache(model.config, 2, seq.shape[1])
    logits, cache = step(model.params, seq[:, :4], mask, position_ids=positions[:, :4], cache=cache)
    keep = mask[:, :4].astype(bool)
    assert np.abs(np.asarray(logits)[keep] - full[:, :4][keep]).max() <= 1e-5
    for t in range(4, seq.shape[1]):
        logits, cache = step(
            model.params, seq[:, t : t + 1], mask, position_ids=positions[:, t : t + 1], cache=cache
        )
        assert np.abs(np.asarray(logits)[:, 0] - full[:, t]).max() <= 1e-5, t
    assert int(cache["index"]) == seq.shape[1]


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 5, None), (0.7, None, 0.8), (1.3, 10, 0.5), (1.0, None, 0.0), (0.5, 1, 1.0)],
)
def test_process_logits_matches_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 40)).astype(np.float32) * 3
    if (
        top_p is None or top_p == 1.0
    ):  # ties at the top-k boundary (top-p's order among ties is torch's sort's)
        logits[0, :6] = logits[0, 6]
    ref = torch.as_tensor(logits)
    if temperature != 1.0:
        ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None and top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = np.asarray(process_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    ref = ref.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    finite = ~np.isinf(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6)


def test_sampling_follows_the_processed_distribution():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draw = jax.jit(
        jax.vmap(lambda k: next_token(logits, k, do_sample=True, temperature=0.8, top_k=4, top_p=0.9))
    )
    counts = np.bincount(np.asarray(draw(keys))[:, 0], minlength=6) / n
    # closed form: /0.8, keep top 4, then the smallest top set reaching 0.9 of the mass
    p = np.exp(np.array([2.0, 1.0, 0.5, 0.0]) / 0.8)
    p /= p.sum()
    keep = np.cumsum(p) - p < 0.9
    expected = np.zeros(6)
    expected[:4][keep] = p[keep] / p[keep].sum()
    assert keep.tolist() == [True, True, True, False]
    np.testing.assert_allclose(counts, expected, atol=0.015)  # ~5 sigma at n=20000


def test_sampled_generation_is_seeded_and_top_k_1_is_greedy():
    model = models.from_torch(random_torch_model(transformers.AutoModelForCausalLM, make_config("llama")))
    kw = dict(max_new_tokens=8, eos_token_id=[])
    greedy = generate(model, PROMPTS, PROMPTS != 0, **kw)
    top1 = generate(model, PROMPTS, PROMPTS != 0, do_sample=True, top_k=1, seed=3, **kw)
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(top1))
    a = generate(model, PROMPTS, PROMPTS != 0, do_sample=True, temperature=2.0, seed=1, **kw)
    b = generate(model, PROMPTS, PROMPTS != 0, do_sample=True, temperature=2.0, seed=1, **kw)
    c = generate(model, PROMPTS, PROMPTS != 0, do_sample=True, temperature=2.0, seed=2, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_bad_arguments_are_refused():
    config = make_config("llama")
    with pytest.raises(ValueError, match="causal_lm"):
        generate(models.init_params(config, task="seq_cls"), PROMPTS)
    model = models.init_params(config, task="causal_lm")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, PROMPTS, np.ones((3, 4)))
    with pytest.raises(ValueError, match="temperature"):
        process_logits(jnp.zeros((1, 3)), temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        process_logits(jnp.zeros((1, 3)), top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        process_logits(jnp.zeros((1, 3)), top_p=1.5)
