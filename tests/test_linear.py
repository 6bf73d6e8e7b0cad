"""sws_linear and mean_field_linear (forward, dx, every gradient) on every backend, against the float64 reference.

1. The public API (functional.sws_linear / mean_field_linear, the torch.ops.sws_kernels ops: autograd,
   opcheck, dispatch), parametrised over backends with @pytest.mark.backends (tests/conftest.py). Triton
   runs under the interpreter on CPU: both dispatcher paths (fused small-M kernel, reconstruct + GEMM),
   bf16/fp16 activations (error at most 2x PyTorch's in the same precision), determinism.
2. The native fused small-M linear: CPU (csrc/cpu/linear.cpp, native.sws_linear_cpu: paper and mean modes,
   shared and per-sample x, bias, ellipses and outliers, odd sizes, bit-identical across reruns, thread
   counts and SIMD versions) and CUDA (csrc/cuda/linear.cu, where a GPU exists: against reconstruct then
   matmul, error at most 2x PyTorch's in the same precision).
"""
import logging
import math

import pytest
import torch
from conftest import make_layer, to64

import sws_kernels
from sws_kernels import _backend, native
from sws_kernels import functional as F
from sws_kernels import reference as R

D = torch.float64


# ======================================================================================================
# 1. public API, every backend
# ======================================================================================================

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


@pytest.mark.backends("triton")
@pytest.mark.parametrize("mode,label_dtype,K,shape,lead,S,E,O,per_sample,fused", CASES)
def test_sws_linear_forward_and_grads(rng, monkeypatch, backend, mode, label_dtype, K, shape, lead, S, E, O, per_sample,
                                      fused):
    monkeypatch.setitem(_backend.LIMITS, "triton_fused_max_m", _backend.Limit(10**9 if fused else 0, "test"))
    out_f, in_f = shape
    means, chol, labels, ell, outl = make_layer(rng, shape, K, E, O, label_dtype)
    xs = (S, *lead, in_f) if per_sample else (*lead, in_f)
    x = torch.randn(*xs, generator=rng).to(backend.device)
    bias = torch.randn(out_f, generator=rng).to(backend.device)
    leaves = [x, means, chol, bias] + ([outl[1], outl[2]] if O else [])
    leaves = [t.clone().requires_grad_() for t in leaves]
    lx, lm, lc, lb = leaves[:4]
    lo = (outl[0], leaves[4], leaves[5]) if O else None
    seed = int(torch.randint(0, 2**62, (1,), generator=rng).to(backend.device)) * 3  # spans past 2**63
    with backend():
        y = _run_sws(lx, (lm, lc, labels, ell, lo), lb, seed=seed, S=S, mode=mode, per_sample=per_sample)
        g = torch.randn(y.shape, generator=rng).to(backend.device)
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
    with backend():
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


@pytest.mark.backends("triton")
@pytest.mark.parametrize("mode,dtype,M,fused,in_f", LOW_PRECISION)
def test_sws_linear_low_precision(rng, monkeypatch, backend, mode, dtype, M, fused, in_f):
    monkeypatch.setitem(_backend.LIMITS, "triton_fused_max_m", _backend.Limit(10**9 if fused else 0, "test"))
    means, chol, labels, ell, outl = make_layer(rng, (40, in_f), 31, 3, 4, torch.uint8)
    x = torch.randn(M, in_f, generator=rng).to(backend.device)
    bias = torch.randn(40, generator=rng).to(backend.device)
    exact = R.sws_linear(x.double(), means.double(), chol.double(), labels, to64(ell), to64(outl), bias.double(),
                         seed=3, samples=3, mode=mode)
    torch_lp = R.sws_linear(x.to(dtype), means, chol, labels, ell, outl, bias, seed=3, samples=3, mode=mode)
    with backend():
        y = F.sws_linear(x.to(dtype), means, chol, labels, ell, outl, bias, seed=3, samples=3, mode=mode)
    assert y.dtype == dtype
    err = (y.double() - exact).abs().max().item()
    err_torch = (torch_lp.double() - exact).abs().max().item()
    assert err <= 2 * err_torch, (err, err_torch)

    # gradients (dx, d means, d chol): same rule against PyTorch's autograd in the same precision
    g = torch.randn(exact.shape, generator=rng).to(backend.device)

    def grads(xv, m, c, choice):
        leaves = [xv.clone().requires_grad_(), m.clone().requires_grad_(), c.clone().requires_grad_()]
        leaves = leaves[:2] if mode == "mean" else leaves  # the mean mode does not read chol
        with sws_kernels.backend(choice):
            yv = F.sws_linear(leaves[0], leaves[1], c if mode == "mean" else leaves[2], labels, ell if m.dtype != D else to64(ell),
                              outl if m.dtype != D else to64(outl), None, seed=3, samples=3, mode=mode)
            return torch.autograd.grad(yv, leaves, g.to(yv.dtype))

    g_exact = grads(x.double(), means.double(), chol.double(), "reference")
    g_torch = grads(x.to(dtype), means, chol, "reference")
    g_ours = grads(x.to(dtype), means, chol, backend.name)
    for i, (a, b, e) in enumerate(zip(g_ours, g_torch, g_exact)):
        err, err_torch = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
        assert err <= 2 * err_torch, (i, err, err_torch)


