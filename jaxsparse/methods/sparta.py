"""SpaRTA: train a random subset of the model's parameters (Rios et al., 2025), two ways.

- **The authors' budget** (``sparsity``, as ``peft_sparta.SpaRTA``): ``sparsity`` is the fraction of
  *all* the model's parameters that stay frozen. The budget ``(1 - sparsity) * total`` goes first
  to the classification head (trained whole) and to the embedding rows of ``trainable_tokens``;
  the rest is spread over every tensor not matched by ``frozen_modules`` (substrings of the
  Hugging Face parameter names), each with the same keep probability (:func:`keep_prob`, their
  ``compute_keep_prob``), so each tensor trains ``round(keep_prob * numel)`` random entries.
- **Per weight** (``density``, our variant): ``round(density * numel)`` random entries (>= 1) of
  each targeted weight (``target_modules``, PEFT matching).

``dropout`` drops delta entries during training (the authors' dropout over the k deltas: kept
entries scaled by ``1 / (1 - dropout)``), through the training step's ``forward_view`` hook.

Example:
    >>> import jax.numpy as jnp
    >>> params = {"v_proj": {"kernel": jnp.ones((10, 10))}}
    >>> init(params, SpartaConfig(density=0.05)).deltas["v_proj.kernel"].k
    5
    >>> params = {"q_proj": {"kernel": jnp.ones((10, 10))}, "v_proj": {"kernel": jnp.ones((10, 10))}}
    >>> adapter = init(params, SpartaConfig(sparsity=0.9, frozen_modules=["q_proj"]))
    >>> sorted(adapter.deltas), adapter.deltas["v_proj.kernel"].k  # 10% of 200 entries, all in v_proj
    (['v_proj.kernel'], 20)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import masks
from jaxsparse import tree as tree_lib
from jaxsparse.delta import Adapter, SparseDelta
from jaxsparse.methods.registry import Method
from jaxsparse.methods.shira import _freeze
from jaxsparse.models.naming import hf_key
from jaxsparse.models.new_tokens import EMBEDDING_LEAVES

PyTree = Any

DEFAULT_DENSITY = 0.01
# peft_sparta.SpaRTA's default: queries, keys, the MLP, norms and the embedding stay frozen, so
# value/output projections train, and anything not listed (a causal LM's untied lm_head).
DEFAULT_FROZEN_MODULES: tuple[str, ...] = ("embed_tokens", "self_attn.q", "self_attn.k", "mlp", "norm")
# Classification heads trained whole under the authors' budget (their "score"; our encoders'
# "classifier"): top-level modules of a sequence classifier.
CLASSIFIER_HEADS: tuple[str, ...] = ("score", "classifier")
# Input-embedding leaves (Llama/Gemma, BERT/DistilBERT, GPT-2) whose rows trainable_tokens name.
INPUT_EMBEDDINGS: tuple[str, ...] = EMBEDDING_LEAVES


class SpartaBudgetError(ValueError):
    """A SpaRTA config that does not fit the model; ``key`` is the config key to change."""

    def __init__(self, message: str, key: str = "adapter.sparsity") -> None:
        super().__init__(message)
        self.key = key


@dataclasses.dataclass(frozen=True)
class SpartaConfig:
    """SpaRTA config (hashable: lists become tuples).

    Give ``sparsity`` (the authors' fraction of all parameters frozen, with ``frozen_modules``,
    ``trainable_tokens``) or ``density`` (the fraction of each targeted weight trained, with
    ``target_modules`` / ``exclude_modules`` / ``modules_to_save``), not both; neither means
    ``density=0.01``. ``target_modules=None`` (density) means every 2-D weight except embeddings
    and the output head (the paper's recipe: ``["v_proj", "o_proj"]`` plus the head as
    ``modules_to_save``, which is what ``sparsity`` with the default ``frozen_modules`` gives).

    Under ``sparsity`` the classification head (``modules_to_save``, or a top-level ``score`` /
    ``classifier`` module) trains whole as a delta over its initial value, as theirs does.
    """

    density: float | None = None
    target_modules: Sequence[str] | str | None = None
    exclude_modules: Sequence[str] | str | None = None
    modules_to_save: Sequence[str] | None = None
    seed: int = 0
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    sparsity: float | None = None
    frozen_modules: Sequence[str] | None = None
    trainable_tokens: Sequence[int] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("target_modules", "modules_to_save", "exclude_modules", "frozen_modules"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))
        if self.trainable_tokens is not None:
            object.__setattr__(self, "trainable_tokens", tuple(self.trainable_tokens))
        if self.sparsity is not None:
            if self.density is not None:
                raise ValueError(
                    f"SpartaConfig: density={self.density} and sparsity={self.sparsity} are both set: give "
                    "density (the fraction of each targeted weight trained) or sparsity (the SpaRTA "
                    "authors' fraction of all the model's parameters frozen), not both"
                )
            if not 0.0 < self.sparsity < 1.0:
                raise ValueError(f"SpartaConfig.sparsity must be in (0, 1), got {self.sparsity}")
            if self.target_modules is not None or self.exclude_modules is not None:
                raise ValueError(
                    "SpartaConfig: target_modules/exclude_modules go with density; with sparsity every "
                    "parameter not matched by frozen_modules is a candidate"
                )
            if self.frozen_modules is None:
                object.__setattr__(self, "frozen_modules", DEFAULT_FROZEN_MODULES)
            if isinstance(self.frozen_modules, str):
                object.__setattr__(self, "frozen_modules", (self.frozen_modules,))
        else:
            if self.frozen_modules is not None or self.trainable_tokens is not None:
                raise ValueError(
                    "SpartaConfig: frozen_modules/trainable_tokens go with sparsity (the authors' budget); "
                    "with density choose weights with target_modules/exclude_modules"
                )
            if self.density is None:
                object.__setattr__(self, "density", DEFAULT_DENSITY)
            if not 0.0 < self.density <= 1.0:
                raise ValueError(f"SpartaConfig.density must be in (0, 1], got {self.density}")
        tokens = self.trainable_tokens or ()
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in tokens):
            raise ValueError(
                f"SpartaConfig.trainable_tokens must be token ids (ints >= 0), got {list(tokens)}"
            )
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"SpartaConfig.trainable_tokens lists a token twice: {list(tokens)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SpartaConfig.dropout must be in [0, 1), got {self.dropout}")

    def forward_view(self, adapter: Adapter, rng: jax.Array) -> Adapter:
        """The training step's view (the :mod:`jaxsparse.train` hook): each sparse delta entry
        dropped with probability ``dropout``, the kept ones scaled by ``1 / (1 - dropout)`` (the
        authors apply ``torch.nn.Dropout`` to a mask of ones over the k deltas). Dense
        ``modules_to_save`` leaves (the ``density`` variant's head) are whole values, not deltas,
        and are left alone."""
        if self.dropout == 0.0:
            return adapter
        keep = 1.0 - self.dropout
        deltas = dict(adapter.deltas)
        for i, path in enumerate(sorted(deltas)):
            d = deltas[path]
            if not isinstance(d, SparseDelta):
                continue
            kept = jax.random.bernoulli(jax.random.fold_in(rng, i), keep, d.values.shape)
            values = jnp.where(kept, d.values / keep, jnp.zeros_like(d.values))
            deltas[path] = dataclasses.replace(d, values=values)
        return dataclasses.replace(adapter, deltas=deltas)


@dataclasses.dataclass(frozen=True)
class Budget:
    """How the authors' ``sparsity`` splits over a model (all counts are parameters).

    ``head``: the paths trained whole; ``frozen``: paths matched by ``frozen_modules``;
    ``embedding``: the input-embedding path (``None`` if the model has none we know);
    ``keep_prob``: each candidate entry's probability (their ``compute_keep_prob``).
    """

    total: int
    head: tuple[str, ...]
    frozen: tuple[str, ...]
    embedding: str | None
    keep_prob: float


def hf_name(path: str) -> str:
    """The Hugging Face parameter name the authors' ``frozen_modules`` substrings are matched against."""
    return hf_key(path)[0]


def _is_frozen(path: str, frozen_modules: Sequence[str]) -> bool:
    name = hf_name(path)
    return any(s in name for s in frozen_modules)


def head_paths(params: PyTree, modules_to_save: Sequence[str] | None = None) -> list[str]:
    """Leaf paths of the classification head: under ``modules_to_save`` (PEFT matching) or a
    top-level :data:`CLASSIFIER_HEADS` module."""
    shapes = tree_lib.leaf_paths(params)
    heads = {p for p in shapes if p.split(".", 1)[0] in CLASSIFIER_HEADS}
    if modules_to_save:
        heads |= set(tree_lib.select_leaves_under(params, list(modules_to_save), strict=False))
    return sorted(heads)


def input_embedding_path(params: PyTree) -> str | None:
    """The path of the model's input-embedding leaf (:data:`INPUT_EMBEDDINGS`), or ``None``."""
    for path in sorted(tree_lib.leaf_paths(params)):
        if any(path == e or path.endswith("." + e) for e in INPUT_EMBEDDINGS):
            return path
    return None


def budget(params: PyTree, config: SpartaConfig) -> Budget:
    """The authors' split of ``(1 - sparsity) * total`` (``peft_sparta.SpaRTA.compute_keep_prob``):
    head first, then the trainable-token rows, then one keep probability over the other tensors
    not matched by ``frozen_modules``. :class:`SpartaBudgetError` names the bound when the
    sparsity is too high for the head/tokens or too low for the unfrozen parameters.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"mlp": {"kernel": jnp.ones((10, 10))}, "v_proj": {"kernel": jnp.ones((10, 10))},
        ...           "score": {"kernel": jnp.ones((10, 2))}}
        >>> round(budget(params, SpartaConfig(sparsity=0.8, frozen_modules=["mlp"])).keep_prob, 9)  # (0.2*220-20)/100
        0.24
    """
    if config.sparsity is None:
        raise ValueError("budget() needs a SpartaConfig with sparsity")
    sparsity, frozen_modules = config.sparsity, tuple(config.frozen_modules or ())
    shapes = {p: tuple(np.shape(x)) for p, x in tree_lib.leaf_paths(params).items()}
    numel = {p: math.prod(s) for p, s in shapes.items()}
    heads = head_paths(params, config.modules_to_save)
    for p in heads:
        if _is_frozen(p, frozen_modules):
            raise SpartaBudgetError(
                f"frozen_modules {list(frozen_modules)} match the classification head {hf_name(p)!r}, which "
                "SpaRTA always trains whole; remove that entry",
                key="adapter.frozen_modules",
            )
    total = sum(numel.values())
    all_params = total
    keep = (1.0 - sparsity) * total
    head_size = sum(numel[p] for p in heads)
    if heads:
        if head_size > keep:
            raise SpartaBudgetError(
                f"sparsity={sparsity} is too high: choose sparsity < {1 - head_size / total:.6f} to at least "
                f"keep the classification head ({head_size:,} parameters) fully trainable"
            )
        keep -= head_size
        total -= head_size
    embedding = input_embedding_path(params)
    frozen = tuple(p for p in shapes if p not in heads and _is_frozen(p, frozen_modules))
    frozen_size = sum(numel[p] for p in frozen)
    tokens = tuple(config.trainable_tokens or ())
    if tokens:
        if embedding is None:
            raise SpartaBudgetError(
                f"trainable_tokens needs an input embedding; the model has none of {list(INPUT_EMBEDDINGS)}",
                key="adapter.trainable_tokens",
            )
        vocab, dim = shapes[embedding][0], shapes[embedding][1]
        beyond = [t for t in tokens if t >= vocab]
        if beyond:
            raise SpartaBudgetError(
                f"trainable_tokens {beyond} are beyond the vocabulary: the embedding "
                f"{hf_name(embedding)!r} has {vocab} rows (ids 0..{vocab - 1})",
                key="adapter.trainable_tokens",
            )
        token_size = len(tokens) * dim
        if token_size > keep:
            threshold = 1 - (head_size + token_size) / (total + head_size)
            raise SpartaBudgetError(
                f"sparsity={sparsity} is too high: choose sparsity < {threshold:.6f} to keep the "
                f"{len(tokens)} trainable token embeddings ({token_size:,} parameters) fully trainable"
            )
        keep -= token_size
        if embedding not in frozen:
            total -= token_size  # those rows train whole, outside the sampled candidates
    else:
        token_size = 0
    candidates = total - frozen_size
    if candidates <= 0 or keep / candidates >= 1.0:
        embedding_frozen = tokens and embedding in frozen
        threshold = (frozen_size - token_size) / all_params if embedding_frozen else frozen_size / all_params
        raise SpartaBudgetError(
            f"sparsity={sparsity} is too low: not enough non-frozen parameters to choose from; set a "
            f"sparsity > {threshold:.6f} or freeze fewer modules (frozen_modules {list(frozen_modules)})"
        )
    return Budget(
        total=all_params,
        head=tuple(heads),
        frozen=frozen,
        embedding=embedding,
        keep_prob=keep / candidates,
    )


def _token_rows(shape: tuple[int, ...], tokens: Sequence[int], dtype: Any) -> np.ndarray:
    rows = np.asarray(sorted(tokens), np.int64)
    dim = int(shape[1])
    return (rows[:, None] * dim + np.arange(dim)[None, :]).reshape(-1).astype(dtype)


def _sample_outside_rows(key: jax.Array, shape: tuple[int, ...], tokens: Sequence[int], k: int, dtype: Any):
    """``k`` random flat positions of a (vocab, dim) embedding outside the rows ``tokens``."""
    vocab, dim = int(shape[0]), int(shape[1])
    other_rows = np.setdiff1d(np.arange(vocab), np.asarray(tokens, np.int64))
    picks = np.asarray(masks.random_count(key, (other_rows.size * dim,), k)).astype(np.int64)
    return (other_rows[picks // dim] * dim + picks % dim).astype(dtype)


def _init_sparsity(params: PyTree, config: SpartaConfig, key: jax.Array) -> Adapter:
    plan = budget(params, config)
    tokens = tuple(config.trainable_tokens or ())
    deltas: dict[str, SparseDelta] = {}
    for path, leaf in sorted(tree_lib.leaf_paths(params).items()):
        shape = tuple(int(s) for s in np.shape(leaf))
        numel = math.prod(shape)
        dtype = masks._index_dtype(numel)
        rows = np.zeros((0,), np.int64)
        if path == plan.embedding and tokens:
            rows = _token_rows(shape, tokens, np.int64)
        if path in plan.head:
            indices = np.arange(numel, dtype=np.int64)
        elif path in plan.frozen:
            indices = rows
        else:
            k = round(plan.keep_prob * (numel - rows.size))
            if k == 0:
                indices = rows
            elif rows.size:
                picked = _sample_outside_rows(masks.path_key(key, path), shape, tokens, k, np.int64)
                indices = np.sort(np.concatenate([rows, picked]))
            else:
                indices = np.asarray(masks.random_count(masks.path_key(key, path), shape, k), np.int64)
        if indices.size == 0:
            continue
        deltas[path] = SparseDelta(
            indices=jnp.asarray(indices, dtype),
            values=jnp.zeros((indices.size,), jnp.float32),
            shape=shape,
        )
    return Adapter(deltas=deltas, dense={}, config=config)


def init(params: PyTree, config: SpartaConfig, key: jax.Array | None = None) -> Adapter:
    """A SpaRTA adapter, values zero: under ``sparsity``, the authors' selection (:func:`budget`;
    the head and trainable-token rows whole, ``round(keep_prob * numel)`` random entries of every
    other unfrozen tensor, tensors whose count rounds to 0 left out); under ``density``,
    ``round(density * numel)`` random entries (>= 1) per targeted weight and the
    ``modules_to_save`` leaves copied into ``Adapter.dense``.

    ``key`` defaults to ``jax.random.key(config.seed)``; each parameter path is folded in.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"lin": {"kernel": jnp.ones((4, 8))}}
        >>> a, b = (init(params, SpartaConfig(density=0.25), jax.random.key(s)) for s in (0, 0))
        >>> bool(jnp.all(a.deltas["lin.kernel"].indices == b.deltas["lin.kernel"].indices))
        True
    """
    from jaxsparse.methods import dense_copies, resolve_targets

    if key is None:
        key = jax.random.key(config.seed)
    if config.sparsity is not None:
        return _init_sparsity(params, config, key)
    paths, dense_paths = resolve_targets(
        params, config.target_modules, config.exclude_modules, config.modules_to_save
    )
    deltas = {}
    for path in paths:
        weight = tree_lib.get_leaf(params, path)
        indices = masks.random_density(masks.path_key(key, path), weight.shape, config.density)
        values = jnp.zeros((indices.shape[0],), jnp.float32)
        deltas[path] = SparseDelta(indices=indices, values=values, shape=tuple(weight.shape))
    return Adapter(deltas=deltas, dense=dense_copies(params, dense_paths), config=config)


def authors_sparsity(adapter: Adapter, total_params: int) -> float:
    """The authors' sparsity of a trained adapter: ``1 - trainable / total`` over all ``total_params``
    of the model (their ``num_trainable_parameters``)."""
    return 1.0 - adapter.num_trainable() / total_params


def heads_as_dense(adapter: Adapter, params: PyTree) -> Adapter:
    """``adapter`` with each classification-head delta (trained whole over its initial value under
    ``sparsity``) turned into a dense replacement ``initial + delta``, so the head no longer depends
    on a randomly initialised base head (how exports store it)."""
    config = adapter.config
    if not isinstance(config, SpartaConfig) or config.sparsity is None:
        return adapter
    heads = set(head_paths(params, config.modules_to_save))
    deltas = {p: d for p, d in adapter.deltas.items() if p not in heads}
    dense = dict(adapter.dense)
    for path in sorted(heads & set(adapter.deltas)):
        d = adapter.deltas[path]
        dense[path] = d.apply(jnp.asarray(tree_lib.get_leaf(params, path), jnp.float32))
    return dataclasses.replace(adapter, deltas=deltas, dense=dense)


METHOD = Method(
    name="sparta",
    config_class=SpartaConfig,
    init=init,
    yaml_keys={
        "adapter.density": "density",
        "adapter.sparsity": "sparsity",
        "adapter.frozen_modules": "frozen_modules",
        "adapter.trainable_tokens": "trainable_tokens",
        "adapter.dropout": "dropout",
        "seed": "seed",
    },
    native_format="sparta",
    description="SpaRTA: a random subset of the parameters trained (the authors' `sparsity`, or `density` per weight)",
)
