"""The fused Triton EM kernel (``assigners.gmm_triton``) against the batched torch EM and sklearn.

Without a GPU the kernel runs in Triton's CPU interpreter, which reads ``TRITON_INTERPRET=1`` when
the kernel is defined (at ``import assigners``): so the cases are built here, fitted by the kernel
in a child process started with that variable (one process for all cases, its inputs and outputs
in .pt files), and checked here against ``fit_gmm_batched`` and ``fit_gmm_sklearn``. The
interpreter runs every program with numpy, so the cases hold few rows.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from assigners import gmm_triton
from assigners.gmm import GMM_DTYPES, GMMFit, fit_gmm, fit_gmm_batched, fit_gmm_sklearn
from assigners.paa import PAA_SCHEMES, split_by_scheme

from .conftest import random_loss_rows, requires_cuda

pytestmark = pytest.mark.skipif(not gmm_triton.TRITON_AVAILABLE, reason="Triton is not installed")

CHILD = """
import dataclasses
import sys

import torch
from assigners.gmm import GMM_DTYPES
from assigners.gmm_triton import _interpreted, fit_gmm_triton

assert _interpreted(), "TRITON_INTERPRET=1 did not reach Triton"
cases = torch.load(sys.argv[1])
fits = {}
for name, case in cases.items():
    fit = fit_gmm_triton(case["x"], case["mask"], dtype=GMM_DTYPES[case["dtype"]], **case["em"])
    fits[name] = dataclasses.asdict(fit)
torch.save(fits, sys.argv[2])
"""


def _separated_clusters():
    """Two clusters far apart, by hand: means 0.1 and 10.1, variance 0.02 / 3 + reg_covar, labels 0 0 0 1 1 1."""
    x = torch.tensor([[0.0, 0.1, 0.2, 10.0, 10.1, 10.2]], dtype=torch.float64)
    return x, torch.ones_like(x, dtype=torch.bool)


def _scattered_mask():
    """Valid samples scattered among padding that holds garbage (NaN, huge values): the fit must not see it."""
    loss, mask = random_loss_rows(seed=21, num_rows=6, max_len=30, min_len=4)
    gen = torch.Generator().manual_seed(21)
    order = torch.argsort(torch.rand(loss.shape, generator=gen), dim=1)  # shuffle each row's entries
    loss, mask = loss.gather(1, order), mask.gather(1, order)
    garbage = torch.where(torch.rand(loss.shape, generator=gen) < 0.5, float("nan"), 1e30)
    return torch.where(mask, loss, garbage.double()), mask


def _edge_rows():
    """Zero variance, exactly two samples, and a row with its only two samples at the end."""
    x = torch.tensor(
        [[3.0, 3.0, 3.0, 3.0, 3.0], [0.5, 2.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 0.25, 4.0]], dtype=torch.float64
    )
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [False, False, False, True, True]])
    return x, mask


def _cases() -> dict[str, dict]:
    """Name -> {x, mask, dtype, em}: every case in float64 and float32."""
    inputs = {
        "random": random_loss_rows(seed=0, num_rows=16),  # K = 45: BLOCK_K 64, not a power of two
        "k100": random_loss_rows(seed=1, num_rows=6, max_len=100, min_len=70),  # BLOCK_K 128
        "clusters": _separated_clusters(),
        "scattered": _scattered_mask(),
        "edges": _edge_rows(),
        "empty": (torch.zeros(0, 7, dtype=torch.float64), torch.zeros(0, 7, dtype=torch.bool)),
    }
    cases = {}
    for dtype in GMM_DTYPES:
        for name, (x, mask) in inputs.items():
            cases[f"{name}-{dtype}"] = {"x": x, "mask": mask, "dtype": dtype, "em": {}}
        x, mask = inputs["random"]
        cases[f"max_iter2-{dtype}"] = {"x": x, "mask": mask, "dtype": dtype, "em": {"max_iter": 2, "tol": 0.0}}
    return cases


@pytest.fixture(scope="module")
def triton_fits(tmp_path_factory):
    """(cases, the kernel's fit of each case as a dict of GMMFit fields), fitted in an interpreter process."""
    cases = _cases()
    folder = tmp_path_factory.mktemp("gmm_triton")
    torch.save(cases, folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", CHILD, str(folder / "cases.pt"), str(folder / "fits.pt")],
                   env=env, check=True, timeout=500)  # fmt: skip
    return cases, torch.load(folder / "fits.pt")


def _fit(triton_fits, name):
    cases, fits = triton_fits
    case = cases[name]
    return case, GMMFit(**fits[name])


def _assert_same_fit(kernel, reference, mask, log_density_tol):
    """Same decisions (labels, n_iter, converged, positive and ignored sets), values within rounding."""
    assert torch.equal(kernel.n_iter, reference.n_iter)
    assert torch.equal(kernel.converged, reference.converged)
    assert torch.equal(kernel.labels, reference.labels)
    assert bool(torch.isneginf(kernel.log_density[~mask]).all())
    difference = (kernel.log_density[mask] - reference.log_density[mask]).abs()
    assert float((difference / reference.log_density[mask].abs().clamp(min=1.0)).max()) <= log_density_tol
    for name in ("means", "variances", "weights"):
        torch.testing.assert_close(getattr(kernel, name), getattr(reference, name), rtol=1e-12, atol=1e-12)
    for scheme in PAA_SCHEMES:
        ours = split_by_scheme(kernel.labels, kernel.log_density, mask, scheme)
        theirs = split_by_scheme(reference.labels, reference.log_density, mask, scheme)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), scheme