@pytest.mark.backends("reference", "native_cpu", "triton")
def test_noncontiguous_x_and_labels(rng, backend):
    means, chol, labels, ell, outl = make_layer(rng, (19, 23), 6, 2, 2, torch.int16, device=backend.device)
    x = torch.randn(23, 5, generator=rng).to(backend.device).t()  # [5, 23], transposed strides
    labels_nc = labels.t().contiguous().t()
    with backend():
        y = F.sws_linear(x, means, chol, labels_nc, ell, outl, seed=1, samples=2, mode="paper")
    yr = R.sws_linear(x.double(), means.double(), chol.double(), labels, to64(ell), to64(outl), seed=1, samples=2)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-4)


@pytest.mark.backends("triton")
def test_dispatcher_logs_its_choice(rng, caplog, monkeypatch, backend):
    monkeypatch.setitem(_backend.LIMITS, "triton_fused_max_m", _backend.Limit(4, "test"))
    means, chol, labels, _, _ = make_layer(rng, (16, 16), 4)
    with caplog.at_level(logging.DEBUG, logger="sws_kernels"), backend():
        F.sws_linear(torch.randn(3, 16, generator=rng).to(backend.device), means, chol, labels, seed=1)
        F.sws_linear(torch.randn(5, 16, generator=rng).to(backend.device), means, chol, labels, seed=1)
    text = caplog.text
    assert "sws_linear: backend triton (forced; fused: 3 rows per sample vs 4 (test))" in text
    assert "sws_linear: backend triton (forced; reconstruct + GEMM: 5 rows per sample vs 4 (test))" in text


@pytest.mark.backends("reference", "native_cpu", "triton")
def test_sws_linear_errors(rng, backend):
    means, chol, labels, _, _ = make_layer(rng, (8, 6), 4, device=backend.device)
    with backend():
        with pytest.raises(ValueError, match="last dimension of size 6"):
            F.sws_linear(torch.randn(2, 7, device=backend.device), means, chol, labels, seed=1)
        with pytest.raises(ValueError, match="leading sample dimension"):
            F.sws_linear(torch.randn(2, 3, 6, device=backend.device), means, chol, labels, seed=1, samples=3,
                         per_sample=True)


@pytest.mark.backends("triton")
def test_opcheck_linear_ops(rng, backend):
    means, chol, labels, ell, outl = make_layer(rng, (18, 20), 5, 2, 2, torch.int16)
    a = sws_kernels._checks.sws(means, chol, labels, ell, outl, 7, 2, "hierarchical", 1, 2)
    x = torch.randn(3, 20, generator=rng).to(backend.device).requires_grad_()
    bias = torch.randn(18, generator=rng).to(backend.device).requires_grad_()
    m, c = means.clone().requires_grad_(), chol.clone().requires_grad_()
    rest = (a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu, a.o_rho)
    with backend():
        torch.library.opcheck(torch.ops.sws_kernels.sws_linear.default,
                              (x, m, c, *rest, bias, sws_kernels.philox.seed_tensor(7, backend.device), 2, 1, 1, 2,
                               False))
        gy = torch.randn(2, 3, 18, generator=rng).to(backend.device)
        torch.library.opcheck(torch.ops.sws_kernels.sws_linear_dx.default,
                              (gy, means, chol, *rest, sws_kernels.philox.seed_tensor(7, backend.device), 2, 1, 1, 2,
                               False))
        mu = (torch.randn(18, 20, generator=rng).to(backend.device) * 0.1).requires_grad_()
        rho = (torch.randn(18, 20, generator=rng).to(backend.device) - 3).requires_grad_()
        seed = sws_kernels.philox.seed_tensor(7, backend.device)
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


