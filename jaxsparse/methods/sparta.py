"""SpaRTA: train a random fraction ``density`` of the entries of the targeted weights (Rios et al., 2025).

Example:
    >>> import jax.numpy as jnp
    >>> params = {"v_proj": {"kernel": jnp.ones((10, 10))}}
    >>> init(params, SpartaConfig(density=0.05)).deltas["v_proj.kernel"].k
    5
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxsparse import masks
from jaxsparse import tree as tree_lib
from jaxsparse.delta import Adapter, SparseDelta
from jaxsparse.methods.registry import Method
from jaxsparse.methods.shira import _freeze

PyTree = Any


@dataclasses.dataclass(frozen=True)
class SpartaConfig:
    """SpaRTA config (hashable: lists become tuples).

    ``density`` is the fraction of each targeted weight's entries that train (SpaRTA's
    ``1 - sparsity``); ``target_modules=None`` means every 2-D weight except embeddings and the
    output head (the paper's own recipe trains only ``["v_proj", "o_proj"]`` plus the head: pass
    those as ``target_modules`` and the head as ``modules_to_save``).
    """

    density: float = 0.01
    target_modules: Sequence[str] | str | None = None
    exclude_modules: Sequence[str] | str | None = None
    modules_to_save: Sequence[str] | None = None
    seed: int = 0
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "modules_to_save", "exclude_modules"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"SpartaConfig.density must be in (0, 1], got {self.density}")


def init(params: PyTree, config: SpartaConfig, key: jax.Array | None = None) -> Adapter:
    """A SpaRTA adapter: ``round(density * numel)`` uniformly random entries (>= 1) per targeted
    weight, values zero; ``modules_to_save`` leaves copied into ``Adapter.dense``.

    ``key`` defaults to ``jax.random.key(config.seed)``; each parameter path is folded in.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"lin": {"kernel": jnp.ones((4, 8))}}
        >>> a, b = (init(params, SpartaConfig(density=0.25), jax.random.key(s)) for s in (0, 0))
        >>> bool(jnp.all(a.deltas["lin.kernel"].indices == b.deltas["lin.kernel"].indices))
        True
    """
    from jaxsparse.methods import dense_copies, resolve_targets

    paths, dense_paths = resolve_targets(
        params, config.target_modules, config.exclude_modules, config.modules_to_save
    )
    if key is None:
        key = jax.random.key(config.seed)
    deltas = {}
    for path in paths:
        weight = tree_lib.get_leaf(params, path)
        indices = masks.random_density(masks.path_key(key, path), weight.shape, config.density)
        values = jnp.zeros((indices.shape[0],), jnp.float32)
        deltas[path] = SparseDelta(indices=indices, values=values, shape=tuple(weight.shape))
    return Adapter(deltas=deltas, dense=dense_copies(params, dense_paths), config=config)


METHOD = Method(
    name="sparta",
    config_class=SpartaConfig,
    init=init,
    yaml_keys={"adapter.density": "density", "seed": "seed"},
    native_format="sparta",
    description="SpaRTA: a random fraction `density` of each weight's entries trained",
)
