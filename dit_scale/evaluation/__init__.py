"""Measuring a model: FID / sFID / Inception Score / precision-recall / FD-DINOv2 of its samples, validation loss,
and where its experts' tokens go.

    inception.py      the FID Inception-v3 network, weights from a local file (pool, spatial, logits features)
    dinov2.py         DINOv2 CLS features for FD-DINOv2, from a local transformers folder (EDM2's preprocessing)
    scores.py         Fréchet distance, Inception Score, k-NN precision/recall from features (float64)
    features.py       a torchmetrics Metric gathering features from every rank, sorted by global sample index
    generate.py       global sample i: its class, its noise seed, its batch; SamplingSpec (sampler, steps, cfg, ...)
    shard_samples.py  the first N samples of a shard set in a fixed order, split over ranks
    reference.py      reference statistics: ADM's .npz batches, or shards:PATH computed once and cached
    evaluator.py      sample N images over all ranks, decode, score against a reference
    export.py         the N images as ADM's evaluator reads them (.npz arr_0 / arr_1), gathered from every rank
    val_loss.py       the training loss on held-out shards at fixed t bins and fixed noise
    periodic.py       what the trainer runs every eval.every steps, and its decoded, titled sample grids
    experts.py        token share per expert by layer × timestep bin and layer × class, balance per bin
    run.py            a checkpoint evaluated over all processes of a job: what `launch/evaluate.py` calls
    grid.py           a checkpoint's titled sample grid (class rows or prompt rows): what `launch/sample.py` calls
    curves.py         loss / validation loss / FID curves of runs from their metrics.jsonl: what `launch/plot.py` draws

Entry points: `launch/evaluate.py` (a checkpoint, under torchrun / SLURM or one process), `launch/analyze_experts.py`
(routing of a run's EMA model), `launch/sample.py` (a checkpoint's sample grid), `launch/probe.py` (a class probe of
a run's samples) and `launch/plot.py` (loss / validation loss / FID curves of runs).
"""
