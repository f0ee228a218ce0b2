import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsparse import delta as delta_lib
from jaxsparse import tree as tree_lib
from jaxsparse.delta import Adapter, SparseDelta
from jaxsparse.train import init_train_state, make_eval_step, make_loss, make_train_step, value_and_grad


def tiny_mlp(seed=0, d_in=8, hidden=32, d_out=3):
    rng = np.random.default_rng(seed)
    return {
        "l1": {
            "kernel": jnp.asarray(rng.normal(size=(d_in, hidden)) / 3, jnp.float32),
            "bias": jnp.zeros(hidden),
        },
        "l2": {
            "kernel": jnp.asarray(rng.normal(size=(hidden, hidden)) / 6, jnp.float32),
            "bias": jnp.zeros(hidden),
        },
        "head": {
            "kernel": jnp.asarray(rng.normal(size=(hidden, d_out)) / 6, jnp.float32),
            "bias": jnp.zeros(d_out),
        },
    }


def apply_mlp(params, batch):
    h = jnp.tanh(batch["x"] @ params["l1"]["kernel"] + params["l1"]["bias"])
    h = jnp.tanh(h @ params["l2"]["kernel"] + params["l2"]["bias"])
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def xent(logits, batch):
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}


def sparse_adapter(params, k=20, seed=1, dense_head=True):
    rng = np.random.default_rng(seed)
    deltas = {}
    for path in ("l1.kernel", "l2.kernel"):
        shape = tree_lib.get_leaf(params, path).shape
        idx = np.sort(rng.choice(int(np.prod(shape)), size=k, replace=False)).astype(np.int32)
        deltas[path] = SparseDelta(jnp.asarray(idx), jnp.zeros(k, jnp.float32), shape)
    dense = {}
    if dense_head:
        dense = {"head.kernel": params["head"]["kernel"] + 0.0, "head.bias": params["head"]["bias"] + 0.0}
    return Adapter(deltas, dense)


