"""Process layout helpers: CPU threads per training process, the world-size checks every rank makes alike."""
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
