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
computed once over all processes and cached next to the shards (inception_ref_<weights>_<N>_<data key>.npz, or
--ref-cache; a cache of other shards, samples, weights or VAE is recomputed).
Under torchrun / srun each process uses one GPU (NCCL) or, without GPUs, gloo on CPU.

Exit codes: 0 done; 2 an input error (missing file, bad checkpoint or reference), one sentence on stderr.
"""
import argparse
import json
import os
import sys

from dit_scale.cli import check_output_file, positive_int
from dit_scale.errors import CheckpointError, ConfigError, DataError
from dit_scale.parallel.shutdown import end_process_group, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", "--run", dest="run",
                     help="run directory (its latest checkpoint; the result is logged in its metrics.jsonl). Under "
                          "torchrun write --run-dir: torchrun's own parser takes --run for its --run-path")
    src.add_argument("--ckpt", help="checkpoint (step_* folder, step_*.pt) or exported .safetensors file")
    p.add_argument("--num-samples", type=positive_int, default=None, help="images to generate (default: eval.fid_samples, "
                                                                   "else 50000)")
    p.add_argument("--ref", default=None, help="reference: ADM .npz batch, a cached .npz, or shards:PATH")
    p.add_argument("--inception", default=None, help="local FID Inception weights (.pth or .safetensors)")
    p.add_argument("--captions", default=None, help="a text model: captioned held-out shards whose captions condition "
                                                    "the samples (default: eval.captions, else --ref shards:PATH)")
    p.add_argument("--vae", default=None, help="local VAE folder (default: the one the shards' manifest names)")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--guide-channels", type=int, default=None, help="guide only the first N channels (DiT: 3)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per sampling batch and process")
    p.add_argument("--ref-samples", type=positive_int, default=None, help="shards:PATH references: first N samples")
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


def main(argv=None):
    args = parse_args(argv)
    from dit_scale.evaluation.run import evaluate_checkpoint     # after the arguments: seconds of imports (torch)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    try:
        check_output_file(args.out, "--out")
        check_output_file(args.ref_cache, "--ref-cache", (".npz",))
        check_output_file(args.npz, "--npz", (".npz",))
        result = evaluate_checkpoint(args)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        end_process_group()
    if rank == 0:
        text = json.dumps(result, indent=1)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)          # after a distributed run: exits without the interpreter's teardown (parallel/shutdown.py)
