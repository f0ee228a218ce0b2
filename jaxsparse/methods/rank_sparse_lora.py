"""Rank-sparse high-rank LoRA (the "SparseLoRA" README): LoRA at rank r, k = ceil(density * r) components per step.

Each targeted linear weight carries a LoRA of high rank (e.g. r = 1024, ``lora_alpha`` 128, so
``scale = alpha / r``). Each training step scores the r rank components of every module on the
batch (contextual importance ``||(x a)_j|| * ||b_j||``), mixes the scores with the accumulated
importance (weight ``importance_lambda``), and computes only the top
``k = ceil(target_density * r)`` components, gathered with static shapes under ``jit``: the
adapter's part of the forward and backward is k-wide, and the components not selected get exactly
zero gradient. The exact rule, and how the scores leave the forward pass (a probe leaf whose
cotangent is the scores), are in :mod:`jaxsparse.rank_sparse`.

- ``importance`` (r,) per module is the running mean of the step-normalised contextual scores
  (each step's scores sum to 1 per module, so every step weighs the same): training state, saved in
  checkpoints (resumed exactly) and, beside the PEFT files, as ``rank_importance.safetensors``.
- Evaluation, ``merge`` and the plain PEFT export use the **full** adapter, all r components:
  what was trained is the r-rank LoRA (every component may have been selected on some batch), and
  the per-step selection depends on the batch, so no fixed subset reproduces training-time
  outputs. To keep only the important components, prune explicitly: :func:`save_pruned_checkpoint`
  (or ``jaxsparse export --retain-ratio``) keeps the top ``ceil(retain_ratio * r)`` components of
  each module by accumulated importance and writes a standard PEFT LoRA of those ranks, with the
  same scale per kept component (``alpha_pattern = scale * r_kept``), so its logits equal the
  jaxsparse model restricted to those components.
- LoRA dropout is PEFT's, on the adapter's input (``LoraConfig.forward_view``), training only.

Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"q_proj": {"kernel": jnp.ones((16, 8))}}
    >>> cfg = RankSparseLoraConfig(r=32, lora_alpha=8, target_modules=["q_proj"], target_density=0.1)
    >>> adapter = init(params, cfg, jax.random.key(0))
    >>> d = adapter.deltas["q_proj.kernel"]
    >>> d.a.shape, d.importance.shape, cfg.k(32), d.scale
    ((16, 32), (32,), 4, 0.25)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import rank_sparse
from jaxsparse import tree as tree_lib
from jaxsparse.delta import Adapter, LowRankDelta
from jaxsparse.methods import lora
from jaxsparse.methods.lora import FrozenDict, LoraConfig
from jaxsparse.methods.registry import Method
from jaxsparse.rank_sparse import RankSparseDelta, RankSparseView

PyTree = Any

# Beside adapter_config.json / adapter_model.safetensors: each module's accumulated importance.
IMPORTANCE_NAME = "rank_importance.safetensors"
# PEFT's prefix of module names in saved adapters (the importance file uses the same names).
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

__all__ = [
    "IMPORTANCE_NAME",
    "RankSparseLoraConfig",
    "check_retain_ratio",
    "init",
    "prune_by_importance",
    "read_importance",
    "retained_ranks",
    "save_pruned_checkpoint",
]


@dataclasses.dataclass(frozen=True)
class RankSparseLoraConfig(LoraConfig):
    """A :class:`~jaxsparse.methods.lora.LoraConfig` plus the rank-sparse fields (hashable like it).

    - ``target_density`` in (0, 1]: the fraction of the r components computed per step
      (``k = ceil(target_density * r)``).
    - ``importance_lambda`` in [0, 1]: the weight of the accumulated importance in the selection
      score (0: the batch alone decides; 1: the history alone).
    - ``score_tokens``: tokens per step and module the contextual score is computed on.

    ``rank_pattern`` / ``alpha_pattern`` work as in LoRA (k follows each module's r); ``use_rslora``
    is refused (pruning must keep each component's scale, which rsLoRA ties to the rank).

    Example:
        >>> RankSparseLoraConfig(r=1024, lora_alpha=128, target_modules=["q_proj"]).k(1024)
        82
        >>> try:
        ...     RankSparseLoraConfig(r=8, target_modules=["q_proj"], target_density=0.0)
        ... except ValueError as e:
        ...     print(e)
        RankSparseLoraConfig.target_density must be in (0, 1], got 0.0
    """

    target_density: float = 0.08
    importance_lambda: float = 0.15
    score_tokens: int = rank_sparse.DEFAULT_SCORE_TOKENS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self.target_density, "RankSparseLoraConfig.target_density", low_open=True)
        check_fraction(self.importance_lambda, "RankSparseLoraConfig.importance_lambda", low_open=False)
        if (
            not isinstance(self.score_tokens, int)
            or isinstance(self.score_tokens, bool)
            or self.score_tokens < 1
        ):
            raise ValueError(
                f"RankSparseLoraConfig.score_tokens must be a positive int, got {self.score_tokens!r}"
            )
        if self.use_rslora:
            raise ValueError(
                "RankSparseLoraConfig: use_rslora is not supported (pruning to fewer components must keep "
                "each component's scale, which rsLoRA's alpha / sqrt(r) ties to the rank)"
            )

    def k(self, r: int) -> int:
        """Components computed per step for a module of rank ``r``: ``ceil(target_density * r)``."""
        return rank_sparse.num_selected(self.target_density, r)

    def forward_view(self, adapter: Adapter, rng: jax.Array) -> Adapter:
        """The training step's view (the :mod:`jaxsparse.train` hook): LoRA dropout keys (as
        ``LoraConfig.forward_view``), then every rank-sparse delta as a :class:`RankSparseView`
        selecting its top-k components inside the linear layer."""
        adapter = super().forward_view(adapter, rng)
        deltas = dict(adapter.deltas)
        for path, d in deltas.items():
            if isinstance(d, RankSparseDelta):
                deltas[path] = RankSparseView.of(
                    d,
                    k=self.k(d.rank),
                    importance_lambda=self.importance_lambda,
                    score_tokens=self.score_tokens,
                )
        return dataclasses.replace(adapter, deltas=deltas)

    def record_probes(self, adapter: Adapter, probe_grads: Mapping[str, Any], step: jax.Array) -> Adapter:
        """The :mod:`jaxsparse.train` hook: fold the step's contextual scores (the cotangent of each
        ``importance`` probe) into the running mean, ``I += (c_hat - I) / step`` (``step`` counts
        completed steps, this one included)."""
        deltas = dict(adapter.deltas)
        t = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
        for path, fields in probe_grads["deltas"].items():
            d = deltas[path]
            scores = fields["importance"].astype(jnp.float32)
            deltas[path] = dataclasses.replace(d, importance=d.importance + (scores - d.importance) / t)
        return dataclasses.replace(adapter, deltas=deltas)

    def peft_extra_files(self, adapter: Adapter) -> dict[str, bytes]:
        """Files written beside the PEFT LoRA files (the ``save_peft_lora`` hook): the importance."""
        return {IMPORTANCE_NAME: importance_file_bytes(adapter, self)}


def check_fraction(value: Any, where: str, *, low_open: bool) -> None:
    """``value`` in (0, 1] (``low_open``) or [0, 1]; ``ValueError`` naming ``where`` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{where} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


