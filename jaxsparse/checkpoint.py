"""Resumable training checkpoints: the whole :class:`~jaxsparse.train.TrainState` plus JSON metadata.

A checkpoint holds the step, the adapter (trained values *and* its fixed indices), the optimizer
state, the PRNG key, the data position (epoch, batch index) and any JSON-able extras such as
metrics. It is an orbax-checkpoint ``CheckpointManager`` directory: one sub-directory per saved
step, written to a temporary name and renamed when complete, so a crash mid-save leaves the
previous checkpoint as the latest. Restoring the latest one and continuing gives bit-identical
parameters to an uninterrupted run (the step function is deterministic given the state).

Example:
    >>> import tempfile, jax.numpy as jnp, optax
    >>> from jaxsparse.delta import Adapter, SparseDelta
    >>> from jaxsparse.train import init_train_state
    >>> adapter = Adapter({"w": SparseDelta(jnp.array([0], jnp.int32), jnp.array([1.5]), (2,))})
    >>> state = init_train_state(adapter, optax.adam(1e-3), 0)
    >>> with Checkpointer(tempfile.mkdtemp(), save_every=1, keep=2) as ckpt:
    ...     _ = ckpt.save(state, epoch=0, batch_index=0, extra={"loss": 0.7}, force=True)
    ...     restored = ckpt.restore(state)
    >>> float(restored.state.adapter.deltas["w"].values[0]), restored.extra["loss"]
    (1.5, 0.7)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsparse.train import TrainState


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint: the training state, where the data stream was, and the extras saved."""

    state: TrainState
    step: int
    epoch: int
    batch_index: int
    extra: dict[str, Any]


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, empty, or does not match the training state."""


def _check_json(extra: dict[str, Any]) -> None:
    try:
        json.dumps(extra, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"checkpoint extra must be JSON-serialisable (numbers, strings, lists, dicts): {e}"
        ) from None


def _to_python(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _to_python(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_python(v) for v in x]
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return np.asarray(x).tolist()
    return x


class Checkpointer:
    """Save every ``save_every`` steps, keep the last ``keep``, restore the latest for resume.

    Use as a context manager (or call :meth:`close`) so pending writes finish. ``async_save``
    lets training continue while a checkpoint is written (orbax's background thread).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int = 100,
        keep: int | None = 3,
        async_save: bool = False,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None (keep all), got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            # the interval is applied in save(): orbax would also save the first step it sees
            save_interval_steps=1,
            max_to_keep=keep,
            create=True,
            # a run killed mid-save leaves a temporary step directory: drop it on the next start
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(
        self,
        state: TrainState,
        *,
        epoch: int = 0,
        batch_index: int = 0,
        extra: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save at ``state.step`` if it is a multiple of ``save_every`` (or ``force``); True if saved."""
        extra = _to_python(dict(extra or {}))
        _check_json(extra)
        step = int(state.step)
        if not force and step % self.save_every != 0:
            return False
        if step in self._manager.all_steps():
            return False
        meta = {"step": step, "epoch": int(epoch), "batch_index": int(batch_index), "extra": extra}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return bool(self._manager.save(step, args=args, force=True))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        self._manager.wait_until_finished()
        return self._manager.latest_step()

    def restore(self, template: TrainState, step: int | None = None) -> Restored:
        """Restore ``step`` (default: the latest) into the structure, dtypes and shardings of ``template``.

        ``template`` is a state built the same way as the saved one (e.g. ``init_train_state`` with
        the same adapter config and optimizer); a mismatch raises :class:`CheckpointError`. The
        arrays come back with the template's shardings, whatever the devices that saved them: a
        checkpoint written on an 8-device mesh restores onto 2 devices, or one.
        """
        self._manager.wait_until_finished()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint to resume from in {self.directory!r}")
        elif step not in self._manager.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory!r}; have {self.all_steps()}"
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory!r} step {step} does not match the training state template "
                f"(different adapter targets, k, or optimizer?): {e}"
            ) from e
        meta = restored["meta"]
        return Restored(
            state=restored["state"],
            step=int(meta["step"]),
            epoch=int(meta["epoch"]),
            batch_index=int(meta["batch_index"]),
            extra=dict(meta.get("extra", {})),
        )

    def restore_or(self, template: TrainState) -> Restored:
        """The latest checkpoint if any, else ``template`` itself at epoch 0, batch 0 (fresh start)."""
        if self.latest_step() is None:
            return Restored(state=template, step=int(template.step), epoch=0, batch_index=0, extra={})
        return self.restore(template)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
