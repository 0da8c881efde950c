"""Where do the experts go? The routing of a sparse model on held-out data, by diffusion timestep and by class (the
analysis of DiT-MoE, Switch-DiT and EC-DiT).

    report = analyze_experts("runs/quickstart", bins=10, num_samples=512)      # launch/analyze_experts.py
    # writes RUN/analysis/experts_step<N>/: experts.json, share_by_t.png, share_by_class.png, balance_by_t.png

The EMA model of the run's latest checkpoint runs on the first `num_samples` held-out samples (shards: --shards,
else eval.val_path, else data.path) at `bins` fixed noise levels, the bin centres t_k = (k + 0.5) / bins with the
validation loss's fixed noise per (sample, bin) (`val_loss.py`: flow t, DDPM step floor(t_k · T)), model in eval
mode, no guidance. Each forward takes samples of one class at one bin, so the model's own routing statistics
(`aux["tokens_per_expert"]` [L, E], summed over the batch's tokens) give, summed up, counts[bin, class, layer,
expert]: how many (token, expert) assignments each expert got. A text model has one group ("all"). Token-choice
routing is per token, so the counts do not depend on how samples are batched; expert-choice routing picks tokens per
batch, so its counts are those of one-class batches of `batch_size`.

In experts.json (lists, layer = the MoE blocks in order, `moe_blocks` their 1-based block numbers):
    share_by_t [L][bins][E], share_by_class [L][C][E]   each row: the fraction of the layer's assignments per expert
    counts [bins][C][L][E]                              the raw assignment counts
    balance_by_t {max_over_mean, entropy, normalized_entropy} [L][bins], and their mean over layers ("mean_*"):
        max/mean load (1 = balanced, E = all on one expert), entropy of the shares in nats, and over log E
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from dit_scale.errors import ConfigError
from dit_scale.models.text import Captions


def routing_counts(model, val, device, classes: Optional[np.ndarray] = None, num_groups: int = 1) -> np.ndarray:
    """counts [bins, C, L, E] (float64) of `model` on the held-out set `val` (a `ValidationLoss`: its samples, bins,
    fixed noise and batch size). `classes` [N]: each sample's group in 0..num_groups-1 (None: one group)."""
    groups = np.zeros(len(val.x), dtype=np.int64) if classes is None else np.asarray(classes, dtype=np.int64)
    if len(groups) and not 0 <= groups.min() <= groups.max() < num_groups:
        raise ConfigError(f"The held-out samples have class labels up to {groups.max()}, but the model knows "
                          f"{num_groups} classes; pass the shards this model was trained for.")
    counts = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for k in range(val.bins):
                for c in range(num_groups):
                    members = np.nonzero(groups == c)[0]
                    for start in range(0, len(members), val.batch_size):
                        idx = [int(i) for i in members[start:start + val.batch_size]]
                        y = val.y[idx]
                        y = Captions(y.features.float(), y.mask).to(device) if isinstance(y, Captions) else \
                            y.to(device)
                        targets = val._targets(val.x[idx], idx, k)
                        aux = model(targets["x_t"], targets["t_model"], y)[1]
                        if "tokens_per_expert" not in aux:
                            raise ConfigError("This model has no mixture-of-experts layers (moe.num_experts=0): "
                                              "there is no routing to analyse.")
                        tpe = aux["tokens_per_expert"].double().cpu().numpy()          # [L, E]
                        if counts is None:
                            counts = np.zeros((val.bins, num_groups, *tpe.shape))
                        counts[k, c] += tpe
    finally:
        model.train(was_training)
    return counts


def _shares(counts: np.ndarray) -> np.ndarray:
    """Rows of counts [..., E] as fractions of their sum (a row without assignments: zeros)."""
    total = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def balance(counts: np.ndarray) -> dict:
    """Balance statistics of counts [..., E]: max/mean load, entropy of the shares (nats) and it over log E."""
    share = _shares(counts)
    e = counts.shape[-1]
    logs = np.log(np.where(share > 0, share, 1.0))
    entropy = -(share * logs).sum(axis=-1)
    return {"max_over_mean": share.max(axis=-1) * e, "entropy": entropy,
            "normalized_entropy": entropy / np.log(e) if e > 1 else np.ones_like(entropy)}


def report(counts: np.ndarray, t_centres, groups: list, moe_blocks: list, group_names=None) -> dict:
    """The experts.json content (module docstring) of counts [bins, C, L, E]."""
    by_t = counts.sum(axis=1).transpose(1, 0, 2)          # [L, bins, E]
    by_class = counts.sum(axis=0).transpose(1, 0, 2)      # [L, C, E]
    stats = balance(by_t)
    out = {"t_bins": [float(t) for t in t_centres], "classes": list(groups),
           "class_names": list(group_names or [str(g) for g in groups]), "moe_blocks": list(moe_blocks),
           "num_experts": int(counts.shape[-1]), "share_by_t": _shares(by_t).tolist(),
           "share_by_class": _shares(by_class).tolist(), "counts": counts.tolist(),
           "balance_by_t": {k: v.tolist() for k, v in stats.items()}}
    out["balance_by_t"].update({f"mean_{k}": v.mean(axis=0).tolist() for k, v in stats.items()})
    return out


