"""The training loss of one micro-batch, as named terms: the trainer, every benchmark and the coordinate check call
this one function, so what is measured is what is trained.

    loss_fn = TrainingLoss.from_config(cfg, objective, device)
    out = loss_fn(module, batch, step=step, generator=g, ema=engine.sampling_module)
    out.loss.backward()         # denoise + MoE aux + Σ weight · alignment term
    out.terms                   # {"denoise", "moe", "repa", "haste", "sra"} (those switched on), scalars
    out.aux                     # the model's aux outputs (MoE routing statistics)

With the token budget (`mask.scale_batch`) a micro-batch of a masked step is `batch_multiple(step)` loader batches
(the trainer concatenates them), so every step trains on the same number of backbone tokens.

Per micro-batch: the objective's t and noise (`training_targets`); with masking on at this step (`mask.ratio` until
`mask.unmask_at_step`) the kept tokens, and the denoising loss is taken per token (`models/masking.py`). In training
every sample brings its own draws (`batch["uniform"]`, `batch["noise"]`: the loader draws them from the seed and the
sample's global index, so a sample gets the same time, noise, mask and label / caption dropout on whichever rank and
in whichever micro-batch it lands): uniform 0 is its time (`objective.t_from_uniform`), 1 its condition dropout,
2… its token scores (the lowest are kept), and with SRA one more, the fraction of `align.sra_t_gap` its EMA target
steps back. A batch without them (benchmarks, the coordinate check) draws from
`generator`; while alignment is on (`align.*` until `align.stop_step`) the aligner's
targets are computed first (the SRA target is an EMA forward, which must not interleave with the online one), then
its heads and attention maps are requested from the forward. `flops_per_image(step)` counts what that step runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from dit_scale.align.aligner import Aligner
from dit_scale.models.args import ModelArgs
from dit_scale.models.flops import forward_macs
from dit_scale.models.masking import draw_keep_indices, keep_from_scores, kept_denoise_loss, masked_denoise_loss, \
    num_kept
from dit_scale.models.text import Captions


@dataclass
class LossOutput:
    loss: torch.Tensor                  # what backward sees
    terms: Dict[str, torch.Tensor]      # scalars, alignment terms unweighted
    aux: dict                           # the model's aux outputs


def batch_condition(batch: dict, args: ModelArgs, device):
    """What the model is conditioned on: the labels [B], or for a text model (`args.conditioning="text"`) the
    batch's caption features and mask (`Captions`)."""
    if args.conditioning == "text":
        return Captions(batch["caption_feat"].to(device, non_blocking=True),
                        batch["caption_mask"].to(device, non_blocking=True))
    return batch["y"].to(device, non_blocking=True)


