"""Does a conditional run draw what it is asked for? Train a small class probe on the run's training images and
score the EMA model's samples: the share classified as the class they were conditioned on, and the Fréchet distance
of their probe features to real images beside the real-vs-real distance at the same count. A captioned run is
conditioned on held-out real captions and also scored on the caption's place and size
(`dit_scale/evaluation/probe.py` says what is measured).

    python launch/probe.py runs/quickstart --shape                 # colour removed: the probe must see the shape
    python launch/probe.py runs/quickstart --shape --cfg-scale 1 --num-samples 1000
    python launch/probe.py runs/quickstart_text --shape --num-samples 300    # shape, place and size of captions

Prints one JSON object (and writes it to --out). Exit codes: 0 done; 2 an input error (no checkpoint, a model
that is not class- or caption-conditional, latent or too few shards), one sentence on stderr.
"""
import argparse
import json
import os
import sys

from dit_scale.cli import check_output_file, positive_int
from dit_scale.errors import CheckpointError, ConfigError, DataError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (its latest checkpoint) or a checkpoint (step_* folder or .pt)")
    p.add_argument("--num-samples", type=positive_int, default=400, help="samples drawn (balanced classes)")
    p.add_argument("--train-images", type=positive_int, default=4000, help="real images the probe trains on")
    p.add_argument("--shape", action="store_true", help="probe the colour-free view (the drawn shape)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance (default: the run's eval / diffusion)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the run's)")
    p.add_argument("--sampler", default=None, help="sampler (default: the run's)")
    p.add_argument("--sde-strength", type=float, default=None, help="sampler sde's strength (default: the run's)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="guide only for t in [LOW, HIGH] (t = 1: noise; default: the run's diffusion.guidance_low/high)")
    p.add_argument("--grid-shift", type=int, default=None,
                   help="move the patch grid by this many pixels between model evaluations (default: the run's "
                        "diffusion.grid_shift; 0: off)")
    p.add_argument("--data", default=None, help="pixel shards of the training images (default: data.path)")
    p.add_argument("--no-ema", action="store_true", help="the trained weights instead of the EMA")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)
    if args.num_samples < 2:                    # the parser has made both counts positive
        print("error: --num-samples must be at least 2.", file=sys.stderr)
        return 2
    try:
        check_output_file(args.out, "--out")
        from dit_scale.evaluation.probe import probe_run     # after the arguments: it imports torch
        from dit_scale.parallel.topology import pick_device
        report = probe_run(args.run, num_samples=args.num_samples, train_images=args.train_images,
                           cfg_scale=args.cfg_scale, steps=args.steps, sampler=args.sampler, data=args.data,
                           ema=not args.no_ema, shape=args.shape, device=pick_device(args.device),
                           sde_strength=args.sde_strength, guidance_interval=args.guidance_interval,
                           grid_shift=args.grid_shift)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
