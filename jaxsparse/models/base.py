"""The contract every model in the zoo meets, and the registry the loaders dispatch on.

A :class:`Model` couples a Hugging Face config, a parameter pytree and a *pure* forward function
``apply_fn(params, input_ids, attention_mask=None, **kwargs)``. Parameters are a nested dict whose
dotted paths are the Hugging Face module paths with Flax leaf names (``kernel`` (in, out),
``bias``, ``embedding``, ``scale``); see :mod:`jaxsparse.models.naming`. Adapters are applied to
``params`` as pure tree transforms before calling ``apply_fn``.

Tasks: ``"base"`` (last hidden state (B, T, H)), ``"causal_lm"`` (logits (B, T, V)),
``"seq_cls"`` (logits (B, num_labels)) and ``"masked_lm"`` (logits (B, T, V) of an encoder's MLM head).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.tree import leaf_paths, replace_leaves

TASKS = ("base", "causal_lm", "seq_cls", "masked_lm")

# The Hugging Face class name suffix of each task's model class (``GPT2`` overrides causal_lm).
_TASK_CLASS_SUFFIX = {
    "base": "Model",
    "causal_lm": "ForCausalLM",
    "seq_cls": "ForSequenceClassification",
    "masked_lm": "ForMaskedLM",
}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How to build one ``model_type`` for each task it supports.

    ``build(config, task, dtype) -> (apply_fn, abstract_params)`` where ``abstract_params`` is the
    params pytree of ``jax.ShapeDtypeStruct`` leaves. ``fan_in_fan_out`` lists module names whose
    Hugging Face weight is already (in, out) (GPT-2 ``Conv1D``).

    Loading (see :mod:`jaxsparse.models.hub`) also uses:

    - ``base_model_prefix``: the attribute under which a task model holds the base model (``"bert"``,
      ``"transformer"``, ``"model"``). Params of the ``"base"`` task have no prefix (exactly like the
      Hugging Face ``*Model`` class); the loader adds or strips it like transformers does.
    - ``tied``: Hugging Face keys that a checkpoint may hold as a copy of another key (``lm_head.weight``
      -> ``model.embed_tokens.weight``). When tied, our model has no such parameter (the head reads the
      embedding), so the copy is dropped on load and never written.
    - ``ignore_keys``: regexes of non-parameter keys old checkpoints carry (buffers such as GPT-2's
      ``attn.bias``), dropped silently on load.
    - ``unused_keys``: per task, regexes of real weights that task's model has no parameter for
      (BERT's pooler under ``"masked_lm"``), dropped on load with a warning as transformers does.
    - ``hf_class_names``: the transformers class per task, written to ``config.architectures`` on save;
      by default ``<Prefix>Model`` / ``<Prefix>ForCausalLM`` / ``<Prefix>ForSequenceClassification`` /
      ``<Prefix>ForMaskedLM`` from the config class name.
    - ``init``: ``init(config, abstract_params, seed) -> params`` replacing :func:`default_init`
      (e.g. GPT-2's scaled residual projections, Gemma's zero-centred norms).
    - ``dropout``: whether the models take ``dropout_rng=`` (training-time dropout at the config's rates).
    """

    model_type: str
    tasks: tuple[str, ...]
    build: Callable[..., tuple[Callable[..., Any], Any]]
    fan_in_fan_out: tuple[str, ...] = ()
    base_model_prefix: str = "model"
    tied: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ignore_keys: tuple[str, ...] = ()
    unused_keys: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    hf_class_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    init: Callable[[Any, Any, int], Any] | None = None
    dropout: bool = False

    def hf_class_name(self, config: Any, task: str) -> str:
        """The transformers model class for ``task`` (what ``config.architectures`` names)."""
        if task in self.hf_class_names:
            return self.hf_class_names[task]
        prefix = type(config).__name__.removesuffix("Config")
        return prefix + _TASK_CLASS_SUFFIX[task]


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add an architecture to the registry (one call per ``model_type``)."""
    ARCHITECTURES[arch.model_type] = arch
    return arch


def architecture(model_type: str) -> Architecture:
    """The registered architecture for ``model_type``; ``ValueError`` listing the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}")
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


