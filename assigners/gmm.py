"""Two-component 1-D Gaussian mixture fitted by EM, batched over GTs (PAA Sec. 3.1).

PAA models the losses of each GT's candidate anchors as a two-component mixture
(component 0 = foreground, 1 = background) and fits it with EM. The official code fits
one ``sklearn.mixture.GaussianMixture`` per GT with

    n_components=2, weights_init=[0.5, 0.5], means_init=[[min], [max]],
    precisions_init=[[[1.0]], [[1.0]]]

and sklearn's defaults otherwise (covariance_type "full", reg_covar 1e-6, tol 1e-3,
max_iter 100, n_init 1; the k-means initialisation sklearn still runs is overridden by
these explicit initial values). ``fit_gmm_batched`` reproduces that fit step for step for
all GTs at once in float64; ``fit_gmm_sklearn`` is the per-GT sklearn loop, kept as the
oracle for tests and as the speed baseline.

sklearn details reproduced (``sklearn/mixture/_base.py``, ``_gaussian_mixture.py``):
- E-step: log N(x | mu, var) = -0.5 (log 2 pi + y^2) + log p with p = 1/sqrt(var) and
  y = x p - mu p; weighted by log w; normalised with logsumexp.
- The lower bound of an iteration is the mean log-likelihood per sample from its E-step.
- M-step: n_k = sum of responsibilities + 10 * eps(float64); mu = sum(r x) / n_k;
  var = sum(r (x - mu)^2) / n_k + reg_covar; w = n_k / sum(n_k).
- Convergence: |lower_bound - previous lower_bound| < tol (the first iteration compares
  with -inf, so never converges); the parameters kept are those after that M-step.
- A final E-step with the kept parameters gives the labels (argmax of the weighted log
  probability, ties to component 0, as ``numpy.argmax``) and ``score_samples``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-3
DEFAULT_REG_COVAR = 1e-6
GMM_BACKENDS = ("torch", "sklearn")

_LOG_2PI = math.log(2.0 * math.pi)
_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class GMMFit:
    """Fitted two-component mixtures, one per row of the (N, K) input.

    means, variances, weights: (N, 2) float64; component 0 was initialised at the row's
        minimum (foreground in PAA), component 1 at its maximum. ``variances`` include
        ``reg_covar`` (sklearn's ``covariances_``).
    converged: (N,) bool; n_iter: (N,) int64 EM iterations run.
    labels: (N, K) int64 predicted component of every sample (sklearn ``predict``);
        -1 where the mask is False.
    log_density: (N, K) float64 mixture log-density of every sample (sklearn
        ``score_samples``); -inf where the mask is False.
    """

    means: Tensor
    variances: Tensor
    weights: Tensor
    converged: Tensor
    n_iter: Tensor
    labels: Tensor
    log_density: Tensor


def _check_samples(x: Tensor, mask: Tensor) -> None:
    if x.dim() != 2 or mask.shape != x.shape or mask.dtype != torch.bool:
        raise ValueError(f"x must be (N, K) with a bool mask of the same shape, got {tuple(x.shape)} and {tuple(mask.shape)}")
    if x.numel() and bool((mask.sum(dim=1) < 2).any()):
        raise ValueError("every row needs at least 2 valid samples to fit 2 components (as sklearn)")
    if bool((mask & ~torch.isfinite(x)).any()):
        raise ValueError("valid samples must be finite")


def _check_em_params(max_iter: int, tol: float, reg_covar: float) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if tol < 0.0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if reg_covar < 0.0:
        raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")


@contextmanager
def _single_threaded_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the EM loop with one intra-op thread on CPU, restoring the setting after.

    The loop issues a few thousand ops on small (N, K, 2) tensors; PyTorch still splits
    transcendental ops above a few thousand elements across threads, and on a busy
    machine each such split waits milliseconds for a descheduled thread (measured: an
    ``exp`` of 9k float64 values, 8 ms with 2 threads vs 0.02 ms with 1).
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _weighted_log_prob(x: Tensor, means: Tensor, precisions: Tensor, weights: Tensor) -> Tensor:
    """(N, K, 2) log w_k + log N(x | mu_k, 1 / p_k^2) of samples x (N, K, 1), with p = precision Cholesky factor."""
    y = x * precisions.unsqueeze(1) - (means * precisions).unsqueeze(1)
    log_gauss = -0.5 * (_LOG_2PI + y * y) + torch.log(precisions).unsqueeze(1)
    return log_gauss + torch.log(weights).unsqueeze(1)


def _precision_cholesky(variances: Tensor) -> Tensor:
    """Cholesky factor of the precision of 1-D components, 1 / sqrt(variance)."""
    return 1.0 / torch.sqrt(variances)


def _predict(weighted_log_prob: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Labels (argmax, ties to 0) and log-density of a final E-step; padded entries masked."""
    labels = (weighted_log_prob[..., 1] > weighted_log_prob[..., 0]).long()
    log_density = torch.logsumexp(weighted_log_prob, dim=-1)
    return labels.masked_fill(~mask, -1), log_density.masked_fill(~mask, float("-inf"))


@torch.no_grad()
def fit_gmm_batched(
    x: Tensor,
    mask: Tensor,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    reg_covar: float = DEFAULT_REG_COVAR,
) -> GMMFit:
    """Fit one two-component 1-D mixture per row by EM, all rows at once.

    x: (N, K) samples (converted to float64), mask: (N, K) bool, True for a valid sample;
    every row needs >= 2 valid (finite) samples. Runs on x's device. Each row follows
    sklearn's loop on its own valid samples: a row that has converged keeps its
    parameters while the others iterate, so a row's fit never depends on the other rows.
    Returns a ``GMMFit``.
    """
    _check_samples(x, mask)
    _check_em_params(max_iter, tol, reg_covar)
    with _single_threaded_on_cpu(x.device):
        return _em(x, mask, max_iter, tol, reg_covar)


def _em(x: Tensor, mask: Tensor, max_iter: int, tol: float, reg_covar: float) -> GMMFit:
    """The EM loop of ``fit_gmm_batched`` (validated inputs).

    A row's parameters are stored at the iteration it converges (later updates of it are
    ignored), and once at most half of the rows in the loop are still pending, the loop goes on
    with those alone, so late iterations cost what the slow rows need. Every step is row by row:
    a row's result does not depend on which other rows are in the loop (the same values, bit for
    bit, as updating every row in place until all have converged).
    """
    x = torch.where(mask, x.to(torch.float64), 0.0)
    n, _ = x.shape
    device = x.device
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)

    # Initialisation of the official code: means at min / max, unit precisions, w = 0.5.
    means = torch.stack([torch.where(mask, x, inf).amin(dim=1), torch.where(mask, x, -inf).amax(dim=1)], dim=1)
    precisions = torch.ones_like(means)  # Cholesky factor of the precision, 1 / std
    variances = torch.ones_like(means)
    weights = torch.full_like(means, 0.5)
    fitted = torch.zeros(n, 6, dtype=torch.float64, device=device)  # means, variances, weights
    converged = torch.zeros(n, dtype=torch.bool, device=device)
    n_iter = torch.zeros(n, dtype=torch.int64, device=device)
    nk_floor = 10.0 * _EPS

    # The rows in the loop (pending or already stored), and their samples.
    rows = torch.arange(n, device=device)
    pending = torch.ones(n, dtype=torch.bool, device=device)
    row_x, row_mask = x.unsqueeze(-1), mask.to(torch.float64)  # (n, K, 1), (n, K)
    num_valid = row_mask.sum(dim=1)  # (n,)
    lower_bound = torch.full((n,), float("-inf"), dtype=torch.float64, device=device)
    last_iteration = max_iter if n > 0 else 0  # no rows, nothing to iterate
    for iteration in range(1, last_iteration + 1):
        # E-step.
        weighted = _weighted_log_prob(row_x, means, precisions, weights)
        log_norm = torch.logsumexp(weighted, dim=-1)  # (n, K)
        resp = torch.exp(weighted - log_norm.unsqueeze(-1)).mul_(row_mask.unsqueeze(-1))
        new_bound = (log_norm * row_mask).sum(dim=1) / num_valid
        # M-step.
        nk = resp.sum(dim=1) + nk_floor  # (n, 2)
        means = (resp * row_x).sum(dim=1) / nk
        diff = row_x - means.unsqueeze(1)
        variances = (resp * diff * diff).sum(dim=1) / nk + reg_covar
        precisions = _precision_cholesky(variances)
        weights = nk / nk.sum(dim=1, keepdim=True)
        # Convergence on the change of the lower bound (the first iteration compares with -inf).
        done = (new_bound - lower_bound).abs() < tol
        lower_bound = new_bound
        finished = done & pending if iteration < max_iter else pending
        if not bool(finished.any()):
            continue
        index = finished.nonzero().squeeze(1)
        leaving = rows[index]
        fitted[leaving] = torch.cat([means, variances, weights], dim=1)[index]
        converged[leaving] = done[index]
        n_iter[leaving] = iteration
        pending[index] = False
        num_pending = int(pending.sum())
        if num_pending == 0:
            break
        if 2 * num_pending <= rows.numel():
            keep = pending.nonzero().squeeze(1)
            rows, pending, row_x, row_mask, num_valid = rows[keep], pending[keep], row_x[keep], row_mask[keep], num_valid[keep]
            means, precisions, weights, lower_bound = means[keep], precisions[keep], weights[keep], lower_bound[keep]

    means, variances, weights = (part.contiguous() for part in fitted.view(n, 3, 2).unbind(dim=1))
    final = _weighted_log_prob(x.unsqueeze(-1), means, _precision_cholesky(variances), weights)
    labels, log_density = _predict(final, mask)
    return GMMFit(
        means=means,
        variances=variances,
        weights=weights,
        converged=converged,
        n_iter=n_iter,
        labels=labels,
        log_density=log_density,
    )


