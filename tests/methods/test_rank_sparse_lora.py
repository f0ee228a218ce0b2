"""Rank-sparse high-rank LoRA: a step computes exactly ceil(density * r) components (the others get
zero gradient), the selection equals a NumPy oracle of the importance rule, the accumulated importance
is the running mean of the scores and resumes exactly, pruning keeps the oracle's top components and
PEFT loads the rank-reduced export with our logits, and bad values are refused."""

from __future__ import annotations

import copy
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsparse import delta as delta_lib
from jaxsparse import rank_sparse
from jaxsparse import train as train_lib
from jaxsparse import tree as tree_lib
from jaxsparse.methods import rank_sparse_lora as rsl
from jaxsparse.methods import registry
from jaxsparse.methods.rank_sparse_lora import RankSparseLoraConfig

IN, OUT, TOKENS = 12, 10, 9


def _params(layers: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "layers": {
            str(i): {
                "q_proj": {"kernel": jnp.asarray(rng.normal(size=(IN, IN)), jnp.float32)},
                "up_proj": {"kernel": jnp.asarray(rng.normal(size=(IN, OUT)), jnp.float32)},
            }
            for i in range(layers)
        }
    }


def _apply_model(params, batch):
    from jaxsparse.factored import matmul

    h, out = batch["x"], 0.0
    for i in sorted(params["layers"]):
        layer = params["layers"][i]
        h = jnp.tanh(matmul(h, layer["q_proj"]["kernel"]))
        out = out + matmul(h, layer["up_proj"]["kernel"])  # every layer's output reaches the loss
    return out


def _loss(out, batch):
    return jnp.mean((out - batch["y"]) ** 2)


def _batch(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x": jnp.asarray(rng.normal(size=(3, TOKENS // 3, IN)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(3, TOKENS // 3, OUT)), jnp.float32),
    }


def _config(**kw) -> RankSparseLoraConfig:
    base = dict(
        r=40,
        lora_alpha=8,
        target_modules=["q_proj", "up_proj"],
        target_density=0.08,
        importance_lambda=0.15,
        init_lora_weights=False,  # B != 0: contextual scores differ between components
    )
    return RankSparseLoraConfig(**{**base, **kw})


def _adapter(cfg: RankSparseLoraConfig, seed: int = 0, importance_seed: int | None = 3):
    adapter = rsl.init(_params(), cfg, jax.random.key(seed))
    if importance_seed is None:
        return adapter
    rng = np.random.default_rng(importance_seed)
    deltas = {
        p: rank_sparse.with_importance(d, rng.dirichlet(np.ones(d.rank)).astype(np.float32))
        for p, d in adapter.deltas.items()
    }
    return delta_lib.Adapter(deltas=deltas, dense=adapter.dense, config=cfg)


def _layer_inputs(params, adapter, batch):
    """The input each targeted layer sees in the forward (the full adapter up to that layer is not
    used: the view's outputs are what the next layer sees), recorded in NumPy."""
    view = adapter.config.forward_view(adapter, jax.random.PRNGKey(0))
    eff = delta_lib.apply(params, view, factored=True)
    from jaxsparse.factored import matmul

    inputs, h = {}, batch["x"]
    for i in sorted(eff["layers"]):
        layer = eff["layers"][i]
        inputs[f"layers.{i}.q_proj.kernel"] = np.asarray(h)
        h = jnp.tanh(matmul(h, layer["q_proj"]["kernel"]))
        inputs[f"layers.{i}.up_proj.kernel"] = np.asarray(h)
    return inputs


def _oracle_scores(x, a, b, score_tokens):
    """The importance rule in float64 NumPy, written from the docs (not from the code)."""
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    t = flat.shape[0]
    rows = np.arange(t) if t <= score_tokens else (np.arange(score_tokens) * t) // score_tokens
    act = np.linalg.norm(flat[rows] @ np.asarray(a, np.float64), axis=0)
    bn = np.linalg.norm(np.asarray(b, np.float64), axis=1)
    c = act * (bn + bn.max() + 1e-12)
    return c / c.sum()


def _oracle_selected(x, d, cfg):
    c = _oracle_scores(x, d.a, d.b, cfg.score_tokens)
    s = (1 - cfg.importance_lambda) * c + cfg.importance_lambda * np.asarray(d.importance, np.float64)
    order = np.argsort(-s, kind="stable")
    k = math.ceil(cfg.target_density * d.rank)
    # the oracle's choice is well defined only with a gap at the k-th place
    assert s[order[k - 1]] - s[order[k]] > 1e-6
    return set(order[:k].tolist()), c


