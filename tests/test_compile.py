"""Modules built on the fused ops run under torch.compile(fullgraph=True) on CPU (the Triton kernels under the
interpreter), give the eager results, and train (gradients through the compiled graph)."""
import pytest
import torch

import sws_kernels
from sws_kernels import functional as F

pytest.importorskip("triton")
from conftest import DEV, make_layer  # noqa: E402


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


class ModuleNet(torch.nn.Module):
    """The drop-in modules with their default seeds (seed=None: each layer draws a tensor seed per call)."""

    def __init__(self):
        super().__init__()
        cb = sws_kernels.nn.Codebook(9)
        self.conv = sws_kernels.nn.SWSConv2d(2, 3, 3, padding=1, codebook=cb)
        self.fc = sws_kernels.nn.SWSLinear(3 * 4 * 4, 8, codebook=cb, mode="hierarchical")
        self.mf = sws_kernels.nn.MeanFieldLinear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.relu(self.fc(h))
        out, kl = self.mf(h)
        return out, kl + sws_kernels.kl_loss(self)


def _train(model, xs, ys, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outs = []
    for i in range(steps):
        out, kl = model(xs[i])
        loss = torch.nn.functional.cross_entropy(out, ys[i]) + kl / 100
        opt.zero_grad()
        loss.backward()
        opt.step()
        outs.append(out.detach())
    return outs


def test_compiled_training_with_default_seeds_matches_eager_no_recompile():
    """torch.compile(fullgraph=True) traces the layers' own seed draws (torch.randint on the parameters'
    device, no host read): the training loop compiles once (a recompile raises), draws fresh noise on every
    call, and for the same torch.manual_seed gives eager's outputs and parameters (aot_eager keeps eager's
    RNG semantics)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(4, 5, 2, 4, 4, generator=g)
    ys = torch.randint(0, 4, (4, 5), generator=g)
    torch.manual_seed(1)
    eager = ModuleNet()
    compiled_net = ModuleNet()
    compiled_net.load_state_dict(eager.state_dict())
    torch.manual_seed(2)
    want = _train(eager, xs, ys, 4)
    compiled = torch.compile(compiled_net, fullgraph=True, backend="aot_eager")
    torch.manual_seed(2)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _train(compiled, xs, ys, 4)
        same_input = [compiled(xs[0])[0].detach() for _ in range(2)]
    assert not torch.equal(same_input[0], same_input[1])  # fresh noise on every call
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled_net.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device")
def test_cuda_graph_training_step_replays_fresh_noise():
    """A whole training step (forward with default seeds, backward, optimizer) captured in a CUDA graph:
    every replay draws new seeds on the device (graph-safe generator), so outputs differ between replays,
    and the captured step trains like the eager one (loss goes down)."""
    torch.manual_seed(0)
    model = ModuleNet().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(5, 2, 4, 4, device="cuda")
    y = torch.randint(0, 4, (5,), device="cuda")

    def step():
        out, kl = model(x)
        loss = torch.nn.functional.cross_entropy(out, y) + kl / 100
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return out, loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up: kernels compiled, optimizer state allocated
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_loss = step()
    outs, losses = [], []
    for _ in range(30):
        graph.replay()
        outs.append(static_out.clone())
        losses.append(float(static_loss))
    assert not torch.equal(outs[0], outs[1])
    assert sum(losses[-5:]) < sum(losses[:5])
