"""The train/eval/info/classify verbs as a user runs them: real subprocesses on a tiny BERT."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_trainer_helpers", REPO / "tests" / "test_trainer.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def jaxsparse(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "jaxsparse", *args], cwd=REPO, env=ENV, capture_output=True, text=True, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"jaxsparse {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir, data = helpers.write_tiny_bert(root)
    config = root / "tiny.yaml"
    lines = [
        f"{k}: {v}"
        for k, v in (o.split("=", 1) for o in helpers.tiny_overrides(root, model_dir, data, "shira"))
    ]
    nested: dict[str, dict[str, str]] = {}
    top = []
    for line in lines:
        key, value = line.split(": ", 1)
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
        else:
            top.append(line)
    text = "\n".join(top) + "\n"
    for section, items in nested.items():
        text += f"{section}:\n" + "".join(f"  {k}: {v}\n" for k, v in items.items())
    config.write_text(text)
    return root, config


@pytest.mark.parametrize("verb", ["train", "eval", "info", "classify", "export", "import", "merge"])
def test_every_verb_has_help(verb):
    proc = jaxsparse(verb, "--help")
    assert "usage: jaxsparse " + verb in proc.stdout and "examples:" in proc.stdout


def test_bad_config_fails_before_heavy_work(tiny):
    _, config = tiny
    start = time.time()
    proc = jaxsparse("train", "--config", str(config), "--set", "train.stepz=3", check=False)
    assert proc.returncode == 2
    assert "unknown key 'train.stepz'" in proc.stderr and "did you mean 'train.steps'" in proc.stderr
    proc = jaxsparse("train", "--config", str(config), "--set", "data.label_column=stars", check=False)
    assert proc.returncode == 2 and "'data.label_column' = 'stars'" in proc.stderr
    assert "['sentence', 'sentiment']" in proc.stderr
    proc = jaxsparse("train", "--set", "model.path=/no/such/model", check=False)
    assert proc.returncode == 2 and "'model.path'" in proc.stderr
    assert time.time() - start < 60  # no model or data was loaded


def test_train_eval_info_classify(tiny):
    root, config = tiny
    out = root / "run-cli"
    proc = jaxsparse("train", "--config", str(config), "--output", str(out), "--set", "train.steps=8")
    assert "held-out accuracy:" in proc.stdout
    assert f"adapter: {out / 'adapter'}" in proc.stdout and f"plot:    {out / 'metrics.png'}" in proc.stdout
    final = json.loads((out / "results.json").read_text())["final"]

    ev = jaxsparse("eval", "--config", str(config), "--adapter", str(out / "adapter"), "--json")
    metrics = json.loads(ev.stdout)
    assert metrics["accuracy"] == pytest.approx(final["accuracy"])
    assert metrics["loss"] == pytest.approx(final["loss"], rel=1e-5)

    info = json.loads(jaxsparse("info", str(out / "adapter"), "--json").stdout)
    assert info["method"] == "shira" and info["r"] == 2 and info["k_total"] == 64
    assert info["density"] == pytest.approx(0.25)
    assert "k per layer:" in jaxsparse("info", str(out / "adapter")).stdout

    cls = jaxsparse(
        "classify", "--adapter", str(out / "adapter"), "--json", "the movie was good", "awful plot"
    )
    rows = [json.loads(line) for line in cls.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["the movie was good", "awful plot"]
    for r in rows:
        assert set(r["probabilities"]) == {"neg", "pos"}
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def _final_values(adapter_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted(tiny):
    root, config = tiny
    common = ["--config", str(config), "--set", "train.steps=200", "--set", "train.checkpoint_every=4"]
    reference = root / "reference"
    jaxsparse("train", *common, "--output", str(reference))

    killed = root / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxsparse", "train", *common, "--output", str(killed)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill (no chance to clean up) once a checkpoint past step 4 exists and before the run ends.
    deadline = time.time() + 240
    ckpts = killed / "checkpoints"
    while time.time() < deadline:
        steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.is_dir() else []
        if steps and max(steps) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "the run finished before it could be killed"
    jaxsparse("train", *common, "--output", str(killed), "--resume")

    want, got = _final_values(reference / "adapter"), _final_values(killed / "adapter")
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert (
        json.loads((killed / "results.json").read_text())["final"]
        == json.loads((reference / "results.json").read_text())["final"]
    )


def test_sigint_checkpoints_and_exits_130(tiny):
    root, config = tiny
    out = root / "interrupted"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jaxsparse",
            "train",
            "--config",
            str(config),
            "--output",
            str(out),
            "--set",
            "train.steps=100000",
            "--set",
            "train.checkpoint_every=1000",
            "--set",
            "train.eval_every=1000",
        ],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1)  # some steps in
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err
    stopped = int(re.search(r"interrupted at step (\d+)", err).group(1))
    steps = [int(p.name) for p in (out / "checkpoints").glob("*") if p.name.isdigit()]
    assert max(steps) == stopped > 0  # saved at the interrupted step, whatever the schedule
    assert not (out / "adapter").exists()


def test_closed_pipe_is_not_an_error():
    """`jaxsparse info DIR | head`: the reader leaves early; no traceback, exit status 0."""
    child = (
        "import argparse, sys\n"
        "from jaxsparse import cli\n"
        "def build_parser():\n"
        "    p = argparse.ArgumentParser()\n"
        "    p.set_defaults(func=lambda args: print('line\\n' * 1_000_000))\n"
        "    return p\n"
        "cli.build_parser = build_parser\n"
        "sys.exit(cli.main([]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout.readline() == b"line\n"
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
