"""Hyperparameter sweeps × widths (μTransfer): expand a sweep file into runs, run them locally or as one SLURM job
array, aggregate their final losses. `launch/sweep.py` is the command.

    spec.py        the sweep file (SweepConfig, its slurm: block), grid / random points × widths → runs
    run.py         the runs: one after another or k at a time here, or one job array of slurm/train.sbatch tasks
    aggregate.py   final smoothed loss per run, tables, the μTransfer plot, the best point moved to a target width
"""
from dit_scale.sweep.aggregate import aggregate, best_by_width, collect, final_loss, markdown, transferred_config
from dit_scale.sweep.run import finished, run_local, run_sweep, sbatch_script, task
from dit_scale.sweep.spec import SlurmConfig, SweepConfig, expand, load_sweep, points, run_name, sample_value

__all__ = ["SlurmConfig", "SweepConfig", "aggregate", "best_by_width", "collect", "expand", "final_loss", "finished",
           "load_sweep", "markdown", "points", "run_local", "run_name", "run_sweep", "sample_value", "sbatch_script",
           "task", "transferred_config"]
