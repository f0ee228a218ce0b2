"""`jaxsparse train --mesh`: past one device from the command line, on 8 forced host devices.

JAX fixes its device count when it starts, so the runs are subprocesses started with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``. The claims: a ``data=2,fsdp=4`` run gives
the adapter of the single-device run (float32 reductions in another order: atol 1e-5, measured
~5e-7 on values of ~0.2); a run checkpointed on 8 devices resumes on 2 (another mesh, the
adapter sharded too) to the same adapter; two processes joined by ``--distributed`` (4 devices
each) train the same adapter; a mesh that does not fit is one line and exit status 2.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxsparse.cli import main

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_trainer_helpers", REPO / "tests" / "test_trainer.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("mesh").absolute()
    model_dir, data = helpers.write_tiny_bert(root)
    overrides = [
        o for o in helpers.tiny_overrides(root, model_dir, data, "shira") if not o.startswith("output=")
    ]
    # A constant rate, so a 4-step run may be resumed to 8 steps (the schedule does not depend on steps).
    overrides += ["train.steps=8", "train.schedule=constant", "train.learning_rate=0.2"]
    return root, [a for o in overrides for a in ("--set", o)]


def _env(devices: int, cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        # the runs compile the same steps: share the work through JAX's persistent cache
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def _train(tiny, out: Path, *args: str, devices: int = 8) -> None:
    root, sets = tiny
    proc = subprocess.run(
        [sys.executable, "-m", "jaxsparse", "train", *sets, "--output", str(out), *args],
        cwd=REPO,
        env=_env(devices, root / "jax-cache"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _adapter(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(got: Path, want: Path) -> None:
    a, b = _adapter(got), _adapter(want)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=ATOL, err_msg=key)
    final = [json.loads((d / "results.json").read_text())["final"] for d in (got, want)]
    assert final[0]["loss"] == pytest.approx(final[1]["loss"], abs=ATOL)


@pytest.fixture(scope="module")
def single(tiny) -> Path:
    """The reference: 8 devices visible, no mesh, so everything runs on the first device."""
    out = tiny[0] / "single"
    _train(tiny, out)
    values = _adapter(out)["base_model.model.bert.encoder.layer.0.attention.self.query.shira_weight"]
    assert np.abs(values).max() > 1e-2  # it trained (a comparison of zeros would prove nothing)
    return out


@pytest.mark.slow
def test_mesh_run_matches_one_device_and_resumes_on_another_device_count(tiny, single):
    root, _ = tiny
    sharded, moved = root / "sharded", root / "moved"
    _train(tiny, sharded, "--mesh", "data=2,fsdp=4")
    _assert_same_adapter(sharded, single)

    # Checkpointed at step 4 on a data=2,fsdp=4 mesh, resumed on 2 devices with the adapter sharded.
    _train(tiny, moved, "--mesh", "data=2,fsdp=4", "--set", "train.steps=4")
    _train(tiny, moved, "--resume", "--mesh", "fsdp=2", "--set", "train.adapter_sharding=fsdp", devices=2)
    _assert_same_adapter(moved, single)
    saved = [json.loads(line)["step"] for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert saved[-1] == 8 and saved == sorted(saved)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_the_same_adapter(tiny, single):
    """``--distributed`` on one machine: 2 processes x 4 devices form one data=2,fsdp=4 mesh."""
    root, sets = tiny
    out = root / "two-processes"
    coordinator = f"localhost:{_free_port()}"
    command = [
        sys.executable,
        "-m",
        "jaxsparse",
        "train",
        *sets,
        "--output",
        str(out),
        "--mesh",
        "data=2,fsdp=4",
    ]
    flags = ["--distributed", "--coordinator", coordinator, "--num-processes", "2"]
    procs = [
        subprocess.Popen(
            [*command, *flags, "--process-id", str(i)],
            cwd=REPO,
            env=_env(4, root / "jax-cache"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-4000:]
    assert "mesh data=2,fsdp=4 over 8 devices (2 processes)" in results[0][1]
    _assert_same_adapter(out, single)


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        (
            "data=2,fsdp=2",
            "'train.mesh' = 'data=2,fsdp=2': mesh data=2,fsdp=2 needs 4 devices but 1 are available",
        ),
        ("data=-1,fsdp=3", "the other axes (3 devices) do not divide the 1 devices available"),
        ("data=3", "'train.batch_size' = 8 is not divisible by the mesh's data axis (3)"),
        ("tp=2", "'train.mesh' = 'tp=2': unknown mesh axis 'tp'; allowed axes: ['data', 'fsdp']"),
        ("data=two", "the size of axis 'data' must be an integer"),
    ],
)
def test_a_mesh_that_does_not_fit_is_one_line_and_exit_2(tiny, tmp_path, capsys, mesh, message):
    _, sets = tiny
    import jax

    assert jax.device_count() == 1  # this test process sees one CPU device
    code = main(["train", *sets, "--output", str(tmp_path / "out"), "--mesh", mesh])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # refused before anything was written
