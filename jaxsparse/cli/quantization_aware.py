"""QA-SparsePEFT adapters in the verbs that load one (``merge``, ``generate``, ``classify``).

A ``"quantization_aware": true`` adapter (SQFT) only means something on two bases: the GPTQ model
(``--model``: its grids and every layer the adapter does not target) and the non-quantized sparse
model it was quantized from (``--non-quant-model``: the ``W`` each targeted layer adds its update to
before rounding). :func:`load_quantization_aware` builds both into one :class:`QuantizationAware`
(the GPTQ model with the targeted kernels swapped for ``W``, :func:`jaxsparse.methods.sqft.qa_base_params`,
and the adapter on the GPTQ grids, :func:`jaxsparse.methods.sqft.with_qa_grids`), so every verb
computes the same ``dequant(quant(W + masked update))`` that ``jaxsparse merge`` writes and
``jaxsparse eval`` measures. :func:`check_non_quant_args` refuses, in one line naming the flag and
the file, the combinations a verb cannot run correctly (a QA adapter without ``--non-quant-model``,
the flag without a QA adapter), rather than silently serving the adapter as plain SparsePEFT.

Example:
    >>> import tempfile
    >>> check_non_quant_args([tempfile.mkdtemp()], None, verb="generate")  # nothing to refuse
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

NON_QUANT_HELP = (
    "for a quantization_aware (QA-SparsePEFT) adapter: the non-quantized sparse model the GPTQ --model was "
    "quantized from (the weights each adapted layer adds its update to before rounding onto --model's grid)"
)


def needs_both_bases(adapter_dir: str | os.PathLike) -> str:
    """The one-line refusal for a QA adapter given without its non-quantized base."""
    return (
        f"adapter {os.fspath(adapter_dir)} is quantization-aware (adapter_config.json): pass the GPTQ base as "
        "--model and the sparse base as --non-quant-model"
    )


def check_non_quant_args(adapter_dirs: list[str], non_quant_model: str | None, *, verb: str) -> str | None:
    """The one QA adapter of ``adapter_dirs`` (``None`` when there is none), after refusing what
    ``verb`` cannot compute correctly: a QA adapter without ``non_quant_model``, a QA adapter beside
    other adapters (its layers are whole re-quantized matrices, which per-row serving cannot share),
    ``non_quant_model`` without a QA adapter. ``ValueError``, one line naming the flag and the file."""
    from jaxsparse.methods.sqft import is_quantization_aware

    qa = [d for d in adapter_dirs if is_quantization_aware(d)]
    if not qa:
        if non_quant_model is not None:
            raise ValueError(
                f"--non-quant-model is only for a quantization_aware (QA-SparsePEFT) adapter; "
                f"{', '.join(adapter_dirs)} {'is not one' if len(adapter_dirs) == 1 else 'are not'} "
                '(adapter_config.json has no "quantization_aware": true)'
            )
        return None
    if len(adapter_dirs) > 1:
        raise ValueError(
            f"adapter {qa[0]} is quantization-aware (adapter_config.json): each of its layers is re-quantized "
            f"whole on the GPTQ grid, which per-row serving cannot share with other adapters; {verb} it alone "
            "(one --adapter, with --model GPTQ and --non-quant-model)"
        )
    if non_quant_model is None:
        raise ValueError(needs_both_bases(qa[0]))
    return qa[0]


@dataclass
class QuantizationAware:
    """A QA adapter on its two bases. ``model``: the GPTQ model (dequantized) whose adapted kernels are
    the non-quantized ``W``; ``adapter``: the deltas on the GPTQ grids
    (:class:`~jaxsparse.quant.qa_delta.QALowRankDelta`), so ``apply(model.params, adapter)`` is the
    merged GPTQ checkpoint's dequantized weights; ``gptq_model``: the GPTQ model as loaded;
    ``qconfig`` / ``layers``: the GPTQ ``quantization_config`` and quantized layers of ``--model``."""

    model: Any
    adapter: Any
    gptq_model: Any
    qconfig: dict[str, Any]
    layers: dict[str, Any]


def load_quantization_aware(
    model_path: str | None, non_quant_path: str, adapter_dir: str, *, verb: str
) -> QuantizationAware:
    """Load the QA adapter in ``adapter_dir`` on the GPTQ ``model_path`` (``None``: the base the
    adapter records) and the non-quantized sparse ``non_quant_path``, as SQFT pairs them. ``ValueError``
    (one line) when ``model_path`` is not a GPTQ checkpoint, ``non_quant_path`` is one, or the two
    models differ in shapes."""
    from jaxsparse.adapter_io import load_adapter
    from jaxsparse.cli.common import load_base_for_adapter
    from jaxsparse.config import resolve_model_path
    from jaxsparse.convert.peft_lora import lora_config_from_peft, read_adapter_config
    from jaxsparse.methods import sqft
    from jaxsparse.quant.qa_base import gptq_config, read_grids

    if gptq_config(non_quant_path) is not None:
        raise ValueError(
            f"--non-quant-model {non_quant_path} is a GPTQ checkpoint; it must be the non-quantized "
            "sparse model the GPTQ --model was quantized from"
        )
    config = lora_config_from_peft(read_adapter_config(adapter_dir), source=adapter_dir)
    if model_path is not None:  # before any model is loaded
        qconfig, layers = read_grids(resolve_model_path(model_path), what="--model")
    gptq, hints = load_base_for_adapter(model_path, adapter_dir, verb=verb)
    gptq_name = f"--model {model_path}"
    if model_path is None:
        gptq_name = f"{adapter_dir}'s base model {hints['model_path']}"
        qconfig, layers = read_grids(hints["model_path"], what=f"{adapter_dir}'s base model")
    non_quant, _ = load_base_for_adapter(non_quant_path, adapter_dir, verb=verb)
    params = sqft.qa_base_params(
        gptq.params, non_quant.params, config, gptq=gptq_name, non_quant=f"--non-quant-model {non_quant_path}"
    )
    model = dataclasses.replace(gptq, params=params)
    adapter = sqft.with_qa_grids(load_adapter(adapter_dir, model=model), layers, source=adapter_dir)
    return QuantizationAware(model, adapter, gptq, qconfig, layers)
