"""``jaxsparse import``: bring a PEFT (SHiRA/LoRA) or SpaRTA adapter into jaxsparse, checked against its base model.

Also home of what ``export`` and ``merge`` share: loading the base model an adapter needs (with the
right task head: a SEQ_CLS PEFT adapter or a SpaRTA classifier loads the model as a sequence
classifier with the adapter's number of labels) and the architecture check.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DESCRIPTION = """\
Import an adapter written by PEFT (SHiRA or LoRA) or by the SpaRTA authors' code. It is checked
against the base model (architecture, every target exists, shapes, index ranges, finite values)
and written to --output in its native format with the weight shapes recorded, so jaxsparse (and
PEFT / SpaRTA) can load it. Nothing is written if any check fails.

examples:
  jaxsparse import --adapter peft-lora-dir --model path/to/hf-model --output adapters/lora
  jaxsparse import --adapter sparta-dir --model SmolLM2-135M-Instruct.Q4_1.gguf --output adapters/sparta
"""

ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    TypeError,
    KeyError,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import",
        help="import a PEFT SHiRA/LoRA or SpaRTA adapter, validated against its base model",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter directory (PEFT or SpaRTA layout)"
    )
    p.add_argument(
        "--model", required=True, metavar="MODEL", help="base model: a local HF directory or a .gguf file"
    )
    p.add_argument("--output", required=True, metavar="DIR", help="where to write the imported adapter")
    p.set_defaults(func=run)


def fail(verb: str, error: BaseException) -> int:
    """Print ``error`` as one line on stderr and return the CLI's error status (2)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"jaxsparse {verb}: error: {message}", file=sys.stderr)
    return 2


def _adapter_hints(adapter_dir: str) -> dict[str, Any]:
    """What the adapter's own files say about its base model: ``model_type``, ``task``, ``num_labels``,
    ``id2label``, ``base`` (the recorded base model name or path)."""
    from jaxsparse.adapter_io import adapter_format
    from jaxsparse.convert import read_json, read_safetensors

    fmt = adapter_format(adapter_dir)
    hints: dict[str, Any] = {"format": fmt}
    if fmt == "sparta":
        raw = read_json(os.path.join(adapter_dir, "config.json"))
        hints["model_type"] = raw.get("model_type")
        hints["base"] = raw.get("sparta_pretrained_model")
        architectures = raw.get("architectures") or ()
        if raw.get("problem_type") == "single_label_classification" or any(
            a.endswith("ForSequenceClassification") for a in architectures
        ):
            hints["task"] = "seq_cls"
            hints["id2label"] = raw.get("id2label")
        return hints
    raw = read_json(os.path.join(adapter_dir, "adapter_config.json"))
    hints["base"] = raw.get("base_model_name_or_path")
    base_class = (raw.get("auto_mapping") or {}).get("base_model_class")
    if base_class:
        hints["model_type"] = _model_type_of_class(base_class)
    task_type = raw.get("task_type")
    if task_type == "SEQ_CLS":
        hints["task"] = "seq_cls"
        tensors, _ = read_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
        heads = [v for k, v in tensors.items() if k.endswith((".classifier.weight", ".score.weight"))]
        heads += [v for k, v in tensors.items() if k.endswith(".classifier.out_proj.weight")]
        if heads and getattr(heads[0], "ndim", 0) == 2:
            hints["num_labels"] = int(heads[0].shape[0])
    elif task_type == "CAUSAL_LM":
        hints["task"] = "causal_lm"
    return hints


def _model_type_of_class(class_name: str) -> str | None:
    try:
        import transformers

        return getattr(transformers, class_name).config_class.model_type
    except (ImportError, AttributeError):
        return None


def load_base_for_adapter(
    model_path: str | None, adapter_dir: str, *, verb: str = "import"
) -> tuple[Any, dict]:
    """``(model, hints)``: the base model for ``adapter_dir`` (``model_path`` or, if ``None``, the base the
    adapter records, when it is a local path), with the task head the adapter needs; ``ValueError`` when
    the adapter was made for another architecture."""
    from jaxsparse.models import from_pretrained

    hints = _adapter_hints(adapter_dir)
    if model_path is None:
        base = hints.get("base")
        if not base or not os.path.exists(base):
            raise ValueError(
                f"{adapter_dir}: the adapter records base model {base!r}, which is not a local path; pass --model"
            )
        model_path = base
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"{model_path}: base model not found (a local HF directory or a .gguf file)")
    kwargs: dict[str, Any] = {}
    if hints.get("task"):
        kwargs["task"] = hints["task"]
    if hints.get("id2label"):
        kwargs["id2label"] = hints["id2label"]
    elif hints.get("num_labels"):
        kwargs["num_labels"] = hints["num_labels"]
    model = from_pretrained(model_path, **kwargs)
    wanted = hints.get("model_type")
    if wanted and wanted != model.model_type:
        raise ValueError(
            f"{adapter_dir}: the adapter was made for a {wanted!r} model, but {model_path} is a "
            f"{model.model_type!r} model"
        )
    return model, hints


def describe(adapter: Any) -> str:
    """One line: method, number of adapted weights, trainable scalars."""
    method = type(adapter.config).__name__.removesuffix("Config") or "adapter"
    return (
        f"{method}: {len(adapter.deltas)} adapted weights, {len(adapter.dense)} full tensors, "
        f"{adapter.num_trainable():,} trainable values"
    )


def run(args: argparse.Namespace) -> int:
    try:
        from jaxsparse.adapter_io import load_adapter, save_adapter

        model, hints = load_base_for_adapter(args.model, args.adapter)
        adapter = load_adapter(args.adapter, model=model)
        save_adapter(
            adapter, args.output, format=hints["format"], model=model, base_model_name_or_path=args.model
        )
    except ERRORS as e:
        return fail("import", e)
    print(f"imported {hints['format']} adapter ({describe(adapter)}) -> {args.output}")
    return 0
