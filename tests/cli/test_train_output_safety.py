"""`jaxsparse train` never destroys what was in --output (the shared cases of tests/cli/safety.py),
plus what is particular to a training run: --resume, --overwrite of a run, another verb's output.

Runs the verb in this process on a tiny random BERT for two steps.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from jaxsparse import atomic, trainer
from jaxsparse.cli import main
from tests.cli.safety import CASES, check_output_safety, snapshot, user_dir

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_trainer_helpers", REPO / "tests" / "test_trainer.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


@pytest.fixture(scope="module")
def config(tmp_path_factory, compilation_cache) -> Path:
    root = tmp_path_factory.mktemp("train-safety").absolute()
    model_dir, data = helpers.write_tiny_bert(root)
    overrides = [
        o for o in helpers.tiny_overrides(root, model_dir, data, "shira") if not o.startswith("output=")
    ]
    overrides += ["train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "data.eval_size=8"]
    (root / "sets.json").write_text(json.dumps(overrides))
    return root


def _train(root: Path, output: str, *flags: str) -> int:
    sets = [a for o in json.loads((root / "sets.json").read_text()) for a in ("--set", o)]
    return main(["train", *sets, "--output", output, *flags])


@pytest.mark.parametrize("case", CASES)
def test_train_output_safety(case, config, tmp_path, monkeypatch, capsys):
    def run(output: str, overwrite: bool) -> int:
        return _train(config, output, *(["--overwrite"] if overwrite else []))

    check_output_safety(case, run, "train", tmp_path, monkeypatch, capsys)


def test_refusal_comes_before_any_model_is_loaded(config, tmp_path, monkeypatch, capsys):
    out = user_dir(tmp_path / "out")
    before = snapshot(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("data or a model was loaded before the output was checked")

    monkeypatch.setattr(trainer, "prepare", no_loading)
    for flags in [(), ("--resume",), ("--overwrite",)]:
        assert _train(config, str(out), *flags) == 2
        err = capsys.readouterr().err
        assert "refusing to write the output directory" in err and "notes.txt" in err, err
    assert snapshot(tmp_path) == before


def test_resume_continues_a_run_and_keeps_files_beside_it(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(config, str(out)) == 0
    (out / "my-notes.txt").write_text("mine")  # the user adds a file into the run directory
    capsys.readouterr()
    assert _train(config, str(out), "--resume") == 0  # continuing writes only the run's own entries
    assert (out / "my-notes.txt").read_text() == "mine"
    assert _train(config, str(out), "--resume", "--overwrite") == 2
    assert "pass one of them" in capsys.readouterr().err


def test_another_verbs_output_is_refused(config, tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    atomic.write_marker(out, ["adapter_config.json"], verb="export")
    before = snapshot(tmp_path)
    for flags in [(), ("--overwrite",), ("--resume",)]:
        assert _train(config, str(out), *flags) == 2
        assert "is a jaxsparse export output, not a train run" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_a_run_from_before_the_marker_resumes_but_is_never_overwritten_blindly(config, tmp_path, capsys):
    out = tmp_path / "old-run"
    assert _train(config, str(out)) == 0
    os.unlink(out / atomic.MARKER)  # as a run of an earlier jaxsparse left it
    assert trainer.check_output(out, resume=True) == "resume"
    assert trainer.check_output(out, overwrite=True) == "overwrite"
    (out / "notes.txt").write_text("mine")  # with anything else in it, it is not recognisably ours
    with pytest.raises(trainer.ConfigError, match="not written by jaxsparse train"):
        trainer.check_output(out, overwrite=True)


def test_a_failed_overwrite_keeps_the_previous_run(config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _train(config, str(out)) == 0
    before = snapshot(tmp_path)

    def diverge(run, on_step=None):
        (run.out / "metrics.jsonl").write_text("half a new run\n")  # the new run had started writing
        raise FloatingPointError("loss became nan at step 1; lower train.learning_rate")

    monkeypatch.setattr(trainer, "run_steps", diverge)
    assert _train(config, str(out), "--overwrite") == 2
    assert "loss became nan" in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # the previous run is back, byte for byte, nothing left beside it
