"""``jaxsparse info DIR``: what an adapter is (method, base model, targets, k per layer, density, size).

Reads only the adapter's JSON config and safetensors headers (no weights are loaded, no jax is
imported), so it is instant on adapters of any size. Weight shapes come from the layout metadata
jaxsparse writes, else from the base model's checkpoint header when it can be found.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Describe an adapter directory (PEFT SHiRA / LoRA, SpaRTA, or a full fine-tuned model): method,
base model, targeted modules, trained entries k per layer, density, and size on disk. For an SQFT
adapter also its flags: sparse_adapter and quantization_aware (a QA-SparsePEFT adapter runs only on
a GPTQ --model plus the --non-quant-model it was quantized from).

examples:
  jaxsparse info runs/default/adapter
  jaxsparse info runs/default/adapter --json
"""

# PEFT adapter types jaxsparse reads (as jaxsparse.adapter_io.PEFT_TYPES, which imports jax).
PEFT_METHODS = {"SHIRA": "shira", "LORA": "lora"}
SHIRA_INDICES = ".shira_indices"
LORA_A = ".lora_A.weight"
PEFT_PREFIX = "base_model.model."
# The loaders' words when only the base model could complete the check.
NEEDS_BASE = "pass the base model's params"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe an adapter: method, base model, targets, k per layer, density, size",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", metavar="DIR", help="adapter directory")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=run)