def init(params: PyTree, config: RankSparseLoraConfig, key: jax.Array) -> Adapter:
    """A rank-sparse LoRA adapter: :func:`jaxsparse.methods.lora.init`'s factors (PEFT's init), each
    delta a :class:`~jaxsparse.rank_sparse.RankSparseDelta` with zero accumulated importance."""
    if not isinstance(config, RankSparseLoraConfig):
        raise TypeError(f"rank_sparse_lora.init needs a RankSparseLoraConfig, got {type(config).__name__}")
    adapter = lora.init(params, config, key)
    deltas = {p: rank_sparse.with_importance(d) for p, d in adapter.deltas.items()}
    return dataclasses.replace(adapter, deltas=deltas)


# --------------------------------------------------------------------------- importance on disk


def importance_file_bytes(adapter: Adapter, config: RankSparseLoraConfig) -> bytes:
    """``rank_importance.safetensors``: ``base_model.model.<module>`` -> importance (r,) float32."""
    from jaxsparse.convert import write_safetensors_bytes

    tensors = {
        PEFT_PREFIX + tree_lib.module_of(p): np.asarray(d.importance, np.float32)
        for p, d in sorted(adapter.deltas.items())
        if isinstance(d, RankSparseDelta)
    }
    metadata = {
        "method": "rank_sparse_lora",
        "target_density": repr(config.target_density),
        "importance_lambda": repr(config.importance_lambda),
    }
    return write_safetensors_bytes(tensors, metadata)


