"""``jaxsparse export``: write an adapter in the layout PyTorch tools load (PEFT or SpaRTA)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from jaxsparse.cli.common import add_output_args

DESCRIPTION = """\
Export an adapter for PyTorch users.

  --format peft    LoRA adapters as PEFT LoRA; sparse adapters (SHiRA, SpaRTA, ...) as PEFT SHiRA
                   (padded with zero entries to PEFT's r * (in + out) per weight: same model, and
                   peft.PeftModel.from_pretrained loads it). PEFT SHiRA supports nn.Linear only, so
                   sparse deltas on GPT-2 Conv1D layers are refused (use --format sparta).
  --format sparta  sparse adapters in the SpaRTA authors' layout (config.json + sparse_deltas.safetensors).
  --retain-ratio R with --format peft, for a rank-sparse LoRA (method: rank_sparse_lora): keep the top
                   ceil(R * r) rank components of each module by the importance accumulated in
                   training (rank_importance.safetensors) and write a standard PEFT LoRA of those
                   ranks (rank_pattern / alpha_pattern where modules differ; each kept component's
                   scale unchanged); prints the size before and after.

An SQFT adapter exports with --format peft as the PEFT LoRA it is, its "sparse_adapter" and
"quantization_aware" flags kept in adapter_config.json (a quantization-aware one still needs the GPTQ
base and --non-quant-model wherever it is run: jaxsparse merge, generate, classify).

The base model (--model, or the local path the adapter records) gives the weight shapes of PEFT
SHiRA and SpaRTA files other tools wrote, and makes a SpaRTA config.json complete (the base's
config, empty entries for untouched weights). A PEFT LoRA adapter (its file gives every shape) and
a sparse adapter jaxsparse wrote (shapes recorded) export to PEFT without it; LoRA never loads it.
--output must be a new or empty directory (--overwrite replaces a previous jaxsparse output,
nothing else); it appears complete or not at all.

examples:
  jaxsparse export --adapter runs/shira/adapter --format peft --output exported/peft
  jaxsparse export --adapter runs/sparta/adapter --format sparta --model path/to/hf-model --output exported/sparta
  jaxsparse export --adapter runs/rank_sparse/adapter --format peft --retain-ratio 0.15 --output exported/pruned
