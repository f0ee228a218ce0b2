"""Sparse LoRA: LoRA whose factors ``A`` and ``B`` are magnitude-pruned during training.

The recipe of the "Sparse LoRA" model card (r 8, alpha 16, dropout 0.1, 50% magnitude pruning of
the LoRA factors): a :class:`~jaxsparse.methods.lora.LoraConfig` plus a pruning schedule. The
schedule is given as fractions of the run's ``total_steps`` (``train.steps``), so a shorter run
still ends pruned:

- ``prune_schedule="cubic"`` (Zhu & Gupta, 2017): the target sparsity at step ``t`` is
  ``s_t = s_f (1 - (1 - (t - t0) / (t1 - t0))^3)`` inside the window ``[t0, t1]``, 0 before it and
  ``s_f`` after, with ``t0 = round(prune_start * total_steps)``, ``t1 = round(prune_end *
  total_steps)``; masks are recomputed every ``prune_every`` steps from ``t0`` and at ``t1``.
- ``prune_schedule="one_shot"``: the whole target ``s_f`` at step ``t1`` (``prune_start`` unused).

At each mask update the ``round(s_t * n)`` entries of smallest magnitude are pruned, ranked in each
factor on its own (``prune_scope="factor"``: every ``A`` and every ``B`` ends at the same sparsity)
or over all factors together (``"global"``: one threshold for the whole adapter). Pruning only ever
grows: an entry pruned once is ranked below every kept one, so it stays pruned.

The masks are the ``a_mask`` / ``b_mask`` of each :class:`~jaxsparse.delta.LowRankDelta`, part of
the adapter's state (checkpointed and resumed with it, never trained). Pruned entries are held at
exactly zero in ``a`` and ``b`` themselves through the training step's hooks
(:mod:`jaxsparse.train`): their gradients are masked before the optimizer
(:meth:`SparseLoraConfig.constrain_grads`) and they are re-zeroed after every update
(:meth:`SparseLoraConfig.after_update`), so neither AdamW's momentum nor its weight decay can move
them. Forward, merge and export therefore read ``a`` and ``b`` as they are: the saved adapter is a
standard PEFT LoRA directory whose pruned entries are exact zeros.

Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"query": {"kernel": jnp.ones((8, 8))}}
    >>> cfg = SparseLoraConfig(r=2, target_modules=["query"], init_lora_weights=False, sparsity=0.5,
    ...                        prune_schedule="one_shot", prune_end=0.5, total_steps=10)
    >>> ad = init(params, cfg, jax.random.key(0))
    >>> ad = cfg.after_update(ad, jnp.asarray(5))  # step t1 = round(0.5 * 10) = 5: prune to 50%
    >>> d = ad.deltas["query.kernel"]
    >>> int((d.a == 0).sum()), d.a.size, int((d.b == 0).sum()), d.b.size
    (8, 16, 8, 16)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxsparse.delta import Adapter, LowRankDelta
from jaxsparse.methods import lora
from jaxsparse.methods.lora import LoraConfig
from jaxsparse.methods.registry import Method

PyTree = Any

PRUNE_SCHEDULES = ("cubic", "one_shot")
PRUNE_SCOPES = ("factor", "global")
FACTORS = ("a", "b")


@dataclasses.dataclass(frozen=True)
class SparseLoraConfig(LoraConfig):
    """A :class:`~jaxsparse.methods.lora.LoraConfig` plus magnitude pruning of its factors.

    - ``sparsity``: the final fraction of factor entries pruned, in [0, 1) (0: plain LoRA).
    - ``prune_schedule``: ``"cubic"`` (gradual) or ``"one_shot"``.
    - ``prune_start`` / ``prune_end``: the window as fractions of ``total_steps`` in [0, 1],
      start <= end; the target is reached at ``prune_end``.
    - ``prune_every``: steps between mask updates inside a cubic window.
    - ``prune_scope``: ``"factor"`` (each A, each B ranked alone) or ``"global"`` (all together).
    - ``total_steps``: the run's number of steps (the trainer passes ``train.steps``).

    Example:
        >>> cfg = SparseLoraConfig(target_modules=["query"], total_steps=100)
        >>> cfg.prune_window(), round(float(cfg.target_sparsity(35)), 6)
        ((10, 60), 0.4375)
        >>> try:
        ...     SparseLoraConfig(target_modules=["query"], total_steps=100, sparsity=1.0)
        ... except ValueError as e:
        ...     print(e)
        SparseLoraConfig.sparsity must be in [0, 1) (the fraction of factor entries pruned), got 1.0
    """

    sparsity: float = 0.5
    prune_schedule: str = "cubic"
    prune_start: float = 0.1
    prune_end: float = 0.6
    prune_every: int = 10
    prune_scope: str = "factor"
    total_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                "SparseLoraConfig.sparsity must be in [0, 1) (the fraction of factor entries pruned), "
                f"got {self.sparsity!r}"
            )
        if self.prune_schedule not in PRUNE_SCHEDULES:
            raise ValueError(
                f"SparseLoraConfig.prune_schedule must be one of {PRUNE_SCHEDULES}, got {self.prune_schedule!r}"
            )
        if self.prune_scope not in PRUNE_SCOPES:
            raise ValueError(
                f"SparseLoraConfig.prune_scope must be one of {PRUNE_SCOPES}, got {self.prune_scope!r}"
            )
        for name in ("prune_start", "prune_end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"SparseLoraConfig.{name} must be a fraction of total_steps in [0, 1], got {value!r}"
                )
        if self.prune_start > self.prune_end:
            raise ValueError(
                f"SparseLoraConfig.prune_start ({self.prune_start}) is after prune_end ({self.prune_end})"
            )
        if not isinstance(self.prune_every, int) or self.prune_every < 1:
            raise ValueError(f"SparseLoraConfig.prune_every must be an int >= 1, got {self.prune_every!r}")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            raise ValueError(f"SparseLoraConfig.total_steps must be an int >= 1, got {self.total_steps!r}")
        if self.sparsity > 0 and self.total_steps is None:
            raise ValueError(
                "SparseLoraConfig.total_steps is None: the pruning window is a fraction of the run's steps; "
                "name them (the trainer passes train.steps)"
            )

    def prune_window(self) -> tuple[int, int]:
        """``(t0, t1)``: the steps where pruning starts and where the target is reached
        (``t1 >= 1``: the first update after step 1 is the earliest a mask can change)."""
        total = self.total_steps or 1
        t1 = max(1, round(self.prune_end * total))
        t0 = min(round(self.prune_start * total), t1)
        return t0, t1

    def target_sparsity(self, step: Any) -> jax.Array:
        """The scheduled sparsity after ``step`` completed steps (float32, jit-able in ``step``)."""
        t0, t1 = self.prune_window()
        t = jnp.asarray(step, jnp.float32)
        final = jnp.float32(self.sparsity)
        if self.prune_schedule == "one_shot" or t1 == t0:
            return jnp.where(t >= t1, final, 0.0)
        progress = jnp.clip((t - t0) / (t1 - t0), 0.0, 1.0)
        return jnp.where(t >= t1, final, final * (1.0 - (1.0 - progress) ** 3))

    def is_mask_update(self, step: Any) -> jax.Array:
        """Whether the masks are recomputed after ``step`` completed steps (jit-able)."""
        t0, t1 = self.prune_window()
        t = jnp.asarray(step, jnp.int32)
        if self.prune_schedule == "one_shot":
            return t == t1
        return (t == t1) | ((t >= t0) & (t < t1) & ((t - t0) % self.prune_every == 0))

    # ------------------------------------------------------------------ the training step's hooks

    def constrain_grads(self, adapter: Adapter, grads: PyTree, step: Any) -> PyTree:
        """The :mod:`jaxsparse.train` hook: zero gradient for every pruned factor entry."""
        deltas = dict(grads["deltas"])
        for path, d in adapter.deltas.items():
            if isinstance(d, LowRankDelta) and d.a_mask is not None:
                g = deltas[path]
                deltas[path] = {**g, "a": jnp.where(d.a_mask, g["a"], 0), "b": jnp.where(d.b_mask, g["b"], 0)}
        return {**grads, "deltas": deltas}

    def after_update(self, adapter: Adapter, step: Any) -> Adapter:
        """The :mod:`jaxsparse.train` hook: on a scheduled step, grow the masks to the scheduled
        sparsity by magnitude; on every step, re-zero the pruned entries (the optimizer's momentum
        and weight decay move them even with a zero gradient)."""
        paths = [p for p, d in adapter.deltas.items() if isinstance(d, LowRankDelta) and d.a_mask is not None]
        if not paths or self.sparsity == 0:
            return adapter
        deltas = dict(adapter.deltas)
        masks = {(p, f): getattr(deltas[p], f"{f}_mask") for p in paths for f in FACTORS}
        values = {(p, f): getattr(deltas[p], f) for p in paths for f in FACTORS}
        grown = prune_masks(values, masks, self.target_sparsity(step), self.sparsity, self.prune_scope)
        update = self.is_mask_update(step)
        for p in paths:
            new = {f"{f}_mask": jnp.where(update, grown[(p, f)], masks[(p, f)]) for f in FACTORS}
            deltas[p] = dataclasses.replace(
                deltas[p],
                a=jnp.where(new["a_mask"], deltas[p].a, 0),
                b=jnp.where(new["b_mask"], deltas[p].b, 0),
                **new,
            )
        return dataclasses.replace(adapter, deltas=deltas)


def prune_masks(
    values: dict[Any, jax.Array],
    masks: dict[Any, jax.Array],
    sparsity: Any,
    final_sparsity: float,
    scope: str,
) -> dict[Any, jax.Array]:
    """Keep-masks that prune, in each scope, the ``round(sparsity * n)`` entries of smallest
    magnitude, previously pruned entries first (so a mask only ever loses entries).

    ``scope="factor"`` ranks each ``values[key]`` alone; ``"global"`` ranks all of them together.
    ``sparsity`` may be traced; at ``final_sparsity`` the count is exactly ``round(final_sparsity * n)``.

    Example:
        >>> v = {"a": jnp.array([0.3, -0.1, 0.2, 0.0])}
        >>> prune_masks(v, {"a": jnp.array([True, True, True, False])}, 0.5, 0.5, "factor")["a"].tolist()
        [True, False, True, False]
    """
    keys = list(values)
    groups = [[k] for k in keys] if scope == "factor" else [keys]
    out: dict[Any, jax.Array] = {}
    for group in groups:
        scores = jnp.concatenate(
            [jnp.where(masks[k], jnp.abs(values[k]), -1.0).reshape(-1).astype(jnp.float32) for k in group]
        )
        n = scores.shape[0]
        k_final = round(final_sparsity * n)
        sparsity = jnp.asarray(sparsity, jnp.float32)
        k = jnp.where(sparsity >= final_sparsity, k_final, jnp.floor(sparsity * n + 0.5).astype(jnp.int32))
        order = jnp.argsort(scores, stable=True)
        ranks = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        keep = jnp.concatenate([masks[key].reshape(-1) for key in group]) & (ranks >= k)
        start = 0
        for key in group:
            size = values[key].size
            out[key] = keep[start : start + size].reshape(values[key].shape)
            start += size
    return out


def init(params: PyTree, config: SparseLoraConfig, key: jax.Array) -> Adapter:
    """A sparse LoRA adapter: LoRA (:func:`jaxsparse.methods.lora.init`) with all-keep factor masks.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = SparseLoraConfig(r=2, target_modules=["q"], total_steps=10)
        >>> d = init({"q": {"kernel": jnp.ones((4, 3))}}, cfg, jax.random.key(0)).deltas["q.kernel"]
        >>> d.a_mask.shape, d.b_mask.shape, bool(d.a_mask.all())
        ((4, 2), (2, 3), True)
    """
    if not isinstance(config, SparseLoraConfig):
        raise TypeError(f"sparse_lora.init needs a SparseLoraConfig, got {type(config).__name__}")
    adapter = lora.init(params, config, key)
    deltas = {
        p: dataclasses.replace(d, a_mask=jnp.ones(d.a.shape, bool), b_mask=jnp.ones(d.b.shape, bool))
        for p, d in adapter.deltas.items()
    }
    return dataclasses.replace(adapter, deltas=deltas)


def sparsity_report(adapter: Adapter) -> dict[str, Any]:
    """Trainable factor entries, how many are non-zero, and the pruned fraction, in all and per factor.

    Example:
        >>> import jax.numpy as jnp
        >>> d = LowRankDelta(a=jnp.array([[1.0, 0.0]]), b=jnp.array([[0.0], [2.0]]))
        >>> r = sparsity_report(Adapter({"q.kernel": d}))
        >>> r["trainable"], r["nonzero"], r["sparsity"]
        (4, 2, 0.5)
    """
    per_factor = {}
    for path, d in adapter.deltas.items():
        if isinstance(d, LowRankDelta):
            for f in FACTORS:
                w = getattr(d, f)
                per_factor[f"{path}.{f}"] = (int(w.size), int(jnp.count_nonzero(w)))
    trainable = sum(n for n, _ in per_factor.values())
    nonzero = sum(nz for _, nz in per_factor.values())
    return {
        "trainable": trainable,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / trainable if trainable else 0.0,
        "per_factor": per_factor,
    }


METHOD = Method(
    name="sparse_lora",
    config_class=SparseLoraConfig,
    init=init,
    yaml_keys={
        "adapter.r": "r",
        "adapter.lora_alpha": "lora_alpha",
        "adapter.lora_dropout": "lora_dropout",
        "adapter.sparsity": "sparsity",
        "adapter.prune_schedule": "prune_schedule",
        "adapter.prune_start": "prune_start",
        "adapter.prune_end": "prune_end",
        "adapter.prune_every": "prune_every",
        "adapter.prune_scope": "prune_scope",
        "train.steps": "total_steps",
    },
    native_format="peft_lora",
    # The card's targets (BERT/MiniLM names; DistilBERT's are q_lin/v_lin).
    default_target_modules=("query", "value"),
    description="Sparse LoRA: LoRA with its factors magnitude-pruned (one-shot or cubic schedule)",
)
