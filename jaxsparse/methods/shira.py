"""SHiRA: k = r * (m + n) trainable entries per targeted 2-D weight (Bhardwaj et al., 2024).

The config mirrors PEFT's ``ShiraConfig`` field for field (same names and defaults), plus the
mask strategies jaxsparse adds (``"magnitude"``, ``"gradient"``, or a custom ``mask_fn``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"q_proj": {"kernel": jnp.ones((8, 8))}, "lm_head": {"kernel": jnp.ones((8, 32))}}
    >>> adapter = init(params, ShiraConfig(r=1, random_seed=0))
    >>> list(adapter.deltas), adapter.deltas["q_proj.kernel"].k
    (['q_proj.kernel'], 16)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxsparse import masks
from jaxsparse import tree as tree_lib
from jaxsparse.delta import Adapter, SparseDelta
from jaxsparse.methods.registry import Method

PyTree = Any
MASK_TYPES = ("random", "magnitude", "gradient")


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, set, frozenset)) else value


@dataclasses.dataclass(frozen=True)
class ShiraConfig:
    """PEFT-compatible SHiRA config (hashable: lists become tuples).

    ``target_modules``: list of module names (suffix match) or a full-match regex; ``None`` means
    every 2-D linear kernel except embeddings and the output head. ``mask_fn(weight, r, key) ->
    bool mask`` overrides ``mask_type`` (the count must be exactly ``r * (m + n)``); it receives
    the weight in our (in, out) kernel layout. ``random_seed=None`` means seed 0 (reproducible,
    unlike PEFT's unseeded generator). ``fan_in_fan_out`` only travels to PEFT's config on export:
    our kernels are always (in, out) and indices always index them in that layout.
    """

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    target_modules: Sequence[str] | str | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: Sequence[str] | None = None
    exclude_modules: Sequence[str] | str | None = None
    mask_fn: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    # The transformers class the adapter was made on, recorded when task_type is None (PEFT's
    # auto_mapping, e.g. "BertForMaskedLM": PEFT has no task type for masked language modeling).
    base_model_class: str | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "modules_to_save", "exclude_modules"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))


def _indices(
    config: ShiraConfig, weight: jax.Array, key: jax.Array, path: str, scores: dict[str, jax.Array] | None
) -> jax.Array:
    if config.mask_fn is not None:
        return masks.from_mask_fn(config.mask_fn, weight, config.r, key, path=path)
    k = masks.shira_count(weight.shape, config.r, path=path)
    if config.mask_type == "random":
        return masks.random_count(key, weight.shape, k)
    if config.mask_type == "magnitude":
        return masks.top_magnitude(weight, k, path=path)
    assert scores is not None
    return masks.top_score(scores[path], k, path=path)


def init(
    params: PyTree,
    config: ShiraConfig,
    key: jax.Array | None = None,
    *,
    grad_fn: Callable[[PyTree, Any], PyTree] | None = None,
    batches: Iterable[Any] | None = None,
) -> Adapter:
    """A SHiRA adapter for ``params``: one :class:`SparseDelta` of ``r * (m + n)`` entries per target.

    ``key`` (default ``jax.random.key(config.random_seed or 0)``) has each parameter path folded
    in, so layers differ and a rerun is identical. ``mask_type="gradient"`` ranks entries by
    ``|d loss / d w|`` summed over ``batches`` with ``grad_fn(params, batch)`` (e.g.
    ``jax.grad(loss)``). Values start at zero (``init_weights=True``) or N(0, 1) (``False``, as in
    PEFT, for tests). ``modules_to_save`` leaves are copied into ``Adapter.dense``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"lin": {"kernel": jnp.arange(16.0).reshape(4, 4)}}
        >>> adapter = init(params, ShiraConfig(r=1, mask_type="magnitude"))
        >>> adapter.deltas["lin.kernel"].indices.tolist()
        [8, 9, 10, 11, 12, 13, 14, 15]
    """
    from jaxsparse.methods import dense_copies, resolve_targets

    if config.mask_fn is None and config.mask_type not in MASK_TYPES:
        raise ValueError(
            f"ShiraConfig.mask_type {config.mask_type!r} is not one of {MASK_TYPES}; "
            "for a custom mask set mask_fn=fn(weight, r, key) -> bool mask"
        )
    paths, dense_paths = resolve_targets(
        params, config.target_modules, config.exclude_modules, config.modules_to_save
    )
    scores = None
    if config.mask_fn is None and config.mask_type == "gradient":
        if grad_fn is None or batches is None:
            raise ValueError('mask_type="gradient" needs grad_fn=(params, batch) -> grads and batches=')
        scores = masks.accumulate_grad_scores(grad_fn, params, batches, paths)
    if key is None:
        key = jax.random.key(config.random_seed or 0)
    deltas = {}
    for path in paths:
        weight = tree_lib.get_leaf(params, path)
        mask_key, value_key = jax.random.split(masks.path_key(key, path))
        indices = _indices(config, weight, mask_key, path, scores)
        k = indices.shape[0]
        values = (
            jnp.zeros((k,), jnp.float32)
            if config.init_weights
            else jax.random.normal(value_key, (k,), jnp.float32)
        )
        deltas[path] = SparseDelta(indices=indices, values=values, shape=tuple(weight.shape))
    return Adapter(deltas=deltas, dense=dense_copies(params, dense_paths), config=config)


METHOD = Method(
    name="shira",
    config_class=ShiraConfig,
    init=init,
    yaml_keys={"adapter.r": "r", "adapter.mask_type": "mask_type", "seed": "random_seed"},
    native_format="peft_shira",
    description="SHiRA: r * (in + out) trained entries per weight",
)
