"""What a run prints per logging interval: a tqdm bar only on a terminal; in a log file (a SLURM job's, a pipe) one
plain line per interval with the step, loss, images/s and ETA, and no carriage-return updates; and wandb logging
without the wandb package stopped before the run starts."""
import importlib.util
import io

import pytest
import torch

from dit_scale.errors import ConfigError
from dit_scale.training.metrics import MetricsLogger, check_wandb, progress_line
from dit_scale.training.trainer import Trainer
from tiny import tiny_cfg


def test_progress_line():
    assert progress_line(200, 800, {"loss": 0.17923, "images_per_s": 78.04}, 461.0) == \
        "step 200/800 | loss 0.1792 | 78.0 images/s | ETA 7m41s"
    assert progress_line(5, 10, {"loss": None, "images_per_s": 3.0}, 7300) == \
        "step 5/10 | loss skipped | 3.0 images/s | ETA 2h01m"
    assert progress_line(1, 10, {"loss": 1.0}, None) == "step 1/10 | loss 1.0000 | 0.0 images/s"


class _NotATerminal(io.StringIO):
    def isatty(self):
        return False


def test_a_log_file_gets_one_line_per_interval_and_no_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr", _NotATerminal())
    cfg = tiny_cfg("logging.progress_bar=true", "logging.wandb=disabled")
    log = MetricsLogger(cfg, str(tmp_path), True, total_steps=40, start_step=10)
    assert log.bar is None
    for step in (20, 30, 40):
        log.advance(10)
        log.log(step, {"loss": 0.5, "images_per_s": 12.0})
    log.log(40, {"val_loss": 0.4})                          # an evaluation row: no progress line
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 20/40", "step 30/40", "step 40/40"]
    assert all("\r" not in line for line in lines) and lines[-1].endswith("ETA 0m00s")
    assert "\r" not in __import__("sys").stderr.getvalue()


def test_wandb_logging_without_the_package_is_one_sentence_before_the_run_starts(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"logging.wandb=offline needs the wandb package.*logging.wandb=disabled"):
        Trainer(tiny_cfg(f"train.run_dir={run_dir}", "logging.wandb=offline"))
    assert not run_dir.exists()                             # nothing written, nothing started
    check_wandb(tiny_cfg("logging.wandb=disabled"))         # disabled: the package is not needed
    monkeypatch.undo()
    check_wandb(tiny_cfg("logging.wandb=offline"))          # installed (this venv): nothing to say


def test_peak_flops_tells_the_pcie_and_nvl_parts_from_the_sxm_ones(monkeypatch):
    """MFU divides by the device's datasheet peak: an H100 PCIe (756 TFLOP/s bf16 dense) must not be read as an
    H100 SXM (989), whose plain name its own contains. Device names as torch.cuda.get_device_name gives them."""
    from dit_scale.training.metrics import peak_flops
    cuda = torch.device("cuda", 0)
    expected = {"NVIDIA H100 80GB HBM3": (989e12, 67e12), "NVIDIA H100 PCIe": (756e12, 51e12),
                "NVIDIA H100 NVL": (835e12, 60e12), "NVIDIA H200": (989e12, 67e12), "NVIDIA H200 NVL": (835e12, 60e12),
                "NVIDIA A100-SXM4-80GB": (312e12, 19.5e12), "NVIDIA GeForce RTX 4090": (None, None)}
    for name, (bf16, fp32) in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert (peak_flops(cuda, bf16=True), peak_flops(cuda, bf16=False)) == (bf16, fp32), name
    assert peak_flops(torch.device("cpu")) is None


class _Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_an_interval_times_training_only_and_weighs_each_step_by_its_flops(monkeypatch):
    """images/s and FLOP/s of an interval: the time from the loop's start (restart_clock: building and checkpoint
    loading before it do not count) less paused time (sampling, saving); the FLOPs are each step's images at that
    step's cost, so an interval spanning the unmask step (cheap masked images, then full ones) is not priced at the
    last step's cost. A fake clock makes the expected values exact."""
    from dit_scale.training import metrics
    clock = _Clock()
    monkeypatch.setattr(metrics, "time", clock)
    interval = metrics.IntervalStats(["loss"], "cpu")
    clock.now = 100.0                        # start-up: 100 s of building and loading
    interval.restart_clock()
    ok, zero = torch.tensor(True), torch.zeros(())
    for images, flops in ((16, 16 * 1e6), (16, 16 * 1e6), (4, 4 * 4e6)):      # two masked steps, one unmasked
        clock.now += 2.0
        interval.add(torch.ones(1), zero, ok, images, flops)
    with interval.paused():
        clock.now += 50.0                    # a checkpoint save
    row = interval.summary(lambda t: t, 1)
    assert row["images_per_s"] == pytest.approx(36 / 6.0)
    assert row["flops_per_s"] == pytest.approx((32e6 + 16e6) / 6.0)
    clock.now += 3.0                         # the next interval starts where this one was summarised
    interval.add(torch.ones(1), zero, ok, 4, 4 * 4e6)
    assert interval.summary(lambda t: t, 1)["images_per_s"] == pytest.approx(4 / 3.0)


def test_an_interval_averages_losses_and_grad_norm_over_its_applied_steps():
    """A skipped step (non-finite loss or norm) counts in neither the losses nor the grad norm: three steps at norm 2
    and one at inf log 2 (it logged 1.5, the inf step counted as a zero)."""
    from dit_scale.training.metrics import IntervalStats
    interval = IntervalStats(["loss"], "cpu")
    for loss, norm in ((1.0, 2.0), (3.0, 2.0), (float("nan"), float("inf")), (5.0, 2.0)):
        ok = torch.tensor(bool(torch.isfinite(torch.tensor([loss, norm])).all()))
        interval.add(torch.tensor([loss]), torch.tensor(norm), ok, 1)
    row = interval.summary(lambda t: t, 1)
    assert (row["loss"], row["grad_norm"], row["skipped_steps"]) == (3.0, 2.0, 1.0)


def test_dropped_tokens_are_per_micro_batch_whatever_the_data_parallel_size():
    """Two data-parallel ranks that each drop 3 tokens in their micro-batch report 3, as one process dropping 3 per
    micro-batch does (the sum over ranks was reported: 6, doubling with the ranks)."""
    from dit_scale.training.metrics import MoEStats
    stats = MoEStats()
    stats.add({"tokens_per_expert": torch.ones(1, 4), "router_entropy": torch.ones(1), "dropped_tokens": torch.tensor(
        [3.0])})
    twice = lambda t: t * 2                                 # the sum over 2 ranks holding the same values
    stats.all_reduce(twice, world_size=2, dp_size=2)
    assert stats.summary()["moe/dropped_tokens"] == 3.0
