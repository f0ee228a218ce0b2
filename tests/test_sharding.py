"""Sharding: base params FSDP-sharded on a Mesh, batch data parallel, adapter replicated.

JAX fixes its device count at import, so the check runs in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (this file is the worker when run as a
script). The sharded run must give the numbers of the single-device run (<= 1e-6), and merge /
unmerge must keep each weight's sharding.
"""

import json
import os
import subprocess
import sys

import numpy as np

DATA, FSDP = 2, 4  # mesh (data, fsdp) = 8 host devices
STEPS = 3
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _worker() -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    import transformers
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxsparse import merge, train
    from jaxsparse import tree as tree_lib
    from jaxsparse.methods import shira
    from jaxsparse.models import init_params

    assert jax.device_count() == DATA * FSDP, jax.devices()
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = init_params(config, task="causal_lm", seed=0)
    adapter = shira.init(
        model.params, shira.ShiraConfig(r=1, target_modules=TARGETS, init_weights=False), jax.random.key(1)
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(4, 8))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"ids": jnp.asarray(ids, jnp.int32), "mask": jnp.asarray(mask, jnp.int32)}

    def apply_model(params, b):
        return model.apply_fn(params, b["ids"], b["mask"])

    def loss_fn(logits, b):
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, b["ids"][:, 1:, None], axis=-1)[..., 0]
        keep = b["mask"][:, 1:].astype(jnp.float32)
        return jnp.sum(nll * keep) / jnp.sum(keep)

    def run(params, adapter, batch, factored=False):
        optimizer = optax.adam(1e-2)
        # factored with threshold 1: every SHiRA delta takes the sampled-product gradient
        step = train.make_train_step(
            apply_model, loss_fn, optimizer, factored=factored, sampled_max_density=1.0
        )
        state = train.init_train_state(adapter, optimizer, 0)
        losses = []
        for _ in range(STEPS):
            state, metrics = step(state, params, batch)
            losses.append(float(metrics["loss"]))
        trained = state.adapter
        merged, saved = merge.merge(params, trained)
        back = merge.unmerge(merged, trained, saved)
        return losses, trained, merged, back

    one = jax.devices()[0]
    ref = run(*jax.device_put((model.params, adapter, batch), one))

    mesh = Mesh(np.array(jax.devices()).reshape(DATA, FSDP), ("data", "fsdp"))

    def fsdp(x):  # shard the first axis FSDP can split evenly; small leaves stay replicated
        for axis, size in enumerate(x.shape):
            if size % FSDP == 0:
                return NamedSharding(mesh, P(*([None] * axis), "fsdp"))
        return NamedSharding(mesh, P())

    params = jax.tree_util.tree_map(lambda x: jax.device_put(x, fsdp(x)), model.params)
    sharded_adapter = jax.device_put(adapter, NamedSharding(mesh, P()))
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    got = run(params, sharded_adapter, sharded_batch)
    got_factored = run(params, sharded_adapter, sharded_batch, factored=True)

    def max_diff(a, b):
        pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
        return max(
            float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in pairs
        )

    # in place (donated) merge of sharded weights: the buffers are reused, so no copy, same sharding
    import warnings

    copy = jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), x.sharding), params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inplace, _ = merge.merge_inplace(copy, got[1])
    inplace_paths = tree_lib.leaf_paths(inplace)

    targeted = list(adapter.deltas)
    shardings = tree_lib.leaf_paths(params)
    merged_paths = tree_lib.leaf_paths(got[2])
    restored_paths = tree_lib.leaf_paths(got[3])
    base_paths = tree_lib.leaf_paths(model.params)
    return {
        "devices": jax.device_count(),
        "losses_ref": ref[0],
        "losses": got[0],
        "loss_decreased": got[0][-1] < got[0][0],
        "adapter_diff": max_diff(ref[1], got[1]),
        "losses_factored": got_factored[0],
        "factored_adapter_diff": max_diff(ref[1], got_factored[1]),
        "merged_diff": max_diff(ref[2], got[2]),
        "unmerged_exact": all(
            np.array_equal(np.asarray(restored_paths[p]), np.asarray(base_paths[p])) for p in base_paths
        ),
        "sharded_weights": sum(not shardings[p].sharding.is_fully_replicated for p in targeted),
        "merged_keep_sharding": [
            p for p in targeted if not merged_paths[p].sharding.is_equivalent_to(shardings[p].sharding, 2)
        ],
        "unmerged_keep_sharding": [
            p for p in targeted if not restored_paths[p].sharding.is_equivalent_to(shardings[p].sharding, 2)
        ],
        "inplace_diff": max_diff(got[2], inplace),
        "inplace_keep_sharding": [
            p for p in targeted if not inplace_paths[p].sharding.is_equivalent_to(shardings[p].sharding, 2)
        ],
        "donation_warnings": [str(w.message) for w in caught],
        "adapter_replicated": all(x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(got[1])),
    }


def test_sharded_train_step_and_merge_match_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8
    assert r["sharded_weights"] == 3 * 2  # every targeted weight really is sharded
    np.testing.assert_allclose(r["losses"], r["losses_ref"], rtol=0, atol=1e-6)
    assert r["loss_decreased"]
    assert r["adapter_diff"] <= 1e-6 and r["merged_diff"] <= 1e-6
    # sharded, with the sampled-product gradient: the same run within float32 rounding
    np.testing.assert_allclose(r["losses_factored"], r["losses_ref"], rtol=0, atol=1e-5)
    assert r["factored_adapter_diff"] <= 1e-5
    assert r["unmerged_exact"]
    assert r["merged_keep_sharding"] == [] and r["unmerged_keep_sharding"] == []
    assert r["inplace_diff"] == 0 and r["inplace_keep_sharding"] == [] and r["donation_warnings"] == []
    assert r["adapter_replicated"]


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    print(json.dumps(_worker()))
