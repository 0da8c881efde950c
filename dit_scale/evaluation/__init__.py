"""Measuring a model: FID / sFID / Inception Score / precision-recall of its samples, and validation loss.

    inception.py      the FID Inception-v3 network, weights from a local file (pool, spatial, logits features)
    scores.py         Fréchet distance, Inception Score, k-NN precision/recall from features (float64)
    features.py       a torchmetrics Metric gathering features from every rank, sorted by global sample index
    generate.py       global sample i: its class, its noise seed, its batch; SamplingSpec (sampler, steps, cfg, ...)
    shard_samples.py  the first N samples of a shard set in a fixed order, split over ranks
    reference.py      reference statistics: ADM's .npz batches, or shards:PATH computed once and cached
    evaluator.py      sample N images over all ranks, decode, score against a reference
    val_loss.py       the training loss on held-out shards at fixed t bins and fixed noise
    periodic.py       what the trainer runs every eval.every steps, and its decoded, titled sample grids

Entry points: `launch/evaluate.py` (a checkpoint, under torchrun / SLURM or one process) and `launch/plot.py`
(loss / validation loss / FID curves of runs).
"""
