# Environment of every process of a SLURM job; sourced by slurm/train.sbatch and the sweep job array.
# The one place for thread and NCCL settings. A value already exported in the submitting shell wins (sbatch passes
# the submitting environment into the job), so `NCCL_DEBUG=INFO python launch/submit.py ...` works.

# CPU threads per process: the CPUs SLURM gave each task (--cpus-per-task), else 1. Without this every rank starts
# one OpenMP thread per core of the node, and 8 ranks on one node slow each other down.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1                           # log lines appear in the job log as they are printed

# NCCL: a rank that fails makes the others raise instead of hanging in a collective until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}               # INFO prints the transports chosen (IB, NVLink, sockets)
# Cluster-specific; ask your admins or see the cluster docs, then set them here or in the submitting shell:
# export NCCL_SOCKET_IFNAME=ib0                     # interface for NCCL's bootstrap / socket traffic (not docker0/lo)
# export NCCL_IB_HCA=mlx5                           # which InfiniBand adapters NCCL may use
# export NCCL_IB_DISABLE=1                          # no InfiniBand on this cluster: use TCP sockets
