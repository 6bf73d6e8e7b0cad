"""Fused SWS and mean-field linear (Triton, interpreter on CPU) against the float64 reference: forward, every
gradient, both dispatcher paths, bf16/fp16 activations (error at most 2x PyTorch's in the same precision),
determinism and opcheck."""
import logging
import math

import pytest
import torch

import sws_kernels
from sws_kernels import _backend, _ops
from sws_kernels import functional as F
from sws_kernels import reference as R

pytest.importorskip("triton")
from sws_kernels.triton import linear as L  # noqa: E402

from test_triton_reconstruct import DEV, make_layer, to64  # noqa: E402

D = torch.float64

CASES = [  # mode, label dtype, K, (out, in), lead, S, E, O, per_sample, fused
    ("paper", torch.uint8, 1, (37, 45), (1,), 1, 2, 3, False, True),
    ("hierarchical", torch.int16, 255, (33, 40), (2,), 3, 4, 5, True, True),
    ("mean", torch.int16, 256, (17, 40), (3,), 3, 0, 4, False, True),
    ("paper", torch.int32, 4096, (20, 33), (17,), 3, 5, 0, False, True),
    ("paper", torch.int16, 9, (36, 20), (129,), 1, 3, 3, True, True),
    ("hierarchical", torch.uint8, 5, (20, 17), (2, 3), 3, 2, 2, False, False),
    ("paper", torch.int64, 255, (21, 50), (3,), 8, 1, 6, True, False),
    ("mean", torch.uint8, 3, (16, 16), (1,), 1, 0, 0, True, False),
    ("hierarchical", torch.int16, 9, (19, 23), (3,), 2, 2, 2, False, True),  # rows not a multiple of 4, fused
]


def _run_sws(x, params, bias, *, seed, S, mode, per_sample):
    means, chol, labels, ell, outl = params
    return F.sws_linear(x, means, chol, labels, ell, outl, bias, seed=seed, samples=S, mode=mode, per_sample=per_sample)


@pytest.mark.parametrize("mode,label_dtype,K,shape,lead,S,E,O,per_sample,fused", CASES)
def test_sws_linear_forward_and_grads(rng, monkeypatch, mode, label_dtype, K, shape, lead, S, E, O, per_sample,
                                      fused):
    monkeypatch.setitem(_backend.LIMITS, "triton_fused_max_m", _backend.Limit(10**9 if fused else 0, "test"))
    out_f, in_f = shape
    means, chol, labels, ell, outl = make_layer(rng, shape, K, E, O, label_dtype)
    xs = (S, *lead, in_f) if per_sample else (*lead, in_f)
    x = torch.randn(*xs, generator=rng).to(DEV)
    bias = torch.randn(out_f, generator=rng).to(DEV)
    leaves = [x, means, chol, bias] + ([outl[1], outl[2]] if O else [])
    leaves = [t.clone().requires_grad_() for t in leaves]
    lx, lm, lc, lb = leaves[:4]
    lo = (outl[0], leaves[4], leaves[5]) if O else None
    seed = int(torch.randint(0, 2**62, (1,), generator=rng).to(DEV)) * 3  # spans past 2**63
    with sws_kernels.backend("triton"):
        y = _run_sws(lx, (lm, lc, labels, ell, lo), lb, seed=seed, S=S, mode=mode, per_sample=per_sample)
        g = torch.randn(y.shape, generator=rng).to(DEV)
        # the backward ops select their backend when they run: keep them inside the context
        got = torch.autograd.grad(y, leaves, g, allow_unused=True)
    r_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rm, rc, rb = r_leaves[:4]
    ro = (outl[0], r_leaves[4], r_leaves[5]) if O else None
    yr = R.sws_linear(rx, rm, rc, labels, to64(ell), ro, rb, seed=seed, samples=S, mode=mode, per_sample=per_sample)
    assert y.shape == yr.shape
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=2e-5 * math.sqrt(in_f))
    want = torch.autograd.grad(yr, r_leaves, g.double(), allow_unused=True)
    rows = math.prod(lead) * S
    for i, (a, b) in enumerate(zip(got, want)):
        b = torch.zeros_like(a, dtype=D) if b is None else b
        assert a is not None and not torch.isnan(a).any(), i
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5 * math.sqrt(rows * in_f * out_f / K + rows),
                                   msg=f"grad {i}")
    with sws_kernels.backend("triton"):
        y3 = _run_sws(lx, (lm, lc, labels, ell, lo), lb, seed=seed, S=S, mode=mode, per_sample=per_sample)
        got3 = torch.autograd.grad(y3, leaves, g, allow_unused=True)
    assert torch.equal(y, y3)  # same seed -> identical output
    for a, b in zip(got, got3):
        assert torch.equal(a, b)  # deterministic backward


