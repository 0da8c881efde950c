"""Write a class-conditional sample grid (one row per class) from a run directory, a checkpoint or an export.

    python launch/sample.py --run runs/quickstart
    python launch/sample.py --ckpt runs/quickstart/checkpoints/step_00001500 --classes 0,3,7 --per-class 8 \
        --steps 50 --cfg-scale 3 --out grid.png
    python launch/sample.py --ckpt model.safetensors --out grid.png      # written by launch/export.py

Uses the EMA weights unless --no-ema (an exported file holds one set: the one it was exported with). The model and
sampler settings come from the config stored in the checkpoint (an export: its safetensors metadata).
"""
import argparse
import os
import sys

import torch

from dit_scale.build import build
from dit_scale.checkpoint import CheckpointError, find_latest, load_checkpoint, load_exported
from dit_scale.config import ConfigError, config_from_yaml_text
from dit_scale.parallel.topology import pick_device
from dit_scale.run_dir import RunDir
from dit_scale.sampling import class_grid, save_grid


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (its latest checkpoint)")
    src.add_argument("--ckpt", help="checkpoint (step_* folder or step_*.pt file) or exported .safetensors file")
    p.add_argument("--out", help="output PNG (default: RUN/samples/grid_stepN.png)")
    p.add_argument("--classes", help="comma-separated class ids (default: the first logging.max_sample_classes)")
    p.add_argument("--per-class", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: diffusion.sample_steps)")
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        path = args.ckpt or find_latest(args.run)
        if path is None:
            raise CheckpointError(f"Run directory '{args.run}' has no checkpoints/; train first or pass --ckpt.")
        state = load_exported(path) if path.endswith(".safetensors") else load_checkpoint(path)
        cfg = config_from_yaml_text(state["config"])
        device = pick_device(args.device)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    built = build(cfg)
    model, objective = built.model, built.objective
    model.load_state_dict(state["weights"] if "weights" in state else state["model" if args.no_ema else "ema"])
    model.to(device).eval()
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    per_class = args.per_class or cfg.logging.samples_per_class
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        images = class_grid(model, objective, cfg, device, classes=classes, per_class=per_class,
                            num_steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed)
    out = args.out or (os.path.splitext(path)[0] + "_grid.png" if "weights" in state else
                       os.path.join(RunDir(os.path.dirname(os.path.dirname(path))).samples,
                                    f"grid_step{int(state['step']):08d}.png"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_grid(images, per_class, out, upscale=2)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
