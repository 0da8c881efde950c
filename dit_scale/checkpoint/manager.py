"""`CheckpointManager`: the trainer's two calls, `load()` at the start of `fit` and `save(step)` after a step.

    checkpoints = CheckpointManager(cfg, run_dir, engine, topology, streams)
    step = checkpoints.load()           # train.resume: none | auto | PATH; the step to continue from (None: fresh)
    checkpoints.save(step)              # at train.checkpoint_every (no-op otherwise); final=True always saves
    checkpoints.wait()                  # until a background (async) save is published

Inside: the format (train.checkpoint_format), async saves (train.async_save), retention (train.keep_last /
keep_every), verification shared by the ranks (each hashes a share of a sharded checkpoint's files), fallback past
a damaged checkpoint to the previous one, and resharding (a checkpoint written by another number of processes:
weights, EMA and optimizer move; the per-rank streams restart, `streams.restart(step)`).

`engine` provides the model/EMA/optimizer state and the collectives; `streams` is this rank's stateful loader and
RNG streams (`state_dict`, `load_state_dict`, `restart(step)`), gathered from every rank into `per_rank`.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from dit_scale.checkpoint.consolidated import save_checkpoint
from dit_scale.checkpoint.load import load_checkpoint
from dit_scale.checkpoint.sharded import PendingSave, load_sharded, save_sharded
from dit_scale.checkpoint.storage import (CheckpointError, find_latest, is_run_dir, list_checkpoints,
                                          prune_checkpoints, verify_sharded)
from dit_scale.config import ConfigError, to_yaml
from dit_scale.run_dir import RunDir


class CheckpointManager:
    def __init__(self, cfg, run: RunDir, engine, topology, streams, log: Optional[Callable[[str], None]] = None):
        self.cfg, self.run, self.engine, self.topo, self.streams = cfg, run, engine, topology, streams
        self.log = log or (print if topology.is_main else (lambda _: None))
        self._pending: Optional[PendingSave] = None

    # ------------------------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------------------------

    def state_dict(self, step: int, sharded: bool = False) -> dict:
        """Every rank calls it (collective). `sharded`: tensors are DTensor views of each rank's pieces (for DCP)."""
        per_rank = self.engine.all_gather_object(self.streams.state_dict())
        return {"step": step, **self.engine.state_dict(sharded), "per_rank": per_rank, "config": to_yaml(self.cfg)}

    # ------------------------------------------------------------------------------------------------------------
    # Load
    # ------------------------------------------------------------------------------------------------------------

    def load(self) -> Optional[int]:
        """Restore the state train.resume names; returns the step to continue from (None: nothing was loaded).
        auto: the newest usable checkpoint of the run directory (a damaged one falls back to the previous, with
        one line); PATH: that checkpoint (a step_X folder or .pt file, or a run directory's newest)."""
        resume = self.cfg.train.resume
        if resume == "none":
            return None
        if resume == "auto":
            candidates = list_checkpoints(self.run.path, check=False)   # a truncated one is reported, not skipped
            if not candidates:
                return None   # auto-resume on a fresh run directory starts from scratch
        else:
            candidates = [find_latest(resume) or os.path.join(resume, RunDir.CHECKPOINTS)] \
                if is_run_dir(resume) else [resume]
        for i, path in enumerate(candidates):
            try:
                state = self._read(path)
                break
            except CheckpointError as e:
                if i + 1 == len(candidates):
                    raise CheckpointError(f"No usable checkpoint in '{self.run.checkpoints}': {e}"
                                          if resume == "auto" else str(e)) from None
                self.log(f"warning: {e} Falling back to the previous complete checkpoint "
                         f"'{os.path.basename(candidates[i + 1])}'.")
        try:
            self.engine.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"Checkpoint '{path}' does not fit this model ({str(e).splitlines()[0]}); "
                              f"resume with the config it was trained with.") from None
        step = int(state["step"])
        saved = state["per_rank"]
        if len(saved) == self.topo.world_size:
            self.streams.load_state_dict(saved[self.topo.rank])
        else:   # resharded: model, EMA and optimizer moved; per-rank streams cannot be split anew
            self.log(f"warning: checkpoint '{path}' was written by {len(saved)} process(es) and this run has "
                     f"{self.topo.world_size}: weights, EMA and optimizer state are resharded, but the data loader "
                     f"and RNG streams restart (shuffled with a seed derived from step {step}), so the data order "
                     f"differs from an uninterrupted run.")
            self.streams.restart(step)
        self.log(f"resumed from {path} at step {step}")
        return step

    def _read(self, path: str) -> dict:
        """The state of checkpoint `path`; a sharded one is verified by all ranks together (each hashes a share
        of the files) and read into this run's layout."""
        if not os.path.isdir(path):
            return load_checkpoint(path)
        error = verify_sharded(path, self.topo.rank, self.topo.world_size)
        errors = [e for e in self.engine.all_gather_object(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        return load_sharded(path, self.state_dict(0, sharded=True))

    # ------------------------------------------------------------------------------------------------------------
    # Save
    # ------------------------------------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """A periodic save falls on `step` (train.checkpoint_every; the final step is saved by `final=True`)."""
        t = self.cfg.train
        return bool(t.checkpoint_every) and step % t.checkpoint_every == 0 and step < t.steps

    def save(self, step: int, final: bool = False) -> str:
        """Every rank calls it (collective). Saves when `final` or a periodic save is due; returns the
        checkpoint's path on rank 0 ("" on the others and when nothing was saved); with train.async_save, the path
        it will have once its background write is published."""
        if not (final or self.due(step)):
            return ""
        t = self.cfg.train
        self.wait()
        if t.checkpoint_format == "consolidated":
            state = self.state_dict(step)
            if not self.topo.is_main:
                return ""
            path = save_checkpoint(self.run.path, step, state)
            self._prune(path)
            return path
        self._pending = save_sharded(
            self.run.path, step, self.state_dict(step, sharded=True), rank=self.topo.rank,
            barrier=self.engine.barrier, async_save=t.async_save,
            process_group=self.engine.checkpoint_group(t.async_save),
            on_published=self._prune if self.topo.is_main else None)
        return self._pending.path

    def wait(self) -> None:
        """Wait until a background (async) save is published; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    def _prune(self, _path: str) -> None:
        prune_checkpoints(self.run.path, self.cfg.train.keep_last, self.cfg.train.keep_every)