class TrainingLoss:
    def __init__(self, objective, args: ModelArgs, device, *, mask_ratio: float = 0.0,
                 unmask_at_step: Optional[int] = None, masked_loss_weight: float = 0.0,
                 aligner: Optional[Aligner] = None, scale_batch: bool = False):
        self.objective, self.args, self.device = objective, args, torch.device(device)
        self.ratio, self.unmask_at_step, self.masked_loss_weight = float(mask_ratio), unmask_at_step, masked_loss_weight
        self.scale_batch = scale_batch
        self.aligner = aligner if aligner is not None and aligner.names else None
        self.names = ["denoise", "moe"] + (self.aligner.names if self.aligner else [])

    @classmethod
    def from_config(cls, cfg, objective, args: ModelArgs, device) -> "TrainingLoss":
        """The loss a config trains with (its aligner loads an online teacher if one is configured)."""
        aligner = Aligner(cfg, device)
        return cls(objective, args, device, mask_ratio=cfg.mask.ratio, unmask_at_step=cfg.mask.unmask_at_step,
                   masked_loss_weight=cfg.mask.masked_loss_weight, aligner=aligner, scale_batch=cfg.mask.scale_batch)

    def mask_ratio(self, step: int) -> float:
        """The mask ratio of training step `step` (0-based): `mask.ratio` until `mask.unmask_at_step`, then 0."""
        if self.ratio <= 0 or (self.unmask_at_step is not None and step >= self.unmask_at_step):
            return 0.0
        return self.ratio

    def batch_multiple(self, step: int) -> int:
        """Loader batches in one micro-batch at step `step`: with the token budget (`mask.scale_batch`) tokens / kept,
        so a masked micro-batch holds as many backbone tokens as an unmasked one (4 at ratio 0.75); otherwise 1.
        A function of the step alone: every rank, and a resumed run, takes the same."""
        ratio = self.mask_ratio(step)
        if not self.scale_batch or ratio == 0:
            return 1
        n, kept = self.args.num_tokens, num_kept(self.args.num_tokens, ratio)
        if n % kept:     # the config check refuses it; a direct caller (a benchmark) must not get a rounded budget
            raise ValueError(f"the token budget needs a mask ratio that keeps a divisor of {n} tokens; {ratio} keeps "
                             f"{kept}")
        return n // kept

    @property
    def uniforms_per_sample(self) -> int:
        """Uniform draws a training sample carries (`batch["uniform"]`): its time, its condition dropout, one
        score per token (its mask) and, with SRA, its gap fraction."""
        sra = self.aligner is not None and "sra" in self.aligner.weights
        return self._gap_column + int(sra)

    @property
    def _gap_column(self) -> int:
        """The column of `batch["uniform"]` after the token scores (2 … 2 + N - 1): SRA's gap fraction."""
        return 2 + self.args.num_tokens

    def _condition_dropout(self) -> float:
        return self.args.caption_dropout if self.args.conditioning == "text" else self.args.class_dropout

    def align_active(self, step: int) -> bool:
        return self.aligner is not None and self.aligner.active(step)

    def __call__(self, module, batch: dict, *, step: int, generator: torch.Generator,
                 ema: Optional[Callable] = None) -> LossOutput:
        """Loss of one micro-batch `batch` ({"x", "y", optional "feat"}); `ema()` yields the EMA model (SRA only)."""
        x = batch["x"].to(self.device, non_blocking=True)
        y = batch_condition(batch, self.args, self.device)
        ratio = self.mask_ratio(step)
        kwargs = {}
        if "uniform" in batch:          # the sample's own draws (see the module docstring)
            u = batch["uniform"].to(self.device, non_blocking=True)
            noise = batch["noise"].to(self.device, non_blocking=True).to(x.dtype)
            targets = self.objective.training_targets(x, t=self.objective.t_from_uniform(u[:, 0]), noise=noise)
            keep = keep_from_scores(u[:, 2:self._gap_column], ratio) if ratio > 0 else None
            if self._condition_dropout() > 0:
                kwargs["force_drop"] = u[:, 1] < self._condition_dropout()
        else:
            targets = self.objective.training_targets(x, generator=generator)
            keep = draw_keep_indices(x.shape[0], self.args.num_tokens, ratio, generator, self.device) if ratio > 0 \
                else None
        kept_only = keep is not None and self.masked_loss_weight == 0.0
        if keep is not None:
            kwargs.update(mask=keep, kept_only=kept_only)
        align_on = self.align_active(step)
        if align_on:   # targets first: the EMA forward (SRA) must not interleave with the online one
            gap = None
            if "sra" in self.aligner.weights:       # the sample's own fraction of the SRA gap
                gap = (u[:, self._gap_column] if "uniform" in batch else
                       torch.rand(x.shape[0], generator=generator, device=generator.device).to(self.device))
            sra_target = self.aligner.sra_target(ema, self.objective, targets, y, keep,
                                                 force_drop=kwargs.get("force_drop"), gap_fraction=gap)
            teacher = self.aligner.teacher_targets(batch, x, keep)
            kwargs.update(self.aligner.forward_kwargs())
        out, aux = module(targets["x_t"], targets["t_model"], y, **kwargs)
        if keep is None:
            denoise = self.objective.loss(out.float(), targets).mean()
        elif kept_only:
            denoise = kept_denoise_loss(out, targets["target"], keep, self.args.patch_size).mean()
        else:
            denoise = masked_denoise_loss(out, targets["target"], keep, self.args.patch_size,
                                          self.masked_loss_weight).mean()
        terms = {"denoise": denoise, "moe": aux["moe_loss"].float()}
        loss = denoise + aux["moe_loss"]
        if align_on:
            align_terms = self.aligner.losses(aux, teacher, sra_target)
            terms.update(align_terms)
            loss = loss + self.aligner.total(align_terms)
        elif self.aligner is not None:
            terms.update({k: torch.zeros((), device=self.device) for k in self.aligner.names})
        return LossOutput(loss, terms, aux)

    def flops_per_image(self, step: int) -> float:
        """Training FLOPs of one image at step `step` (2 per MAC): forward + backward (3× the forward) of what runs
        (kept tokens, patch-mixer, heads), plus the no-grad forwards (SRA's truncated EMA model, the online
        teacher)."""
        kept = num_kept(self.args.num_tokens, self.mask_ratio(step)) if self.mask_ratio(step) > 0 else None
        heads, extra = (), 0
        if self.align_active(step):
            heads = self.aligner.forward_kwargs()["heads"]
            if "sra" in self.aligner.weights:
                extra += forward_macs(self.args, kept, stop_after=self.aligner.cfg.sra_teacher_depth)
            if self.aligner.teacher is not None:
                extra += self.aligner.teacher.macs_per_image()
        kept_output = kept is not None and self.masked_loss_weight == 0.0       # the forward's kept_only
        return 2.0 * (3 * forward_macs(self.args, kept, heads, kept_output=kept_output) + extra)
