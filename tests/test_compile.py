"""Modules built on the fused ops run under torch.compile(fullgraph=True) on CPU (the Triton kernels under the
interpreter), give the eager results, and train (gradients through the compiled graph)."""
import pytest
import torch

import sws_kernels
from sws_kernels import functional as F

pytest.importorskip("triton")
from test_triton_reconstruct import DEV, make_layer  # noqa: E402


@pytest.fixture(autouse=True)
def _no_tf32_conv():
    """cuDNN convs default to TF32 on Ampere and later (about 1e-3 relative): compare at fp32 precision."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


class SWSNet(torch.nn.Module):
    """SWS linear -> relu -> SWS conv1d on the reshaped activations -> mean-field linear."""

    def __init__(self, rng):
        super().__init__()
        means, chol, labels, ell, outl = make_layer(rng, (12, 10), 7, 2, 3, torch.int16)
        self.means = torch.nn.Parameter(means)
        self.chol = torch.nn.Parameter(chol)
        self.o_mu = torch.nn.Parameter(outl[1])
        self.o_rho = torch.nn.Parameter(outl[2])
        self.register_buffer("labels", labels)
        self.register_buffer("o_pos", outl[0])
        self.ell = ell
        self.bias = torch.nn.Parameter(torch.randn(12, generator=rng).to(DEV))
        _, _, conv_labels, _, _ = make_layer(rng, (4, 3, 3), 7)
        self.register_buffer("conv_labels", conv_labels)
        self.mf_mu = torch.nn.Parameter(torch.randn(5, 16, generator=rng).to(DEV) * 0.1)
        self.mf_rho = torch.nn.Parameter(torch.randn(5, 16, generator=rng).to(DEV) - 3)
        self.mf_bias_mu = torch.nn.Parameter(torch.randn(5, generator=rng).to(DEV))
        self.mf_bias_rho = torch.nn.Parameter(torch.randn(5, generator=rng).to(DEV) - 2)

    def forward(self, x, seed: int):
        S = 2
        h = F.sws_linear(x, self.means, self.chol, self.labels, self.ell, (self.o_pos, self.o_mu, self.o_rho),
                         self.bias, seed=seed, samples=S, mode="hierarchical")  # [S, B, 12]
        h = torch.relu(h).reshape(S, -1, 3, 4)  # [S, B, C=3, L=4]
        h = F.sws_conv1d(h, self.means, self.chol, self.conv_labels, None, None, None, 1, 1, seed=seed + 1,
                         samples=S, per_sample=True, owner=1)  # [S, B, 4, 4]
        return F.mean_field_linear(h.reshape(S, -1, 16), self.mf_mu, self.mf_rho, self.mf_bias_mu,
                                   self.mf_bias_rho, seed=seed + 2, samples=S, per_sample=True, owner=2)


def test_fullgraph_compile_matches_eager_and_trains(rng):
    torch._dynamo.reset()
    net = SWSNet(rng)
    x = torch.randn(3, 10, generator=rng).to(DEV)
    with sws_kernels.backend("triton"):
        eager = net(x, 123)
        eager_grads = torch.autograd.grad(eager.square().sum(), list(net.parameters()))
        compiled = torch.compile(net, fullgraph=True)
        y = compiled(x, 123)
        grads = torch.autograd.grad(y.square().sum(), list(net.parameters()))
    assert y.shape == (2, 3, 5)
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
