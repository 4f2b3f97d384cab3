"""Two-component 1-D Gaussian mixture fitted by EM, batched over GTs (PAA Sec. 3.1).

PAA models the losses of each GT's candidate anchors as a two-component mixture
(component 0 = foreground, 1 = background) and fits it with EM. The official code fits
one ``sklearn.mixture.GaussianMixture`` per GT with

    n_components=2, weights_init=[0.5, 0.5], means_init=[[min], [max]],
    precisions_init=[[[1.0]], [[1.0]]]

and sklearn's defaults otherwise (covariance_type "full", reg_covar 1e-6, tol 1e-3,
max_iter 100, n_init 1; the k-means initialisation sklearn still runs is overridden by
these explicit initial values). ``fit_gmm_batched`` reproduces that fit step for step for
all GTs at once (on numpy for CPU tensors, as PyTorch ops on other devices); ``fit_gmm_triton``
(``gmm_triton``) runs the same EM as one fused Triton kernel, one program per GT;
``fit_gmm_sklearn`` is the per-GT sklearn loop, kept as the oracle for tests and as the speed
baseline. ``fit_gmm`` picks one by name (``GMM_BACKENDS``); "auto" is the Triton kernel for
CUDA tensors (when Triton is installed), the batched EM otherwise.

sklearn details reproduced (``sklearn/mixture/_base.py``, ``_gaussian_mixture.py``):
- E-step: log N(x | mu, var) = -0.5 (log 2 pi + y^2) + log p with p = 1/sqrt(var) and
  y = x p - mu p; weighted by log w; normalised with sklearn's ``_logsumexp`` (for two
  values a < b: b + log1p(exp(a - b)); for a == b: b + log 2).
- The lower bound of an iteration is the mean log-likelihood per sample from its E-step.
- M-step: n_k = sum of responsibilities + 10 * eps(float64); mu = sum(r x) / n_k;
  var = sum(r (x - mu)^2) / n_k + reg_covar; w = n_k / sum(n_k).
- Convergence: |lower_bound - previous lower_bound| < tol (the first iteration compares
  with -inf, so never converges); the parameters kept are those after that M-step.
- A final E-step with the kept parameters gives the labels (argmax of the weighted log
  probability, ties to component 0, as ``numpy.argmax``) and ``score_samples``.

Precision (``dtype``, ``GMM_DTYPES``). The official code hands sklearn the float32 losses of
the network, and sklearn then fits in a mix of float32 and float64 that ``dtype=float32``
reproduces: the samples are rounded to float32; the weights, the responsibilities, the
means, n_k and the lower bound stay float64 (``weights_init`` and ``precisions_init`` are
Python floats, so float64 arrays, and they promote the responsibilities and means); but
every value sklearn writes into an array of X's dtype is rounded to float32: x p
(``X @ precisions_cholesky``), the squared distance y^2, the log-Gaussian
-0.5 (log 2 pi + y^2) + log p (``log_det`` is float32 from the second iteration on),
the variance (reg_covar added in float32) and p = 1/sqrt(var). n_k's floor is still
10 * eps(float64), since the responsibilities are float64. ``dtype=float64`` computes
everything in float64 (sklearn fed float64 samples). One op cannot be matched bit for bit:
sklearn takes log p with numpy's float32 ``log``, whose SIMD code is not correctly rounded
(1 ulp off for about 7% of inputs on an AVX2 machine, and machine dependent); here log p is
the float64 log rounded to float32, the same on every device and backend. The float32 fit
therefore agrees with sklearn's to about float32 resolution, not bit for bit (the tests
measure it). Results are float64 tensors in both precisions (float32 values where sklearn
holds float32, e.g. the variances).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-3
DEFAULT_REG_COVAR = 1e-6
GMM_BACKENDS = ("auto", "torch", "triton", "sklearn")
GMM_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # the EM precision, by config name

_LOG_2PI = math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)
_NK_FLOOR = 10.0 * torch.finfo(torch.float64).eps  # sklearn: 10 * eps of the (float64) responsibilities


@dataclass(frozen=True)
class GMMFit:
    """Fitted two-component mixtures, one per row of the (N, K) input.

    means, variances, weights: (N, 2) float64; component 0 was initialised at the row's
        minimum (foreground in PAA), component 1 at its maximum. ``variances`` include
        ``reg_covar`` (sklearn's ``covariances_``); with ``dtype=float32`` they hold the
        float32 values sklearn holds.
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


def _check_samples(x: Tensor, mask: Tensor, dtype: torch.dtype) -> None:
    if x.dim() != 2 or mask.shape != x.shape or mask.dtype != torch.bool:
        raise ValueError(f"x must be (N, K) with a bool mask of the same shape, got {tuple(x.shape)} and {tuple(mask.shape)}")
    if x.numel() and bool((mask.sum(dim=1) < 2).any()):
        raise ValueError("every row needs at least 2 valid samples to fit 2 components (as sklearn)")
    if bool((mask & ~torch.isfinite(x.to(dtype))).any()):
        raise ValueError(f"valid samples must be finite (in {str(dtype).removeprefix('torch.')}, the EM precision)")


def _check_em_params(max_iter: int, tol: float, reg_covar: float, dtype: torch.dtype) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if tol < 0.0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if reg_covar < 0.0:
        raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")
    if dtype not in GMM_DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def _weighted_log_prob(x: Tensor, means: Tensor, precisions: Tensor, weights: Tensor) -> Tensor:
    """(N, K, 2) float64 log w_k + log N(x | mu_k, 1 / p_k^2) of samples x (N, K, 1).

    x and precisions p (the precision Cholesky factor, (N, 2)) are in the EM dtype, means and
    weights (N, 2) in float64. In float32 the casts round where sklearn stores into float32
    arrays (module docstring); in float64 they are no-ops.
    """
    dtype = x.dtype
    scaled = (x * precisions.unsqueeze(1)).to(torch.float64)  # X @ precisions_cholesky
    y = scaled - (means * precisions.to(torch.float64)).unsqueeze(1)
    squared = (y * y).to(dtype)
    log_det = torch.log(precisions.to(torch.float64)).to(dtype)
    log_gauss = -0.5 * (squared + _LOG_2PI) + log_det.unsqueeze(1)
    return log_gauss.to(torch.float64) + torch.log(weights).unsqueeze(1)


def _logsumexp_pair(weighted_log_prob: Tensor) -> Tensor:
    """(...) sklearn's ``_logsumexp`` over the last dimension of size 2 (module docstring)."""
    high = weighted_log_prob.amax(dim=-1)
    low = weighted_log_prob.amin(dim=-1)
    return torch.where(low == high, high + _LOG_2, torch.log1p(torch.exp(low - high)) + high)


def _precision_cholesky(variances: Tensor) -> Tensor:
    """Cholesky factor of the precision of 1-D components, 1 / sqrt(variance), in the variances' dtype.

    The float32 square root is taken in float64 and rounded: PyTorch's vectorised CPU ``sqrt``
    is not correctly rounded (measured: 17% of float32 inputs 1 ulp off), LAPACK's ``spotrf``
    in sklearn is, and the float64 root rounded to float32 is too.
    """
    return 1.0 / torch.sqrt(variances.to(torch.float64)).to(variances.dtype)


def _predict(weighted_log_prob: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Labels (argmax, ties to 0) and log-density of a final E-step; padded entries masked."""
    labels = (weighted_log_prob[..., 1] > weighted_log_prob[..., 0]).long()
    log_density = _logsumexp_pair(weighted_log_prob)
    return labels.masked_fill(~mask, -1), log_density.masked_fill(~mask, float("-inf"))


@torch.no_grad()
def fit_gmm_batched(
    x: Tensor,
    mask: Tensor,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    reg_covar: float = DEFAULT_REG_COVAR,
    dtype: torch.dtype = torch.float64,
) -> GMMFit:
    """Fit one two-component 1-D mixture per row by EM, all rows at once.

    x: (N, K) samples, mask: (N, K) bool, True for a valid sample; every row needs >= 2
    valid samples, finite in ``dtype``. dtype: the EM precision, torch.float64 (sklearn fed
    float64) or torch.float32 (sklearn fed float32, as the official code; module
    docstring). Results on x's device: the loop runs on numpy for CPU tensors (``_em_numpy``),
    as PyTorch ops on other devices (``_em``). Each row follows sklearn's loop on its own valid
    samples: a row that has converged keeps its parameters while the others iterate, so a
    row's fit never depends on the other rows. Returns a ``GMMFit``.
    """
    _check_em_params(max_iter, tol, reg_covar, dtype)
    _check_samples(x, mask, dtype)
    em = _em_numpy if x.device.type == "cpu" else _em
    return em(x, mask, max_iter, tol, reg_covar, dtype)


def _em(x: Tensor, mask: Tensor, max_iter: int, tol: float, reg_covar: float, dtype: torch.dtype) -> GMMFit:
    """The EM loop of ``fit_gmm_batched`` for tensors off the CPU (validated inputs); ``_em_numpy``
    runs the same loop on CPU tensors.

    A row's parameters are stored at the iteration it converges (later updates of it are
    ignored), and once at most half of the rows in the loop are still pending, the loop goes on
    with those alone, so late iterations cost what the slow rows need. Every step is row by row:
    a row's result does not depend on which other rows are in the loop (the same values, bit for
    bit, as updating every row in place until all have converged).
    """
    x = torch.where(mask, x.to(dtype), 0.0)  # (N, K) samples in the EM dtype
    x64 = x.to(torch.float64)
    n, _ = x.shape
    device = x.device
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)

    # Initialisation of the official code: means at min / max, unit precisions, w = 0.5.
    means = torch.stack([torch.where(mask, x64, inf).amin(dim=1), torch.where(mask, x64, -inf).amax(dim=1)], dim=1)
    precisions = torch.ones_like(means, dtype=dtype)  # Cholesky factor of the precision, 1 / std
    weights = torch.full_like(means, 0.5)
    fitted = torch.zeros(n, 6, dtype=torch.float64, device=device)  # means, variances, weights
    converged = torch.zeros(n, dtype=torch.bool, device=device)
    n_iter = torch.zeros(n, dtype=torch.int64, device=device)

    # The rows in the loop (pending or already stored), and their samples.
    rows = torch.arange(n, device=device)
    pending = torch.ones(n, dtype=torch.bool, device=device)
    row_x, row_x64, row_mask = x.unsqueeze(-1), x64.unsqueeze(-1), mask.to(torch.float64)  # (n, K, 1) x2, (n, K)
    num_valid = row_mask.sum(dim=1)  # (n,)
    lower_bound = torch.full((n,), float("-inf"), dtype=torch.float64, device=device)
    last_iteration = max_iter if n > 0 else 0  # no rows, nothing to iterate
    for iteration in range(1, last_iteration + 1):
        # E-step.
        weighted = _weighted_log_prob(row_x, means, precisions, weights)
        log_norm = _logsumexp_pair(weighted)  # (n, K)
        resp = torch.exp(weighted - log_norm.unsqueeze(-1)).mul_(row_mask.unsqueeze(-1))
        new_bound = (log_norm * row_mask).sum(dim=1) / num_valid
        # M-step (float64; the variance is stored, and reg_covar added, in the EM dtype).
        nk = resp.sum(dim=1) + _NK_FLOOR  # (n, 2)
        means = (resp * row_x64).sum(dim=1) / nk
        diff = row_x64 - means.unsqueeze(1)
        variances = ((resp * diff * diff).sum(dim=1) / nk).to(dtype) + reg_covar
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
        fitted[leaving] = torch.cat([means, variances.to(torch.float64), weights], dim=1)[index]
        converged[leaving] = done[index]
        n_iter[leaving] = iteration
        pending[index] = False
        num_pending = int(pending.sum())
        if num_pending == 0:
            break
        if 2 * num_pending <= rows.numel():
            keep = pending.nonzero().squeeze(1)
            rows, pending, row_mask, num_valid = rows[keep], pending[keep], row_mask[keep], num_valid[keep]
            row_x, row_x64 = row_x[keep], row_x64[keep]
            means, precisions, weights, lower_bound = means[keep], precisions[keep], weights[keep], lower_bound[keep]

    means, variances, weights = (part.contiguous() for part in fitted.view(n, 3, 2).unbind(dim=1))
    final = _weighted_log_prob(x.unsqueeze(-1), means, _precision_cholesky(variances.to(dtype)), weights)
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


def _weighted_log_prob_numpy(
    samples: np.ndarray,
    precisions: np.ndarray,
    mean_precisions: np.ndarray,
    log_det: np.ndarray,
    log_weights: np.ndarray,
    rounded: np.ndarray,
    out: np.ndarray,
) -> None:
    """``_weighted_log_prob`` on numpy arrays, written into ``out`` (2, n, K) float64.

    samples: (n, K) in the EM dtype; precisions p and log_det = log p (the float64 log, rounded):
    (2, n, 1) in the EM dtype; mean_precisions mu p and log_weights: (2, n, 1) float64. rounded:
    (2, n, K) scratch in the EM dtype, ``out`` itself in float64: in float32 it rounds x p, y^2 and
    the log-Gaussian where sklearn does (module docstring), in the order of ``_weighted_log_prob``.
    Python-float constants are added in the array's dtype, as PyTorch and numpy both do.
    """
    np.multiply(samples, precisions, out=rounded)  # X @ precisions_cholesky
    np.subtract(rounded, mean_precisions, out=out)  # y, float64
    np.multiply(out, out, out=rounded)
    np.add(rounded, _LOG_2PI, out=rounded)
    np.multiply(rounded, -0.5, out=rounded)
    np.add(rounded, log_det, out=rounded)  # the log-Gaussian
    np.add(rounded, log_weights, out=out)


def _logsumexp_pair_numpy(weighted_log_prob: np.ndarray, high: np.ndarray, out: np.ndarray) -> None:
    """``_logsumexp_pair`` over the first axis of ``weighted_log_prob`` (2, n, K), into ``out`` (n, K).

    high: (n, K) scratch. Ties need no branch: exp(0) is 1, and log1p(1) is log 2 (to the last bit
    with glibc's libm), which ``_logsumexp_pair`` adds.
    """
    np.maximum(weighted_log_prob[0], weighted_log_prob[1], out=high)
    np.minimum(weighted_log_prob[0], weighted_log_prob[1], out=out)
    np.subtract(out, high, out=out)
    np.exp(out, out=out)
    np.log1p(out, out=out)
    np.add(out, high, out=out)


def _precision_cholesky_numpy(variances: np.ndarray) -> np.ndarray:
    """``_precision_cholesky``: 1 / sqrt(variance) in the variances' dtype.

    numpy's float32 ``sqrt`` is correctly rounded (IEEE), so it equals the float64 root rounded to
    float32 (double rounding cannot change a square root; checked on 2e7 float32 values).
    """
    return 1.0 / np.sqrt(variances)


class _EMBuffers(NamedTuple):
    """Work arrays of ``_em_numpy`` for n rows of K samples, allocated when the rows in the loop change."""

    rounded: np.ndarray  # (2, n, K) the E-step's stages in the EM dtype (``weighted`` itself in float64)
    weighted: np.ndarray  # (2, n, K) weighted log-probabilities
    stacked: np.ndarray  # (3, n, 1, K) rows r_0, r_1 and the log-norm: one matmul sums each over samples
    resp: np.ndarray  # (2, n, K) view of stacked: the responsibilities
    log_norm: np.ndarray  # (n, K) view of stacked
    diff: np.ndarray  # (2, n, K) x - mu
    diff_columns: np.ndarray  # (2, n, K, 1) view of diff, for a matmul with r (x - mu) as rows
    high: np.ndarray  # (n, K) the larger of the two weighted log-probabilities


def _em_buffers(n: int, k: int, em_dtype: type) -> _EMBuffers:
    """``_EMBuffers`` for n rows of K samples, the E-step's stages in ``em_dtype``."""
    weighted = np.empty((2, n, k))
    rounded = weighted if em_dtype == np.float64 else np.empty((2, n, k), dtype=em_dtype)
    stacked = np.empty((3, n, 1, k))
    diff = np.empty((2, n, k))
    return _EMBuffers(rounded, weighted, stacked, stacked[:2, :, 0], stacked[2, :, 0], diff, diff[..., None], np.empty((n, k)))


def _em_numpy(x: Tensor, mask: Tensor, max_iter: int, tol: float, reg_covar: float, dtype: torch.dtype) -> GMMFit:
    """The EM loop of ``_em`` on numpy arrays, for CPU tensors (validated inputs).

    Same steps, roundings and rows in the loop as ``_em``; the sums over samples are matrix
    products (BLAS) and exp / log are numpy's, so the values agree with ``_em``'s to float64
    rounding. On a small batch the loop costs what issuing its ops costs, not their arithmetic (PAA
    on 8 digits images: 19 rows, 29 iterations), and a numpy ufunc writing into an existing array
    costs a fraction of a PyTorch CPU op that allocates its result: so the loop runs on numpy, about
    40 calls an iteration, with the components as a leading axis of size 2, the (2, n, K) stages
    written into arrays allocated when the rows in the loop change, and n_k, the sums of r x and the
    lower bound's sum from one matrix product with [1, x] (3-4x faster than ``_em`` on the CPU, on
    the digits and COCO-like batches of ``benchmarks.assign``).
    """
    em_dtype = np.float32 if dtype == torch.float32 else np.float64
    n, k = x.shape
    valid = mask.numpy()
    samples = np.where(valid, x.detach().to(dtype).numpy(), 0)  # (n, K) in the EM dtype, 0 where padded
    samples64 = samples.astype(np.float64)
    sample_weight = valid.astype(np.float64)  # 1 for a valid sample, 0 for padding
    reg_covar = float(reg_covar)  # a Python float, added in the EM dtype

    # Initialisation of the official code: means at min / max, unit precisions, w = 0.5. Per-row
    # parameters are (2, rows, 1): component, row, and a unit axis that broadcasts over samples.
    means = np.empty((2, n, 1))
    np.minimum.reduce(samples64, axis=1, where=valid, initial=np.inf, out=means[0, :, 0])
    np.maximum.reduce(samples64, axis=1, where=valid, initial=-np.inf, out=means[1, :, 0])
    precisions = np.ones((2, n, 1), dtype=em_dtype)  # Cholesky factor of the precision, 1 / std
    log_det = np.zeros((2, n, 1), dtype=em_dtype)  # log p
    mean_precisions = means  # mu p
    log_weights = np.full((2, n, 1), math.log(0.5))
    fitted = np.zeros((n, 3, 2))  # means, variances, weights
    converged = np.zeros(n, dtype=bool)
    n_iter = np.zeros(n, dtype=np.int64)

    # The rows in the loop (pending or already stored), and their samples.
    rows = np.arange(n)
    pending = np.ones(n, dtype=bool)
    row_x, row_x64, row_weight = samples, samples64, sample_weight
    row_weight_x = np.stack([row_weight, row_x64], axis=2)  # (n, K, 2): [1, x] for valid samples, 0 for padding
    num_valid = row_weight.sum(axis=1)
    lower_bound = np.full(n, -np.inf)
    rounded, weighted, stacked, resp, log_norm, diff, diff_columns, high = _em_buffers(n, k, em_dtype)
    last_iteration = max_iter if n > 0 else 0  # no rows, nothing to iterate
    with np.errstate(all="ignore"):  # as PyTorch: a degenerate row gives inf or nan, not a warning
        for iteration in range(1, last_iteration + 1):
            # E-step.
            _weighted_log_prob_numpy(row_x, precisions, mean_precisions, log_det, log_weights, rounded, weighted)
            _logsumexp_pair_numpy(weighted, high, log_norm)
            np.subtract(weighted, log_norm, out=resp)
            np.exp(resp, out=resp)
            # One product with [1, x] sums over the valid samples (3, n, 1, 2): each component's r and
            # r x, and the log-norm.
            sums = np.matmul(stacked, row_weight_x)
            new_bound = sums[2, :, 0, 0] / num_valid
            # M-step (float64; the variance is stored, and reg_covar added, in the EM dtype).
            nk = sums[:2, :, :, 0] + _NK_FLOOR  # (2, n, 1)
            means = sums[:2, :, :, 1] / nk
            np.subtract(row_x64, means, out=diff)
            np.multiply(resp, row_weight, out=resp)  # padded samples out of the variance
            np.multiply(resp, diff, out=resp)
            variances = (np.matmul(stacked[:2], diff_columns)[..., 0] / nk).astype(em_dtype) + reg_covar
            precisions = _precision_cholesky_numpy(variances)
            precisions64 = precisions.astype(np.float64)
            log_det = np.log(precisions64).astype(em_dtype)
            mean_precisions = means * precisions64
            weights = nk / (nk[0] + nk[1])
            log_weights = np.log(weights)
            # Convergence on the change of the lower bound (the first iteration compares with -inf).
            done = np.abs(new_bound - lower_bound) < tol
            lower_bound = new_bound
            finished = done & pending if iteration < max_iter else pending
            if not np.count_nonzero(finished):
                continue
            index = np.flatnonzero(finished)
            leaving = rows[index]
            stored = np.concatenate([means, variances.astype(np.float64), weights], axis=2)  # (2, n, 3)
            fitted[leaving] = stored[:, index].transpose(1, 2, 0)
            converged[leaving] = done[index]
            n_iter[leaving] = iteration
            pending[index] = False
            num_pending = np.count_nonzero(pending)
            if num_pending == 0:
                break
            if 2 * num_pending <= rows.size:
                keep = np.flatnonzero(pending)
                rows, pending, row_x, row_x64, row_weight, row_weight_x, num_valid, lower_bound = (
                    part[keep]
                    for part in (rows, pending, row_x, row_x64, row_weight, row_weight_x, num_valid, lower_bound)
                )
                precisions, log_det, mean_precisions, log_weights = (
                    part[:, keep] for part in (precisions, log_det, mean_precisions, log_weights)
                )
                rounded, weighted, stacked, resp, log_norm, diff, diff_columns, high = _em_buffers(keep.size, k, em_dtype)

        # Final E-step with the kept parameters: labels (argmax, ties to 0) and log-density.
        means, variances, weights = (np.ascontiguousarray(fitted[:, part]) for part in range(3))  # (n, 2) each
        precisions = _precision_cholesky_numpy(variances.T[:, :, None].astype(em_dtype))
        precisions64 = precisions.astype(np.float64)
        log_det = np.log(precisions64).astype(em_dtype)
        rounded, weighted, _, _, log_density, _, _, high = _em_buffers(n, k, em_dtype)
        _weighted_log_prob_numpy(
            samples, precisions, means.T[:, :, None] * precisions64, log_det, np.log(weights.T[:, :, None]), rounded, weighted
        )
        _logsumexp_pair_numpy(weighted, high, log_density)
    labels = np.where(valid, weighted[1] > weighted[0], -1)
    log_density[~valid] = -np.inf
    return GMMFit(
        means=torch.from_numpy(means),
        variances=torch.from_numpy(variances),
        weights=torch.from_numpy(weights),
        converged=torch.from_numpy(converged),
        n_iter=torch.from_numpy(n_iter),
        labels=torch.from_numpy(labels),
        log_density=torch.from_numpy(log_density),
    )


def fit_gmm_sklearn(
    x: Tensor,
    mask: Tensor,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    reg_covar: float = DEFAULT_REG_COVAR,
    dtype: torch.dtype = torch.float64,
) -> GMMFit:
    """The official per-GT loop: one ``sklearn.mixture.GaussianMixture`` per row.

    Same arguments and result as ``fit_gmm_batched`` (results on x's device). Samples
    are passed to sklearn as numpy arrays of ``dtype``: float32 is the official code (it
    passes the float32 losses of the network), float64 the fit in double precision.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    _check_em_params(max_iter, tol, reg_covar, dtype)
    _check_samples(x, mask, dtype)
    n, k = x.shape
    x_np = x.detach().to(dtype).cpu().numpy()
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
            means_init=[[samples.min()], [samples.max()]],  # numpy scalars of dtype, as the official code
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


_FITTERS = {"torch": fit_gmm_batched, "sklearn": fit_gmm_sklearn}  # and "triton", imported on use


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for ``backend`` (one of ``GMM_BACKENDS``) on ``device``.

    "auto" is "triton" on CUDA when Triton is installed (it ships with CUDA builds of PyTorch),
    "torch" otherwise; the other names are returned as they are.
    """
    if backend != "auto":
        return backend
    from .gmm_triton import TRITON_AVAILABLE

    return "triton" if device.type == "cuda" and TRITON_AVAILABLE else "torch"


def fit_gmm(
    x: Tensor, mask: Tensor, *, backend: str = "auto", dtype: torch.dtype = torch.float64, **em_params: float
) -> GMMFit:
    """Dispatch to ``fit_gmm_batched`` ("torch"), ``fit_gmm_triton`` ("triton") or
    ``fit_gmm_sklearn`` ("sklearn"); "auto" as ``resolve_backend``.

    ``backend`` is one of ``GMM_BACKENDS`` (``PAAAssigner`` checks it; not checked here).
    x: (N, K), mask: (N, K) bool, dtype and em_params as the backends take them. Returns a
    ``GMMFit``.
    """
    backend = resolve_backend(backend, x.device)
    if backend == "triton":
        from .gmm_triton import fit_gmm_triton as fitter  # imports Triton only when asked for
    else:
        fitter = _FITTERS[backend]
    return fitter(x, mask, dtype=dtype, **em_params)


__all__ = [
    "DEFAULT_MAX_ITER",
    "DEFAULT_REG_COVAR",
    "DEFAULT_TOL",
    "GMM_BACKENDS",
    "GMM_DTYPES",
    "GMMFit",
    "fit_gmm",
    "fit_gmm_batched",
    "fit_gmm_sklearn",
    "resolve_backend",
]
