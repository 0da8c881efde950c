"""Run metrics: `metrics.jsonl` (one JSON object per line with `step`), wandb, a tqdm bar, MFU, MoE statistics.

Only the main process writes. Values arrive as tensors accumulated on the device and are read (one sync) at the
logging interval.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

# Dense bf16 tensor-core peak FLOP/s per device (vendor datasheets, SXM parts); MFU is reported only for these.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


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

    def all_reduce(self, reduce_sum, world_size: int):
        """Combine the interval's statistics over data-parallel ranks (reduce_sum: in-place sum over ranks)."""
        if self.counts is not None:
            self.counts = reduce_sum(self.counts)
            self.entropy = reduce_sum(self.entropy) / world_size
            self.dropped = reduce_sum(self.dropped)

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


class MetricsLogger:
    def __init__(self, cfg, run_dir: str, is_main: bool, total_steps: int, start_step: int = 0):
        self.is_main = is_main
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.bar = None
        self.wandb = None
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(self.path, "a")
        if cfg.logging.progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")
        if cfg.logging.wandb != "disabled":
            import wandb
            from omegaconf import OmegaConf
            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=run_dir, mode=cfg.logging.wandb,
                                    config=OmegaConf.to_container(cfg, resolve=True),
                                    name=os.path.basename(os.path.abspath(run_dir)), resume="allow",
                                    id=_wandb_id(run_dir),
                                    # system-metric sampling costs a CPU-only run ~5% of its 2 cores
                                    settings=wandb.Settings(x_disable_stats=not torch.cuda.is_available()))

    def log(self, step: int, values: dict):
        if not self.is_main:
            return
        record = {"step": step, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                                 img_s=f"{values.get('images_per_s', 0):.1f}")

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
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: str) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    path = os.path.join(run_dir, "wandb_id.txt")
    if os.path.exists(path):
        return open(path).read().strip()
    import uuid
    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(run_id)
    return run_id


def read_metrics(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
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
