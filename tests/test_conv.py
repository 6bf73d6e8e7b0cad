"""SWS and mean-field conv1d/conv2d (sws_conv1d/2d, mean_field_conv1d/2d) on every backend against the float64
reference: the backend's reconstruction (Triton, native) and all samples in one vendor conv call (stacked along
output channels, or a grouped conv for per-sample inputs), forward and every gradient. Parametrised over backends
with @pytest.mark.backends (tests/conftest.py)."""
import pytest
import torch
from conftest import make_layer, to64

from sws_kernels import functional as F
from sws_kernels import reference as R



@pytest.fixture(autouse=True)
def _no_tf32_conv():
    """cuDNN convs default to TF32 on Ampere and later (about 1e-3 relative): compare at fp32 precision."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


CASES = [  # spatial, (N, C, *size), out, kernel, stride, padding, dilation, groups, S, per_sample, mode, bias
    (2, (2, 4, 7, 6), 6, (3, 3), 1, 1, 1, 1, 3, False, "paper", True),
    (2, (1, 6, 9, 8), 9, (3, 2), 2, (1, 0), (2, 1), 3, 2, True, "hierarchical", True),
    (2, (3, 4, 5, 5), 4, (1, 1), 1, 0, 1, 2, 1, False, "mean", False),
    (2, (2, 4, 6, 7), 8, (2, 3), (1, 2), 2, 1, 4, 3, False, "hierarchical", True),
    (1, (2, 3, 11), 5, (3,), 2, 1, 2, 1, 3, True, "paper", True),
    (1, (1, 4, 9), 6, (2,), 1, 0, 1, 2, 2, False, "paper", False),
]


@pytest.mark.backends("native_cpu", "triton")
@pytest.mark.parametrize("spatial,xs,out_c,ks,stride,padding,dilation,groups,S,per_sample,mode,has_bias", CASES)
def test_sws_conv(rng, backend, spatial, xs, out_c, ks, stride, padding, dilation, groups, S, per_sample, mode,
                  has_bias):
    in_g = xs[1] // groups
    shape = (out_c, in_g, *ks)
    means, chol, labels, ell, outl = make_layer(rng, shape, 11, 2, 3, torch.int16, device=backend.device)
    x = torch.randn(*(((S,) if per_sample else ()) + xs), generator=rng).to(backend.device)
    bias = torch.randn(out_c, generator=rng).to(backend.device) if has_bias else None
    leaves = [x, means, chol] + ([bias] if has_bias else [])
    leaves = [t.clone().requires_grad_() for t in leaves]
    fn, rfn = (F.sws_conv2d, R.sws_conv2d) if spatial == 2 else (F.sws_conv1d, R.sws_conv1d)
    conv_args = (stride, padding, dilation, groups)
    with backend():
        y = fn(leaves[0], leaves[1], leaves[2], labels, ell, outl, leaves[3] if has_bias else None, *conv_args,
               seed=21, samples=S, mode=mode, per_sample=per_sample)
        g = torch.randn(y.shape, generator=rng).to(backend.device)
        got = torch.autograd.grad(y, leaves, g)
    r = [t.detach().double().requires_grad_() for t in leaves]
    yr = rfn(r[0], r[1], r[2], labels, to64(ell), to64(outl), r[3] if has_bias else None, *conv_args, seed=21,
             samples=S, mode=mode, per_sample=per_sample)
    assert y.shape == yr.shape
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad(yr, r, g.double(), allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"grad {i}")


@pytest.mark.backends("native_cpu", "triton")
@pytest.mark.parametrize("spatial,per_sample,groups,bias", [(2, False, 2, "sampled"), (2, True, 1, "fixed"),
                                                            (1, True, 3, "sampled"), (1, False, 1, None)])
def test_mean_field_conv(rng, backend, spatial, per_sample, groups, bias):
    S, N, C, out_c = 3, 2, 6, 6
    size = (7, 6) if spatial == 2 else (10,)
    ks = (3, 3) if spatial == 2 else (3,)
    x = torch.randn(*(((S,) if per_sample else ()) + (N, C, *size)), generator=rng).to(backend.device)
    leaves = [x, torch.randn(out_c, C // groups, *ks, generator=rng).to(backend.device) * 0.1,
              torch.randn(out_c, C // groups, *ks, generator=rng).to(backend.device) - 3]
    if bias:
        leaves.append(torch.randn(out_c, generator=rng).to(backend.device))
    if bias == "sampled":
        leaves.append(torch.randn(out_c, generator=rng).to(backend.device) - 2)
    leaves = [t.requires_grad_() for t in leaves]
    extra = leaves[3:] + [None] * (5 - len(leaves))
    fn, rfn = (F.mean_field_conv2d, R.mean_field_conv2d) if spatial == 2 else (F.mean_field_conv1d,
                                                                               R.mean_field_conv1d)
    with backend():
        y = fn(leaves[0], leaves[1], leaves[2], *extra, 1, 1, 1, groups, seed=8, samples=S, owner=2,
               per_sample=per_sample)
        g = torch.randn(y.shape, generator=rng).to(backend.device)
        got = torch.autograd.grad(y, leaves, g)
    r = [t.detach().double().requires_grad_() for t in leaves]
    r_extra = r[3:] + [None] * (5 - len(r))
    yr = rfn(r[0], r[1], r[2], *r_extra, 1, 1, 1, groups, seed=8, samples=S, owner=2, per_sample=per_sample)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad(yr, r, g.double())
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"grad {i}")


@pytest.mark.backends("reference", "native_cpu", "triton")
def test_conv_input_errors(rng, backend):
    means, chol, labels, _, _ = make_layer(rng, (4, 3, 3, 3), 5, device=backend.device)
    with backend():
        with pytest.raises(ValueError, match="expected 4 dimensions"):
            F.sws_conv2d(torch.randn(3, 5, 5, device=backend.device), means, chol, labels, seed=1)
        with pytest.raises(ValueError, match="leading sample dimension"):
            F.sws_conv2d(torch.randn(2, 1, 3, 5, 5, device=backend.device), means, chol, labels, seed=1, samples=3,
                         per_sample=True)
        with pytest.raises(ValueError, match="groups"):
            F.sws_conv2d(torch.randn(1, 3, 5, 5, device=backend.device), means, chol, labels, seed=1, groups=3)
