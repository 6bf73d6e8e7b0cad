"""CPU benchmark of reconstruct (pytest-benchmark): native C++ vs the reference, against the memory floor.

Run: ``python -m pytest benchmarks/bench_reconstruct.py --benchmark-only``.

Floor: reconstruct reads the labels (2 bytes/weight, int16) and writes S float32 weights per weight, so
n = 4M, S = 4 moves 8 MiB + 64 MiB. The floor is that divided by the machine's copy bandwidth, measured
here in the same process two ways: ``copy_`` into a preallocated buffer (the hardware's bandwidth) and
``clone`` (a fresh allocation, as every op output is: page faults included).
"""
import pytest
import torch

import sws_kernels as sws
from sws_kernels import functional as F
from sws_kernels import native

N, K, S = 4 * 1024 * 1024, 4096, 4


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    means = torch.stack([torch.linspace(-0.2, 0.2, K), torch.full((K,), -4.0)], -1)
    chol = torch.tensor([-6.0, 0.0, -3.0]).repeat(K, 1)
    labels = torch.randint(0, K, (N,), generator=g).to(torch.int16)
    pos = torch.randperm(N, generator=g)[: N // 1000 + N // 100]
    E = N // 1000
    ellipse = (pos[:E], torch.randint(0, K, (E,), generator=g), torch.randint(0, K, (E,), generator=g),
               torch.rand(E, generator=g))
    outliers = (pos[E:], torch.randn(pos.numel() - E, generator=g) * 0.3, torch.full((pos.numel() - E,), -4.0))
    return means, chol, labels, ellipse, outliers


BYTES = 2 * N + 4 * S * N


@pytest.mark.parametrize("mode", ["paper", "hierarchical"])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_reconstruct_forward(benchmark, layer, backend, mode):
    if backend == "native" and not native.AVAILABLE_CPU:
        pytest.skip(native.CPU_REASON)
    means, chol, labels, e, o = layer
    benchmark.group = f"reconstruct forward n=4M K=4096 S=4 {mode}"
    benchmark.extra_info["bytes"] = BYTES
    with sws.backend(backend):
        benchmark(lambda: F.reconstruct(means, chol, labels, e, o, seed=1, samples=S, mode=mode))


@pytest.mark.parametrize("mode", ["paper", "hierarchical"])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_reconstruct_forward_backward(benchmark, layer, backend, mode):
    if backend == "native" and not native.AVAILABLE_CPU:
        pytest.skip(native.CPU_REASON)
    means, chol, labels, e, o = layer
    m, c = means.clone().requires_grad_(), chol.clone().requires_grad_()
    mu, rho = o[1].clone().requires_grad_(), o[2].clone().requires_grad_()
    grad = torch.randn(S, N)
    benchmark.group = f"reconstruct forward+backward n=4M K=4096 S=4 {mode}"

    def step():
        with sws.backend(backend):
            w = F.reconstruct(m, c, labels, e, (o[0], mu, rho), seed=1, samples=S, mode=mode)
        torch.autograd.grad(w, [m, c, mu, rho], grad, allow_unused=True)

    benchmark(step)


@pytest.mark.parametrize("kind", ["copy_ into preallocated", "clone (fresh allocation)"])
def test_copy_bandwidth(benchmark, kind):
    """The floor's denominator: moving BYTES // 2 in and out (read + write = BYTES)."""
    x = torch.randn(BYTES // 8)
    y = torch.empty_like(x)
    benchmark.group = "copy bandwidth (floor)"
    benchmark.extra_info["bytes"] = BYTES
    benchmark((lambda: y.copy_(x)) if kind.startswith("copy_") else (lambda: x.clone()))