@pytest.mark.parametrize("score_tokens", [64, 4])
def test_step_touches_exactly_k_components_and_selection_equals_numpy_oracle(score_tokens):
    cfg = _config(score_tokens=score_tokens)
    params, batch = _params(), _batch()
    adapter = _adapter(cfg)
    k = math.ceil(0.08 * 40)
    assert k == 4 and cfg.k(40) == 4
    inputs = _layer_inputs(params, adapter, batch)
    grad_fn = train_lib.value_and_grad(_apply_model, _loss, factored=True)
    _, grads = grad_fn(adapter, params, batch, jax.random.PRNGKey(0))
    for path, d in adapter.deltas.items():
        ga, gb = np.asarray(grads["deltas"][path]["a"]), np.asarray(grads["deltas"][path]["b"])
        cols = set(np.flatnonzero(np.abs(ga).sum(axis=0)).tolist())
        rows = set(np.flatnonzero(np.abs(gb).sum(axis=1)).tolist())
        expected, _ = _oracle_selected(inputs[path], d, cfg)
        assert cols == rows == expected, path
        assert len(cols) == k
        # the selection function agrees too
        view = rank_sparse.RankSparseView.of(d, k=k, importance_lambda=0.15, score_tokens=score_tokens)
        assert set(np.asarray(rank_sparse.select(view, inputs[path])).tolist()) == expected


def test_selected_components_get_the_full_lora_gradient_restricted_to_them():
    """The k-wide forward is LoRA with only the selected components: its gradient on them equals the
    gradient of a plain LoRA whose other components are masked out (an independent computation)."""
    cfg = _config(target_modules=["up_proj"])
    params, batch = _params(), _batch()
    adapter = _adapter(cfg)
    path = "layers.1.up_proj.kernel"
    inputs = _layer_inputs(params, adapter, batch)
    expected, _ = _oracle_selected(inputs[path], adapter.deltas[path], cfg)
    _, grads = train_lib.value_and_grad(_apply_model, _loss, factored=True)(
        adapter, params, batch, jax.random.PRNGKey(0)
    )
    mask = np.zeros(40, np.float32)
    mask[sorted(expected)] = 1
    d = adapter.deltas[path]
    other = adapter.deltas["layers.0.up_proj.kernel"]
    other_mask = np.zeros(40, np.float32)
    other_mask[sorted(_oracle_selected(inputs["layers.0.up_proj.kernel"], other, cfg)[0])] = 1
    masked = delta_lib.Adapter(
        {
            path: delta_lib.LowRankDelta(a=d.a, b=d.b, rank_mask=jnp.asarray(mask), scale=d.scale),
            "layers.0.up_proj.kernel": delta_lib.LowRankDelta(
                a=other.a, b=other.b, rank_mask=jnp.asarray(other_mask), scale=other.scale
            ),
        }
    )
    _, ref = train_lib.value_and_grad(_apply_model, _loss)(masked, params, batch)
    np.testing.assert_allclose(grads["deltas"][path]["b"], ref["deltas"][path]["b"], rtol=1e-5, atol=1e-6)
    # a's gradient: the masked reference multiplies by the mask, so compare on the selected columns
    sel = sorted(expected)
    np.testing.assert_allclose(
        np.asarray(grads["deltas"][path]["a"])[:, sel],
        np.asarray(ref["deltas"][path]["a"])[:, sel],
        rtol=1e-5,
        atol=1e-6,
    )


def _step(cfg, optimizer=None):
    optimizer = optimizer or optax.adamw(1e-2, weight_decay=0.01)
    return (
        train_lib.make_train_step(_apply_model, _loss, optimizer, factored=True),
        optimizer,
    )


def test_importance_is_the_running_mean_of_the_step_scores():
    cfg = _config()
    params = _params()
    step, opt = _step(cfg)
    adapter = _adapter(cfg, importance_seed=None)
    state = train_lib.init_train_state(adapter, opt, 0)
    running = {p: np.zeros(40) for p in adapter.deltas}
    for i in range(3):
        batch = _batch(10 + i)
        before = state.adapter
        # the scores of this step, from the oracle on the inputs the layers see
        inputs = _layer_inputs(params, before, batch)
        for p, d in before.deltas.items():
            c = _oracle_scores(inputs[p], d.a, d.b, cfg.score_tokens)
            running[p] = running[p] + (c - running[p]) / (i + 1)
        state, _ = step(state, params, batch)
        for p, d in state.adapter.deltas.items():
            np.testing.assert_allclose(np.asarray(d.importance), running[p], rtol=1e-4, atol=1e-7)
            assert abs(float(jnp.sum(d.importance)) - 1.0) < 1e-5
    # importance is not trained: the optimizer state holds only a and b
    leaves = jax.tree_util.tree_leaves(state.opt_state)
    assert not any(getattr(x, "shape", None) == (40,) for x in leaves)


