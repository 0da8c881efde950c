"""Sample N images over all ranks, decode them, and score them against a reference.

    result = evaluate_samples(model, objective, cfg, spec, decoder, extractor, reference, num_samples=50000)
    # every rank: {"fid", "sfid", "inception_score", "precision", "recall", "num_samples", "sampler", "steps",
    #              "cfg_scale", "guide_channels", "seed", ...}; "fd_dinov2" with dino_reference=, "npz" with writer=
    export_samples(model, objective, cfg, spec, decoder, SampleWriter("samples.npz", rank, world), N, B, device)

`evaluation/generate.py` says which sample each global index is; `evaluation/features.py` gathers the features in
index order, so the statistics are the same for any number of processes. sFID is reported when the reference has
spatial statistics (ADM's batches and shard references do), precision/recall when it has real pool features.
"""
from __future__ import annotations

import json
import time
from typing import Optional

import torch

from dit_scale.evaluation.dinov2 import KEY as DINO_KEY
from dit_scale.evaluation.export import SampleWriter
from dit_scale.evaluation.generate import SamplingSpec, class_of, rank_batches, sample_indices
from dit_scale.evaluation.inception import FEATURE_KEYS
from dit_scale.evaluation.reference import FeatureExtractor, Reference
from dit_scale.evaluation.scores import frechet_distance_of, inception_score, precision_recall
from dit_scale.generation.vae import to_uint8
from dit_scale.optim import resolve_precision
from dit_scale.run_dir import RunDir


def scores(features: dict, reference: Reference, dino_reference: Optional[Reference] = None) -> dict:
    """The metrics of generated features (sorted by index) against `reference` (and FD-DINOv2 against
    `dino_reference` when the features hold DINOv2's)."""
    out = {"fid": frechet_distance_of(features["pool"], reference.mu, reference.sigma)}
    if dino_reference is not None:
        out["fd_dinov2"] = frechet_distance_of(features[DINO_KEY], dino_reference.mu, dino_reference.sigma)
    if reference.mu_s is not None and reference.sigma_s is not None:
        out["sfid"] = frechet_distance_of(features["spatial"], reference.mu_s, reference.sigma_s)
    out["inception_score"] = inception_score(features["logits"])
    if reference.pool is not None:
        out["precision"], out["recall"] = precision_recall(reference.pool, features["pool"])
    return out


SCORES = ("fid", "fd_dinov2", "sfid", "inception_score", "precision", "recall")


def metrics_row(result: dict, **extra) -> dict:
    """A metrics.jsonl row of an evaluation result: the scores as they are, how the images were drawn as eval/*."""
    row = {k: result[k] for k in SCORES if k in result}
    for key in ("num_samples", "sampler", "steps", "cfg_scale", "guide_channels", "seed", "reference", *extra):
        row[f"eval/{key}"] = extra[key] if key in extra else result.get(key)
    if "captions" in result:                      # a text model: which held-out captions conditioned the samples
        row["eval/captions"] = result["captions"]
    return row


def log_result(run_dir: str, step: int, row: dict) -> str:
    """Append `row` (metrics_row) as the run's metrics.jsonl line of checkpoint step `step`, with the wall clock."""
    run = RunDir(run_dir)
    with run.append_metrics() as f:
        f.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **row}) + "\n")
    return run.metrics


def sample_images(model, objective, cfg, spec: SamplingSpec, decoder, num_samples: int, batch_size: int, rank: int,
                  world_size: int, device, collective_forward: bool = False, progress=None, conditions=None,
                  writer: Optional[SampleWriter] = None):
    """This rank's generated images: yields (global indices, uint8 [B, 3, H, W]) per batch (`generate.py` says
    which samples; padding batches of a collective forward are drawn and dropped), sampled in the run's precision
    (train.precision on `device`, as in training). `writer`: also keep them for the ADM-format .npz
    (`export.SampleWriter`)."""
    device = torch.device(device)
    precision = resolve_precision(cfg.train.precision, device)
    for batch in rank_batches(num_samples, batch_size, rank, world_size, pad=collective_forward):
        with precision.autocast():
            latents = sample_indices(model, objective, cfg.model, spec, batch.indices, device, conditions)
        if batch.real:
            images = to_uint8(decoder(latents.float()))
            if writer is not None:
                writer.add(batch.indices, images, None if conditions is not None else
                           [class_of(i, cfg.model.num_classes) for i in batch.indices])
            yield batch.indices, images
            if progress is not None:
                progress(len(batch.indices))


def evaluate_samples(model, objective, cfg, spec: SamplingSpec, decoder, extractor: FeatureExtractor,
                     reference: Reference, num_samples: int, batch_size: int = 32, collective_forward: bool = False,
                     progress=None, conditions=None, dino_reference: Optional[Reference] = None,
                     writer: Optional[SampleWriter] = None) -> dict:
    """Every rank calls it with the same arguments. `collective_forward`: the model's forward is a collective
    (FSDP, expert parallelism), so every rank runs the same number of batches. `progress(n)` is called after each
    batch with the number of images this rank finished. `conditions`: a text model's captions by sample index
    (`generate.eval_conditions`); None: classes. `dino_reference`: also FD-DINOv2 (the extractor's network must
    return DINOv2 features too, `dinov2.CombinedFeatures`). `writer`: also write the images as an ADM-format .npz
    (`export.SampleWriter`; its `finish` is collective and runs here)."""
    start = time.perf_counter()
    batches = sample_images(model, objective, cfg, spec, decoder, num_samples, batch_size, extractor.rank,
                            extractor.world_size, extractor.device, collective_forward, progress, conditions, writer)
    keys = FEATURE_KEYS + ((DINO_KEY,) if dino_reference is not None else ())
    features = extractor.gather(batches, keys=keys)
    result = scores(features, reference, dino_reference)
    if writer is not None:
        result["npz"] = writer.finish()
    result.update(num_samples=int(num_samples), **spec.as_dict(), decoder=decoder.describe(),
                  reference=reference.source, seconds=round(time.perf_counter() - start, 1))
    if dino_reference is not None:
        result["dinov2_reference"] = dino_reference.source
    if conditions is not None:
        result["captions"] = conditions.source
    return result


def export_samples(model, objective, cfg, spec: SamplingSpec, decoder, writer: SampleWriter, num_samples: int,
                   batch_size: int, device, collective_forward: bool = False, progress=None, conditions=None) -> dict:
    """Only draw the images and write them as an ADM-format .npz (no features, no scores); every rank calls it."""
    start = time.perf_counter()
    for _ in sample_images(model, objective, cfg, spec, decoder, num_samples, batch_size, writer.rank,
                           writer.world_size, device, collective_forward, progress, conditions, writer):
        pass
    path = writer.finish()
    result = {"npz": path, "num_samples": int(num_samples), **spec.as_dict(), "decoder": decoder.describe(),
              "seconds": round(time.perf_counter() - start, 1)}
    if conditions is not None:
        result["captions"] = conditions.source
    return result
