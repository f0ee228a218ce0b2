"""The contract every model in the zoo meets, and the registry the loaders dispatch on.

A :class:`Model` couples a Hugging Face config, a parameter pytree and a *pure* forward function
``apply_fn(params, input_ids, attention_mask=None, **kwargs)``. Parameters are a nested dict whose
dotted paths are the Hugging Face module paths with Flax leaf names (``kernel`` (in, out),
``bias``, ``embedding``, ``scale``); see :mod:`jaxsparse.models.naming`. Adapters are applied to
``params`` as pure tree transforms before calling ``apply_fn``.

Tasks: ``"base"`` (last hidden state (B, T, H)), ``"causal_lm"`` (logits (B, T, V)) and
``"seq_cls"`` (logits (B, num_labels)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

TASKS = ("base", "causal_lm", "seq_cls")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How to build one ``model_type`` for each task it supports.

    ``build(config, task, dtype) -> (apply_fn, abstract_params)`` where ``abstract_params`` is the
    params pytree of ``jax.ShapeDtypeStruct`` leaves. ``fan_in_fan_out`` lists module names whose
    Hugging Face weight is already (in, out) (GPT-2 ``Conv1D``). ``tied`` maps a parameter path that
    Hugging Face may omit from a checkpoint to the path it is tied to (e.g. ``lm_head``).
    """

    model_type: str
    tasks: tuple[str, ...]
    build: Callable[..., tuple[Callable[..., Any], Any]]
    fan_in_fan_out: tuple[str, ...] = ()


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add an architecture to the registry (one call per ``model_type``)."""
    ARCHITECTURES[arch.model_type] = arch
    return arch


def architecture(model_type: str) -> Architecture:
    """The registered architecture for ``model_type``; ``ValueError`` listing the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: Hugging Face ``config``, ``params`` pytree and pure ``apply_fn``."""

    config: Any
    params: Any
    apply_fn: Callable[..., Any]
    task: str

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def fan_in_fan_out(self) -> tuple[str, ...]:
        return architecture(self.model_type).fan_in_fan_out

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        return self.apply_fn(self.params, input_ids, attention_mask, **kwargs)
