"""Representation alignment, one micro-batch at a time (`dit_scale.training.loss.TrainingLoss` calls it).

    aligner = Aligner(cfg, device)
    if aligner.active(step):                                  # off after align.stop_step: no teacher work at all
        sra_target = aligner.sra_target(ema, objective, targets, y, keep)      # EMA forward, truncated, no grad
        teacher = aligner.teacher_targets(batch, x, keep)     # shard features or the online teacher (no grad)
        out, aux = module(x_t, t, y, mask=keep, **aligner.forward_kwargs())
        terms = aligner.losses(aux, teacher, sra_target)      # {"repa": ..., "haste": ..., "sra": ...} (unweighted)
        loss = denoise + moe + aligner.total(terms)

Under masking (`keep` [B, K]) every target is taken at the kept tokens: teacher features are gathered, teacher
attention maps are cut to the kept rows and columns (renormalised), and SRA's EMA model runs on the same kept tokens.
"""
from __future__ import annotations

import torch

from dit_scale.align.losses import attention_alignment_loss, repa_loss, select_patch_attention, sra_loss
from dit_scale.errors import ConfigError
from dit_scale.models.masking import gather_tokens

TERMS = ("repa", "haste", "sra")


@torch.no_grad()
def ema_hidden(ema_model, x, t, y, depth: int, keep=None, force_drop=None) -> torch.Tensor:
    """The output of block `depth` of `ema_model` (eval mode; the condition dropped where `force_drop` [B] says, the
    student's own dropout, else never); the forward stops there."""
    was_training = ema_model.training
    ema_model.eval()
    try:
        if force_drop is None:
            force_drop = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        _, aux = ema_model(x, t, y, force_drop=force_drop, mask=keep, return_hidden=(depth,), stop_after=depth)
    finally:
        ema_model.train(was_training)
    return aux["hidden"][depth].detach()


class Aligner:
    def __init__(self, cfg, device):
        a = cfg.align
        self.cfg = a
        self.weights = {k: float(a[f"{k}_weight"]) for k in TERMS if a[f"{k}_weight"] > 0}
        self.names = list(self.weights)
        self.num_tokens = int(cfg.model.num_tokens)
        self.haste_pairs = list(zip(a.haste_layers, a.haste_teacher_layers)) if "haste" in self.weights else []
        self.online = "haste" in self.weights or ("repa" in self.weights and a.teacher == "online")
        self.teacher = None
        if self.online:
            from dit_scale.align.teacher import OnlineTeacher
            self.teacher = OnlineTeacher(a.teacher_path, int(self.num_tokens ** 0.5),
                                         attn_layers=[t for _, t in self.haste_pairs], device=device)

    def active(self, step: int) -> bool:
        """True while some alignment term is on and the step is before `align.stop_step`."""
        return bool(self.names) and (self.cfg.stop_step is None or step < self.cfg.stop_step)

    def forward_kwargs(self) -> dict:
        kwargs = {"heads": tuple(k for k in ("repa", "sra") if k in self.weights)}
        if self.haste_pairs:
            kwargs["attn_layers"] = tuple(s for s, _ in self.haste_pairs)
        return kwargs

    # ------------------------------------------------------------------------------------------------------------
    # Targets (no gradients)
    # ------------------------------------------------------------------------------------------------------------

    def sra_target(self, ema, objective, targets, y, keep=None, force_drop=None, gap_fraction=None):
        """SRA's target (as SRA's code): the EMA model's block `sra_teacher_depth` at t - sra_t_gap · u, u ~ U(0, 1)
        per sample (`gap_fraction` [B]; None: the whole gap), with the student's condition dropout (`force_drop`).
        `ema()` is a context manager yielding the EMA model (the engine's `sampling_module`). Call it before the
        online forward of the micro-batch (FSDP swaps the EMA weights into the live parameters meanwhile)."""
        if "sra" not in self.weights:
            return None
        gap = self.cfg.sra_t_gap if gap_fraction is None else self.cfg.sra_t_gap * gap_fraction
        x_tp, t_p = objective.shifted_input(targets, gap)
        with ema() as ema_model:
            return ema_hidden(ema_model, x_tp, t_p, y, self.cfg.sra_teacher_depth, keep, force_drop)

    @torch.no_grad()
    def teacher_targets(self, batch, x, keep=None) -> dict:
        """{"feat": [B, K, D_t] for REPA, "attn": {student block: teacher probs [B, H, K, K]} for HASTE}."""
        out = {}
        if not self.online and "repa" not in self.weights:
            return out
        if self.online:
            t = self.teacher(x)
            feat = t["feat"]
            out["attn"] = {s: select_patch_attention(t["attn"][tl], t["num_prefix"], keep) for s, tl in
                           self.haste_pairs}
        else:
            if "feat" not in batch:
                raise ConfigError("align.teacher=shards needs teacher features in the shards (feat.npy), but the "
                                  "batch has none; precompute them or use align.teacher=online.")
            feat = batch["feat"].to(x.device, non_blocking=True)
        if "repa" in self.weights:
            if feat.dim() != 3 or feat.shape[1] != self.num_tokens or (
                    self.cfg.teacher_dim and feat.shape[2] != self.cfg.teacher_dim):
                raise ConfigError(f"Teacher features have shape {tuple(feat.shape)} but the model has "
                                  f"{self.num_tokens} tokens and align.teacher_dim={self.cfg.teacher_dim}; the "
                                  f"features' grid and width must match [B, {self.num_tokens}, teacher_dim].")
            out["feat"] = gather_tokens(feat, keep) if keep is not None else feat
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Losses (unweighted)
    # ------------------------------------------------------------------------------------------------------------

    def losses(self, aux: dict, teacher: dict, sra_target=None) -> dict:
        terms = {}
        if "repa" in self.weights:
            terms["repa"] = repa_loss(aux["heads"]["repa"], teacher["feat"])
        if "haste" in self.weights:
            terms["haste"] = torch.stack([attention_alignment_loss(aux["attn"][s], teacher["attn"][s])
                                          for s, _ in self.haste_pairs]).mean()
        if "sra" in self.weights:
            terms["sra"] = sra_loss(aux["heads"]["sra"], sra_target)
        return terms

    def total(self, terms: dict):
        return sum(self.weights[k] * v for k, v in terms.items())
