"""Shared pytest set-up: markers, CPU threads, the tiny synthetic dataset (`tiny.py` holds the tiny config)."""
import os

import pytest
import torch

from tiny import ROOT, tiny_cfg, tiny_overrides, write_tiny_shards  # noqa: F401  (re-exported; tests/ is on the
#                                                                     import path through pytest.ini's `pythonpath`)

torch.set_num_threads(min(2, torch.get_num_threads()))
# Every process a test starts (torchrun ranks, mp.spawn workers, entry points) inherits this: one that dies of a
# fatal signal (SIGSEGV, SIGABRT: a C++ "terminate called ...") prints each Python thread's stack to the stderr the
# failing test reports, which says where every thread was (start-up, a collective, interpreter teardown).
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run explicitly with -m slow")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """2 shards × 48 synthetic 16×16 images, 4 classes."""
    return write_tiny_shards(str(tmp_path_factory.mktemp("shards")))


@pytest.fixture(scope="session")
def shape_shards(tmp_path_factory):
    """4 shards × 300 synthetic 32×32 images of 4 shapes: enough for the class probe (evaluation/probe.py)."""
    from data_tools.make_synthetic import make_synthetic
    out = str(tmp_path_factory.mktemp("shapes"))
    make_synthetic(out, num_samples=1200, num_classes=4, size=32, samples_per_shard=300, seed=0)
    return out
