"""Save and load adapters in their native on-disk formats, detecting the format when loading.

===============  ===========================================================  ==============================
format           files                                                        adapters
===============  ===========================================================  ==============================
``peft_shira``   ``adapter_config.json`` (``peft_type: "SHIRA"``) +           :class:`ShiraConfig` (and any
                 ``adapter_model.safetensors``                                sparse adapter with k = r(m+n))
``peft_lora``    ``adapter_config.json`` (``peft_type: "LORA"``) + same       :class:`LoraConfig`
``sparta``       ``config.json`` with ``sparta_pretrained_model`` +           :class:`SpartaConfig` (any
                 ``sparse_deltas.safetensors`` (or ``sparse_deltas.pt``)      sparse adapter)
===============  ===========================================================  ==============================

Writes are atomic (the directory appears complete or not at all). Loading with the base model's
``params`` (or ``model=``) resolves names and shapes by the naming rule and then checks the adapter
against the model with :func:`jaxsparse.merge.validate`.

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from jaxsparse.delta import Adapter, SparseDelta
    >>> from jaxsparse.methods.sparta import SpartaConfig
    >>> params = {"lin": {"kernel": jnp.zeros((3, 2))}}
    >>> d = SparseDelta(jnp.array([1, 4], jnp.int32), jnp.array([0.5, 2.0]), (3, 2))
    >>> out = tempfile.mkdtemp() + "/adapter"
    >>> save_adapter(Adapter({"lin.kernel": d}, config=SpartaConfig(density=0.3)), out)
    'sparta'
    >>> adapter_format(out)
    'sparta'
    >>> load_adapter(out, params).deltas["lin.kernel"].values.tolist()
    [0.5, 2.0]
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from jaxsparse.convert import DIFFERENT_BASE_HINT, AdapterFormatError, read_json
from jaxsparse.delta import Adapter

PyTree = Any
FORMATS = ("peft_shira", "peft_lora", "sparta")
PEFT_TYPES = {"SHIRA": "peft_shira", "LORA": "peft_lora"}
PEFT_CONFIG = "adapter_config.json"
SPARTA_CONFIG = "config.json"
SPARTA_WEIGHTS = ("sparse_deltas.safetensors", "sparse_deltas.pt")


def adapter_format(adapter_dir: str | os.PathLike) -> str:
    """``"peft_shira"``, ``"peft_lora"`` or ``"sparta"``; :class:`AdapterFormatError` for anything else.

    PEFT adapters are told apart by ``peft_type`` in ``adapter_config.json``; SpaRTA adapters by
    ``sparse_deltas.safetensors`` / ``sparse_deltas.pt`` beside a ``config.json``.
    """
    adapter_dir = os.fspath(adapter_dir)
    if not os.path.isdir(adapter_dir):
        what = "does not exist" if not os.path.exists(adapter_dir) else "is not a directory"
        raise AdapterFormatError(f"{adapter_dir}: {what} (an adapter is a directory)")
    peft_config = os.path.join(adapter_dir, PEFT_CONFIG)
    if os.path.isfile(peft_config):
        peft_type = read_json(peft_config).get("peft_type")
        if not isinstance(peft_type, str) or peft_type not in PEFT_TYPES:
            raise AdapterFormatError(
                f"{peft_config}: unsupported peft_type {peft_type!r}; jaxsparse reads {sorted(PEFT_TYPES)}"
            )
        return PEFT_TYPES[peft_type]
    if any(os.path.isfile(os.path.join(adapter_dir, w)) for w in SPARTA_WEIGHTS):
        if not os.path.isfile(os.path.join(adapter_dir, SPARTA_CONFIG)):
            raise AdapterFormatError(f"{adapter_dir}: has SpaRTA sparse deltas but no {SPARTA_CONFIG}")
        return "sparta"
    found = sorted(os.listdir(adapter_dir))
    raise AdapterFormatError(
        f"{adapter_dir}: not an adapter directory: expected {PEFT_CONFIG} (PEFT) or {SPARTA_CONFIG} + "
        f"{SPARTA_WEIGHTS[0]} (SpaRTA); found {found[:10]}{' ...' if len(found) > 10 else ''}"
    )


def _default_format(adapter: Adapter) -> str:
    from jaxsparse.methods import registry

    config = adapter.config
    try:
        return registry.for_config(config).native_format
    except ValueError:
        raise ValueError(
            f"cannot tell the on-disk format for an adapter with config {type(config).__name__}; pass format= "
            f"one of {FORMATS}"
        ) from None


def _model_parts(model: Any, params: PyTree | None, fan_in_fan_out: Sequence[str] | None) -> tuple[Any, Any]:
    if model is not None:
        params = model.params if params is None else params
        fan_in_fan_out = tuple(model.fan_in_fan_out) if fan_in_fan_out is None else fan_in_fan_out
    return params, tuple(fan_in_fan_out or ())


def _name_of(model: Any) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return name or None


def save_adapter(
    adapter: Adapter,
    out_dir: str | os.PathLike,
    *,
    format: str | None = None,
    model: Any = None,
    params: PyTree | None = None,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: Sequence[str] | None = None,
    hf_config: Any = None,
    overwrite: bool = False,
    tokenizer: Any = None,
) -> str:
    """Write ``adapter`` to ``out_dir`` in ``format`` (default: its method's native format); returns it.

    ``model`` (a :class:`jaxsparse.models.base.Model`) supplies ``params``, ``fan_in_fan_out``, the
    Hugging Face config (copied into a SpaRTA ``config.json``) and the base model's name; each can
    also be given on its own. With params, the adapter is validated against them first, so a bad
    adapter never reaches the disk. ``out_dir`` must be new or empty; with ``overwrite=True`` it may
    also be a previous jaxsparse output holding nothing else (:func:`jaxsparse.atomic.atomic_dir`):
    nothing else is ever deleted. ``tokenizer`` (SpaRTA only) is saved inside the directory, as the
    authors' classifier loader wants for an adapter that added tokens.
    """
    format = format or _default_format(adapter)
    if format not in FORMATS:
        raise ValueError(f"unknown adapter format {format!r}; choose one of {FORMATS}")
    params, fan_in_fan_out = _model_parts(model, params, fan_in_fan_out)
    base = base_model_name_or_path or _name_of(model)
    if params is not None:
        from jaxsparse import merge

        merge.validate(params, adapter)
    if format == "peft_shira":
        from jaxsparse.convert.peft_shira import save_peft_shira

        save_peft_shira(
            adapter,
            out_dir,
            base_model_name_or_path=base,
            fan_in_fan_out=fan_in_fan_out,
            overwrite=overwrite,
            base_model_class=_base_model_class(model),
        )
    elif format == "sparta":
        from jaxsparse.convert.sparta import save_sparta

        save_sparta(
            adapter,
            out_dir,
            base_model_name_or_path=base,
            hf_config=hf_config if hf_config is not None else _task_config(model),
            params=params,
            fan_in_fan_out=fan_in_fan_out,
            overwrite=overwrite,
            tokenizer=tokenizer,
        )
    else:
        from jaxsparse.convert.peft_lora import save_peft_lora

        base_class = _base_model_class(model)
        lora_config = adapter.config
        if (
            base_model_name_or_path
            and dataclasses.is_dataclass(lora_config)
            and hasattr(lora_config, "base_model_name_or_path")
        ):
            # PEFT LoRA records the base in its config, like PEFT's own adapter_config.json.
            adapter = dataclasses.replace(
                adapter,
                config=dataclasses.replace(lora_config, base_model_name_or_path=base_model_name_or_path),
            )
        save_peft_lora(
            adapter,
            out_dir,
            fan_in_fan_out=fan_in_fan_out,
            base_model_class=base_class,
            overwrite=overwrite,
        )
    return format


def _base_model_class(model: Any) -> str | None:
    """The transformers class of the model an adapter is made on, e.g. BertForMaskedLM for a
    masked_lm run on a BertModel checkpoint: PEFT records it (auto_mapping) for adapters without a
    task_type."""
    architectures = getattr(getattr(model, "config", None), "architectures", None) or [None]
    if getattr(model, "task", None) is not None:
        from jaxsparse.models.base import architecture

        return architecture(model.model_type).hf_class_name(model.config, model.task)
    return architectures[0]


def _task_config(model: Any) -> Any:
    """The model's Hugging Face config naming the class of its task (e.g. BertForMaskedLM for a
    masked_lm model loaded from a BertModel checkpoint), so readers load the same heads."""
    config = getattr(model, "config", None)
    if config is None or getattr(model, "task", None) is None:
        return config
    out = dict(config.to_dict()) if hasattr(config, "to_dict") else dict(config)
    out["architectures"] = [_base_model_class(model)]
    return out


def load_adapter(
    adapter_dir: str | os.PathLike,
    params: PyTree | None = None,
    *,
    model: Any = None,
    fan_in_fan_out: Sequence[str] | None = None,
) -> Adapter:
    """The adapter in ``adapter_dir``, whatever its format (see :func:`adapter_format`).

    ``params`` (or ``model``) is the base model: needed for adapters other tools wrote (PEFT and
    the SpaRTA authors record no weight shapes) and always for PEFT LoRA; when given, the result is
    checked with :func:`jaxsparse.merge.validate` (paths, shapes, dtypes, index ranges, NaN/inf).
    """
    format = adapter_format(adapter_dir)
    params, fan_in_fan_out = _model_parts(model, params, fan_in_fan_out)
    if format == "peft_shira":
        from jaxsparse.convert.peft_shira import load_peft_shira

        adapter = load_peft_shira(adapter_dir, params, fan_in_fan_out=fan_in_fan_out)
    elif format == "sparta":
        from jaxsparse.convert.sparta import load_sparta

        adapter = load_sparta(adapter_dir, params, fan_in_fan_out=fan_in_fan_out)
    else:
        if params is None:
            raise AdapterFormatError(
                f"{adapter_dir}: a PEFT LoRA adapter; pass the base model's params to load it"
            )
        from jaxsparse.convert.peft_lora import load_peft_lora

        adapter = load_peft_lora(adapter_dir, params, fan_in_fan_out=fan_in_fan_out)
    if params is not None:
        from jaxsparse import merge

        try:
            merge.validate(params, adapter)
        except ValueError as e:
            raise AdapterFormatError(
                f"{os.fspath(adapter_dir)}: adapter does not fit the model {DIFFERENT_BASE_HINT}: {e}"
            ) from None
    return adapter
