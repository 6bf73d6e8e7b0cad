"""Native CUDA kernels beyond reconstruct: mean-field reconstruct fwd/bwd (csrc/cuda/mean_field.cu) and the fused
small-M SWS linear forward (csrc/cuda/linear.cu). Skipped, with the reason, where there is no usable GPU; CI only
compiles them. Run on a GPU machine after `pip install --no-build-isolation --no-deps -e .`.

Truth: the weights from the native CPU reconstruct (the same host Philox, float64 products); the fused kernel's
error must be at most 2x that of PyTorch's own matmul in the same precision (flash-attention's rule), plus
the normals' ulp-level host/device difference in hierarchical mode.
"""
from __future__ import annotations

import math

import pytest
import torch

C = pytest.importorskip("sws_kernels._C", reason="sws_kernels._C is not built (pip install -e .)")
import sws_kernels  # noqa: E402
from sws_kernels import _ops, native  # noqa: E402
from sws_kernels import functional as F  # noqa: E402
from sws_kernels import reference as R  # noqa: E402

pytestmark = pytest.mark.skipif(not native.AVAILABLE_CUDA, reason=f"native CUDA unavailable: {native.CUDA_REASON}")
MODES = {"paper": 0, "hierarchical": 1, "mean": 2}
EMPTY_I = torch.empty(0, dtype=torch.int64)
EMPTY_F = torch.empty(0)


