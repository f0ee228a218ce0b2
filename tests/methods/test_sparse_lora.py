"""Sparse LoRA (jaxsparse.methods.sparse_lora): schedule, counts, masked updates, export, bad input.

Oracles: the cubic schedule's closed form (Zhu & Gupta) in plain Python, NumPy magnitude ranking,
optax AdamW itself (a control run without the hooks revives pruned entries), PEFT + transformers."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsparse import delta as delta_lib
from jaxsparse import train as train_lib
from jaxsparse.methods import registry
from jaxsparse.methods.sparse_lora import SparseLoraConfig, init, prune_masks, sparsity_report
from tests.tiny_mlm import WORDS, write_tiny_distilbert_mlm


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "layer": {
            "query": {"kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)},
            "value": {"kernel": jnp.asarray(rng.normal(size=(10, 12)), jnp.float32)},
        }
    }


def _config(**kw):
    base = dict(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False, total_steps=20)
    return SparseLoraConfig(**{**base, **kw})


def _random_factors(adapter, seed=1):
    """Every factor entry non-zero and distinct in magnitude (a trained adapter; no ties)."""
    rng = np.random.default_rng(seed)
    leaves = delta_lib.trainable(adapter)
    leaves["deltas"] = {
        p: {f: jnp.asarray(rng.normal(size=np.shape(x)), jnp.float32) for f, x in fs.items()}
        for p, fs in leaves["deltas"].items()
    }
    return delta_lib.with_trainable(adapter, leaves)


# ----------------------------------------------------------------------------- schedule


def test_cubic_schedule_equals_the_closed_form_and_one_shot_is_a_step():
    total, start, end, s_f = 200, 0.1, 0.6, 0.5
    cfg = _config(total_steps=total, prune_start=start, prune_end=end, sparsity=s_f)
    t0, t1 = round(start * total), round(end * total)
    assert cfg.prune_window() == (t0, t1) == (20, 120)
    for t in range(total + 1):
        if t < t0:
            expected = 0.0
        elif t >= t1:
            expected = s_f
        else:
            expected = s_f * (1 - (1 - (t - t0) / (t1 - t0)) ** 3)
        assert float(cfg.target_sparsity(t)) == pytest.approx(expected, abs=1e-6), t
    updates = [t for t in range(total + 1) if bool(cfg.is_mask_update(t))]
    assert updates == [*range(t0, t1, 10), t1]

    one = _config(total_steps=total, prune_schedule="one_shot", prune_end=0.3, sparsity=0.4)
    assert [float(one.target_sparsity(t)) for t in (59, 60, 200)] == [
        0.0,
        pytest.approx(0.4),
        pytest.approx(0.4),
    ]
    assert [t for t in range(total + 1) if bool(one.is_mask_update(t))] == [60]
    # A window at step 0 still prunes, at the first update after step 1.
    assert _config(total_steps=5, prune_schedule="one_shot", prune_start=0, prune_end=0).prune_window() == (
        0,
        1,
    )


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_per_factor_pruning_keeps_the_numpy_oracle_largest_entries(sparsity):
    cfg = _config(sparsity=sparsity, prune_schedule="one_shot", prune_end=0.5)
    adapter = _random_factors(init(_params(), cfg, jax.random.key(0)))
    before = {(p, f): np.asarray(getattr(d, f)) for p, d in adapter.deltas.items() for f in ("a", "b")}
    pruned = cfg.after_update(adapter, jnp.asarray(10))
    for (p, f), w in before.items():
        d = pruned.deltas[p]
        mask, value = np.asarray(getattr(d, f"{f}_mask")), np.asarray(getattr(d, f))
        k = round(sparsity * w.size)
        assert (~mask).sum() == k == (value == 0).sum()  # exactly the requested count
        oracle = np.zeros(w.size, bool)
        oracle[np.argsort(np.abs(w).reshape(-1))[k:]] = True  # keep all but the k smallest
        np.testing.assert_array_equal(mask.reshape(-1), oracle)
        np.testing.assert_array_equal(value, np.where(oracle.reshape(w.shape), w, 0))
    report = sparsity_report(pruned)
    assert report["trainable"] == sum(w.size for w in before.values())
    assert report["nonzero"] == sum(w.size - round(sparsity * w.size) for w in before.values())


def test_global_pruning_ranks_all_factors_together():
    cfg = _config(sparsity=0.5, prune_schedule="one_shot", prune_end=0.5, prune_scope="global")
    adapter = _random_factors(init(_params(), cfg, jax.random.key(0)))
    keys = [(p, f) for p in sorted(adapter.deltas) for f in ("a", "b")]
    flat = np.concatenate([np.abs(np.asarray(getattr(adapter.deltas[p], f))).reshape(-1) for p, f in keys])
    k = round(0.5 * flat.size)
    threshold = np.sort(flat)[k - 1]
    pruned = cfg.after_update(adapter, jnp.asarray(10))
    masks = np.concatenate([np.asarray(getattr(pruned.deltas[p], f"{f}_mask")).reshape(-1) for p, f in keys])
    assert (~masks).sum() == k
    np.testing.assert_array_equal(masks, flat > threshold)
    per_factor = [np.asarray(getattr(pruned.deltas[p], f"{f}_mask")).mean() for p, f in keys]
    assert len(set(np.round(per_factor, 6))) > 1  # one global threshold, not a share per factor


def test_gradual_masks_only_grow_and_end_exactly_at_the_target():
    """Through a cubic window with the values moving between updates (as training moves them), a
    pruned entry never comes back, and the last update leaves exactly round(s * n) per factor."""
    cfg = _config(sparsity=0.5, total_steps=40, prune_start=0.1, prune_end=0.8, prune_every=3)
    adapter = _random_factors(init(_params(), cfg, jax.random.key(0)))
    rng = np.random.default_rng(5)
    after = jax.jit(cfg.after_update)
    previous = {p: (d.a_mask, d.b_mask) for p, d in adapter.deltas.items()}
    for step in range(1, 41):
        leaves = delta_lib.trainable(adapter)
        leaves["deltas"] = {
            p: {f: x + jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32) for f, x in fs.items()}
            for p, fs in leaves["deltas"].items()
        }
        adapter = after(delta_lib.with_trainable(adapter, leaves), jnp.asarray(step))
        for p, d in adapter.deltas.items():
            for old, new, w in zip(previous[p], (d.a_mask, d.b_mask), (d.a, d.b), strict=True):
                assert not np.any(np.asarray(new) & ~np.asarray(old))  # masks only lose entries
                assert np.all(np.asarray(w)[~np.asarray(new)] == 0)
            previous[p] = (d.a_mask, d.b_mask)
        expected = cfg.target_sparsity(step) if bool(cfg.is_mask_update(step)) else None
        if expected is not None:
            for d in adapter.deltas.values():
                for m in (d.a_mask, d.b_mask):
                    assert (~np.asarray(m)).sum() == int(np.floor(float(expected) * m.size + 0.5))
    for d in adapter.deltas.values():
        for m in (d.a_mask, d.b_mask):
            assert (~np.asarray(m)).sum() == round(0.5 * m.size)


def test_prune_masks_ranks_already_pruned_entries_first():
    values = {"x": jnp.array([5.0, 0.1, 3.0, 2.0])}
    old = {"x": jnp.array([False, True, True, True])}  # the largest entry was pruned before
    np.testing.assert_array_equal(
        prune_masks(values, old, 0.5, 0.5, "factor")["x"], [False, False, True, True]
    )


# ----------------------------------------------------------------------------- through AdamW


def _apply_model(params, batch):
    h = jnp.tanh(batch["x"] @ params["layer"]["query"]["kernel"])
    return h @ params["layer"]["value"]["kernel"]


def _loss(out, batch):
    return jnp.mean((out - batch["y"]) ** 2)


def test_adamw_steps_leave_every_pruned_entry_exactly_zero():
    """Prune one-shot after step 4 (AdamW's momentum is built by then), then train on: with weight
    decay and momentum, every pruned entry stays exactly 0.0 and the masks do not change. The same
    steps without the hooks (the control) move the pruned entries, so the check can fail."""
    params = _params()
    cfg = _config(sparsity=0.5, prune_schedule="one_shot", prune_end=0.2, total_steps=20)  # t1 = 4
    adapter = _random_factors(init(params, cfg, jax.random.key(0)))
    optimizer = optax.adamw(1e-2, weight_decay=0.01)
    step = train_lib.make_train_step(_apply_model, _loss, optimizer)
    rng = np.random.default_rng(0)
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(8, 12))),
    }
    state = train_lib.init_train_state(adapter, optimizer, 0)
    for _ in range(4):
        state, _ = step(state, params, batch)
    masks = {p: (np.asarray(d.a_mask), np.asarray(d.b_mask)) for p, d in state.adapter.deltas.items()}
    assert all((~m).sum() == round(0.5 * m.size) for pair in masks.values() for m in pair)
    snapshot = jax.tree.map(lambda x: jnp.array(x, copy=True), state)  # the step donates its state
    for _ in range(6):
        state, _ = step(state, params, batch)
        for p, d in state.adapter.deltas.items():
            for m, w, m_now in zip(masks[p], (d.a, d.b), (d.a_mask, d.b_mask), strict=True):
                assert np.all(np.asarray(w)[~m] == 0.0)
                np.testing.assert_array_equal(np.asarray(m_now), m)
                assert np.all(np.asarray(w)[m] != 0.0)  # the kept entries do train

    # Control: masking the gradients alone (sparsity 0 skips after_update; constrain_grads still
    # masks) lets AdamW's momentum and weight decay revive the pruned entries.
    grads_only = dataclasses.replace(cfg, sparsity=0.0)
    control = dataclasses.replace(snapshot, adapter=dataclasses.replace(snapshot.adapter, config=grads_only))
    control, _ = step(control, params, batch)
    revived = [np.any(np.asarray(d.a)[~masks[p][0]] != 0) for p, d in control.adapter.deltas.items()]
    assert all(revived)


# ----------------------------------------------------------------------------- export to PEFT


def test_peft_loads_the_exported_pruned_lora_with_exact_zeros_in_the_file(tmp_path):
    import peft
    import torch
    import transformers
    from safetensors.numpy import load_file

    from jaxsparse import models
    from jaxsparse.adapter_io import save_adapter
    from jaxsparse.cli.info import adapter_info, format_info

    config = transformers.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=16
    )
    torch.manual_seed(0)
    model = models.from_torch(transformers.DistilBertForMaskedLM(config))
    models.save_pretrained(model, tmp_path / "base")
    cfg = SparseLoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["q_lin", "v_lin"],
        sparsity=0.5,
        prune_schedule="one_shot",
        prune_end=1.0,
        total_steps=10,
    )
    adapter = _random_factors(init(model.params, cfg, jax.random.key(0)))
    adapter = cfg.after_update(adapter, jnp.asarray(10))
    save_adapter(adapter, tmp_path / "adapter", model=model)

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for path, d in adapter.deltas.items():
        module = path.removesuffix(".kernel")
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        np.testing.assert_array_equal(a == 0, ~np.asarray(d.a_mask).T)  # zero exactly where pruned
        np.testing.assert_array_equal(b == 0, ~np.asarray(d.b_mask).T)
        assert (a == 0).sum() == a.size // 2 and (b == 0).sum() == b.size // 2

    tm = peft.PeftModel.from_pretrained(
        transformers.DistilBertForMaskedLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    ids = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        ref = tm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    ours = np.asarray(
        model.apply_fn(delta_lib.apply(model.params, adapter), jnp.asarray(ids), jnp.asarray(mask))
    )
    plain = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    keep = mask.astype(bool)
    assert np.abs(ours[keep] - plain[keep]).max() > 1e-2  # the adapter matters
    assert np.abs(ours[keep] - ref[keep]).max() <= 1e-5

    # The card's count, stated the same way: 2 layers x 2 modules x r (in + out) = 2048 here.
    info = adapter_info(tmp_path / "adapter")
    assert info["trainable"] == 2 * 2 * 8 * (32 + 32) == 2048
    assert info["nonzero"] == 1024
    assert "non-zero:     1,024 of 2,048 factor entries (50.00% pruned)" in format_info(info)


def test_the_card_figure_147456_trainable_on_distilbert_shapes():
    """The card: r=8 on q_lin/v_lin of DistilBERT (6 layers, dim 768) trains 147,456 parameters."""
    params = {
        "distilbert": {
            "transformer": {
                "layer": {
                    str(i): {
                        "attention": {
                            n: {"kernel": jax.ShapeDtypeStruct((768, 768), jnp.float32)}
                            for n in ("q_lin", "k_lin", "v_lin", "out_lin")
                        }
                    }
                    for i in range(6)
                }
            }
        }
    }
    cfg = SparseLoraConfig(r=8, lora_alpha=16, target_modules=["q_lin", "v_lin"], total_steps=10)
    assert init(params, cfg, jax.random.key(0)).num_trainable() == 147_456


# ----------------------------------------------------------------------------- registry, bad input


@pytest.mark.parametrize(
    "path", ["configs/sparse_lora_minilm_mlm_bbc.yaml", "configs/sparse_lora_minilm_rotten_tomatoes.yaml"]
)
def test_configs_hold_the_cards_recipe(path):
    from jaxsparse import config as config_lib
    from jaxsparse import trainer

    assert "sparse_lora" in registry.names()
    cfg = config_lib.load_config(path, check_paths=False)
    method_cfg = trainer.method_config(cfg)
    assert isinstance(method_cfg, SparseLoraConfig)
    assert (method_cfg.r, method_cfg.lora_alpha, method_cfg.lora_dropout, method_cfg.sparsity) == (
        8,
        16,
        0.1,
        0.5,
    )
    assert method_cfg.total_steps == cfg.train.steps and method_cfg.target_modules == ("query", "value")
    assert (cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.batch_size) == (3e-4, 0.01, 16)
    assert (cfg.train.optimizer, cfg.train.schedule) == ("adamw", "linear")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"prune_start": -0.1}, r"prune_start must be a fraction of total_steps in \[0, 1\]"),
        ({"prune_end": 1.5}, r"prune_end must be a fraction of total_steps in \[0, 1\]"),
        ({"prune_start": 0.7, "prune_end": 0.6}, r"prune_start \(0.7\) is after prune_end \(0.6\)"),
        ({"prune_every": 0}, r"prune_every must be an int >= 1"),
        ({"prune_scope": "layer"}, r"prune_scope must be one of"),
        ({"prune_schedule": "linear"}, r"prune_schedule must be one of"),
        ({"total_steps": None}, r"total_steps is None"),
    ],
)
def test_bad_config_values_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        _config(**kw)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("adapter.sparsity=1.0", r"'adapter.sparsity' must be in \[0, 1\)"),
        ("adapter.sparsity=-0.5", r"'adapter.sparsity' must be in \[0, 1\)"),
        ("adapter.prune_start=1.2", r"'adapter.prune_start' must be a fraction of train.steps in \[0, 1\]"),
        ("adapter.prune_end=-1", r"'adapter.prune_end' must be a fraction of train.steps in \[0, 1\]"),
        ("adapter.prune_start=0.9", r"'adapter.prune_start' = 0.9 is after 'adapter.prune_end' = 0.6"),
        ("adapter.prune_scope=layer", r"'adapter.prune_scope' = 'layer' is not allowed"),
    ],
)
def test_cli_refuses_bad_pruning_keys_in_one_line(setting, message, capsys, tmp_path):
    from jaxsparse.cli import main

    code = main(
        [
            "train",
            "--config",
            "configs/sparse_lora_minilm_mlm_bbc.yaml",
            "--set",
            setting,
            "--set",
            f"output={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "run").exists()


def test_export_is_a_plain_peft_lora_config(tmp_path):
    from jaxsparse.convert.peft_lora import save_peft_lora

    cfg = _config(sparsity=0.5, prune_schedule="one_shot", prune_end=0.5)
    adapter = cfg.after_update(_random_factors(init(_params(), cfg, jax.random.key(0))), jnp.asarray(10))
    save_peft_lora(adapter, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 4 and raw["lora_dropout"] == 0.0
    assert not {"sparsity", "prune_schedule", "a_mask"} & set(raw)


# ----------------------------------------------------------------------------- through `jaxsparse train`


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    """A tiny DistilBertForMaskedLM directory with its BERT tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("sparse-lora-mlm")
    model_dir = write_tiny_distilbert_mlm(root)
    rng = np.random.default_rng(0)
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS, rng.integers(4, 12))) for _ in range(200)) + "\n")
    return model_dir, text