@pytest.mark.parametrize("dtype", list(GMM_DTYPES))
@pytest.mark.parametrize("name", ["random", "k100", "clusters", "scattered", "edges", "max_iter2"])
def test_kernel_equals_the_batched_em(triton_fits, name, dtype):
    # The kernel restates fit_gmm_batched op for op, in both precisions: equal up to float64 rounding
    # (tree vs sequential sums, libm): a 1e-9 bound on the log-density, relative above 1.
    case, kernel = _fit(triton_fits, f"{name}-{dtype}")
    reference = fit_gmm_batched(case["x"], case["mask"], dtype=GMM_DTYPES[dtype], **case["em"])
    _assert_same_fit(kernel, reference, case["mask"], log_density_tol=1e-9)


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-9), ("float32", 7e-6)])
@pytest.mark.parametrize("name", ["random", "k100", "scattered"])
def test_kernel_equals_sklearn(triton_fits, name, dtype, tol):
    # Against the official fit; float32: numpy's float32 log is not correctly rounded, a few float32
    # ulps of difference (the bound of test_gmm.test_float32_matches_sklearn_fed_float32).
    case, kernel = _fit(triton_fits, f"{name}-{dtype}")
    reference = fit_gmm_sklearn(case["x"], case["mask"], dtype=GMM_DTYPES[dtype])
    assert torch.equal(kernel.labels, reference.labels)
    assert torch.equal(kernel.n_iter, reference.n_iter)
    assert torch.equal(kernel.converged, reference.converged)
    mask = case["mask"]
    difference = (kernel.log_density[mask] - reference.log_density[mask]).abs()
    assert float((difference / reference.log_density[mask].abs().clamp(min=1.0)).max()) <= tol


@pytest.mark.parametrize("dtype", list(GMM_DTYPES))
def test_well_separated_clusters_by_hand(triton_fits, dtype):
    _, fit = _fit(triton_fits, f"clusters-{dtype}")
    assert fit.labels[0].tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(fit.means[0], torch.tensor([0.1, 10.1], dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(fit.weights[0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    expected = torch.full((2,), 0.02 / 3 + 1e-6, dtype=torch.float64)
    torch.testing.assert_close(fit.variances[0], expected, rtol=1e-5, atol=0)
    assert bool(fit.converged[0])


@pytest.mark.parametrize("dtype", list(GMM_DTYPES))
def test_padding_and_edge_rows(triton_fits, dtype):
    _, fit = _fit(triton_fits, f"edges-{dtype}")
    assert fit.labels.tolist() == [[0] * 5, [0, 1, -1, -1, -1], [-1, -1, -1, 0, 1]]
    assert bool(torch.isfinite(fit.means).all() and torch.isfinite(fit.variances).all())
    torch.testing.assert_close(fit.means[0], torch.full((2,), 3.0, dtype=torch.float64))
    _, scattered = _fit(triton_fits, f"scattered-{dtype}")
    assert bool(torch.isfinite(scattered.means).all())  # the NaN / 1e30 padding was never read


def test_max_iter_stops_unconverged_rows(triton_fits):
    _, fit = _fit(triton_fits, "max_iter2-float64")
    assert bool((fit.n_iter == 2).all()) and not bool(fit.converged.any())


def test_empty_input(triton_fits):
    _, fit = _fit(triton_fits, "empty-float32")
    assert fit.means.shape == (0, 2) and fit.labels.shape == (0, 7) and fit.n_iter.shape == (0,)


def test_cpu_tensors_need_the_interpreter():
    if gmm_triton._interpreted():
        pytest.skip("this process runs Triton's interpreter")
    x, mask = _separated_clusters()
    with pytest.raises(ValueError, match="CUDA"):
        gmm_triton.fit_gmm_triton(x, mask)


@requires_cuda
@pytest.mark.parametrize("dtype", list(GMM_DTYPES))
def test_cuda_kernel_equals_the_batched_em(dtype):
    loss, mask = random_loss_rows(seed=4, num_rows=500, max_len=120)
    loss, mask = loss.cuda(), mask.cuda()
    kernel = fit_gmm(loss, mask, backend="auto", dtype=GMM_DTYPES[dtype])  # auto: the kernel on CUDA
    reference = fit_gmm_batched(loss, mask, dtype=GMM_DTYPES[dtype])
    assert kernel.means.device.type == "cuda"
    # CUDA's libdevice and PyTorch's CUDA exp/log may differ in the last bit, which can move a row whose
    # lower-bound change sits at tol by one iteration: as test_gmm.test_cuda_equals_cpu, 99% of rows.
    # In float32 such a bit can also flip a float32 rounding: a float32 ulp (6e-8) in the parameters.
    rtol = 1e-9 if dtype == "float64" else 1e-6
    same_iterations = kernel.n_iter == reference.n_iter
    assert float(same_iterations.float().mean()) >= 0.99
    assert float((kernel.labels == reference.labels).all(dim=1).float().mean()) >= 0.99
    for name in ("means", "variances", "weights"):
        ours, theirs = getattr(kernel, name)[same_iterations], getattr(reference, name)[same_iterations]
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=1e-9)
    assert bool(torch.isneginf(kernel.log_density[~mask]).all()) and bool((kernel.labels[~mask] == -1).all())
