"""SQFT: SparsePEFT keeps the base's zeros (NumPy oracle), NLS steps use exactly their leading
components (the rest gets zero gradient), and bad configs are refused with the key named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import delta as delta_lib
from jaxsparse import merge as merge_lib
from jaxsparse import train as train_lib
from jaxsparse.methods import registry, sqft
from jaxsparse.methods.sqft import SQFTConfig


def _sparse_params(seed: int = 0, layers: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(layers):
        layer = {}
        for name, shape in (("q_proj", (12, 8)), ("v_proj", (12, 4)), ("up_proj", (12, 16))):
            w = rng.normal(size=shape).astype(np.float32)
            w[rng.random(shape) < 0.5] = 0.0  # a 50%-sparse base
            layer[name] = {"kernel": jnp.asarray(w)}
        out[str(i)] = layer
    return {"layers": out}


def test_sparse_peft_merge_equals_numpy_oracle_and_keeps_every_zero():
    params = _sparse_params()
    cfg = SQFTConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=False, sparse_adapter=True
    )
    adapter = sqft.init(params, cfg, jax.random.key(1))
    merged, _ = merge_lib.merge(params, adapter)
    for path, d in adapter.deltas.items():
        w = np.asarray(merge_lib.tree_lib.get_leaf(params, path), np.float64)
        oracle = w + (2.0 * np.asarray(d.a, np.float64) @ np.asarray(d.b, np.float64)) * (w != 0)
        got = np.asarray(merge_lib.tree_lib.get_leaf(merged, path))
        np.testing.assert_allclose(got, oracle, rtol=1e-6, atol=1e-6, err_msg=path)
        assert (got == 0).sum() == (w == 0).sum() > 0 and np.array_equal(got == 0, w == 0)
        # plain LoRA would have filled the zeros: the test can fail
        assert (np.asarray(d.a) @ np.asarray(d.b))[w == 0].any()
    # untargeted weights untouched
    np.testing.assert_array_equal(
        merged["layers"]["0"]["v_proj"]["kernel"], params["layers"]["0"]["v_proj"]["kernel"]
    )


def test_sparse_peft_forward_is_the_masked_weight():
    params = _sparse_params()
    cfg = SQFTConfig(r=3, target_modules=["q_proj"], init_lora_weights=False, sparse_adapter=True)
    adapter = sqft.init(params, cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(2), (5, 12))
    from jaxsparse.factored import matmul

    factored = delta_lib.apply(params, adapter, factored=True)
    kernel = factored["layers"]["1"]["q_proj"]["kernel"]
    d = adapter.deltas["layers.1.q_proj.kernel"]
    w = np.asarray(params["layers"]["1"]["q_proj"]["kernel"], np.float64)
    oracle = w + (d.scale * np.asarray(d.a, np.float64) @ np.asarray(d.b, np.float64)) * (w != 0)
    np.testing.assert_allclose(matmul(x, kernel), np.asarray(x, np.float64) @ oracle, rtol=1e-5, atol=1e-5)


def test_sparse_adapter_on_a_base_without_zeros_warns_and_says_so():
    params = {"layers": {"0": {"q_proj": {"kernel": jnp.ones((4, 4))}}}}
    cfg = SQFTConfig(r=2, target_modules=["q_proj"], sparse_adapter=True)
    with pytest.warns(sqft.SparseBaseWarning, match="no zeros .* plain LoRA"):
        sqft.init(params, cfg, jax.random.key(0))


def test_method_is_registered_and_exact_config_class_wins():
    assert registry.get("sqft") is sqft.METHOD
    assert registry.for_config(SQFTConfig(target_modules=["q"])) is sqft.METHOD
    assert registry.for_config(sqft.LoraConfig(target_modules=["q"])).name == "lora"
    cfg = sqft.METHOD.config_from(
        {
            "adapter.r": 8,
            "adapter.lora_alpha": 16,
            "adapter.lora_dropout": 0.0,
            "adapter.sparse_adapter": True,
            "adapter.nls_target_modules": ["q_proj"],
            "adapter.search_space": [8, 6, 4],
        },
        target_modules=None,
    )
    assert cfg.target_modules == ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    assert cfg.search_space == (8, 6, 4) and cfg.nls_target_modules == ("q_proj",) and hash(cfg)


def _nls_adapter():
    params = _sparse_params(layers=3)
    cfg = SQFTConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj"],
        nls_target_modules=["q_proj", "v_proj"],
        search_space=[8, 6, 4],
        init_lora_weights=False,
        sparse_adapter=True,
    )
    return params, cfg, sqft.init(params, cfg, jax.random.key(0))


def test_nls_groups_share_a_rank_per_layer_and_sampling_covers_the_space():
    _, cfg, adapter = _nls_adapter()
    groups = sqft.nls_groups(cfg, adapter.deltas)
    assert groups == [
        (f"layers.{i}", (f"layers.{i}.q_proj.kernel", f"layers.{i}.v_proj.kernel")) for i in range(3)
    ]
    sample = jax.jit(cfg.sample_step_adapter)
    seen = set()
    for k in range(40):
        sampled = sample(adapter, jax.random.key(k))
        for _, paths in groups:
            ws = {int(sampled.deltas[p].rank_mask.sum()) for p in paths}
            assert len(ws) == 1  # one rank per group
            (w,) = ws
            assert w in (8, 6, 4)
            np.testing.assert_array_equal(sampled.deltas[paths[0]].rank_mask, np.arange(8) < w)  # leading
            seen.add(w)
        assert sampled.deltas["layers.0.up_proj.kernel"].rank_mask is None  # not elastic
    assert seen == {8, 6, 4}
    assert adapter.deltas["layers.0.q_proj.kernel"].rank_mask is None  # the stored adapter never changes


def test_nls_step_at_rank_w_uses_exactly_the_first_w_components():
    params, cfg, adapter = _nls_adapter()
    x = jax.random.normal(jax.random.key(3), (6, 12))

    def apply_model(p, batch):
        from jaxsparse.factored import matmul

        return sum(
            matmul(batch, p["layers"][i][m]["kernel"]).sum() ** 2
            for i in p["layers"]
            for m in ("q_proj", "v_proj", "up_proj")
        )

    loss = train_lib.make_loss(apply_model, lambda out, batch: out, factored=True)
    sampled = cfg.sample_step_adapter(adapter, jax.random.key(5))
    (_, _), grads = jax.value_and_grad(loss, has_aux=True)(
        delta_lib.trainable(sampled), sampled, params, x, None
    )
    for path, d in sampled.deltas.items():
        ga, gb = np.asarray(grads["deltas"][path]["a"]), np.asarray(grads["deltas"][path]["b"])
        w = d.rank if d.rank_mask is None else int(d.rank_mask.sum())
        assert np.all(ga[:, w:] == 0) and np.all(gb[w:] == 0), path
        # every used component gets a gradient (so the zero above is not vacuous)
        assert (np.abs(ga[:, :w]).sum(axis=0) > 0).all() and (np.abs(gb[:w]).sum(axis=1) > 0).all(), path
    assert {int(d.rank_mask.sum()) for d in sampled.deltas.values() if d.rank_mask is not None} - {8}, (
        "key 5 should sample a rank below r somewhere"
    )
    # and the sub-adapter at w is the same function as a rank-w LoRA cut from it
    d = sampled.deltas["layers.2.q_proj.kernel"]
    w = int(d.rank_mask.sum())
    cut = np.asarray(d.a)[:, :w] @ np.asarray(d.b)[:w] * d.scale
    w0 = np.asarray(params["layers"]["2"]["q_proj"]["kernel"])
    np.testing.assert_allclose(d.apply(jnp.asarray(w0)), w0 + cut * (w0 != 0), rtol=1e-6, atol=1e-6)


def test_a_jitted_train_step_moves_only_the_sampled_components():
    import optax

    params, cfg, adapter = _nls_adapter()
    x = jax.random.normal(jax.random.key(3), (6, 12))

    def apply_model(p, batch):
        from jaxsparse.factored import matmul

        return matmul(batch, p["layers"]["0"]["q_proj"]["kernel"])

    step = train_lib.make_train_step(
        apply_model, lambda out, b: (out**2).mean(), optax.sgd(0.1), factored=True
    )
    state = train_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        adapter=adapter,
        opt_state=optax.sgd(0.1).init(delta_lib.trainable(adapter)),
        rng=jax.random.key(11),
    )
    # the rank this step samples, from the same keys the step uses
    _, step_rng = jax.random.split(state.rng)
    sampled = cfg.sample_step_adapter(adapter, jax.random.fold_in(step_rng, 0x5F7))
    w = int(sampled.deltas["layers.0.q_proj.kernel"].rank_mask.sum())
    before = np.asarray(adapter.deltas["layers.0.q_proj.kernel"].b).copy()
    a_before = np.asarray(adapter.deltas["layers.0.q_proj.kernel"].a).copy()
    new, _ = step(state, params, x)
    after = np.asarray(new.adapter.deltas["layers.0.q_proj.kernel"].b)
    np.testing.assert_array_equal(after[w:], before[w:])
    np.testing.assert_array_equal(
        np.asarray(new.adapter.deltas["layers.0.q_proj.kernel"].a)[:, w:], a_before[:, w:]
    )
    assert not np.array_equal(after[:w], before[:w])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 16, "search_space": [32, 24, 16]}, "rank 32 is above r=16"),
        ({"r": 32, "search_space": [16, 24, 32]}, "strictly decreasing"),
        ({"r": 32, "search_space": [32, 32]}, "strictly decreasing"),
        ({"r": 32, "search_space": []}, "non-empty list of positive int"),
        ({"r": 32, "nls_target_modules": ["q_proj"]}, "search_space is not"),
        ({"r": 32, "search_space": [32, 16], "rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ],
)
def test_bad_configs_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SQFTConfig(target_modules=["q_proj"], **kwargs)


def test_nls_targets_matching_nothing_and_abstract_sparse_bases_are_refused():
    params = _sparse_params()
    cfg = SQFTConfig(r=4, target_modules=["q_proj"], nls_target_modules=["k_proj"], search_space=[4, 2])
    with pytest.raises(ValueError, match=r"nls_target_modules .* match none"):
        sqft.init(params, cfg, jax.random.key(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(ValueError, match="needs the base weight's values"):
        sqft.init(
            abstract, SQFTConfig(r=2, target_modules=["q_proj"], sparse_adapter=True), jax.random.key(0)
        )


def test_shipped_sqft_config_builds_the_sqft_method():
    from pathlib import Path

    from jaxsparse import config as config_lib
    from jaxsparse import trainer

    path = Path(__file__).parents[2] / "configs" / "sqft_sparsepeft_nls_smollm2_bbc.yaml"
    cfg = config_lib.load_config(path, check_paths=False)
    method_config = trainer.method_config(cfg)
    assert isinstance(method_config, SQFTConfig) and method_config.sparse_adapter
    assert method_config.r == 16 and method_config.lora_alpha == 2 * method_config.r
    assert method_config.target_modules == ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    assert method_config.nls_target_modules == ("q_proj", "k_proj", "v_proj")
    assert method_config.search_space == (16, 12, 8)