def test_unselected_components_keep_their_values_through_adamw():
    cfg = _config()
    params, batch = _params(), _batch()
    step, opt = _step(cfg, optax.adamw(1e-2, weight_decay=0.0))
    adapter = _adapter(cfg)
    inputs = _layer_inputs(params, adapter, batch)
    state = train_lib.init_train_state(adapter, opt, 0)
    state, _ = step(state, params, batch)
    for p, d in adapter.deltas.items():
        sel, _ = _oracle_selected(inputs[p], d, cfg)
        other = sorted(set(range(40)) - sel)
        new = state.adapter.deltas[p]
        np.testing.assert_array_equal(np.asarray(new.a)[:, other], np.asarray(d.a)[:, other])
        np.testing.assert_array_equal(np.asarray(new.b)[other], np.asarray(d.b)[other])
        assert not np.array_equal(np.asarray(new.b)[sorted(sel)], np.asarray(d.b)[sorted(sel)])


def test_training_explores_from_peft_init_and_eval_uses_the_full_adapter():
    """From PEFT's B = 0 the selection follows the activations (no frozen first choice), and the
    evaluation forward is the full r-rank LoRA."""
    cfg = _config(init_lora_weights=True, target_density=0.1)
    params = _params()
    step, opt = _step(cfg)
    state = train_lib.init_train_state(_adapter(cfg, importance_seed=None), opt, 0)
    for i in range(6):
        state, _ = step(state, params, _batch(20 + i))
    d = state.adapter.deltas["layers.0.q_proj.kernel"]
    touched = int((np.abs(np.asarray(d.b)).sum(axis=1) > 0).sum())
    assert touched > cfg.k(40)  # more than one step's k components were trained
    full = delta_lib.Adapter(
        {p: delta_lib.LowRankDelta(a=x.a, b=x.b, scale=x.scale) for p, x in state.adapter.deltas.items()}
    )
    eval_step = train_lib.make_eval_step(_apply_model, _loss, factored=True)
    a = eval_step(state.adapter, params, _batch(5))["loss"]
    b = eval_step(full, params, _batch(5))["loss"]
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_checkpoint_resume_restores_importance_exactly(tmp_path):
    from jaxsparse.checkpoint import Checkpointer

    cfg = _config()
    params = _params()
    step, opt = _step(cfg)
    fresh = lambda: train_lib.init_train_state(_adapter(cfg, importance_seed=None), opt, 0)  # noqa: E731
    state = fresh()
    for i in range(4):
        state, _ = step(state, params, _batch(30 + i))
    straight = state
    state = fresh()
    for i in range(2):
        state, _ = step(state, params, _batch(30 + i))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(state, force=True)
        ckpt.wait()
        restored = ckpt.restore(fresh()).state
    assert isinstance(restored.adapter.deltas["layers.0.q_proj.kernel"], rank_sparse.RankSparseDelta)
    for i in range(2, 4):
        restored, _ = step(restored, params, _batch(30 + i))
    for p in straight.adapter.deltas:
        a, b = straight.adapter.deltas[p], restored.adapter.deltas[p]
        np.testing.assert_array_equal(np.asarray(a.importance), np.asarray(b.importance))
        np.testing.assert_array_equal(np.asarray(a.b), np.asarray(b.b))
    assert float(jnp.abs(straight.adapter.deltas[p].importance).sum()) > 0


