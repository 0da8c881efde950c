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
      exit_code            written by slurm/train.sbatch and launch/sweep.py after each attempt
      train.log            launch/sweep.py's per-run log

slurm/train.sbatch (a shell script) writes `exit_code` under the same name.
"""
from __future__ import annotations

import os


class RunDir:
    CONFIG, METRICS, CHECKPOINTS, SAMPLES = "config.yaml", "metrics.jsonl", "checkpoints", "samples"
    WANDB_ID, EXIT_CODE, EXPERT_LOAD, LOG = "wandb_id.txt", "exit_code", "expert_load.png", "train.log"

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

    def sample_grid(self, step: int) -> str:
        return os.path.join(self.samples, f"step_{step:08d}.png")

    def makedirs(self) -> "RunDir":
        os.makedirs(self.path, exist_ok=True)
        return self
