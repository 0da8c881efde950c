"""Sparse vs dense: forward+backward time per step of the sparse model and of a dense model with the same *active*
parameters (same width and depth; its GELU FFN has as many parameters as the k routed + shared SwiGLU experts a
token visits), timed alternately step by step so both see the same machine state. `ratio` = sparse / dense, the
median over rounds of each round's ratio (`ratio_range`: its lowest and highest round; `--control`: the dense
step once more per round, and `control` its ratio to the dense one, the machine's own noise).

    python launch/bench.py model --model DiT-S/2-8E2A                 # CPU: batch 2, 256 tokens per image
    python launch/bench.py model --model DiT-XL/2-8E2A --batch 32     # GPU: bf16 autocast, reports MFU
"""
import json

from dit_scale.benchmarks.common import alternate_rounds, device_and_precision, header, medians, paired_ratio, \
    random_batch, training_step, with_control
from dit_scale.build import build_objective, model_args
from dit_scale.config import load_config
from dit_scale.errors import ConfigError
from dit_scale.models import DiT, ModelArgs
from dit_scale.models.flops import count_params, forward_macs
from dit_scale.training.loss import TrainingLoss
from dit_scale.training.metrics import peak_flops


def dense_twin(args: ModelArgs) -> ModelArgs:
    """Same DiT without experts; FFN hidden chosen so active parameters (and FLOPs) match the sparse model."""
    moe = args.moe
    swiglu_hidden = moe.top_k * moe.expert_hidden + moe.shared_hidden
    return args.replace(moe=None, mlp_ratio=1.5 * swiglu_hidden / args.hidden_size)   # 2·D·h = 3·D·swiglu_hidden


def run(args) -> dict:
    """`bench.py model`: the sparse model and its dense twin, timed alternately; prints and returns the JSON."""
    cfg = load_config(None, [f"model.name={args.model}", f"model.input_size={args.input_size}",
                             f"model.in_channels={args.in_channels}"] + args.overrides)
    device, precision = device_and_precision(args)
    sparse = model_args(cfg)
    if sparse.moe is None:
        raise ConfigError(f"--model {args.model} is dense; pass a sparse name such as DiT-S/2-8E2A.")
    variants = {"moe": sparse, "dense": dense_twin(sparse)}
    models = {k: DiT(a, init_seed=0).to(device).train() for k, a in variants.items()}
    if args.compile:
        for m in models.values():
            for block in m.blocks:
                block.compile()
    batch = args.batch or (32 if device.type == "cuda" else 2)
    data = random_batch(sparse, batch, device)
    objective = build_objective(cfg)
    steps = {k: training_step(models[k], TrainingLoss(objective, a, device), data, device, precision)
             for k, a in variants.items()}
    rounds = alternate_rounds(with_control(steps, "dense", args.control), device, args.warmup, args.steps)
    times = medians(rounds)

    peak = peak_flops(device, precision.bf16)
    result = header("model", args.model, device, precision, batch, args.steps)
    for k, a in variants.items():
        sec = times[k]
        sizes = count_params(models[k])
        result[k] = {"step_s": round(sec, 5), "images_per_s": round(batch / sec, 2),
                     "params": sizes["params"], "active_params": sizes["active_params"],
                     "gflops_fwd": round(forward_macs(a) / 1e9, 3)}
        if peak:
            result[k]["mfu"] = round(TrainingLoss(objective, a, device).flops_per_image(0) * batch / sec / peak, 4)
    result.update(paired_ratio(rounds, "moe", "dense"))
    if args.control:
        result["control"] = paired_ratio(rounds, "control", "dense")
    print(json.dumps(result))
    return result
