"""jaxsparse.host_memory: the allocator's free pages really go back to the OS, after each compile."""

import ctypes
import ctypes.util

import jax
import jax.numpy as jnp
import pytest

from jaxsparse import host_memory


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


glibc = pytest.mark.skipif(host_memory._malloc_trim() is None, reason="needs glibc's malloc_trim")


@glibc
def test_release_free_memory_returns_freed_heap_pages_to_the_os():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 160 MiB in 64 KiB blocks (under glibc's mmap threshold, so on the heap) written to, then
    # freed below a live block that pins the heap's top: free() alone keeps them resident.
    block, n = 64 * 1024, 2560
    blocks = [libc.malloc(block) for _ in range(n)]
    for b in blocks:
        ctypes.memset(b, 1, block)
    pin = libc.malloc(block)
    ctypes.memset(pin, 1, block)
    for b in blocks:
        libc.free(b)
    before = rss_mib()
    assert host_memory.release_free_memory() is True
    after = rss_mib()
    libc.free(pin)
    assert before - after > 100, (before, after)


@glibc
def test_trim_after_compiles_trims_once_per_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "release_free_memory", lambda: calls.append(1) or True)
    host_memory.trim_after_compiles()
    host_memory.trim_after_compiles()  # a second install adds no second listener

    x = jnp.ones(7).block_until_ready()
    calls.clear()
    jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.5)(x).block_until_ready()  # one new program
    assert len(calls) == 1
    f = jax.jit(lambda x: jnp.cos(x) - 1.75)
    f(x).block_until_ready()
    f(x).block_until_ready()  # cached: no compile, no trim
    assert len(calls) == 2