@pytest.mark.backends("triton")
@pytest.mark.parametrize("shape,lead,S,per_sample,bias_kind,fused", MF_CASES)
def test_mean_field_linear(rng, monkeypatch, backend, shape, lead, S, per_sample, bias_kind, fused):
    monkeypatch.setitem(_backend.LIMITS, "triton_fused_max_m", _backend.Limit(10**9 if fused else 0, "test"))
    out_f, in_f = shape
    xs = (S, *lead, in_f) if per_sample else (*lead, in_f)
    dev = backend.device
    leaves = [torch.randn(*xs, generator=rng).to(dev), torch.randn(*shape, generator=rng).to(dev) * 0.1,
              torch.randn(*shape, generator=rng).to(dev) - 3]
    if bias_kind:
        leaves.append(torch.randn(out_f, generator=rng).to(backend.device))
    if bias_kind == "sampled":
        leaves.append(torch.randn(out_f, generator=rng).to(backend.device) - 2)
    leaves = [t.requires_grad_() for t in leaves]
    extra = leaves[3:] + [None] * (5 - len(leaves))
    with backend():
        y = F.mean_field_linear(leaves[0], leaves[1], leaves[2], *extra, seed=77, samples=S, owner=4,
                                per_sample=per_sample)
        g = torch.randn(y.shape, generator=rng).to(backend.device)
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


@pytest.mark.backends("triton")
@pytest.mark.parametrize("dtype,M,in_f", [(torch.bfloat16, 3, 64), (torch.bfloat16, 17, 64), (torch.float16, 3, 64),
                                          (torch.float16, 17, 64), (torch.bfloat16, 3, 63), (torch.float16, 17, 63)])
def test_mean_field_linear_low_precision(rng, backend, dtype, M, in_f):
    """Forward and dx in bf16/fp16 (the fused kernel at both small-M tiles, rows aligned to 4 or not) within 2x
    PyTorch's error."""
    mu = torch.randn(40, in_f, generator=rng).to(backend.device) * 0.1
    rho = torch.randn(40, in_f, generator=rng).to(backend.device) - 3
    x = torch.randn(M, in_f, generator=rng).to(backend.device)
    g = torch.randn(2, M, 40, generator=rng).to(backend.device)

    def run(xv, m, r, choice):
        xv = xv.clone().requires_grad_()
        with sws_kernels.backend(choice):
            y = F.mean_field_linear(xv, m, r, seed=3, samples=2)
            return y, torch.autograd.grad(y, xv, g.to(y.dtype))[0]

    exact, dx_exact = run(x.double(), mu.double(), rho.double(), "reference")
    torch_lp, dx_torch = run(x.to(dtype), mu, rho, "reference")
    y, dx = run(x.to(dtype), mu, rho, backend.name)
    assert y.dtype == dtype and dx.dtype == dtype
    for ours, theirs, e in ((y, torch_lp, exact), (dx, dx_torch, dx_exact)):
        err = (ours.double() - e).abs().max().item()
        assert err <= 2 * (theirs.double() - e).abs().max().item(), err


