"""Sample-quality diagnostics: diversity and mode coverage.

- :func:`mean_pairwise_distance`: the diversity measure reported in ORW-CFM-W2's
  experiments (it falls towards 0 when fine-tuning collapses onto one sample).
- :func:`mode_histogram`: fraction of points nearest to each known mode, for
  low-dimensional (e.g. 2-D mixture) experiments.
- :func:`frechet_distance`: the Fréchet (W2 between Gaussians) distance of two feature sets, the
  second optionally weighted (a reweighted target distribution ``q w / Z``).
- :func:`vendi_score`: the Vendi score (Friedman & Dieng 2023), the effective number of distinct samples
  under the cosine similarity of their embeddings (1 for identical samples, ``N`` for orthogonal ones).
"""

from __future__ import annotations

import torch

__all__ = ["frechet_distance", "mean_pairwise_distance", "mode_histogram", "vendi_score"]


@torch.no_grad()
def mean_pairwise_distance(samples: torch.Tensor, *, chunk_size: int = 1024) -> float:
    """Mean Euclidean distance between all ordered pairs of distinct samples.

    Each sample is flattened to a vector, and the result is

    .. math:: \\frac{1}{N (N - 1)} \\sum_{i \\ne j} \\lVert x_i - x_j \\rVert_2 ,

    i.e. the average over the off-diagonal of the ``[N, N]`` distance matrix (the
    diagonal zeros are excluded). It is computed with :func:`torch.cdist` in float64
    (in row chunks of ``chunk_size`` so memory stays ``O(chunk_size * N)``). Higher
    means more diverse; a mode-collapsed model gives values near 0. For reference,
    two independent ``N(0, I_D)`` vectors are about ``sqrt(2 D)`` apart.

    Args:
        samples: ``[N, ...]`` samples, ``N >= 2`` (e.g. ``[N, C, H, W]`` images or
            ``[N, 2]`` points). Any float or integer dtype, any device.
        chunk_size: Rows of the distance matrix computed at once.

    Returns:
        The mean pairwise distance as a Python float.

    Raises:
        ValueError: If fewer than two samples are given.
    """
    n = samples.shape[0]
    if n < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 samples, got {n}")
    flat = samples.reshape(n, -1).to(torch.float64)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, n, chunk_size):
        # cdist's "use_mm" fast path loses precision for near-identical points; compute directly.
        block = torch.cdist(flat[start : start + chunk_size], flat, compute_mode="donot_use_mm_for_euclid_dist")
        total += block.sum()  # the diagonal entries are exactly 0
    return float(total / (n * (n - 1)))


@torch.no_grad()
def mode_histogram(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Fraction of points whose nearest center (Euclidean) is each center.

    Ties go to the lower center index.

    Args:
        points: ``[N, D]`` points (e.g. ``D = 2`` for 2-D mixtures), ``N >= 1``.
        centers: ``[K, D]`` mode centers.

    Returns:
        ``[K]`` float64 tensor on ``points.device`` of fractions summing to 1
        (entry ``k`` is the share of points assigned to ``centers[k]``).

    Raises:
        ValueError: If the shapes are not ``[N, D]`` and ``[K, D]`` with ``N, K >= 1``.
    """
    if points.dim() != 2 or centers.dim() != 2 or points.shape[1] != centers.shape[1]:
        raise ValueError(f"expected points [N, D] and centers [K, D], got {tuple(points.shape)} and {tuple(centers.shape)}")
    if points.shape[0] == 0 or centers.shape[0] == 0:
        raise ValueError("mode_histogram needs at least one point and one center")
    p = points.to(torch.float64)
    c = centers.to(device=p.device, dtype=torch.float64)
    nearest = torch.cdist(p, c, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
    counts = torch.bincount(nearest, minlength=c.shape[0]).to(torch.float64)
    return counts / points.shape[0]


def _weighted_moments(x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double().flatten(1)
    w = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=torch.float64) if w is None else w.double().cpu()
    w = w / w.sum()
    w = w.to(x.device)
    mu = w @ x
    centred = x - mu
    # the weighted analogue of the unbiased covariance: divide by 1 - sum w^2 (= (n - 1) / n for equal weights)
    cov = (centred * w[:, None]).T @ centred / (1.0 - (w * w).sum()).clamp_min(1e-12)
    return mu, cov


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((a + a.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


@torch.no_grad()
def frechet_distance(x: torch.Tensor, y: torch.Tensor, y_weights: torch.Tensor | None = None) -> float:
    """Fréchet distance ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2)`` of Gaussian fits.

    Args:
        x: ``[N, ...]`` features of one distribution (flattened per sample).
        y: ``[M, ...]`` features of the other.
        y_weights: ``[M]`` non-negative weights of ``y``'s samples (the distribution ``y`` reweighted), or None.

    Returns:
        The squared W2 distance between the two Gaussian fits (float64 throughout; 0 for equal fits).
    """
    mu_x, cov_x = _weighted_moments(x, None)
    mu_y, cov_y = _weighted_moments(y, y_weights)
    root_x = _sqrtm_psd(cov_x)
    cross = _sqrtm_psd(root_x @ cov_y @ root_x)
    value = (mu_x - mu_y).pow(2).sum() + torch.trace(cov_x) + torch.trace(cov_y) - 2 * torch.trace(cross)
    return float(value.clamp_min(0))


@torch.no_grad()
def vendi_score(embeddings: torch.Tensor) -> float:
    """The Vendi score of ``N`` samples under the cosine-similarity kernel (Friedman & Dieng 2023).

    Each row is flattened and L2-normalised, ``x_i / ||x_i||``, so ``K = X X^T`` is the ``[N, N]`` matrix of
    cosine similarities (``K_ii = 1``; for raw ``"pixels"`` embeddings the same normalisation applies). With
    ``lambda_1 .. lambda_N`` the eigenvalues of ``K / N`` (non-negative, summing to 1)

    .. math:: \\mathrm{VS} = \\exp\\Big(-\\sum_i \\lambda_i \\log \\lambda_i\\Big), \\quad 0 \\log 0 = 0

    the exponential of their Shannon entropy, an effective number of distinct samples between 1 (all samples
    point the same way: a collapsed model) and ``min(N, D)`` (mutually orthogonal embeddings). The same
    non-zero eigenvalues are those of the ``[D, D]`` matrix ``X^T X / N``, which is used when ``D < N``.
    float64 throughout (``torch.linalg.eigvalsh``); round-off's tiny negative eigenvalues are clamped to 0.

    Args:
        embeddings: ``[N, ...]`` sample embeddings, ``N >= 1``, every row non-zero; any float dtype, any device.

    Returns:
        The Vendi score as a Python float.

    Raises:
        ValueError: no rows, or a row of zeros (it has no direction, so no cosine similarity).
    """
    n = embeddings.shape[0]
    if n < 1:
        raise ValueError("vendi_score needs at least 1 sample")
    x = embeddings.reshape(n, -1).to(torch.float64)
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("vendi_score: an embedding of zeros has no direction (cosine similarity undefined)")
    x = x / norms
    gram = x.T @ x if x.shape[1] < n else x @ x.T  # same non-zero eigenvalues; the smaller matrix
    eigenvalues = torch.linalg.eigvalsh(gram / n).clamp_min(0)
    entropy = -torch.xlogy(eigenvalues, eigenvalues).sum()  # xlogy(0, 0) = 0
    return float(entropy.exp())
