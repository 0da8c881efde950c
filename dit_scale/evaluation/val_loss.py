"""Validation loss: the training objective's loss on held-out shards at fixed noise levels and fixed noise, so
that curves are comparable across steps and across runs.

    val = ValidationLoss.from_config(cfg, objective, device)       # reads the first eval.val_samples samples once
    row = val(module, rank, world_size, all_reduce_sum_, collective_forward=True)
    # {"val_loss": mean over the bins, "val_loss/t=0.125": ..., ...}

Noise levels: eval.val_t_bins bins of the time range, each sample evaluated at every bin centre
t_k = (k + 0.5) / bins (flow: t in [0, 1]; DDPM: the integer step floor(t_k · T)). The noise of sample i at
bin k is drawn from a generator seeded with (eval.seed, i, k): the same for every run, step and process count.
The loss is the objective's per-sample loss (flow: velocity MSE; DDPM: eps MSE, plus the VLB term with a learned
variance), the model in eval mode (no label dropout). A text model is conditioned on each held-out sample's own
caption features. Batches are split over the ranks (rank r takes batches
r, r + W, ...; a collective forward gets padding batches) and the sums are all-reduced: one number per bin.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dit_scale.errors import ConfigError
from dit_scale.evaluation.shard_samples import ShardSet
from dit_scale.models.text import Captions


def t_bins(bins: int) -> list:
    """The bin centres in [0, 1] (the keys of the logged values)."""
    return [(k + 0.5) / bins for k in range(bins)]


class ValidationLoss:
    def __init__(self, x: torch.Tensor, y, objective, bins: int, batch_size: int, seed: int, device):
        self.x, self.y, self.objective = x, y, objective      # y: labels [N], or a text model's Captions (float16)
        self.bins, self.batch_size, self.seed, self.device = bins, batch_size, seed, torch.device(device)
        self.centres = t_bins(bins)

    @classmethod
    def from_config(cls, cfg, objective, device, path=None, num_samples=None, bins=None, batch_size=None,
                    field: str = "eval.val_path") -> "ValidationLoss":
        """The held-out set of eval.val_path (eval.val_samples samples, eval.val_t_bins bins, eval.val_batch_size);
        the keyword arguments replace those (`field` names `path` in errors)."""
        e = cfg.eval
        path, field = (path, field) if path else (e.val_path, "eval.val_path")
        num_samples, bins = num_samples or e.val_samples, bins or e.val_t_bins
        batch_size = batch_size or e.val_batch_size
        shards = ShardSet.open(path, field=field)
        batches = list(shards.batches(min(num_samples, shards.num_samples), batch_size))
        x = np.concatenate([b.x for b in batches])
        if shards.pixels:                                        # as the training loader: [-1, 1], channels first
            x = x.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        y = torch.tensor([label for b in batches for label in b.y])
        if cfg.model.conditioning == "text":
            if any(b.text is None for b in batches):
                raise ConfigError(f"{field}={path!r} holds no caption features, which a text model's "
                                  f"validation loss needs; build the held-out shards with --text-encoder PATH.")
            y = Captions(torch.from_numpy(np.concatenate([b.text for b in batches])).to(torch.float16),
                         torch.from_numpy(np.concatenate([b.text_mask for b in batches])))
        return cls(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), y, objective,
                   bins, batch_size, e.seed, device)

    def _targets(self, x0: torch.Tensor, indices: range, k: int) -> dict:
        """The objective's training targets for clean `x0` at bin k with the fixed noise of each sample."""
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, i, k]).generate_state(1)[0]))) for i in indices]).to(self.device)
        x0 = x0.to(self.device)
        t = self.centres[k]
        if self.objective.name == "flow":
            t_vec = torch.full((len(x0),), t, device=self.device)
            return {"x_t": self.objective.interpolate(x0, noise, t_vec), "t_model": self.objective.model_time(t_vec),
                    "target": self.objective.velocity(x0, noise), "t": t_vec, "noise": noise, "x0": x0}
        step = min(self.objective.num_timesteps - 1, int(t * self.objective.num_timesteps))
        steps = torch.full((len(x0),), step, dtype=torch.long, device=self.device)
        return {"x_t": self.objective.q_sample(x0, steps, noise), "t_model": steps.float(), "target": noise,
                "t": steps, "noise": noise, "x0": x0}

    @torch.no_grad()
    def __call__(self, module, rank: int = 0, world_size: int = 1,
                 all_reduce_sum_: Callable = lambda t: t, collective_forward: bool = False) -> dict:
        """Every rank calls it (the sums are all-reduced). Returns the row to log."""
        n, b = len(self.x), self.batch_size
        num_batches = -(-n // b)
        rounds = -(-num_batches // world_size)
        sums = torch.zeros(self.bins, dtype=torch.float64, device=self.device)
        was_training = module.training
        module.eval()
        try:
            for r in range(rounds):
                batch = r * world_size + rank
                if batch >= num_batches and not collective_forward:
                    break
                real = batch < num_batches
                indices = range(batch * b, min(n, (batch + 1) * b)) if real else range(0, min(n, b))
                x0, y = self.x[indices.start:indices.stop], self.y[indices.start:indices.stop]
                y = Captions(y.features.float(), y.mask).to(self.device) if isinstance(y, Captions) else \
                    y.to(self.device)
                for k in range(self.bins):
                    targets = self._targets(x0, indices, k)
                    out = module(targets["x_t"], targets["t_model"], y)[0]
                    if real:
                        sums[k] += self.objective.loss(out.float(), targets).double().sum()
        finally:
            module.train(was_training)
        per_bin = (all_reduce_sum_(sums) / n).tolist()
        row = {"val_loss": float(np.mean(per_bin))}
        row.update({f"val_loss/t={t:g}": v for t, v in zip(self.centres, per_bin)})
        return row
