"""CPU benchmarks of the native kernels (pytest-benchmark). Run:
``python -m pytest benchmarks/bench_native.py --benchmark-only --benchmark-columns=min,median,rounds``.

1. Mean-field reconstruct (n = 4M, S = 4): native C++ (AVX2 normals when the CPU has them, and forced scalar)
   vs the PyTorch reference, forward and forward + backward. Floor: this op is bound by the normals, not by
   memory: 16.8M normals; the "normals" rows time native.normal alone for the same count.
2. A linear layer's training step (forward + backward, KL included) at in = out = 1024, one MC sample:
   the SWS layer (sws_kernels.functional.sws_linear, paper mode, K = 4096 int16 labels, KL from
   functional.kl_components, as Codebook.kl_loss) vs a bayesian-torch-style mean-field layer (fp32 mu/rho for weight and bias,
   torch.randn, softplus, multiply-add, F.linear, bayesian-torch's mean KL), at M = 16 and M = 256 rows.

Timings on a shared machine are noisy: compare the min column (the least-disturbed round), not the mean.
"""
import pytest
import torch
import torch.nn.functional as TF

import sws_kernels as sws
from sws_kernels import functional as F
from sws_kernels import native
from sws_kernels import reference as R

N, S = 4 * 1024 * 1024, 4
IN = OUT = 1024
K = 4096

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


# ------------------------------------------------------------------------------------------------------
# linear layer training step
# ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sws_layer():
    g = torch.Generator().manual_seed(1)
    means = torch.stack([torch.linspace(-0.2, 0.2, K), torch.full((K,), -4.0)], -1)
    chol = torch.tensor([-6.0, 0.0, -3.0]).repeat(K, 1)
    labels = torch.randint(0, K, (OUT, IN), generator=g).to(torch.int16)
    bias = torch.zeros(OUT)
    return means, chol, labels, bias


@pytest.mark.parametrize("M", [16, 256])
def test_sws_linear_step(benchmark, sws_layer, M):
    means0, chol0, labels, bias0 = sws_layer
    means, chol = means0.clone().requires_grad_(), chol0.clone().requires_grad_()
    bias = bias0.clone().requires_grad_()
    x = torch.randn(M, IN)
    benchmark.group = f"linear layer fwd+bwd+KL in=out=1024 M={M}"
    benchmark.extra_info["backend"] = sws._backend.select("sws_linear", means.device, means.dtype)[0]

    def step():
        y = F.sws_linear(x, means, chol, labels, None, None, bias, seed=7, samples=1)
        loss = y.square().mean() + F.kl_components(means, chol, means0, chol0) / 50_000  # as Codebook.kl_loss
        loss.backward()

    benchmark(step)


@pytest.mark.parametrize("M", [16, 256])
def test_bayesian_torch_mean_field_step(benchmark, M):
    """bayesian-torch's LinearReparameterization forward: fresh torch.randn noise, softplus, mul-add, F.linear,
    and its KL (per-tensor mean of the closed form against N(0, 1)) for weight and bias."""
    g = torch.Generator().manual_seed(2)
    mu_w = (torch.randn(OUT, IN, generator=g) * 0.05).requires_grad_()
    rho_w = torch.full((OUT, IN), -4.0).requires_grad_()
    mu_b = torch.zeros(OUT).requires_grad_()
    rho_b = torch.full((OUT,), -4.0).requires_grad_()
    x = torch.randn(M, IN)
    benchmark.group = f"linear layer fwd+bwd+KL in=out=1024 M={M}"

    def kl(mu_q, sigma_q):  # bayesian-torch BaseVariationalLayer.kl_div with prior N(0, 1)
        return (-torch.log(sigma_q) + (sigma_q ** 2 + mu_q ** 2) / 2 - 0.5).mean()

    def step():
        sigma_w = TF.softplus(rho_w)
        sigma_b = TF.softplus(rho_b)
        w = mu_w + sigma_w * torch.randn_like(sigma_w)
        b = mu_b + sigma_b * torch.randn_like(sigma_b)
        y = TF.linear(x, w, b)
        loss = y.square().mean() + (kl(mu_w, sigma_w) + kl(mu_b, sigma_b)) / 50_000
        loss.backward()

    benchmark(step)
