"""The training loop: data → training loss (diffusion, MoE, alignment) → engine step → metrics / samples / checkpoints.

    python launch/train.py --config configs/quickstart.yaml train.steps=200 train.run_dir=runs/try

One step is `train.grad_accum` micro-batches of `data.batch_size` images (with the token budget, `mask.scale_batch`,
tokens / kept times as many on a masked step: `TrainingLoss.batch_multiple`), each through the one training loss
(`dit_scale/training/loss.py`); the engine clips by the global norm and steps. A non-finite loss or gradient skips the
step on the device (no host sync); `train.max_bad_steps` in a row abort with a message. Statistics accumulate on the
device and are read every `logging.log_every` steps (`metrics.IntervalStats`). Checkpoints are the
`CheckpointManager`'s (load at the start of `fit`, save after a step); SIGTERM / SIGUSR1 or `train.max_wall_minutes`
set a flag that the ranks agree on through the all-reduce every step already does (`preemption.py`): every rank
saves at that step boundary and `TrainingInterrupted` is raised (launch/train.py exits 75: requeue with
train.resume=auto).
"""
from __future__ import annotations

import torch

from dit_scale.build import build, check_attention
from dit_scale.checkpoint import CheckpointManager, disk_error, find_latest
from dit_scale.checkpoint.init_from import init_from
from dit_scale.checkpoint.rng import RNGStreams, seed_everything
from dit_scale.config import save_config
from dit_scale.data import build_loader, merge_states, split_rows, take_batches
from dit_scale.data.loader import STATE_FORMAT
from dit_scale.errors import CheckpointError, ConfigError
from dit_scale.evaluation.periodic import TrainingEvaluation
from dit_scale.models.flops import count_params
from dit_scale.optim import resolve_precision
from dit_scale.parallel import build_engine, init_topology
from dit_scale.parallel.parallelize import CUDA_GRAPH_MODES
from dit_scale.parallel.topology import agree
from dit_scale.run_dir import RunDir
from dit_scale.training.loss import TrainingLoss
from dit_scale.training.metrics import IntervalStats, MetricsLogger, MoEStats, check_wandb, peak_flops, \
    plot_expert_load
from dit_scale.training.preemption import Preemption, TrainingInterrupted

__all__ = ["Trainer", "TrainingAborted", "TrainingInterrupted", "train"]


class TrainingAborted(RuntimeError):
    pass