def _mf_params(shape, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(*shape, generator=g) * 0.1
    rho = torch.randn(*shape, generator=g) * 2 - 4
    rho.view(-1)[0] = 25.0  # softplus threshold branch
    return mu, rho


@pytest.mark.parametrize("shape", [(1,), (3, 5), (129,), (4099,), (257, 33)])
@pytest.mark.parametrize("S", [1, 7])
@pytest.mark.parametrize("purpose", [0, 2])
def test_mean_field_cuda_matches_cpu_and_reference(shape, S, purpose):
    mu, rho = _mf_params(shape, S + purpose)
    w_cpu = native.mean_field_reconstruct(mu, rho, 123, S, 5, purpose)
    w = native.mean_field_reconstruct(mu.cuda(), rho.cuda(), 123, S, 5, purpose)
    torch.testing.assert_close(w.cpu(), w_cpu, rtol=1e-6, atol=1e-5)
    ref = R.mean_field_reconstruct(mu.double(), rho.double(), seed=123, samples=S, owner=5, purpose=purpose)
    torch.testing.assert_close(w.cpu().double(), ref, rtol=1e-6, atol=1e-5)
    g = torch.randn(S, *shape, generator=torch.Generator().manual_seed(1))
    got = native.mean_field_reconstruct_backward(g.cuda(), mu.cuda(), rho.cuda(), 123, S, 5, purpose)
    again = native.mean_field_reconstruct_backward(g.cuda(), mu.cuda(), rho.cuda(), 123, S, 5, purpose)
    want = _ops._mf_reference_backward(g.double(), mu.double(), rho.double(), 123, S, 5, purpose)
    for a, b, r in zip(got, again, want):
        assert torch.equal(a, b)  # deterministic
        torch.testing.assert_close(a.cpu().double(), r, rtol=1e-5, atol=1e-5 * S)


def _layer(K, out_f, in_f, E, O, label_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = out_f * in_f
    means = torch.stack([torch.randn(K, generator=g) * 0.1, torch.randn(K, generator=g) - 3], -1)
    chol = torch.randn(K, 3, generator=g) * 0.5 - torch.tensor([2.0, 0.0, 2.0])
    hi = min(K, int(torch.iinfo(label_dtype).max) + 1)
    labels = torch.randint(0, hi, (out_f, in_f), generator=g).to(label_dtype)
    perm = torch.randperm(n, generator=g)
    ell = (perm[:E].clone(), torch.randint(0, hi, (E,), generator=g), torch.randint(0, hi, (E,), generator=g),
           torch.rand(E, generator=g))
    outl = (perm[E:E + O].clone(), torch.randn(O, generator=g) * 0.3, torch.randn(O, generator=g) - 3)
    return means, chol, labels, ell, outl


LIN_CASES = [  # K, out, in, E, O
    (1, 3, 5, 0, 0),
    (37, 17, 129, 9, 4),
    (300, 65, 67, 40, 25),  # in % 4 != 0: rows start mid-counter (per-element normals)
    (4096, 129, 256, 100, 50),
    (20000, 33, 64, 10, 10),  # table larger than shared memory: global reads
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("K,out_f,in_f,E,O", LIN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,per_sample,bias", [(1, False, None), (3, True, "shared"), (16, False, "sample")])
def test_fused_linear_matches_reconstruct_then_matmul(mode, K, out_f, in_f, E, O, dtype, M, per_sample, bias):
    label_dtype = torch.int16 if K < 32768 else torch.int32
    means, chol, labels, ell, outl = _layer(K, out_f, in_f, E, O, label_dtype, seed=K + M)
    S = 3
    g = torch.Generator().manual_seed(M)
    x = torch.randn(*((S,) if per_sample else ()), M, in_f, generator=g)
    b = None if bias is None else torch.randn(*((S,) if bias == "sample" else ()), out_f, generator=g)
    args = (means, chol, labels, *ell, *outl)
    w = native.reconstruct(*args, 77, S, MODES[mode], 2, 6).double()  # truth: host Philox, float64 products
    xs = x.double() if per_sample else x.double().expand(S, M, in_f)
    want = torch.matmul(xs, w.transpose(1, 2))
    if b is not None:
        want = want + (b.double() if b.dim() == 2 else b.double().expand(S, -1))[:, None, :]
    # PyTorch in the same precision (the error budget)
    xt = x.to(dtype).cuda()
    torch_y = torch.matmul(xt if per_sample else xt.expand(S, M, in_f), w.to(dtype).cuda().transpose(1, 2))
    if b is not None:
        torch_y = torch_y + (b if b.dim() == 2 else b.expand(S, -1)).to(dtype).cuda()[:, None, :]
    dev_args = tuple(t.cuda() for t in args)
    y = native.sws_linear_cuda(xt, *dev_args, None if b is None else b.cuda(), 77, S, MODES[mode], 2, 6, per_sample)
    assert y.dtype == dtype and y.shape == (S, M, out_f)
    err = (y.double().cpu() - want).abs().max().item()
    err_torch = (torch_y.double().cpu() - want).abs().max().item()
    # device vs host normals differ by ulps (1e-6 * sigma * |x| summed over a row) in hierarchical mode
    slack = 1e-5 * math.sqrt(in_f) * (mode == "hierarchical")
    assert err <= 2 * err_torch + 1e-5 + slack, (err, err_torch)
    again = native.sws_linear_cuda(xt, *dev_args, None if b is None else b.cuda(), 77, S, MODES[mode], 2, 6,
                                   per_sample)
    assert torch.equal(y, again)  # no atomics: bit-identical


def test_linear_op_on_cuda_with_native_backend_autograd():
    means, chol, labels, ell, outl = _layer(64, 31, 47, 5, 3, torch.int16, seed=3)
    dev = [t.cuda() for t in (means, chol, labels)]
    ell_d, outl_d = tuple(t.cuda() for t in ell), tuple(t.cuda() for t in outl)
    m, c = dev[0].clone().requires_grad_(), dev[1].clone().requires_grad_()
    x = torch.randn(5, 47, device="cuda", requires_grad=True)
    with sws_kernels.backend("native"):
        y = F.sws_linear(x, m, c, dev[2], ell_d, outl_d, seed=9, samples=2, mode="hierarchical")
        got = torch.autograd.grad((y * y).sum(), (x, m, c))
    m64, c64 = means.double().requires_grad_(), chol.double().requires_grad_()
    x64 = x.detach().cpu().double().requires_grad_()
    ell64 = (*ell[:3], ell[3].double())
    outl64 = (outl[0], outl[1].double(), outl[2].double())
    y64 = R.sws_linear(x64, m64, c64, labels, ell64, outl64, seed=9, samples=2, mode="hierarchical")
    want = torch.autograd.grad((y64 * y64).sum(), (x64, m64, c64))
    # fp32 chain vs float64: the same check on the native CPU path measured 1.4e-6 on y (|y| <= 6) and 5e-5 on
    # grads of magnitude up to 300 (relative 2e-7 of the largest); 1e-4 leaves room for ulp-different normals.
    torch.testing.assert_close(y.detach().cpu().double(), y64.detach(), rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-4)


def test_fused_linear_errors_name_the_call():
    means, chol, labels, ell, outl = _layer(8, 4, 6, 0, 0, torch.int16, seed=0)
    args = tuple(t.cuda() for t in (means, chol, labels, *ell, *outl))
    with pytest.raises(ValueError, match="sws_linear_cuda: M"):
        native.sws_linear_cuda(torch.randn(17, 6, device="cuda"), *args, None, 1, 1, 0, 0, 0, False)
    with pytest.raises(ValueError, match="x: expected"):
        native.sws_linear_cuda(torch.randn(3, 5, device="cuda"), *args, None, 1, 1, 0, 0, 0, False)
