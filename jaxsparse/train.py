"""The training spine: a loss over the adapter's trainable leaves, and a jitted optax step.

The base ``params`` are a frozen input of every step: they are never differentiated, never put
in the optimizer, and never donated (the same buffers are reused step after step). The optimizer
is initialised on :func:`jaxsparse.delta.trainable` of the adapter only (the delta ``values`` and
any dense ``modules_to_save`` leaves), so its state is O(k) whatever the base model's size.

Contract of the two user functions:

- ``apply_model(params, batch) -> outputs`` (or ``apply_model(params, batch, rng)`` when the step
  is built with ``takes_rng=True``, e.g. for dropout): the forward pass on *effective* params;
- ``loss_fn(outputs, batch) -> loss`` or ``-> (loss, metrics_dict)``: a scalar to minimise.

A method's config may shape each training step through three optional hooks (duck-typed, so
this spine imports no method; all run traced under ``jit`` with static shapes):

- ``forward_view(adapter, rng) -> adapter``: the adapter the step's forward pass sees, applied
  *inside* the differentiated loss to the adapter holding the trainable leaves, so a view that
  masks, drops or gathers trainable entries gets the matching zero gradients (NLS samples ranks,
  delta/LoRA dropout draws masks). ``rng`` is the step's key (never ``None`` in a step; the view
  is skipped when :func:`value_and_grad` is called without a key). Training only: evaluation and
  merge use the stored adapter.
- ``constrain_grads(adapter, grads, step) -> grads``: before the optimizer (masked updates).
- ``after_update(adapter, step) -> adapter``: after the update, outside the gradient, with
  ``step`` the number of completed steps (pruning schedules, accumulated statistics); it may
  change trainable values (re-zero pruned entries) and non-trainable fields alike.
- ``record_probes(adapter, probe_grads, step) -> adapter``: for statistics computed *inside* the
  forward pass (a linear layer returns only its output). A delta class may name ``probe_fields``
  (beside ``trainable_fields``): non-trainable leaves the step also differentiates, whose
  cotangent a custom VJP in the forward sets to the statistic (rank-sparse LoRA's per-component
  contextual scores, :mod:`jaxsparse.rank_sparse`). Their gradients never reach the optimizer; the
  hook receives them (``{"deltas": {path: {field: array}}}``) after the update, before
  ``after_update``, with ``step`` the number of completed steps.

``factored=True`` (for models of :mod:`jaxsparse.models`) hands ``apply_model`` params whose
targeted kernels carry their deltas beside the frozen weight (:mod:`jaxsparse.factored`): LoRA runs
as ``x W + x a b s`` and low-density sparse deltas take the sampled-product gradient, so no dense
weight gradient is formed for them. The default (``False``) hands it plain arrays.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxsparse.delta import Adapter, SparseDelta
    >>> params = {"lin": {"kernel": jnp.zeros((2, 2))}}
    >>> adapter = Adapter({"lin.kernel": SparseDelta(jnp.array([0, 3], jnp.int32), jnp.zeros(2), (2, 2))})
    >>> apply_model = lambda p, b: b["x"] @ p["lin"]["kernel"]
    >>> loss_fn = lambda out, b: jnp.mean((out - b["y"]) ** 2)
    >>> step = make_train_step(apply_model, loss_fn, optax.sgd(0.5))
    >>> state = init_train_state(adapter, optax.sgd(0.5), jax.random.PRNGKey(0))
    >>> batch = {"x": jnp.eye(2), "y": jnp.eye(2)}
    >>> state, metrics = step(state, params, batch)
    >>> int(state.step), float(metrics["loss"])
    (1, 0.5)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from jaxsparse import delta as delta_lib
from jaxsparse.delta import Adapter

PyTree = Any
ApplyModel = Callable[..., Any]
LossFn = Callable[[Any, Any], Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed as a whole).

    ``adapter`` carries the trained leaves (``trainable`` is its O(k) float tree) and its fixed
    indices; ``opt_state`` is the optax state of ``trainable``; ``rng`` is a raw ``uint32[2]``
    PRNG key (``jax.random.PRNGKey``), split once per step; ``step`` counts completed steps.
    """

    step: Array
    adapter: Adapter
    opt_state: PyTree
    rng: Array

    @property
    def trainable(self) -> dict[str, Any]:
        return delta_lib.trainable(self.adapter)


