"""Rank-sparse LoRA from the command line on a tiny Llama: `jaxsparse train` with method
rank_sparse_lora writes a PEFT LoRA plus its accumulated importance, `jaxsparse export --retain-ratio`
writes the rank-reduced PEFT LoRA that PEFT loads with our logits, and bad input is one line on
stderr, exit 2, nothing written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers

from jaxsparse.cli import main
from tests.cli.tiny_llama import TEXT, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train_settings(base, text):
    return [
        "--set", "method=rank_sparse_lora",
        "--set", "task=causal_lm",
        "--set", f"model.path={base}",
        "--set", "data.source=text",
        "--set", f"data.path={text}",
        "--set", "data.max_length=16",
        "--set", "data.eval_size=0.2",
        "--set", "adapter.r=32",
        "--set", "adapter.lora_alpha=8",
        "--set", "adapter.lora_dropout=0.05",
        "--set", "adapter.target_density=0.125",
        "--set", "adapter.importance_lambda=0.15",
        "--set", "adapter.modules_to_save=null",
        "--set", "train.steps=4",
        "--set", "train.batch_size=2",
        "--set", "train.eval_batch_size=4",
        "--set", "train.warmup_steps=0",
        "--set", "train.eval_every=4",
        "--set", "train.log_every=2",
        "--set", "train.checkpoint_every=4",
        "--set", "train.progress=false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("rs-llama")
    base = root / "base"
    tiny_llama(base).save_pretrained(base)
    text = root / "train.txt"
    text.write_text("\n".join(TEXT.split(" and ")))
    return base, text


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    base, text = tiny_base
    run = tmp_path_factory.mktemp("rs-run") / "run"
    assert main(["train", *_train_settings(base, text), "--output", str(run)]) == 0
    return base, run / "adapter"


def test_interrupted_run_resumes_to_the_same_importance(tiny_base, tmp_path):
    """Ctrl-C after step 2 checkpoints; --resume ends bit-identical to an uninterrupted run, importance
    included (it is training state, not recomputed)."""
    import os
    import signal

    import jax

    from jaxsparse import config as config_lib
    from jaxsparse import trainer

    base, text = tiny_base
    overrides = [v for v in _train_settings(base, text) if v != "--set"]

    def run(name, **kw):
        cfg = config_lib.load_config(None, [*overrides, f"output={tmp_path / name}"])
        return trainer.train(cfg, log=lambda msg: None, **kw)

    reference = run("straight")

    def interrupt(step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(trainer.TrainingInterrupted):
        run("interrupted", on_step=interrupt)
    resumed = run("interrupted", resume=True)
    leaves = [jax.tree.leaves(r.adapter) for r in (reference, resumed)]
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    d = next(iter(resumed.adapter.deltas.values()))
    assert float(np.asarray(d.importance).sum()) == pytest.approx(1.0, abs=1e-4)


def _one_line(capsys, verb):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jaxsparse {verb}: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_train_writes_peft_lora_and_the_importance(trained, capsys):
    from jaxsparse.methods import rank_sparse_lora as rsl

    _, adapter = trained
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 32 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    importance = rsl.read_importance(adapter)
    assert len(importance) == 2 * len(TARGETS)
    for module, value in importance.items():
        assert value.shape == (32,) and abs(float(value.sum()) - 1.0) < 1e-4, module
    assert main(["info", str(adapter)]) == 0
    capsys.readouterr()


def test_export_retain_ratio_gives_a_peft_lora_with_our_logits(trained, tmp_path, capsys):
    import jax.numpy as jnp

    from jaxsparse import delta as delta_lib
    from jaxsparse.adapter_io import load_adapter
    from jaxsparse.methods import rank_sparse_lora as rsl
    from jaxsparse.models import from_pretrained

    base, adapter = trained
    out = tmp_path / "pruned"
    cmd = [
        "export",
        "--adapter",
        str(adapter),
        "--format",
        "peft",
        "--retain-ratio",
        "0.15",
        "--output",
        str(out),
    ]
    assert main(cmd) == 0
    printed = capsys.readouterr().out
    assert "LoRA values, adapter_model.safetensors" in printed and "->" in printed
    raw = json.loads((out / "adapter_config.json").read_text())
    keep = math.ceil(0.15 * 32)
    assert (
        raw["r"] == keep and raw["lora_alpha"] == pytest.approx(keep * 8 / 32) and raw["rank_pattern"] == {}
    )
    full_size = (adapter / "adapter_model.safetensors").stat().st_size
    assert (out / "adapter_model.safetensors").stat().st_size < full_size / 4

    ours = from_pretrained(str(base), task="causal_lm")
    full = load_adapter(adapter, model=ours)
    importance = rsl.read_importance(adapter)
    masked = {}
    for p, d in full.deltas.items():
        top = np.argsort(-importance[p.removesuffix(".kernel")].astype(np.float64), kind="stable")[:keep]
        mask = np.zeros(32, np.float32)
        mask[top] = 1
        masked[p] = delta_lib.LowRankDelta(a=d.a, b=d.b, rank_mask=jnp.asarray(mask), scale=d.scale)
    ids = np.array([[3, 7, 11, 5, 20, 9]])
    mine = np.asarray(
        ours.apply_fn(delta_lib.apply(ours.params, delta_lib.Adapter(masked), factored=True), ids)
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(model, str(out)).eval()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)
    everything = np.asarray(ours.apply_fn(delta_lib.apply(ours.params, full, factored=True), ids))
    assert np.abs(everything - theirs).max() > 1e-6  # pruning changed the model: the comparison can fail


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--retain-ratio", "0"], "--retain-ratio must be in (0, 1]"),
        (["--retain-ratio", "1.5"], "--retain-ratio must be in (0, 1]"),
        (["--retain-ratio", "0.5", "--format", "sparta"], "use --format peft"),
    ],
)
def test_bad_retain_ratio_is_one_line_exit_2(trained, tmp_path, capsys, extra, message):
    _, adapter = trained
    fmt = [] if "--format" in extra else ["--format", "peft"]
    out = tmp_path / "out"
    assert main(["export", "--adapter", str(adapter), *fmt, *extra, "--output", str(out)]) == 2
    assert message in _one_line(capsys, "export")
    assert not out.exists()


def test_retain_ratio_on_an_adapter_without_importance_is_refused(trained, tmp_path, capsys):
    _, adapter = trained
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (plain / name).write_bytes((adapter / name).read_bytes())
    out = tmp_path / "out"
    cmd = [
        "export",
        "--adapter",
        str(plain),
        "--format",
        "peft",
        "--retain-ratio",
        "0.5",
        "--output",
        str(out),
    ]
    assert main(cmd) == 2
    assert "no rank_importance.safetensors" in _one_line(capsys, "export")
    assert not out.exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        ("adapter.target_density=0", "'adapter.target_density' must be in (0, 1]"),
        ("adapter.target_density=1.2", "'adapter.target_density' must be in (0, 1]"),
        ("adapter.importance_lambda=-0.5", "'adapter.importance_lambda' must be in [0, 1]"),
    ],
)
def test_bad_config_values_are_one_line_exit_2(tmp_path, capsys, setting, message):
    run = tmp_path / "run"
    argv = ["train", "--set", "method=rank_sparse_lora", "--set", setting, "--output", str(run)]
    assert main(argv) == 2
    assert message in _one_line(capsys, "train")
    assert not run.exists()
