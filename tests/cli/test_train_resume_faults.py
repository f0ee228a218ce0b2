"""Fault injection: a training run killed with SIGKILL at 5 seeded points (between steps, right
after a checkpoint, at a checkpoint's commit, in the middle of a checkpoint write, and while the
final adapter is written), then resumed with `--resume`: each ends with the adapter file, the
metrics and the final evaluation byte for byte those of an uninterrupted run.

The killed run is a real subprocess (nothing of it can clean up); the kill points are planted by a
small driver that wraps the trainer's functions before calling `jaxsparse train`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsparse.cli import main

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_trainer_helpers", REPO / "tests" / "test_trainer.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

STEPS, EVERY = 8, 2

DRIVER = r"""
import json, os, signal, sys, threading

kind, step, delay, args = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])


def die():
    os.kill(os.getpid(), signal.SIGKILL)


from jaxsparse import checkpoint, trainer

if kind == "between_steps":  # after step `step` is computed, before anything of it is written
    step_problem = trainer._step_problem

    def _step_problem(run, state, *rest):
        if int(state.step) == step:
            die()
        return step_problem(run, state, *rest)

    trainer._step_problem = _step_problem
elif kind in ("after_save", "mid_save"):
    save = checkpoint.Checkpointer.save

    def patched_save(self, state, **kw):
        if kind == "mid_save" and int(state.step) == step:
            threading.Timer(delay, die).start()  # somewhere inside orbax's write
        saved = save(self, state, **kw)
        if kind == "after_save" and saved and int(state.step) == step:
            die()
        return saved

    checkpoint.Checkpointer.save = patched_save
elif kind == "commit":  # the data is written under a temporary name; the rename commits it
    from orbax.checkpoint._src.path import async_path

    rename = async_path.rename

    async def patched_rename(src, dst):
        if os.path.basename(str(dst).rstrip("/")) == str(step):
            die()
        return await rename(src, dst)

    async_path.rename = patched_rename
elif kind == "final_adapter":
    trainer.save_final_adapter = lambda *a, **k: die()

from jaxsparse.cli import main

sys.exit(main(args))
"""


def kill_points(seed: int = 16) -> list[tuple[str, int, float]]:
    """(kind, step, delay) for the 5 faults, drawn from ``seed``."""
    rng = random.Random(seed)
    return [
        ("between_steps", rng.choice([3, 5, 7]), 0.0),
        ("after_save", rng.choice([2, 4, 6]), 0.0),
        ("commit", rng.choice([4, 6]), 0.0),
        ("mid_save", rng.choice([4, 6]), rng.uniform(0.0, 0.05)),
        ("final_adapter", STEPS, 0.0),
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[str], Path]:
    root = tmp_path_factory.mktemp("resume-faults").absolute()
    model_dir, data = helpers.write_tiny_bert(root)
    overrides = [
        o for o in helpers.tiny_overrides(root, model_dir, data, "shira") if not o.startswith("output=")
    ]
    overrides += [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.log_every=3"]
    sets = [a for o in overrides for a in ("--set", o)]
    reference = root / "reference"
    assert main(["train", *sets, "--output", str(reference)]) == 0
    return root, sets, reference


def adapter_content(adapter_dir: Path) -> tuple[dict, dict[str, tuple]]:
    """The adapter file's metadata and each tensor's dtype, shape and bytes: what must be identical.
    (Not the file's bytes: safetensors writes its metadata map in an order that varies by process.)"""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "np") as f:
        names = list(f.keys())
        arrays = {k: f.get_tensor(k) for k in names}
        tensors = {k: (a.dtype.str, a.shape, a.tobytes()) for k, a in arrays.items()}
        return f.metadata(), tensors


def _outcome(out: Path) -> dict[str, object]:
    results = json.loads((out / "results.json").read_text())
    return {
        "adapter": adapter_content(out / "adapter"),
        "metrics": (out / "metrics.jsonl").read_text(),
        "final": results["final"],
        "initial": results["initial"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("point", kill_points(), ids=lambda p: f"{p[0]}@{p[1]}")
def test_killed_then_resumed_matches_uninterrupted(tiny, tmp_path, point, capsys):
    _, sets, reference = tiny
    kind, step, delay = point
    out = tmp_path / "killed"
    args = ["train", *sets, "--output", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, kind, str(step), str(delay), json.dumps(args)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    # The kill landed where it was aimed.
    entries = os.listdir(out / "checkpoints")
    saved = sorted(int(n) for n in entries if n.isdigit())
    if kind == "between_steps":
        assert saved[-1] == step - 1
    elif kind in ("after_save", "final_adapter"):
        assert saved[-1] == step
    elif kind == "commit":
        assert saved[-1] == step - EVERY and any(
            n.startswith(f"{step}.orbax-checkpoint-tmp") for n in entries
        )
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" not in err, err
    got, want = _outcome(out), _outcome(reference)
    assert got["adapter"] == want["adapter"]
    assert got["metrics"] == want["metrics"]
    assert got["final"] == want["final"] and got["initial"] == want["initial"]
    assert json.loads((out / "results.json").read_text())["segments"] == 2
