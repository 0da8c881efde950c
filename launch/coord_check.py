"""Coordinate check: does the size of each layer's activations stay put as the model gets wider?

    python launch/coord_check.py --config configs/sweeps/mutransfer_train.yaml --widths 64,128,256,512 --steps 4 \
        --out docs/mup_coord_check.png

For each width (heads grow with it at a fixed head dim, `dit_scale.config.width_overrides`) and for μP and standard
parameterisation, the model trains `--steps` AdamW steps (the engines' parameter groups, `optim.build_optimizer`; the
trainer's loss, `dit_scale.training.loss.TrainingLoss`) on one fixed batch of the config's data; after each step t =
1..steps a forward pass records the mean |activation| of each layer type: patch embedding, attention output, FFN /
routed-expert output, router logits, model output, averaged
over `--seeds` seeds (init, data, noise). The PNG has
one panel per step, μP on the top row and SP below (log-log against width); the JSON next to it holds the values
and the slope of log2 |activation| against log2 width per layer type and step. Under μP the lines are flat (slope
near 0); under SP they grow with width. Runs on CPU in about a minute for the command above.
"""
import argparse
import sys

from dit_scale.cli import check_output_file, positive_int, positive_int_list
from dit_scale.errors import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--widths", type=positive_int_list, default="64,128,256,512")
    parser.add_argument("--steps", type=positive_int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds averaged per width (default 3)")
    parser.add_argument("--out", default="coord_check.png", help="PNG; the JSON goes next to it")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=0.01")
    args = parser.parse_args(argv)
    widths = args.widths
    from dit_scale.training.coord_check import coord_check, write     # after the arguments: it imports torch
    try:
        check_output_file(args.out, "--out")
        result = coord_check(args.config, list(args.overrides), widths, args.steps, args.seed, args.seeds)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write(result, widths, args.out)
    for name in ("mup", "sp"):
        for t, slopes in enumerate(result[name]["slopes"]):
            print(f"{name:3s} step {t + 1}: " + ", ".join(f"{k} {v:+.2f}" for k, v in slopes.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
