"""Give the host memory that XLA's compiler frees back to the operating system.

Compiling a program (LLVM, XLA's passes) allocates and frees a few hundred MiB in many small
blocks on the compiler's threads. glibc keeps freed blocks in its per-thread arenas, so the
process keeps them resident and the training step's buffers are allocated on top: on MiniLM
16x128 the peak RSS of a SHiRA step is ~75 MiB higher than it need be (BENCHMARKS.md 3b).
``malloc_trim(0)`` hands the free pages of every arena back; :func:`trim_after_compiles` runs it
after each XLA compile (a few ms each), which is what ``jaxsparse train`` does.

Only glibc has ``malloc_trim``; elsewhere (macOS, musl) both functions do nothing and say so.

Example:
    >>> isinstance(release_free_memory(), bool)
    True
    >>> trim_after_compiles()  # idempotent: one listener however often it is called
    >>> trim_after_compiles()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import jax

# The event jax records right after XLA compiled a program (jax._src.dispatch.BACKEND_COMPILE_EVENT).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@functools.cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim(0)``).

    ``True`` when the C library has ``malloc_trim`` (the call was made), ``False`` otherwise.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _on_event(event: str, duration: float, **kwargs: Any) -> None:
    if event == BACKEND_COMPILE_EVENT:
        release_free_memory()


_installed = False


def trim_after_compiles() -> None:
    """After every XLA compile in this process, :func:`release_free_memory` (installed once).

    The compile has finished and its scratch memory is free when the event fires, and the program
    has not run yet, so its buffers are allocated after the trim.
    """
    global _installed
    if not _installed and _malloc_trim() is not None:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _installed = True
