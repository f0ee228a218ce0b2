"""The trainer features SpaRTA's authors' ``SFT_Config`` users rely on: ``train.lr_min``, early
stopping (``train.patience``/``min_delta``, best adapter kept, resume-safe), bfloat16 mixed
precision (``train.precision``), gradient checkpointing (``train.remat``) and attention dropout
(``train.attention_dropout``), on tiny random models built from transformers configs (seconds).

Runs are shared between tests through module-scoped fixtures (:func:`es_resume_runs`: early
stopping and remat across a resume; :func:`llama_runs`: bfloat16 end to end and attention
dropout); the other runs skip the checkpoints they do not read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxsparse import config as config_lib
from jaxsparse import delta as delta_lib
from jaxsparse import models, trainer
from jaxsparse import train as train_lib
from jaxsparse.methods import registry
from jaxsparse.models import layers
from tests.test_trainer import (
    VOCAB,
    _quiet,
    read_jsonl,
    tiny_classifier,
    tiny_config,
    tiny_overrides,
    write_tiny_assets,
)


@pytest.fixture
def no_adapter_save(monkeypatch):
    """Record the final adapter instead of writing it (the stand-in model has no on-disk format)."""
    saved = {}

    def fake_save(adapter, directory, prepared, cfg):
        directory.mkdir(parents=True, exist_ok=True)
        saved["adapter"] = adapter
        return str(directory)

    monkeypatch.setattr(trainer, "save_final_adapter", fake_save)
    return saved


def tiny_llama(task: str = "seq_cls", seed: int = 0, **config: float) -> models.Model:
    """A 2-layer Llama (grouped-query attention) over the tiny BERT vocabulary (pad id 0)."""
    cfg = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
        num_labels=2,
        **config,
    )
    return models.init_params(cfg, task=task, seed=seed)


def tiny_bert(task: str = "seq_cls", seed: int = 0) -> models.Model:
    cfg = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return models.init_params(cfg, task=task, seed=seed)


LLAMA_SPARTA = [
    "method=sparta",
    "adapter.target_modules=[v_proj,o_proj]",
    "adapter.modules_to_save=[score]",
]


def llama_config(tmp_path, *extra: str) -> config_lib.Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    model_dir, data = write_tiny_assets(tmp_path)
    return config_lib.load_config(
        None, [*tiny_overrides(tmp_path, model_dir, data, "sparta"), *LLAMA_SPARTA, *extra]
    )


def batch_of(prepared: trainer.Prepared, n: int = 8) -> dict[str, jnp.ndarray]:
    return {k: jnp.asarray(v[:n]) for k, v in prepared.train.items()}


def sparta_adapter(params, density: float = 0.3, seed: int = 0) -> delta_lib.Adapter:
    """A SpaRTA adapter with random non-zero values (so the gradients see a real delta)."""
    method = registry.get("sparta")
    targets = r".*(v_proj|o_proj|value|output\.dense)"  # Llama's or BERT's
    config = method.config_class(density=density, target_modules=targets)
    adapter = method.init(params, config, jax.random.key(seed))
    leaves = delta_lib.trainable(adapter)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(leaves))))
    noisy = jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), leaves)
    return delta_lib.with_trainable(adapter, noisy)


def loss_and_grads(model, adapter, batch, *, remat: bool, rng=None):
    takes_rng = rng is not None
    f = train_lib.value_and_grad(
        trainer.model_fn(model, dropout=takes_rng, remat=remat),
        trainer.train_loss_fn("seq_cls"),
        takes_rng=takes_rng,
        factored=True,
    )
    (loss, _), grads = jax.jit(f)(adapter, model.params, batch, rng)
    return float(loss), grads


# ----------------------------------------------------------------------------- lr_min


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_min_matches_the_sparta_authors_scheduler_after_warmup(schedule):
    """Our schedule against peft_sparta's own ``build_lr_scheduler`` (torch LambdaLR), step by step,
    after the warm-up (theirs warms up from lr_min, ours from 0, as before)."""
    torch = pytest.importorskip("torch")
    optim = pytest.importorskip("peft_sparta.trainer.sft.optim")
    steps, warmup, peak, floor = 20, 4, 1e-3, 2e-4
    t = config_lib.TrainConfig(
        steps=steps, warmup_steps=warmup, learning_rate=peak, lr_min=floor, schedule=schedule
    )
    ours = trainer.learning_rate(t)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    theirs = optim.build_lr_scheduler(
        opt,
        {"lr": peak, "lr_min": floor, "warmup_steps": warmup, "num_epochs": 1, "lr_scheduler_type": schedule},
        steps_per_epoch=steps,
    )
    for i in range(steps + 1):
        if i >= warmup:
            assert float(ours(i)) == pytest.approx(theirs.get_last_lr()[0], rel=1e-5), i
        opt.step()
        theirs.step()
    assert float(ours(steps)) == pytest.approx(floor, rel=1e-6)


def test_lr_min_floors_the_updates_and_the_head_at_its_fraction():
    t = config_lib.TrainConfig(
        steps=4,
        warmup_steps=0,
        learning_rate=1.0,
        head_learning_rate=0.5,
        lr_min=0.2,
        optimizer="sgd",
        schedule="linear",
        max_grad_norm=None,
    )
    opt = trainer.make_optimizer(t)
    params = {"deltas": {"w": {"values": jnp.zeros(())}}, "dense": {"h": jnp.zeros(())}}
    grads = {"deltas": {"w": {"values": jnp.ones(())}}, "dense": {"h": jnp.ones(())}}
    state = opt.init(params)
    deltas, heads = [], []
    for _ in range(5):
        updates, state = opt.update(grads, state, params)
        deltas.append(-float(updates["deltas"]["w"]["values"]))
        heads.append(-float(updates["dense"]["h"]))
    # 1 -> 0.2 linearly over 4 steps, then held at the floor; the head at half of that
    np.testing.assert_allclose(deltas, [1.0, 0.8, 0.6, 0.4, 0.2], atol=1e-6)
    np.testing.assert_allclose(heads, [0.5, 0.4, 0.3, 0.2, 0.1], atol=1e-6)


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_keeps_the_best_adapter_and_says_where_it_came_from(tmp_path, no_adapter_save):
    # No evaluation can beat the one before training by more than min_delta = 10: the run stops at
    # its first evaluation after `patience` = 1, and the adapter saved is the untrained one (step 0).
    cfg = tiny_config(
        tmp_path,
        "full",
        "train.patience=1",
        "train.min_delta=10",
        "train.steps=30",
        "train.checkpoint_every=100",
    )
    model = tiny_classifier()
    result = trainer.train(cfg, model=model, log=_quiet)
    assert (result.stopped_at, result.best_step, result.steps) == (6, 0, 6)
    for path, leaf in no_adapter_save["adapter"].dense.items():
        want = model.params
        for part in path.split("."):
            want = want[part]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))
    assert result.final == result.initial
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["early_stopping"]["best_step"] == 0 and summary["early_stopping"]["stopped_at"] == 6
    assert summary["steps"] == 6 and summary["early_stopping"]["last"]["loss"] < result.initial["loss"]
    records = read_jsonl(result.metrics_path)
    assert max(r["step"] for r in records) == 6
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 6]


def test_without_a_stop_the_saved_adapter_is_the_one_with_the_lowest_held_out_loss(tmp_path, no_adapter_save):
    # A learning rate high enough that the held-out loss goes up again: the best is not the last.
    cfg = tiny_config(
        tmp_path,
        "full",
        "train.patience=100",
        "train.steps=12",
        "train.eval_every=2",
        "train.learning_rate=3",
        "train.checkpoint_every=100",
    )
    result = trainer.train(cfg, model=tiny_classifier(), log=_quiet)
    evals = [r for r in read_jsonl(result.metrics_path) if r["split"] == "eval"]
    best = min(evals, key=lambda r: r["loss"])
    assert result.stopped_at is None and result.best_step == best["step"] != evals[-1]["step"]
    assert result.final["loss"] == best["loss"]
    # the saved adapter evaluates to the best record (an independent evaluation of what was saved)
    prepared = trainer.prepare(cfg, model=tiny_classifier())
    step = trainer.make_eval_step(prepared.model, "seq_cls")
    again = trainer.evaluate(
        step, no_adapter_save["adapter"], prepared.model.params, prepared.eval, "seq_cls", 16, 2
    )
    assert again["loss"] == pytest.approx(best["loss"], rel=1e-6)


@pytest.fixture(scope="module")
def es_resume_runs(tmp_path_factory):
    """An early-stopping run, and the same run interrupted (SIGINT) after its best evaluation and
    resumed. The interrupted segment runs with ``train.remat: false``, the resumed one with
    ``true``, without ``--force`` (the stand-in classifier has no blocks to checkpoint, so the
    two runs stay bit-identical). Shared by the early-stopping and the remat resume tests."""
    tmp = tmp_path_factory.mktemp("es_resume")
    saved = []

    def fake_save(adapter, directory, prepared, cfg):
        directory.mkdir(parents=True, exist_ok=True)
        saved.append(adapter)
        return str(directory)

    extra = ("train.patience=2", "train.min_delta=0.02", "train.steps=60", "train.eval_every=3")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "save_final_adapter", fake_save)
        cfg = tiny_config(tmp, "full", *extra)
        reference = trainer.train(cfg, model=tiny_classifier(), log=_quiet)
        assert reference.stopped_at is not None and reference.best_step not in (None, reference.stopped_at)
        other = config_lib.Config(
            **{
                **vars(cfg),
                "output": str(tmp / "interrupted"),
                "train": dataclasses.replace(cfg.train, remat=False),
            }
        )
        cut = reference.best_step + 1  # after the best evaluation, before the stop

        def interrupt(step, loss):
            if step == cut:
                os.kill(os.getpid(), signal.SIGINT)

        with pytest.raises(trainer.TrainingInterrupted):
            trainer.train(other, model=tiny_classifier(), log=_quiet, on_step=interrupt)
        resumed_cfg = dataclasses.replace(other, train=dataclasses.replace(other.train, remat=True))
        logged: list[str] = []
        resumed = trainer.train(resumed_cfg, model=tiny_classifier(), log=logged.append, resume=True)
    assert len(saved) == 2  # the interrupted segment saved no adapter
    return {
        "reference": reference,
        "reference_adapter": saved[0],
        "resumed": resumed,
        "resumed_adapter": saved[1],
        "resumed_log": logged,
        "cut": cut,
    }


def test_early_stopping_resumes_to_the_same_stop_and_best_adapter(es_resume_runs):
    reference, resumed = es_resume_runs["reference"], es_resume_runs["resumed"]
    assert (resumed.stopped_at, resumed.best_step, resumed.final) == (
        reference.stopped_at,
        reference.best_step,
        reference.final,
    )
    for a, b in zip(
        jax.tree.leaves(es_resume_runs["reference_adapter"]),
        jax.tree.leaves(es_resume_runs["resumed_adapter"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [(r["split"], r["step"]) for r in read_jsonl(resumed.metrics_path)]
    assert steps == [(r["split"], r["step"]) for r in read_jsonl(reference.metrics_path)]


def test_remat_may_change_on_resume(es_resume_runs):
    # remat recomputes activations instead of keeping them (same loss and gradients, see
    # test_remat_gives_the_same_loss_and_gradients): resuming with it switched is no config change.
    logged = es_resume_runs["resumed_log"]
    assert any(f"resumed from step {es_resume_runs['cut']}" in line for line in logged)
    assert not any("--force" in line for line in logged)  # accepted, not forced
    # a key that decides the result is still refused, and remat is not named among the changes
    out = Path(es_resume_runs["resumed"].metrics_path).parent
    cfg = config_lib.load_config(out / "config.yaml", check_paths=False)
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, remat=False, min_delta=0.5))
    with pytest.raises(config_lib.ConfigError, match=r"at \['train.min_delta'\];"):
        trainer.train(changed, model=tiny_classifier(), log=_quiet, resume=True)


def test_a_checkpoint_from_before_a_new_key_resumes_at_its_default():
    now = json.loads(json.dumps(trainer.config_record(config_lib.Config()), default=str))
    saved = {k: v for k, v in now.items() if not k.startswith("train.patience")}
    assert trainer._differing(saved, now) == []
    changed = {**now, "train.patience": 3}
    assert trainer._differing(saved, changed) == ["train.patience"]
    # remat recomputes the same activations: a run may resume with it switched either way
    assert trainer._differing(now, {**now, "train.remat": True}) == []
    # so does the sampled-product threshold (the same gradient, summed another way), e.g. 0.03 -> "auto"
    assert trainer._differing({**now, "train.sampled_grad_max_density": 0.03}, now) == []


# ----------------------------------------------------------------------------- bfloat16


def test_bf16_loss_is_close_to_fp32_and_the_trained_state_stays_float32(tmp_path):
    losses, states = {}, {}
    base_cfg = llama_config(tmp_path)
    prepared = trainer.prepare(base_cfg, model=tiny_llama())  # precision plays no part in prepare
    for precision in ("float32", "bfloat16"):
        cfg = dataclasses.replace(base_cfg, train=dataclasses.replace(base_cfg.train, precision=precision))
        model = trainer.training_model(cfg, prepared.model)
        adapter = sparta_adapter(prepared.model.params)
        if precision == "bfloat16":
            adapter = trainer.float32_trainable(adapter)
        optimizer = trainer.make_optimizer(cfg.train)
        state = train_lib.init_train_state(adapter, optimizer, 0)
        step, _ = trainer.make_steps(cfg, prepared, optimizer, model.params, model=model)
        history = []
        for _ in range(3):
            state, metrics = step(state, model.params, batch_of(prepared))
            history.append(float(metrics["loss"]))
        losses[precision], states[precision] = history, state
        compute = {x.dtype for x in jax.tree.leaves(model.params)}
        assert compute == {jnp.dtype(precision)}  # the base is held in the compute dtype
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
    assert losses["bfloat16"] != losses["float32"]  # it did compute in bfloat16
    for tree in (delta_lib.trainable(states["bfloat16"].adapter), states["bfloat16"].opt_state):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}


def test_bf16_run_end_to_end_writes_a_float32_adapter(llama_runs):
    result = llama_runs["off"]  # bfloat16 with remat, 12 steps
    leaves = jax.tree.leaves(delta_lib.trainable(result.adapter))
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
    assert result.final["loss"] < result.initial["loss"]
    assert os.path.isdir(result.adapter_dir)


# ----------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize(
    ("arch", "mode"), [("llama", True), ("bert", True), ("llama", "dots"), ("bert", "dots")]
)
def test_remat_gives_the_same_loss_and_gradients(tmp_path, arch, mode):
    # BERT with its dropout on: the recomputed blocks draw the same masks. The key is an "rbg" one:
    # the masks are a function of the key whatever its kind, and threefry's random bits at BERT's
    # five dropout sites per block would take most of this file's compile time.
    model = tiny_llama() if arch == "llama" else tiny_bert()
    cfg = tiny_config(tmp_path)
    prepared = trainer.prepare(cfg, model=model)
    batch = batch_of(prepared)
    adapter = sparta_adapter(model.params)
    rng = jax.random.key(3, impl="rbg") if arch == "bert" else None
    plain = loss_and_grads(model, adapter, batch, remat=False, rng=rng)
    remat = loss_and_grads(model, adapter, batch, remat=mode, rng=rng)
    assert remat[0] == pytest.approx(plain[0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1]), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    # and the blocks really are checkpointed (one remat per transformer block)
    f = train_lib.value_and_grad(
        trainer.model_fn(model, remat=mode), trainer.train_loss_fn("seq_cls"), factored=True
    )
    jaxpr = str(jax.make_jaxpr(f)(adapter, model.params, batch))
    assert jaxpr.count("remat") >= 2
    # "dots" names its policy in the checkpoint primitive; the full one saves nothing
    assert ("policy=DotsSaveable" in jaxpr) == (mode == "dots")


def test_remat_defaults_to_dots_and_refuses_an_unknown_mode(tmp_path):
    assert config_lib.Config().train.remat == "dots"
    assert set(layers.REMAT_POLICIES) == {m for m in config_lib.REMATS if isinstance(m, str)}
    with pytest.raises(config_lib.ConfigError, match=r"'train.remat' = 'everything' is not allowed"):
        tiny_config(tmp_path, "full", "train.remat=everything")
    with (
        pytest.raises(
            ValueError, match=r"remat must be true, false or one of \['dots', 'full'\], got 'some'"
        ),
        layers.remat_blocks("some"),
    ):
        pass


# ----------------------------------------------------------------------------- attention dropout


def test_llama_attention_dropout_is_keyed_and_off_without_a_key():
    ids, mask = jnp.array([[3, 5, 7, 9, 11, 2]]), jnp.ones((1, 6), int)
    model = tiny_llama(task="causal_lm", attention_dropout=0.5)
    plain = model(ids, mask)
    np.testing.assert_array_equal(model(ids, mask, dropout_rng=None), plain)
    a = model(ids, mask, dropout_rng=jax.random.key(0))
    np.testing.assert_array_equal(model(ids, mask, dropout_rng=jax.random.key(0)), a)
    assert np.abs(np.asarray(a - plain)).max() > 1e-3
    # rate 0 (the config default): a key changes nothing
    zero = tiny_llama(task="causal_lm")
    np.testing.assert_array_equal(zero(ids, mask, dropout_rng=jax.random.key(0)), zero(ids, mask))


def test_attention_dropout_overrides_the_config_rate_and_alone_turns_the_others_off(tmp_path):
    bert = tiny_bert()
    cfg = tiny_config(tmp_path, "full", "train.attention_dropout=0.3")
    config = trainer.training_model(cfg, bert).config
    assert config.attention_probs_dropout_prob == 0.3 and config.hidden_dropout_prob == 0.0
    assert bert.config.attention_probs_dropout_prob == 0.1  # the loaded model is untouched
    both = trainer.training_model(
        config_lib.Config(
            **{**vars(cfg), "train": config_lib.TrainConfig(dropout=True, attention_dropout=0.3)}
        ),
        bert,
    ).config
    assert both.attention_probs_dropout_prob == 0.3 and both.hidden_dropout_prob == 0.1
    assert trainer.training_model(config_lib.Config(), bert) is bert


def trainable_vector(adapter: delta_lib.Adapter) -> np.ndarray:
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(delta_lib.trainable(adapter))])


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
    """Three tiny Llama runs in bfloat16 with gradient checkpointing, shared by the bf16 end-to-end
    and the attention-dropout tests: ``dropout`` and ``dropout_again`` (attention dropout 0.5, the
    same config twice) and ``off`` (without attention dropout)."""
    root = tmp_path_factory.mktemp("llama_runs")
    common = (
        "train.precision=bfloat16",
        "train.remat=true",
        "train.steps=12",
        "train.learning_rate=0.01",
        "train.checkpoint_every=100",
        "train.eval_every=100",
    )
    return {
        name: trainer.train(llama_config(root / name, *common, *extra), model=tiny_llama(), log=_quiet)
        for name, extra in [
            ("dropout", ["train.attention_dropout=0.5"]),
            ("dropout_again", ["train.attention_dropout=0.5"]),
            ("off", []),
        ]
    }


def test_attention_dropout_trains_a_llama_reproducibly(llama_runs):
    a = trainable_vector(llama_runs["dropout"].adapter)
    np.testing.assert_array_equal(trainable_vector(llama_runs["dropout_again"].adapter), a)
    assert np.abs(a - trainable_vector(llama_runs["off"].adapter)).max() > 1e-6


def test_attention_dropout_on_a_model_without_dropout_is_a_config_error(tmp_path, no_adapter_save):
    cfg = tiny_config(tmp_path, "full", "train.attention_dropout=0.1")
    with pytest.raises(config_lib.ConfigError, match=r"'train.attention_dropout' = 0.1: model_type 'tiny'"):
        trainer.train(cfg, model=tiny_classifier(), log=_quiet)


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr_min=-1e-5", r"'train.lr_min' must be in \[0, train.learning_rate"),
        ("train.lr_min=1", r"'train.lr_min' must be in \[0, train.learning_rate = 0.003\], got 1"),
        ("train.patience=0", r"'train.patience' must be >= 1"),
        ("train.patience=two", r"'train.patience' must be int \| null"),
        ("train.min_delta=-0.1", r"'train.min_delta' must be >= 0"),
        (
            "train.precision=bf16",
            r"'train.precision' = 'bf16' is not allowed; allowed values: \['float32', 'bfloat16'\]",
        ),
        (
            "train.remat=yes please",
            r"'train.remat' = 'yes please' is not allowed; allowed values: \[False, True, 'full', 'dots'\]",
        ),
        ("train.remat=3", r"'train.remat' must be bool \| str"),
        ("train.attention_dropout=1", r"'train.attention_dropout' must be in \[0, 1\) or null"),
    ],
)
def test_bad_values_are_one_clear_config_error(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load_config(None, [override], check_paths=False)