# Every production mode x low-precision dtype x tile class (M <= 16 and M <= 64 fused; unfused): the bf16/fp16
# configurations benchmarks/triton_aot.py records and compiles come from these launches.
# In = 63: weight rows not a multiple of 4 (the per-row shifted Philox quads).
LOW_PRECISION = [(mode, dtype, M, fused, 64) for mode in ("paper", "hierarchical", "mean")
                 for dtype in (torch.bfloat16, torch.float16) for M, fused in ((3, True), (17, True), (17, False))]
LOW_PRECISION += [("hierarchical", torch.bfloat16, 3, True, 63), ("hierarchical", torch.float16, 17, True, 63)]


@pytest.mark.parametrize("mode,dtype,M,fused,in_f", LOW_PRECISION)
def test_sws_linear_low_precision(rng, monkeypatch, mode, dtype, M, fused, in_f):
    monkeypatch.setitem(_backend.LIMITS, "triton_fused_max_m", _backend.Limit(10**9 if fused else 0, "test"))
    means, chol, labels, ell, outl = make_layer(rng, (40, in_f), 31, 3, 4, torch.uint8)
    x = torch.randn(M, in_f, generator=rng).to(DEV)
    bias = torch.randn(40, generator=rng).to(DEV)
    exact = R.sws_linear(x.double(), means.double(), chol.double(), labels, to64(ell), to64(outl), bias.double(),
                         seed=3, samples=3, mode=mode)
    torch_lp = R.sws_linear(x.to(dtype), means, chol, labels, ell, outl, bias, seed=3, samples=3, mode=mode)
    with sws_kernels.backend("triton"):
        y = F.sws_linear(x.to(dtype), means, chol, labels, ell, outl, bias, seed=3, samples=3, mode=mode)
    assert y.dtype == dtype
    err = (y.double() - exact).abs().max().item()
    err_torch = (torch_lp.double() - exact).abs().max().item()
    assert err <= 2 * err_torch, (err, err_torch)

    # gradients (dx, d means, d chol): same rule against PyTorch's autograd in the same precision
    g = torch.randn(exact.shape, generator=rng).to(DEV)

    def grads(xv, m, c, backend):
        leaves = [xv.clone().requires_grad_(), m.clone().requires_grad_(), c.clone().requires_grad_()]
        leaves = leaves[:2] if mode == "mean" else leaves  # the mean mode does not read chol
        with sws_kernels.backend(backend):
            yv = F.sws_linear(leaves[0], leaves[1], c if mode == "mean" else leaves[2], labels, ell if m.dtype != D else to64(ell),
                              outl if m.dtype != D else to64(outl), None, seed=3, samples=3, mode=mode)
            return torch.autograd.grad(yv, leaves, g.to(yv.dtype))

    g_exact = grads(x.double(), means.double(), chol.double(), "reference")
    g_torch = grads(x.to(dtype), means, chol, "reference")
    g_ours = grads(x.to(dtype), means, chol, "triton")
    for i, (a, b, e) in enumerate(zip(g_ours, g_torch, g_exact)):
        err, err_torch = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
        assert err <= 2 * err_torch, (i, err, err_torch)