class RankStreams:
    """This rank's data loader and RNG streams: what a checkpoint holds per rank. The loader's order is global (any
    layout continues it); a training sample's randomness comes with it from the loader (its own draws); the RNG
    streams (torch, numpy, python globals) are per data-parallel rank."""

    def __init__(self, cfg, topology, device, uniforms: int):
        self.cfg, self.topo, self.uniforms = cfg, topology, uniforms
        self.loader = self._build_loader(cfg.train.seed)
        self.images = 0              # images trained on so far, over every data-parallel rank (the trainer counts)
        self.skipped = torch.zeros((), device=device)    # steps skipped so far (non-finite; IntervalStats counts)
        self.periodic_due = False    # saved by a stop before this step's samples / evaluation: the resume runs them
        # seeded per data-parallel rank: the ranks sharing an image (tensor / context parallelism) draw alike
        self.rng = RNGStreams(cfg.train.seed, topology.dp_rank, device, cfg.train.deterministic)

    def _build_loader(self, seed: int):
        m = self.cfg.model
        expect = {"x": (m.in_channels, m.input_size, m.input_size), "num_classes": m.num_classes}
        if m.conditioning == "text":        # caption features of the model's width and length; labels unused
            expect.update(num_classes=0, text_dim=m.text_dim, text_len=m.text_len)
        a = self.cfg.align
        if a.repa_weight > 0 and a.teacher == "shards":   # every source's teacher features, checked at start-up
            expect.update(feat_dim=a.teacher_dim, feat_tokens=m.num_tokens)
        return build_loader(self.cfg.data, dp_rank=self.topo.dp_rank, dp_size=self.topo.dp_size, seed=seed,
                            expect=expect, uniforms=self.uniforms, grad_accum=self.cfg.train.grad_accum)

    @property
    def global_batch(self) -> int:
        """Loader batches of every data-parallel rank and micro-batch in a step, in images (token budget: × the
        step's batch multiple)."""
        return self.cfg.data.batch_size * self.cfg.train.grad_accum * self.topo.dp_size

    def state_dict(self) -> dict:
        return {"data": self.loader.state_dict(), "rng": self.rng.state_dict(), "global_batch": self.global_batch,
                "dp": [self.topo.dp_rank, self.topo.dp_size], "images": self.images,
                "skipped_steps": int(self.skipped.item()), "periodic_due": self.periodic_due}

    def resume(self, saved: list, step: int) -> list[str]:
        """Continue from every rank's saved streams (`saved`, a checkpoint's per_rank list) at `step`: the loader from
        the merged partitions (any layout), the RNG streams from this rank's own entry when the layout is the same,
        else fresh ones derived from the step. Returns lines to log about what changed."""
        notes = []
        data = [s.get("data") if isinstance(s, dict) else None for s in saved]
        first = saved[0] if isinstance(saved[0], dict) else {}
        if all(isinstance(d, dict) and d.get("format") == STATE_FORMAT for d in data):
            self.loader.load_state_dict(merge_states(data))
            self.images = int(first.get("images", self.loader.samples))   # older checkpoints: the loader's count
        else:   # a checkpoint of an older dit_scale: its per-rank loader state cannot be split anew
            self.loader.close()
            self.loader = self._build_loader(self.cfg.train.seed + step)
            self.images = step * self.global_batch          # the count it lacks, as if the batch never changed
            notes.append(f"the checkpoint's data-loader state has an older format, so the data order restarts "
                         f"(shuffled with a seed derived from step {step}) and differs from an uninterrupted run; "
                         f"the images column continues from {self.images} (steps x today's global batch)")
        self.skipped.fill_(int(first.get("skipped_steps", 0)))
        self.periodic_due = bool(first.get("periodic_due", False))
        mine = saved[self.topo.rank] if len(saved) == self.topo.world_size else None
        same_layout = isinstance(mine, dict) and mine.get("dp", [self.topo.dp_rank, self.topo.dp_size]) == \
            [self.topo.dp_rank, self.topo.dp_size]
        if same_layout and self.rng.can_load(mine.get("rng")):
            self.rng.load_state_dict(mine["rng"])
        else:
            self.rng.reseed(step)
            if same_layout:
                notes.append(f"the checkpoint's random streams come from another device type (a run moved between "
                             f"GPU and CPU), so they restart from a seed derived from step {step}")
        before = first.get("global_batch")
        if before is not None and before != self.global_batch:
            notes.append(f"the global batch changes from {before} to {self.global_batch} images (data.batch_size x "
                         f"train.grad_accum x data-parallel size): the sample order continues where it stopped, but "
                         f"steps from here group samples differently from the saved run")
        return notes


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        t = cfg.train
        self.run = RunDir(t.run_dir)
        check_wandb(cfg)                                    # logging.wandb: the package is there (every rank)
        self.run.check_usable(t.resume)                     # every rank, before any collective
        self.topo = init_topology(cfg)
        self.device = self.topo.device
        self.precision = resolve_precision(t.precision, self.device)   # bf16 autocast or fp32
        # one run per run directory; its config written first (a full disk stops the run before anything else)
        error = agree(self.topo, (self.run.lock() or self._write_config()) if self.topo.is_main else None)
        if error:
            raise ConfigError(error)
        seed_everything(t.seed, t.deterministic)
        built = build(cfg, device="meta")                   # shapes only: the engine materialises this rank's pieces
        check_attention(built.args, self.device, self.precision.autocast_dtype or torch.float32)   # model.attention
        built.init = init_from(cfg, self.run, built, self.topo.is_main)   # train.init_from (weights only; resume wins)
        self.model, self.objective = built.model, built.objective
        self.sizes = count_params(self.model)
        self.loss = TrainingLoss.from_config(cfg, self.objective, built.args, self.device)
        self.streams = RankStreams(cfg, self.topo, self.device, self.loss.uniforms_per_sample)
        self.engine = build_engine(cfg, self.model, self.topo, mup=built.mup, init=built.init)
        self.streams.rng.reseed(0)                          # per-rank randomness from here on
        self.evaluation = TrainingEvaluation(cfg, self.topo, self.objective, self.device)   # eval.*, sample grids
        self.metric_names = ["loss"] + [f"loss_{k}" for k in self.loss.names]
        self.interval = IntervalStats(self.metric_names, self.device, skipped=self.streams.skipped)
        self.checkpoints = CheckpointManager(cfg, self.run, self.engine, self.topo, self.streams,
                                             health=self._unhealthy)
        self.preemption = Preemption(t.max_wall_minutes, t.run_dir)
        self._cuda_graphs = bool(t.compile and t.compile_mode in CUDA_GRAPH_MODES)
        self.step = 0
        self._started = False
        self._stop_votes = None      # device scalar: ranks voting to stop, all-reduced in train_step
        self._moe_counts = None      # tokens per expert of the last logging interval, for expert_load.png
        self._lr = None              # the learning rate of the last step (host float, from the optimizer's groups)

    def _write_config(self):
        """Rank 0 writes the resolved config into the run directory; returns the one-line disk message when the disk
        cannot take it (full, read-only), else None."""
        try:
            save_config(self.cfg, self.run.path)
        except OSError as e:
            error = disk_error(self.run, e, "while writing the run's config")
            if error is e:
                raise
            return str(error)
        return None

    # the loader, the training generator and the aligner, where tests and tools look for them
    @property
    def loader(self):
        return self.streams.loader

    @loader.setter
    def loader(self, loader):
        self.streams.loader = loader

    @property
    def generator(self) -> torch.Generator:
        return self.streams.rng.generator

    @property
    def aligner(self):
        return self.loss.aligner

    # ------------------------------------------------------------------------------------------------------------
    # One optimizer step
    # ------------------------------------------------------------------------------------------------------------

    def train_step(self, moe_stats: MoEStats):
        """Returns device tensors (losses in `self.metric_names` order, grad norm, finite flag); no host sync."""
        accum = self.cfg.train.grad_accum
        totals = torch.zeros(len(self.metric_names), device=self.device)
        counts = None                       # tokens per expert [L, E] of this step (aux-loss-free balancing)
        multiple = self.loss.batch_multiple(self.step)     # token budget: 1, or tokens / kept on a masked step
        micro_batches = split_rows(take_batches(self.loader, multiple * accum), accum)
        for batch in micro_batches:
            if self._cuda_graphs:           # the previous micro-batch's graph outputs are consumed: replay may reuse them
                torch.compiler.cudagraph_mark_step_begin()
            with self.precision.autocast():
                out = self.loss(self.engine.module, batch, step=self.step, generator=self.generator,
                                ema=self.engine.sampling_module)
            self.engine.backward(out.loss / accum)
            totals += torch.stack([out.loss.detach().float()]
                                  + [out.terms[k].detach().float() for k in self.loss.names]) / accum
            moe_stats.add(out.aux)
            if "tokens_per_expert" in out.aux:
                counts = out.aux["tokens_per_expert"] if counts is None else counts + out.aux["tokens_per_expert"]
        grad_norm = self.engine.clip_grad_norm(self.cfg.optim.grad_clip)
        # every rank must take the same decision: count non-finite losses over the data-parallel ranks
        # ... and the same all-reduce carries the stop votes (signal / wall time): no extra collective per step
        flags = self.engine.all_reduce_sum_(torch.stack([(~torch.isfinite(totals[0])).float(),
                                                         self.preemption.vote_tensor(self.device)]))
        self._stop_votes = flags[1]
        ok = (flags[0] == 0) & torch.isfinite(grad_norm)
        self._update_router_bias(counts, ok)    # before the step: the local engine copies buffers into its EMA there
        self._lr = self.engine.lr           # the rate this step uses (the engine's step moves the schedule on)
        self.engine.step(ok)
        self.engine.zero_grad()
        return totals, grad_norm, ok

    def _update_router_bias(self, counts, ok):
        """Aux-loss-free balancing: the step's tokens per expert (from the forwards' outputs, so a recomputed
        checkpointed forward counts nothing twice), summed over data-parallel ranks, then each router's sign update;
        none on a skipped step (`ok` false, a device flag: no host sync)."""
        layers = self.model.moe_layers()
        if counts is None or not any(layer.router.bias_update_rate > 0 for layer in layers):
            return
        counts = self.engine.all_reduce_sum_(counts.clone())
        for layer, layer_counts in zip(layers, counts):
            if layer.router.bias_update_rate > 0:
                layer.router.update_bias(layer_counts, ok)

    # ------------------------------------------------------------------------------------------------------------
    # Loop
    # ------------------------------------------------------------------------------------------------------------

    def start(self) -> int:
        """Restore what train.resume names (the `CheckpointManager`'s load); `fit` calls it first. Returns the step."""
        if not self._started:
            resumed = self.checkpoints.load()
            self.step = self.step if resumed is None else resumed
            self._started = True
        return self.step

    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.start()
        if self.topo.is_main:
            self.run.truncate_metrics(self.step)            # rows a killed run logged after its last save
        log = MetricsLogger(cfg, self.run, self.topo.is_main, t.steps, self.step)
        log.write(f"{cfg.model.name}: {self.sizes['params'] / 1e6:.2f}M params, "
                  f"{self.sizes['active_params'] / 1e6:.2f}M active, device {self.device}, "
                  f"{torch.get_num_threads()} CPU threads, run dir {self.run}")
        interval = self.interval
        interval.restart_clock()                            # start-up and checkpoint loading are not training time
        interval.skipped_before = self.streams.skipped.item()     # skipped before this job (a resumed run's count)
        try:
            if self.streams.periodic_due:                   # a stop saved this step before its samples / evaluation
                with interval.paused():
                    self._periodic(log)
                self.streams.periodic_due = False
            with self.preemption:
                while self.step < t.steps:
                    totals, grad_norm, ok = self.train_step(interval.moe)
                    self.step += 1
                    images = self.images_in_step(self.step - 1)
                    self.streams.images += images
                    interval.add(totals, grad_norm, ok, images, images * self.loss.flops_per_image(self.step - 1))
                    log.advance()
                    stop = self.preemption.agreed(self._stop_votes) and self.step < t.steps
                    if stop or self.step % cfg.logging.log_every == 0 or self.step == t.steps:
                        row = self._interval_row(interval)
                        self._write_on_main(lambda: log.log(self.step, row), f"while logging step {self.step}")
                    if stop:
                        self.streams.periodic_due = self._samples_due() or self.evaluation.due(self.step)
                        self._save_and_interrupt()
                    with interval.paused():             # sampling / saving time is not training throughput
                        self._periodic(log)
                        self.checkpoints.save(self.step)
                self._save_last()
                self.write_samples()
                self.write_expert_load()
                self.checkpoints.wait()
        finally:
            log.close()
        return {"step": self.step, **interval.last}

    def _periodic(self, log) -> None:
        """This step's sample grid and evaluation where they are due (collective)."""
        if self._samples_due():
            self.write_samples()
        if self.evaluation.due(self.step):
            row = self.evaluation.run(self.step, self.engine)
            self._write_on_main(lambda: log.log(self.step, row), f"while logging step {self.step}'s evaluation")

    def _interval_row(self, interval: IntervalStats) -> dict:
        """The metrics row of the logging interval that ends now (collective); aborts after too many bad steps."""
        t = self.cfg.train
        worst = interval.worst_bad_streak()
        if worst >= t.max_bad_steps:
            self.checkpoints.wait()
            latest = find_latest(self.run.path)
            where = (f"the newest checkpoint is {latest} (resume from it with train.resume=auto)" if latest else
                     "no checkpoint was saved yet")
            raise TrainingAborted(
                f"{worst} consecutive steps had a non-finite loss or gradient (train.max_bad_steps="
                f"{t.max_bad_steps}); lower optim.lr or check the data; {where}.")
        row = interval.summary(self.engine.all_reduce_sum_, self.topo.world_size, self.topo.dp_size)
        row["images"] = self.streams.images             # trained on so far, over every data-parallel rank
        row["global_batch"] = self.images_in_step(self.step - 1)
        row["data_position"] = self.loader.samples       # global samples the loader has handed out
        row["lr"] = self._lr                             # the rate the interval's last step used
        if self.cfg.mask.ratio > 0:
            row["mask_ratio"] = self.loss.mask_ratio(self.step - 1)
        flops_per_s = row.pop("flops_per_s")             # each step's images at that step's cost (mask schedule)
        peak = peak_flops(self.device, self.precision.bf16)
        if peak:
            row["mfu"] = flops_per_s / (peak * self.topo.world_size)
        self._moe_counts = interval.moe_counts
        return row

    def _images_per_batch(self) -> int:
        """Images of one loader batch over every data-parallel rank and micro-batch of a step."""
        return self.streams.global_batch

    def images_in_step(self, step: int) -> int:
        """Images over every data-parallel rank that (0-based) step `step` trains on (token budget: more when masked)."""
        return self._images_per_batch() * self.loss.batch_multiple(step)

    def _unhealthy(self):
        """Why the current weights must not be saved (the CheckpointManager asks at each save), or None: after a
        non-finite step the weights may be the diverged ones every later step is skipped on."""
        streak = int(self.interval.consecutive_bad.item())
        if streak:
            return f"the last {streak} step(s) had a non-finite loss or gradient (the weights may have diverged)"
        return None

    def _samples_due(self) -> bool:
        every = self.cfg.logging.sample_every
        return bool(every) and self.step % every == 0 and self.step < self.cfg.train.steps

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints (the manager's), preemption, samples
    # ------------------------------------------------------------------------------------------------------------

    def state_dict(self, sharded: bool = False) -> dict:
        """Every rank calls it (collective): the checkpoint state at the current step."""
        return self.checkpoints.state_dict(self.step, sharded)

    def save(self) -> str:
        """Save now (every rank calls it); the path on rank 0."""
        return self.checkpoints.save(self.step, final=True)

    def wait_for_save(self) -> None:
        self.checkpoints.wait()

    def _save_last(self) -> str:
        """Save the step the run stops at (collective); a run that cannot (its weights are not finite) is aborted
        (exit 3) rather than ending as if its last step were saved."""
        path = self.save()
        refused = self.checkpoints.refused
        if refused is not None and refused[0] == self.step:
            latest = find_latest(self.run.path)
            raise TrainingAborted(f"the run stops without saving step {self.step}: {refused[1]}; the newest checkpoint "
                                  f"is {latest or '(none)'} (lower optim.lr or check the data, then resume from it "
                                  f"with train.resume=auto).")
        return path

    def _save_and_interrupt(self):
        """A stop signal or the wall-time guard: save this step and exit for a requeue. A save refused for the
        weights' health (a non-finite step just before, fewer than train.max_bad_steps) is no reason to end the run
        for good: the requeued job resumes from the newest checkpoint, and train.max_bad_steps still aborts a run
        that keeps diverging."""
        path = self.save()                                  # every rank (collective); rank 0 writes
        self.checkpoints.wait()
        self.engine.all_reduce_sum_(torch.zeros(1, device=self.device)).item()   # barrier: the file is in place
        refused = self.checkpoints.refused
        if refused is not None and refused[0] == self.step:
            raise TrainingInterrupted(self.step, self.preemption.describe(), find_latest(self.run.path) or "",
                                      unsaved=refused[1])
        raise TrainingInterrupted(self.step, self.preemption.describe(), path)

    def write_samples(self) -> str:
        """The decoded, titled class grid of this step (every rank samples: collective); its path on rank 0."""
        def write():
            with self.precision.autocast():                 # bf16 engines hold bf16 weights (DeepSpeed's module)
                return self.evaluation.write_grid(self.engine, self.step, self.run.sample_grid(self.step))
        return self._write_on_main(write, f"while writing step {self.step}'s sample grid")

    def _write_on_main(self, write, when: str):
        """Run `write` (every rank calls it; rank 0 writes a file). A full disk or an unwritable run directory there
        stops every rank with one sentence naming the newest checkpoint (exit 2), rather than a traceback on rank 0
        and a broken connection on the others."""
        error, result = None, None
        try:
            result = write()
        except OSError as e:
            found = disk_error(self.run, e, when)
            if not isinstance(found, CheckpointError):
                raise
            error = str(found)
        error = agree(self.topo, error)
        if error:
            raise CheckpointError(error)
        return result

    def write_expert_load(self):
        if self.topo.is_main and self._moe_counts is not None:
            plot_expert_load(self._moe_counts, self.run.expert_load,
                             f"{self.cfg.model.name} step {self.step}: tokens per expert / mean\n"
                             f"(last logging interval)")


def train(cfg) -> dict:
    return Trainer(cfg).fit()
