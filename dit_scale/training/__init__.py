"""Training a model: the loop and the pieces of a training run around it.

    trainer.py      the loop: data → training loss → engine step → metrics / grids / evaluation / checkpoints
    loss.py         the one training loss of a micro-batch (named terms) and its FLOPs: the trainer, the benchmarks
                    and the coordinate check all call it
    metrics.py      metrics.jsonl / wandb / a progress bar or plain lines, device-side interval sums, MFU peaks,
                    the expert-load plot
    preemption.py   signals and the wall-time guard → a flag the ranks agree on → save, exit 75 (130 on Ctrl-C)
    slurm.py        SLURM jobs of slurm/train.sbatch: USR1 grace, requeue on 75, wall-time guard (submit, sweeps)
    coord_check.py  μP's coordinate check: activation sizes per layer type against width, μP and SP

Below it lie the shared pieces it composes (build.py, optim.py, run_dir.py, models/, data/, parallel/,
checkpoint/, evaluation/); above it only the benchmarks, the sweeps and launch/.
"""
