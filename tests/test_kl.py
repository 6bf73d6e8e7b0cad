"""The component KL of the functional API (hand-written gradient) against the reference and gradcheck."""
import pytest
import torch

import sws_kernels as sws
from sws_kernels import functional as F
from sws_kernels import reference as R


def _codebook(rng, K, dtype, threshold=False):
    m = torch.randn(K, 2, generator=rng, dtype=dtype)
    c = torch.randn(K, 3, generator=rng, dtype=dtype)
    if threshold:
        c[0, 0] = 25.0  # softplus' linear branch (x > 20)
    return m, c


@pytest.mark.parametrize("K", [1, 7, 4096])
def test_matches_reference_value_and_grads(rng, K):
    m, c = _codebook(rng, K, torch.float64, threshold=True)
    m0, c0 = _codebook(rng, K, torch.float64)
    a = [m.clone().requires_grad_(), c.clone().requires_grad_()]
    b = [m.clone().requires_grad_(), c.clone().requires_grad_()]
    ka, kb = F.kl_components(*a, m0, c0), R.kl_components(*b, m0, c0)
    torch.testing.assert_close(ka, kb)
    ka.backward()
    kb.backward()
    torch.testing.assert_close(a[0].grad, b[0].grad)
    torch.testing.assert_close(a[1].grad, b[1].grad)


@pytest.mark.parametrize("K", [1, 7, 4096])
def test_float32_codebook_kl_matches_the_float64_reference(rng, K):
    """float32 codebooks on the CPU take the native value + gradient (csrc/cpu/kl.cpp) where it is built: near
    float32 rounding of the float64 reference, values and gradients, softplus' linear branch included. Codebooks
    as training has them (a posterior near its prior; conftest's make_layer ranges): fully random Cholesky
    factors make some components so ill-conditioned that any float32 form loses digits (the PyTorch form too)."""
    m0 = torch.randn(K, 2, generator=rng, dtype=torch.float64) * torch.tensor([0.1, 1.0], dtype=torch.float64)
    c0 = torch.randn(K, 3, generator=rng, dtype=torch.float64) * 0.5 - torch.tensor([2.0, 0.0, 2.0],
                                                                                    dtype=torch.float64)
    m = m0 + 0.05 * torch.randn(K, 2, generator=rng, dtype=torch.float64)
    c = c0 + 0.2 * torch.randn(K, 3, generator=rng, dtype=torch.float64)
    c[0, 0] = 25.0  # softplus' linear branch (x > 20)
    a = [m.float().requires_grad_(), c.float().requires_grad_()]
    b = [m.clone().requires_grad_(), c.clone().requires_grad_()]
    ka, kb = F.kl_components(*a, m0.float(), c0.float()), R.kl_components(*b, m0, c0)
    with sws.backend("reference"):  # the PyTorch float32 form is another node (functional._KLComponents)
        assert F.kl_components(*a, m0.float(), c0.float()).grad_fn is not ka.grad_fn
    assert ka.dtype == torch.float32
    torch.testing.assert_close(ka.double(), kb, rtol=1e-5, atol=0)
    (ka * 1.5).backward()
    (kb * 1.5).backward()
    for got, want in ((a[0].grad, b[0].grad), (a[1].grad, b[1].grad)):  # 200 draws: worst 1e-6 of the largest
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_gradcheck(rng):
    m, c = _codebook(rng, 5, torch.float64, threshold=True)
    m0, c0 = _codebook(rng, 5, torch.float64)
    assert torch.autograd.gradcheck(lambda x, y: F.kl_components(x, y, m0, c0),
                                    (m.requires_grad_(), c.requires_grad_()))


def test_trainable_prior_gets_gradients(rng):
    m, c = _codebook(rng, 4, torch.float64)
    m0, c0 = (t.requires_grad_() for t in _codebook(rng, 4, torch.float64))
    F.kl_components(m, c, m0, c0).backward()
    assert m0.grad is not None and c0.grad is not None


def test_zero_at_prior_and_bad_inputs(rng):
    m, c = _codebook(rng, 6, torch.float32)
    assert F.kl_components(m, c, m, c).abs() < 1e-4
    with pytest.raises(ValueError, match="means0"):
        F.kl_components(m, c, m[:3], c[:3])
    with sws.validate(), pytest.raises(ValueError, match="chol.*non-finite"):  # per call: on request only
        F.kl_components(m, c * float("inf"), m, c)
    assert not torch.isfinite(F.kl_components(m, c * float("inf"), m, c))  # never a crash


# --------------------------------------------------------------------------------------------------
# SWS layers' KL shares (the forward contract of issue 12): kept codebook KL, exact values and gradients
# --------------------------------------------------------------------------------------------------

def _shared_layers(rng):
    import sws_kernels.nn as snn

    cb = snn.Codebook(16)
    with torch.no_grad():
        cb.means.add_(0.05 * torch.randn(cb.means.shape, generator=rng))
        cb.chol.add_(0.05 * torch.randn(cb.chol.shape, generator=rng))
    layers = [snn.SWSLinear(4, 3, codebook=cb, return_kl=True), snn.SWSConv1d(2, 3, 3, codebook=cb, return_kl=True),
              snn.SWSLinear(5, 2, codebook=cb, return_kl=True,
                            outliers=(torch.tensor([1]), torch.tensor([0.4]), torch.tensor([-3.0])))]
    return cb, torch.nn.ModuleList(layers)


def _plain_total(cb, layers):
    n = sum(m.num_weights for m in layers)
    return sum(m.kl_loss() + R.kl_components(cb.means, cb.chol, cb.means0, cb.chol0) * (m.num_weights / n)
               for m in layers)


def test_layer_kl_shares_match_the_plain_formula_through_training(rng):
    cb, layers = _shared_layers(rng)
    opt = torch.optim.Adam(layers.parameters(), lr=0.05)
    for step in range(3):  # the kept KL follows every optimizer step
        opt.zero_grad()
        got = sum(m.layer_kl() for m in layers)
        want = _plain_total(cb, layers)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got, sws.kl_loss(layers))
        g_got = torch.autograd.grad(got, [cb.means, cb.chol, layers[2].outlier_mu], retain_graph=True)
        g_want = torch.autograd.grad(want, [cb.means, cb.chol, layers[2].outlier_mu])
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b)
        got.backward()
        opt.step()
    # gradient accumulation: two forwards and two backwards before a step, each its own graph
    opt.zero_grad()
    layers[0].layer_kl().backward()
    layers[0].layer_kl().backward()
    acc = cb.means.grad.clone()
    cb.means.grad = None
    (2 * layers[0].layer_kl()).backward()
    torch.testing.assert_close(acc, cb.means.grad)
    # without grad, and after load_state_dict, the values stay exact
    with torch.no_grad():
        torch.testing.assert_close(sum(m.layer_kl() for m in layers), _plain_total(cb, layers))
    sd = {k: v + 0.01 if k.endswith("means") else v for k, v in layers.state_dict().items()}
    layers.load_state_dict(sd)
    torch.testing.assert_close(sum(m.layer_kl() for m in layers), _plain_total(cb, layers))


def test_layer_kl_with_a_trainable_prior(rng):
    cb, layers = _shared_layers(rng)
    cb.means0.requires_grad_()  # the plain path: the prior gets its gradient too
    got = sum(m.layer_kl() for m in layers)
    torch.testing.assert_close(got, _plain_total(cb, layers))
    got.backward()
    assert cb.means0.grad is not None and float(cb.means0.grad.abs().sum()) > 0
