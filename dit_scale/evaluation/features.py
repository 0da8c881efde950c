"""Inception features of images spread over the ranks, collected in global index order.

    store = FeatureStore().to(device)
    store.update(indices, inception(images))          # this rank's batches, any order
    feats = store.compute()                           # every rank: {"index", "pool", "spatial", "logits"} as
                                                      # float32 numpy arrays sorted by global index

A torchmetrics `Metric` whose states are "cat" lists: torchmetrics gathers them from every rank when `compute` runs
(collective: every rank calls it; uneven row counts are padded and trimmed by torchmetrics' `gather_all_tensors`).
Sorting by the global index makes the result independent of the number of processes and of which rank drew which
sample, so statistics computed from it are the same for 1 or N processes.
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from dit_scale.evaluation.inception import FEATURE_KEYS


class FeatureStore(Metric):
    full_state_update = False

    def __init__(self, keys=FEATURE_KEYS, **kwargs):
        super().__init__(**kwargs)
        self.keys = tuple(keys)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        for key in self.keys:
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, features: dict) -> None:
        """Rows of `features` (a dict with at least `keys`) belong to the global sample `index` [B]."""
        self.index.append(index.to(self.device, torch.int64).reshape(-1))
        for key in self.keys:
            getattr(self, key).append(features[key].to(self.device, torch.float32))

    def add_nothing(self, dims: dict) -> None:
        """Register zero rows ({key: feature width}): a rank that drew no sample still takes part in the gather
        with the right number of dimensions."""
        self.update(torch.zeros(0, dtype=torch.int64), {k: torch.zeros(0, dims[k]) for k in self.keys})

    def compute(self) -> dict:
        index = torch.cat(self.index) if isinstance(self.index, list) else self.index
        order = torch.argsort(index)
        out = {"index": index[order].cpu().numpy()}
        for key in self.keys:
            value = getattr(self, key)
            value = torch.cat(value) if isinstance(value, list) else value
            out[key] = value[order].cpu().numpy().astype(np.float32)
        if len(np.unique(out["index"])) != len(out["index"]):
            raise RuntimeError("FeatureStore received the same global sample index twice; each index must be drawn "
                               "by exactly one rank.")
        return out
