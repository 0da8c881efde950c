"""The numbers an evaluation reports, computed from Inception features (float64, on the host):

    mu, sigma = gaussian_stats(pool)                          # mean [D], covariance [D, D] (unbiased, as ADM)
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)      # FID (pool features); sFID on spatial features
    fid = frechet_distance_of(pool, mu_ref, sigma_ref)        # the same from the features themselves
    inception_score(logits)                                   # exp E[KL(p(y|x) || p(y))], ADM's 5000-image splits
    precision, recall = precision_recall(ref_pool, pool)      # Kynkäänniemi et al. 2019, k = 3

The Fréchet distance is ||mu1 - mu2||² + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^½), the number ADM's evaluator and
pytorch-fid compute with scipy's `sqrtm(S1 S2)`. S1 S2 is similar to the symmetric S1^½ S2 S1^½, so Tr((S1 S2)^½)
is the sum of the square roots of that matrix's eigenvalues: two symmetric eigendecompositions instead of a complex
Schur decomposition (about 4× faster at D = 2048, no imaginary round-off). With fewer samples n than dimensions (a
small FID), S1 = Xcᵀ Xc / (n - 1) from the centred features, and the non-zero eigenvalues of S1 S2 are those of the
n × n matrix Xc S2 Xcᵀ / (n - 1): `frechet_distance_of` uses that. Both are checked against scipy's sqrtm in the
tests.

Precision and recall estimate each set's manifold as the union of balls around its points, each ball reaching the
point's k-th nearest neighbour in the same set (the point itself excluded). Precision: the fraction of generated
points inside the real manifold; recall: the fraction of real points inside the generated one. Distances are
computed in blocks of `block` rows, so 50k × 10k features need no 50k × 10k matrix.
"""
from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of [N, D] features, float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors [N, D] for a covariance, got shape {x.shape}.")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_eig_sum(symmetric: np.ndarray) -> float:
    """Σ sqrt(λ) over the eigenvalues of a symmetric PSD matrix (round-off negatives count as 0)."""
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(symmetric), 0.0, None)).sum())


def _check_sizes(mu1, sigma1, mu2, sigma2):
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"the two sets of statistics differ in size: mean {mu1.shape} vs {mu2.shape}, covariance "
                         f"{sigma1.shape} vs {sigma2.shape} (another feature layer or network?).")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (see the module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_sizes(mu1, sigma1, mu2, sigma2)
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _sqrt_eig_sum((middle + middle.T) / 2))


def frechet_distance_of(features, mu2, sigma2) -> float:
    """Fréchet distance between the Gaussian fitted to `features` [n, D] and N(mu2, sigma2); uses the n × n form
    when n <= D (see the module docstring)."""
    x = np.asarray(features, np.float64)
    mu1, sigma1 = gaussian_stats(x) if x.shape[0] > x.shape[1] else (x.mean(axis=0), None)
    if sigma1 is not None:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    _check_sizes(mu1, np.empty((len(mu1), len(mu1))), mu2, sigma2)
    centred = (x - mu1) / np.sqrt(len(x) - 1)                 # S1 = centredᵀ centred
    small = centred @ sigma2 @ centred.T
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(centred ** 2) + np.trace(sigma2) - 2 * _sqrt_eig_sum((small + small.T) / 2))


def inception_score(logits, split_size: int = 5000) -> float:
    """Inception Score of [N, 1008] unbiased logits: the mean over consecutive splits of `split_size` images (ADM's
    evaluator; 50k images: 10 splits) of exp(mean_i KL(p(y|x_i) || mean_j p(y|x_j)))."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for start in range(0, len(p), split_size):
        part, log_part = p[start:start + split_size], log_p[start:start + split_size]
        kl = (part * (log_part - part.mean(dim=0, keepdim=True).log())).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def _kth_neighbour_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row (the k+1-th smallest including itself)."""
    return torch.cat([torch.cdist(x[s:s + block], x).kthvalue(k + 1, dim=1).values for s in range(0, len(x), block)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """For each point: is it within radius of some centre (distance <= that centre's radius)?"""
    return torch.cat([(torch.cdist(points[s:s + block], centres) <= radii[None]).any(dim=1)
                      for s in range(0, len(points), block)])


def precision_recall(real, fake, k: int = 3, block: int = 10000) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` [M, D] against real features `real` [N, D] (float64)."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and generated feature vectors, got "
                         f"{len(real)} and {len(fake)}.")
    real_radii, fake_radii = _kth_neighbour_radii(real, k, block), _kth_neighbour_radii(fake, k, block)
    precision = _inside(fake, real, real_radii, block).double().mean()
    recall = _inside(real, fake, fake_radii, block).double().mean()
    return float(precision), float(recall)