def test_noncontiguous_x_and_labels(rng):
    means, chol, labels, ell, outl = make_layer(rng, (19, 23), 6, 2, 2, torch.int16)
    x = torch.randn(23, 5, generator=rng).to(DEV).t()  # [5, 23], transposed strides
    labels_nc = labels.t().contiguous().t()
    with sws_kernels.backend("triton"):
        y = F.sws_linear(x, means, chol, labels_nc, ell, outl, seed=1, samples=2, mode="paper")
    yr = R.sws_linear(x.double(), means.double(), chol.double(), labels, to64(ell), to64(outl), seed=1, samples=2)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-4)


def test_dispatcher_logs_its_choice(rng, caplog, monkeypatch):
    monkeypatch.setitem(_backend.LIMITS, "triton_fused_max_m", _backend.Limit(4, "test"))
    means, chol, labels, _, _ = make_layer(rng, (16, 16), 4)
    with caplog.at_level(logging.DEBUG, logger="sws_kernels"), sws_kernels.backend("triton"):
        F.sws_linear(torch.randn(3, 16, generator=rng).to(DEV), means, chol, labels, seed=1)
        F.sws_linear(torch.randn(5, 16, generator=rng).to(DEV), means, chol, labels, seed=1)
    text = caplog.text
    assert "sws_linear: backend triton (forced; fused: 3 rows per sample vs 4 (test))" in text
    assert "sws_linear: backend triton (forced; reconstruct + GEMM: 5 rows per sample vs 4 (test))" in text


def test_sws_linear_errors(rng):
    means, chol, labels, _, _ = make_layer(rng, (8, 6), 4)
    with sws_kernels.backend("triton"):
        with pytest.raises(ValueError, match="last dimension of size 6"):
            F.sws_linear(torch.randn(2, 7, device=DEV), means, chol, labels, seed=1)
        with pytest.raises(ValueError, match="leading sample dimension"):
            F.sws_linear(torch.randn(2, 3, 6, device=DEV), means, chol, labels, seed=1, samples=3, per_sample=True)


def test_opcheck_linear_ops(rng):
    means, chol, labels, ell, outl = make_layer(rng, (18, 20), 5, 2, 2, torch.int16)
    a = sws_kernels._checks.sws(means, chol, labels, ell, outl, 7, 2, "hierarchical", 1, 2)
    x = torch.randn(3, 20, generator=rng).to(DEV).requires_grad_()
    bias = torch.randn(18, generator=rng).to(DEV).requires_grad_()
    m, c = means.clone().requires_grad_(), chol.clone().requires_grad_()
    rest = (a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu, a.o_rho)
    with sws_kernels.backend("triton"):
        torch.library.opcheck(torch.ops.sws_kernels.sws_linear.default,
                              (x, m, c, *rest, bias, sws_kernels.philox.seed_tensor(7, DEV), 2, 1, 1, 2, False))
        gy = torch.randn(2, 3, 18, generator=rng).to(DEV)
        torch.library.opcheck(torch.ops.sws_kernels.sws_linear_dx.default,
                              (gy, means, chol, *rest, sws_kernels.philox.seed_tensor(7, DEV), 2, 1, 1, 2,
                               False))
        mu = (torch.randn(18, 20, generator=rng).to(DEV) * 0.1).requires_grad_()
        rho = (torch.randn(18, 20, generator=rng).to(DEV) - 3).requires_grad_()
        seed = sws_kernels.philox.seed_tensor(7, DEV)
        torch.library.opcheck(torch.ops.sws_kernels.mean_field_linear.default, (x, mu, rho, bias, seed, 2, 1, False))
        torch.library.opcheck(torch.ops.sws_kernels.mean_field_linear_dx.default,
                              (gy, mu.detach(), rho.detach(), seed, 2, 1, False))


# ------------------------------------------------------------------------------------------------------
# mean field
# ------------------------------------------------------------------------------------------------------

