"""Process layout helpers: CPU threads per training process, the world-size checks every rank makes alike."""
import subprocess
import sys

import pytest

from dit_scale.config import ConfigError
from dit_scale.parallel.topology import check_layout, cpu_threads

from tiny import tiny_cfg


@pytest.mark.parametrize("cores, procs, workers, threads", [
    (2, 1, 1, 1),      # the quickstart on a 2-core machine: one core for the loader worker, one for training
    (2, 1, 0, 2),
    (2, 2, 0, 1),      # two gloo processes on two cores
    (16, 2, 2, 6),     # a 16-core node, 2 processes with 2 workers each
    (4, 4, 2, 1),      # more workers than cores: never below 1
])
def test_cpu_threads_leave_the_loader_its_cores(cores, procs, workers, threads):
    assert cpu_threads(cores, procs, workers) == threads


def test_layout_errors_are_the_same_on_every_rank():
    with pytest.raises(ConfigError, match="parallel.engine=local trains in one process but WORLD_SIZE=2"):
        check_layout(tiny_cfg().parallel, 2)
    with pytest.raises(ConfigError, match="parallel.ep=2 must divide the number of processes"):
        check_layout(tiny_cfg("parallel.engine=fsdp", "parallel.ep=2").parallel, 3)


def test_freed_host_memory_stays_with_the_process():
    """A block larger than 2 GiB, freed, stays resident for the next step instead of going back to the system (a
    DiT-B/2-8E2A CPU step frees more than 2 GiB at once; glibc trimmed that with a 2 GiB threshold and the
    following steps faulted it back in). Its own process: mallopt is process-wide."""
    code = """
import os, sys, torch
from dit_scale.parallel.topology import retain_freed_host_memory
if not retain_freed_host_memory():
    sys.exit(3)
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
start = resident()
block = torch.empty(5 * 2 ** 27).fill_(1.0)               # 2.5 GiB, touched
held = resident()
del block
print(held - start, resident() - start)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode == 3:
        pytest.skip("not glibc: the C allocator is left as it is")
    assert done.returncode == 0, done.stderr
    touched, after_free = map(int, done.stdout.split())
    assert touched > 2 * 2 ** 30                           # the block was resident (the reading is real)
    assert after_free > touched - 2 ** 28, (touched, after_free)     # and still is after it was freed
