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
- **QA-SparsePEFT** (``quantization_aware=True``): the base is a GPTQ checkpoint plus the
  non-quantized sparse model it was quantized from (SQFT's ``--model_name_or_path`` and
  ``--non_quant_model_name_or_path``). Each targeted layer computes ``dropout(x) @ dq(q(W + (s * B A)
  * (W != 0)))`` on the GPTQ base's own grid with a straight-through gradient
  (:class:`~jaxsparse.quant.qa_delta.QALowRankDelta`), ``W`` the non-quantized weight; untargeted
  layers are the GPTQ model's. :func:`qa_base_params` builds those params, :func:`init` (with
  ``grids``) or :func:`with_qa_grids` puts the deltas on the grids, and the merge writes
  ``q(W + masked delta)`` into the GPTQ layout (:func:`merged_gptq_layers`).

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
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import factored as factored_lib
from jaxsparse import tree as tree_lib
from jaxsparse.delta import Adapter, LowRankDelta
from jaxsparse.delta_leaves import pytree_dataclass
from jaxsparse.methods import lora
from jaxsparse.methods.lora import LoraConfig
from jaxsparse.methods.registry import Method
from jaxsparse.quant.grid import QuantizedWeight
from jaxsparse.quant.qa_base import with_non_quant_kernels
from jaxsparse.quant.qa_delta import QALowRankDelta, with_grids

PyTree = Any

# SQFT's file beside the super-adapter's adapter_config.json (written by its make_lora_elastic).
ELASTIC_CONFIG_NAME = "elastic_adapter_config.json"
# PEFT's prefix of every module name in a saved adapter, which SQFT's elastic config uses too.
PEFT_PREFIX = "base_model.model."
# The fields SQFT's patched PEFT LoraConfig adds to adapter_config.json.
PEFT_FLAGS = ("sparse_adapter", "quantization_aware")


def is_quantization_aware(adapter_dir: str | os.PathLike) -> bool:
    """Whether ``adapter_dir`` is a PEFT LoRA directory whose ``adapter_config.json`` carries SQFT's
    ``"quantization_aware": true`` (other formats and unreadable configs: no; loading reports those).

    Example:
        >>> import tempfile
        >>> is_quantization_aware(tempfile.mkdtemp())  # no adapter_config.json: not a QA adapter
        False
    """
    path = os.path.join(os.fspath(adapter_dir), "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("peft_type") == "LORA" and raw.get("quantization_aware") is True


class SparseBaseWarning(UserWarning):
    """A SparsePEFT adapter was applied to a base weight without zeros: the mask keeps everything."""


@dataclasses.dataclass(frozen=True)
class SQFTConfig(LoraConfig):
    """A :class:`~jaxsparse.methods.lora.LoraConfig` plus SQFT's fields (hashable like it).

    - ``sparse_adapter``: SparsePEFT, the product masked by the base's non-zeros.
    - ``quantization_aware``: QA-SparsePEFT: the delta is merged into the non-quantized base weight
      and fake-quantized on the GPTQ base's grid (see the module docstring); :func:`init` then needs
      the grids.
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
        """The training step's view (the :mod:`jaxsparse.train` hook): LoRA dropout keys (as
        :meth:`LoraConfig.forward_view <jaxsparse.methods.lora.LoraConfig.forward_view>`), then NLS
        ranks drawn from ``rng``."""
        adapter = super().forward_view(adapter, rng)
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


@pytree_dataclass
class BaseMaskedDelta(LowRankDelta):
    """A SparsePEFT delta whose mask is taken where it meets its weight: ``W != 0`` of the weight it
    is applied to (a stored ``mask`` wins). What a ``sparse_adapter`` directory loaded against
    shape-only params holds (:func:`mask_at_apply`), so that applying or merging it later into real
    weights still keeps their zeros instead of silently acting as plain LoRA.

    Example:
        >>> import jax.numpy as jnp
        >>> d = BaseMaskedDelta(a=jnp.ones((2, 1)), b=jnp.ones((1, 2)))
        >>> d.apply(jnp.array([[1.0, 0.0], [0.0, 1.0]])).tolist()
        [[2.0, 0.0], [0.0, 2.0]]
    """

    def bound(self, weight: jax.Array) -> LowRankDelta:
        """The plain :class:`~jaxsparse.delta.LowRankDelta` with ``weight``'s mask."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(LowRankDelta)}
        if fields["mask"] is None:
            fields["mask"] = weight != 0
        return LowRankDelta(**fields)

    def apply(self, weight: jax.Array) -> jax.Array:
        return self.bound(weight).apply(weight)

    def matmul_beside(self, x: jax.Array, base: jax.Array, precision: Any = None) -> jax.Array:
        """The factored path (:func:`jaxsparse.factored.matmul`) of the bound (masked) delta."""
        return factored_lib.matmul(x, factored_lib.AdaptedKernel(base, self.bound(base)), precision=precision)


def mask_at_apply(adapter: Adapter) -> Adapter:
    """``adapter`` with each unmasked low-rank delta masked by its weight's non-zeros where it is
    applied (:class:`BaseMaskedDelta`): SparsePEFT when the base's values are not at hand yet."""
    deltas = {
        p: BaseMaskedDelta(**{f.name: getattr(d, f.name) for f in dataclasses.fields(LowRankDelta)})
        if type(d) is LowRankDelta and d.mask is None
        else d
        for p, d in adapter.deltas.items()
    }
    return dataclasses.replace(adapter, deltas=deltas)


