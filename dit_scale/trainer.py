"""The training loop: data → diffusion targets → DiT(-MoE) → loss → engine step → EMA → metrics / samples / ckpt.

    python launch/train.py --config configs/quickstart.yaml train.steps=200 train.run_dir=runs/try

One step: `train.grad_accum` micro-batches of `data.batch_size`; loss = denoising loss + MoE aux terms + the
alignment terms (`align:` REPA / HASTE / SRA, until `align.stop_step`); with `mask.ratio` > 0 the trainer draws the
kept tokens with its generator, the backbone runs on them and the denoising loss is taken per token (`mask:`). The
engine clips by the global norm and steps. A non-finite loss or gradient skips the step on the device (no host sync);
`train.max_bad_steps` in a row abort with a message. Statistics are accumulated on the device and read every
`logging.log_every` steps. SIGTERM / SIGUSR1 or `train.max_wall_minutes` only set a flag; the ranks agree on it
through the all-reduce every step already does, save at that step boundary and raise TrainingInterrupted
(launch/train.py exits 75: requeue with train.resume=auto).
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch

from dit_scale.align.aligner import Aligner
from dit_scale.checkpoint import (CheckpointError, checkpoint_dir, find_latest, is_run_dir, list_checkpoints,
                                  load_checkpoint, load_sharded, prune_checkpoints, rng_state, save_checkpoint,
                                  save_sharded, set_rng_state, verify_sharded)
from dit_scale.config import ConfigError, save_config, to_yaml
from dit_scale.data import build_loader
from dit_scale.diffusion import build_objective
from dit_scale.metrics import MetricsLogger, MoEStats, peak_flops, plot_expert_load
from dit_scale.models import build_model, model_kwargs
from dit_scale.models.flops import count_params, forward_macs
from dit_scale.models.masking import draw_keep_indices, mask_ratio_at, masked_denoise_loss
from dit_scale.parallel import build_engine, init_topology
from dit_scale.parallel.engines.base import uses_bf16
from dit_scale.sampling import class_grid, save_grid


class TrainingAborted(RuntimeError):
    pass


class TrainingInterrupted(Exception):
    """SIGTERM / SIGUSR1 or train.max_wall_minutes: every rank saved a checkpoint at `step`; requeue to continue."""

    def __init__(self, step: int, reason: str, path: str = ""):
        super().__init__(f"{reason}: checkpoint saved at step {step}; requeue (train.resume=auto) to continue.")
        self.step, self.reason, self.path = step, reason, path


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def autocast_context(cfg, device):
    if uses_bf16(cfg, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        t = cfg.train
        self.topo = init_topology(cfg)
        self.device = self.topo.device
        seed_everything(t.seed, t.deterministic)            # the same initial model on every rank
        self.run_dir = t.run_dir
        if self.topo.is_main:
            save_config(cfg, self.run_dir)

        self.objective = build_objective(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
        out_channels = self.objective.out_channels(cfg.model.in_channels)
        self.model = build_model(cfg, out_channels)
        self.model.grad_checkpointing = t.activation_checkpointing
        self.sizes = count_params(self.model)
        self.flops_per_image = 6 * forward_macs(model_kwargs(cfg, out_channels))   # fwd + bwd, 2 FLOPs / MAC
        self.loader = self._build_loader(t.seed)
        self.engine = build_engine(cfg, self.model, self.topo)
        seed_everything(t.seed + self.topo.rank, t.deterministic)   # per-rank randomness from here on
        self.generator = torch.Generator(device=self.device).manual_seed(t.seed * 1000 + self.topo.rank)
        self.autocast = autocast_context(cfg, self.device)
        self.aligner = Aligner(cfg, self.device)           # online teacher (if any): outside the engine, frozen
        self.loss_names = ["loss", "loss_denoise", "loss_moe"] + [f"loss_{k}" for k in self.aligner.names]
        self.patch_size = self.model.patch_size
        self.num_tokens = self.model.pos_embed.shape[1]
        self.step = 0
        self._t0 = time.monotonic()      # train.max_wall_minutes counts from here
        self._stop_reason = None         # set by a signal handler or the wall-time guard (a plain flag)
        self._stop_votes = None          # device scalar: ranks voting to stop, all-reduced in train_step
        self._pending_votes = None       # (host copy, CUDA event) of the previous step's votes
        self._moe_counts = None      # tokens per expert of the last logging interval, for expert_load.png
        self._pending_save = None    # a sharded save still writing (train.async_save)
        self._resume()

    def _build_loader(self, seed: int):
        cfg = self.cfg
        return build_loader(cfg.data, dp_rank=self.topo.dp_rank, dp_size=self.topo.dp_size, seed=seed,
                            expect={"x": (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)})

    # ------------------------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------------------------

    def state_dict(self, sharded: bool = False) -> dict:
        """Every rank calls it (collective). `sharded`: tensors are DTensor views of each rank's pieces (for DCP)."""
        # Loader position and RNG streams differ per rank: one entry per data-parallel rank.
        per_rank = self.engine.all_gather_object({"data": self.loader.state_dict(), "rng": rng_state(self.generator)})
        return {"step": self.step, **self.engine.state_dict(sharded), "per_rank": per_rank,
                "config": to_yaml(self.cfg)}

    def _resume(self):
        """train.resume=auto: the newest usable checkpoint of the run (a corrupt one falls back to the previous, with
        one line); PATH: that checkpoint (a step_X folder or .pt file, or a run directory's newest)."""
        resume = self.cfg.train.resume
        if resume == "none":
            return
        log = print if self.topo.is_main else (lambda _: None)
        if resume == "auto":
            candidates = list_checkpoints(self.run_dir, check=False)    # a truncated one is reported, not skipped
            if not candidates:
                return   # auto-resume on a fresh run directory starts from scratch
        else:
            candidates = [find_latest(resume) or checkpoint_dir(resume)] if is_run_dir(resume) else [resume]
        for i, path in enumerate(candidates):
            try:
                state = self._load(path)
                break
            except CheckpointError as e:
                if i + 1 == len(candidates):
                    raise CheckpointError(f"No usable checkpoint in '{checkpoint_dir(self.run_dir)}': {e}"
                                          if resume == "auto" else str(e)) from None
                log(f"warning: {e} Falling back to the previous complete checkpoint "
                    f"'{os.path.basename(candidates[i + 1])}'.")
        try:
            self.engine.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"Checkpoint '{path}' does not fit this model ({str(e).splitlines()[0]}); "
                              f"resume with the config it was trained with.") from None
        self.step = int(state["step"])
        saved = state["per_rank"]
        if len(saved) == self.topo.world_size:
            self.loader.load_state_dict(saved[self.topo.rank]["data"])
            set_rng_state(saved[self.topo.rank]["rng"], self.generator)
        else:   # resharded: model, EMA and optimizer moved; per-rank streams cannot be split anew
            log(f"warning: checkpoint '{path}' was written by {len(saved)} process(es) and this run has "
                f"{self.topo.world_size}: weights, EMA and optimizer state are resharded, but the data loader and "
                f"RNG streams restart (shuffled with a seed derived from step {self.step}), so the data order "
                f"differs from an uninterrupted run.")
            t = self.cfg.train
            self.loader.close()
            self.loader = self._build_loader(t.seed + self.step)
            seed_everything(t.seed + self.topo.rank + 100003 * self.step, t.deterministic)
            self.generator.manual_seed((t.seed + self.step) * 1000 + self.topo.rank)
        log(f"resumed from {path} at step {self.step}")

    def _load(self, path: str) -> dict:
        """The state of checkpoint `path`; a sharded one is verified by all ranks together (each hashes a share
        of the files) and read into this run's layout."""
        if not os.path.isdir(path):
            return load_checkpoint(path)
        error = verify_sharded(path, self.topo.rank, self.topo.world_size)
        errors = [e for e in self.engine.all_gather_object(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        return load_sharded(path, self.state_dict(sharded=True))

    def save(self) -> str:
        """Every rank calls it (collective). Returns the checkpoint's path on rank 0 ("" on the others); with
        train.async_save, the path it will have once its background write is published."""
        t = self.cfg.train
        self.wait_for_save()
        if t.checkpoint_format == "consolidated":
            state = self.state_dict()
            if not self.topo.is_main:
                return ""
            path = save_checkpoint(self.run_dir, self.step, state)
            self._prune(path)
            return path
        self._pending_save = save_sharded(
            self.run_dir, self.step, self.state_dict(sharded=True), rank=self.topo.rank, barrier=self.engine.barrier,
            async_save=t.async_save, process_group=self.engine.checkpoint_group(t.async_save),
            on_published=self._prune if self.topo.is_main else None)
        return self._pending_save.path

    def wait_for_save(self) -> None:
        """Wait until a background (async) save is published; re-raises its error."""
        pending, self._pending_save = self._pending_save, None
        if pending is not None:
            pending.wait()

    def _prune(self, _path: str) -> None:
        prune_checkpoints(self.run_dir, self.cfg.train.keep_last, self.cfg.train.keep_every)

    # ------------------------------------------------------------------------------------------------------------
    # One optimizer step
    # ------------------------------------------------------------------------------------------------------------

    def train_step(self, moe_stats: MoEStats):
        """Returns device tensors (losses in `self.loss_names` order, grad norm, finite flag); no host sync."""
        accum = self.cfg.train.grad_accum
        ratio = mask_ratio_at(self.cfg.mask, self.step)
        align_on = self.aligner.active(self.step)
        totals = torch.zeros(len(self.loss_names), device=self.device)
        for _ in range(accum):
            batch = next(self.loader)
            x = batch["x"].to(self.device, non_blocking=True)
            y = batch["y"].to(self.device, non_blocking=True)
            with self.autocast:
                targets = self.objective.training_targets(x, generator=self.generator)
                keep = draw_keep_indices(x.shape[0], self.num_tokens, ratio, self.generator, self.device) \
                    if ratio > 0 else None
                kwargs = {} if keep is None else {"mask": keep}
                terms = {}
                if align_on:   # targets first: the EMA forward (SRA) must not interleave with the online one
                    sra_target = self.aligner.sra_target(self.engine, self.objective, targets, y, keep)
                    teacher = self.aligner.teacher_targets(batch, x, keep)
                    kwargs.update(self.aligner.forward_kwargs())
                out, aux = self.engine.module(targets["x_t"], targets["t_model"], y, **kwargs)
                if keep is None:
                    denoise = self.objective.loss(out.float(), targets).mean()
                else:
                    denoise = masked_denoise_loss(out, targets["target"], keep, self.patch_size,
                                                  self.cfg.mask.masked_loss_weight).mean()
                loss = denoise + aux["moe_loss"]
                if align_on:
                    terms = self.aligner.losses(aux, teacher, sra_target)
                    loss = loss + self.aligner.total(terms)
            self.engine.backward(loss / accum)
            zero = torch.zeros((), device=self.device)
            totals += torch.stack([loss.detach(), denoise.detach(), aux["moe_loss"].detach().float()]
                                  + [terms.get(k, zero).detach().float() for k in self.aligner.names]) / accum
            moe_stats.add(aux)
        grad_norm = self.engine.clip_grad_norm(self.cfg.optim.grad_clip)
        # every rank must take the same decision: count non-finite losses over the data-parallel ranks
        # ... and the same all-reduce carries the stop votes (signal / wall time): no extra collective per step
        stop = torch.full((), float(self._wants_stop()), device=self.device)
        votes = self.engine.all_reduce_sum_(torch.stack([(~torch.isfinite(totals[0])).float(), stop]))
        self._stop_votes = votes[1]
        ok = (votes[0] == 0) & torch.isfinite(grad_norm)
        self.engine.step(ok)
        self.engine.zero_grad()
        self._update_router_bias()
        return totals, grad_norm, ok

    def _update_router_bias(self):
        """Aux-loss-free balancing: counts summed over data-parallel ranks, then each router's sign update."""
        for layer in self.model.moe_layers():
            if layer.router.bias_update_rate > 0:
                layer.router.update_bias(self.engine.all_reduce_sum_(layer.router.pending_counts.clone()))

    # ------------------------------------------------------------------------------------------------------------
    # Loop
    # ------------------------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, t, lg = self.cfg, self.cfg.train, self.cfg.logging
        log = MetricsLogger(cfg, self.run_dir, self.topo.is_main, t.steps, self.step)
        log.write(f"{cfg.model.name}: {self.sizes['params'] / 1e6:.2f}M params, "
                  f"{self.sizes['active_params'] / 1e6:.2f}M active, device {self.device}, run dir {self.run_dir}")
        peak = peak_flops(self.device)
        images_per_step = cfg.data.batch_size * t.grad_accum * self.topo.dp_size
        moe_stats, interval = MoEStats(), torch.zeros(len(self.loss_names) + 1, device=self.device)
        consecutive_bad = torch.zeros((), device=self.device)
        worst_bad = torch.zeros((), device=self.device)
        skipped = torch.zeros((), device=self.device)
        tic, steps_in_interval, last = time.perf_counter(), 0, {}
        previous_handlers = self._install_signal_handlers()
        try:
            while self.step < t.steps:
                totals, grad_norm, ok = self.train_step(moe_stats)
                self.step += 1
                stop = self._agreed_stop() and self.step < t.steps
                steps_in_interval += 1
                bad = (~ok).float()
                consecutive_bad = (consecutive_bad + 1) * bad
                worst_bad = torch.maximum(worst_bad, consecutive_bad)
                skipped += bad
                interval += torch.cat([torch.nan_to_num(totals, nan=0.0, posinf=0.0) * ok,
                                      torch.nan_to_num(grad_norm.float(), nan=0.0, posinf=0.0).view(1)])
                log.advance()

                if self.step % lg.log_every == 0 or self.step == t.steps or stop:
                    if worst_bad.item() >= t.max_bad_steps:
                        raise TrainingAborted(
                            f"{int(worst_bad.item())} consecutive steps had a non-finite loss or gradient "
                            f"(train.max_bad_steps={t.max_bad_steps}); lower optim.lr or check the data. "
                            f"The last checkpoint is in {self.run_dir}/checkpoints.")
                    elapsed = time.perf_counter() - tic
                    values = (self.engine.all_reduce_sum_(interval.clone()) / self.topo.world_size).tolist()
                    moe_stats.all_reduce(self.engine.all_reduce_sum_, self.topo.world_size)
                    n_ok = max(1.0, steps_in_interval - (skipped.item() - last.get("skipped_steps", 0.0)))
                    images_per_s = images_per_step * steps_in_interval / elapsed
                    last = {**{k: v / n_ok for k, v in zip(self.loss_names, values)},
                            "grad_norm": values[-1] / steps_in_interval, "lr": self.engine.lr,
                            "images_per_s": images_per_s, "skipped_steps": skipped.item(),
                            **moe_stats.summary()}
                    if cfg.mask.ratio > 0:
                        last["mask_ratio"] = mask_ratio_at(cfg.mask, self.step - 1)
                    if peak:
                        last["mfu"] = images_per_s * self.flops_per_image / (peak * self.topo.world_size)
                    log.log(self.step, last)
                    self._moe_counts = moe_stats.counts
                    moe_stats.reset()
                    interval.zero_()
                    tic, steps_in_interval = time.perf_counter(), 0

                if stop:
                    self._save_and_interrupt()
                paused = time.perf_counter()        # sampling / saving time is not training throughput
                if lg.sample_every and self.step % lg.sample_every == 0 and self.step < t.steps:
                    self.write_samples()
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.steps:
                    self.save()
                tic += time.perf_counter() - paused
            self.save()
            self.write_samples()
            self.write_expert_load()
            self.wait_for_save()
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            log.close()
        return {"step": self.step, **last}

    # ------------------------------------------------------------------------------------------------------------
    # Preemption: SIGTERM / SIGUSR1 / train.max_wall_minutes → every rank saves, then TrainingInterrupted (exit 75)
    # ------------------------------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict:
        """The handlers only set a flag; the loop acts on it at a step boundary. Main thread only (Python rule)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, frame):
            self._stop_reason = signal.Signals(signum).name
        return {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}

    def _wants_stop(self) -> bool:
        """This rank's vote (host only, no sync): a signal arrived or the wall-time budget is spent."""
        limit = self.cfg.train.max_wall_minutes
        if self._stop_reason is None and limit and time.monotonic() - self._t0 > 60.0 * limit:
            self._stop_reason = f"train.max_wall_minutes={limit:g} reached"
        return self._stop_reason is not None

    def _agreed_stop(self) -> bool:
        """Whether any rank voted to stop; every rank reads the same all-reduced value, so all stop at the same
        step. On CPU the vote of this step is read directly. On CUDA the votes are copied to the host without
        blocking and read one step later, after the next step is queued: waiting on that event only waits for the
        previous step, so the check adds no pipeline stall (stopping then takes effect one step later)."""
        votes = self._stop_votes
        if votes is None:
            return False
        if votes.device.type != "cuda":
            return bool(votes.item() > 0)
        previous, self._pending_votes = self._pending_votes, (votes.to("cpu", non_blocking=True),
                                                              torch.cuda.Event())
        self._pending_votes[1].record()
        if previous is None:
            return False
        previous[1].synchronize()
        return bool(previous[0].item() > 0)

    def _save_and_interrupt(self):
        path = self.save()                                  # every rank (collective); rank 0 writes
        self.wait_for_save()
        self.engine.all_reduce_sum_(torch.zeros(1, device=self.device)).item()   # barrier: the file is in place
        reason = self._stop_reason or "another rank was signalled"
        raise TrainingInterrupted(self.step, reason, path)

    def write_samples(self) -> str:
        with self.engine.sampling_module() as model:        # every rank samples the same grid (collective)
            images = class_grid(model, self.objective, self.cfg, self.device, seed=self.cfg.train.seed)
        if not self.topo.is_main:
            return ""
        os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
        path = os.path.join(self.run_dir, "samples", f"step_{self.step:08d}.png")
        return save_grid(images, self.cfg.logging.samples_per_class, path, upscale=2)

    def write_expert_load(self):
        if self.topo.is_main and self._moe_counts is not None:
            plot_expert_load(self._moe_counts, os.path.join(self.run_dir, "expert_load.png"),
                             f"{self.cfg.model.name} step {self.step}: tokens per expert / mean\n"
                             f"(last logging interval)")


def train(cfg) -> dict:
    return Trainer(cfg).fit()
