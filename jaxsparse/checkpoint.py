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

import contextlib
import dataclasses
import errno
import json
import logging
import os
import sys
from collections.abc import Iterator
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
    aux: Any = None  # the pytree saved beside the state (``save(aux=...)``), when asked for


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


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message (tensorstore's run to dozens), at most ``limit`` characters."""
    text = str(error).strip()
    if isinstance(error, CheckpointError) and ": " in text and "does not match" in text:
        text = text.split(": ", 1)[1].strip() or text  # drop our own "checkpoint <dir> step N" prefix
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


# What a full disk, a quota, a read-only file system or a permission error say, in tensorstore's
# messages too (which are ValueErrors, not OSErrors).
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _storage_error(error: BaseException, path: str) -> OSError | None:
    """``error`` (from writing a checkpoint) as an ``OSError`` naming ``path`` and the errno's
    meaning, when it is a storage fault; ``None`` otherwise."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return OSError(error.errno, os.strerror(error.errno), path)
    text = str(error)
    for number in _STORAGE_ERRNOS:
        if os.strerror(number) in text:
            return OSError(number, os.strerror(number), path)
    return None


class _DropOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


# Installed for good after a failed save (see Checkpointer.save); logging adds one instance once.
_AFTER_FAILED_SAVE = _DropOrbaxErrors()


@contextlib.contextmanager
def _quiet_orbax_errors() -> Iterator[None]:
    """While a checkpoint is written: orbax's background threads log a failed write (a traceback
    through absl) before the error reaches :meth:`Checkpointer.save`, which raises it itself."""
    target = logging.getLogger("absl")
    quiet = _DropOrbaxErrors()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


def _is_abandoned_read(unraisable: Any) -> bool:
    error = unraisable.exc_value
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _quiet_abandoned_reads() -> None:
    """Installed with the first :class:`Checkpointer`: after a failed restore or save (a damaged
    file, a full disk), tensorstore completes the reads and writes orbax abandoned on an event loop
    that is already closed; each prints an "Event loop is closed" traceback through
    ``sys.unraisablehook``, possibly later. Those (and only those) are dropped: the failure itself
    is raised by :meth:`Checkpointer.restore` / :meth:`Checkpointer.save`."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxsparse_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    hook._jaxsparse_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    # The same reads, when the process ends first: asyncio logs each failed task it never awaited.
    logging.getLogger("asyncio").addFilter(_DropAbandonedOrbaxTasks())


class _DropAbandonedOrbaxTasks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and "orbax" in message)


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
        _quiet_abandoned_reads()
        options = ocp.CheckpointManagerOptions(
            # the interval is applied in save(): orbax would also save the first step it sees
            save_interval_steps=1,
            max_to_keep=keep,
            create=True,
            # a run killed mid-save leaves a temporary step directory: drop it on the next start
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta", "aux")
        )

    def save(
        self,
        state: TrainState,
        *,
        epoch: int = 0,
        batch_index: int = 0,
        extra: dict[str, Any] | None = None,
        force: bool = False,
        aux: Any = None,
    ) -> bool:
        """Save at ``state.step`` if it is a multiple of ``save_every`` (or ``force``); True if saved.

        ``aux`` is an optional pytree of arrays saved beside the state (the trainer's best adapter
        under early stopping), read back by ``restore(..., aux_template=...)``."""
        extra = _to_python(dict(extra or {}))
        _check_json(extra)
        step = int(state.step)
        if not force and step % self.save_every != 0:
            return False
        if step in self._manager.all_steps():
            return False
        meta = {"step": step, "epoch": int(epoch), "batch_index": int(batch_index), "extra": extra}
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if aux is not None:
            items["aux"] = ocp.args.StandardSave(aux)
        args = ocp.args.Composite(**items)
        try:
            with _quiet_orbax_errors():
                return bool(self._manager.save(step, args=args, force=True))
        except Exception as e:
            # The other items' writes of this step may still be running in orbax's threads; when
            # they fail too (the same full disk), they log a traceback through absl, possibly at
            # interpreter shutdown. The failure is raised here, once: theirs stay quiet.
            logging.getLogger("absl").addFilter(_AFTER_FAILED_SAVE)
            with contextlib.suppress(Exception):
                self._manager.wait_until_finished()
            storage = _storage_error(e, os.path.join(self.directory, str(step)))
            if storage is None:
                raise
            raise storage from e

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        self._manager.wait_until_finished()
        return self._manager.latest_step()

    def restore(self, template: TrainState, step: int | None = None, aux_template: Any = None) -> Restored:
        """Restore ``step`` (default: the latest) into the structure, dtypes and shardings of ``template``.

        ``template`` is a state built the same way as the saved one (e.g. ``init_train_state`` with
        the same adapter config and optimizer); a mismatch raises :class:`CheckpointError`. The
        arrays come back with the template's shardings, whatever the devices that saved them: a
        checkpoint written on an 8-device mesh restores onto 2 devices, or one. With ``aux_template``
        the ``aux`` pytree saved beside the state is restored too (a checkpoint without one: error).
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
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        if aux_template is not None:
            items["aux"] = ocp.args.StandardRestore(
                jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, aux_template)
            )
        args = ocp.args.Composite(**items)
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
            aux=restored["aux"] if aux_template is not None else None,
        )

    def restore_newest_readable(
        self, template: TrainState, aux_template: Any = None
    ) -> tuple[Restored, list[tuple[int, str]]]:
        """The newest checkpoint that reads back whole into ``template``, and ``(step, why)`` for each
        newer one that did not (a truncated or damaged file: a storage fault, a kill mid-copy). The
        skipped checkpoints are left on disk. :class:`CheckpointError` naming every step and why
        when none reads back (or there is none)."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory!r}")
        skipped: list[tuple[int, str]] = []
        for step in steps:
            try:
                return self.restore(template, step, aux_template), skipped
            except Exception as e:
                skipped.append((step, first_line(e)))
        reasons = "; ".join(f"step {s}: {why}" for s, why in skipped)
        raise CheckpointError(f"no checkpoint in {self.directory!r} reads back whole ({reasons})")

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