def test_retain_ratio_keeps_the_oracle_top_components(tmp_path):
    cfg = _config()
    adapter = _adapter(cfg, importance_seed=7)
    pruned = rsl.prune_by_importance(adapter, 0.15)
    for p, d in adapter.deltas.items():
        keep = math.ceil(0.15 * 40)
        top = np.sort(np.argsort(-np.asarray(d.importance, np.float64))[:keep])
        np.testing.assert_array_equal(pruned.deltas[p].a, np.asarray(d.a)[:, top])
        np.testing.assert_array_equal(pruned.deltas[p].b, np.asarray(d.b)[top])
        assert pruned.deltas[p].scale == d.scale == 8 / 40
    sizes = rsl.save_pruned_checkpoint(adapter, tmp_path / "out", retain_ratio=0.15)
    assert sizes["params_after"] == 2 * 6 * (IN + IN) + 2 * 6 * (IN + OUT)  # 2 layers, 6 of 40 kept
    assert sizes["bytes_after"] < sizes["bytes_before"] / 5
    raw = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert raw["r"] == 6 and raw["lora_alpha"] == pytest.approx(6 * 8 / 40)
    assert (tmp_path / "out" / ".jaxsparse-output.json").exists()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"target_density": 0.0}, "target_density must be in (0, 1]"),
        ({"target_density": 1.5}, "target_density must be in (0, 1]"),
        ({"importance_lambda": -0.1}, "importance_lambda must be in [0, 1]"),
        ({"importance_lambda": 1.01}, "importance_lambda must be in [0, 1]"),
        ({"score_tokens": 0}, "score_tokens must be a positive int"),
        ({"use_rslora": True}, "not supported"),
    ],
)
def test_bad_config_values_are_refused(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        _config(**kw)


@pytest.mark.parametrize("ratio", [0.0, -1.0, 1.5, float("nan")])
def test_retain_ratio_that_keeps_nothing_is_refused(ratio, tmp_path):
    adapter = _adapter(_config())
    with pytest.raises(ValueError, match=r"retain_ratio must be in \(0, 1\]"):
        rsl.save_pruned_checkpoint(adapter, tmp_path / "out", retain_ratio=ratio)
    assert not (tmp_path / "out").exists()


def test_registry_knows_the_method_and_reads_its_yaml_keys():
    method = registry.get("rank_sparse_lora")
    values = {
        "adapter.r": 64,
        "adapter.lora_alpha": 16.0,
        "adapter.lora_dropout": 0.05,
        "adapter.target_density": 0.25,
        "adapter.importance_lambda": 0.5,
        "adapter.score_tokens": 32,
    }
    cfg = method.config_from(values, target_modules=None)
    assert cfg.target_modules == rsl.DEFAULT_TARGETS and cfg.k(64) == 16 and cfg.score_tokens == 32
    assert registry.for_config(cfg) is method and method.native_format == "peft_lora"


# --------------------------------------------------------------------------- PEFT parity

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


from tests.convert.test_peft_lora import llama  # noqa: E402, F401  (a fixture)


def test_peft_loads_the_rank_reduced_export_with_our_logits(llama, tmp_path):
    from jaxsparse.adapter_io import save_adapter
    from jaxsparse.models import from_torch

    ours = from_torch(llama)
    cfg = RankSparseLoraConfig(
        r=24,
        lora_alpha=12,
        target_modules=list(rsl.DEFAULT_TARGETS),
        rank_pattern={"down_proj": 12},  # modules of different ranks: the export needs rank_pattern
        alpha_pattern={"down_proj": 9},
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    adapter = rsl.init(ours.params, cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    deltas = {
        p: rank_sparse.with_importance(d, rng.random(d.rank)) for p, d in sorted(adapter.deltas.items())
    }
    adapter = delta_lib.Adapter(deltas=deltas, dense={}, config=cfg)
    # the trained directory holds the importance beside PEFT's files
    save_adapter(adapter, tmp_path / "full", model=ours)
    stored = rsl.read_importance(tmp_path / "full")
    for p, d in adapter.deltas.items():
        np.testing.assert_array_equal(stored[tree_lib.module_of(p)], np.asarray(d.importance))
    out = tmp_path / "pruned"
    sizes = rsl.save_pruned_checkpoint(adapter, out, retain_ratio=0.25)
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["r"] == 6 and raw["lora_alpha"] == pytest.approx(3.0)
    assert raw["rank_pattern"] == {f"model.layers.{i}.mlp.down_proj": 3 for i in range(2)}
    assert raw["alpha_pattern"] == {f"model.layers.{i}.mlp.down_proj": pytest.approx(2.25) for i in range(2)}
    assert sizes["bytes_after"] < sizes["bytes_before"]
    ids = np.array([[1, 5, 9, 2, 30, 7, 3]])
    model = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(out)).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    # ours: the jaxsparse model with only the kept components (a rank mask over the full adapter)
    masked = {}
    for p, d in adapter.deltas.items():
        keep = np.argsort(-np.asarray(d.importance, np.float64), kind="stable")[: math.ceil(0.25 * d.rank)]
        mask = np.zeros(d.rank, np.float32)
        mask[keep] = 1
        masked[p] = delta_lib.LowRankDelta(a=d.a, b=d.b, rank_mask=jnp.asarray(mask), scale=d.scale)
    mine = np.asarray(
        ours.apply_fn(
            delta_lib.apply(ours.params, delta_lib.Adapter(masked), factored=True), ids, np.ones_like(ids)
        )
    )
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)
    full = np.asarray(
        ours.apply_fn(delta_lib.apply(ours.params, adapter, factored=True), ids, np.ones_like(ids))
    )
    assert np.abs(full - theirs).max() > 1e-3  # pruning changed the model: the comparison can fail
