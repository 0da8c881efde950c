"""Evaluate a checkpoint: sample N images over all processes, decode them, report FID, sFID, Inception Score and
precision/recall as JSON (stdout) and as a row of the run's metrics.jsonl.

    python launch/evaluate.py --run-dir runs/quickstart --num-samples 5000 --ref shards:data/synthetic \
        --inception /models/weights-inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node 8 launch/evaluate.py --run-dir runs/in1k --num-samples 50000 \
        --ref /data/VIRTUAL_imagenet256_labeled.npz --inception /models/weights-inception-2015-12-05-6726825d.pth \
        --sampler ancestral --steps 250 --cfg-scale 1.5 --guide-channels 3        # DiT's FID-50K protocol
    torchrun --nproc_per_node 8 launch/evaluate.py --run-dir runs/in1k --num-samples 50000 --no-scores \
        --npz samples/in1k_50k.npz --sampler ancestral --steps 250 --cfg-scale 1.5 --guide-channels 3
                                                        # only the images, for ADM's evaluator (arr_0, arr_1)

--dinov2 DIR (a local transformers DINOv2 folder) adds FD-DINOv2 against the same --ref (its DINOv2 statistics are
computed once and cached like the Inception ones); --npz PATH also writes the N images (sample i at row i) as ADM's
evaluator reads them, gathered from every process; --no-scores writes only those.

Defaults come from the checkpoint's config: eval.* (num samples eval.fid_samples, eval.ref, eval.inception, sampler,
steps, cfg scale, guide channels, seed), which default to diffusion.*. EMA weights unless --no-ema. Sample i has class
i mod num_classes (a text model: the caption of held-out sample i mod M, from --captions / eval.captions / the
shards:PATH of --ref / eval.val_path; give the same shards as the reference for a caption-conditioned FID) and its
own noise seed (seed, i), so 1 and N processes draw the same images and report the same statistics. Latents are
decoded with the VAE the shards' manifest names, or --vae. A shards:PATH reference is
computed once over all processes and cached next to the shards (inception_ref_<weights>_<N>.npz, or --ref-cache).
Under torchrun / srun each process uses one GPU (NCCL) or, without GPUs, gloo on CPU.

Exit codes: 0 done; 2 an input error (missing file, bad checkpoint or reference), one sentence on stderr.
"""
import argparse
import json
import os
import sys
import time

import torch
from omegaconf import OmegaConf

from dit_scale.build import build
from dit_scale.captions import eval_conditions
from dit_scale.checkpoint import CheckpointError, load_checkpoint, load_exported
from dit_scale.checkpoint.load import resolve_path
from dit_scale.config import ConfigError, config_from_yaml_text, to_yaml
from dit_scale.data import DataError
from dit_scale.evaluation.dinov2 import CombinedFeatures, folder_fingerprint, load_dinov2
from dit_scale.evaluation.evaluator import evaluate_samples, export_samples, log_result, metrics_row
from dit_scale.evaluation.export import SampleWriter
from dit_scale.evaluation.generate import SamplingSpec
from dit_scale.evaluation.inception import load_inception, weights_fingerprint
from dit_scale.evaluation.reference import FeatureExtractor, load_dino_reference, load_reference
from dit_scale.parallel import init_topology
from dit_scale.vae import image_decoder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", "--run", dest="run",
                     help="run directory (its latest checkpoint; the result is logged in its metrics.jsonl). Under "
                          "torchrun write --run-dir: torchrun's own parser takes --run for its --run-path")
    src.add_argument("--ckpt", help="checkpoint (step_* folder, step_*.pt) or exported .safetensors file")
    p.add_argument("--num-samples", type=int, default=None, help="images to generate (default: eval.fid_samples, "
                                                                   "else 50000)")
    p.add_argument("--ref", default=None, help="reference: ADM .npz batch, a cached .npz, or shards:PATH")
    p.add_argument("--inception", default=None, help="local FID Inception weights (.pth or .safetensors)")
    p.add_argument("--captions", default=None, help="a text model: captioned held-out shards whose captions condition "
                                                    "the samples (default: eval.captions, else --ref shards:PATH)")
    p.add_argument("--vae", default=None, help="local VAE folder (default: the one the shards' manifest names)")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--guide-channels", type=int, default=None, help="guide only the first N channels (DiT: 3)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="images per sampling batch and process")
    p.add_argument("--ref-samples", type=int, default=None, help="shards:PATH references: first N samples")
    p.add_argument("--ref-cache", default=None, help="where a shards:PATH reference is cached (.npz)")
    p.add_argument("--dinov2", default=None, help="local transformers DINOv2 folder (ViT-L/14 for the protocol): "
                                                  "also report FD-DINOv2 against the same --ref")
    p.add_argument("--dinov2-ref-cache", default=None, help="where the DINOv2 reference statistics are cached (.npz)")
    p.add_argument("--npz", default=None, help="also write the images as ADM's evaluator reads them: arr_0 uint8 "
                                               "[N, H, W, 3], arr_1 the class labels")
    p.add_argument("--no-scores", action="store_true", help="with --npz: only write the images (no Inception "
                                                            "weights or reference needed)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the trained weights instead of the EMA")
    p.add_argument("--no-log", action="store_true", help="do not append the result to the run's metrics.jsonl")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p.parse_args(argv)


