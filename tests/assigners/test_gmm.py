"""Batched two-component EM against sklearn's GaussianMixture, configured as the official PAA code."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from assigners.gmm import (
    DEFAULT_MAX_ITER,
    DEFAULT_REG_COVAR,
    DEFAULT_TOL,
    GMM_DTYPES,
    _em,
    fit_gmm,
    fit_gmm_batched,
    fit_gmm_sklearn,
    resolve_backend,
)
from assigners.gmm_triton import TRITON_AVAILABLE
from assigners.paa import PAA_SCHEMES, split_by_scheme

from .conftest import random_loss_rows, requires_cuda


def official_gmm(values: np.ndarray) -> GaussianMixture:
    """The GaussianMixture of kkhoot/PAA ``compute_paa``, fitted to one GT's losses (float32 there;
    the dtype of ``values`` here)."""
    samples = values.reshape(-1, 1)
    gmm = GaussianMixture(
        2,
        weights_init=[0.5, 0.5],
        means_init=[[samples.min()], [samples.max()]],
        precisions_init=[[[1.0]], [[1.0]]],
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(samples)
    return gmm


def test_matches_sklearn_on_varied_rows():
    loss, mask = random_loss_rows(seed=0, num_rows=400)
    fit = fit_gmm_batched(loss, mask)
    same_labels = 0
    for row in range(loss.shape[0]):
        values = loss[row, mask[row]].numpy()
        gmm = official_gmm(values)
        assert bool(fit.converged[row]) == gmm.converged_
        assert int(fit.n_iter[row]) == gmm.n_iter_
        if gmm.converged_:
            np.testing.assert_allclose(fit.means[row].numpy(), gmm.means_.ravel(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(fit.variances[row].numpy(), gmm.covariances_.ravel(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(fit.weights[row].numpy(), gmm.weights_, rtol=0, atol=1e-6)
        samples = values.reshape(-1, 1)
        np.testing.assert_allclose(fit.log_density[row, mask[row]].numpy(), gmm.score_samples(samples), rtol=1e-9, atol=1e-9)
        same_labels += bool(np.array_equal(fit.labels[row, mask[row]].numpy(), gmm.predict(samples)))
    # Labels may differ only where a sample lies exactly between two equal components.
    assert same_labels >= 0.99 * loss.shape[0]


def test_sklearn_backend_is_the_official_fit():
    loss, mask = random_loss_rows(seed=1, num_rows=30)
    fit = fit_gmm_sklearn(loss, mask)
    for row in range(loss.shape[0]):
        values = loss[row, mask[row]].numpy()
        gmm = official_gmm(values)
        np.testing.assert_array_equal(fit.means[row].numpy(), gmm.means_.ravel())
        np.testing.assert_array_equal(fit.labels[row, mask[row]].numpy(), gmm.predict(values.reshape(-1, 1)))
        assert bool((fit.labels[row, ~mask[row]] == -1).all())
        assert bool(torch.isneginf(fit.log_density[row, ~mask[row]]).all())


def test_well_separated_modes_by_hand():
    values = torch.tensor([[0.0, 0.1, 0.2, 10.0, 10.1, 10.2]], dtype=torch.float64)
    fit = fit_gmm_batched(values, torch.ones_like(values, dtype=torch.bool))
    torch.testing.assert_close(fit.means[0], torch.tensor([0.1, 10.1], dtype=torch.float64))
    torch.testing.assert_close(fit.weights[0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    # Variance of {0, 0.1, 0.2} is 0.02 / 3, plus reg_covar 1e-6.
    torch.testing.assert_close(fit.variances[0], torch.full((2,), 0.02 / 3 + 1e-6, dtype=torch.float64))
    assert fit.labels[0].tolist() == [0, 0, 0, 1, 1, 1]
    assert bool(fit.converged[0])


def test_identical_values_have_no_nan():
    values = torch.full((2, 5), 3.0, dtype=torch.float64)
    mask = torch.ones_like(values, dtype=torch.bool)
    mask[1, 2:] = False
    fit = fit_gmm_batched(values, mask)
    for tensor in (fit.means, fit.variances, fit.weights, fit.log_density[mask]):
        assert bool(torch.isfinite(tensor).all())
    torch.testing.assert_close(fit.means, torch.full((2, 2), 3.0, dtype=torch.float64))
    # Equal components: every sample goes to component 0 (argmax ties), as sklearn.
    assert bool((fit.labels[mask] == 0).all())


def test_row_fit_does_not_depend_on_other_rows():
    loss, mask = random_loss_rows(seed=2, num_rows=40)
    batch = fit_gmm_batched(loss, mask)
    for row in (0, 7, 13, 29):
        alone = fit_gmm_batched(loss[row : row + 1], mask[row : row + 1])
        assert int(alone.n_iter[0]) == int(batch.n_iter[row])
        torch.testing.assert_close(alone.means[0], batch.means[row], rtol=0, atol=1e-12)
        assert torch.equal(alone.labels[0], batch.labels[row])


def test_max_iter_stops_unconverged_rows():
    loss, mask = random_loss_rows(seed=3, num_rows=20)
    fit = fit_gmm_batched(loss, mask, max_iter=2, tol=0.0)
    assert bool((fit.n_iter == 2).all())
    assert not bool(fit.converged.any())
    for row in range(3):
        values = loss[row, mask[row]].numpy().reshape(-1, 1)
        gmm = GaussianMixture(
            2, weights_init=[0.5, 0.5], means_init=[[values.min()], [values.max()]],
            precisions_init=[[[1.0]], [[1.0]]], max_iter=2, tol=0.0, random_state=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gmm.fit(values)
        np.testing.assert_allclose(fit.means[row].numpy(), gmm.means_.ravel(), atol=1e-9)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        fit_gmm_batched(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[True, False, False]]))
    with pytest.raises(ValueError, match="finite"):
        fit_gmm_batched(torch.tensor([[0.0, float("inf")]]), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_iter"):
        fit_gmm_batched(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), max_iter=0)


@pytest.mark.parametrize(("backend", "fit"), [("torch", fit_gmm_batched), ("sklearn", fit_gmm_sklearn)])
def test_fit_gmm_dispatches_to_the_named_backend(backend, fit):
    loss, mask = random_loss_rows(seed=5, num_rows=10)
    dispatched, direct = fit_gmm(loss, mask, backend=backend, max_iter=7), fit(loss, mask, max_iter=7)
    assert torch.equal(dispatched.means, direct.means) and torch.equal(dispatched.labels, direct.labels)
    assert torch.equal(dispatched.n_iter, direct.n_iter)


def test_sklearn_backend_in_float32_is_the_official_fit():
    # The official code hands sklearn float32 losses; sklearn then keeps float32 covariances.
    loss, mask = random_loss_rows(seed=1, num_rows=30)
    fit = fit_gmm_sklearn(loss, mask, dtype=torch.float32)
    for row in range(loss.shape[0]):
        values = loss[row, mask[row]].numpy().astype(np.float32)
        gmm = official_gmm(values)
        assert gmm.covariances_.dtype == np.float32
        np.testing.assert_array_equal(fit.means[row].numpy(), gmm.means_.ravel())
        np.testing.assert_array_equal(fit.variances[row].numpy(), gmm.covariances_.ravel())
        np.testing.assert_array_equal(fit.log_density[row, mask[row]].numpy(), gmm.score_samples(values.reshape(-1, 1)))


def test_float32_matches_sklearn_fed_float32():
    """dtype=float32 is sklearn given float32 samples, step for step, but for one op.

    sklearn takes log p (p = 1 / std, a float32) with numpy's float32 ``log``, whose SIMD code is
    1 ulp off the correctly rounded value for about 7% of inputs (machine dependent); ours is the
    float64 log rounded to float32. With numpy's log put in its place the two agree to 2e-15 (checked
    once by hand), so the differences below are that ulp (2^-24 relative) carried through the EM.
    Measured on 5000 such rows (seeds 0-4): labels, positive sets of every scheme, n_iter and
    converged all equal, and |log-density difference| <= 1.7e-6 * max(1, |log density|), i.e. a
    few float32 ulps of the log-density; the bound is 4x that.
    """
    loss, mask = random_loss_rows(seed=0, num_rows=400)
    ours = fit_gmm_batched(loss, mask, dtype=torch.float32)
    theirs = fit_gmm_sklearn(loss, mask, dtype=torch.float32)
    assert torch.equal(ours.n_iter, theirs.n_iter)
    assert torch.equal(ours.converged, theirs.converged)
    assert torch.equal(ours.labels, theirs.labels)
    scale = theirs.log_density[mask].abs().clamp(min=1.0)
    assert float(((ours.log_density[mask] - theirs.log_density[mask]).abs() / scale).max()) <= 7e-6
    torch.testing.assert_close(ours.variances, theirs.variances, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ours.weights, theirs.weights, rtol=0, atol=1e-5)
    for scheme in PAA_SCHEMES:
        ours_split = split_by_scheme(ours.labels, ours.log_density, mask, scheme)
        theirs_split = split_by_scheme(theirs.labels, theirs.log_density, mask, scheme)
        assert all(torch.equal(a, b) for a, b in zip(ours_split, theirs_split)), scheme


def test_float32_variances_are_float32_values():
    loss, mask = random_loss_rows(seed=6, num_rows=50)
    fit = fit_gmm_batched(loss, mask, dtype=torch.float32)
    assert fit.variances.dtype == torch.float64
    assert torch.equal(fit.variances, fit.variances.float().double())
    # The float64 fit of the same rows is not: the option really changes the precision.
    assert not torch.equal(fit_gmm_batched(loss, mask).variances, fit.variances)


def test_well_separated_modes_by_hand_in_float32():
    values = torch.tensor([[0.0, 0.1, 0.2, 10.0, 10.1, 10.2]], dtype=torch.float64)
    fit = fit_gmm_batched(values, torch.ones_like(values, dtype=torch.bool), dtype=torch.float32)
    rounded = values.float().double()[0]  # the samples as float32 values
    # Responsibilities are 1 within a cluster up to exp(-huge): means are the clusters' float64 means.
    torch.testing.assert_close(fit.means[0], torch.stack([rounded[:3].mean(), rounded[3:].mean()]), rtol=0, atol=1e-12)
    # Variance: the float64 variance rounded to float32, plus reg_covar in float32.
    expected = torch.stack([rounded[:3].var(unbiased=False), rounded[3:].var(unbiased=False)]).float() + 1e-6
    torch.testing.assert_close(fit.variances[0], expected.double(), rtol=1e-6, atol=0)
    assert fit.labels[0].tolist() == [0, 0, 0, 1, 1, 1]


def test_rejects_samples_not_finite_in_float32():
    x = torch.tensor([[0.0, 1e39]], dtype=torch.float64)  # finite in float64, inf in float32
    mask = torch.ones(1, 2, dtype=torch.bool)
    fit_gmm_batched(x, mask)
    with pytest.raises(ValueError, match="finite"):
        fit_gmm_batched(x, mask, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        fit_gmm_batched(x, mask, dtype=torch.float16)


def test_dtype_names_are_the_fit_dtypes():
    assert GMM_DTYPES == {"float32": torch.float32, "float64": torch.float64}


def test_auto_is_torch_on_cpu_and_triton_on_cuda():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == ("triton" if TRITON_AVAILABLE else "torch")
    assert resolve_backend("sklearn", torch.device("cuda")) == "sklearn"
    loss, mask = random_loss_rows(seed=5, num_rows=10)
    auto, batched = fit_gmm(loss, mask, dtype=torch.float32), fit_gmm_batched(loss, mask, dtype=torch.float32)
    assert torch.equal(auto.labels, batched.labels) and torch.equal(auto.log_density, batched.log_density)


@pytest.mark.parametrize("dtype", list(GMM_DTYPES))
def test_pytorch_loop_equals_the_numpy_loop(dtype):
    # fit_gmm_batched runs the EM on numpy for CPU tensors and as PyTorch ops (gmm._em) on other devices;
    # here the PyTorch loop runs on the CPU, so machines without a GPU test it too. Same steps and
    # roundings, sums in another order and another libm: the same decisions, values to float64 rounding.
    loss, mask = random_loss_rows(seed=7, num_rows=200)
    numpy_fit = fit_gmm_batched(loss, mask, dtype=GMM_DTYPES[dtype])
    torch_fit = _em(loss, mask, DEFAULT_MAX_ITER, DEFAULT_TOL, DEFAULT_REG_COVAR, GMM_DTYPES[dtype])
    assert torch.equal(numpy_fit.n_iter, torch_fit.n_iter)
    assert torch.equal(numpy_fit.converged, torch_fit.converged)
    assert torch.equal(numpy_fit.labels, torch_fit.labels)
    for name in ("means", "variances", "weights", "log_density"):
        torch.testing.assert_close(getattr(numpy_fit, name), getattr(torch_fit, name), rtol=1e-12, atol=1e-12)


@requires_cuda
def test_cuda_equals_cpu():
    loss, mask = random_loss_rows(seed=4, num_rows=300)
    cpu = fit_gmm_batched(loss, mask)
    cuda = fit_gmm_batched(loss.cuda(), mask.cuda())
    assert cuda.means.device.type == "cuda"
    torch.testing.assert_close(cpu.means, cuda.means.cpu(), rtol=0, atol=1e-9)
    torch.testing.assert_close(cpu.variances, cuda.variances.cpu(), rtol=0, atol=1e-9)
    assert (cpu.labels == cuda.labels.cpu()).all(dim=1).float().mean() >= 0.99
