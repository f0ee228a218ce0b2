"""The training loop under faults, on the tiny stand-in model (seconds): a non-finite loss or
gradient (stop / skip with optax.apply_if_finite), a loss spike, a short run with the default
warm-up, resume semantics (each step logged once, time and segments summed over segments, the
config the checkpoint was written under), and a newest checkpoint that does not read back whole."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsparse import config as config_lib
from jaxsparse import trainer
from tests.test_trainer import (  # noqa: F401 - no_adapter_save is a fixture
    NEGATIVE,
    VOCAB,
    no_adapter_save,
    read_jsonl,
    tiny_classifier,
    tiny_config,
    write_tiny_assets,
)

UNK = VOCAB.index("[UNK]")
# The stand-in model has no on-disk format: every run records its final adapter instead.
pytestmark = pytest.mark.usefixtures("no_adapter_save")


def _quiet(msg: str) -> None:
    pass


def poisoned_classifier():
    """The stand-in model, whose logits are NaN for any example holding an unknown word: the
    batches that hold the one poisoned example get a NaN loss and gradient, the others do not."""
    model = tiny_classifier()
    clean = model.apply_fn

    def apply_fn(p, input_ids, attention_mask=None):
        logits = clean(p, input_ids, attention_mask)
        poisoned = (input_ids == UNK).any(axis=-1, keepdims=True)
        return logits * jnp.where(poisoned, jnp.nan, 1.0)  # NaN loss and NaN gradient

    return dataclasses.replace(model, apply_fn=apply_fn)


def poisoned_config(tmp_path, *extra: str) -> config_lib.Config:
    # A clean held-out file, and one training example with a word the vocabulary lacks (-> [UNK]).
    (tmp_path / "eval-data").mkdir()
    _, clean = write_tiny_assets(tmp_path / "eval-data", n=32, seed=1)
    cfg = tiny_config(
        tmp_path,
        "full",
        "train.steps=16",
        "train.checkpoint_every=2",
        f"data.eval_path={clean}",
        "seed=3",
        *extra,
    )
    with open(cfg.data.path, "a") as f:
        f.write(f"the movie was zzzz {NEGATIVE[0]},neg\n")
    return cfg


def _poisoned_steps(cfg) -> list[int]:
    """The steps whose batch holds the poisoned example (from the data order, independently)."""
    from jaxsparse import data as data_lib

    prepared = trainer.prepare(cfg, model=tiny_classifier())
    batches = data_lib.train_batches(prepared.train, cfg.train.batch_size, seed=cfg.seed, start_step=0)
    return [s for s in range(1, cfg.train.steps + 1) if (next(batches)["input_ids"] == UNK).any()]


def test_nonfinite_loss_stops_at_its_step_and_keeps_earlier_checkpoints(tmp_path):
    cfg = poisoned_config(tmp_path)
    bad = _poisoned_steps(cfg)
    assert bad and bad[0] > 2, bad  # a checkpoint is written before the first poisoned step
    with pytest.raises(trainer.TrainingDiverged) as info:
        trainer.train(cfg, model=poisoned_classifier(), log=_quiet)
    err = info.value
    message = str(err)
    assert err.step == bad[0] and f"loss became nan (gradient norm nan) at step {bad[0]}" in message
    last = max(s for s in range(2, bad[0], 2))
    assert err.last_checkpoint == last
    assert f"the last good checkpoint is step {last}" in message and "on_nonfinite=skip" in message
    assert "\n" not in message
    ckpts = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts[-1] == last and bad[0] not in ckpts
    assert not (tmp_path / "run" / "adapter").exists()


def test_skip_uses_apply_if_finite_counts_and_matches_a_run_without_those_batches(tmp_path):
    cfg = poisoned_config(
        tmp_path, "train.on_nonfinite=skip", "train.optimizer=sgd", "train.max_grad_norm=null"
    )
    bad = _poisoned_steps(cfg)
    result = trainer.train(cfg, model=poisoned_classifier(), log=_quiet)
    assert result.skipped_steps == len(bad) >= 1
    assert any(str(len(bad)) in w and "skipped" in w for w in result.warnings)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["skipped_steps"] == len(bad)
    train_records = [r for r in read_jsonl(result.metrics_path) if r["split"] == "train"]
    assert train_records[-1]["skipped_steps"] == len(bad)
    assert all(np.isfinite(r["loss"]) for r in train_records)
    # The oracle: plain SGD on every batch but the poisoned ones: apply_if_finite leaves the
    # parameters and the optimizer state (so the schedule's count) as they were.
    from jaxsparse import data as data_lib
    from jaxsparse import train as train_lib

    model = tiny_classifier()
    prepared = trainer.prepare(cfg, model=model)
    opt = optax.sgd(optax.linear_schedule(cfg.train.learning_rate, 0.0, cfg.train.steps))
    step_fn = train_lib.make_train_step(trainer.model_fn(model), trainer.train_loss_fn("seq_cls"), opt)
    state = train_lib.init_train_state(prepared.adapter, opt, cfg.seed)
    batches = data_lib.train_batches(prepared.train, cfg.train.batch_size, seed=cfg.seed, start_step=0)
    for s in range(1, cfg.train.steps + 1):
        batch = next(batches)
        if s not in bad:
            state, _ = step_fn(state, model.params, batch)
    for a, b in zip(jax.tree.leaves(state.adapter), jax.tree.leaves(result.adapter), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_skip_stops_after_max_consecutive_skips(tmp_path):
    cfg = tiny_config(tmp_path, "full", "train.on_nonfinite=skip", "train.max_consecutive_skips=3")
    model = tiny_classifier()
    clean = model.apply_fn
    model = dataclasses.replace(model, apply_fn=lambda p, i, m=None: clean(p, i, m) * jnp.nan)
    with pytest.raises(trainer.TrainingDiverged, match=r"3 steps in a row skipped .* at step 3;"):
        trainer.train(cfg, model=model, log=_quiet)


def test_loss_spike_guard_stops_and_the_diverged_warning(tmp_path):
    # learning_rate 1e8: finite losses of ~1e8 (the silent run). Default: finishes with a warning.
    cfg = tiny_config(tmp_path, "full", "train.learning_rate=1e8", "train.steps=6")
    logged = []
    result = trainer.train(cfg, model=tiny_classifier(), log=logged.append)
    assert result.final["loss"] > 10 * result.initial["loss"]
    (warning,) = [m for m in logged if m.startswith("warning:")]
    assert "training diverged" in warning and "learning_rate (now 1e+08)" in warning
    assert json.loads((tmp_path / "run" / "results.json").read_text())["warnings"] == [warning[9:]]
    # With the guard, the run stops at the first spike.
    spiky = config_lib.Config(
        **{
            **vars(cfg),
            "output": str(tmp_path / "spiky"),
            "train": dataclasses.replace(cfg.train, loss_spike_factor=10.0),
        }
    )
    with pytest.raises(trainer.TrainingDiverged, match="times the running median") as info:
        trainer.train(spiky, model=tiny_classifier(), log=_quiet)
    assert info.value.step == 2


def test_short_runs_with_the_default_warmup(tmp_path):
    for steps in (1, 2):
        (tmp_path / str(steps)).mkdir()
        cfg = tiny_config(tmp_path / str(steps), "full", f"train.steps={steps}", "train.warmup_steps=null")
        assert cfg.train.warmup_steps is None and config_lib.warmup_steps(cfg.train) == 0
        result = trainer.train(cfg, model=tiny_classifier(), log=_quiet)
        assert result.steps == steps and np.isfinite(result.final["loss"])


def test_warmup_ratio_closed_form():
    assert config_lib.warmup_steps(config_lib.TrainConfig(steps=120)) == 10  # round(9.6)
    assert config_lib.warmup_steps(config_lib.TrainConfig(steps=1000, warmup_ratio=0.1)) == 100
    assert config_lib.warmup_steps(config_lib.TrainConfig(steps=5, warmup_steps=4)) == 4
    opt = trainer.make_optimizer(
        config_lib.TrainConfig(
            steps=25, learning_rate=1.0, optimizer="sgd", schedule="constant", max_grad_norm=None
        )
    )
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    lrs = []
    for _ in range(4):
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(updates["w"]))
    np.testing.assert_allclose(lrs, [0.0, 0.5, 1.0, 1.0])  # warm-up round(0.08 * 25) = 2 steps


def _interrupt_at(step_to_stop: int):
    def on_step(step, loss):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


def test_resume_logs_each_step_once_and_sums_time_over_segments(tmp_path):
    # log_every 2, checkpoint_every 4, interrupted at 5: the open log window (step 5) is carried in
    # the checkpoint, so the resumed run logs exactly the uninterrupted run's records.
    cfg = tiny_config(tmp_path, "full", "train.log_every=3")
    reference = trainer.train(cfg, model=tiny_classifier(), log=_quiet)
    other = config_lib.Config(**{**vars(cfg), "output": str(tmp_path / "interrupted")})
    with pytest.raises(trainer.TrainingInterrupted):
        trainer.train(other, model=tiny_classifier(), log=_quiet, on_step=_interrupt_at(5))
    with pytest.raises(trainer.TrainingInterrupted):
        trainer.train(other, model=tiny_classifier(), log=_quiet, on_step=_interrupt_at(8), resume=True)
    resumed = trainer.train(other, model=tiny_classifier(), log=_quiet, resume=True)
    assert read_jsonl(resumed.metrics_path) == read_jsonl(reference.metrics_path)
    results = json.loads((tmp_path / "interrupted" / "results.json").read_text())
    assert results["segments"] == resumed.segments == 3
    assert results["seconds"] == resumed.seconds > 0
    # Resuming a run that had finished (say, killed while writing its adapter) logs its final
    # evaluation once, not twice.
    again = trainer.train(other, model=tiny_classifier(), log=_quiet, resume=True)
    assert read_jsonl(again.metrics_path) == read_jsonl(reference.metrics_path)
    assert again.segments == 4


def test_resume_refuses_another_config_unless_forced_and_reads_the_checkpoint_record(
    tmp_path,
):
    cfg = tiny_config(tmp_path, "full", "train.steps=4")
    trainer.train(cfg, model=tiny_classifier(), log=_quiet)
    changed = config_lib.Config(**{**vars(cfg), "seed": 1})
    with pytest.raises(config_lib.ConfigError, match=r"at \['seed'\]; .*--force"):
        trainer.train(changed, model=tiny_classifier(), log=_quiet, resume=True)
    # Without config.yaml, the checkpoint's own record of its config says the same.
    os.unlink(tmp_path / "run" / "config.yaml")
    with pytest.raises(config_lib.ConfigError, match=r"checkpoints step 4 at \['seed'\]"):
        trainer.train(changed, model=tiny_classifier(), log=_quiet, resume=True)
    logged = []
    trainer.train(changed, model=tiny_classifier(), log=logged.append, resume=True, force=True)
    assert any("--resume --force" in m and "['seed']" in m for m in logged)
    # steps: refused under a schedule that depends on them
    longer = config_lib.Config(**{**vars(cfg), "train": dataclasses.replace(cfg.train, steps=8)})
    with pytest.raises(config_lib.ConfigError, match=r"train\.steps"):
        trainer.train(longer, model=tiny_classifier(), log=_quiet, resume=True)


def test_resume_without_a_checkpoint_is_an_error_naming_the_directory(tmp_path):
    for out in (tmp_path / "new", tmp_path):
        with pytest.raises(config_lib.ConfigError, match=f"no checkpoint to resume from in '{out}'"):
            trainer.check_output(out, resume=True)


def _truncate_data_files(step_dir) -> None:
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.sep + "d" + os.sep in path + os.sep and os.path.getsize(path) > 0:
                os.truncate(path, os.path.getsize(path) // 2)


def _tree_bytes(directory) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_resume_skips_a_corrupt_newest_checkpoint_and_never_deletes_it(tmp_path):
    cfg = tiny_config(tmp_path, "full", "train.checkpoint_every=2", "train.keep_checkpoints=10")
    reference = trainer.train(cfg, model=tiny_classifier(), log=_quiet)
    other = config_lib.Config(**{**vars(cfg), "output": str(tmp_path / "faulty")})
    with pytest.raises(trainer.TrainingInterrupted):
        trainer.train(other, model=tiny_classifier(), log=_quiet, on_step=_interrupt_at(6))
    ckpt_dir = tmp_path / "faulty" / "checkpoints"
    _truncate_data_files(ckpt_dir / "6")  # a storage fault in the newest checkpoint
    before = _tree_bytes(ckpt_dir)
    logged = []
    resumed = trainer.train(other, model=tiny_classifier(), log=logged.append, resume=True)
    (skip,) = [m for m in logged if "skipped checkpoint" in m]
    assert f"skipped checkpoint step 6 in {ckpt_dir}" in skip and "left on disk" in skip
    assert "resumed from step 4" in " ".join(logged)
    after = _tree_bytes(ckpt_dir)
    for name, data in before.items():
        if name.startswith(("2/", "4/", "6/")):
            assert after[name] == data, name  # the damaged one and the older ones, byte for byte
    for a, b in zip(jax.tree.leaves(reference.adapter), jax.tree.leaves(resumed.adapter), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # When none reads back: one line naming each, and nothing is changed.
    for step in (2, 4, 8, 10, 12):
        if (ckpt_dir / str(step)).is_dir():
            _truncate_data_files(ckpt_dir / str(step))
    before = _tree_bytes(ckpt_dir)
    from jaxsparse.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="reads back whole") as info:
        trainer.train(other, model=tiny_classifier(), log=_quiet, resume=True)
    assert "\n" not in str(info.value)
    assert _tree_bytes(ckpt_dir) == before


def test_preemption_sync_point_checkpoints_the_step_and_stops(tmp_path, monkeypatch):
    # On a jax.distributed run the preemption service names the step every process stops at.
    assert trainer._reached_preemption_sync_point(3) is False  # one process: never
    monkeypatch.setattr(trainer, "_reached_preemption_sync_point", lambda step: step == 3)
    cfg = tiny_config(tmp_path, "full")
    with pytest.raises(trainer.TrainingInterrupted) as info:
        trainer.train(cfg, model=tiny_classifier(), log=_quiet)
    assert info.value.step == 3
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [3]
