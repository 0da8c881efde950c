"""Sample N images over all ranks, decode them, and score them against a reference.

    result = evaluate_samples(model, objective, cfg, spec, decoder, extractor, reference, num_samples=50000)
    # every rank: {"fid", "sfid", "inception_score", "precision", "recall", "num_samples", "sampler", "steps",
    #              "cfg_scale", "guide_channels", "seed", ...}

`evaluation/generate.py` says which sample each global index is; `evaluation/features.py` gathers the features in
index order, so the statistics are the same for any number of processes. sFID is reported when the reference has
spatial statistics (ADM's batches and shard references do), precision/recall when it has real pool features.
"""
from __future__ import annotations

import contextlib
import json
import time

import torch

from dit_scale.evaluation.generate import SamplingSpec, rank_batches, sample_indices
from dit_scale.evaluation.reference import FeatureExtractor, Reference
from dit_scale.evaluation.scores import frechet_distance_of, inception_score, precision_recall
from dit_scale.run_dir import RunDir
from dit_scale.vae import to_uint8


def scores(features: dict, reference: Reference) -> dict:
    """The metrics of generated features (sorted by index) against `reference`."""
    out = {"fid": frechet_distance_of(features["pool"], reference.mu, reference.sigma)}
    if reference.mu_s is not None and reference.sigma_s is not None:
        out["sfid"] = frechet_distance_of(features["spatial"], reference.mu_s, reference.sigma_s)
    out["inception_score"] = inception_score(features["logits"])
    if reference.pool is not None:
        out["precision"], out["recall"] = precision_recall(reference.pool, features["pool"])
    return out


SCORES = ("fid", "sfid", "inception_score", "precision", "recall")


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
    path = RunDir(run_dir).metrics
    with open(path, "a") as f:
        f.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **row}) + "\n")
    return path


def evaluate_samples(model, objective, cfg, spec: SamplingSpec, decoder, extractor: FeatureExtractor,
                     reference: Reference, num_samples: int, batch_size: int = 32, collective_forward: bool = False,
                     progress=None, conditions=None) -> dict:
    """Every rank calls it with the same arguments. `collective_forward`: the model's forward is a collective
    (FSDP, expert parallelism), so every rank runs the same number of batches. `progress(n)` is called after each
    batch with the number of images this rank finished. `conditions`: a text model's captions by sample index
    (`captions.eval_conditions`); None: classes."""
    device = extractor.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    start = time.perf_counter()

    def batches():
        for batch in rank_batches(num_samples, batch_size, extractor.rank, extractor.world_size,
                                  pad=collective_forward):
            with autocast:
                latents = sample_indices(model, objective, cfg, spec, batch.indices, device, conditions)
            if batch.real:
                yield batch.indices, to_uint8(decoder(latents.float()))
                if progress is not None:
                    progress(len(batch.indices))

    features = extractor.gather(batches())
    result = scores(features, reference)
    result.update(num_samples=int(num_samples), **spec.as_dict(), decoder=decoder.describe(),
                  reference=reference.source, seconds=round(time.perf_counter() - start, 1))
    if conditions is not None:
        result["captions"] = conditions.source
    return result
