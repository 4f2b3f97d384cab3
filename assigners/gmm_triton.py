"""The two-component EM of ``gmm.fit_gmm_batched`` as one fused Triton kernel (backend "triton").

One program fits one row (one GT's candidate losses, at most K of them, padded to ``BLOCK_K``,
the next power of two of K): it loads the row once, runs sklearn's EM loop with its own
convergence test (``while`` the row has not converged and fewer than ``max_iter`` iterations
ran), then the final E-step, and writes the same ``GMMFit`` as ``fit_gmm_batched``. The whole
fit is one launch, where the batched torch EM issues a few dozen small ops per iteration.

Every step restates ``gmm._weighted_log_prob``, ``gmm._logsumexp_pair`` and the M-step of
``gmm._em`` with the same operation order and the same float32 roundings (``dtype``; see
``gmm``'s docstring), so the kernel and the torch EM agree to float64 rounding: the sums are
tree reductions here and sequential sums there, and the float64 ``exp``/``log`` are CUDA's
libdevice here and PyTorch's there, so the last bits may differ. ``log1p`` is not in Triton's
core language (nor in its CPU interpreter), so it is ``log(u) * s / (u - 1)`` with u = 1 + s
(Goldberg's form, accurate to a few ulps). Fp contraction is off (``enable_fp_fusion=False``)
and float32 square roots and divisions are the IEEE ones (``sqrt_rn``, ``div_rn``): a fused
multiply-add or Triton's approximate float32 ``sqrt`` and ``/`` would round where sklearn
does not. Scalars that need float64 (tol, reg_covar, the n_k floor, log 2 pi, log 2) come in a
float64 tensor: Triton types Python float arguments and literals as float32.

Tensors: CUDA tensors on a GPU; with ``TRITON_INTERPRET=1`` in the environment before this
module is imported (it is imported with ``assigners``), Triton's interpreter runs the same
kernel on CPU tensors with numpy (slow; the tests use it). Without Triton (CPU-only PyTorch
builds) the module still imports and ``TRITON_AVAILABLE`` is False.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .gmm import (
    _LOG_2,
    _LOG_2PI,
    _NK_FLOOR,
    DEFAULT_MAX_ITER,
    DEFAULT_REG_COVAR,
    DEFAULT_TOL,
    GMMFit,
    _check_em_params,
    _check_samples,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch builds ship without Triton
    triton = None
TRITON_AVAILABLE = triton is not None


if TRITON_AVAILABLE:

    @triton.jit
    def _weighted_log_prob(x, mean, precision, log_weight, log_2pi, FLOAT32: tl.constexpr):
        """(BLOCK_K,) float64 log w + log N(x | mean, 1 / precision^2); ``gmm._weighted_log_prob``.

        x and precision in the EM dtype, mean, log_weight and log_2pi float64 scalars."""
        if FLOAT32:
            scaled = (x * precision).to(tl.float64)
            y = scaled - mean * precision.to(tl.float64)
            squared = (y * y).to(tl.float32)
            log_det = tl.log(precision.to(tl.float64)).to(tl.float32)
            log_gauss = -0.5 * (squared + log_2pi.to(tl.float32)) + log_det
            return log_gauss.to(tl.float64) + log_weight
        else:
            y = x * precision - mean * precision
            return -0.5 * (y * y + log_2pi) + tl.log(precision) + log_weight

    @triton.jit
    def _logsumexp_pair(a, b, log_2):
        """sklearn's ``_logsumexp`` of two values, elementwise; ``gmm._logsumexp_pair``."""
        high = tl.maximum(a, b)
        low = tl.minimum(a, b)
        s = tl.exp(low - high)
        u = 1.0 + s
        log1p = tl.where(u == 1.0, s, tl.log(u) * (s / tl.where(u == 1.0, 1.0, u - 1.0)))
        return tl.where(low == high, high + log_2, log1p + high)

    @triton.jit
    def _precision_cholesky(variance, FLOAT32: tl.constexpr):
        """1 / sqrt(variance), IEEE-rounded in float32 as numpy/LAPACK."""
        if FLOAT32:
            return tl.div_rn(tl.full((), 1.0, tl.float32), tl.sqrt_rn(variance))
        else:
            return 1.0 / tl.sqrt(variance)

    @triton.jit
    def _em_kernel(
        x_ptr,  # (N, K) float64 samples (rounded to the EM dtype), 0 where padded
        mask_ptr,  # (N, K) uint8, 1 for a valid sample
        params_ptr,  # (5,) float64: tol, reg_covar, n_k floor, log 2 pi, log 2
        means_ptr,  # (N, 2) float64 out
        variances_ptr,  # (N, 2) float64 out
        weights_ptr,  # (N, 2) float64 out
        converged_ptr,  # (N,) uint8 out
        n_iter_ptr,  # (N,) int64 out
        labels_ptr,  # (N, K) int64 out
        log_density_ptr,  # (N, K) float64 out
        num_samples,  # K
        max_iter,
        BLOCK_K: tl.constexpr,
        FLOAT32: tl.constexpr,  # the EM dtype is float32 (else float64)
        DTYPE: tl.constexpr,  # the EM dtype, tl.float32 or tl.float64
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_K)
        offsets = row * num_samples + cols
        valid = tl.load(mask_ptr + offsets, mask=cols < num_samples, other=0) != 0
        x64 = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        x = x64.to(DTYPE)
        valid_f = tl.where(valid, 1.0, 0.0).to(tl.float64)
        num_valid = tl.sum(valid_f, axis=0)
        tol = tl.load(params_ptr)
        reg_covar = tl.load(params_ptr + 1).to(DTYPE)
        nk_floor = tl.load(params_ptr + 2)
        log_2pi = tl.load(params_ptr + 3)
        log_2 = tl.load(params_ptr + 4)

        # Initialisation of the official code: means at min / max, unit precisions, w = 0.5.
        mean0 = tl.min(tl.where(valid, x64, float("inf")), axis=0)
        mean1 = tl.max(tl.where(valid, x64, float("-inf")), axis=0)
        precision0 = tl.full((), 1.0, DTYPE)
        precision1 = tl.full((), 1.0, DTYPE)
        variance0 = tl.full((), 1.0, DTYPE)
        variance1 = tl.full((), 1.0, DTYPE)
        weight0 = tl.full((), 0.5, tl.float64)
        weight1 = tl.full((), 0.5, tl.float64)
        lower_bound = tl.full((), float("-inf"), tl.float64)
        n_iter = 0
        converged = 0
        while (n_iter < max_iter) & (converged == 0):
            # E-step.
            weighted0 = _weighted_log_prob(x, mean0, precision0, tl.log(weight0), log_2pi, FLOAT32)
            weighted1 = _weighted_log_prob(x, mean1, precision1, tl.log(weight1), log_2pi, FLOAT32)
            log_norm = _logsumexp_pair(weighted0, weighted1, log_2)
            resp0 = tl.exp(weighted0 - log_norm) * valid_f
            resp1 = tl.exp(weighted1 - log_norm) * valid_f
            bound = tl.sum(log_norm * valid_f, axis=0) / num_valid
            # M-step (float64; the variance is stored, and reg_covar added, in the EM dtype).
            nk0 = tl.sum(resp0, axis=0) + nk_floor
            nk1 = tl.sum(resp1, axis=0) + nk_floor
            mean0 = tl.sum(resp0 * x64, axis=0) / nk0
            mean1 = tl.sum(resp1 * x64, axis=0) / nk1
            diff0 = x64 - mean0
            diff1 = x64 - mean1
            variance0 = (tl.sum(resp0 * diff0 * diff0, axis=0) / nk0).to(DTYPE) + reg_covar
            variance1 = (tl.sum(resp1 * diff1 * diff1, axis=0) / nk1).to(DTYPE) + reg_covar
            precision0 = _precision_cholesky(variance0, FLOAT32)
            precision1 = _precision_cholesky(variance1, FLOAT32)
            total = nk0 + nk1
            weight0 = nk0 / total
            weight1 = nk1 / total
            # Convergence on the change of the lower bound (the first iteration compares with -inf).
            converged = (tl.abs(bound - lower_bound) < tol).to(tl.int32)
            lower_bound = bound
            n_iter += 1

        # Final E-step with the kept parameters: labels (ties to 0) and log-density.
        weighted0 = _weighted_log_prob(x, mean0, precision0, tl.log(weight0), log_2pi, FLOAT32)
        weighted1 = _weighted_log_prob(x, mean1, precision1, tl.log(weight1), log_2pi, FLOAT32)
        labels = tl.where(valid, tl.where(weighted1 > weighted0, 1, 0), -1).to(tl.int64)
        log_density = tl.where(valid, _logsumexp_pair(weighted0, weighted1, log_2), float("-inf"))
        in_row = cols < num_samples
        tl.store(labels_ptr + offsets, labels, mask=in_row)
        tl.store(log_density_ptr + offsets, log_density, mask=in_row)
        tl.store(means_ptr + 2 * row, mean0)
        tl.store(means_ptr + 2 * row + 1, mean1)
        tl.store(variances_ptr + 2 * row, variance0.to(tl.float64))
        tl.store(variances_ptr + 2 * row + 1, variance1.to(tl.float64))
        tl.store(weights_ptr + 2 * row, weight0)
        tl.store(weights_ptr + 2 * row + 1, weight1)
        tl.store(converged_ptr + row, converged.to(tl.uint8))
        tl.store(n_iter_ptr + row, n_iter.to(tl.int64))