def read_importance(adapter_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{module: importance}`` from an adapter directory's ``rank_importance.safetensors``."""
    from jaxsparse.convert import AdapterFormatError, read_safetensors

    path = os.path.join(os.fspath(adapter_dir), IMPORTANCE_NAME)
    if not os.path.isfile(path):
        raise AdapterFormatError(
            f"{adapter_dir}: no {IMPORTANCE_NAME}: --retain-ratio needs a rank-sparse LoRA adapter "
            "trained by jaxsparse (method: rank_sparse_lora), which records each component's importance"
        )
    tensors, _ = read_safetensors(path)
    out = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX) or value.ndim != 1:
            raise AdapterFormatError(f"{path}: {key!r} is not a module's importance vector")
        out[key[len(PEFT_PREFIX) :]] = np.asarray(value, np.float32)
    return out


def with_importance(adapter: Adapter, importance: Mapping[str, Any]) -> Adapter:
    """``adapter`` (LoRA deltas, e.g. loaded from PEFT) with each module's ``importance`` attached."""
    deltas = {}
    for path, d in adapter.deltas.items():
        module = tree_lib.module_of(path)
        if module not in importance:
            raise ValueError(f"no importance recorded for the adapted module {module!r}")
        value = np.asarray(importance[module], np.float32)
        if value.shape != (d.rank,):
            raise ValueError(
                f"{module!r}: importance has shape {value.shape}, expected ({d.rank},) for r={d.rank}"
            )
        deltas[path] = rank_sparse.with_importance(d, value)
    return dataclasses.replace(adapter, deltas=deltas)


# --------------------------------------------------------------------------- pruning


def check_retain_ratio(retain_ratio: Any, where: str = "retain_ratio") -> None:
    """``ValueError`` unless ``retain_ratio`` is in (0, 1] (0 or less would keep no component)."""
    ok = isinstance(retain_ratio, (int, float)) and not isinstance(retain_ratio, bool)
    if not ok or not math.isfinite(retain_ratio) or not 0.0 < retain_ratio <= 1.0:
        raise ValueError(
            f"{where} must be in (0, 1] (the fraction of each module's rank components kept; "
            f"ceil(ratio * r) >= 1 of them), got {retain_ratio!r}"
        )


def retained_ranks(adapter: Adapter, retain_ratio: float) -> dict[str, int]:
    """``{delta path: ceil(retain_ratio * r)}``; ``ValueError`` when ``retain_ratio`` keeps nothing.

    Example:
        >>> d = rank_sparse.with_importance(LowRankDelta(jnp.ones((2, 20)), jnp.ones((20, 2))))
        >>> retained_ranks(Adapter({"q.kernel": d}), 0.15)
        {'q.kernel': 3}
    """
    check_retain_ratio(retain_ratio)
    return {p: rank_sparse.num_selected(retain_ratio, d.rank) for p, d in adapter.deltas.items()}


def prune_by_importance(adapter: Adapter, retain_ratio: float) -> Adapter:
    """A plain LoRA adapter keeping each module's top ``ceil(retain_ratio * r)`` components by
    accumulated importance (ties: the lower index), in ascending index order, with the same scale.

    Its config is a :class:`~jaxsparse.methods.lora.LoraConfig` whose ``rank_pattern`` /
    ``alpha_pattern`` (``alpha = scale * r_kept``) name the modules whose rank differs from ``r``
    (the most common kept rank).
    """
    ranks = retained_ranks(adapter, retain_ratio)
    config = adapter.config
    deltas: dict[str, LowRankDelta] = {}
    for path, d in adapter.deltas.items():
        if not isinstance(d, RankSparseDelta) or d.importance is None:
            raise ValueError(f"{path}: not a rank-sparse LoRA delta with an accumulated importance")
        order = np.argsort(-np.asarray(d.importance, np.float64), kind="stable")
        keep = np.sort(order[: ranks[path]])
        deltas[path] = LowRankDelta(a=jnp.asarray(d.a)[:, keep], b=jnp.asarray(d.b)[keep, :], scale=d.scale)
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    main_r = max(sorted(counts), key=lambda r: counts[r])
    scales = {tree_lib.module_of(p): d.scale for p, d in deltas.items()}
    main_scale = max(set(scales.values()), key=list(scales.values()).count)
    rank_pattern = {tree_lib.module_of(p): r for p, r in sorted(ranks.items()) if r != main_r}
    alpha_pattern = {
        m: scales[m] * ranks[f"{m}.kernel"]
        for m in sorted(scales)
        if ranks[f"{m}.kernel"] != main_r or scales[m] != main_scale
    }
    new_config = LoraConfig(
        r=main_r,
        lora_alpha=main_scale * main_r,
        target_modules=config.target_modules if config is not None else sorted(scales),
        exclude_modules=getattr(config, "exclude_modules", None),
        lora_dropout=getattr(config, "lora_dropout", 0.0),
        bias=getattr(config, "bias", "none"),
        modules_to_save=getattr(config, "modules_to_save", None),
        rank_pattern=FrozenDict(rank_pattern),
        alpha_pattern=FrozenDict(alpha_pattern),
        task_type=getattr(config, "task_type", None),
        base_model_name_or_path=getattr(config, "base_model_name_or_path", None),
        fan_in_fan_out=getattr(config, "fan_in_fan_out", False),
    )
    return Adapter(deltas=deltas, dense=dict(adapter.dense), config=new_config)


