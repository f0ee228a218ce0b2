"""SQFT (Munoz et al., EMNLP 2024 Findings): LoRA on a sparse base that keeps the base's sparsity.

- **SparsePEFT** (``sparse_adapter=True``): the LoRA product is masked by the frozen base weight's
  non-zero pattern, in the forward pass and in the merge: ``W + (s * B A) * (W != 0)``, so the
  merged weight has exactly the base's zeros. The mask is the ``mask`` of each
  :class:`~jaxsparse.delta.LowRankDelta`, taken from the base at :func:`init` (or when a PEFT
  directory with ``"sparse_adapter": true`` is loaded against concrete params).
- **NLS** (Neural Low-rank adapter Search, ``search_space``): the adapters of the modules named by
  ``nls_target_modules`` are elastic; each training step samples one rank ``w`` from the search
  space per *group* (as SQFT: all elastic modules of one decoder layer share a rank) and uses only
  the leading components ``A[:w]``, ``B[:, :w]``. Shapes stay static under ``jit``: the sampled
  rank is a ``rank_mask`` (``arange(r) < w``), so the other components get exactly zero gradient.
  Evaluation and merge use the whole (maximal) super-adapter, as SQFT's elastic layers do outside
  training. :mod:`jaxsparse.train` calls :meth:`SQFTConfig.forward_view` once per step.

On disk an SQFT adapter is a PEFT LoRA directory whose ``adapter_config.json`` also carries SQFT's
``"sparse_adapter"`` / ``"quantization_aware"`` flags (the fields SQFT's patched ``LoraConfig``
writes; PEFT itself ignores them with a warning) and, for NLS, SQFT's
``elastic_adapter_config.json``: a list of groups ``{"target": [...lora_A names], "search_space":
[...]}``. :mod:`jaxsparse.sqft_extract` turns such a super-adapter into a standard PEFT LoRA.

Example:
    >>> import jax, jax.numpy as jnp
    >>> w = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    >>> cfg = SQFTConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False, sparse_adapter=True)
    >>> ad = init({"q_proj": {"kernel": w}}, cfg, jax.random.key(0))
    >>> merged = ad.deltas["q_proj.kernel"].apply(w)
    >>> bool(jnp.all((merged == 0) == (w == 0)))
    True
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxsparse import tree as tree_lib
from jaxsparse.delta import Adapter, LowRankDelta
from jaxsparse.methods import lora
from jaxsparse.methods.lora import LoraConfig
from jaxsparse.methods.registry import Method

PyTree = Any

# SQFT's file beside the super-adapter's adapter_config.json (written by its make_lora_elastic).
ELASTIC_CONFIG_NAME = "elastic_adapter_config.json"
# PEFT's prefix of every module name in a saved adapter, which SQFT's elastic config uses too.
PEFT_PREFIX = "base_model.model."
# The fields SQFT's patched PEFT LoraConfig adds to adapter_config.json.
PEFT_FLAGS = ("sparse_adapter", "quantization_aware")


class SparseBaseWarning(UserWarning):
    """A SparsePEFT adapter was applied to a base weight without zeros: the mask keeps everything."""


@dataclasses.dataclass(frozen=True)
class SQFTConfig(LoraConfig):
    """A :class:`~jaxsparse.methods.lora.LoraConfig` plus SQFT's fields (hashable like it).

    - ``sparse_adapter``: SparsePEFT, the product masked by the base's non-zeros.
    - ``quantization_aware``: QA-SparsePEFT; not implemented yet (refused with a clear error).
    - ``search_space``: NLS ranks, largest first (SQFT's order: ``[32, 24, 16]``), each at most ``r``;
      ``None``: no NLS (a fixed-rank adapter).
    - ``nls_target_modules``: which targeted modules are elastic (names by suffix, as
      ``target_modules``); ``None`` with a ``search_space``: every targeted module.

    Example:
        >>> SQFTConfig(r=32, target_modules=["q_proj"], search_space=[32, 24, 16]).search_space
        (32, 24, 16)
        >>> try:
        ...     SQFTConfig(r=16, target_modules=["q_proj"], search_space=[32, 24, 16])
        ... except ValueError as e:
        ...     print(e)
        SQFTConfig.search_space (32, 24, 16): rank 32 is above r=16 (an elastic adapter can only use its leading components)
    """

    sparse_adapter: bool = False
    quantization_aware: bool = False
    nls_target_modules: Sequence[str] | None = None
    search_space: Sequence[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nls_target_modules is not None:
            names = (
                (self.nls_target_modules,)
                if isinstance(self.nls_target_modules, str)
                else self.nls_target_modules
            )
            object.__setattr__(self, "nls_target_modules", tuple(names))
        if self.quantization_aware:
            raise ValueError(
                "SQFTConfig.quantization_aware: QA-SparsePEFT is not implemented in jaxsparse yet "
                "(train SparsePEFT on the non-quantized sparse base instead)"
            )
        if self.search_space is None:
            if self.nls_target_modules is not None:
                raise ValueError(
                    "SQFTConfig.nls_target_modules is set but search_space is not: name the NLS ranks"
                )
            return
        space = tuple(self.search_space)
        object.__setattr__(self, "search_space", space)
        check_search_space(space, self.r, "SQFTConfig.search_space")
        if self.rank_pattern or self.alpha_pattern or self.use_rslora:
            # The sub-adapter keeps the super-adapter's scaling alpha / r; per-module patterns or
            # rsLoRA would make "rank w of group g" ambiguous.
            raise ValueError(
                "SQFTConfig: NLS (search_space) cannot be combined with rank_pattern, alpha_pattern or use_rslora"
            )

    @property
    def nls(self) -> bool:
        """Whether this is an elastic (NLS) super-adapter."""
        return self.search_space is not None

    def forward_view(self, adapter: Adapter, rng: jax.Array) -> Adapter:
        """The training step's view (the :mod:`jaxsparse.train` hook): NLS ranks drawn from ``rng``."""
        return self.sample_step_adapter(adapter, jax.random.fold_in(rng, 0x5F7))

    def sample_step_adapter(self, adapter: Adapter, key: jax.Array) -> Adapter:
        """``adapter`` with one rank per NLS group drawn uniformly from the search space (jit-able).

        The stored adapter is never changed: the sampled one is only used for the step's loss.
        """
        if not self.nls:
            return adapter
        space = jnp.asarray(self.search_space, jnp.int32)
        deltas = dict(adapter.deltas)
        for i, (_, paths) in enumerate(nls_groups(self, adapter.deltas)):
            w = space[jax.random.randint(jax.random.fold_in(key, i), (), 0, len(self.search_space))]
            for path in paths:
                deltas[path] = dataclasses.replace(deltas[path], rank_mask=_rank_mask(deltas[path].rank, w))
        return dataclasses.replace(adapter, deltas=deltas)


def _rank_mask(r: int, w: Any) -> jax.Array:
    return (jnp.arange(r) < w).astype(jnp.float32)


def check_search_space(space: Sequence[Any], r: int, where: str) -> None:
    """A search space is non-empty positive ints, strictly decreasing, none above ``r``; else ``ValueError``."""
    space = tuple(space)
    if not space or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in space):
        raise ValueError(
            f"{where} {space}: expected a non-empty list of positive int ranks, e.g. [32, 24, 16]"
        )
    if any(b >= a for a, b in itertools.pairwise(space)):
        raise ValueError(
            f"{where} {space}: ranks must be strictly decreasing (largest first, as SQFT's [32, 24, 16])"
        )
    if space[0] > r:
        raise ValueError(
            f"{where} {space}: rank {space[0]} is above r={r} (an elastic adapter can only use its leading components)"
        )


