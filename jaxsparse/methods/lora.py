"""LoRA: a rank-r update ``B @ A * scaling`` per targeted linear weight (Hu et al., 2021).

The config mirrors PEFT 0.22's ``LoraConfig`` field for field (names and defaults) for what we
support; :func:`init` builds an :class:`~jaxsparse.delta.Adapter` of
:class:`~jaxsparse.delta.LowRankDelta` leaves (``a`` = PEFT's ``lora_A.weight.T`` (in, r), ``b`` =
``lora_B.weight.T`` (r, out)) plus dense ``modules_to_save`` / trained biases.

Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"q_proj": {"kernel": jnp.ones((8, 4))}, "o_proj": {"kernel": jnp.ones((4, 8))}}
    >>> adapter = init(params, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), jax.random.key(0))
    >>> d = adapter.deltas["q_proj.kernel"]
    >>> d.a.shape, d.b.shape, d.scale
    ((8, 2), (2, 4), 2.0)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxsparse import tree as tree_lib
from jaxsparse.delta import Adapter, LowRankDelta
from jaxsparse.methods.registry import Method
from jaxsparse.methods.shira import _freeze

PyTree = Any

# Names of the output layer PEFT's "all-linear" leaves alone, and the heads PEFT adds to
# ``modules_to_save`` for task_type SEQ_CLS.
OUTPUT_LAYERS = ("lm_head", "score", "classifier")
SEQ_CLS_HEADS = ("classifier", "score")
BIAS_MODES = ("none", "all", "lora_only")


class FrozenDict(dict):
    """A hashable, read-only dict, so configs holding ``rank_pattern`` can be static pytree metadata."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("FrozenDict is read-only")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT-compatible LoRA config (hashable: lists become tuples, dicts :class:`FrozenDict`).

    - ``target_modules``: module names (suffix match), a full-match regex, or ``"all-linear"`` (every
      2-D kernel except the output layer ``lm_head``/``score``/``classifier``).
    - ``rank_pattern`` / ``alpha_pattern``: ``{pattern: r}`` / ``{pattern: alpha}`` overrides; a pattern
      matches a module path ending in it (regex, PEFT's ``get_pattern_key``).
    - ``use_rslora``: scaling ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
    - ``bias``: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (biases of targeted modules).
    - ``init_lora_weights``: ``True`` (PEFT: kaiming-uniform A, zero B), ``"gaussian"`` (A ~ N(0, 1/r),
      zero B) or ``False`` (both like a fresh ``nn.Linear``: a non-zero update, for tests).
    - ``fan_in_fan_out``: PEFT metadata for GPT-2 ``Conv1D`` (the lora_A/lora_B layout does not change).
    - ``lora_dropout``: PEFT's dropout on the adapter's input, training only (:meth:`forward_view`).
    - ``task_type="SEQ_CLS"`` adds the ``classifier``/``score`` head to ``modules_to_save`` like PEFT.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: Sequence[str] | str | None = None
    exclude_modules: Sequence[str] | str | None = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Sequence[str] | None = None
    init_lora_weights: bool | str = True
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=FrozenDict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=FrozenDict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "modules_to_save", "exclude_modules"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))
        for name in ("rank_pattern", "alpha_pattern"):
            object.__setattr__(self, name, FrozenDict(getattr(self, name) or {}))
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            # PEFT refuses this combination too: the rsLoRA scaling would be ambiguous per module.
            raise ValueError("LoraConfig: use_rslora cannot be combined with rank_pattern or alpha_pattern")
        bad = {k: v for k, v in self.rank_pattern.items() if not isinstance(v, int) or v <= 0}
        if bad:
            raise ValueError(f"LoraConfig.rank_pattern values must be positive ints, got {bad}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")

    def forward_view(self, adapter: Adapter, rng: jax.Array) -> Adapter:
        """The training step's view (the :mod:`jaxsparse.train` hook): with ``lora_dropout`` > 0, each
        low-rank delta carries its own dropout key, so the factored matmul drops the adapter's input
        as PEFT does (``lora_B(lora_A(dropout(x)))``); evaluation and merge never see the keys.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> params = {"q": {"kernel": jnp.ones((4, 2))}}
            >>> cfg = LoraConfig(r=1, target_modules=["q"], lora_dropout=0.1)
            >>> view = cfg.forward_view(init(params, cfg, jax.random.key(0)), jax.random.PRNGKey(1))
            >>> view.deltas["q.kernel"].dropout_rate, view.deltas["q.kernel"].dropout_key is not None
            (0.1, True)
        """
        if self.lora_dropout == 0:
            return adapter
        deltas = dict(adapter.deltas)
        # One independent key per layer (sorted paths: fixed under jit), like PEFT's nn.Dropout per module.
        for i, path in enumerate(sorted(deltas)):
            if isinstance(deltas[path], LowRankDelta):
                deltas[path] = dataclasses.replace(
                    deltas[path],
                    dropout_key=jax.random.fold_in(rng, i),
                    dropout_rate=float(self.lora_dropout),
                )
        return dataclasses.replace(adapter, deltas=deltas)

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` for ``module`` after ``rank_pattern`` / ``alpha_pattern`` (first match wins)."""
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return r, alpha

    def scaling(self, module: str) -> float:
        """PEFT's ``scaling[adapter]`` for ``module``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def target_modules_of(params: PyTree, config: LoraConfig) -> list[str]:
    """Module paths the config adapts: 2-D ``kernel`` owners selected by ``target_modules`` minus
    ``exclude_modules`` and minus anything inside ``modules_to_save`` (PEFT never adapts a saved module).
    """
    if config.target_modules is None:
        raise ValueError(
            "LoraConfig.target_modules is None: name the modules to adapt (e.g. ['q_proj', 'v_proj']) "
            "or use 'all-linear'"
        )
    if config.target_modules == "all-linear":
        every = tree_lib.select_modules(params, r".*", config.exclude_modules, strict=False)
        chosen = [m for m in every if tree_lib.leaf_name(m) not in OUTPUT_LAYERS]
    else:
        chosen = tree_lib.select_modules(params, config.target_modules, config.exclude_modules)
    saved = tree_lib.module_matcher(
        list(_modules_to_save(params, config))
    )  # PEFT: never adapt a saved module
    return [m for m in chosen if not any(saved(p) for p in tree_lib._prefixes(m))]


def _modules_to_save(params: PyTree, config: LoraConfig) -> tuple[str, ...]:
    names = tuple(config.modules_to_save or ())
    if config.task_type == "SEQ_CLS":
        modules = tree_lib.module_paths(params)
        names += tuple(
            h for h in SEQ_CLS_HEADS if h not in names and any(tree_lib._name_matches(m, h) for m in modules)
        )
    return names


def dense_paths(
    params: PyTree, config: LoraConfig, targets: Sequence[str], *, strict: bool = True
) -> list[str]:
    """Parameter paths trained in full: ``modules_to_save`` leaves, plus biases per ``config.bias``.

    With ``strict``, a ``modules_to_save`` name matching no module is an error (PEFT itself tolerates
    it when loading: a SEQ_CLS adapter lists both ``classifier`` and ``score``).
    """
    explicit = tuple(config.modules_to_save or ())
    chosen = tree_lib.select_leaves_under(params, list(explicit), strict=strict) if explicit else []
    auto = [h for h in _modules_to_save(params, config) if h not in explicit]
    if auto:
        chosen += tree_lib.select_leaves_under(params, auto, strict=False)
    if config.bias != "none":
        target_set = set(targets)
        for path in tree_lib.leaf_paths(params):
            if tree_lib.leaf_name(path) == "bias" and (
                config.bias == "all" or tree_lib.module_of(path) in target_set
            ):
                chosen.append(path)
    return list(dict.fromkeys(chosen))


def init(params: PyTree, config: LoraConfig, key: jax.Array) -> Adapter:
    """A LoRA adapter over ``params`` (a pytree of arrays or ``jax.ShapeDtypeStruct``).

    ``a`` and ``b`` are float32 whatever the base dtype. Each targeted module draws from its own key
    (``fold_in`` by position in the sorted module list), so adding a target does not reshuffle others.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
        >>> ad = init(params, LoraConfig(r=1, target_modules=["dense"], bias="all"), jax.random.key(0))
        >>> sorted(ad.deltas), sorted(ad.dense), float(jnp.abs(ad.deltas["dense.kernel"].b).sum())
        (['dense.kernel'], ['dense.bias'], 0.0)
    """
    targets = target_modules_of(params, config)
    leaves = tree_lib.leaf_paths(params)
    deltas: dict[str, LowRankDelta] = {}
    for i, module in enumerate(sorted(targets)):
        path = f"{module}.kernel"
        fan_in, fan_out = leaves[path].shape
        r, _ = config.rank_and_alpha(module)
        key_a, key_b = jax.random.split(jax.random.fold_in(key, i))
        a, b = _init_factors(key_a, key_b, fan_in, fan_out, r, config.init_lora_weights)
        deltas[path] = LowRankDelta(a=a, b=b, scale=float(config.scaling(module)))
    dense = {}
    for p in dense_paths(params, config, targets):
        if isinstance(leaves[p], jax.ShapeDtypeStruct):
            raise ValueError(f"{p!r} is trained in full (modules_to_save/bias) and needs concrete params")
        dense[p] = jnp.asarray(leaves[p])
    return Adapter(deltas=deltas, dense=dense, config=config)


def _init_factors(
    key_a: jax.Array, key_b: jax.Array, fan_in: int, fan_out: int, r: int, how: bool | str
) -> tuple[jax.Array, jax.Array]:
    # torch's nn.Linear default (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    # where fan_in is the layer's input size: `in` for lora_A, `r` for lora_B.
    def linear_default(k: jax.Array, shape: tuple[int, int], layer_in: int) -> jax.Array:
        bound = 1.0 / math.sqrt(layer_in)
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

    if how == "gaussian":
        a = jax.random.normal(key_a, (fan_in, r), jnp.float32) / r
    else:
        a = linear_default(key_a, (fan_in, r), fan_in)
    b = linear_default(key_b, (r, fan_out), r) if how is False else jnp.zeros((r, fan_out), jnp.float32)
    return a, b


METHOD = Method(
    name="lora",
    config_class=LoraConfig,
    init=init,
    yaml_keys={"adapter.r": "r", "adapter.lora_alpha": "lora_alpha", "adapter.lora_dropout": "lora_dropout"},
    native_format="peft_lora",
    # PEFT's own default target when none is named
    default_target_modules="all-linear",
    description="LoRA: a rank-r update B A * alpha / r per weight",
)
