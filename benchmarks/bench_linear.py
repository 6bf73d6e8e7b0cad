"""CPU benchmark of a linear layer's training step (pytest-benchmark). Run:
``python -m pytest benchmarks/bench_linear.py --benchmark-only --benchmark-columns=min,median,rounds``.

Forward + backward, KL included, at in = out = 1024, one MC sample: the SWS layer (sws_kernels.functional.sws_linear,
paper mode, K = 4096 int16 labels, KL from functional.kl_components, as Codebook.kl_loss) vs a bayesian-torch-style
mean-field layer (fp32 mu/rho for weight and bias, torch.randn, softplus, multiply-add, F.linear, bayesian-torch's
mean KL), at M = 16 and M = 256 rows. The per-call cost of tiny layers is benchmarks/bench_overhead.py.

Timings on a shared machine are noisy: compare the min column (the least-disturbed round), not the mean.
"""
import pytest
import torch
import torch.nn.functional as TF

import sws_kernels as sws
from sws_kernels import functional as F

IN = OUT = 1024
K = 4096


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
