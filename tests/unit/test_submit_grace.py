"""The SLURM grace period (dit_scale/training/slurm.py: launch/submit.py's jobs, sweep arrays) follows the run's
measured checkpoint saves: max(300, 2 × slowest + 60) s."""
import json

import pytest

from dit_scale.config import ConfigError
from dit_scale.run_dir import RunDir
from dit_scale.training.slurm import grace_seconds


def test_grace_follows_the_slowest_save(tmp_path):
    run = str(tmp_path)
    assert grace_seconds(None, run) == 300                       # nothing measured yet: the default
    RunDir(run).record_save_seconds(40.0)
    assert grace_seconds(None, run) == 300                       # fast saves: the default still covers them
    RunDir(run).record_save_seconds(250.5)
    RunDir(run).record_save_seconds(100.0)                       # the slowest counts, not the last
    assert json.load(open(tmp_path / "save_seconds.json")) == {"last": 100.0, "max": 250.5}
    assert grace_seconds(None, run) == 561
    assert grace_seconds(900, run) == 900
    with pytest.raises(ConfigError, match="shorter than 2 × the slowest checkpoint save of this run"):
        grace_seconds(300, run)