"""


LORA_NOT_SPARSE = (
    "a LoRA adapter is not sparse, and the SpaRTA layout holds index/value deltas only; export it with "
    "--format peft (or merge it into the model with `jaxsparse merge`)"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export an adapter as PEFT (LoRA/SHiRA) or SpaRTA",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory")
    p.add_argument("--format", required=True, choices=("peft", "sparta"), help="output layout")
    add_output_args(p, what="where to write the exported adapter")
    p.add_argument(
        "--model",
        metavar="MODEL",
        help="base model (local HF directory or .gguf); default: the one the adapter records "
        "(never needed for a PEFT LoRA adapter)",
    )
    p.add_argument(
        "--retain-ratio",
        type=float,
        metavar="R",
        help="rank-sparse LoRA only: keep the top ceil(R * r) components per module by accumulated "
        "importance, R in (0, 1] (default: keep everything)",
    )
    p.set_defaults(func=run)


def lora_params_from_file(adapter_dir: str) -> dict[str, Any]:
    """The base-model parameters a PEFT LoRA file implies, as ``jax.ShapeDtypeStruct`` leaves.

    A LoRA file is complete without its base: ``lora_A`` (r, in) and ``lora_B`` (out, r) give each
    adapted weight's shape, and full tensors (``modules_to_save``, biases) are stored whole. A 2-D
    ``X.weight`` is taken as a linear ``X.kernel``: reading transposes it and writing transposes it
    back, so the exported tensors are the file's own, whatever the module really is.
    """
    import jax
    import numpy as np

    from jaxsparse.convert import read_safetensors
    from jaxsparse.convert.peft_lora import KEY_PREFIX, WEIGHTS_NAME

    tensors, _ = read_safetensors(os.path.join(adapter_dir, WEIGHTS_NAME))
    factors: dict[str, dict[str, np.ndarray]] = {}
    leaves: dict[str, jax.ShapeDtypeStruct] = {}
    for key, array in tensors.items():
        name = key.removeprefix(KEY_PREFIX)
        which = next((w for w in ("lora_A", "lora_B") if name.endswith(f".{w}.weight")), None)
        if which:
            factors.setdefault(name[: -len(f".{which}.weight")], {})[which] = array
            continue
        name = name.replace(".base_layer.", ".")
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and array.ndim == 2:
            leaves[f"{module}.kernel"] = jax.ShapeDtypeStruct(array.shape[::-1], array.dtype)
        elif leaf == "weight" and array.ndim == 1:
            leaves[f"{module}.scale"] = jax.ShapeDtypeStruct(array.shape, array.dtype)
        else:
            leaves[name] = jax.ShapeDtypeStruct(array.shape, array.dtype)
    for module, pair in factors.items():
        a, b = pair.get("lora_A"), pair.get("lora_B")
        fan_in = a.shape[-1] if a is not None and a.ndim == 2 else 0
        fan_out = b.shape[0] if b is not None and b.ndim == 2 else 0
        dtype = (a if a is not None else b).dtype
        leaves[f"{module}.kernel"] = jax.ShapeDtypeStruct((fan_in, fan_out), dtype)
    params: dict[str, Any] = {}
    for path, leaf in leaves.items():
        node = params
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{adapter_dir}: tensor names clash at {path!r}")
        node[last] = leaf
    return params


def recorded_fan_in_fan_out(adapter_dir: str) -> tuple[str, ...]:
    """Modules our own files record as stored (in, out) in Hugging Face (GPT-2 Conv1D), from the layout
    metadata jaxsparse writes; empty for files other tools wrote."""
    from jaxsparse import tree as tree_lib
    from jaxsparse.convert import read_layout, read_safetensors

    for name in ("adapter_model.safetensors", "sparse_deltas.safetensors"):
        path = os.path.join(adapter_dir, name)
        if os.path.isfile(path):
            _, metadata = read_safetensors(path)
            layout = read_layout(metadata, path) or {}
            return tuple(
                sorted(
                    tree_lib.module_of(v["path"])
                    for v in layout.values()
                    if tree_lib.leaf_name(v["path"]) == "kernel" and not v["transposed"]
                )
            )
    return ()


def run(args: argparse.Namespace) -> int:
    """Errors reach the user as one line through :func:`jaxsparse.cli.main`."""
    from jaxsparse.atomic import check_output_dir
    from jaxsparse.cli.common import describe, load_base_for_adapter

    check_output_dir(args.output, overwrite=args.overwrite)  # before any model is loaded
    if getattr(args, "retain_ratio", None) is not None:
        return export_pruned(args)
    from jaxsparse.adapter_io import adapter_format, load_adapter, save_adapter
    from jaxsparse.convert.peft import save_peft
    from jaxsparse.delta import LowRankDelta

    if args.model is None and adapter_format(args.adapter) == "peft_lora":
        return export_lora_without_base(args)
    model, model_path = None, None
    try:
        model, hints = load_base_for_adapter(args.model, args.adapter, verb="export")
        model_path = hints["model_path"]
    except ValueError as e:
        if args.model is not None or "pass --model" not in str(e):
            raise
    fan_in_fan_out = model.fan_in_fan_out if model is not None else recorded_fan_in_fan_out(args.adapter)
    try:
        adapter = load_adapter(args.adapter, model=model, fan_in_fan_out=fan_in_fan_out)
    except ValueError as e:
        if model is None and "params" in str(e):
            raise ValueError(f"{e} (pass --model)") from None
        raise
    if args.format == "peft":
        written = save_peft(
            adapter, args.output, model=model, fan_in_fan_out=fan_in_fan_out, overwrite=args.overwrite
        )
    else:
        if any(isinstance(d, LowRankDelta) for d in adapter.deltas.values()):
            raise ValueError(f"{args.adapter}: {LORA_NOT_SPARSE}")
        tokenizer = None
        if any(
            os.path.isfile(os.path.join(args.adapter, f"new_embeddings_init.{ext}"))
            for ext in ("safetensors", "pt")
        ):
            # Tokens were added: the authors' classifier loader reads the tokenizer beside the adapter.
            from jaxsparse.models import load_tokenizer

            tokenizer = load_tokenizer(args.adapter)
        # The authors' loaders open sparta_pretrained_model with transformers' from_pretrained:
        # record the absolute local path of the base we loaded, not an asset name.
        written = save_adapter(
            adapter,
            args.output,
            format="sparta",
            model=model,
            fan_in_fan_out=fan_in_fan_out,
            base_model_name_or_path=model_path,
            overwrite=args.overwrite,
            tokenizer=tokenizer,
        )
        if model_path is not None and model_path.endswith(".gguf"):
            print(
                "jaxsparse export: note: the base model is a .gguf file, which the SpaRTA authors' loaders "
                "cannot open (transformers needs gguf_file=, which they do not pass); to use their package, "
                "save the base as a Hugging Face directory and export again with --model DIR "
                "(see docs/interop.md)",
                file=sys.stderr,
            )
        if model is None:
            print(
                "jaxsparse export: note: without --model, config.json holds no base model config and no empty "
                "entries for untouched parameters, which the SpaRTA authors' loaders expect",
                file=sys.stderr,
            )
    print(f"exported {describe(adapter)} as {written} -> {args.output}")
    return 0


def export_lora_without_base(args: argparse.Namespace) -> int:
    """``export`` of a PEFT LoRA adapter with no ``--model``: read and checked against the shapes its
    own file gives (:func:`lora_params_from_file`), written again with its ``auto_mapping``."""
    from jaxsparse.adapter_io import load_adapter
    from jaxsparse.cli.common import describe
    from jaxsparse.convert import read_json
    from jaxsparse.convert.peft_lora import CONFIG_NAME, save_peft_lora

    adapter = load_adapter(args.adapter, params=lora_params_from_file(args.adapter))
    if args.format == "sparta":
        raise ValueError(f"{args.adapter}: {LORA_NOT_SPARSE}")
    raw = read_json(os.path.join(args.adapter, CONFIG_NAME))
    base_class = (raw.get("auto_mapping") or {}).get("base_model_class")
    save_peft_lora(adapter, args.output, base_model_class=base_class, overwrite=args.overwrite)
    print(f"exported {describe(adapter)} as peft_lora -> {args.output}")
    return 0


def export_pruned(args: argparse.Namespace) -> int:
    """``export --retain-ratio``: a rank-sparse LoRA's top components per module by accumulated
    importance, as a standard PEFT LoRA (:func:`jaxsparse.methods.rank_sparse_lora.save_pruned_checkpoint`)."""
    from jaxsparse.adapter_io import adapter_format, load_adapter
    from jaxsparse.cli.common import describe
    from jaxsparse.convert import read_json
    from jaxsparse.convert.peft_lora import CONFIG_NAME
    from jaxsparse.methods import rank_sparse_lora as rsl

    if args.format != "peft":
        raise ValueError("--retain-ratio writes a PEFT LoRA adapter: use --format peft")
    rsl.check_retain_ratio(args.retain_ratio, "--retain-ratio")
    if adapter_format(args.adapter) != "peft_lora":
        raise ValueError(
            f"{args.adapter}: --retain-ratio needs a rank-sparse LoRA adapter (a PEFT LoRA directory)"
        )
    importance = rsl.read_importance(args.adapter)
    adapter = load_adapter(args.adapter, params=lora_params_from_file(args.adapter))
    adapter = rsl.with_importance(adapter, importance)
    raw = read_json(os.path.join(args.adapter, CONFIG_NAME))
    base_class = (raw.get("auto_mapping") or {}).get("base_model_class")
    sizes = rsl.save_pruned_checkpoint(
        adapter, args.output, args.retain_ratio, base_model_class=base_class, overwrite=args.overwrite
    )
    pruned = load_adapter(args.output, params=lora_params_from_file(args.output))
    print(
        f"kept the top {args.retain_ratio:g} of each module's rank components: {sizes['params_before']:,} -> "
        f"{sizes['params_after']:,} LoRA values, adapter_model.safetensors {sizes['bytes_before'] / 1e6:.2f} MB -> "
        f"{sizes['bytes_after'] / 1e6:.2f} MB ({sizes['bytes_after'] / sizes['bytes_before']:.1%})"
    )
    print(f"exported {describe(pruned)} as peft_lora -> {args.output}")
    return 0
