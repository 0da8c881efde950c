"""`CheckpointManager`: the trainer's two calls, `load()` at the start of `fit` and `save(step)` after a step.

    checkpoints = CheckpointManager(cfg, run_dir, engine, topology, streams)
    step = checkpoints.load()           # train.resume: none | auto | PATH; the step to continue from (None: fresh)
    checkpoints.save(step)              # at train.checkpoint_every (no-op otherwise); final=True always saves
    checkpoints.wait()                  # until a background (async) save is published

Inside: the format (train.checkpoint_format), async saves (train.async_save), retention (train.keep_last /
keep_every), verification shared by the ranks (each hashes a share of a sharded checkpoint's files), fallback past
a damaged checkpoint to the previous one, and resharding (a checkpoint written by another number of processes:
weights, EMA and optimizer move; the data order, global, continues: `streams.resume(per_rank, step)`).

Resuming with a changed config prints every difference. Hyperparameters apply (peak LR, schedule length and shape,
weight decay, betas, eps, clipping, loss weights: the optimizer's moments and step stay as saved); a change that
alters the model's parameters (depth, width, experts, heads of the alignment losses, ...) is refused in one
sentence. A save never writes non-finite weights, nor weights of a non-finite streak (`health()` names why not): the
previous checkpoint stays the newest. A full disk or quota, or a checkpoint folder that cannot be written, is one
sentence naming it (`disk_error`).

`engine` provides the model/EMA/optimizer state and the collectives; `streams` is this rank's stateful loader and
RNG streams (`state_dict`, `resume(per_rank, step)`), gathered from every rank into `per_rank`.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from typing import Callable, Optional

from torch.distributed.checkpoint.api import CheckpointException

from dit_scale.build import meta_model, model_args
from dit_scale.checkpoint.consolidated import save_checkpoint
from dit_scale.checkpoint.load import load_checkpoint
from dit_scale.checkpoint.sharded import PendingSave, load_extra, load_sharded, save_sharded
from dit_scale.checkpoint.storage import find_latest, is_run_dir, list_checkpoints, prune_checkpoints, verify_sharded
from dit_scale.config import config_from_yaml_text, parse_stored_config, to_yaml
from dit_scale.config.diff import config_changes, describe
from dit_scale.errors import CheckpointError, ConfigError
from dit_scale.optim import hyperparameters, restore_hyperparameters
from dit_scale.run_dir import RunDir

MODEL_SECTIONS = ("model.", "moe.", "mask.", "align.", "mup.")
# what the weights compute, besides their shapes: a resume that changes one would read the trained weights as
# another function (the same shapes under other heads, scales or routing); the rest (attention kernel, dropout, top-k,
# the balancing losses, the expert implementation) may change
FUNCTION_FIELDS = ("num_heads", "qk_norm", "attn_scale", "output_mult", "conditioning")
MOE_FUNCTION_FIELDS = ("router", "score_function", "normalize_topk", "expert_act")


def _model_identity(cfg) -> tuple:
    """The parameter shapes and the function-defining arguments of `cfg`'s model, and its μP parametrisation (which
    sets the per-group learning rates the optimizer state belongs to)."""
    args = model_args(cfg)
    shapes = {n: tuple(p.shape) for n, p in meta_model(args).named_parameters()}
    function = tuple(getattr(args, f) for f in FUNCTION_FIELDS)
    moe = tuple(getattr(args.moe, f) for f in MOE_FUNCTION_FIELDS) if args.moe else None
    mup = (bool(cfg.mup.enabled), int(cfg.mup.base_width) if cfg.mup.enabled else None)
    return shapes, function, moe, mup


class CheckpointManager:
    def __init__(self, cfg, run: RunDir, engine, topology, streams, log: Optional[Callable[[str], None]] = None,
                 health: Optional[Callable[[], Optional[str]]] = None):
        """`health()`: why the current weights must not be saved (e.g. a non-finite streak), or None."""
        self.cfg, self.run, self.engine, self.topo, self.streams = cfg, run, engine, topology, streams
        self.log = log or (print if topology.is_main else (lambda _: None))
        self.health = health
        self._pending: Optional[PendingSave] = None
        self.refused: Optional[tuple] = None      # (step, why) of the last save refused for the weights' health

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
        elif not os.path.exists(resume):
            raise CheckpointError(f"train.resume='{resume}' does not exist; pass a run directory, a step_* checkpoint "
                                  f"folder or a step_*.pt file, or train.resume=auto (this run's own checkpoints).")
        elif is_run_dir(resume):
            latest = find_latest(resume)
            if latest is None:
                raise CheckpointError(f"train.resume='{resume}' holds no complete checkpoint (a run directory whose "
                                      f"saves never finished, or not a run directory); pass a step_* checkpoint, "
                                      f"or train.resume=none to start afresh.")
            candidates = [latest]
        else:
            candidates = [resume]
        configured = hyperparameters(self.engine.optimizer)
        for i, path in enumerate(candidates):
            try:
                state = self._read(path)
                self._load_weights(path, state)
                break
            except CheckpointError as e:
                if i + 1 == len(candidates):
                    raise CheckpointError(f"No usable checkpoint in '{self.run.checkpoints}': {e}"
                                          if resume == "auto" else str(e)) from None
                self.log(f"warning: {e} Falling back to the previous complete checkpoint "
                         f"'{os.path.basename(candidates[i + 1])}'.")
        restore_hyperparameters(self.engine.optimizer, self.engine.scheduler, configured)
        step = int(state["step"])
        saved = state["per_rank"]
        if len(saved) != self.topo.world_size:
            self.log(f"checkpoint '{path}' was written by {len(saved)} process(es) and this run has "
                     f"{self.topo.world_size} (data-parallel size {self.topo.dp_size}): weights, EMA and optimizer "
                     f"state are resharded; the data order continues where it stopped.")
        for note in self.streams.resume(saved, step):
            self.log(f"warning: {note}.")
        self.log(f"resumed from {path} at step {step}")
        return step

    def _load_weights(self, path: str, state: dict) -> None:
        """Load model, EMA and optimizer state into the engine (collective); ConfigError if they do not fit this
        model, CheckpointError naming the checkpoint if a weight or EMA weight is not finite (a damaged save)."""
        try:
            self.engine.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"Checkpoint '{path}' does not fit this model ({str(e).splitlines()[0]}); "
                              f"resume with the config it was trained with.") from None
        if not self.engine.all_finite():
            raise CheckpointError(f"Checkpoint '{path}' holds weights that are not finite (NaN or Inf in the model or "
                                  f"its EMA); use an earlier checkpoint.")

    def _read(self, path: str) -> dict:
        """The state of checkpoint `path`; a sharded one is verified by all ranks together (each hashes a share
        of the files), its config compared with this run's, and read into this run's layout."""
        if not os.path.isdir(path):
            state = load_checkpoint(path)
            self._compare_configs(path, state["config"])
            return state
        error = verify_sharded(path, self.topo.rank, self.topo.world_size)
        errors = [e for e in self.engine.all_gather_object(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        self._compare_configs(path, load_extra(path).get("config"))
        return load_sharded(path, self.state_dict(0, sharded=True))

    def _compare_configs(self, path: str, saved_text: Optional[str]) -> None:
        """Print what changed against the checkpoint's config; refuse changes of the model's parameters. Stored text
        that is no config at all (a YAML tag, a list) makes the checkpoint unusable (CheckpointError naming it)."""
        if not saved_text:
            return
        origin = f"the config stored in checkpoint '{path}'"
        try:
            parse_stored_config(saved_text, origin)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        try:
            saved = config_from_yaml_text(saved_text, origin)
        except ConfigError:
            return                # written by another version: the tensor load itself says whether it fits
        changes = config_changes(saved, self.cfg)
        if not changes:
            return
        self.log(f"config changes on resume from '{os.path.basename(path)}': {describe(changes)}")
        if _model_identity(saved) != _model_identity(self.cfg):
            model_changes = [c for c in changes if c[0].startswith(MODEL_SECTIONS)]
            raise ConfigError(f"Checkpoint '{path}' does not fit this model: {describe(model_changes)} cannot change "
                              f"on resume (it changes the model's parameters or what they compute); resume with the "
                              f"config it was trained with.")

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
        reason = self.health() if self.health else None
        if reason is None and not self.engine.all_finite():
            reason = "some weights are not finite"
        if reason:
            self.refused = (step, reason)
            latest = find_latest(self.run.path)
            self.log(f"warning: not saving step {step}: {reason}; the newest checkpoint stays "
                     f"{os.path.basename(latest) if latest else '(none yet)'}.")
            return ""
        self.wait()                         # the previous background save first: its error names its own step
        try:
            return self._save(step)
        except (OSError, RuntimeError, CheckpointException) as e:
            raise disk_error(self.run, e, f"while saving step {step}") from None

    def _save(self, step: int) -> str:
        t = self.cfg.train
        start = time.monotonic()
        if t.checkpoint_format == "consolidated":
            state = self.state_dict(step)
            if not self.topo.is_main:
                return ""
            path = save_checkpoint(self.run.path, step, state)
            self._published(start, path)
            return path

        def published(path):
            self._published(start, path)
        self._pending_step = step
        self._pending = save_sharded(
            self.run.path, step, self.state_dict(step, sharded=True), rank=self.topo.rank,
            barrier=self.engine.barrier, async_save=t.async_save,
            process_group=self.engine.checkpoint_group(t.async_save),
            on_published=published if self.topo.is_main else None)
        return self._pending.path

    def _published(self, start: float, path: str) -> None:
        """Rank 0, once a checkpoint is published: retention, and how long the save took (SLURM's grace period)."""
        self.run.record_save_seconds(time.monotonic() - start)
        self._prune(path)

    def wait(self) -> None:
        """Wait until a background (async) save is published; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.wait()
            except (OSError, RuntimeError, CheckpointException) as e:
                raise disk_error(self.run, e, f"while saving step {self._pending_step}") from None

    def _prune(self, _path: str) -> None:
        prune_checkpoints(self.run.path, self.cfg.train.keep_last, self.cfg.train.keep_every)


FULL = (errno.ENOSPC, errno.EDQUOT)                 # the disk or the quota is full
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)   # a read-only mount, permissions


def _write_errno(error: BaseException) -> Optional[int]:
    """The errno of a failed write (DCP's CheckpointException holds the ranks' errors as text), or None."""
    code = getattr(error, "errno", None)
    if code in FULL + NOT_WRITABLE:
        return code
    return next((c for c in FULL + NOT_WRITABLE if os.strerror(c) in str(error)), None)


def disk_error(run: RunDir, error: BaseException, when: str) -> BaseException:
    """A full disk or quota, or a checkpoint folder that cannot be written (read-only, permissions), as one
    sentence naming the folder and the newest complete checkpoint (nothing trained before it is lost); any other
    error as it was. `when`: what was being written, e.g. "while saving step 4"."""
    code = _write_errno(error)
    latest = find_latest(run.path) or "(none)"
    partial = sorted(n for n in os.listdir(run.checkpoints) if n.endswith(".tmp")) \
        if os.path.isdir(run.checkpoints) else []
    if partial:                                     # the failed save's part stays until the next save publishes
        latest += f" (the unfinished {partial[-1]} in that folder can be deleted to free its space)"
    if code in NOT_WRITABLE:
        return CheckpointError(f"Cannot write to {run.checkpoints} ({os.strerror(code)}) {when}; make it writable or "
                               f"move train.run_dir — the newest complete checkpoint is {latest}.")
    free = shutil.disk_usage(run.path).free
    # torch.save's zip writer reports a failed write as "unexpected pos": a nearly full disk says what it was
    if code not in FULL and free >= 64 * 2 ** 20:
        return error
    return CheckpointError(f"No space left on the disk holding {run.checkpoints} ({free / 2 ** 30:.1f} GiB free) "
                           f"{when}; free space or move train.run_dir — the newest complete checkpoint is {latest}.")