def _raw_key(rng: Any) -> Array:
    if jnp.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    rng = jnp.asarray(rng)
    if rng.dtype != jnp.uint32:
        raise TypeError(
            f"rng must be a PRNG key (jax.random.PRNGKey or jax.random.key), got dtype {rng.dtype}"
        )
    return rng


def init_train_state(
    adapter: Adapter, optimizer: optax.GradientTransformation, rng: Array | int = 0
) -> TrainState:
    """A fresh :class:`TrainState`: step 0, the optimizer initialised on the trainable leaves only.

    ``rng`` is a PRNG key or an int seed.
    """
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    # A private copy: the jitted step donates the state, which must not delete the caller's arrays.
    adapter = jax.tree_util.tree_map(jnp.array, adapter)
    opt_state = optimizer.init(delta_lib.trainable(adapter))
    return TrainState(step=jnp.zeros((), jnp.int32), adapter=adapter, opt_state=opt_state, rng=_raw_key(rng))


def _split_loss(result: Any) -> tuple[Array, dict[str, Array]]:
    if isinstance(result, tuple):
        if len(result) != 2 or not isinstance(result[1], Mapping):
            raise TypeError("loss_fn must return a scalar loss or a (loss, metrics_dict) pair")
        return result[0], dict(result[1])
    return result, {}


def make_loss(
    apply_model: ApplyModel,
    loss_fn: LossFn,
    *,
    takes_rng: bool = False,
    factored: bool = False,
    sampled_max_density: float | None = None,
) -> Callable[..., tuple[Array, dict[str, Array]]]:
    """``adapter_loss(trainable, adapter, params, batch, rng) -> (loss, metrics)``.

    Differentiate it in its first argument only (``jax.value_and_grad(..., has_aux=True)``): the
    gradient is a tree shaped like ``delta.trainable(adapter)``; ``params`` stay constants.
    """

    def adapter_loss(trainable, adapter, params, batch, rng, probes=None):
        params = jax.lax.stop_gradient(params)
        adapter = delta_lib.with_trainable(adapter, trainable)
        if probes is not None:
            adapter = _with_probes(adapter, probes)
        view = getattr(adapter.config, "forward_view", None)
        if view is not None and rng is not None:
            adapter = view(adapter, rng)
        effective = delta_lib.apply(
            params,
            adapter,
            factored=factored,
            sampled_max_density=sampled_max_density,
        )
        outputs = apply_model(effective, batch, rng) if takes_rng else apply_model(effective, batch)
        loss, metrics = _split_loss(loss_fn(outputs, batch))
        loss = jnp.asarray(loss)
        if loss.shape != ():
            raise ValueError(f"loss_fn must return a scalar, got shape {loss.shape}")
        return loss, metrics

    return adapter_loss


def value_and_grad(
    apply_model: ApplyModel,
    loss_fn: LossFn,
    *,
    takes_rng: bool = False,
    factored: bool = False,
    sampled_max_density: float | None = None,
) -> Callable[..., tuple[tuple[Array, dict[str, Array]], dict[str, Any]]]:
    """``f(adapter, params, batch, rng=None) -> ((loss, metrics), grads)``, grads w.r.t. ``trainable(adapter)``."""
    adapter_loss = make_loss(
        apply_model, loss_fn, takes_rng=takes_rng, factored=factored, sampled_max_density=sampled_max_density
    )
    grad_fn = jax.value_and_grad(adapter_loss, has_aux=True)

    def f(adapter: Adapter, params: PyTree, batch: Any, rng: Array | None = None):
        return grad_fn(delta_lib.trainable(adapter), adapter, params, batch, rng)

    return f


# XLA:CPU's default scheduler orders the step's ops for concurrency, which keeps activations alive
# longer: on MiniLM 16x128 its temp buffer is 796 MiB against 536 MiB with the memory-optimized
# scheduler, at the same step time on the 2-core CPU we measure on (BENCHMARKS.md 3b), and it makes
# remat useless (the recomputation is hoisted back into the forward pass: 796 MiB with
# `train.remat` too, 298 MiB with both).
_CPU_SCHEDULER_FLAG = "xla_cpu_scheduler_type"
_CPU_MEMORY_SCHEDULER = "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def step_compiler_options(backend: str | None = None) -> dict[str, str]:
    """XLA compiler options for a training step on ``backend`` (default: JAX's default backend).

    On CPU, the memory-optimized scheduler (about a third less peak memory for the same step time),
    unless ``XLA_FLAGS`` already chooses a scheduler; elsewhere none. :func:`make_train_step` jits
    with these; pass them to your own ``jax.jit(..., compiler_options=...)`` when you jit with
    ``jit=False``.

    Example:
        >>> step_compiler_options("cpu")
        {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
        >>> step_compiler_options("gpu")
        {}
    """
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu" or _CPU_SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {_CPU_SCHEDULER_FLAG: _CPU_MEMORY_SCHEDULER}


