import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsparse.checkpoint import Checkpointer, CheckpointError
from jaxsparse.train import init_train_state, make_train_step
from tests.test_train import apply_mlp, data, sparse_adapter, tiny_mlp


def dropout_mlp(params, batch, rng):
    keep = jax.random.bernoulli(rng, 0.8, batch["x"].shape)
    return apply_mlp(params, {"x": jnp.where(keep, batch["x"] / 0.8, 0.0)})


def xent(logits, batch):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def batch_at(step):
    return data(16, seed=100 + step)  # the data position is a pure function of the step


def leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def test_resume_is_bit_identical(tmp_path):
    params = tiny_mlp()
    opt = optax.adamw(1e-2)
    step = make_train_step(dropout_mlp, xent, opt, takes_rng=True)

    def fresh():
        return init_train_state(sparse_adapter(params), opt, 7)

    state = fresh()
    for s in range(6):
        state = step(state, params, batch_at(s))[0]
    uninterrupted = leaves(state)

    with Checkpointer(tmp_path / "ckpt", save_every=3, keep=2) as ckpt:
        state = fresh()
        for s in range(3):
            state, metrics = step(state, params, batch_at(s))
            ckpt.save(state, epoch=0, batch_index=s + 1, extra={"loss": metrics["loss"]})
        assert ckpt.all_steps() == [3]
    del state

    with Checkpointer(tmp_path / "ckpt", save_every=3, keep=2) as ckpt:
        r = ckpt.restore_or(fresh())
        assert (r.step, r.epoch, r.batch_index) == (3, 0, 3)
        assert isinstance(r.extra["loss"], float)
        state = r.state
        for s in range(r.batch_index, 6):
            state = step(state, params, batch_at(s))[0]
            ckpt.save(state, batch_index=s + 1)
        assert ckpt.all_steps() == [3, 6]
    resumed = leaves(state)
    assert len(resumed) == len(uninterrupted)
    for a, b in zip(resumed, uninterrupted, strict=True):
        np.testing.assert_array_equal(a, b)


def test_keep_last_k_and_fresh_start(tmp_path):
    params = tiny_mlp()
    opt = optax.sgd(0.1)
    state = init_train_state(sparse_adapter(params, dense_head=False), opt, 0)
    step = make_train_step(apply_mlp, xent, opt)
    with Checkpointer(tmp_path / "c", save_every=1, keep=2) as ckpt:
        r = ckpt.restore_or(state)
        assert r.step == 0 and r.state is state
        with pytest.raises(CheckpointError, match="no checkpoint"):
            ckpt.restore(state)
        for s in range(4):
            state = step(state, params, batch_at(s))[0]
            ckpt.save(state)
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.latest_step() == 4
        with pytest.raises(CheckpointError, match="step 1"):
            ckpt.restore(state, step=1)


# orbax leaves a tensorstore future unawaited when a restore fails on a shape mismatch
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bad_inputs(tmp_path):
    params = tiny_mlp()
    state = init_train_state(sparse_adapter(params, dense_head=False), optax.adam(1e-3), 0)
    with Checkpointer(tmp_path / "c", save_every=1) as ckpt:
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(state, extra={"f": object()})
        ckpt.save(state, force=True)
        other = init_train_state(sparse_adapter(params, k=5, dense_head=False), optax.adam(1e-3), 0)
        with pytest.raises(CheckpointError, match="does not match"):
            ckpt.restore(other)
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path / "d", save_every=0)


def test_async_save_and_leftover_tmp_dir_from_a_kill(tmp_path):
    params = tiny_mlp()
    state = init_train_state(sparse_adapter(params, dense_head=False), optax.adam(1e-3), 0)
    with Checkpointer(tmp_path / "c", save_every=1, async_save=True) as ckpt:
        assert ckpt.save(state, force=True)
    (tmp_path / "c" / "7.orbax-checkpoint-tmp-123").mkdir()  # what a kill mid-save leaves behind
    with Checkpointer(tmp_path / "c", save_every=1) as ckpt:
        assert ckpt.latest_step() == 0
        restored = ckpt.restore(state)
    for a, b in zip(leaves(restored.state), leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["0"]
