"""`torchrun --nproc_per_node 2 launch/train.py ... parallel.engine=fsdp|deepspeed parallel.ep=2` on CPU/gloo: it trains,
its consolidated checkpoint samples in a single process, and bad layouts fail on every rank without hanging."""
import os
import subprocess
import sys

import pytest

from tiny import ROOT, tiny_overrides
from dist_utils import free_port
from dit_scale.checkpoint import load_checkpoint
from dit_scale.training.metrics import read_metrics


def torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "launch", "train.py"), "--config",
           os.path.join(ROOT, "configs", "quickstart.yaml"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


# DeepSpeed with EP trains, samples and resumes in the default tier too (test_bf16.py); these launches take a minute
@pytest.mark.parametrize("engine", ["fsdp", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_expert_parallel_run(tiny_shards, tmp_path, engine):
    run = str(tmp_path / "run")
    proc = torchrun(*tiny_overrides(tiny_shards, run, **{"parallel.engine": engine, "parallel.ep": 2,
                                                         "train.steps": 10, "data.batch_size": 8}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [5, 10]
    state = load_checkpoint(run)
    assert state["model"]["blocks.0.ffn.experts.w13"].shape[0] == 4          # all experts, global order
    out = str(tmp_path / "grid.png")
    sample = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sample.py"), "--run", run, "--out", out,
                             "--per-class", "1", "--steps", "2"], cwd=ROOT, capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr[-2000:]


def each_rank_by_hand(*args, timeout=120):
    """Start the 2 ranks directly (torchrun would kill the slower rank as soon as the first one fails), so each rank
    must report an error and exit on its own; returns [(returncode, stderr)] per rank."""
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
           os.path.join(ROOT, "configs", "quickstart.yaml"), *args]
    port = str(free_port())
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                                       WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank in range(2)]
    errs = [proc.communicate(timeout=timeout)[1] for proc in procs]
    return [(proc.returncode, err) for proc, err in zip(procs, errs)]


def test_bad_layout_fails_on_every_rank(tiny_shards, tmp_path):
    for code, err in each_rank_by_hand(*tiny_overrides(tiny_shards, str(tmp_path / "bad"),
                                                       **{"parallel.engine": "fsdp", "parallel.ep": 4})):
        assert code == 2, err[-2000:]
        assert err.count("error: parallel.ep=4 must divide the number of processes (WORLD_SIZE=2).") == 1


def test_config_differing_between_ranks_is_an_error(tiny_shards, tmp_path):
    overrides = tiny_overrides(tiny_shards, str(tmp_path / "r"), **{"parallel.engine": "fsdp"})
    overrides.append("logging.wandb_project=p${oc.env:RANK}")              # resolves differently per rank
    for code, err in each_rank_by_hand(*overrides):
        assert code == 2, err[-2000:]
        assert err.count("error: The resolved config differs between ranks (ranks [1] differ from rank 0)") == 1


@pytest.mark.parametrize("engine", ["fsdp", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_resume_continues_exactly(tiny_shards, tmp_path, engine):
    def run(dir_, **extra):
        proc = torchrun(*tiny_overrides(tiny_shards, str(dir_), **{
            "parallel.engine": engine, "parallel.ep": 2, "data.batch_size": 8, "logging.log_every": 1,
            "train.steps": 6, "optim.schedule": "constant", **extra}))  # cosine would depend on train.steps
        assert proc.returncode == 0, proc.stderr[-2000:]
        return {r["step"]: r["loss"] for r in read_metrics(str(dir_))}

    full = run(tmp_path / "full")
    run(tmp_path / "part", **{"train.steps": 3})
    resumed = run(tmp_path / "part", **{"train.resume": "auto"})
    assert resumed == full and len(full) == 6


def test_a_sharding_engine_runs_in_one_process_without_torchrun(tiny_shards, tmp_path):
    """`python launch/train.py ... parallel.engine=fsdp` (no torchrun, so no rendezvous address): one process with an
    in-process store, the local engine's losses (it ended in torch's MASTER_ADDR traceback)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    losses = {}
    for engine in ("local", "fsdp"):
        run = str(tmp_path / engine)
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
                               os.path.join(ROOT, "configs", "quickstart.yaml"),
                               *tiny_overrides(tiny_shards, run, **{"parallel.engine": engine, "train.steps": 3,
                                                                    "logging.log_every": 1,
                                                                    "train.deterministic": True})],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        losses[engine] = [r["loss"] for r in read_metrics(run)]
    assert losses["fsdp"] == pytest.approx(losses["local"], rel=1e-5)