@pytest.mark.backends("native_cpu")
def test_mean_field_linear_matches_reference_backend(backend):
    """mean_field_linear on the CPU: native reconstruct + PyTorch GEMM, gradients through the native backward."""
    g = torch.Generator().manual_seed(8)
    mu = (torch.randn(17, 13, generator=g) * 0.1).requires_grad_()
    rho = (torch.randn(17, 13, generator=g) - 3).requires_grad_()
    bm, br = torch.randn(17, generator=g) * 0.1, torch.randn(17, generator=g) - 3
    x = torch.randn(3, 13, generator=g, requires_grad=True)
    outs = {}
    for be in (backend.name, "reference"):
        with sws_kernels.backend(be):
            y = F.mean_field_linear(x, mu, rho, bm, br, seed=11, samples=2, owner=4)
            outs[be] = (y, *torch.autograd.grad((y * y).sum(), (x, mu, rho)))
    for a, b in zip(outs[backend.name], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.backends("native_cpu")
@pytest.mark.parametrize("mode", ["paper", "mean"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_sws_linear_gradients_match_reference(rng, backend, mode, per_sample):
    S, M, (out_f, in_f), K = 2, 5, (23, 31), 64
    means, chol, labels, ell, outl = make_layer(rng, (out_f, in_f), K, 4, 5, device="cpu")
    x = torch.randn(*((S,) if per_sample else ()), M, in_f, generator=rng)
    bias = torch.randn(out_f, generator=rng)
    gy = torch.randn(S, M, out_f, generator=rng)

    def run(choice, dtype):
        cast = lambda t: t.to(dtype).detach().requires_grad_()  # noqa: E731
        xs, m, c, b = cast(x), cast(means), cast(chol), cast(bias)
        o = None if outl is None else (outl[0], cast(outl[1]), cast(outl[2]))
        e = to64(ell) if dtype == D else ell
        with sws_kernels.backend(choice):
            y = F.sws_linear(xs, m, c, labels, e, o, b, seed=9, samples=S, mode=mode, per_sample=per_sample)
        (y * gy.to(dtype)).sum().backward()
        return [y, xs.grad, m.grad, c.grad, b.grad, o[1].grad, o[2].grad]

    got = run(backend.name, torch.float32)
    want = run("reference", D)
    for g, w in zip(got, want):
        if w is None or g is None:  # mean mode: no noise, so no path to some parameters (None or zeros)
            assert (g is None or not g.any()) and (w is None or not w.any())
            continue
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.backends("native_cpu")
def test_dispatch_uses_fused_kernel_for_small_m(rng, monkeypatch, backend):
    calls = []
    real = native.sws_linear_cpu
    monkeypatch.setattr(native, "sws_linear_cpu", lambda *a: calls.append(1) or real(*a))
    means, chol, labels, ell, outl = make_layer(rng, (20, 30), 16, 2, 2, device="cpu")
    with backend():
        F.sws_linear(torch.randn(4, 30, generator=rng), means, chol, labels, ell, outl, seed=1)
        assert len(calls) == 1
        F.sws_linear(torch.randn(2, 3, 30, generator=rng), means, chol, labels, ell, outl, seed=1)  # 6 rows
        assert len(calls) == 2
        F.sws_linear(torch.randn(33, 30, generator=rng), means, chol, labels, ell, outl, seed=1)  # large M
        F.sws_linear(torch.randn(4, 30, generator=rng), means, chol, labels, ell, outl, seed=1, mode="hierarchical")
        F.sws_linear(torch.randn(4, 30, generator=rng, dtype=D).to(torch.bfloat16), means, chol, labels, ell,
                     outl, seed=1)
        assert len(calls) == 2


@pytest.mark.backends("native_cuda")
def test_sws_linear_op_on_cuda_autograd(backend):
    means, chol, labels, ell, outl = _cuda_layer(64, 31, 47, 5, 3, torch.int16, seed=3)
    dev = [t.cuda() for t in (means, chol, labels)]
    ell_d, outl_d = tuple(t.cuda() for t in ell), tuple(t.cuda() for t in outl)
    m, c = dev[0].clone().requires_grad_(), dev[1].clone().requires_grad_()
    x = torch.randn(5, 47, device="cuda", requires_grad=True)
    with backend():
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


# ======================================================================================================
# 2. native fused small-M linear: CPU, then CUDA
# ======================================================================================================

def _fused(x, layer, bias, seed, S, mode, per_sample, owner=3, cb=7):
    means, chol, labels, ell, outl = layer
    a = sws_kernels._checks.sws(means, chol, labels, ell, outl, seed, S, mode, owner, cb)
    return native.sws_linear_cpu(x, a.means, a.chol, a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu,
                                 a.o_rho, bias, a.seed, S, sws_kernels._checks.MODE_CODES[mode], owner, cb,
                                 per_sample)


def _ref(x, layer, bias, seed, S, mode, per_sample, owner=3, cb=7):
    means, chol, labels, ell, outl = layer
    b2 = bias is not None and bias.dim() == 2  # a sampled bias [S, out]: the reference takes [out] only
    y = R.sws_linear(x.double(), means.double(), chol.double(), labels, to64(ell), to64(outl),
                     None if bias is None or b2 else bias.double(), seed=seed, samples=S, mode=mode, owner=owner,
                     codebook_owner=cb, per_sample=per_sample)
    return y + bias.double()[:, None, :] if b2 else y


def _tol(x, layer, S, K):
    # fp32 accumulation over `in` products of O(|x| |w|) magnitude
    w = R.reconstruct(*[t.double() if t.is_floating_point() else t for t in layer[:3]], to64(layer[3]),
                      to64(layer[4]), seed=1, samples=1, mode="mean")
    scale = float(x.abs().max()) * float(w.abs().max() + 1.0)
    return 3e-6 * scale * x.shape[-1]


@pytest.mark.backends("native_cpu")
@pytest.mark.parametrize("mode", ["paper", "mean"])
@pytest.mark.parametrize("M", [1, 2, 3, 17])
@pytest.mark.parametrize("K,shape,E,O,label_dtype", [
    (1, (37, 53), 0, 0, torch.uint8),
    (255, (37, 53), 5, 7, torch.int16),
    (4096, (53, 37), 0, 3, torch.int32),
    (4096, (24, 65), 9, 0, torch.int64),
])
@pytest.mark.parametrize("S,per_sample", [(1, False), (3, False), (3, True)])
def test_native_fused_forward_matches_reference(rng, mode, M, K, shape, E, O, label_dtype, S, per_sample):
    layer = make_layer(rng, shape, K, E, O, label_dtype, device="cpu")
    out_f, in_f = shape
    x = torch.randn(*((S,) if per_sample else ()), M, in_f, generator=rng)
    for bias in (None, torch.randn(out_f, generator=rng), torch.randn(S, out_f, generator=rng)):
        y = _fused(x, layer, bias, 11, S, mode, per_sample)
        assert y.dtype == torch.float32 and y.shape == (S, M, out_f)
        ref = _ref(x, layer, bias, 11, S, mode, per_sample)
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=_tol(x, layer, S, K))
        assert torch.equal(y, _fused(x, layer, bias, 11, S, mode, per_sample))  # bit-identical rerun


@pytest.mark.backends("native_cpu")
@pytest.mark.parametrize("M", [1, 9, 16, 32])
def test_native_fused_deterministic_across_threads_and_simd(rng, M):
    layer = make_layer(rng, (67, 300), 4096, 20, 20, device="cpu")
    x = torch.randn(M, 300, generator=rng)
    bias = torch.randn(67, generator=rng)
    prev = native.max_threads()
    try:
        ys = []
        for t in (1, 2, 3):
            native.set_num_threads(t)
            ys.append(_fused(x, layer, bias, 5, 2, "paper", False))
        assert all(torch.equal(ys[0], y) for y in ys[1:])
        native.set_simd(False)  # portable version: same values up to rounding (fma vs mul+add)
        ys_scalar = _fused(x, layer, bias, 5, 2, "paper", False)
        torch.testing.assert_close(ys_scalar, ys[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ys_scalar.double(), _ref(x, layer, bias, 5, 2, "paper", False), rtol=0,
                                   atol=_tol(x, layer, 2, 4096))
    finally:
        native.set_simd(True)
        native.set_num_threads(prev)


@pytest.mark.backends("native_cpu")
def test_native_fused_rejects_bad_inputs(rng):
    layer = make_layer(rng, (8, 16), 4, device="cpu")
    x = torch.randn(33, 16, generator=rng)
    with pytest.raises(ValueError, match="at most 32"):
        _fused(x, layer, None, 1, 1, "paper", False)
    with pytest.raises(ValueError, match="mode"):
        _fused(x[:2], layer, None, 1, 1, "hierarchical", False)
    means, chol, labels, _, _ = layer
    bad = labels.clone()
    bad[3, 5] = 4
    with pytest.raises(ValueError, match="label"):
        native.sws_linear_cpu(x[:2], means, chol, bad, *[torch.empty(0, dtype=torch.int64)] * 3, torch.empty(0),
                              torch.empty(0, dtype=torch.int64), torch.empty(0), torch.empty(0), None, 1, 1, 0, 0,
                              0, False)


def test_native_overrides_row_offsets(rng):
    # The CUDA fused linear's override list: row offsets by searchsorted (no host sync) equal bincount + cumsum.
    out_f, in_f = 13, 11
    perm = torch.randperm(out_f * in_f, generator=rng)
    e_pos, o_pos = perm[:9].clone(), perm[9:14].clone()
    mask, rows, pos, idx = native._overrides(out_f * in_f, in_f, out_f, e_pos, o_pos)
    want = torch.zeros(out_f + 1, dtype=torch.int64)
    want[1:] = torch.cumsum(torch.bincount(pos // in_f, minlength=out_f), 0)
    assert torch.equal(rows, want) and rows.dtype == torch.int64
    assert torch.equal(pos, torch.cat([e_pos, o_pos])[idx]) and bool((pos[1:] > pos[:-1]).all())
    bits = torch.zeros(out_f * in_f, dtype=torch.bool)
    bits[pos] = True
    words = mask.to(torch.int64) & 0xFFFFFFFF
    got = ((words[torch.arange(out_f * in_f) >> 5] >> (torch.arange(out_f * in_f) & 31)) & 1).bool()
    assert torch.equal(got, bits)


MODE_CODES = {"paper": 0, "hierarchical": 1, "mean": 2}


def _cuda_layer(K, out_f, in_f, E, O, label_dtype, seed):
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


CUDA_CASES = [  # K, out, in, E, O
    (1, 3, 5, 0, 0),
    (37, 17, 129, 9, 4),
    (300, 65, 67, 40, 25),  # in % 4 != 0: rows start mid-counter (per-element normals)
    (4096, 129, 256, 100, 50),
    (20000, 33, 64, 10, 10),  # table larger than shared memory: global reads
]


@pytest.mark.backends("native_cuda")
@pytest.mark.parametrize("mode", list(MODE_CODES))
@pytest.mark.parametrize("K,out_f,in_f,E,O", CUDA_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,per_sample,bias", [(1, False, None), (3, True, "shared"), (16, False, "sample")])
def test_native_cuda_fused_matches_reconstruct_then_matmul(mode, K, out_f, in_f, E, O, dtype, M, per_sample, bias):
    """Truth: the weights from the native CPU reconstruct (the same host Philox, float64 products); the fused
    kernel's error must be at most 2x that of PyTorch's own matmul in the same precision (flash-attention's
    rule), plus the normals' ulp-level host/device difference in hierarchical mode."""
    label_dtype = torch.int16 if K < 32768 else torch.int32
    means, chol, labels, ell, outl = _cuda_layer(K, out_f, in_f, E, O, label_dtype, seed=K + M)
    S = 3
    g = torch.Generator().manual_seed(M)
    x = torch.randn(*((S,) if per_sample else ()), M, in_f, generator=g)
    b = None if bias is None else torch.randn(*((S,) if bias == "sample" else ()), out_f, generator=g)
    args = (means, chol, labels, *ell, *outl)
    w = native.reconstruct(*args, 77, S, MODE_CODES[mode], 2, 6).double()  # truth: host Philox, float64 products
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
    y = native.sws_linear_cuda(xt, *dev_args, None if b is None else b.cuda(), 77, S, MODE_CODES[mode], 2, 6,
                               per_sample)
    assert y.dtype == dtype and y.shape == (S, M, out_f)
    err = (y.double().cpu() - want).abs().max().item()
    err_torch = (torch_y.double().cpu() - want).abs().max().item()
    # device vs host normals differ by ulps (1e-6 * sigma * |x| summed over a row) in hierarchical mode
    slack = 1e-5 * math.sqrt(in_f) * (mode == "hierarchical")
    assert err <= 2 * err_torch + 1e-5 + slack, (err, err_torch)
    again = native.sws_linear_cuda(xt, *dev_args, None if b is None else b.cuda(), 77, S, MODE_CODES[mode], 2, 6,
                                   per_sample)
    assert torch.equal(y, again)  # no atomics: bit-identical


@pytest.mark.backends("native_cuda")
def test_native_cuda_fused_errors_name_the_call():
    means, chol, labels, ell, outl = _cuda_layer(8, 4, 6, 0, 0, torch.int16, seed=0)
    args = tuple(t.cuda() for t in (means, chol, labels, *ell, *outl))
    with pytest.raises(ValueError, match="sws_linear_cuda: M"):
        native.sws_linear_cuda(torch.randn(17, 6, device="cuda"), *args, None, 1, 1, 0, 0, 0, False)
    with pytest.raises(ValueError, match="x: expected"):
        native.sws_linear_cuda(torch.randn(3, 5, device="cuda"), *args, None, 1, 1, 0, 0, 0, False)


def test_triton_special_index_is_cached_and_sync_free(rng):
    """The Triton linear's special-weight index (_Specials) is built once per (positions, layout) and reused
    while the position tensors are unchanged; building it reads nothing on the host (bincount would: it sizes its
    output from the data's max)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    pytest.importorskip("triton")
    from sws_kernels.triton import linear as tl_

    e_pos = torch.tensor([3, 40, 17], dtype=torch.int64)
    o_pos = torch.tensor([5, 77], dtype=torch.int64)

    class Syncs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.bincount.default):
                Syncs.n += 1
            return func(*args, **(kwargs or {}))

    with Syncs():
        a = tl_._specials(e_pos, o_pos, 10, 8, True, 80)
    assert Syncs.n == 0
    assert tl_._specials(e_pos, o_pos, 10, 8, True, 80) is a
    assert tl_._specials(e_pos, o_pos, 10, 10, False, 80) is not a  # another layout: its own index
    # rows (in_f = 10): 3 and 5 -> 0, 17 -> 1, 40 -> 4, 77 -> 7
    assert a.ptr.tolist() == [0, 2, 3, 3, 3, 4, 4, 4, 5]
    e_pos[0] = 4  # an in-place edit: rebuilt
    assert tl_._specials(e_pos, o_pos, 10, 8, True, 80) is not a


# ======================================================================================================
# 3. Shards (tensor parallelism, issue 18 item 5): the layer cut into output-row (colwise) or input-column
#    (rowwise) shards, each called with its global element mapping, gives the unsharded layer's output (colwise:
#    concatenated; rowwise: summed) and, summed over shards, its gradients; outlier gradients per shard are
#    the unsharded ones of its outliers. Every backend, fused and reconstruct + GEMM paths.
# ======================================================================================================

from tp_helpers import cut_sws, outlier_mask  # noqa: E402

SPLITS = [((7, 10), "colwise", (0, 4, 7)), ((7, 10), "rowwise", (0, 5, 10)), ((7, 10), "rowwise", (0, 3, 10)),
          ((8, 16), "colwise", (0, 4, 8)), ((8, 16), "rowwise", (0, 8, 16))]


def _blocks(shape, style, cuts):
    out_f, in_f = shape
    spans = list(zip(cuts[:-1], cuts[1:]))
    return [(a, b, 0, in_f) if style == "colwise" else (0, out_f, a, b) for a, b in spans]


@pytest.mark.backends("reference", "native_cpu", "native_cuda", "triton")
@pytest.mark.parametrize("mode", ["paper", "hierarchical"])
@pytest.mark.parametrize("S,fused", [(1, True), (3, False), (3, True)])
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0][0]}x{s[0][1]}-{s[1]}-{'-'.join(map(str, s[2]))}")
def test_sws_linear_shards_match_unsharded(rng, monkeypatch, backend, mode, S, fused, split):
    monkeypatch.setitem(_backend.LIMITS, "triton_fused_max_m", _backend.Limit(10**9 if fused else 0, "test"))
    monkeypatch.setitem(_backend.LIMITS, "cpu_fused_max_m", _backend.Limit(32 if fused else 0, "test"))
    shape, style, cuts = split
    means, chol, labels, e, o = make_layer(rng, shape, 6, 4, 5, torch.uint8, device=backend.device)
    bias = torch.randn(shape[0], generator=rng).to(backend.device)
    x = torch.randn(3, shape[1], generator=rng).to(backend.device)
    gy = torch.randn(S, 3, shape[0], generator=rng).to(backend.device)
    kw = dict(seed=int(torch.randint(0, 2**62, (1,), generator=rng)), samples=S, mode=mode, owner=3,
              codebook_owner=8)
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    fx, fm, fc, fb, fo = leaf(x), leaf(means), leaf(chol), leaf(bias), [leaf(o[1]), leaf(o[2])]
    with backend():
        y_full = F.sws_linear(fx, fm, fc, labels, e, (o[0], *fo), fb, **kw)
    (y_full * gy).sum().backward()
    ys, sums = [], None
    for blk in _blocks(shape, style, cuts):
        r0, r1, c0, c1 = blk
        lab, es, os_, mp = cut_sws(labels, e, o, blk)
        sx, sm, sc = leaf(x[:, c0:c1]), leaf(means), leaf(chol)
        sb = leaf(bias[r0:r1]) if style == "colwise" else None
        so = [leaf(os_[1]), leaf(os_[2])]
        with backend():
            y = F.sws_linear(sx, sm, sc, lab, es, (os_[0], *so), sb, **kw, **mp)
        (y * gy[..., r0:r1]).sum().backward()
        ys.append(y)
        om = outlier_mask(o, shape[1], blk)
        for got, want in zip(so, fo):  # a shard without outliers gets no gradient for its empty ones
            g = torch.zeros_like(got) if got.grad is None else got.grad
            torch.testing.assert_close(g, want.grad[om], rtol=1e-4, atol=1e-4)
        if style == "colwise":
            torch.testing.assert_close(sb.grad, fb.grad[r0:r1], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(sx.grad, fx.grad[:, c0:c1], rtol=1e-5, atol=1e-5)
        parts = [sm.grad, sc.grad] + ([sx.grad] if style == "colwise" else [])
        sums = parts if sums is None else [a + b for a, b in zip(sums, parts)]
    y = torch.cat(ys, -1) if style == "colwise" else sum(ys) + bias
    torch.testing.assert_close(y, y_full, rtol=1e-5, atol=1e-5)
    for got, want in zip(sums, [fm.grad, fc.grad] + ([fx.grad] if style == "colwise" else [])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.backends("reference", "native_cpu", "native_cuda", "triton")
@pytest.mark.parametrize("S,fused", [(1, True), (3, False)])
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0][0]}x{s[0][1]}-{s[1]}-{'-'.join(map(str, s[2]))}")
def test_mean_field_linear_shards_match_unsharded(rng, monkeypatch, backend, S, fused, split):
    monkeypatch.setitem(_backend.LIMITS, "triton_fused_max_m", _backend.Limit(10**9 if fused else 0, "test"))
    shape, style, cuts = split
    mu = torch.randn(*shape, generator=rng).to(backend.device) * 0.1
    rho = torch.randn(*shape, generator=rng).to(backend.device) - 3
    b_mu = torch.randn(shape[0], generator=rng).to(backend.device) * 0.1
    b_rho = torch.randn(shape[0], generator=rng).to(backend.device) - 3
    x = torch.randn(3, shape[1], generator=rng).to(backend.device)
    gy = torch.randn(S, 3, shape[0], generator=rng).to(backend.device)
    kw = dict(seed=int(torch.randint(0, 2**62, (1,), generator=rng)), samples=S, owner=21)
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    full = [leaf(t) for t in (x, mu, rho, b_mu, b_rho)]
    with backend():
        y_full = F.mean_field_linear(*full, **kw)
    (y_full * gy).sum().backward()
    ys, gx = [], 0
    for r0, r1, c0, c1 in _blocks(shape, style, cuts):
        mp = dict(elem_offset=r0 * shape[1] + c0, row_stride=shape[1])
        sx, sm, sr = leaf(x[:, c0:c1]), leaf(mu[r0:r1, c0:c1]), leaf(rho[r0:r1, c0:c1])
        sbm, sbr = (leaf(b_mu[r0:r1]), leaf(b_rho[r0:r1])) if style == "colwise" else (None, None)
        with backend():
            y = F.mean_field_linear(sx, sm, sr, sbm, sbr, **kw, **mp)
        (y * gy[..., r0:r1]).sum().backward()
        ys.append(y)
        torch.testing.assert_close(sm.grad, full[1].grad[r0:r1, c0:c1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sr.grad, full[2].grad[r0:r1, c0:c1], rtol=1e-4, atol=1e-4)
        if style == "colwise":
            torch.testing.assert_close(sbm.grad, full[3].grad[r0:r1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sbr.grad, full[4].grad[r0:r1], rtol=1e-5, atol=1e-5)
            gx = gx + sx.grad
        else:
            torch.testing.assert_close(sx.grad, full[0].grad[:, c0:c1], rtol=1e-5, atol=1e-5)
    if style == "colwise":
        torch.testing.assert_close(torch.cat(ys, -1), y_full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, full[0].grad, rtol=1e-5, atol=1e-5)
    else:  # the sampled bias (purpose 2, global rows) added once, after the sum of the partial outputs
        b = R.mean_field_bias(b_mu, b_rho, seed=kw["seed"], samples=S, owner=21)
        torch.testing.assert_close(sum(ys) + b[:, None, :], y_full, rtol=1e-5, atol=1e-5)


@pytest.mark.backends("reference", "native_cpu", "triton")
def test_opcheck_ops_with_a_shard_mapping(rng, backend):
    """The ops' trailing elem_offset / row_stride arguments: schema, fake kernels and autograd (the backward
    returns no gradient for them) pass torch.library.opcheck on every backend."""
    means, chol, labels, ell, outl = make_layer(rng, (6, 5), 5, 2, 2, torch.int16, device=backend.device)
    a = sws_kernels._checks.sws(means, chol, labels, ell, outl, 7, 2, "hierarchical", 1, 2)
    x = torch.randn(3, 5, generator=rng).to(backend.device).requires_grad_()
    bias = torch.randn(6, generator=rng).to(backend.device).requires_grad_()
    m, c = means.clone().requires_grad_(), chol.clone().requires_grad_()
    rest = (a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu, a.o_rho)
    seed = sws_kernels.philox.seed_tensor(7, backend.device)
    emap = (23, 11)  # a 6 x 5 block at row 2, column 1 of a [*, 11] weight
    gy = torch.randn(2, 3, 6, generator=rng).to(backend.device)
    mu = (torch.randn(6, 5, generator=rng).to(backend.device) * 0.1).requires_grad_()
    rho = (torch.randn(6, 5, generator=rng).to(backend.device) - 3).requires_grad_()
    ops = torch.ops.sws_kernels
    with backend():
        torch.library.opcheck(ops.reconstruct.default, (m, c, *rest, seed, 2, 1, 1, 2, *emap))
        torch.library.opcheck(ops.reconstruct_backward.default,
                              (torch.randn(2, 6, 5, generator=rng).to(backend.device), means, chol, *rest, seed, 2, 1,
                               1, 2, *emap))
        torch.library.opcheck(ops.sws_linear.default, (x, m, c, *rest, bias, seed, 2, 1, 1, 2, False, *emap))
        torch.library.opcheck(ops.sws_linear_dx.default, (gy, means, chol, *rest, seed, 2, 1, 1, 2, False, *emap))
        torch.library.opcheck(ops.mean_field_reconstruct.default, (mu, rho, seed, 2, 1, 0, *emap))
        torch.library.opcheck(ops.mean_field_linear.default, (x, mu, rho, bias, seed, 2, 1, False, *emap))
        torch.library.opcheck(ops.mean_field_linear_dx.default, (gy, mu.detach(), rho.detach(), seed, 2, 1, False,
                                                                 *emap))
        # the op with the mapping is the reference with it
        w = ops.reconstruct.default(means, chol, *rest, seed, 2, 1, 1, 2, *emap)
    want = R.reconstruct(means, chol, labels, ell, outl, seed=7, samples=2, mode="hierarchical", owner=1,
                         codebook_owner=2, elem_offset=23, row_stride=11)
    torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-5)
