"""Factored application (jaxsparse/factored.py): NumPy oracles for the products and their gradients,
the zoo models' outputs and gradients against the dense path, and the jaxpr showing that no dense
weight gradient is formed where the factored path promises it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse import delta as delta_lib
from jaxsparse import factored, models
from jaxsparse.delta import Adapter, LowRankDelta, SparseDelta
from jaxsparse.methods import lora, shira, sparta
from jaxsparse.train import init_train_state, make_train_step
from tests.convert.test_parity_peft import _torch_model


def _sorted_indices(rng, size, k):
    return np.sort(rng.choice(size, k, replace=False)).astype(np.int32)


@settings(max_examples=8, deadline=None)
@given(
    fan_in=st.integers(1, 9),
    fan_out=st.integers(1, 9),
    lead=st.sampled_from([(5,), (2, 3), (1, 1, 4)]),
    frac=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_sampled_product_is_the_dense_product_gathered(fan_in, fan_out, lead, frac, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, fan_in)).astype(np.float32)
    dy = rng.standard_normal((*lead, fan_out)).astype(np.float32)
    k = max(1, int(frac * fan_in * fan_out))
    idx = _sorted_indices(rng, fan_in * fan_out, k)
    want = (x.reshape(-1, fan_in).astype(np.float64).T @ dy.reshape(-1, fan_out)).reshape(-1)[idx]
    got = np.asarray(factored.sampled_product(jnp.asarray(x), jnp.asarray(dy), jnp.asarray(idx)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sampled_product_in_blocks_matches_one_pass(monkeypatch):
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((64, 12)).astype(np.float32), rng.standard_normal((64, 10)).astype(np.float32)
    idx = jnp.asarray(_sorted_indices(rng, 120, 37))  # 37 is not a multiple of the block: padding path
    whole = factored.sampled_product(jnp.asarray(x), jnp.asarray(dy), idx)
    monkeypatch.setattr(factored, "_SAMPLED_BLOCK_ELEMENTS", 64 * 5)  # blocks of 5 rows
    blocked = factored.sampled_product(jnp.asarray(x), jnp.asarray(dy), idx)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(whole), (x.T @ dy).reshape(-1)[np.asarray(idx)], rtol=1e-5, atol=1e-5
    )


def _kernels(rng, fan_in=6, fan_out=5):
    w = rng.standard_normal((fan_in, fan_out)).astype(np.float32)
    idx = _sorted_indices(rng, fan_in * fan_out, 7)
    sparse = SparseDelta(jnp.asarray(idx), jnp.asarray(rng.standard_normal(7).astype(np.float32)), w.shape)
    a, b = (
        rng.standard_normal((fan_in, 3)).astype(np.float32),
        rng.standard_normal((3, fan_out)).astype(np.float32),
    )
    rank_mask = np.array([1.0, 0.0, 1.0], np.float32)
    mask = rng.random((fan_in, fan_out)) > 0.5
    low_rank = LowRankDelta(jnp.asarray(a), jnp.asarray(b), jnp.asarray(rank_mask), None, scale=0.5)
    masked = LowRankDelta(jnp.asarray(a), jnp.asarray(b), None, jnp.asarray(mask), scale=2.0)
    effective = {
        "sparse": w + np.bincount(idx, np.asarray(sparse.values), w.size).reshape(w.shape).astype(np.float32),
        "low_rank": w + (a * rank_mask) @ b * 0.5,
        "masked": w + np.where(mask, a @ b * 2.0, 0.0),
    }
    return w, {"sparse": sparse, "low_rank": low_rank, "masked": masked}, effective


@pytest.mark.parametrize("kind", ["sparse", "low_rank", "masked"])
@pytest.mark.parametrize("sampled", [False, True])
def test_matmul_matches_numpy_effective_weight(kind, sampled):
    rng = np.random.default_rng(1)
    w, deltas, effective = _kernels(rng)
    x = rng.standard_normal((2, 4, w.shape[0])).astype(np.float32)
    kernel = factored.adapt(jnp.asarray(w), deltas[kind], sampled_max_density=1.0 if sampled else 0.0)
    assert kernel.sampled_grad == (sampled and kind == "sparse")
    got = np.asarray(factored.matmul(jnp.asarray(x), kernel))
    np.testing.assert_allclose(got, x @ effective[kind], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(factored.matmul(jnp.asarray(x), jnp.asarray(w))), x @ w, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["sparse", "low_rank"])
def test_factored_gradients_match_numpy(kind):
    """d/dvalues, d/da, d/db, d/dx and d/dW of sum(y * g) against the closed forms, on the factored path."""
    rng = np.random.default_rng(2)
    w, deltas, effective = _kernels(rng)
    delta = deltas[kind]
    x = rng.standard_normal((3, w.shape[0])).astype(np.float32)
    g = rng.standard_normal((3, w.shape[1])).astype(np.float32)
    fields = type(delta).trainable_fields

    def f(x, base, leaves):
        kernel = factored.adapt(base, dataclasses.replace(delta, **leaves), sampled_max_density=1.0)
        return jnp.sum(factored.matmul(x, kernel) * g)

    leaves = {n: getattr(delta, n) for n in fields}
    dx, dw, dleaves = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(w), leaves)
    np.testing.assert_allclose(np.asarray(dx), g @ effective[kind].T, rtol=1e-5, atol=1e-5)
    # the base weight's gradient, when asked for, is the full x^T g (the delta adds to every entry it keeps)
    np.testing.assert_allclose(np.asarray(dw), x.T @ g, rtol=1e-5, atol=1e-5)
    # only the values, as in training: the same values gradient
    only = jax.grad(f, argnums=2)(jnp.asarray(x), jnp.asarray(w), leaves)
    for name in fields:
        np.testing.assert_allclose(np.asarray(only[name]), np.asarray(dleaves[name]), rtol=1e-6, atol=1e-6)
    dense_dw = x.T @ g
    if kind == "sparse":
        np.testing.assert_allclose(
            np.asarray(dleaves["values"]),
            dense_dw.reshape(-1)[np.asarray(delta.indices)],
            rtol=1e-5,
            atol=1e-5,
        )
    else:
        a, b, m = np.asarray(delta.a), np.asarray(delta.b), np.asarray(delta.rank_mask)
        np.testing.assert_allclose(np.asarray(dleaves["a"]), dense_dw @ b.T * m * 0.5, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dleaves["b"]), (a * m).T @ dense_dw * 0.5, rtol=1e-5, atol=1e-5)


def _dot_output_shapes(fn, *args) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in ``fn``'s jaxpr, nested jaxprs (pjit, custom rules) included."""
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shapes.append(tuple(eqn.outvars[0].aval.shape))
            for value in eqn.params.values():
                for inner in value if isinstance(value, (list, tuple)) else [value]:
                    if hasattr(inner, "eqns"):
                        walk(inner)
                    elif hasattr(inner, "jaxpr") and hasattr(inner.jaxpr, "eqns"):
                        walk(inner.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


@pytest.mark.parametrize(
    ("kind", "max_density", "dense_grad_expected"),
    [("sparse", 1.0, False), ("sparse", 0.0, True), ("low_rank", 0.0, False)],
)
def test_gradient_forms_no_dense_weight_gradient_on_the_factored_path(kind, max_density, dense_grad_expected):
    rng = np.random.default_rng(3)
    w, deltas, _ = _kernels(rng, fan_in=24, fan_out=40)  # (24, 40): a shape no other product has
    delta = deltas[kind]
    x = jnp.asarray(rng.standard_normal((8, 24)).astype(np.float32))
    fields = type(delta).trainable_fields

    def loss(leaves):
        kernel = factored.adapt(
            jnp.asarray(w), dataclasses.replace(delta, **leaves), sampled_max_density=max_density
        )
        return jnp.sum(factored.matmul(x, kernel) ** 2)

    shapes = _dot_output_shapes(jax.grad(loss), {n: getattr(delta, n) for n in fields})
    dense_weight_grad = {(24, 40), (40, 24)} & set(shapes)  # x^T dy, in either orientation
    assert bool(dense_weight_grad) == dense_grad_expected, shapes


def test_adapt_picks_the_sampled_gradient_by_density(monkeypatch):
    d = SparseDelta(jnp.arange(30, dtype=jnp.int32), jnp.ones(30), (10, 100))  # density 0.03
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # whatever runs the tests: CPU's 3%
    assert factored.SAMPLED_MAX_DENSITY == 0.03 and factored.adapt(jnp.zeros((10, 100)), d).sampled_grad
    assert not factored.adapt(jnp.zeros((10, 100)), d, sampled_max_density=0.029).sampled_grad
    lr = LowRankDelta(jnp.ones((10, 1)), jnp.ones((1, 100)))
    assert not factored.adapt(jnp.zeros((10, 100)), lr, sampled_max_density=1.0).sampled_grad


def test_the_default_threshold_is_the_measured_one_on_cpu_and_the_dense_gradient_on_accelerators(monkeypatch):
    assert factored.default_sampled_max_density("cpu") == 0.03
    assert factored.default_sampled_max_density("gpu") == factored.default_sampled_max_density("tpu") == 0.0
    d = SparseDelta(jnp.arange(3, dtype=jnp.int32), jnp.ones(3), (10, 100))  # density 0.003
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert factored.adapt(jnp.zeros((10, 100)), d).sampled_grad
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not factored.adapt(jnp.zeros((10, 100)), d).sampled_grad  # None: the backend's default
    assert factored.adapt(jnp.zeros((10, 100)), d, sampled_max_density=0.01).sampled_grad  # given: kept
    params = {"lin": {"kernel": jnp.zeros((10, 100))}}
    assert not delta_lib.apply(params, delta_lib.Adapter({"lin.kernel": d}), factored=True)["lin"][
        "kernel"
    ].sampled_grad


def test_apply_factored_wraps_only_2d_kernels():
    params = {
        "lin": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)},
        "emb": {"embedding": jnp.zeros((4, 2))},
    }
    adapter = Adapter(
        {
            "lin.kernel": SparseDelta(jnp.array([1], jnp.int32), jnp.array([1.0]), (2, 3)),
            "lin.bias": SparseDelta(jnp.array([0], jnp.int32), jnp.array([2.0]), (3,)),
            "emb.embedding": SparseDelta(jnp.array([0], jnp.int32), jnp.array([3.0]), (4, 2)),
        }
    )
    eff = delta_lib.apply(params, adapter, factored=True)
    assert isinstance(eff["lin"]["kernel"], factored.AdaptedKernel)
    np.testing.assert_array_equal(np.asarray(eff["lin"]["kernel"].dense()), [[0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(eff["lin"]["bias"]), [2, 0, 0])
    np.testing.assert_array_equal(np.asarray(eff["emb"]["embedding"])[0], [3, 0])
    assert not isinstance(delta_lib.apply(params, adapter)["lin"]["kernel"], factored.AdaptedKernel)


def _tiny(arch: str):
    """Tiny Llama (causal LM), GPT-2 (causal LM, Conv1D weights) or BERT (3-way classifier)."""
    return models.from_torch(_torch_model(arch))


def _adapters(params):
    key = jax.random.key(0)
    made = {
        "lora": lora.init(params, lora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), key),
        "shira": shira.init(
            params, shira.ShiraConfig(r=2, target_modules=".*(attn|attention|mlp|intermediate|output).*"), key
        ),
        "sparta": sparta.init(params, sparta.SpartaConfig(density=0.01), key),
    }
    # Non-zero trained-looking leaves, so the deltas change the output.
    out = {}
    for name, adapter in made.items():
        leaves = delta_lib.trainable(adapter)
        noisy = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(7), x.shape), leaves)
        out[name] = delta_lib.with_trainable(adapter, noisy)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_zoo_models_give_the_same_outputs_and_gradients_factored(arch):
    model = _tiny(arch)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 32, (2, 7)))
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3])
    for name, adapter in _adapters(model.params).items():
        assert adapter.deltas, name

        def loss(leaves, is_factored, adapter=adapter):
            eff = delta_lib.apply(
                model.params,
                delta_lib.with_trainable(adapter, leaves),
                factored=is_factored,
                sampled_max_density=1.0,
            )
            out = model.apply_fn(eff, ids, mask)
            return jnp.mean(out**2), out

        leaves = delta_lib.trainable(adapter)
        (_, dense_out), dense_grad = jax.jit(jax.value_and_grad(lambda t: loss(t, False), has_aux=True))(
            leaves
        )
        (_, fact_out), fact_grad = jax.jit(jax.value_and_grad(lambda t: loss(t, True), has_aux=True))(leaves)
        base_out = model.apply_fn(model.params, ids, mask)
        assert float(jnp.abs(dense_out - base_out).max()) > 1e-3, name  # the adapter matters
        np.testing.assert_allclose(
            np.asarray(fact_out), np.asarray(dense_out), atol=1e-5, rtol=0, err_msg=name
        )
        for (path, g_dense), g_fact in zip(
            jax.tree_util.tree_leaves_with_path(dense_grad), jax.tree.leaves(fact_grad), strict=True
        ):
            scale = float(jnp.abs(g_dense).max()) + 1e-12
            # 2e-5 of the largest entry: both paths are float32 and sum in different orders, and the
            # exact GELU (torch's formula, 1 + erf) turns those roundings into up to ~1.1e-5 here; a
            # wrong gradient is off by O(1) of that scale.
            np.testing.assert_allclose(
                np.asarray(g_fact) / scale, np.asarray(g_dense) / scale, atol=2e-5, err_msg=f"{name} {path}"
            )


