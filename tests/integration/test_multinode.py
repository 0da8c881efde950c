"""Two "nodes" on one machine: torchrun --nnodes 2 with a localhost rendezvous (2 processes per node), and the
environment slurm/train.sbatch gives its tasks on 2 nodes × 1 task. Global ranks (not local ones) split the data,
expert-parallel groups span the nodes, every rank writes its own checkpoint pieces, and the run resumes."""
import os
import subprocess
import sys

import pytest

from dist_utils import free_port
from dit_scale.checkpoint import find_latest, load_checkpoint
from dit_scale.training.metrics import read_metrics
from tiny import ROOT, tiny_overrides, write_tiny_shards

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def _overrides(shards, run, ep, steps=4):
    return tiny_overrides(shards, run, **{"parallel.engine": "fsdp", "parallel.ep": ep, "train.steps": steps,
                                          "train.checkpoint_every": 2, "data.batch_size": 4, "logging.log_every": 2,
                                          "logging.samples_per_class": 1, "diffusion.sample_steps": 1,
                                          "train.resume": "auto"})


def _check_run(run, world):
    ckpt = find_latest(run)
    writers = sorted({name.split("_")[2] for name in os.listdir(ckpt) if name.endswith(".distcp")})
    assert writers == [str(r) for r in range(world)], os.listdir(ckpt)          # every rank wrote its pieces
    state = load_checkpoint(ckpt)
    assert [r["dp"] for r in state["per_rank"]] == [[rank, world] for rank in range(world)]   # global, not local
    for rank, r in enumerate(state["per_rank"]):            # each rank saved the partitions of the order it serves
        assert {p["partition"] % world for p in r["data"]["partition_states"]} == {rank}
    assert state["model"]["blocks.0.ffn.experts.w13"].shape[0] == 4                # all experts, global order
    return state


@pytest.mark.slow          # 4 processes; the two-node environment runs in the default tier below
def test_torchrun_two_nodes_of_two_processes(tmp_path):
    tiny_shards = write_tiny_shards(str(tmp_path / "shards"), samples_per_shard=24)     # 4 shards for 4 ranks
    run = str(tmp_path / "run")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                               "--rdzv_id", "two-nodes", os.path.join(ROOT, "launch", "train.py"), "--config",
                               QUICKSTART, *_overrides(tiny_shards, run, ep=4)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    _check_run(run, 4)                                    # EP=4: every expert group spans both nodes
    assert [r["step"] for r in read_metrics(run)] == [2, 4]


def test_slurm_environment_two_nodes_one_task_each(tiny_shards, tmp_path):
    """What srun gives each task of a 2-node job (slurm/train.sbatch exports RANK / LOCAL_RANK / WORLD_SIZE from
    these; without them the topology reads the SLURM variables itself, as here)."""
    run = str(tmp_path / "run")
    port = free_port()

    def task(procid, steps):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(procid), SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_NODEID=str(procid),
                   SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NUM_NODES="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", QUICKSTART,
                                 *_overrides(tiny_shards, run, ep=2, steps=steps)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    for steps in (2, 4):                                  # the second job resumes the first's checkpoint
        tasks = [task(r, steps) for r in range(2)]
        for t in tasks:
            _, err = t.communicate(timeout=600)
            assert t.returncode == 0, err[-3000:]
    state = _check_run(run, 2)                            # EP=2 over the two nodes: one expert half on each
    assert state["step"] == 4 and [r["step"] for r in read_metrics(run)] == [2, 4]