def fit_gmm_sklearn(
    x: Tensor,
    mask: Tensor,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    reg_covar: float = DEFAULT_REG_COVAR,
) -> GMMFit:
    """The official per-GT loop: one ``sklearn.mixture.GaussianMixture`` per row.

    Same arguments and result as ``fit_gmm_batched`` (results on x's device). Samples
    are passed to sklearn in float64 (the official code passes float32 losses; float64
    is what ``fit_gmm_batched`` computes in, so the two backends are comparable).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    _check_samples(x, mask)
    _check_em_params(max_iter, tol, reg_covar)
    n, k = x.shape
    x_np = x.detach().to(torch.float64).cpu().numpy()
    mask_np = mask.cpu().numpy()
    means = np.zeros((n, 2))
    variances = np.zeros((n, 2))
    weights = np.zeros((n, 2))
    converged = np.zeros(n, dtype=bool)
    n_iter = np.zeros(n, dtype=np.int64)
    labels = np.full((n, k), -1, dtype=np.int64)
    log_density = np.full((n, k), -np.inf)
    for row in range(n):
        samples = x_np[row, mask_np[row]].reshape(-1, 1)
        gmm = GaussianMixture(
            n_components=2,
            covariance_type="full",
            tol=tol,
            reg_covar=reg_covar,
            max_iter=max_iter,
            n_init=1,
            weights_init=[0.5, 0.5],
            means_init=[[samples.min()], [samples.max()]],
            precisions_init=[[[1.0]], [[1.0]]],
            random_state=0,  # seeds only sklearn's discarded k-means initialisation
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gmm.fit(samples)
        means[row] = gmm.means_.ravel()
        variances[row] = gmm.covariances_.ravel()
        weights[row] = gmm.weights_
        converged[row] = gmm.converged_
        n_iter[row] = gmm.n_iter_
        labels[row, mask_np[row]] = gmm.predict(samples)
        log_density[row, mask_np[row]] = gmm.score_samples(samples)

    def to_tensor(array: np.ndarray) -> Tensor:
        return torch.from_numpy(array).to(x.device)

    return GMMFit(
        means=to_tensor(means),
        variances=to_tensor(variances),
        weights=to_tensor(weights),
        converged=to_tensor(converged),
        n_iter=to_tensor(n_iter),
        labels=to_tensor(labels),
        log_density=to_tensor(log_density),
    )


_FITTERS = {"torch": fit_gmm_batched, "sklearn": fit_gmm_sklearn}  # keyed by GMM_BACKENDS


def fit_gmm(x: Tensor, mask: Tensor, *, backend: str = "torch", **em_params: float) -> GMMFit:
    """Dispatch to ``fit_gmm_batched`` ("torch") or ``fit_gmm_sklearn`` ("sklearn").

    ``backend`` is one of ``GMM_BACKENDS`` (``PAAAssigner`` checks it; not checked here).
    x: (N, K), mask: (N, K) bool, as the backends take them. Returns a ``GMMFit``.
    """
    return _FITTERS[backend](x, mask, **em_params)


__all__ = [
    "DEFAULT_MAX_ITER",
    "DEFAULT_REG_COVAR",
    "DEFAULT_TOL",
    "GMM_BACKENDS",
    "GMMFit",
    "fit_gmm",
    "fit_gmm_batched",
    "fit_gmm_sklearn",
]
