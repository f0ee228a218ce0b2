"""Extract a fixed-rank sub-adapter from an SQFT NLS super-adapter, as a standard PEFT LoRA directory.

The super-adapter (trained with ``search_space``, :mod:`jaxsparse.methods.sqft`) is a PEFT LoRA
directory with SQFT's ``elastic_adapter_config.json``: groups ``{"target": [...lora_A names],
"search_space": [32, 24, 16]}``. A *version* picks one rank per group, as SQFT's
``extract_sub_adapter.py``: ``maximal`` (``space[0]``), ``heuristic`` (``space[(len - 1) // 2]``),
``minimal`` (``space[-1]``) or ``custom`` (explicit ranks, one for every group or one per group,
each in its group's space). The elastic modules keep their leading components ``A[:w]``,
``B[:, :w]``; every other tensor is copied.

The sub-adapter keeps the super-adapter's scaling ``lora_alpha / r`` (SQFT's elastic layers never
rescale), so a module cut to rank ``w`` is written with ``rank_pattern[module] = w`` and
``alpha_pattern[module] = lora_alpha * w / r``: plain PEFT loads it and computes the same update
the elastic adapter computes at those ranks. SQFT's flags (``sparse_adapter``) stay in the config.

Example:
    >>> rank_for([32, 24, 16], "heuristic"), rank_for([32, 24, 16, 8], "heuristic"), rank_for([32, 24, 16], "minimal")
    (24, 24, 16)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxsparse.atomic import atomic_dir, atomic_write_bytes, atomic_write_text, check_output_dir
from jaxsparse.convert import AdapterFormatError, write_safetensors_bytes
from jaxsparse.convert.peft_lora import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_tensors
from jaxsparse.methods.sqft import ELASTIC_CONFIG_NAME, PEFT_PREFIX, check_search_space

VERSIONS = ("maximal", "heuristic", "minimal", "custom")


def rank_for(space: Sequence[int], version: str) -> int:
    """SQFT's rank of ``version`` in a (largest-first) search ``space``."""
    if version == "maximal":
        return space[0]
    if version == "heuristic":
        return space[(len(space) - 1) // 2]
    if version == "minimal":
        return space[-1]
    raise ValueError(
        f"unknown sub-adapter version {version!r}; choose one of {VERSIONS[:3]} or 'custom' with ranks"
    )


def read_elastic_config(adapter_dir: str | os.PathLike, r: int) -> list[tuple[list[str], list[int]]]:
    """``[(modules, search_space)]`` per NLS group of a super-adapter, checked (schema, order, ranks <= ``r``)."""
    path = os.path.join(os.fspath(adapter_dir), ELASTIC_CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterFormatError(
            f"{path}: not found; {os.fspath(adapter_dir)!r} is not an NLS super-adapter "
            "(train with adapter.search_space to get one)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(raw, list) or not raw:
        raise AdapterFormatError(
            f"{path}: expected a non-empty list of {{'target': [...], 'search_space': [...]}}"
        )
    groups = []
    for i, item in enumerate(raw):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("target"), list)
            or not isinstance(item.get("search_space"), list)
            or not item["target"]
            or not all(isinstance(t, str) for t in item["target"])
        ):
            raise AdapterFormatError(
                f"{path}: group {i} must be {{'target': [lora_A names], 'search_space': [ranks]}}, got {item!r}"
            )
        try:
            check_search_space(item["search_space"], r, f"{path}: group {i} search_space")
        except ValueError as e:
            raise AdapterFormatError(str(e)) from None
        modules = []
        for t in item["target"]:
            if not (t.startswith(PEFT_PREFIX) and t.endswith(".lora_A")):
                raise AdapterFormatError(
                    f"{path}: group {i} target {t!r} is not '{PEFT_PREFIX}<module>.lora_A'"
                )
            modules.append(t[len(PEFT_PREFIX) : -len(".lora_A")])
        groups.append((modules, list(item["search_space"])))
    return groups


def sub_adapter_ranks(
    groups: Sequence[tuple[Sequence[str], Sequence[int]]], version: str, ranks: Sequence[int] | None = None
) -> dict[str, int]:
    """``{module: rank}`` of the sub-adapter ``version`` (``custom``: ``ranks``, one for all groups or one per group)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown sub-adapter version {version!r}; choose one of {list(VERSIONS)}")
    if version != "custom":
        if ranks:
            raise ValueError(
                f"ranks are given only with version 'custom' (got version {version!r} and ranks {list(ranks)})"
            )
        chosen = [rank_for(space, version) for _, space in groups]
    else:
        if not ranks:
            raise ValueError(
                "version 'custom' needs ranks (--ranks W [W ...]: one for every group, or one per group)"
            )
        if len(ranks) not in (1, len(groups)):
            raise ValueError(
                f"version 'custom': {len(ranks)} ranks for {len(groups)} NLS groups; give 1 or {len(groups)}"
            )
        chosen = list(ranks) * len(groups) if len(ranks) == 1 else list(ranks)
        for (modules, space), w in zip(groups, chosen, strict=True):
            if w not in space:
                raise ValueError(
                    f"rank {w} for the group of {modules[0]!r} is not in its search space {list(space)}"
                )
    return {m: int(w) for (modules, _), w in zip(groups, chosen, strict=True) for m in modules}


def extract_sub_adapter(
    adapter_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    version: str = "heuristic",
    ranks: Sequence[int] | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the ``version`` sub-adapter of the super-adapter in ``adapter_dir`` to ``output`` (a
    PEFT LoRA directory, atomically); returns ``{module: rank}`` of the elastic modules."""
    adapter_dir = os.fspath(adapter_dir)
    check_output_dir(output, overwrite=overwrite)
    config = read_adapter_config(adapter_dir)
    cfg_path = os.path.join(adapter_dir, CONFIG_NAME)
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(alpha, (int, float)):
        raise AdapterFormatError(f"{cfg_path}: expected a positive int 'r' and a number 'lora_alpha'")
    groups = read_elastic_config(adapter_dir, r)
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"):
        raise AdapterFormatError(
            f"{cfg_path}: an NLS super-adapter has one r and lora_alpha (no rank_pattern, alpha_pattern, use_rslora)"
        )
    chosen = sub_adapter_ranks(groups, version, ranks)
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    tensors = read_adapter_tensors(weights_path)
    out_tensors: dict[str, np.ndarray] = dict(tensors)
    for module, w in chosen.items():
        key_a, key_b = f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"
        if key_a not in tensors or key_b not in tensors:
            raise AdapterFormatError(
                f"{weights_path}: the elastic module {module!r} has no {key_a!r} / {key_b!r}"
            )
        a, b = tensors[key_a], tensors[key_b]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterFormatError(
                f"{weights_path}: {module!r} has lora_A {a.shape} and lora_B {b.shape}, expected rank r={r}"
            )
        out_tensors[key_a] = np.ascontiguousarray(a[:w])
        out_tensors[key_b] = np.ascontiguousarray(b[:, :w])
    out_config: dict[str, Any] = dict(config)
    out_config["rank_pattern"] = {m: w for m, w in sorted(chosen.items()) if w != r}
    # Keep the super-adapter's scaling alpha / r at rank w: alpha_w / w == alpha / r.
    out_config["alpha_pattern"] = {m: alpha * w / r for m, w in sorted(chosen.items()) if w != r}
    data = write_safetensors_bytes(out_tensors, {"format": "pt"})
    with atomic_dir(output, overwrite=overwrite, verb="extract-sub-adapter", format="peft_lora") as tmp:
        atomic_write_text(
            os.path.join(tmp, CONFIG_NAME), json.dumps(out_config, indent=2, sort_keys=True) + "\n"
        )
        atomic_write_bytes(os.path.join(tmp, WEIGHTS_NAME), data)
    return chosen


def describe_ranks(chosen: Mapping[str, int]) -> str:
    """``"rank 24 x 6 elastic modules"`` / ``"rank 32 x 3, 16 x 3 elastic modules"``: a one-line summary."""
    counts: dict[int, int] = {}
    for w in chosen.values():
        counts[w] = counts.get(w, 0) + 1
    return (
        "rank "
        + ", ".join(f"{w} x {n}" for w, n in sorted(counts.items(), reverse=True))
        + " elastic modules"
    )
