"""Elastic determinism: one training trajectory whatever the layout. With the same global batch (8 images in
micro-batches of 2) and train.deterministic=true, a run on 1, 2 or 4 processes (FSDP, FSDP + EP 2, DeepSpeed ZeRO-2
+ EP 2, tp 2, cp 2, with gradient accumulation making up the rest) logs the same loss at every step, and a run stopped
on 2 processes and resumed on 1 or 4 logs the uninterrupted run's losses at every later step. What makes it so: the
global sample order (data/stream.py), each sample's own draws (training/loss.py) and micro-batches grouped by global
position (data/loader.py split_rows). The reference is the single-process run; the tolerance covers reduction order
only.
The 2-process FSDP cases run in the default suite, the others in CI's second stage."""
import pytest

from dist_utils import run_distributed
from tiny import tiny_overrides, write_tiny_shards
from dit_scale.config import ConfigError, load_config
from dit_scale.training.metrics import read_metrics
from dit_scale.training.trainer import Trainer

GLOBAL_BATCH, MICRO = 8, 2
STEPS, STOP = 4, 2
LAYOUTS = {             # name: (processes, data-parallel size, overrides)
    "local": (1, 1, {"parallel.engine": "local"}),
    "fsdp": (2, 2, {"parallel.engine": "fsdp"}),
    "fsdp-ep2": (2, 2, {"parallel.engine": "fsdp", "parallel.ep": 2}),
    "deepspeed-ep2": (2, 2, {"parallel.engine": "deepspeed", "parallel.ep": 2}),
    "fsdp-tp2": (2, 1, {"parallel.engine": "fsdp", "parallel.tp": 2}),
    "fsdp-cp2": (2, 1, {"parallel.engine": "fsdp", "parallel.cp": 2}),
    "fsdp4-ep2": (4, 4, {"parallel.engine": "fsdp", "parallel.ep": 2}),
}


def _cfg(shards, run, layout, **extra):
    _, dp, overrides = LAYOUTS[layout]
    return load_config(None, tiny_overrides(shards, run, **{
        **overrides, "data.batch_size": MICRO, "train.grad_accum": GLOBAL_BATCH // (MICRO * dp),
        "data.partitions": 4, "data.hflip": True, "data.shuffle_buffer": 16, "mask.ratio": 0.5,
        "moe.aux_loss_coeff": 0.01, "logging.log_every": 1, "optim.schedule": "constant",
        "diffusion.sample_steps": 1, "logging.samples_per_class": 1, "train.steps": STEPS, **extra}))


def _train(rank, world, shards, run, layout, extra):
    Trainer(_cfg(shards, run, layout, **extra)).fit()


def _run(shards, run, layout, **extra):
    """Train in `layout`; {step: metrics row} of the run directory."""
    world = LAYOUTS[layout][0]
    if world == 1:
        _train(0, 1, shards, run, layout, extra)
    else:
        run_distributed(_train, world, shards, run, layout, extra)
    return {row["step"]: row for row in read_metrics(run)}


def _same_losses(got: dict, want: dict, steps) -> None:
    for step in steps:
        for key in ("loss", "loss_denoise", "loss_moe"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-8), (step, key)
        assert got[step]["data_position"] == want[step]["data_position"] == step * GLOBAL_BATCH
        assert got[step]["global_batch"] == GLOBAL_BATCH


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """96 images in 4 shards (a manifest: the partitions are equal ranges of each epoch)."""
    return write_tiny_shards(str(tmp_path_factory.mktemp("elastic") / "shards"), samples_per_shard=24)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The single-process run: 4 micro-batches of 2 accumulated per step."""
    return _run(shards, str(tmp_path_factory.mktemp("reference") / "run"), "local")


@pytest.mark.parametrize("layout", [
    "fsdp", "fsdp-ep2",
    pytest.param("deepspeed-ep2", marks=pytest.mark.slow),
    pytest.param("fsdp-tp2", marks=pytest.mark.slow),
    pytest.param("fsdp-cp2", marks=pytest.mark.slow),
    pytest.param("fsdp4-ep2", marks=pytest.mark.slow),
])
def test_every_layout_trains_the_single_process_trajectory(shards, reference, tmp_path, layout):
    got = _run(shards, str(tmp_path / "run"), layout)
    assert sorted(got) == sorted(reference) == list(range(1, STEPS + 1))
    _same_losses(got, reference, range(1, STEPS + 1))


@pytest.mark.parametrize("after", ["local", pytest.param("fsdp4-ep2", marks=pytest.mark.slow)])
def test_a_run_stopped_on_two_processes_resumes_exactly_on_another_count(shards, reference, tmp_path, after, capfd):
    run = str(tmp_path / "run")
    _run(shards, run, "fsdp-ep2", **{"train.steps": STOP})
    resumed = _run(shards, run, after, **{"train.resume": "auto"})
    assert "the data order continues where it stopped" in capfd.readouterr().out
    _same_losses(resumed, reference, range(STOP + 1, STEPS + 1))


def test_a_changed_global_batch_continues_the_sample_order_and_says_so(shards, reference, tmp_path, capfd):
    run = str(tmp_path / "run")
    _run(shards, run, "local", **{"train.steps": STOP})
    capfd.readouterr()
    rows = _run(shards, run, "local", **{"train.resume": "auto", "train.grad_accum": 2})
    out = capfd.readouterr().out
    assert "the global batch changes from 8 to 4 images" in out
    assert [rows[s]["data_position"] for s in (STOP + 1, STEPS)] == [STOP * 8 + 4, STOP * 8 + 8]


def test_partitions_that_the_data_parallel_size_does_not_divide_are_refused(shards, tmp_path):
    errors = run_distributed(_config_error, 2, shards, str(tmp_path / "run"))
    assert errors[0] == errors[1] and errors[0].startswith("data.partitions=3 is not a multiple of the data-parallel "
                                                           "size 2, so the ranks cannot split the global sample order")


def _config_error(rank, world, shards, run):
    try:
        Trainer(_cfg(shards, run, "fsdp", **{"data.partitions": 3}))
    except ConfigError as e:
        return str(e)
    return None