def lora_bytes(adapter: Adapter) -> int:
    """Bytes of the LoRA factors and dense leaves as stored in float32-or-native safetensors tensors."""
    total = 0
    for d in adapter.deltas.values():
        total += int(np.asarray(d.a).nbytes + np.asarray(d.b).nbytes)
    total += sum(int(np.asarray(v).nbytes) for v in adapter.dense.values())
    return total


def save_pruned_checkpoint(
    adapter: Adapter,
    out_dir: str | os.PathLike,
    retain_ratio: float = 0.15,
    *,
    fan_in_fan_out: tuple[str, ...] = (),
    base_model_class: str | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the top ``retain_ratio`` components of every module (by accumulated importance) as a
    standard PEFT LoRA directory (``rank_pattern`` / ``alpha_pattern`` where modules differ), written
    atomically (:func:`jaxsparse.atomic.atomic_dir`). Returns the sizes in bytes of the safetensors
    file before (the full adapter) and after pruning, and the parameter counts.

    Example:
        >>> import jax, tempfile
        >>> params = {"q_proj": {"kernel": jnp.ones((16, 8))}}
        >>> cfg = RankSparseLoraConfig(r=20, lora_alpha=5, target_modules=["q_proj"])
        >>> adapter = init(params, cfg, jax.random.key(0))
        >>> sizes = save_pruned_checkpoint(adapter, tempfile.mkdtemp() + "/pruned", retain_ratio=0.15)
        >>> sizes["params_before"], sizes["params_after"]
        (480, 72)
    """
    from jaxsparse.convert import write_safetensors_bytes
    from jaxsparse.convert.peft_lora import lora_state_dict, save_peft_lora

    pruned = prune_by_importance(adapter, retain_ratio)
    full = dataclasses.replace(
        adapter,
        deltas={p: LowRankDelta(a=d.a, b=d.b, scale=d.scale) for p, d in adapter.deltas.items()},
    )
    before = len(
        write_safetensors_bytes(lora_state_dict(full, fan_in_fan_out=fan_in_fan_out), {"format": "pt"})
    )
    after = len(
        write_safetensors_bytes(lora_state_dict(pruned, fan_in_fan_out=fan_in_fan_out), {"format": "pt"})
    )
    save_peft_lora(
        pruned, out_dir, fan_in_fan_out=fan_in_fan_out, base_model_class=base_model_class, overwrite=overwrite
    )
    return {
        "bytes_before": before,
        "bytes_after": after,
        "params_before": full.num_trainable(),
        "params_after": pruned.num_trainable(),
    }


METHOD = Method(
    name="rank_sparse_lora",
    config_class=RankSparseLoraConfig,
    init=init,
    yaml_keys={
        "adapter.r": "r",
        "adapter.lora_alpha": "lora_alpha",
        "adapter.lora_dropout": "lora_dropout",
        "adapter.target_density": "target_density",
        "adapter.importance_lambda": "importance_lambda",
        "adapter.score_tokens": "score_tokens",
    },
    native_format="peft_lora",
    default_target_modules=DEFAULT_TARGETS,
    description="rank-sparse high-rank LoRA: the top ceil(density*r) components per step by contextual importance",
)
