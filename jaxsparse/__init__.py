"""jaxsparse: sparse parameter-efficient fine-tuning for JAX/Flax.

The public API, at the top (``import jaxsparse as js``):

- method configs: :class:`ShiraConfig`, :class:`SpartaConfig`, :class:`LoraConfig`, :class:`SQFTConfig`;
- ``init(params, config, key)``: the adapter of any method config (like PEFT's ``get_peft_model``),
  found through :mod:`jaxsparse.methods.registry`;
- the adapter pytree: :class:`Adapter`, :class:`SparseDelta`, :class:`LowRankDelta`, and
  ``apply(params, adapter)`` (effective params, inside the loss);
- ``merge`` / ``merge_inplace`` / ``unmerge`` / ``switch`` / ``fuse`` / ``validate``: jitted scatters
  (:mod:`jaxsparse.merge`);
- ``save_adapter`` / ``load_adapter`` / ``adapter_format``: PEFT SHiRA, PEFT LoRA and SpaRTA files;
- ``models`` (the model zoo) and ``from_pretrained`` (a Hugging Face directory or a ``.gguf`` file);
- the train-step helpers of :mod:`jaxsparse.train`: :class:`TrainState`, ``init_train_state``,
  ``make_loss``, ``make_train_step``, ``make_eval_step``;
- ``__version__``.

Each name is imported from its module on first use (``jaxsparse --help`` and ``import jaxsparse``
stay instant: jax is not imported until a name that needs it is). Everything else stays in its
module: ``from jaxsparse.masks import ...``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import jaxsparse as js
    >>> params = {"lin": {"kernel": jnp.ones((4, 4))}}
    >>> adapter = js.init(params, js.SpartaConfig(density=0.25), jax.random.key(0))
    >>> merged, saved = js.merge(params, adapter)
    >>> bool((js.unmerge(merged, adapter, saved)["lin"]["kernel"] == params["lin"]["kernel"]).all())
    True
"""

import importlib as _importlib

# Public name -> (module, attribute in it); attribute None: the module itself.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "__version__": ("jaxsparse.version", "__version__"),
    # method configs, and the one entry point for all of them
    "LoraConfig": ("jaxsparse.methods.lora", "LoraConfig"),
    "SQFTConfig": ("jaxsparse.methods.sqft", "SQFTConfig"),
    "ShiraConfig": ("jaxsparse.methods.shira", "ShiraConfig"),
    "SpartaConfig": ("jaxsparse.methods.sparta", "SpartaConfig"),
    "init": ("jaxsparse.methods.registry", "init_adapter"),
    # the adapter pytree
    "Adapter": ("jaxsparse.delta", "Adapter"),
    "LowRankDelta": ("jaxsparse.delta", "LowRankDelta"),
    "SparseDelta": ("jaxsparse.delta", "SparseDelta"),
    "apply": ("jaxsparse.delta", "apply"),
    # merging: `merge` is the module jaxsparse.merge, callable as its function merge.merge
    # (a package attribute and the submodule of the same name cannot differ; see merge.py)
    "merge": ("jaxsparse.merge", None),
    "merge_inplace": ("jaxsparse.merge", "merge_inplace"),
    "unmerge": ("jaxsparse.merge", "unmerge"),
    "switch": ("jaxsparse.merge", "switch"),
    "fuse": ("jaxsparse.merge", "fuse"),
    "validate": ("jaxsparse.merge", "validate"),
    # adapter files
    "adapter_format": ("jaxsparse.adapter_io", "adapter_format"),
    "load_adapter": ("jaxsparse.adapter_io", "load_adapter"),
    "save_adapter": ("jaxsparse.adapter_io", "save_adapter"),
    # models
    "models": ("jaxsparse.models", None),
    "from_pretrained": ("jaxsparse.models", "from_pretrained"),
    # training
    "TrainState": ("jaxsparse.train", "TrainState"),
    "init_train_state": ("jaxsparse.train", "init_train_state"),
    "make_eval_step": ("jaxsparse.train", "make_eval_step"),
    "make_loss": ("jaxsparse.train", "make_loss"),
    "make_train_step": ("jaxsparse.train", "make_train_step"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    """Import a public name from its module on first access (PEP 562), then keep it here."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxsparse' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    module = _importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # the public names, and whatever submodules are loaded (their attributes are set on import)
    return sorted(set(__all__) | {name for name in globals() if not name.startswith("_")})