def make_train_step(
    apply_model: ApplyModel,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    takes_rng: bool = False,
    factored: bool = False,
    sampled_max_density: float | None = None,
    jit: bool = True,
    compiler_options: Mapping[str, Any] | None = None,
) -> Callable[[TrainState, PyTree, Any], tuple[TrainState, dict[str, Array]]]:
    """A step ``(state, params, batch) -> (state, metrics)`` for any optax optimizer.

    Jitted with the incoming ``state`` donated (its buffers are reused for the new state) and
    ``params`` not donated, compiled with ``compiler_options`` (default:
    :func:`step_compiler_options`). ``metrics`` holds ``loss``, ``grad_norm`` (global L2 norm of
    the gradient over the trainable leaves) and whatever ``loss_fn`` returned beside the loss.
    """
    adapter_loss = make_loss(
        apply_model, loss_fn, takes_rng=takes_rng, factored=factored, sampled_max_density=sampled_max_density
    )
    grad_fn = jax.value_and_grad(adapter_loss, has_aux=True)
    probe_grad_fn = jax.value_and_grad(adapter_loss, argnums=(0, 5), has_aux=True)

    def step(state: TrainState, params: PyTree, batch: Any) -> tuple[TrainState, dict[str, Array]]:
        rng, step_rng = jax.random.split(state.rng)
        trainable = delta_lib.trainable(state.adapter)
        config = state.adapter.config
        record = getattr(config, "record_probes", None)
        probes = _probes(state.adapter) if record is not None else None
        if probes:
            (loss, metrics), (grads, probe_grads) = probe_grad_fn(
                trainable, state.adapter, params, batch, step_rng, probes
            )
        else:
            (loss, metrics), grads = grad_fn(trainable, state.adapter, params, batch, step_rng)
        constrain = getattr(config, "constrain_grads", None)
        if constrain is not None:
            grads = constrain(state.adapter, grads, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        adapter = delta_lib.with_trainable(state.adapter, trainable)
        if probes:
            adapter = record(adapter, probe_grads, state.step + 1)
        after = getattr(config, "after_update", None)
        if after is not None:
            adapter = after(adapter, state.step + 1)
        new_state = TrainState(
            step=state.step + 1,
            adapter=adapter,
            opt_state=opt_state,
            rng=rng,
        )
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}
        return new_state, metrics

    if not jit:
        return step
    options = step_compiler_options() if compiler_options is None else dict(compiler_options)
    return jax.jit(step, donate_argnums=(0,), compiler_options=options or None)


def _probes(adapter: Adapter) -> dict[str, Any]:
    """The adapter's probe leaves (``probe_fields`` of its delta classes): ``{"deltas": {path: {field: array}}}``."""
    found = {
        p: {f: getattr(d, f) for f in getattr(type(d), "probe_fields", ())}
        for p, d in adapter.deltas.items()
        if getattr(type(d), "probe_fields", ())
    }
    return {"deltas": found} if found else {}


def _with_probes(adapter: Adapter, probes: Mapping[str, Any]) -> Adapter:
    deltas = dict(adapter.deltas)
    for p, fields in probes["deltas"].items():
        deltas[p] = dataclasses.replace(deltas[p], **fields)
    return dataclasses.replace(adapter, deltas=deltas)


def make_eval_step(
    apply_model: ApplyModel, loss_fn: LossFn, *, factored: bool = False, jit: bool = True
) -> Callable[[Adapter, PyTree, Any], dict[str, Array]]:
    """``(adapter, params, batch) -> metrics`` (``loss`` plus ``loss_fn``'s extras), no gradient."""

    def evaluate(adapter: Adapter, params: PyTree, batch: Any) -> dict[str, Array]:
        outputs = apply_model(delta_lib.apply(params, adapter, factored=factored), batch)
        loss, metrics = _split_loss(loss_fn(outputs, batch))
        return {"loss": jnp.asarray(loss), **metrics}

    return jax.jit(evaluate) if jit else evaluate