def without_masks(adapter: Adapter) -> Adapter:
    """``adapter`` with the masks dropped (what a PEFT file stores: the factors; the masks come from the base)."""
    deltas = {
        p: dataclasses.replace(d, mask=None, rank_mask=None) if isinstance(d, LowRankDelta) else d
        for p, d in adapter.deltas.items()
    }
    return dataclasses.replace(adapter, deltas=deltas)


def init(
    params: PyTree,
    config: SQFTConfig,
    key: jax.Array,
    *,
    grids: Mapping[str, QuantizedWeight] | None = None,
) -> Adapter:
    """An SQFT adapter over ``params``: LoRA (:func:`jaxsparse.methods.lora.init`), masked by the base's
    non-zeros when ``sparse_adapter`` (so ``params`` must be concrete), NLS groups checked.

    With ``quantization_aware``, ``params`` hold the non-quantized weights at the targeted kernels
    (:func:`qa_base_params`) and ``grids`` (module -> :class:`~jaxsparse.quant.grid.QuantizedWeight`,
    :func:`jaxsparse.quant.qa_base.read_grids`) the GPTQ base's grids; each delta is then a
    :class:`~jaxsparse.quant.qa_delta.QALowRankDelta`.

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
    if config.quantization_aware and grids is None:
        raise ValueError(
            "SQFTConfig.quantization_aware: QA-SparsePEFT needs the GPTQ base's grids (grids=read_grids(gptq_dir)[1]) "
            "and params holding the non-quantized sparse weights (qa_base_params)"
        )
    adapter = lora.init(params, config, key)
    nls_groups(config, adapter.deltas)  # nls_target_modules must select something
    if config.sparse_adapter:
        adapter = with_base_masks(adapter, params)
    if config.quantization_aware:
        adapter = with_qa_grids(adapter, grids)
    return adapter


def with_qa_grids(
    adapter: Adapter, grids: Mapping[str, QuantizedWeight], *, source: str = "QA-SparsePEFT"
) -> Adapter:
    """A ``quantization_aware`` adapter (trained, or loaded from a PEFT directory) on the GPTQ base's
    ``grids``: each delta a :class:`~jaxsparse.quant.qa_delta.QALowRankDelta`, masked by the base
    weight's non-zeros when the config is a ``sparse_adapter`` (a stored mask is kept)."""
    config = adapter.config
    if not getattr(config, "quantization_aware", False):
        raise ValueError(f"{source}: the adapter is not quantization_aware (its config has no such flag)")
    return with_grids(adapter, grids, mask_base=bool(getattr(config, "sparse_adapter", False)), source=source)


def qa_base_params(
    gptq_params: PyTree,
    non_quant_params: PyTree,
    config: LoraConfig,
    *,
    gptq: str = "the GPTQ base",
    non_quant: str = "the non-quantized base",
) -> PyTree:
    """QA-SparsePEFT's base params, as SQFT builds its model: the GPTQ model (``gptq_params``,
    dequantized) everywhere except the kernels ``config`` targets, which are the non-quantized
    sparse model's (``W``, the weight each delta is added to before rounding). ``ValueError`` when
    the two models' shapes differ.

    Example:
        >>> import jax.numpy as jnp
        >>> q = {"q_proj": {"kernel": jnp.zeros((2, 2))}, "o_proj": {"kernel": jnp.zeros((2, 2))}}
        >>> w = {"q_proj": {"kernel": jnp.ones((2, 2))}, "o_proj": {"kernel": jnp.ones((2, 2))}}
        >>> p = qa_base_params(q, w, SQFTConfig(r=1, target_modules=["q_proj"]))
        >>> float(p["q_proj"]["kernel"].sum()), float(p["o_proj"]["kernel"].sum())
        (4.0, 0.0)
    """
    modules = lora.target_modules_of(gptq_params, config)
    return with_non_quant_kernels(gptq_params, non_quant_params, modules, gptq=gptq, non_quant=non_quant)


def merged_gptq_layers(
    params: PyTree, adapter: Adapter, base_layers: Mapping[str, QuantizedWeight]
) -> dict[str, QuantizedWeight]:
    """The quantized layers of the merged QA-SparsePEFT model: for each adapted module the codes of
    ``q(W + masked delta)`` on the base's grid (``params`` hold ``W`` there, :func:`qa_base_params`),
    every other quantized layer of the GPTQ base (``base_layers``) unchanged. What
    :func:`jaxsparse.quant.save.save_gptq` writes."""
    out = dict(base_layers)
    leaves = tree_lib.leaf_paths(params)
    for path, d in adapter.deltas.items():
        if not isinstance(d, QALowRankDelta):
            raise TypeError(
                f"{path!r}: expected a QA delta on the GPTQ grid (with_qa_grids), got {type(d).__name__}"
            )
        out[tree_lib.module_of(path)] = jax.tree_util.tree_map(np.asarray, d.quantized(leaves[path]))
    return out


METHOD = Method(
    name="sqft",
    config_class=SQFTConfig,
    init=init,
    yaml_keys={
        "adapter.r": "r",
        "adapter.lora_alpha": "lora_alpha",
        "adapter.lora_dropout": "lora_dropout",
        "adapter.sparse_adapter": "sparse_adapter",
        "adapter.quantization_aware": "quantization_aware",
        "adapter.nls_target_modules": "nls_target_modules",
        "adapter.search_space": "search_space",
    },
    native_format="peft_lora",
    default_target_modules=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    description="SQFT: LoRA masked by a sparse base's non-zeros (SparsePEFT), on its INT grid (QA), NLS elastic ranks",
)