def group_of(module: str) -> str:
    """SQFT's NLS group of a module: its decoder layer (the path through the first numeric part).

    Example:
        >>> group_of("model.layers.3.self_attn.q_proj"), group_of("lm_head")
        ('model.layers.3', 'lm_head')
    """
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return module


def nls_modules(config: SQFTConfig, modules: Sequence[str]) -> list[str]:
    """The targeted ``modules`` that are elastic (sorted); ``ValueError`` if none is."""
    if not config.nls:
        return []
    if config.nls_target_modules is None:
        return sorted(modules)
    chosen = sorted(m for m in modules if any(_name_matches(m, n) for n in config.nls_target_modules))
    if not chosen:
        raise ValueError(
            f"SQFTConfig.nls_target_modules {list(config.nls_target_modules)} match none of the adapted modules "
            f"(e.g. {sorted(modules)[:3]})"
        )
    return chosen


def _name_matches(module: str, name: str) -> bool:
    return module == name or module.endswith("." + name) or re.fullmatch(name, module) is not None


def nls_groups(config: SQFTConfig, deltas: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """``[(group, delta paths)]`` of the elastic deltas, in a fixed order (static under jit)."""
    modules = {tree_lib.module_of(p): p for p in deltas}
    groups: dict[str, list[str]] = {}
    for module in nls_modules(config, list(modules)):
        groups.setdefault(group_of(module), []).append(modules[module])
    return [(g, tuple(ps)) for g, ps in sorted(groups.items())]


def elastic_adapter_config(config: SQFTConfig, modules: Sequence[str]) -> list[dict[str, Any]]:
    """SQFT's ``elastic_adapter_config.json`` content for the adapted ``modules``: one entry per group,
    ``{"target": ["base_model.model.<module>.lora_A", ...], "search_space": [...]}``."""
    deltas = {f"{m}.kernel": None for m in modules}
    return [
        {
            "target": [f"{PEFT_PREFIX}{tree_lib.module_of(p)}.lora_A" for p in paths],
            "search_space": list(config.search_space),
        }
        for _, paths in nls_groups(config, deltas)
    ]


def with_ranks(adapter: Adapter, ranks: Mapping[str, int]) -> Adapter:
    """``adapter`` using only the leading ``ranks[module]`` components of those modules (a fixed
    sub-adapter of an elastic one, e.g. to compare with the extracted PEFT sub-adapter)."""
    deltas = dict(adapter.deltas)
    for module, w in ranks.items():
        path = f"{module}.kernel"
        if path not in deltas:
            raise KeyError(f"with_ranks: {module!r} is not an adapted module")
        d = deltas[path]
        if not 0 < w <= d.rank:
            raise ValueError(f"with_ranks: rank {w} for {module!r} is outside 1..{d.rank}")
        deltas[path] = dataclasses.replace(d, rank_mask=_rank_mask(d.rank, w))
    return dataclasses.replace(adapter, deltas=deltas)


def with_base_masks(adapter: Adapter, params: PyTree, *, source: str = "SparsePEFT") -> Adapter:
    """Each low-rank delta masked by its base weight's non-zeros (``W != 0``), as SparsePEFT trains
    and merges. Warns (:class:`SparseBaseWarning`) when a base weight has no zero at all: the mask
    then keeps every entry and the adapter acts as plain LoRA there."""
    leaves = tree_lib.leaf_paths(params)
    deltas = dict(adapter.deltas)
    dense_layers = []
    for path, d in adapter.deltas.items():
        weight = leaves[path]
        if isinstance(weight, jax.ShapeDtypeStruct):
            raise ValueError(
                f"{source}: {path!r} needs the base weight's values (its zeros), got only its shape"
            )
        mask = jnp.asarray(weight) != 0
        if bool(jnp.all(mask)):
            dense_layers.append(path)
        deltas[path] = dataclasses.replace(d, mask=mask)
    if dense_layers and len(dense_layers) == len(deltas):
        warnings.warn(
            f"{source}: sparse_adapter is set but the base model has no zeros in any adapted weight "
            f"({len(dense_layers)} weights, e.g. {dense_layers[0]!r}): the mask keeps every entry, so this "
            "is plain LoRA; prune the base first (jaxsparse prune) to keep a sparsity",
            SparseBaseWarning,
            stacklevel=2,
        )
    elif dense_layers:
        warnings.warn(
            f"{source}: {len(dense_layers)} of {len(deltas)} adapted base weights have no zeros (e.g. "
            f"{dense_layers[0]!r}): the sparse adapter is dense there",
            SparseBaseWarning,
            stacklevel=2,
        )
    return dataclasses.replace(adapter, deltas=deltas)


def without_masks(adapter: Adapter) -> Adapter:
    """``adapter`` with the masks dropped (what a PEFT file stores: the factors; the masks come from the base)."""
    deltas = {
        p: dataclasses.replace(d, mask=None, rank_mask=None) if isinstance(d, LowRankDelta) else d
        for p, d in adapter.deltas.items()
    }
    return dataclasses.replace(adapter, deltas=deltas)


def init(params: PyTree, config: SQFTConfig, key: jax.Array) -> Adapter:
    """An SQFT adapter over ``params``: LoRA (:func:`jaxsparse.methods.lora.init`), masked by the base's
    non-zeros when ``sparse_adapter`` (so ``params`` must be concrete), NLS groups checked.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"layers": {"0": {"q_proj": {"kernel": jnp.ones((8, 8))}}}}
        >>> cfg = SQFTConfig(r=4, target_modules=["q_proj"], sparse_adapter=False, search_space=[4, 2])
        >>> ad = init(params, cfg, jax.random.key(0))
        >>> nls_groups(cfg, ad.deltas)
        [('layers.0', ('layers.0.q_proj.kernel',))]
    """
    if not isinstance(config, SQFTConfig):
        raise TypeError(f"sqft.init needs an SQFTConfig, got {type(config).__name__}")
    adapter = lora.init(params, config, key)
    nls_groups(config, adapter.deltas)  # nls_target_modules must select something
    if config.sparse_adapter:
        adapter = with_base_masks(adapter, params)
    return adapter


METHOD = Method(
    name="sqft",
    config_class=SQFTConfig,
    init=init,
    yaml_keys={
        "adapter.r": "r",
        "adapter.lora_alpha": "lora_alpha",
        "adapter.sparse_adapter": "sparse_adapter",
        "adapter.nls_target_modules": "nls_target_modules",
        "adapter.search_space": "search_space",
    },
    native_format="peft_lora",
    default_target_modules=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    description="SQFT: LoRA masked by a sparse base's non-zeros (SparsePEFT) with NLS elastic ranks",
)