def _interpreted() -> bool:
    """Whether Triton's CPU interpreter runs the kernel (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_em_kernel, InterpretedFunction)


@torch.no_grad()
def fit_gmm_triton(
    x: Tensor,
    mask: Tensor,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    reg_covar: float = DEFAULT_REG_COVAR,
    dtype: torch.dtype = torch.float64,
) -> GMMFit:
    """``fit_gmm_batched`` as one Triton launch, one program per row.

    x: (N, K) samples, mask: (N, K) bool, True for a valid sample (>= 2 per row, finite in
    ``dtype``); dtype: the EM precision, torch.float64 or torch.float32 (as ``fit_gmm_batched``).
    x must be a CUDA tensor, or a CPU tensor under ``TRITON_INTERPRET=1``. Returns a ``GMMFit``
    on x's device.
    """
    _check_em_params(max_iter, tol, reg_covar, dtype)
    _check_samples(x, mask, dtype)
    if not TRITON_AVAILABLE:
        raise RuntimeError("the triton GMM backend needs Triton, which this PyTorch build lacks; use 'torch'")
    if x.device.type != "cuda" and not _interpreted():
        raise ValueError(f"the triton GMM backend runs on CUDA tensors (or under TRITON_INTERPRET=1), got {x.device}")
    n, k = x.shape
    device = x.device
    samples = torch.where(mask, x.to(dtype), 0.0).to(torch.float64).contiguous()
    means = torch.zeros(n, 2, dtype=torch.float64, device=device)
    variances = torch.zeros_like(means)
    weights = torch.zeros_like(means)
    converged = torch.zeros(n, dtype=torch.uint8, device=device)
    n_iter = torch.zeros(n, dtype=torch.int64, device=device)
    labels = torch.full((n, k), -1, dtype=torch.int64, device=device)
    log_density = torch.full((n, k), float("-inf"), dtype=torch.float64, device=device)
    if n > 0:
        params = torch.tensor([tol, reg_covar, _NK_FLOOR, _LOG_2PI, _LOG_2], dtype=torch.float64, device=device)
        block_k = max(16, triton.next_power_of_2(k))
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            _em_kernel[(n,)](
                samples, mask.contiguous().view(torch.uint8), params,
                means, variances, weights, converged, n_iter, labels, log_density,
                k, max_iter,
                BLOCK_K=block_k,
                FLOAT32=dtype == torch.float32,
                DTYPE=tl.float32 if dtype == torch.float32 else tl.float64,
                num_warps=min(8, max(1, block_k // 128)),
                enable_fp_fusion=False,
            )  # fmt: skip
    return GMMFit(
        means=means,
        variances=variances,
        weights=weights,
        converged=converged.bool(),
        n_iter=n_iter,
        labels=labels,
        log_density=log_density,
    )


__all__ = ["TRITON_AVAILABLE", "fit_gmm_triton"]
