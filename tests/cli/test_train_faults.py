"""The faults of issue 16 as a user meets them, one test per row of its table: the exact command,
its exit status, one error (or notice) line on stderr and no traceback; checkpoints left on disk
byte for byte. Runs `jaxsparse` in this process on a tiny random BERT (the full-disk and
corrupt-checkpoint rows in a subprocess, where a traceback or a signal would show)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsparse.cli import main

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_trainer_helpers", REPO / "tests" / "test_trainer.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, compilation_cache) -> tuple[Path, list[str]]:
    """A tiny BERT, its data, and the `--set` arguments of a 4-step run with the default warm-up."""
    root = tmp_path_factory.mktemp("train-faults").absolute()
    model_dir, data = helpers.write_tiny_bert(root)
    overrides = [
        o
        for o in helpers.tiny_overrides(root, model_dir, data, "shira")
        if not o.startswith(("output=", "train.warmup_steps="))
    ]
    overrides += ["train.steps=4", "train.eval_every=2", "train.checkpoint_every=2", "data.eval_size=16"]
    return root, [a for o in overrides for a in ("--set", o)]


def error_lines(err: str, verb: str = "train") -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(f"jaxsparse {verb}: error:")]


def adapter_content(adapter_dir: Path) -> tuple[dict, dict[str, tuple]]:
    """The adapter file's metadata and each tensor's dtype, shape and bytes: what must be identical.
    (Not the file's bytes: safetensors writes its metadata map in an order that varies by process.)"""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "np") as f:
        names = list(f.keys())
        arrays = {k: f.get_tensor(k) for k in names}
        tensors = {k: (a.dtype.str, a.shape, a.tobytes()) for k, a in arrays.items()}
        return f.metadata(), tensors


def _train(tiny, *args: str) -> int:
    return main(["train", *tiny[1], *args])


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_nan_loss_stops_with_exit_3_and_keeps_the_checkpoints(tiny, tmp_path, capsys):
    # learning_rate 1e39 is infinite in float32: the first update makes the parameters non-finite.
    # The warm-up (2 steps) keeps step 1's rate at 0, so a checkpoint is written before it.
    out = tmp_path / "run"
    args = ("--output", str(out), "--set", "train.checkpoint_every=1", "--set", "train.warmup_steps=2")
    status = _train(tiny, *args, "--set", "train.learning_rate=1e39")
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert status == 3
    assert "loss became nan" in line and ("at step 2;" in line or "at step 3;" in line), line
    assert "the last good checkpoint is step" in line and "lower train.learning_rate" in line
    ckpts = out / "checkpoints"
    kept = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert kept and f"the last good checkpoint is step {kept[-1]} " in line
    assert not (out / "adapter").exists()
    before = _tree_bytes(ckpts)
    # Resuming with the same (diverging) config stops the same way and leaves them as they were.
    assert _train(tiny, *args, "--set", "train.learning_rate=1e39", "--resume") == 3
    capsys.readouterr()
    assert _tree_bytes(ckpts) == before


def test_huge_learning_rate_finishes_with_a_warning(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny, "--output", str(out), "--set", "train.learning_rate=1e8") == 0
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "training diverged" in warning and "train.loss_spike_factor" in warning
    assert json.loads((out / "results.json").read_text())["warnings"] == [warning.removeprefix("warning: ")]
    # The spike guard stops such a run (exit 3).
    spiky = tmp_path / "spiky"
    assert (
        _train(
            tiny,
            "--output",
            str(spiky),
            "--set",
            "train.learning_rate=1e8",
            "--set",
            "train.loss_spike_factor=10",
        )
        == 3
    )
    (line,) = error_lines(capsys.readouterr().err)
    assert "times the running median" in line


def test_resume_without_a_checkpoint_is_an_error(tiny, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert _train(tiny, "--resume", "--output", str(out)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"no checkpoint to resume from in '{out}'" in line
    assert os.listdir(out) == []


def test_short_runs_with_default_warmup(tiny, tmp_path, capsys):
    for steps in ("1", "2"):
        assert _train(tiny, "--output", str(tmp_path / steps), "--set", f"train.steps={steps}") == 0
        assert json.loads((tmp_path / steps / "results.json").read_text())["steps"] == int(steps)
    assert not error_lines(capsys.readouterr().err)


def test_resume_with_another_config_is_refused_unless_forced(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny, "--output", str(out)) == 0
    capsys.readouterr()
    assert _train(tiny, "--output", str(out), "--resume", "--set", "seed=5") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "['seed']" in line and "--force" in line
    assert _train(tiny, "--output", str(out), "--resume", "--force", "--set", "seed=5") == 0
    assert "--resume --force: continuing although" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["segments"] == 2 and results["seconds"] > 0


def _classifier_with_labels(root: Path, num_labels: int) -> Path:
    import transformers

    from jaxsparse import models

    source = root / "tiny-model"
    config = transformers.BertConfig(
        vocab_size=len(helpers.VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        architectures=["BertForSequenceClassification"],
    )
    target = root / f"classifier-{num_labels}"
    models.save_pretrained(models.init_params(config, task="seq_cls", seed=1), target)
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)
    return target


def test_classifier_head_that_does_not_fit_the_labels(tiny, tmp_path, capsys):
    model = (
        _classifier_with_labels(tiny[0], 3)
        if not (tiny[0] / "classifier-3").exists()
        else tiny[0] / "classifier-3"
    )
    args = ("--set", f"model.path={model}", "--set", "train.steps=2")
    assert _train(tiny, "--output", str(tmp_path / "fresh"), *args) == 0
    err = capsys.readouterr().err
    (notice,) = [line for line in err.splitlines() if line.startswith("notice:")]
    assert "3 labels; the data has 2" in notice
    assert "classifier.weight [3, 16]" in notice and "classifier.bias [3]" in notice
    adapter_config = json.loads((tmp_path / "fresh" / "adapter" / "config.json").read_text())
    assert adapter_config["id2label"] == {"0": "neg", "1": "pos"}

    assert _train(tiny, "--output", str(tmp_path / "refused"), *args, "--set", "model.reset_head=false") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "classifier with 3 labels" in line and "model.reset_head" in line


# Runs the CLI with a limit on the size of any file it writes: Python ignores SIGXFSZ, so a write
# past the limit fails with EFBIG ("File too large") instead of killing the process, which is a
# full disk as far as the writer can tell. Set in the child itself (no preexec_fn: JAX's threads).
LIMITED = (
    "import os, resource, sys; limit = int(sys.argv[1]);"
    "limit >= 0 and resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit));"
    "os.execv(sys.executable, [sys.executable, '-m', 'jaxsparse', *sys.argv[2:]])"
)


def _jaxsparse(*args: str, fsize: int = -1, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LIMITED, str(fsize), *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _truncate_data_files(step_dir: Path) -> None:
    for path in step_dir.rglob("*"):
        if path.is_file() and path.parent.name == "d" and path.stat().st_size > 0:
            os.truncate(path, path.stat().st_size // 2)


def test_corrupt_newest_checkpoint_then_resume(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny, "--output", str(out), "--set", "train.keep_checkpoints=5") == 0
    reference = adapter_content(out / "adapter")
    capsys.readouterr()
    ckpts = out / "checkpoints"
    _truncate_data_files(ckpts / "4")  # a storage fault in the newest checkpoint
    before = _tree_bytes(ckpts)
    proc = _jaxsparse(
        "train", *tiny[1], "--output", str(out), "--resume", "--set", "train.keep_checkpoints=5"
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    (skip,) = [line for line in proc.stderr.splitlines() if "skipped checkpoint" in line]
    assert f"skipped checkpoint step 4 in {ckpts}: it does not read back whole" in skip
    assert "resumed from step 2" in proc.stderr
    assert _tree_bytes(ckpts) == before  # the damaged one is still there, byte for byte
    assert adapter_content(out / "adapter") == reference

    _truncate_data_files(ckpts / "2")
    proc = _jaxsparse(
        "train", *tiny[1], "--output", str(out), "--resume", "--set", "train.keep_checkpoints=5"
    )
    assert proc.returncode == 2
    (line,) = error_lines(proc.stderr)
    assert "reads back whole" in line and "step 4:" in line and "step 2:" in line


@pytest.fixture(scope="module")
def trained(tiny) -> Path:
    """A finished 1-step run (its adapter is what export, merge and classify read)."""
    out = tiny[0] / "trained"
    assert _train(tiny, "--output", str(out), "--set", "train.steps=1") == 0
    return out


@pytest.mark.parametrize("verb", ["export", "merge"])
def test_full_disk_is_one_line_for_writing_verbs(tiny, trained, tmp_path, verb):
    target = tmp_path / "out"
    args = {
        "export": ["--format", "peft"],
        "merge": ["--model", str(tiny[0] / "tiny-model")],
    }[verb]
    proc = _jaxsparse(verb, "--adapter", str(trained / "adapter"), *args, "--output", str(target), fsize=100)
    assert proc.returncode == 2, proc.stderr
    (line,) = error_lines(proc.stderr, verb)
    assert "File too large" in line and str(tmp_path) in line
    assert os.listdir(tmp_path) == []  # no partial output


def test_full_disk_is_one_line_for_train(tiny, tmp_path):
    out = tmp_path / "run"
    proc = _jaxsparse("train", *tiny[1], "--output", str(out), fsize=2000)
    assert proc.returncode == 2, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "File too large" in line and str(out) in line


@pytest.mark.skipif(
    os.geteuid() == 0, reason="runs as root, who may write anywhere: no permission error to see"
)
def test_read_only_output_is_one_line(tiny, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    assert _train(tiny, "--output", str(parent / "run")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "not writable" in line


def test_classify_empty_and_long_inputs(trained, capsys):
    adapter = str(trained / "adapter")
    for text in ("", "   \t"):
        assert main(["classify", "--adapter", adapter, "fine", text]) == 2
        (line,) = error_lines(capsys.readouterr().err, "classify")
        assert "sentence 2 of 2 is empty or whitespace only" in line
    long = "good " * 24_000  # 120 KB
    assert main(["classify", "--adapter", adapter, long]) == 0
    (row,) = capsys.readouterr().out.splitlines()
    label, _, echoed = row.split("\t")
    assert label in ("neg", "pos") and echoed == long[:80] + "…"
