"""The run directory: one object owns the name of every file a run writes.

    run = RunDir("runs/quickstart")
    run.config, run.metrics, run.checkpoints, run.samples, run.wandb_id, run.exit_code, run.expert_load, run.log

    RUN_DIR/
      config.yaml          the resolved config (rank 0, at start)
      metrics.jsonl        one JSON object per logging step (rank 0)
      checkpoints/         step_XXXXXXXX/ (sharded) or step_XXXXXXXX.pt (consolidated), `latest` (dit_scale.checkpoint)
      samples/             step_XXXXXXXX.png sample grids
      expert_load.png      tokens per expert per layer (sparse models)
      wandb_id.txt         the wandb run id, so a resumed run continues the same wandb run
      exit_code            written by slurm/train.sbatch and a local sweep's task (dit_scale/sweep/) after each attempt
      train.log            a local sweep run's log
      .lock                held (flock) by the run's main process while it trains: one run per directory
      save_seconds.json    how long the last and the slowest checkpoint save took (the SLURM grace,
                           dit_scale/training/slurm.py)

slurm/train.sbatch (a shell script) writes `exit_code` under the same name.

A run directory is used by one run at a time (`lock`); a fresh run (train.resume=none) refuses a directory that
already holds a run (`check_usable`); a resumed run drops the metrics rows logged after the step it resumes from
(`truncate_metrics`), so every step appears once even after kill -9. The lock is an advisory flock: it holds on
local disks and on shared filesystems that support flock (Lustre, GPFS, NFSv4); where flock is a no-op, two jobs
must not share a run directory.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from typing import Optional

from dit_scale.errors import ConfigError


_HELD = {}   # run-directory lock file -> fd, for the life of this process (one process may open a run twice)


class RunDir:
    CONFIG, METRICS, CHECKPOINTS, SAMPLES = "config.yaml", "metrics.jsonl", "checkpoints", "samples"
    WANDB_ID, EXIT_CODE, EXPERT_LOAD, LOG, LOCK = "wandb_id.txt", "exit_code", "expert_load.png", "train.log", ".lock"
    SAVE_SECONDS = "save_seconds.json"

    def __init__(self, path: str):
        self.path = str(path)

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def __str__(self) -> str:
        return self.path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def config(self) -> str:
        return self.file(self.CONFIG)

    @property
    def metrics(self) -> str:
        return self.file(self.METRICS)

    @property
    def checkpoints(self) -> str:
        return self.file(self.CHECKPOINTS)

    @property
    def samples(self) -> str:
        return self.file(self.SAMPLES)

    @property
    def wandb_id(self) -> str:
        return self.file(self.WANDB_ID)

    @property
    def exit_code(self) -> str:
        return self.file(self.EXIT_CODE)

    @property
    def expert_load(self) -> str:
        return self.file(self.EXPERT_LOAD)

    @property
    def log(self) -> str:
        return self.file(self.LOG)

    def record_save_seconds(self, seconds: float) -> None:
        """Remember how long a checkpoint save took (until published): the last and the slowest."""
        old = self.save_seconds() or {}
        data = {"last": round(seconds, 2), "max": round(max(seconds, old.get("max", 0.0)), 2)}
        tmp = self.file(self.SAVE_SECONDS) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.file(self.SAVE_SECONDS))

    def save_seconds(self) -> Optional[dict]:
        """{"last", "max"} seconds of the checkpoint saves so far, or None."""
        try:
            with open(self.file(self.SAVE_SECONDS)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def sample_grid(self, step: int) -> str:
        return os.path.join(self.samples, f"step_{step:08d}.png")

    def makedirs(self) -> "RunDir":
        """Create the directory; a path that cannot be created or written is a ConfigError naming it."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.run_dir={self.path!r} cannot be created ({e.strerror}: {e.filename}); choose a "
                              f"writable directory.") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ConfigError(f"train.run_dir={self.path!r} is not writable by this user; choose a writable "
                              f"directory or fix its permissions.")
        return self

    def holds_run(self) -> bool:
        """Whether a run already wrote here: a checkpoint (published or not) or a metrics row."""
        folder = self.checkpoints
        if os.path.isdir(folder) and any(n.startswith("step_") for n in os.listdir(folder)):
            return True
        return os.path.isfile(self.metrics) and os.path.getsize(self.metrics) > 0

    def check_usable(self, resume: str) -> None:
        """ConfigError unless this directory can take the run: creatable and writable, and, for a fresh run
        (train.resume=none), not holding another run (which a fresh run would append to and move `latest` back)."""
        if resume == "none" and os.path.isdir(self.path) and self.holds_run():
            raise ConfigError(f"train.run_dir={self.path!r} already holds a run (checkpoints or metrics.jsonl); "
                              f"continue it with train.resume=auto, or choose another train.run_dir.")
        self.makedirs()

    def lock(self) -> Optional[str]:
        """Take the run directory's lock for the life of this process; returns why it cannot (another process holds
        it), or None. Call it on the one process that writes the run's shared files."""
        path = os.path.realpath(self.file(self.LOCK))
        if path in _HELD:
            return None
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            return (f"train.run_dir={self.path!r} is in use by process {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')} (it holds {path}); wait for that run to end or use another "
                    f"train.run_dir.")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        _HELD[path] = fd                                # held until the process exits (kill -9 included)
        return None

    def append_metrics(self):
        """metrics.jsonl opened for appending rows, after ending a last line that a kill cut mid-write (a row
        appended onto it would be lost with it)."""
        f = open(self.metrics, "a+b")
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.close()
        return open(self.metrics, "a")

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics rows logged after `step` (a run killed after its last save logged them; the resumed run
        logs those steps again). Atomic rewrite; nothing to do for a fresh file."""
        if not os.path.isfile(self.metrics):
            return
        with open(self.metrics) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except ValueError:          # a line cut by a kill mid-write
                continue
        if len(keep) == len(lines) and all(a == b for a, b in zip(keep, lines)):
            return
        tmp = self.metrics + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.metrics)
