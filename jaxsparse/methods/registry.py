"""The method registry: the one place the trainer, the CLI, ``info`` and ``export`` find a method.

Each method is one module in ``jaxsparse/methods/`` that declares ``METHOD = Method(...)``: its
name, its frozen config class, its ``init(params, config, key) -> Adapter``, which keys of the
training YAML fill which config fields, and its native on-disk format. Nothing else needs to
change to add a method: the registry discovers the modules of this package that declare
``METHOD`` (imported on first use, so ``jaxsparse --help`` stays instant).

Example:
    >>> import jax, jax.numpy as jnp
    >>> names()
    ('lora', 'rank_sparse_lora', 'shira', 'sparse_lora', 'sparta', 'sqft')
    >>> method = get("sparta")
    >>> config = method.config_from({"adapter.density": 0.25, "seed": 0}, target_modules=["lin"])
    >>> config.density, config.target_modules
    (0.25, ('lin',))
    >>> adapter = init_adapter({"lin": {"kernel": jnp.ones((4, 8))}}, config)
    >>> adapter.deltas["lin.kernel"].k, for_config(config).native_format
    (8, 'sparta')
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Method:
    """What the rest of jaxsparse needs to know about one fine-tuning method.

    - ``yaml_keys``: dotted key of the training config (``adapter.r``, ``seed``) -> field of
      ``config_class`` it fills; the fields every method shares (``target_modules``,
      ``exclude_modules``, ``modules_to_save``, ``task_type``, ``base_model_name_or_path``) are
      passed by the caller.
    - ``default_target_modules``: what ``adapter.target_modules: null`` means for this method
      (``None``: the config class's own default).
    - ``native_format``: the on-disk format an adapter of this method is saved in by default.
    """

    name: str
    config_class: type
    init: Callable[..., Any]
    yaml_keys: Mapping[str, str]
    native_format: str
    default_target_modules: Any = None
    description: str = ""

    def config_from(self, values: Mapping[str, Any], **common: Any) -> Any:
        """The method's config from the training config's ``values`` (dotted keys, as in
        ``yaml_keys``) and the shared fields in ``common``; a key absent from ``values``, or null
        there, keeps the config class's default for its field (``KeyError`` if the field has none).

        Null means "this method's default" because some YAML keys are shared by several methods
        with different defaults (``adapter.sparsity``: SpaRTA's budget, sparse LoRA's pruning)."""
        fields = {f.name: f for f in dataclasses.fields(self.config_class)}

        def has_default(field: str) -> bool:
            f = fields.get(field)
            return f is not None and (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )

        missing = [k for k, f in self.yaml_keys.items() if k not in values and not has_default(f)]
        if missing:
            raise KeyError(f"method {self.name!r} needs the config keys {missing}")
        kwargs = {
            field: values[key]
            for key, field in self.yaml_keys.items()
            if key in values and not (values[key] is None and has_default(field))
        }
        if common.get("target_modules") is None and self.default_target_modules is not None:
            common = {**common, "target_modules": self.default_target_modules}
        return self.config_class(**common, **kwargs)


@functools.cache
def _methods() -> dict[str, Method]:
    package = importlib.import_module("jaxsparse.methods")
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "registry":
            continue
        method = getattr(importlib.import_module(f"jaxsparse.methods.{info.name}"), "METHOD", None)
        if isinstance(method, Method):
            if method.name in found:
                raise RuntimeError(f"two method modules declare the method name {method.name!r}")
            found[method.name] = method
    return found


def names() -> tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(_methods()))


def get(name: str) -> Method:
    """The method called ``name``; ``ValueError`` naming the known ones otherwise."""
    methods = _methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; known methods: {list(names())}")
    return methods[name]


def for_config(config: Any) -> Method:
    """The method whose config class ``config`` is an instance of (its exact class first, so a
    subclass config such as SQFT's ``SQFTConfig(LoraConfig)`` finds its own method)."""
    for method in _methods().values():
        if type(config) is method.config_class:
            return method
    for method in _methods().values():
        if isinstance(config, method.config_class):
            return method
    raise ValueError(
        f"{type(config).__name__} is not the config of a registered method; known configs: "
        f"{[m.config_class.__name__ for m in _methods().values()]}"
    )


def init_adapter(params: PyTree, config: Any, key: Any = None, **kwargs: Any) -> Any:
    """One entry point for every method (like PEFT's ``get_peft_model``): the adapter ``config``'s
    method builds over ``params``. ``key`` may be omitted for methods seeded by their config
    (SHiRA's ``random_seed``, SpaRTA's ``seed``); LoRA needs one."""
    keys = () if key is None else (key,)
    return for_config(config).init(params, config, *keys, **kwargs)