def _headers(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a safetensors file, from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            return shapes, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a bad file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _read_json(path: Path) -> dict[str, Any]:
    from jaxsparse.convert import read_json  # NumPy only: the loaders' reader, their messages

    return read_json(path)


def _layout_shapes(metadata: dict[str, str], where: Path) -> dict[str, tuple[int, ...]]:
    from jaxsparse.convert import read_layout

    layout = read_layout(metadata, str(where)) or {}
    return {name: v["shape"] for name, v in layout.items()}


def _base_shapes(base: str | None) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape from the base model's safetensors header(s), both with and without
    a task model's base prefix (``bert.``), or ``{}`` when the base model cannot be found."""
    if not base:
        return {}
    from jaxsparse.config import ConfigError, resolve_model_path

    try:
        path = Path(resolve_model_path(base))
    except ConfigError:
        return {}
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(_headers(f)[0])
    for name, shape in list(shapes.items()):
        _, _, rest = name.partition(".")
        if rest:
            shapes.setdefault(rest, shape)
    return shapes


def _shape_of(name: str, layout: dict, base: dict) -> tuple[int, ...] | None:
    if name in layout:
        return layout[name]
    if name in base:
        return base[name]
    rest = name.partition(".")[2]
    return base.get(rest)


def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def adapter_info(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able description of the adapter in ``adapter_dir`` (see the module docstring)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ValueError(f"{d}: adapter directory not found")
    info: dict[str, Any] = {"path": str(d), "size_bytes": _dir_size(d)}
    layers: list[dict[str, Any]] = []
    dense: dict[str, int] = {}
    if (d / "adapter_config.json").is_file():
        cfg = _read_json(d / "adapter_config.json")
        peft_type = cfg.get("peft_type")
        if peft_type not in PEFT_METHODS:
            # The loaders' words (jaxsparse.adapter_io.adapter_format): info describes what they read.
            config_path = os.path.join(os.fspath(adapter_dir), "adapter_config.json")
            raise ValueError(
                f"{config_path}: unsupported peft_type {peft_type!r}; jaxsparse reads {sorted(PEFT_METHODS)}"
            )
        weights = d / "adapter_model.safetensors"
        if not weights.is_file():
            raise ValueError(f"{weights}: file not found")
        shapes, metadata = _headers(weights)
        layout = _layout_shapes(metadata, weights)
        base = cfg.get("base_model_name_or_path")
        base_shapes = _base_shapes(base) if not layout else {}
        sqft_flags = cfg.get("sparse_adapter") or cfg.get("quantization_aware")
        is_sqft = peft_type == "LORA" and (sqft_flags or (d / "elastic_adapter_config.json").is_file())
        info.update(
            method="sqft" if is_sqft else PEFT_METHODS[peft_type],  # SQFT: PEFT LoRA + its flags
            format="peft",
            base_model=base,
            task_type=cfg.get("task_type"),
            target_modules=cfg.get("target_modules"),
            modules_to_save=cfg.get("modules_to_save"),
            r=cfg.get("r"),
        )
        if is_sqft:
            # SQFT's flags decide which base the adapter needs: a quantization-aware one is only
            # correct on a GPTQ model plus the sparse model it was quantized from.
            info["sparse_adapter"] = cfg.get("sparse_adapter") is True
            info["quantization_aware"] = cfg.get("quantization_aware") is True
        for key, shape in shapes.items():
            name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
            if name.endswith(SHIRA_INDICES):
                module = name[: -len(SHIRA_INDICES)]
                layers.append(
                    {
                        "module": module,
                        "k": int(shape[1]),
                        "shape": _shape_of(module + ".weight", layout, base_shapes),
                    }
                )
            elif name.endswith(LORA_A):
                module = name[: -len(LORA_A)]
                b_key = key[: -len(LORA_A)] + ".lora_B.weight"
                r, fan_in = shape
                fan_out = shapes[b_key][0] if b_key in shapes else None
                layers.append(
                    {
                        "module": module,
                        "k": int(r * (fan_in + (fan_out or 0))),
                        "rank": int(r),
                        "shape": (fan_out, fan_in) if fan_out else None,
                    }
                )
            elif ".lora_B." in name or name.endswith(".shira_weight"):
                continue
            else:
                dense[name] = math.prod(shape)
    elif (d / "sparse_deltas.safetensors").is_file() or (d / "sparse_deltas.pt").is_file():
        cfg = _read_json(d / "config.json")
        weights = d / "sparse_deltas.safetensors"
        if not weights.is_file():
            raise ValueError(f"{d}: only the pickled sparse_deltas.pt; `jaxsparse info` reads safetensors")
        shapes, metadata = _headers(weights)
        layout = _layout_shapes(metadata, weights)
        base = cfg.get("sparta_pretrained_model")
        base_shapes = _base_shapes(base) if not layout else {}
        dense_names = set(cfg.get("sparta_modules_to_save") or [])
        info.update(method="sparta", format="sparta", base_model=base, task_type=cfg.get("problem_type"))
        for key, shape in shapes.items():
            if not key.startswith("indices.") or shape[0] == 0:
                continue
            name = key[len("indices.") :]
            if name in dense_names:
                dense[name] = int(shape[0])
            else:
                layers.append(
                    {
                        "module": name.rpartition(".")[0],
                        "k": int(shape[0]),
                        "shape": _shape_of(name, layout, base_shapes),
                    }
                )
        info["target_modules"] = sorted({layer["module"].rpartition(".")[2] for layer in layers})
        # All the model's parameters, recorded by our export: the SpaRTA authors' sparsity needs it.
        info["total_parameters"] = cfg.get("jaxsparse_num_parameters")
    elif (d / "model.safetensors").is_file():
        shapes, _ = _headers(d / "model.safetensors")
        cfg = _read_json(d / "config.json") if (d / "config.json").is_file() else {}
        info.update(
            method="full",
            format="huggingface",
            base_model=cfg.get("_name_or_path"),
            architectures=cfg.get("architectures"),
        )
        info["trainable"] = sum(math.prod(s) for s in shapes.values())
        info["id2label"] = cfg.get("id2label")
        return info
    else:
        raise ValueError(
            f"{d}: not an adapter directory (expected adapter_config.json, sparse_deltas.safetensors or "
            f"model.safetensors; found {sorted(p.name for p in d.iterdir())[:10]})"
        )
    for layer in layers:
        shape = layer["shape"]
        layer["density"] = layer["k"] / math.prod(shape) if shape and math.prod(shape) else None
    info["layers"] = layers
    info["dense"] = dense
    info["k_total"] = sum(layer["k"] for layer in layers)
    known = [layer for layer in layers if layer["shape"]]
    total = sum(math.prod(layer["shape"]) for layer in known)
    if known and len(known) == len(layers) and total:
        info["density"] = info["k_total"] / total
    else:
        info["density"] = None
    info["trainable"] = info["k_total"] + sum(dense.values())
    if info.get("format") == "peft" and any("rank" in layer for layer in layers):
        # LoRA factors are small: read them to count the entries a pruned (sparse) LoRA keeps.
        info["nonzero"] = _lora_nonzero(d / "adapter_model.safetensors")
    if info.get("total_parameters"):
        info["sparsity"] = 1.0 - info["trainable"] / info["total_parameters"]
    if (d / "config.json").is_file():
        info["id2label"] = _read_json(d / "config.json").get("id2label")
    return info


def _lora_nonzero(path: Path) -> int:
    """Non-zero entries of every ``lora_A`` / ``lora_B`` factor in a PEFT LoRA safetensors file."""
    import numpy as np
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return sum(
                int(np.count_nonzero(f.get_tensor(k)))
                for k in f.keys()  # noqa: SIM118
                if k.endswith((".lora_A.weight", ".lora_B.weight"))
            )
    except Exception as e:  # safetensors raises several types for a bad file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_info(info: dict[str, Any]) -> str:
    """The human-readable description ``jaxsparse info`` prints."""
    lines = [
        f"adapter:      {info['path']}",
        f"method:       {info['method']} ({info['format']} format)",
        f"base model:   {info.get('base_model')}",
    ]
    if info.get("id2label"):
        lines.append(f"labels:       {[info['id2label'][k] for k in sorted(info['id2label'], key=int)]}")
    if info["method"] == "full":
        lines.append(f"parameters:   {info['trainable']:,} (every parameter trained)")
        lines.append(f"size on disk: {_size(info['size_bytes'])}")
        return "\n".join(lines)
    if info.get("r") is not None:
        lines.append(f"r:            {info['r']}")
    if "quantization_aware" in info:
        qa = info["quantization_aware"]
        note = " (QA-SparsePEFT: needs the GPTQ base as --model and the sparse base as --non-quant-model)"
        flags = f"sparse_adapter={info['sparse_adapter']}, quantization_aware={qa}"
        lines.append(f"sqft flags:   {flags}{note if qa else ''}")
    targets = info.get("target_modules")
    if isinstance(targets, list) and len(targets) > 6:
        # PEFT configs may list every adapted module path: show the distinct module names.
        names = sorted(
            {t.rpartition(".")[2] if t.count(".") < 2 else ".".join(t.split(".")[-2:]) for t in targets}
        )
        targets = f"{len(targets)} modules: {names}"
    lines.append(f"targets:      {targets}")
    lines.append(f"layers:       {len(info['layers'])} adapted, k = {info['k_total']:,} entries in all")
    density = info.get("density")
    lines.append(
        f"density:      {density:.4%} of the adapted weights"
        if density is not None
        else "density:      unknown (base model not found)"
    )
    if info["dense"]:
        lines.append(f"dense:        {', '.join(f'{n} ({c:,})' for n, c in info['dense'].items())}")
    lines.append(f"trainable:    {info['trainable']:,} parameters")
    if info.get("nonzero") is not None and info["k_total"]:
        pruned = 1 - info["nonzero"] / info["k_total"]
        lines.append(
            f"non-zero:     {info['nonzero']:,} of {info['k_total']:,} factor entries ({pruned:.2%} pruned)"
        )
    if info.get("sparsity") is not None:
        lines.append(
            f"sparsity:     {info['sparsity']:.4%} of all {info['total_parameters']:,} parameters frozen "
            "(the SpaRTA authors' 1 - trainable/total)"
        )
    lines.append(f"size on disk: {_size(info['size_bytes'])}")
    lines.append("k per layer:")
    width = max((len(layer["module"]) for layer in info["layers"]), default=0)
    for layer in info["layers"]:
        shape = "x".join(map(str, layer["shape"])) if layer["shape"] else "?"
        dens = f"{layer['density']:.4%}" if layer["density"] is not None else "?"
        lines.append(f"  {layer['module']:<{width}}  k={layer['k']:<8} of {shape:<10} ({dens})")
    return "\n".join(lines)


def check_readable(adapter_dir: str) -> None:
    """Raise the loaders' error when they refuse ``adapter_dir``: info describes only what they read.

    Without a base model, adapters other tools wrote cannot be fully checked (their weight shapes
    live in the base): the loaders' "pass the base model" refusal is not an error here.
    """
    from jaxsparse.adapter_io import adapter_format, load_adapter
    from jaxsparse.convert import AdapterFormatError

    try:
        load_adapter(adapter_dir)
    except AdapterFormatError as e:
        if NEEDS_BASE not in str(e):
            raise
        if adapter_format(adapter_dir) == "peft_lora":  # its config can still be checked alone
            from jaxsparse.convert.peft_lora import lora_config_from_peft, read_adapter_config

            lora_config_from_peft(read_adapter_config(adapter_dir))


def run(args: argparse.Namespace) -> int:
    """Errors reach the user as one line through :func:`jaxsparse.cli.main`."""
    info = adapter_info(args.adapter)
    if info["format"] != "huggingface":
        check_readable(args.adapter)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
