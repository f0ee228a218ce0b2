"""benchmarks/bench_memory.py: the --stages variant names, and the stage record of a process."""

from __future__ import annotations

import argparse
import mmap

import pytest

from tests.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bm():
    return load_benchmark("bench_memory")


def test_variants_parse_to_a_method_and_levers(bm):
    assert bm.parse_variant("jax-shira") == ("jax-shira", set())
    assert bm.parse_variant("jax-lora+notorch+remat") == ("jax-lora", {"notorch", "remat"})
    for name in bm.DEFAULT_VARIANTS:
        bm.parse_variant(name)


@pytest.mark.parametrize(
    "bad", ["jax-full", "jax-shira+fast", "peft-shira+remat", "jax-shira+", "jax-shira+remat+noremat"]
)
def test_bad_variants_are_refused_naming_what_is_allowed(bm, bad):
    with pytest.raises(argparse.ArgumentTypeError, match="variant"):
        bm.parse_variant(bad)


def test_stages_record_this_process_memory(bm):
    stages = bm.Stages()
    stages.mark("a")
    # 64 MiB of fresh anonymous pages, each written: resident. (A bytearray may be carved from heap
    # memory an earlier test freed and that is still resident, so RSS would not move.)
    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    stages.mark("b", note=1)
    a, b = stages.rows
    assert (a["stage"], b["stage"], b["note"]) == ("a", "b", 1)
    assert b["rss_mib"] - a["rss_mib"] > 60 and b["peak_mib"] >= b["rss_mib"]
    assert "jax_live_mib" not in a  # the probe must not start XLA's client itself
    block.close()