MF_CASES = [  # (out, in), lead, S, per_sample, bias kind, fused
    ((37, 45), (1,), 1, False, "sampled", True),
    ((33, 70), (2,), 3, True, "fixed", True),
    ((17, 40), (17,), 8, False, None, True),
    ((20, 33), (129,), 1, True, "sampled", True),
    ((21, 19), (3, 2), 3, False, "sampled", False),
]


@pytest.mark.parametrize("shape,lead,S,per_sample,bias_kind,fused", MF_CASES)
def test_mean_field_linear(rng, monkeypatch, shape, lead, S, per_sample, bias_kind, fused):
    monkeypatch.setitem(_backend.LIMITS, "triton_fused_max_m", _backend.Limit(10**9 if fused else 0, "test"))
    out_f, in_f = shape
    xs = (S, *lead, in_f) if per_sample else (*lead, in_f)
    leaves = [torch.randn(*xs, generator=rng).to(DEV), torch.randn(*shape, generator=rng).to(DEV) * 0.1,
              torch.randn(*shape, generator=rng).to(DEV) - 3]
    if bias_kind:
        leaves.append(torch.randn(out_f, generator=rng).to(DEV))
    if bias_kind == "sampled":
        leaves.append(torch.randn(out_f, generator=rng).to(DEV) - 2)
    leaves = [t.requires_grad_() for t in leaves]
    extra = leaves[3:] + [None] * (5 - len(leaves))
    with sws_kernels.backend("triton"):
        y = F.mean_field_linear(leaves[0], leaves[1], leaves[2], *extra, seed=77, samples=S, owner=4,
                                per_sample=per_sample)
        g = torch.randn(y.shape, generator=rng).to(DEV)
        got = torch.autograd.grad(y, leaves, g)
    r_leaves = [t.detach().double().requires_grad_() for t in leaves]
    r_extra = r_leaves[3:] + [None] * (5 - len(r_leaves))
    yr = R.mean_field_linear(r_leaves[0], r_leaves[1], r_leaves[2], *r_extra, seed=77, samples=S, owner=4,
                             per_sample=per_sample)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=2e-5 * math.sqrt(in_f))
    want = torch.autograd.grad(yr, r_leaves, g.double())
    rows = math.prod(lead) * S
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5 * math.sqrt(rows + in_f), msg=f"grad {i}")


@pytest.mark.parametrize("dtype,M,in_f", [(torch.bfloat16, 3, 64), (torch.bfloat16, 17, 64), (torch.float16, 3, 64),
                                          (torch.float16, 17, 64), (torch.bfloat16, 3, 63), (torch.float16, 17, 63)])
def test_mean_field_linear_low_precision(rng, dtype, M, in_f):
    """Forward and dx in bf16/fp16 (the fused kernel at both small-M tiles, rows aligned to 4 or not) within 2x
    PyTorch's error."""
    mu = torch.randn(40, in_f, generator=rng).to(DEV) * 0.1
    rho = torch.randn(40, in_f, generator=rng).to(DEV) - 3
    x = torch.randn(M, in_f, generator=rng).to(DEV)
    g = torch.randn(2, M, 40, generator=rng).to(DEV)

    def run(xv, m, r, backend):
        xv = xv.clone().requires_grad_()
        with sws_kernels.backend(backend):
            y = F.mean_field_linear(xv, m, r, seed=3, samples=2)
            return y, torch.autograd.grad(y, xv, g.to(y.dtype))[0]

    exact, dx_exact = run(x.double(), mu.double(), rho.double(), "reference")
    torch_lp, dx_torch = run(x.to(dtype), mu, rho, "reference")
    y, dx = run(x.to(dtype), mu, rho, "triton")
    assert y.dtype == dtype and dx.dtype == dtype
    for ours, theirs, e in ((y, torch_lp, exact), (dx, dx_torch, dx_exact)):
        err = (ours.double() - e).abs().max().item()
        assert err <= 2 * (theirs.double() - e).abs().max().item(), err
