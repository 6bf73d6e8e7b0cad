"""CPU benchmark of mean_field_reconstruct (pytest-benchmark). Run:
``python -m pytest benchmarks/bench_mean_field.py --benchmark-only --benchmark-columns=min,median,rounds``.

Mean-field reconstruct (n = 4M, S = 4): native C++ (AVX2 normals when the CPU has them, and forced scalar) vs the
PyTorch reference, forward and forward + backward. Floor: this op is bound by the normals, not by memory: 16.8M
normals; the "normals" rows time native.normal alone for the same count.

Timings on a shared machine are noisy: compare the min column (the least-disturbed round), not the mean.
"""
import pytest
import torch

import sws_kernels as sws
from sws_kernels import functional as F
from sws_kernels import native

N, S = 4 * 1024 * 1024, 4

needs_native = pytest.mark.skipif(not native.AVAILABLE_CPU, reason=native.CPU_REASON or "native CPU unavailable")


@pytest.fixture(scope="module")
def mf_params():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, generator=g) * 0.1, torch.randn(N, generator=g) - 4


@pytest.fixture(params=["native", "native-scalar", "reference"])
def mf_backend(request):
    if request.param.startswith("native"):
        if not native.AVAILABLE_CPU:
            pytest.skip(native.CPU_REASON)
        native.set_simd(request.param == "native")
    try:
        yield "native" if request.param.startswith("native") else "reference"
    finally:
        if native.AVAILABLE_CPU:
            native.set_simd(True)


def test_mean_field_reconstruct_forward(benchmark, mf_params, mf_backend):
    mu, rho = mf_params
    benchmark.group = "mean-field reconstruct forward n=4M S=4"
    with sws.backend(mf_backend):
        benchmark(lambda: F.mean_field_reconstruct(mu, rho, seed=1, samples=S))


def test_mean_field_reconstruct_forward_backward(benchmark, mf_params, mf_backend):
    mu, rho = (t.clone().requires_grad_() for t in mf_params)
    grad = torch.randn(S, N)
    benchmark.group = "mean-field reconstruct forward+backward n=4M S=4"

    def step():
        with sws.backend(mf_backend):
            w = F.mean_field_reconstruct(mu, rho, seed=1, samples=S)
        torch.autograd.grad(w, (mu, rho), grad)

    benchmark(step)


@needs_native
@pytest.mark.parametrize("simd", [True, False], ids=["avx2-if-available", "scalar"])
def test_normals_floor(benchmark, simd):
    """The compute floor of the mean-field and hierarchical ops: S * N normals on their own."""
    native.set_simd(simd)
    try:
        benchmark.group = "normals: 16.8M (the compute floor)"
        benchmark.extra_info["simd"] = native.simd_level()
        benchmark(lambda: native.normal(1, S * N))
    finally:
        native.set_simd(True)