def _train_config(assets, output):
    from jaxsparse import config as config_lib

    model_dir, text = assets
    return config_lib.load_config(
        "configs/sparse_lora_minilm_mlm_bbc.yaml",
        [
            f"model.path={model_dir}",
            "data.source=text",
            f"data.path={text}",
            "data.max_length=16",
            "data.eval_size=0.2",
            "data.max_eval_examples=null",
            "adapter.target_modules=[q_lin,v_lin]",
            "adapter.prune_start=0.25",
            "adapter.prune_end=0.5",
            "adapter.prune_every=1",
            "train.steps=12",
            "train.batch_size=8",
            "train.learning_rate=0.05",
            "train.warmup_steps=0",
            "train.eval_every=12",
            "train.checkpoint_every=4",
            "train.progress=false",
            f"output={output}",
        ],
    )


def test_trainer_run_prunes_resumes_exactly_and_exports_zeros(tiny_mlm, tmp_path):
    """The card's recipe (dropout 0.1, 50% cubic pruning over steps 3..6) through the trainer on a
    tiny DistilBERT MLM: interrupted mid-window (step 5) and resumed, it ends with the adapter of the
    uninterrupted run bit for bit, masks included; the export holds exactly 50% zeros per factor and
    `jaxsparse info` counts them."""
    import os
    import signal

    from safetensors.numpy import load_file

    from jaxsparse import trainer
    from jaxsparse.cli.info import adapter_info

    reference = trainer.train(_train_config(tiny_mlm, tmp_path / "ref"), log=lambda msg: None)
    for d in reference.adapter.deltas.values():
        for m, w in ((d.a_mask, d.a), (d.b_mask, d.b)):
            assert (~np.asarray(m)).sum() == m.size // 2
            assert np.all(np.asarray(w)[~np.asarray(m)] == 0)

    def interrupt(step, loss):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = _train_config(tiny_mlm, tmp_path / "run")
    with pytest.raises(trainer.TrainingInterrupted):
        trainer.train(cfg, log=lambda msg: None, on_step=interrupt)
    resumed = trainer.train(cfg, log=lambda msg: None, resume=True)
    ref_leaves = jax.tree_util.tree_leaves_with_path(reference.adapter)
    res_leaves = jax.tree_util.tree_leaves_with_path(resumed.adapter)
    assert any("a_mask" in jax.tree_util.keystr(p) for p, _ in ref_leaves)
    for (p, a), (_, b) in zip(ref_leaves, res_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))

    tensors = load_file(os.path.join(reference.adapter_dir, "adapter_model.safetensors"))
    factors = {k: v for k, v in tensors.items() if ".lora_" in k}
    assert factors and all((v == 0).sum() == v.size // 2 for v in factors.values())
    info = adapter_info(reference.adapter_dir)
    assert info["nonzero"] * 2 == info["trainable"] == sum(v.size for v in factors.values())