def write_heatmaps(rep: dict, out_dir: str, title: str = "") -> list:
    """share_by_t.png, share_by_class.png (one panel per MoE layer: rows bins / classes, columns experts) and
    balance_by_t.png (max/mean load and normalised entropy per bin, one line per layer). Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_labels = [f"{t:.2f}" for t in rep["t_bins"]]
    blocks, e = rep["moe_blocks"], rep["num_experts"]
    paths = []
    for key, rows, ylabel in (("share_by_t", t_labels, "t (bin centre)"),
                              ("share_by_class", rep["class_names"], "class")):
        shares = np.asarray(rep[key])                                   # [L, R, E]
        cols = min(4, len(blocks))
        nrows = -(-len(blocks) // cols)
        fig, axes = plt.subplots(nrows, cols, squeeze=False, layout="constrained",
                                 figsize=(1.5 + cols * (1.2 + 0.35 * e),
                                          1.0 + nrows * (1.2 + 0.2 * min(len(rows), 40))))
        vmax = float(shares.max()) or 1.0
        for ax, layer, block in zip(axes.flat, shares, blocks):
            im = ax.imshow(layer, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"block {block}", fontsize=8)
            ax.set_xlabel("expert", fontsize=7)
            ax.set_xticks(range(e))
            if len(rows) <= 40:
                ax.set_yticks(range(len(rows)))
                ax.set_yticklabels(rows, fontsize=6)
            ax.set_ylabel(ylabel, fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(blocks):]:
            ax.axis("off")
        fig.colorbar(im, ax=axes, shrink=0.8, label="share")
        fig.suptitle(f"{title} · {key.replace('_', ' ')}", fontsize=9)
        path = os.path.join(out_dir, f"{key}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    b = rep["balance_by_t"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, ax in zip(("max_over_mean", "normalized_entropy"), axes):
        for layer, block in zip(b[name], blocks):
            ax.plot(rep["t_bins"], layer, marker="o", ms=3, label=f"block {block}")
        ax.set_xlabel("t (bin centre)")
        ax.set_title(name.replace("_", " "), fontsize=9)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{title} · balance by t", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "balance_by_t.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return paths + [path]


def analyze_experts(run: str, shards: Optional[str] = None, bins: int = 10, num_samples: int = 1000,
                    batch_size: Optional[int] = None, out_dir: Optional[str] = None, ema: bool = True,
                    device="cpu") -> dict:
    """Analyse the latest checkpoint of `run` (or a checkpoint path): write experts.json and the PNGs into `out_dir`
    (default RUN/analysis/experts_step<N>) and return the report, with "json" and "figures" added."""
    from dit_scale.build import build
    from dit_scale.checkpoint import load_checkpoint
    from dit_scale.checkpoint.load import checkpoint_weights, resolve_path
    from dit_scale.config import config_from_yaml_text
    from dit_scale.evaluation.val_loss import ValidationLoss
    from dit_scale.generation.sampling import class_names
    from dit_scale.generation.vae import data_manifest
    from dit_scale.models.moe import MoEFFN
    from dit_scale.optim import resolve_precision

    if bins < 1 or num_samples < 1:
        raise ConfigError(f"--bins={bins} and --num-samples={num_samples} must both be at least 1.")
    path = resolve_path(run, "Run or checkpoint")
    state = load_checkpoint(path)
    cfg = config_from_yaml_text(state["config"], f"the config stored in '{path}'")
    data, field = (shards, "--shards") if shards else \
        ((cfg.eval.val_path, "eval.val_path") if cfg.eval.val_path else (cfg.data.path, "data.path"))
    built = build(cfg)
    model = built.model
    if not model.moe_layers():
        raise ConfigError(f"The model of '{path}' ({cfg.model.name}) has no mixture-of-experts layers: there is no "
                          f"routing to analyse.")
    model.load_state_dict(checkpoint_weights(state, ema, path))
    device = torch.device(device)
    model.to(device)
    val = ValidationLoss.from_config(cfg, built.objective, device, path=data, num_samples=num_samples, bins=bins,
                                     batch_size=batch_size, field=field)
    text = cfg.model.conditioning == "text"
    num_groups = 1 if text else max(1, int(cfg.model.num_classes))
    with resolve_precision(cfg.train.precision, device).autocast():      # routed as the run trained
        counts = routing_counts(model, val, device, None if text else val.y.numpy(), num_groups)
    step = int(state.get("step", 0))
    groups = ["all"] if text else list(range(num_groups))
    names = ["all"] if text else class_names(groups, data_manifest(cfg.data)[0])
    blocks = [i for i, b in enumerate(model.blocks, start=1) if isinstance(b.ffn, MoEFFN)]
    rep = report(counts, val.centres, groups, blocks, names)
    rep.update(checkpoint=path, step=step, ema=ema, data=data, num_samples=len(val.x),
               objective=built.objective.name, router=cfg.moe.router, top_k=int(cfg.moe.top_k))
    if out_dir is None:
        run_dir = run if os.path.isdir(run) and os.path.isdir(os.path.join(run, "checkpoints")) else \
            os.path.dirname(os.path.dirname(os.path.abspath(path)))
        out_dir = os.path.join(run_dir, "analysis", f"experts_step{step:08d}")
    os.makedirs(out_dir, exist_ok=True)
    rep["figures"] = write_heatmaps(rep, out_dir, f"{cfg.model.name} step {step}")
    rep["json"] = os.path.join(out_dir, "experts.json")
    tmp = rep["json"] + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(rep, f)
    os.replace(tmp, rep["json"])
    return rep
