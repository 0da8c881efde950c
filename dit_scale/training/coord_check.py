"""The μP coordinate check: does the size of each layer's activations stay put as the model gets wider?

    result = coord_check(config, overrides, widths=[64, 128, 256, 512], steps=4)
    write(result, widths, "docs/mup_coord_check.png")          # the PNG and the JSON next to it

For each width (heads grow with it at a fixed head dim, `dit_scale.config.width_overrides`) and for μP and standard
parameterisation, the model trains `steps` AdamW steps (the engines' parameter groups, `optim.build_optimizer`; the
trainer's loss, `dit_scale.training.loss.TrainingLoss`) on one fixed batch of the config's data; after each step t =
1..steps a forward pass records the mean |activation| of each layer type: patch embedding, attention output, FFN /
routed-expert output, router logits, model output, averaged over `num_seeds` seeds (init, data, noise). Under μP the
slope of log2 |activation| against log2 width stays near 0; under SP it grows. `launch/coord_check.py` is the command.
"""
import json
import math
import os

import torch
import torch.nn.functional as F

from dit_scale.build import build
from dit_scale.config import load_config, width_overrides
from dit_scale.data import build_loader
from dit_scale.errors import ConfigError
from dit_scale.models.moe import MoEFFN
from dit_scale.optim import build_optimizer
from dit_scale.training.loss import TrainingLoss

LAYER_TYPES = ("embedding", "attention", "ffn/experts", "router logits", "output")


def add_hooks(model, record: dict) -> list:
    """Forward hooks that append mean |activation| per layer type to `record[type]`."""
    def keep(kind, fn=lambda module, inputs, out: out):
        def hook(module, inputs, out):
            record.setdefault(kind, []).append(fn(module, inputs, out).detach().float().abs().mean().item())
        return hook

    hooks = [model.x_embedder.register_forward_hook(keep("embedding")),
             model.final_layer.register_forward_hook(keep("output"))]
    for block in model.blocks:
        hooks.append(block.attn.register_forward_hook(keep("attention")))
        if isinstance(block.ffn, MoEFFN):
            hooks.append(block.ffn.experts.register_forward_hook(keep("ffn/experts")))
            hooks.append(block.ffn.router.register_forward_hook(
                keep("router logits", lambda m, inputs, out: F.linear(inputs[0].float(), m.weight.float()))))
        else:
            hooks.append(block.ffn.register_forward_hook(keep("ffn/experts")))
    return hooks


# μP's own knobs (only valid with mup.enabled): the SP half of the check runs without them
MUP_ONLY = ["mup.output_mult=1.0", "mup.attn_scale=sqrt", "mup.zero_init_query=false"]


def width_config(config: str, overrides: list, width: int, mup: bool):
    """The config of one width and parametrisation: μP with the user's μP settings, SP without them."""
    base = load_config(config, overrides + MUP_ONLY)       # only its model's sizes are read
    return load_config(config, overrides + width_overrides(base.model, width)
                       + [f"mup.enabled={str(mup).lower()}", "optim.warmup_steps=0", "model.class_dropout=0",
                          "diffusion.cfg_scale=1", "eval.cfg_scale=null"]          # nothing is sampled; no null class
                       + ([] if mup else MUP_ONLY))


def coord_data(config: str, overrides: list, width: int, steps: int, mup: bool, seed: int = 0) -> list:
    """[{layer type: mean |activation|} after step t] for t = 1..steps, at one width."""
    cfg = width_config(config, overrides, width, mup)
    built = build(cfg, seed=seed)
    model = built.model
    optimizer = build_optimizer(cfg.optim, model, built.mup)
    loss_fn = TrainingLoss(built.objective, built.args, "cpu")
    batch = next(build_loader(cfg.data, dp_rank=0, dp_size=1, seed=seed))
    per_step = []
    for step in range(steps + 1):
        record = {}
        hooks = add_hooks(model, record) if step > 0 else []
        # the same t and noise at every step: one fixed batch, one fixed draw
        out = loss_fn(model, batch, step=0, generator=torch.Generator().manual_seed(seed))
        for h in hooks:
            h.remove()
        if step > 0:
            per_step.append({k: sum(v) / len(v) for k, v in record.items()})
        if step < steps:
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return per_step


def slope(widths, values) -> float:
    """Least-squares slope of log2(value) against log2(width)."""
    xs, ys = [math.log2(w) for w in widths], [math.log2(max(v, 1e-30)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def mean_over_seeds(runs: list) -> list:
    """[{layer type: value} per step] averaged over runs of different seeds."""
    return [{k: sum(run[t][k] for run in runs) / len(runs) for k in runs[0][t]} for t in range(len(runs[0]))]


def coord_check(config: str, overrides: list, widths: list, steps: int, seed: int = 0, num_seeds: int = 3) -> dict:
    """{"mup"|"sp": {"values": {width: [per step]}, "slopes": [{layer type: slope} per step]}}; each value is
    the mean over `num_seeds` seeds (init, data and noise), as microsoft's `mup.get_coord_data` averages them."""
    if len(set(widths)) < 2:
        raise ConfigError(f"--widths {','.join(map(str, widths))}: a slope against width needs at least two "
                          f"different widths, e.g. --widths 64,128,256.")
    for width in widths:                    # every config checked before anything trains
        for mup in (True, False):
            width_config(config, overrides, width, mup)
    result = {}
    seeds = range(seed, seed + num_seeds)
    for name, mup in (("mup", True), ("sp", False)):
        values = {w: mean_over_seeds([coord_data(config, overrides, w, steps, mup, s) for s in seeds])
                  for w in widths}
        slopes = [{k: slope(widths, [values[w][t][k] for w in widths]) for k in values[widths[0]][t]}
                  for t in range(steps)]
        result[name] = {"values": values, "slopes": slopes}
    return result


def plot(result: dict, widths: list, path: str) -> None:
    """One panel per step, μP on the top row and SP below: mean |activation| against width (log-log) per layer type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = len(result["mup"]["slopes"])
    fig, axes = plt.subplots(2, steps, figsize=(3.2 * steps, 6.4), squeeze=False, sharey=True)
    for row, name in enumerate(("mup", "sp")):
        for t in range(steps):
            ax = axes[row][t]
            for kind in LAYER_TYPES:
                if kind in result[name]["values"][widths[0]][t]:
                    ys = [result[name]["values"][w][t][kind] for w in widths]
                    ax.plot(widths, ys, "o-", label=f"{kind} ({result[name]['slopes'][t][kind]:+.2f})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'μP' if name == 'mup' else 'SP'}, step {t + 1}")
            ax.set_xlabel("width")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, title="layer (slope)", title_fontsize=6)
        axes[row][0].set_ylabel("mean |activation|")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, widths: list, path: str) -> None:
    """The PNG at `path` (`plot`) and the JSON next to it: the widths, the values and the slopes."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    plot(result, widths, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"widths": widths, **result}, f, indent=1)
