"""Run metrics: `metrics.jsonl` (one JSON object per line with `step` and `time`, the wall clock in Unix seconds),
wandb, a tqdm bar on a terminal (in a log file one plain line per logging interval instead), MFU, MoE statistics.

    interval = IntervalStats(names, device)      # device-side sums of one logging interval (no sync per step)
    interval.add(totals, grad_norm, ok, images, flops)  # the step's global images and their FLOPs (host numbers)
    row = interval.summary(all_reduce_sum_, world_size)   # one sync, at the logging step
    log = MetricsLogger(cfg, run_dir, is_main, total_steps, start_step); log.log(step, row)

Only the main process writes.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Optional

import torch

from dit_scale.errors import ConfigError
from dit_scale.run_dir import RunDir

# Dense peak FLOP/s per device (vendor datasheets): bf16 tensor cores, and fp32 without TF32 (what torch's default
# fp32 matmul precision uses). The first name that the device's name contains wins, so the PCIe and NVL parts
# (lower clocks and power) come before the SXM parts' plain names. MFU is reported only for these devices.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H200": 989e12, "H100": 989e12,
                   "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
PEAK_FP32_FLOPS = {"H100 PCIe": 51e12, "H100 NVL": 60e12, "H200 NVL": 60e12, "H200": 67e12, "H100": 67e12,
                   "A100": 19.5e12, "L40S": 91.6e12, "A10G": 31.2e12}


def peak_flops(device: torch.device, bf16: bool = True) -> Optional[float]:
    """The device's dense peak FLOP/s at the run's precision (None: unknown device or CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = PEAK_BF16_FLOPS if bf16 else PEAK_FP32_FLOPS
    return next((v for k, v in table.items() if k in name), None)


class MoEStats:
    """Accumulates routing statistics over the steps of one logging interval (device tensors, no sync)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.counts = None      # [L, E] tokens per expert, summed
        self.entropy = None     # [L]
        self.dropped = None     # [L]
        self.n = 0

    def add(self, aux: dict):
        if "tokens_per_expert" not in aux:
            return
        c, h, d = aux["tokens_per_expert"].detach(), aux["router_entropy"].detach(), aux["dropped_tokens"].detach()
        if self.counts is None:
            self.counts, self.entropy, self.dropped = c.clone(), h.clone(), d.clone()
        else:
            self.counts += c
            self.entropy += h
            self.dropped += d
        self.n += 1

    def all_reduce(self, reduce_sum, world_size: int, dp_size: Optional[int] = None):
        """Combine the interval's statistics over the ranks (reduce_sum: in-place sum over all of them). Dropped
        tokens are per micro-batch of one data-parallel rank, as in one process: the sum over ranks (tensor and
        context parallel ranks each count their share of an image's tokens) divided by the data-parallel size."""
        if self.counts is not None:
            self.counts = reduce_sum(self.counts)
            self.entropy = reduce_sum(self.entropy) / world_size
            self.dropped = reduce_sum(self.dropped) / (dp_size or world_size)

    def summary(self) -> dict:
        """Max/mean expert load (1.0 = perfectly balanced), averaged and worst over layers; entropy; dropped."""
        if self.counts is None:
            return {}
        load = self.counts / self.counts.mean(dim=1, keepdim=True).clamp_min(1e-9)
        per_layer_max = load.max(dim=1).values
        return {
            "moe/max_load": per_layer_max.mean().item(),
            "moe/max_load_worst_layer": per_layer_max.max().item(),
            "moe/router_entropy": (self.entropy / self.n).mean().item(),
            "moe/dropped_tokens": (self.dropped / self.n).sum().item(),
        }


class IntervalStats:
    """What one logging interval accumulates on the device: the loss terms (`names`), the gradient norm, skipped and
    consecutive non-finite steps, MoE routing statistics, and the wall time spent training (time inside `paused()`,
    e.g. sampling and saving, is not training throughput). Nothing here synchronises until `summary`."""

    def __init__(self, names, device, skipped: Optional[torch.Tensor] = None):
        """`skipped`: the run's device counter of skipped steps (a checkpoint carries it: `RankStreams.skipped`)."""
        self.names, self.device = list(names), device
        self.moe = MoEStats()
        self.sums = torch.zeros(len(self.names) + 1, device=device)    # loss terms + grad norm
        self.consecutive_bad = torch.zeros((), device=device)
        self.worst_bad = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device) if skipped is None else skipped
        self.steps, self.images, self.flops, self.skipped_before, self.last = 0, 0, 0.0, 0.0, {}
        self.moe_counts = None            # tokens per expert [L, E] of the last interval (expert_load.png)
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start timing training now: the trainer calls it when its loop begins, so that building, checkpoint loading
        and logger set-up are not counted in the first interval's images/s."""
        self._tic, self._paused = time.perf_counter(), 0.0

    def add(self, totals: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor, images: int,
            flops: float = 0.0) -> None:
        """One step: its loss terms, gradient norm, whether it was applied, its images over every data-parallel rank
        and their training FLOPs (host numbers: with the token budget a masked step holds more images than an
        unmasked one, and a masked image costs less than an unmasked one, so an interval that spans the unmask step
        needs them step by step)."""
        bad = (~ok).float()
        self.consecutive_bad = (self.consecutive_bad + 1) * bad
        self.worst_bad = torch.maximum(self.worst_bad, self.consecutive_bad)
        self.skipped += bad
        self.sums += torch.cat([torch.nan_to_num(totals, nan=0.0, posinf=0.0),
                                torch.nan_to_num(grad_norm.float(), nan=0.0, posinf=0.0).view(1)]) * ok
        self.steps += 1
        self.images += images
        self.flops += flops

    @contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    def worst_bad_streak(self) -> int:
        """The longest run of consecutive skipped steps so far (one host sync)."""
        return int(self.worst_bad.item())

    def summary(self, all_reduce_sum_, world_size: int, dp_size: Optional[int] = None) -> dict:
        """The interval's row (losses averaged over applied steps and ranks, grad norm, images/s, cumulative
        skipped steps, MoE load), then a fresh interval. Collective: every rank calls it."""
        elapsed = max(1e-9, time.perf_counter() - self._tic - self._paused)
        values = (all_reduce_sum_(self.sums.clone()) / world_size).tolist()
        self.moe.all_reduce(all_reduce_sum_, world_size, dp_size)
        skipped = self.skipped.item()
        n_ok = self.steps - (skipped - self.skipped_before)
        # an interval whose steps were all skipped has no loss to report: null, and "skipped": true (not 0.0)
        losses = {k: (v / n_ok if n_ok > 0 else None) for k, v in zip(self.names, values)}
        row = {**losses, "grad_norm": values[-1] / n_ok if n_ok > 0 else None, "skipped": n_ok <= 0,
               "images_per_s": self.images / elapsed, "flops_per_s": self.flops / elapsed, "skipped_steps": skipped,
               **self.moe.summary()}
        self.moe_counts = self.moe.counts
        self.moe.reset()
        self.sums.zero_()
        self.steps, self.images, self.flops, self.skipped_before, self.last = 0, 0, 0.0, skipped, row
        self.restart_clock()
        return row


def progress_line(step: int, total: int, values: dict, eta_s: Optional[float]) -> str:
    """One plain line for a logging interval, what a log file gets instead of a progress bar's carriage returns:
    `step 200/800 | loss 0.1792 | 78.0 images/s | ETA 7m41s`."""
    loss = values.get("loss")
    parts = [f"step {step}/{total}", "loss skipped" if loss is None else f"loss {loss:.4f}",
             f"{values.get('images_per_s', 0.0):.1f} images/s"]
    if eta_s is not None:
        minutes, seconds = divmod(int(round(eta_s)), 60)
        hours, minutes = divmod(minutes, 60)
        parts.append("ETA " + (f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"))
    return " | ".join(parts)


def check_wandb(cfg) -> None:
    """logging.wandb other than `disabled` needs the wandb package: one sentence at start-up, on every rank before
    any collective (the trainer calls it first), rather than an ImportError on the main rank once the model is built
    (a node with its own PyTorch and a wheelhouse without wandb, say)."""
    if cfg.logging.wandb != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb={cfg.logging.wandb} needs the wandb package, which this Python does not "
                          f"have; install it (on an offline node: launch/wheelhouse.py download --with-wandb) or set "
                          f"logging.wandb=disabled (metrics.jsonl is written either way).")


class MetricsLogger:
    def __init__(self, cfg, run_dir, is_main: bool, total_steps: int, start_step: int = 0):
        self.is_main = is_main
        run_dir = RunDir(str(run_dir))
        self.path = run_dir.metrics
        self.bar = None
        self.wandb = None
        if not is_main:
            return
        run_dir.makedirs()
        self.file = run_dir.append_metrics()
        self.total_steps, self.start_step, self.t0 = total_steps, start_step, time.perf_counter()
        if cfg.logging.progress_bar and sys.stderr.isatty():    # a terminal: a bar; a log file: one line per row
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")
        if cfg.logging.wandb != "disabled":
            import wandb
            from omegaconf import OmegaConf
            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=run_dir.path, mode=cfg.logging.wandb,
                                    config=OmegaConf.to_container(cfg, resolve=True),
                                    name=os.path.basename(os.path.abspath(run_dir.path)), resume="allow",
                                    id=_wandb_id(run_dir),
                                    # system-metric sampling costs a CPU-only run ~5% of its 2 cores
                                    settings=wandb.Settings(x_disable_stats=not torch.cuda.is_available()))

    def log(self, step: int, values: dict):
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}     # time: wall clock, Unix seconds
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if v is not None}, step=step)
        if self.bar is not None:
            loss = values.get("loss")
            self.bar.set_postfix(loss="skipped" if loss is None else f"{loss:.4f}",
                                 img_s=f"{values.get('images_per_s', 0):.1f}")
        elif "loss" in values:                  # a training row (not an evaluation's), in a log file
            done = step - self.start_step
            eta = (self.total_steps - step) * (time.perf_counter() - self.t0) / done if done > 0 else None
            print(progress_line(step, self.total_steps, values, eta), flush=True)

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def write(self, message: str):
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self):
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        try:
            self.file.close()
        except OSError:                         # a full disk: the row that failed was reported when it was written
            pass
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: RunDir) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    path = run_dir.wandb_id
    if os.path.exists(path):
        return open(path).read().strip()
    import uuid
    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(run_id)
    return run_id


def read_metrics(run_dir: str) -> list:
    with open(RunDir(run_dir).metrics) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_expert_load(counts: torch.Tensor, path: str, title: str = "expert load") -> str:
    """Heatmap of tokens per expert ([layers, experts], normalised per layer: 1.0 = balanced) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = (counts / counts.mean(dim=1, keepdim=True).clamp_min(1e-9)).cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.4 * load.shape[1]), max(3.0, 1.2 + 0.25 * load.shape[0])))
    # diverging around 1.0 (balanced): blue = under-loaded, red = over-loaded
    im = ax.imshow(load, cmap="RdBu_r", aspect="auto", vmin=0.0, vmax=max(2.0, float(load.max())))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="tokens / mean")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