def nnx_build(module_factory: Callable[..., Any]) -> Callable[..., tuple[Callable[..., Any], Any]]:
    """An :attr:`Architecture.build` from a Flax NNX module factory.

    ``module_factory(config, task, dtype, rngs)`` returns an ``nnx.Module`` whose attribute names are
    the Hugging Face module names and whose ``__call__(input_ids, attention_mask=None, **kwargs)``
    gives the task's output. The module is only traced abstractly (no weights are allocated); the
    returned ``apply_fn`` merges the graph with a pure-dict ``params`` on every call, so it is pure
    and jit-able in ``params``.

    Example:
        >>> from flax import nnx
        >>> class Tiny(nnx.Module):
        ...     def __init__(self, config, task, dtype, rngs):
        ...         self.proj = nnx.Linear(2, 3, rngs=rngs)
        ...     def __call__(self, input_ids, attention_mask=None):
        ...         return self.proj(input_ids)
        >>> apply_fn, abstract = nnx_build(Tiny)(None, "base", jnp.float32)
        >>> abstract["proj"]["kernel"].shape
        (2, 3)
        >>> params = {"proj": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
        >>> apply_fn(params, jnp.ones((1, 2))).tolist()
        [[2.0, 2.0, 2.0]]
    """
    from flax import nnx

    def build(config: Any, task: str, dtype: Any = jnp.float32) -> tuple[Callable[..., Any], Any]:
        abstract_module = nnx.eval_shape(lambda: module_factory(config, task, dtype, nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract_module)
        abstract_params = nnx.to_pure_dict(state)

        def apply_fn(params: Any, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
            return nnx.merge(graphdef, params)(input_ids, attention_mask, **kwargs)

        return apply_fn, abstract_params

    return build


def _leaf_rng(seed: int, path: str) -> np.random.Generator:
    # Keyed by path, not position, so a leaf's init does not change when other leaves come and go.
    # NumPy, not jax.random: initialisation runs once, eagerly, and NumPy is far cheaper per leaf.
    return np.random.default_rng([seed, zlib.crc32(path.encode())])


def default_init(
    config: Any, abstract_params: Any, seed: int = 0, *, only: Callable[[str], bool] | None = None
):
    """Random parameters initialised like transformers' ``_init_weights`` for BERT/GPT/Llama-style models.

    ``kernel`` and ``embedding`` leaves ~ normal(0, ``config.initializer_range``), ``bias`` zeros,
    ``scale`` ones. ``only(path)`` restricts initialisation to some leaves (others are returned as
    given), which the loader uses for a fresh classification head.

    Example:
        >>> import types
        >>> cfg = types.SimpleNamespace(initializer_range=0.02)
        >>> abstract = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 2), jnp.float32),
        ...                       "bias": jax.ShapeDtypeStruct((2,), jnp.float32)}}
        >>> p = default_init(cfg, abstract, seed=0)
        >>> p["dense"]["bias"].tolist(), p["dense"]["kernel"].shape
        ([0.0, 0.0], (4, 2))
    """
    std = float(getattr(config, "initializer_range", 0.02))
    new = {}
    for path, leaf in leaf_paths(abstract_params).items():
        if only is not None and not only(path):
            continue
        name = path.rpartition(".")[2]
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if name in ("kernel", "embedding"):
            value = _leaf_rng(seed, path).normal(0.0, std, shape).astype(np.float32)
        elif name == "scale":
            value = np.ones(shape, np.float32)
        else:
            value = np.zeros(shape, np.float32)
        new[path] = jnp.asarray(value, dtype)
    return replace_leaves(abstract_params, new)


def abstract_like(params: Any) -> Any:
    """``jax.ShapeDtypeStruct`` tree of ``params`` (NumPy or JAX leaves)."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
