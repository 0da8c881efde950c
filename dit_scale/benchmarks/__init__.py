"""Benchmarks and the GPU check: each measures something side by side in one run and returns (and prints) JSON.
`launch/bench.py SUBCOMMAND` and `launch/gpu_check.py` are the commands; each `run(args)` takes their flags.

    common.py         device and precision, a random batch, one training step, alternating timing, worker processes
    model.py          `model`: the sparse model vs its dense twin (same active parameters)
    moe_parallel.py   `moe-parallel`: one MoE layer with EP=procs vs EP=1, and the all-to-all share
    align.py          `masking` and `align`: patch masking / REPA on cached features vs the plain step
    data.py           `data`: the loader's samples/s vs training's
    checkpoint.py     `checkpoint`: sharded (sync / async) vs consolidated save and load
    memory.py         `memory`: per-rank peak memory, 1 process vs 2
    parallel.py       `parallel`: tp2 / cp2 / ep2 on 2 processes vs 1, and the collectives' share
    attention.py      each model.attention kernel's forward + backward on a model's attention shape (GPU check)
    gpu_check.py      the GPU check: gpu tests, batch sweeps with MFU and host syncs, profiles, in a time budget
    profiling.py      a torch.profiler run summarised: time shares by kind of kernel, idle gaps, top kernels
"""
