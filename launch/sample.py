"""Write a class-conditional sample grid (one row per class, titled with the class names) from a run directory,
a checkpoint or an export; latent models are decoded through the VAE.

    python launch/sample.py --run runs/quickstart
    python launch/sample.py --ckpt runs/quickstart/checkpoints/step_00001500 --classes 0,3,7 --per-class 8 \
        --steps 50 --cfg-scale 3 --out grid.png
    python launch/sample.py --ckpt model.safetensors --out grid.png      # written by launch/export.py
    python launch/sample.py --run runs/in1k --vae /models/sd-vae-ft-ema --sampler ancestral --steps 250 \
        --cfg-scale 4 --guide-channels 3                                # DiT's sampling protocol
    python launch/sample.py --run runs/quickstart --sampler sde --sde-strength 2 --steps 16 \
        --guidance-interval 0.2 1 --cfg-scale 3                        # a setting launch/probe.py measured
    python launch/sample.py --run runs/quickstart_text --prompts "a small red circle in the top left" prompts.txt \
        --per-prompt 4                                                  # a text model: one row per prompt

A text model (model.conditioning=text) is conditioned on prompts: each --prompts argument is a prompt or a file with
one prompt per line. They are encoded by the run's local text encoder (--text-encoder, else model.text_encoder, else
the one the training shards' manifest names) at the training captions' length (model.text_len), and each grid row is
titled with its prompt. Without --prompts the grid shows the first captions of the training shards.

Uses the EMA weights unless --no-ema (an exported file holds one set: the one it was exported with). The model and
sampler settings come from the config stored in the checkpoint (an export: its safetensors metadata). Latents are
decoded with the VAE the training shards' manifest names (data.path of that config) or --vae PATH; without either,
the grid shows the first three latent channels and says so.
"""
import argparse
import sys

from dit_scale.cli import IMAGE_SUFFIXES, check_output_file, positive_int
from dit_scale.errors import CheckpointError, ConfigError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (its latest checkpoint)")
    src.add_argument("--ckpt", help="checkpoint (step_* folder or step_*.pt file) or exported .safetensors file")
    p.add_argument("--out", help="output PNG (default: RUN/samples/grid_stepN.png)")
    p.add_argument("--classes", help="comma-separated class ids (default: the first logging.max_sample_classes)")
    p.add_argument("--per-class", "--per-prompt", dest="per_class", type=positive_int, default=None,
                   help="samples per class (a text model: per prompt); default: logging.samples_per_class")
    p.add_argument("--prompts", nargs="+", default=None,
                   help="a text model's prompts: texts and/or files with one prompt per line")
    p.add_argument("--text-encoder", default=None, help="local T5 / CLIP text folder for the prompts (default: "
                                                        "model.text_encoder, else the shards' manifest's)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: diffusion.sample_steps)")
    p.add_argument("--sampler", default=None, help="euler | heun | sde (flow), ddim | ancestral (ddpm); default: "
                                                   "diffusion.sampler")
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--guide-channels", type=int, default=None,
                   help="guide only the first N channels (DiT: 3); default: all")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="guide only for t in [LOW, HIGH] (t = 1: noise; default: the run's diffusion.guidance_low/high)")
    p.add_argument("--sde-strength", type=float, default=None,
                   help="sampler sde's strength (default: the run's diffusion.sde_strength; 0: the Euler ODE)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder (default: the shards' manifest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--grid-shift", type=int, default=None,
                   help="move the patch grid by this many pixels between model evaluations (default: the run's "
                        "diffusion.grid_shift; 0: off)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        check_output_file(args.out, "--out", IMAGE_SUFFIXES)
        from dit_scale.evaluation.grid import sample_grid     # after the arguments: it imports torch
        out = sample_grid(run=args.run, ckpt=args.ckpt, out=args.out, classes=args.classes, per_class=args.per_class,
                          prompts=args.prompts, text_encoder=args.text_encoder, steps=args.steps,
                          sampler=args.sampler, cfg_scale=args.cfg_scale, guide_channels=args.guide_channels,
                          vae=args.vae, seed=args.seed, ema=not args.no_ema, device=args.device,
                          grid_shift=args.grid_shift, sde_strength=args.sde_strength,
                          guidance_interval=args.guidance_interval)
    except (CheckpointError, ConfigError) as e:     # a sampler the objective does not take is a ConfigError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
