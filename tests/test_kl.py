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