def _run_dir_of(args, path: str):
    """The run directory the result is logged in: --run, or the one a checkpoint sits in (RUN/checkpoints/X)."""
    if args.run:
        return args.run
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def _process_config(cfg, device: str):
    """The checkpoint's config, laid out for this job: the model is replicated on every process (parallel.ep=1);
    with several processes, parallel.engine=fsdp only so that init_topology creates the process group (no engine is
    built here)."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    node = OmegaConf.create(to_yaml(cfg))
    node.parallel.engine = "fsdp" if world > 1 else "local"
    node.parallel.ep = 1
    node.train.device = device
    return config_from_yaml_text(OmegaConf.to_yaml(node))


def _setup(args, state, cfg):
    """The process group, the model with the chosen weights on this process's device, the image decoder."""
    topo = init_topology(_process_config(cfg, args.device))
    built = build(cfg)
    ema = not args.no_ema and "weights" not in state
    built.model.load_state_dict(state["weights"] if "weights" in state else state["ema" if ema else "model"])
    built.model.to(topo.device).eval()
    return topo, built, ema, image_decoder(cfg, args.vae, topo.device, required=True)


def _progress(topo, num_samples: int):
    done, last_print = [0], [time.perf_counter()]

    def progress(n):
        done[0] += n
        if topo.is_main and time.perf_counter() - last_print[0] > 30:
            last_print[0] = time.perf_counter()
            print(f"evaluate: {done[0] * topo.world_size} / {num_samples} images (approx.)", file=sys.stderr,
                  flush=True)
    return progress


def _conditions(args, cfg, ref, num_samples: int, batch_size: int, topo):
    """A text model's held-out captions (the reference's own when it is shards:PATH); None for a class model."""
    if cfg.model.conditioning != "text":
        return None
    given = args.captions or (ref[len("shards:"):] if ref and ref.startswith("shards:") and not cfg.eval.captions
                              else None)
    return eval_conditions(cfg, num_samples, batch_size, topo.rank, topo.world_size, path=given)


def export(args, path: str, state: dict, cfg) -> dict:
    """--npz with --no-scores: draw the images over all processes and write the ADM-format .npz only."""
    num_samples = args.num_samples or cfg.eval.fid_samples or 50000
    batch_size = args.batch_size or cfg.eval.batch_size
    topo, built, ema, decoder = _setup(args, state, cfg)
    writer = SampleWriter(args.npz, topo.rank, topo.world_size)
    spec = SamplingSpec.from_config(cfg, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                                    guide_channels=args.guide_channels, seed=args.seed)
    conditions = _conditions(args, cfg, args.ref or cfg.eval.ref, num_samples, batch_size, topo)
    try:
        result = export_samples(built.model, built.objective, cfg, spec, decoder, writer, num_samples, batch_size,
                                topo.device, progress=_progress(topo, num_samples), conditions=conditions)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    result.update(step=int(state.get("step", 0)), checkpoint=path, ema=ema, world_size=topo.world_size)
    return result


