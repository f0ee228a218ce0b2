"""SpaRTA with the authors' budget (``sparsity``), against their installed ``peft_sparta.SpaRTA`` on the
same tiny Llama classifier: their ``compute_keep_prob``, per-tensor counts within a binomial bound of
``keep_prob * numel``, frozen tensors empty, the head and trainable-token rows whole, the refusals
naming their bounds, and delta dropout (their ``nn.Dropout`` over a mask of ones) through the step."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import train as train_lib
from jaxsparse.delta import Adapter, SparseDelta
from jaxsparse.methods import sparta
from jaxsparse.methods.sparta import SpartaBudgetError, SpartaConfig, budget
from jaxsparse.models.naming import hf_key

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_sparta = pytest.importorskip("peft_sparta")

VOCAB, HIDDEN, LABELS = 64, 32, 3


@pytest.fixture(scope="module")
def tiny_classifier():
    """``(torch_model, our_params)``: one random Llama classifier, in both frameworks, same weights."""
    from jaxsparse import models

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, num_labels=LABELS,
        pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    return model, models.from_torch(model).params


def _theirs(model, sparsity, frozen_modules=None, trainable_tokens=None):
    torch.manual_seed(1)
    kwargs = {} if frozen_modules is None else {"frozen_modules": list(frozen_modules)}
    return peft_sparta.SpaRTA(model, sparsity, trainable_tokens=trainable_tokens, **kwargs)


def _bound(n: int, p: float) -> float:
    """Six binomial standard deviations, plus one for rounding: a fair count misses it with p < 1e-8."""
    return 6 * math.sqrt(n * p * (1 - p)) + 1


CASES = [
    (0.9, None, None),  # their defaults: v/o projections and the head
    (0.95, None, [5, 7]),  # + two token rows of the frozen embedding
    (0.8, ["self_attn.q", "mlp"], [3]),  # embedding and norms unfrozen: sampled too, token row whole
]


def test_total_parameters_match_torch(tiny_classifier):
    model, params = tiny_classifier
    ours = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    assert ours == sum(p.numel() for p in model.parameters())
    names = {hf_key(path)[0] for path, _ in _leaf_items(params)}
    assert names == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize(("sparsity", "frozen", "tokens"), CASES)
def test_selection_matches_the_authors(tiny_classifier, sparsity, frozen, tokens):
    model, params = tiny_classifier
    theirs = _theirs(model, sparsity, frozen, tokens)
    config = SpartaConfig(
        sparsity=sparsity, frozen_modules=frozen, trainable_tokens=tokens, task_type="SEQ_CLS"
    )
    plan = budget(params, config)
    assert plan.keep_prob == pytest.approx(theirs.compute_keep_prob(sparsity), rel=1e-12)
    p = plan.keep_prob
    adapter = sparta.init(params, config, jax.random.key(0))
    assert not adapter.dense  # the head trains as a delta over its initial value, as theirs
    shapes = {hf_key(path)[0]: (path, np.shape(leaf)) for path, leaf in _leaf_items(params)}
    rows = set(tokens or ())
    for name, (path, shape) in shapes.items():
        numel = int(np.prod(shape))
        their_k = int(theirs.indices[name].shape[0])
        d = adapter.deltas.get(path)
        ours = np.asarray(d.indices) if d is not None else np.zeros((0,), np.int64)
        assert len(np.unique(ours)) == ours.size and np.all(ours >= 0) and np.all(ours < numel)
        if name == "score.weight":
            np.testing.assert_array_equal(ours, np.arange(numel))  # the head whole
            assert their_k == numel
            continue
        token_rows = name == "model.embed_tokens.weight" and rows
        forced = (
            np.concatenate([np.arange(t * HIDDEN, (t + 1) * HIDDEN) for t in sorted(rows)])
            if token_rows
            else []
        )
        assert set(np.asarray(forced).tolist()) <= set(ours.tolist()), f"{name}: token rows not whole"
        frozen_here = any(s in name for s in config.frozen_modules)
        if frozen_here:
            assert ours.size == len(forced) and their_k == len(forced), name  # frozen: empty but the rows
            continue
        n = numel - len(forced)
        expected = p * n
        assert abs(ours.size - len(forced) - expected) <= _bound(n, p), (name, ours.size, expected)
        assert abs(their_k - len(forced) - expected) <= _bound(n, p), (name, their_k, expected)
    # In all, the budget (1 - sparsity) * total, as theirs (rounding aside).
    total = sum(int(np.prod(s)) for _, s in shapes.values())
    assert abs(adapter.num_trainable() - (1 - sparsity) * total) <= len(adapter.deltas)


def _leaf_items(params):
    from jaxsparse import tree as tree_lib

    return tree_lib.leaf_paths(params).items()


def _their_error(model, sparsity, tokens=None) -> str:
    with pytest.raises(ValueError) as e:
        _theirs(model, sparsity, None, tokens)
    return str(e.value)


def _number(message: str, sign: str) -> float:
    return float(re.search(rf"sparsity {sign} ([0-9.]+)", message).group(1))


@pytest.mark.parametrize(
    ("sparsity", "tokens", "sign", "words"),
    [
        (0.999, None, "<", "too high"),  # the 96-entry head does not fit in 0.1% of 17,664
        (0.99, [1, 2, 3, 4], "<", "too high"),  # the head fits, four token rows do not
        (0.2, None, ">", "too low"),  # 80% of all parameters, but only the v/o projections are free
    ],
)
def test_refusals_name_the_authors_bound(tiny_classifier, sparsity, tokens, sign, words):
    model, params = tiny_classifier
    theirs = _their_error(model, sparsity, tokens)
    with pytest.raises(SpartaBudgetError, match=words) as e:
        budget(params, SpartaConfig(sparsity=sparsity, trainable_tokens=tokens))
    assert e.value.key == "adapter.sparsity"
    assert _number(str(e.value), sign) == pytest.approx(_number(theirs, sign), abs=1e-6)


def test_token_beyond_the_vocabulary_and_frozen_head_refused(tiny_classifier):
    _, params = tiny_classifier
    with pytest.raises(SpartaBudgetError, match=r"\[64\] are beyond the vocabulary.*64 rows") as e:
        budget(params, SpartaConfig(sparsity=0.9, trainable_tokens=[3, 64]))
    assert e.value.key == "adapter.trainable_tokens"
    with pytest.raises(SpartaBudgetError, match=r"classification head 'score\.weight'"):
        budget(params, SpartaConfig(sparsity=0.9, frozen_modules=["score"]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 0.9, "density": 0.1}, "not both"),
        ({"sparsity": 1.0}, r"sparsity must be in \(0, 1\)"),
        ({"sparsity": 0.0}, r"sparsity must be in \(0, 1\)"),
        ({"sparsity": 0.9, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"sparsity": 0.9, "trainable_tokens": [2, 2]}, "twice"),
        ({"density": 0.1, "trainable_tokens": [2]}, "go with sparsity"),
        ({"sparsity": 0.9, "target_modules": ["v_proj"]}, "go with density"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpartaConfig(**kwargs)


def test_density_variant_unchanged():
    assert SpartaConfig().density == 0.01 and SpartaConfig().sparsity is None
    config = SpartaConfig(sparsity=0.5)
    assert config.frozen_modules == sparta.DEFAULT_FROZEN_MODULES and config.density is None


# ----------------------------------------------------------------------------- dropout


def test_dropout_view_is_inverted_dropout_over_the_deltas():
    k, rate = 20_000, 0.25
    d = SparseDelta(jnp.arange(k, dtype=jnp.int32), jnp.full((k,), 2.0), (k,))
    adapter = Adapter({"w": d}, {"head": jnp.ones(3)}, config=SpartaConfig(sparsity=0.5, dropout=rate))
    view = adapter.config.forward_view(adapter, jax.random.PRNGKey(0))
    values = np.asarray(view.deltas["w"].values)
    kept = values != 0
    # kept entries scaled by 1/(1 - p), as torch.nn.Dropout(p) applied to a mask of ones
    np.testing.assert_allclose(values[kept], 2.0 / (1 - rate), rtol=1e-6)
    assert abs(kept.sum() - (1 - rate) * k) <= _bound(k, 1 - rate)
    np.testing.assert_array_equal(np.asarray(view.dense["head"]), np.ones(3))  # dense leaves untouched
    # the torch oracle's scaling
    mask = torch.nn.Dropout(p=rate)(torch.ones(10_000))
    np.testing.assert_allclose(np.unique(mask.numpy()), [0.0, 1 / (1 - rate)], rtol=1e-6)
    # another key, another mask; rate 0: the adapter itself
    other = adapter.config.forward_view(adapter, jax.random.PRNGKey(1))
    assert not np.array_equal(np.asarray(other.deltas["w"].values) != 0, kept)
    plain = Adapter({"w": d}, config=SpartaConfig(sparsity=0.5))
    assert plain.config.forward_view(plain, jax.random.PRNGKey(0)) is plain


def test_dropped_entries_get_no_gradient_in_a_step():
    """Through jaxsparse.train: the loss sees the dropped view, so dropped entries get zero gradient
    and kept ones the gradient scaled by 1/(1 - p); evaluation uses the stored values."""
    k, rate = 512, 0.5
    params = {"w": jnp.zeros((k,))}
    d = SparseDelta(jnp.arange(k, dtype=jnp.int32), jnp.ones((k,)), (k,))
    adapter = Adapter({"w": d}, config=SpartaConfig(sparsity=0.5, dropout=rate))
    grad_fn = train_lib.value_and_grad(lambda p, b: p["w"], lambda out, b: jnp.sum(out))
    rng = jax.random.PRNGKey(3)
    (loss, _), grads = grad_fn(adapter, params, None, rng)
    g = np.asarray(grads["deltas"]["w"]["values"])
    view = adapter.config.forward_view(adapter, rng)
    kept = np.asarray(view.deltas["w"].values) != 0
    np.testing.assert_allclose(g[kept], 1 / (1 - rate))
    np.testing.assert_array_equal(g[~kept], 0.0)
    assert float(loss) == pytest.approx(kept.sum() / (1 - rate))
    (loss_eval, _), _ = grad_fn(adapter, params, None)  # no key: no view
    assert float(loss_eval) == k