def data(n=64, d_in=8, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def test_adamw_reduces_loss_and_changes_only_selected_entries():
    params = tiny_mlp()
    base = jax.tree_util.tree_map(np.asarray, params)
    adapter = sparse_adapter(params)
    opt = optax.adamw(3e-2, weight_decay=1e-4)
    state = init_train_state(adapter, opt, 0)
    step = make_train_step(apply_mlp, xent, opt)
    batch = data()
    losses = []
    for _ in range(30):
        state, metrics = step(state, params, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 30
    assert losses[-1] < 0.8 * losses[0], losses
    # the frozen base is intact and still usable (not donated)
    for p, leaf in tree_lib.leaf_paths(params).items():
        np.testing.assert_array_equal(np.asarray(leaf), tree_lib.get_leaf(base, p))
    effective = delta_lib.apply(params, state.adapter)
    for path, d in adapter.deltas.items():
        changed = np.flatnonzero(
            np.asarray(tree_lib.get_leaf(effective, path)) != tree_lib.get_leaf(base, path)
        )
        assert set(changed) <= set(np.asarray(d.indices).tolist())
        assert len(changed) > 0.9 * d.k
    for name in ("l1.bias", "l2.bias"):
        np.testing.assert_array_equal(
            np.asarray(tree_lib.get_leaf(effective, name)), tree_lib.get_leaf(base, name)
        )
    assert not np.array_equal(np.asarray(effective["head"]["kernel"]), base["head"]["kernel"])
    # the caller's adapter survives the donated steps, and indices never move
    for path, d in adapter.deltas.items():
        np.testing.assert_array_equal(np.asarray(state.adapter.deltas[path].indices), np.asarray(d.indices))
        np.testing.assert_array_equal(np.asarray(d.values), 0.0)


def test_optimizer_state_is_o_k():
    params = tiny_mlp(hidden=64)
    adapter = sparse_adapter(params, k=10, dense_head=False)
    state = init_train_state(adapter, optax.adamw(1e-3), 0)
    big = {int(np.prod(tree_lib.get_leaf(params, p).shape)) for p in adapter.deltas}
    sizes = [x.size for x in jax.tree_util.tree_leaves(state.opt_state)]
    assert sizes and max(sizes) == 10
    assert not big & set(sizes)
    assert sum(sizes) <= 2 * 2 * 10 + 1  # adam's mu and nu over two 10-entry deltas, plus a count


def test_gradient_equals_dense_gradient_at_indices():
    params = tiny_mlp()
    adapter = sparse_adapter(params, dense_head=False)
    batch = data(16)
    (loss, _), grads = value_and_grad(apply_mlp, xent)(adapter, params, batch)

    def dense_loss(p):
        return xent(apply_mlp(p, batch), batch)[0]

    dense = jax.grad(dense_loss)(params)
    for path, d in adapter.deltas.items():
        expect = np.asarray(tree_lib.get_leaf(dense, path)).reshape(-1)[np.asarray(d.indices)]
        np.testing.assert_allclose(np.asarray(grads["deltas"][path]["values"]), expect, rtol=1e-6, atol=1e-7)
    assert float(loss) == pytest.approx(float(dense_loss(params)), rel=1e-6)


def test_rng_is_split_per_step_and_passed_when_asked():
    params = tiny_mlp()
    adapter = sparse_adapter(params, dense_head=False)
    seen = []

    def apply_with_dropout(p, batch, rng):
        keep = jax.random.bernoulli(rng, 0.5, batch["x"].shape)
        return apply_mlp(p, {"x": jnp.where(keep, batch["x"] * 2, 0.0)})

    step = make_train_step(apply_with_dropout, xent, optax.sgd(0.1), takes_rng=True, jit=False)
    state = init_train_state(adapter, optax.sgd(0.1), jax.random.key(3))
    for _ in range(2):
        seen.append(np.asarray(state.rng))
        state, metrics = step(state, params, data(8))
    assert not np.array_equal(seen[0], seen[1])
    assert np.isfinite(float(metrics["loss"]))


def test_eval_step_and_loss_errors():
    params = tiny_mlp()
    adapter = sparse_adapter(params)
    metrics = make_eval_step(apply_mlp, xent)(adapter, params, data(8))
    assert set(metrics) == {"loss", "accuracy"}
    bad = make_loss(apply_mlp, lambda out, b: out)
    with pytest.raises(ValueError, match="scalar"):
        bad(delta_lib.trainable(adapter), adapter, params, data(8), None)
    with pytest.raises(TypeError, match="PRNG key"):
        init_train_state(adapter, optax.sgd(0.1), jnp.zeros(2, jnp.float32))


CONCURRENCY = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the XLA:CPU scheduler")
def test_cpu_step_uses_less_temp_memory_with_the_same_result():
    # A tiny 4-layer BERT: XLA's default (concurrency) scheduler keeps more activations alive than
    # the memory-optimized one the step compiles with (MiniLM 16x128: 796 vs 536 MiB).
    import transformers

    from jaxsparse import models
    from jaxsparse.methods import shira
    from jaxsparse.train import step_compiler_options

    assert step_compiler_options() == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    model = models.init_params(cfg, task="seq_cls")
    adapter = shira.init(
        model.params,
        shira.ShiraConfig(r=2, target_modules=["query", "key", "value", "dense"]),
        jax.random.key(0),
    )
    opt = optax.adamw(1e-2)
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(0, 64, (16, 64))),
        "attention_mask": jnp.ones((16, 64), jnp.int32),
        "labels": jnp.asarray(rng.integers(0, 2, 16)),
    }

    def apply_model(p, b):
        return model.apply_fn(p, b["input_ids"], b["attention_mask"])

    def loss_fn(logits, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    ours = make_train_step(apply_model, loss_fn, opt, factored=True)
    theirs = make_train_step(apply_model, loss_fn, opt, factored=True, compiler_options=CONCURRENCY)
    temps, results = [], []
    for step in (ours, theirs):
        state = init_train_state(adapter, opt, 0)
        temps.append(step.lower(state, model.params, batch).compile().memory_analysis().temp_size_in_bytes)
        for _ in range(2):
            state, metrics = step(state, model.params, batch)
        results.append((state.trainable, metrics["loss"]))
    assert temps[0] < 0.9 * temps[1]
    # Scheduling orders the same ops: the trained values and the loss agree.
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_step_compiler_options_leave_a_scheduler_chosen_in_xla_flags(monkeypatch):
    from jaxsparse.train import step_compiler_options

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED")
    assert step_compiler_options("cpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert step_compiler_options("cpu") == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    assert step_compiler_options("gpu") == {} and step_compiler_options("tpu") == {}
