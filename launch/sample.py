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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dit_scale.checkpoint import CheckpointError, find_latest, load_checkpoint  # noqa: E402
from dit_scale.config import ConfigError, config_from_yaml_text  # noqa: E402
from dit_scale.diffusion import build_objective  # noqa: E402
from dit_scale.models import build_model  # noqa: E402
from dit_scale.parallel.topology import pick_device  # noqa: E402
from dit_scale.sampling import class_grid, save_grid  # noqa: E402


def load_exported(path: str) -> dict:
    """{"weights", "config", "step"} from a launch/export.py file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise CheckpointError(f"Exported file '{path}' does not exist; check --ckpt.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(path)
    except Exception as e:
        raise CheckpointError(f"Exported file '{path}' cannot be read ({type(e).__name__}); it is truncated or "
                              f"not a safetensors file — export it again.") from None
    if "config" not in meta:
        raise CheckpointError(f"Exported file '{path}' has no 'config' metadata; export it with launch/export.py.")
    return {"weights": weights, "config": meta["config"], "step": int(meta.get("step", 0))}


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
    objective = build_objective(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
    model = build_model(cfg, objective.out_channels(cfg.model.in_channels))
    model.load_state_dict(state["weights"] if "weights" in state else state["model" if args.no_ema else "ema"])
    model.to(device).eval()
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    per_class = args.per_class or cfg.logging.samples_per_class
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        images = class_grid(model, objective, cfg, device, classes=classes, per_class=per_class,
                            num_steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed)
    out = args.out or (os.path.splitext(path)[0] + "_grid.png" if "weights" in state else
                       os.path.join(os.path.dirname(os.path.dirname(path)), "samples",
                                    f"grid_step{int(state['step']):08d}.png"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_grid(images, per_class, out, upscale=2)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