def test_bfloat16_model_runs_factored():
    model = _tiny("llama")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
    bf16 = models.init_params(model.config, task="causal_lm", seed=0, dtype=jnp.bfloat16)
    adapter = _adapters(params)["lora"]
    ids = jnp.ones((1, 5), jnp.int32)
    out = bf16.apply_fn(delta_lib.apply(params, adapter, factored=True), ids)
    ref = bf16.apply_fn(delta_lib.apply(params, adapter), ids)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=0.1)


def test_train_step_factored_follows_the_dense_run():
    model = _tiny("bert")
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 32, (4, 6)))
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": jnp.array([0, 1, 2, 1])}
    adapter = sparta.init(
        model.params, sparta.SpartaConfig(density=0.002, modules_to_save=["classifier"]), jax.random.key(1)
    )

    def apply_model(p, b):
        return model.apply_fn(p, b["input_ids"], b["attention_mask"])

    def loss_fn(logits, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    opt = optax.adam(1e-2)
    runs = {}
    for is_factored in (False, True):
        step = make_train_step(apply_model, loss_fn, opt, factored=is_factored)
        state = init_train_state(adapter, opt, rng=0)
        for _ in range(3):
            state, metrics = step(state, model.params, batch)
        runs[is_factored] = (state, float(metrics["loss"]))
    assert all(
        d.k <= factored.SAMPLED_MAX_DENSITY * np.prod(d.shape) for d in adapter.deltas.values()
    )  # sampled
    np.testing.assert_allclose(runs[True][1], runs[False][1], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(delta_lib.trainable(runs[True][0].adapter)),
        jax.tree.leaves(delta_lib.trainable(runs[False][0].adapter)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    changed = [p for p, d in runs[True][0].adapter.deltas.items() if float(jnp.abs(d.values).max()) > 0]
    assert changed
