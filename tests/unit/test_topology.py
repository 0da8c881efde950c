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


def test_freed_host_memory_is_reused_without_page_faults():
    """A block larger than 2 GiB, freed and allocated again, comes back from the heap untouched by the kernel: no
    page faults the second time (a DiT-B/2-8E2A CPU step frees more than 2 GiB at once; glibc trimmed that and the
    next step faulted it all back in, about 1.5 GB of page faults per step). Its own process: mallopt is global."""
    code = """
import resource, sys, torch
from dit_scale.parallel.topology import retain_freed_host_memory
if not retain_freed_host_memory():
    sys.exit(3)
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(5 * 2 ** 27).fill_(1.0)           # 2.5 GiB
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode == 3:
        pytest.skip("not glibc: the C allocator is left as it is")
    assert done.returncode == 0, done.stderr
    first, *again = map(int, done.stdout.split())
    pages = 5 * 2 ** 29 // 4096
    assert first > pages // 2                              # the first touch faults (the count is real)
    assert max(again) < pages // 100, (first, again)       # reuse does not
