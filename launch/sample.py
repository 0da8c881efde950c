"""Write a class-conditional sample grid (one row per class, titled with the class names) from a run directory,
a checkpoint or an export; latent models are decoded through the VAE.

    python launch/sample.py --run runs/quickstart
    python launch/sample.py --ckpt runs/quickstart/checkpoints/step_00001500 --classes 0,3,7 --per-class 8 \
        --steps 50 --cfg-scale 3 --out grid.png
    python launch/sample.py --ckpt model.safetensors --out grid.png      # written by launch/export.py
    python launch/sample.py --run runs/in1k --vae /models/sd-vae-ft-ema --sampler ancestral --steps 250 \
        --cfg-scale 4 --guide-channels 3                                # DiT's sampling protocol
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
import os
import sys

from dit_scale.build import build
from dit_scale.checkpoint import find_latest, load_checkpoint, load_exported
from dit_scale.config import config_from_yaml_text
from dit_scale.diffusion.samplers import DEFAULT_SAMPLER
from dit_scale.errors import CheckpointError, ConfigError
from dit_scale.evaluation.shard_samples import ShardSet
from dit_scale.generation.captions import (CaptionTable, prompt_encoder, read_prompts, training_caption_path,
                                          write_prompt_grid)
from dit_scale.generation.sampling import write_class_grid
from dit_scale.generation.vae import data_manifest, image_decoder
from dit_scale.optim import resolve_precision
from dit_scale.parallel.topology import pick_device
from dit_scale.run_dir import RunDir


def parse_classes(text, num_classes: int):
    """--classes "0,3,7" as ids the model knows ([0, num_classes); an unconditional model: 0), or None (default)."""
    if not text:
        return None
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        raise ConfigError(f"--classes {text!r} must be comma-separated class ids, e.g. 0,3,7.") from None
    top = max(num_classes, 1)
    bad = [c for c in classes if not 0 <= c < top]
    if bad:
        known = f"0..{num_classes - 1}" if num_classes else "0 (the model is unconditional, model.num_classes=0)"
        raise ConfigError(f"--classes has {bad[0]}, which this model does not know: its classes are {known} "
                          f"(class {num_classes} is the null class guidance uses, not a class to sample).")
    return classes


def prompt_table(cfg, args, manifest, device) -> CaptionTable:
    """A text model's rows: --prompts encoded by the run's text encoder, else the first captions of the training
    shards (their stored features: no encoder needed)."""
    if args.prompts:
        return CaptionTable.from_prompts(read_prompts(args.prompts), prompt_encoder(cfg, args.text_encoder, manifest,
                                                                                    device))
    try:
        shards = ShardSet.open(training_caption_path(cfg), field="data.path")
        return CaptionTable.from_shards(shards, cfg.logging.max_sample_classes, "data.path")
    except ConfigError as e:
        raise ConfigError(f"This text model needs prompts: pass --prompts TEXT|FILE ... (the training shards' captions "
                          f"are not available: {e})") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (its latest checkpoint)")
    src.add_argument("--ckpt", help="checkpoint (step_* folder or step_*.pt file) or exported .safetensors file")
    p.add_argument("--out", help="output PNG (default: RUN/samples/grid_stepN.png)")
    p.add_argument("--classes", help="comma-separated class ids (default: the first logging.max_sample_classes)")
    p.add_argument("--per-class", "--per-prompt", dest="per_class", type=int, default=None,
                   help="samples per class (a text model: per prompt); default: logging.samples_per_class")
    p.add_argument("--prompts", nargs="+", default=None,
                   help="a text model's prompts: texts and/or files with one prompt per line")
    p.add_argument("--text-encoder", default=None, help="local T5 / CLIP text folder for the prompts (default: "
                                                        "model.text_encoder, else the shards' manifest's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: diffusion.sample_steps)")
    p.add_argument("--sampler", default=None, help="euler | heun (flow), ddim | ancestral (ddpm); default: "
                                                   "diffusion.sampler")
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--guide-channels", type=int, default=None,
                   help="guide only the first N channels (DiT: 3); default: all")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder (default: the shards' manifest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        path = args.ckpt or find_latest(args.run)
        if path is None:
            raise CheckpointError(f"Run directory '{args.run}' has no checkpoints/; train first or pass --ckpt.")
        state = load_exported(path) if path.endswith(".safetensors") else load_checkpoint(path)
        cfg = config_from_yaml_text(state["config"], f"the config stored in '{path}'")
        device = pick_device(args.device)
        decoder = image_decoder(cfg, args.vae, device)
        manifest, _ = data_manifest(cfg)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = cfg.model.conditioning == "text"
    try:
        classes = parse_classes(args.classes, cfg.model.num_classes) if not text else None
        table = prompt_table(cfg, args, manifest, device) if text else None
        if args.prompts and not text:
            raise ConfigError("--prompts needs a text model (model.conditioning=text); this one is class-conditional: "
                              "pass --classes instead.")
        if args.classes and text:
            raise ConfigError("--classes needs a class-conditional model; this one is a text model "
                              "(model.conditioning=text): pass --prompts instead.")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    built = build(cfg)
    model, objective = built.model, built.objective
    model.load_state_dict(state["weights"] if "weights" in state else state["model" if args.no_ema else "ema"])
    model.to(device).eval()
    per_class = args.per_class or cfg.logging.samples_per_class
    sampler = args.sampler or cfg.diffusion.sampler or DEFAULT_SAMPLER[cfg.diffusion.objective]
    steps = args.steps or cfg.diffusion.sample_steps
    scale = cfg.diffusion.cfg_scale if args.cfg_scale is None else args.cfg_scale
    step = int(state.get("step", 0))
    out = args.out or (os.path.splitext(path)[0] + "_grid.png" if "weights" in state else
                       os.path.join(RunDir(os.path.dirname(os.path.dirname(path))).samples,
                                    f"grid_step{step:08d}.png"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    title = f"{cfg.model.name} step {step} · {sampler} {steps} steps · cfg {scale:g}"
    try:
        with resolve_precision(cfg.train.precision, device).autocast():     # as the run trained
            if text:
                write_prompt_grid(model, objective, cfg, device, table, out, per_prompt=per_class, decoder=decoder,
                                  title=title, num_steps=steps, cfg_scale=scale, seed=args.seed, sampler=sampler,
                                  guide_channels=args.guide_channels)
            else:
                write_class_grid(model, objective, cfg, device, out, decoder=decoder, manifest=manifest,
                                 classes=classes, per_class=per_class, title=title, num_steps=steps, cfg_scale=scale,
                                 seed=args.seed, sampler=sampler, guide_channels=args.guide_channels)
    except ValueError as e:             # a sampler or step count that does not fit the objective
        print(f"error: {e}", file=sys.stderr)
        return 2
    if decoder is None:
        print("note: no VAE known for these latents (the shards' manifest is not here or names none); the grid "
              "shows latent channels 0-2. Pass --vae PATH to decode them.", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
