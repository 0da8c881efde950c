"""Evaluating a checkpoint on every process of a job: what `launch/evaluate.py` runs once it has parsed its flags.

    result = evaluate_checkpoint(args)      # args: launch/evaluate.py's flags (argparse.Namespace)

The checkpoint's config gives the defaults (eval.*: number of samples, reference, Inception weights, sampler, steps,
cfg scale, guide channels, seed); the model is replicated on every process and each draws its share of the global
samples (`generate.py`), so 1 and N processes report the same statistics. With --no-scores and --npz only the
images are written (`export.py`).
"""
import os
import sys
import time

from dit_scale.build import build
from dit_scale.checkpoint import load_checkpoint, load_exported
from dit_scale.checkpoint.load import checkpoint_weights, resolve_path
from dit_scale.config import config_from_yaml_text
from dit_scale.errors import ConfigError
from dit_scale.evaluation.dinov2 import CombinedFeatures, folder_fingerprint, load_dinov2
from dit_scale.evaluation.evaluator import evaluate_samples, export_samples, log_result, metrics_row
from dit_scale.evaluation.export import SampleWriter
from dit_scale.evaluation.generate import SamplingSpec, eval_conditions
from dit_scale.evaluation.inception import load_inception, weights_fingerprint
from dit_scale.evaluation.reference import FeatureExtractor, load_dino_reference, load_reference
from dit_scale.generation.vae import image_decoder
from dit_scale.parallel.topology import check_same_config, init_processes


def _run_dir_of(args, path: str):
    """The run directory the result is logged in: --run, or the one a checkpoint sits in (RUN/checkpoints/X)."""
    if args.run:
        return args.run
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def _setup(args, state, cfg, path: str):
    """The processes (the model is replicated on every one: no engine), the model with the chosen weights on this
    process's device, the image decoder. Every rank must have loaded the same checkpoint config."""
    topo = init_processes(args.device, cfg.parallel.timeout_minutes, cfg.data.num_workers)
    if topo.world_size > 1:
        check_same_config(cfg, topo.rank, topo.world_size)
    built = build(cfg)
    ema = not args.no_ema and "weights" not in state
    built.model.load_state_dict(checkpoint_weights(state, ema, path))
    built.model.to(topo.device).eval()
    return topo, built, ema, image_decoder(cfg, args.vae, topo.device, required=True)


def _progress(topo, num_samples: int):
    """A callback counting generated images; the main process prints the approximate total every 30 s."""
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
    return eval_conditions(cfg.eval, num_samples, batch_size, topo.rank, topo.world_size, path=given)


def export_checkpoint(args, path: str, state: dict, cfg) -> dict:
    """--npz with --no-scores: draw the images over all processes and write the ADM-format .npz only."""
    num_samples = args.num_samples or cfg.eval.fid_samples or 50000
    batch_size = args.batch_size or cfg.eval.batch_size
    topo, built, ema, decoder = _setup(args, state, cfg, path)
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


def evaluate_checkpoint(args) -> dict:
    """Load the checkpoint (--ckpt, or the run's latest), sample and score its images over all processes (FID, sFID,
    IS, precision/recall; FD-DINOv2 with --dinov2), log the result in the run's metrics.jsonl on the main process
    (unless --no-log) and return it; with --no-scores only write the --npz images. `args`: launch/evaluate.py's
    flags. Raises ConfigError, CheckpointError, DataError or FileNotFoundError for an input error."""
    path = args.ckpt or resolve_path(args.run, "--run-dir")
    state = load_exported(path) if path.endswith(".safetensors") else load_checkpoint(path)
    cfg = config_from_yaml_text(state["config"], f"the config stored in '{path}'")
    e = cfg.eval
    inception_path, ref = args.inception or e.inception, args.ref or e.ref
    if args.no_scores and not args.npz:
        raise ConfigError("--no-scores only makes sense with --npz PATH (the images are then all it writes).")
    if args.no_scores:
        return export_checkpoint(args, path, state, cfg)
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
    ref_samples = args.ref_samples or e.ref_samples
    if ref.startswith("shards:") and ref_samples < 4:       # before anything is computed or sampled
        raise ConfigError(f"--ref-samples={ref_samples} real images are too few for reference statistics and "
                          f"precision/recall (k=3); use at least 4 (FID-50K: 50000).")
    topo, built, ema, decoder = _setup(args, state, cfg, path)
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
