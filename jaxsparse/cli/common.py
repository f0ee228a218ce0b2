"""What the adapter verbs (``export``, ``import``, ``merge``) share, and any verb may use.

Loading the base model an adapter needs (with the right task head: a SEQ_CLS PEFT adapter or a
SpaRTA classifier loads the model as a sequence classifier with the adapter's number of labels),
the architecture check, the one-line adapter description, and how errors reach the user: one line
on stderr, exit status 2.

Example:
    >>> fail("export", ValueError("bad adapter"))
    2
"""

from __future__ import annotations

import os
import sys
from typing import Any

# The errors a config, a path or a file can cause: reported as one line (exit 2), not a traceback.
# ValueError covers ConfigError, TargetError, AdapterFormatError, DataError, the model loader's
# CheckpointError and JSON/UTF-8 decoding errors; OSError covers missing files, PermissionError,
# OutputExistsError, a full disk.
ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    TypeError,
    KeyError,
)
# Errors of modules the CLI imports only when needed, as (module, class): an error of one of these
# classes can only have been raised once its module was imported, so they are looked up then.
LAZY_ERRORS: tuple[tuple[str, str], ...] = (
    ("jaxsparse.checkpoint", "CheckpointError"),  # a RuntimeError: a missing or mismatched checkpoint
    ("safetensors", "SafetensorError"),  # a corrupt or truncated .safetensors file
    ("yaml", "YAMLError"),  # a config file that is not YAML
)
# Set to 1 to see the traceback of an error the CLI would report as one line.
DEBUG_ENV = "JAXSPARSE_DEBUG"


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is one the CLI reports as one line (see :data:`ERRORS`, :data:`LAZY_ERRORS`)."""
    if isinstance(error, ERRORS):
        return True
    for module_name, class_name in LAZY_ERRORS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(error, cls):
            return True
    return False


def message_of(error: BaseException) -> str:
    """``error`` as one line: its own words, the file an OSError is about, no repr quoting."""
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    elif isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{os.fsdecode(error.filename)}: {error.strerror}"
        if error.filename2 is not None:
            text += f" (-> {os.fsdecode(error.filename2)})"
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(verb: str, error: BaseException) -> int:
    """Print ``error`` as one line on stderr and return the CLI's error status (2)."""
    print(f"jaxsparse {verb}: error: {message_of(error)}", file=sys.stderr)
    return 2


def add_output_args(parser: Any, *, what: str = "output directory", required: bool = True) -> None:
    """``--output DIR`` and ``--overwrite``, with the rules every writing verb follows; the verb then
    calls :func:`jaxsparse.atomic.check_output_dir` before any heavy work and writes through
    :func:`jaxsparse.atomic.atomic_dir` with ``overwrite=args.overwrite``."""
    parser.add_argument(
        "--output",
        required=required,
        metavar="DIR",
        help=f"{what}: a new or empty directory (an existing non-empty one is refused)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous jaxsparse output in DIR; only a directory jaxsparse wrote (its "
        ".jaxsparse-output.json marker lists every entry) is replaced, anything else is refused",
    )


def add_calibration_args(parser: Any, *, used_by: str) -> None:
    """The calibration options the compression verbs share (``--calibration``, ``--samples``,
    ``--seq-len``, ``--seed``, ``--batch-size``); check them with :func:`check_calibration_args`."""
    parser.add_argument(
        "--calibration",
        default="bbc_news",
        metavar="FILE|NAME",
        help=f"calibration text for {used_by}: a text/.jsonl file or bbc_news / rotten_tomatoes "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--samples", type=int, default=128, metavar="N", help="calibration sequences (default: 128)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=512, metavar="L", help="tokens per sequence (default: 512)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: 0)")
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="B", help="sequences per jitted micro-batch (default: 8)"
    )


def check_calibration_args(args: Any) -> None:
    """``ValueError`` naming the option when a calibration count is below 1."""
    for name in ("samples", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def tokenizer_and_calibration(args: Any, *, needed_by: str | None) -> tuple[Any, Any, dict | None]:
    """``(tokenizer, calibration, settings)`` for a compression verb: the model's tokenizer (``None``
    when it has none and nothing needs it), the calibration tokens when ``needed_by`` names the
    algorithm that needs them (else ``None``), and what to record of them in the output."""
    from jaxsparse.calibration import load_calibration
    from jaxsparse.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError, TypeError, KeyError) as e:
        if needed_by:
            raise ValueError(
                f"{args.model}: {needed_by} needs the model's tokenizer for calibration: {e}"
            ) from None
        return None, None, None
    if not needed_by:
        return tokenizer, None, None
    cal = load_calibration(
        args.calibration, tokenizer, samples=args.samples, seq_len=args.seq_len, seed=args.seed, progress=True
    )
    settings = {
        "source": cal.source,
        "samples": cal.samples,
        "seq_len": cal.seq_len,
        "seed": cal.seed,
        "stream_tokens": cal.stream_tokens,
    }
    return tokenizer, cal, settings


def adapter_hints(adapter_dir: str) -> dict[str, Any]:
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
        elif any(a.endswith("ForMaskedLM") for a in architectures):
            hints["task"] = "masked_lm"  # the MLM heads, also on an encoder-only base checkpoint
        return hints
    raw = read_json(os.path.join(adapter_dir, "adapter_config.json"))
    hints["base"] = raw.get("base_model_name_or_path")
    base_class = (raw.get("auto_mapping") or {}).get("base_model_class")
    if base_class:
        hints["model_type"] = model_type_of_class(base_class)
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
    elif task_type is None and base_class and base_class.endswith("ForMaskedLM"):
        # PEFT has no MLM task type: a masked-LM adapter names its base class instead.
        hints["task"] = "masked_lm"
    return hints


def model_type_of_class(class_name: str) -> str | None:
    try:
        import transformers

        return getattr(transformers, class_name).config_class.model_type
    except (ImportError, AttributeError):
        return None


def load_base_for_adapter(
    model_path: str | None, adapter_dir: str, *, verb: str = "import"
) -> tuple[Any, dict]:
    """``(model, hints)``: the base model for ``adapter_dir`` (``model_path`` or, if ``None``, the base the
    adapter records, when it is a local path or an asset name), with the task head the adapter needs;
    ``hints["model_path"]`` is the absolute path it was loaded from. ``ValueError`` when the adapter was
    made for another architecture."""
    from jaxsparse.config import ASSET_MODELS, resolve_model_path
    from jaxsparse.models import from_pretrained

    hints = adapter_hints(adapter_dir)
    if model_path in ASSET_MODELS:
        model_path = resolve_model_path(model_path)
    if model_path is None:
        base = hints.get("base")
        if base in ASSET_MODELS:
            # An adapter trained on an offline asset records its name (portable): resolve it here.
            base = resolve_model_path(base)
        if not base or not os.path.exists(base):
            raise ValueError(
                f"{adapter_dir}: the adapter records base model {hints.get('base')!r}, which is not a local path; "
                "pass --model"
            )
        model_path = base
    hints["model_path"] = os.path.abspath(model_path)
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
    if hints["format"] == "sparta":
        from jaxsparse.convert.sparta import grow_for_adapter

        model = grow_for_adapter(model, adapter_dir)  # tokens the adapter added to the vocabulary
    return model, hints


def describe(adapter: Any) -> str:
    """One line: method, number of adapted weights, trainable scalars."""
    method = type(adapter.config).__name__.removesuffix("Config") or "adapter"
    return (
        f"{method}: {len(adapter.deltas)} adapted weights, {len(adapter.dense)} full tensors, "
        f"{adapter.num_trainable():,} trainable values"
    )
