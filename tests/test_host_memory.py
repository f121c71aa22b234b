"""cli.reuse_freed_memory: with glibc tuned, a large CPU tensor comes from the heap and stays there when freed.

Checked in fresh interpreters through malloc's own statistics (mallinfo2), because the tuning and glibc's
adaptive thresholds are per-process state that other tests would already have moved.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from scripts.lib.cli import MMAP_THRESHOLD_BYTES, reuse_freed_memory
from scripts.lib.data import available_memory_bytes

HEAP_STATISTICS_AROUND_ONE_TENSOR = """
import ctypes, json, sys, torch
from scripts.lib.cli import reuse_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert reuse_freed_memory()
tensor = torch.ones(4 * 2**20)  # 16 MiB: one activation of a T/4 DiT's MLP at batch 32
while_alive = libc.mallinfo2()
del tensor
after_free = libc.mallinfo2()
print(json.dumps({"mmapped_while_alive": while_alive.hblkhd, "heap_while_alive": while_alive.arena,
                  "heap_after_free": after_free.arena}))
"""
TENSOR_BYTES = 16 * 2**20

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc; a no-op elsewhere")


def heap_statistics(mode: str) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", HEAP_STATISTICS_AROUND_ONE_TENSOR, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(result.stdout)


@glibc_only
def test_untuned_glibc_maps_a_large_tensor_afresh():
    # The cost being removed: each such block is its own mmap, whose pages fault in again after every free.
    assert heap_statistics("default")["mmapped_while_alive"] >= TENSOR_BYTES


@glibc_only
def test_tuned_heap_serves_a_large_tensor_and_keeps_it_after_free():
    stats = heap_statistics("tuned")
    assert stats["mmapped_while_alive"] < TENSOR_BYTES <= MMAP_THRESHOLD_BYTES
    assert stats["heap_while_alive"] >= TENSOR_BYTES
    assert stats["heap_after_free"] == stats["heap_while_alive"]  # not trimmed back to the kernel


@glibc_only
def test_tuning_reports_that_it_took_effect():
    assert reuse_freed_memory() is True


def test_available_memory_reads_meminfo_and_respects_a_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          500000 kB\nMemAvailable:   19000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_memory_bytes(meminfo, cgroup) == 19_000_000 * 1024  # no cgroup files: the machine's figure
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123\n")
    assert available_memory_bytes(meminfo, cgroup) == 19_000_000 * 1024  # a cgroup without a limit
    (cgroup / "memory.max").write_text(f"{8 * 2**30}\n")
    (cgroup / "memory.current").write_text(f"{3 * 2**30}\n")
    assert available_memory_bytes(meminfo, cgroup) == 5 * 2**30  # a container's limit is lower than the host's


def test_available_memory_without_meminfo_falls_back_to_sysconf(tmp_path):
    found = available_memory_bytes(tmp_path / "no-meminfo", tmp_path / "no-cgroup")
    assert found is None or found > 0