def evaluate(args) -> dict:
    path = args.ckpt or resolve_path(args.run)
    state = load_exported(path) if path.endswith(".safetensors") else load_checkpoint(path)
    cfg = config_from_yaml_text(state["config"], f"the config stored in '{path}'")
    e = cfg.eval
    inception_path, ref = args.inception or e.inception, args.ref or e.ref
    if args.no_scores and not args.npz:
        raise ConfigError("--no-scores only makes sense with --npz PATH (the images are then all it writes).")
    if args.no_scores:
        return export(args, path, state, cfg)
    if not ref:
        raise ConfigError("No reference statistics: pass --ref (ADM's .npz reference batch or shards:PATH of real "
                          "images), or set eval.ref in the config.")
    if not inception_path:
        raise ConfigError("No Inception weights: pass --inception PATH (docs/evaluation.md says where to get "
                          "them), or set eval.inception in the config.")
    num_samples = args.num_samples or e.fid_samples or 50000
    if num_samples < 4:
        raise ConfigError(f"--num-samples={num_samples} is too few for FID and precision/recall (k=3); use at least "
                          f"4 (FID-50K: 50000).")
    topo, built, ema, decoder = _setup(args, state, cfg)
    device = topo.device
    batch_size = args.batch_size or e.batch_size
    writer = SampleWriter(args.npz, topo.rank, topo.world_size) if args.npz else None
    try:
        inception = load_inception(inception_path, device)
        dino = load_dinov2(args.dinov2, device) if args.dinov2 else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    extractor = FeatureExtractor(inception, device, topo.rank, topo.world_size, batch_size,
                                 weights_fingerprint(inception_path))
    ref_samples = args.ref_samples or e.ref_samples
    reference = load_reference(ref, extractor, num_samples=ref_samples, vae=args.vae, cache=args.ref_cache)
    dino_reference = None
    if dino is not None:                # its own reference statistics; the generated images go through both
        dino_extractor = FeatureExtractor(dino, device, topo.rank, topo.world_size, batch_size,
                                          folder_fingerprint(args.dinov2))
        dino_reference = load_dino_reference(ref, dino_extractor, num_samples=ref_samples, vae=args.vae,
                                             cache=args.dinov2_ref_cache)
        extractor = FeatureExtractor(CombinedFeatures(inception, dino), device, topo.rank, topo.world_size,
                                     batch_size, extractor.fingerprint)
    spec = SamplingSpec.from_config(cfg, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                                    guide_channels=args.guide_channels, seed=args.seed)

    progress = _progress(topo, num_samples)
    conditions = _conditions(args, cfg, ref, num_samples, batch_size, topo)
    try:
        result = evaluate_samples(built.model, built.objective, cfg, spec, decoder, extractor, reference,
                                  num_samples, batch_size=batch_size, collective_forward=False, progress=progress,
                                  conditions=conditions, dino_reference=dino_reference, writer=writer)
    except ValueError as err:           # a sampler / step count / guide channel count that does not fit the model
        raise ConfigError(str(err)) from None
    step = int(state.get("step", 0))
    result.update(step=step, checkpoint=path, ema=ema, world_size=topo.world_size, inception=inception_path)
    if dino is not None:
        result["dinov2"] = args.dinov2
    run = _run_dir_of(args, path)
    if topo.is_main and run and not args.no_log:
        log_result(run, step, metrics_row(result, ema=ema))
    return result


def main(argv=None):
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    try:
        result = evaluate(args)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        text = json.dumps(result, indent=1)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
