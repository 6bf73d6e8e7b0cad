"""Fused small-M CPU SWS linear forward (csrc/cpu/linear.cpp, native.sws_linear_cpu) against the float64
reference (sws_kernels.reference.sws_linear): paper and mean modes, shared and per-sample x, bias, ellipses and
outliers, odd sizes; bit-identical reruns (and across thread counts); gradients through functional.sws_linear."""
import math

import pytest
import torch

pytest.importorskip("sws_kernels._C", reason="sws_kernels._C is not built (pip install -e .)")

import sws_kernels  # noqa: E402
from sws_kernels import _ops, native  # noqa: E402
from sws_kernels import functional as F  # noqa: E402
from sws_kernels import reference as R  # noqa: E402

D = torch.float64


def make_layer(rng, shape, K, E=0, O=0, label_dtype=torch.int16):
    n = math.prod(shape)
    means = torch.randn(K, 2, generator=rng) * torch.tensor([0.1, 1.0])
    means[:, 1] -= 3
    chol = torch.randn(K, 3, generator=rng) * 0.5 - torch.tensor([2.0, 0.0, 2.0])
    labels = torch.randint(0, K, shape, generator=rng).to(label_dtype)
    pos = torch.randperm(n, generator=rng)[: E + O]
    ellipse = outliers = None
    if E:
        ellipse = (pos[:E], torch.randint(0, K, (E,), generator=rng), torch.randint(0, K, (E,), generator=rng),
                   torch.rand(E, generator=rng))
    if O:
        outliers = (pos[E:], torch.randn(O, generator=rng) * 0.3, torch.randn(O, generator=rng) - 3)
    return means, chol, labels, ellipse, outliers


def to64(tup):
    return None if tup is None else tuple(t.double() if t.is_floating_point() else t for t in tup)


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


@pytest.mark.parametrize("mode", ["paper", "mean"])
@pytest.mark.parametrize("M", [1, 2, 3, 17])
@pytest.mark.parametrize("K,shape,E,O,label_dtype", [
    (1, (37, 53), 0, 0, torch.uint8),
    (255, (37, 53), 5, 7, torch.int16),
    (4096, (53, 37), 0, 3, torch.int32),
    (4096, (24, 65), 9, 0, torch.int64),
])
@pytest.mark.parametrize("S,per_sample", [(1, False), (3, False), (3, True)])
def test_forward_matches_reference(rng, mode, M, K, shape, E, O, label_dtype, S, per_sample):
    layer = make_layer(rng, shape, K, E, O, label_dtype)
    out_f, in_f = shape
    x = torch.randn(*((S,) if per_sample else ()), M, in_f, generator=rng)
    for bias in (None, torch.randn(out_f, generator=rng), torch.randn(S, out_f, generator=rng)):
        y = _fused(x, layer, bias, 11, S, mode, per_sample)
        assert y.dtype == torch.float32 and y.shape == (S, M, out_f)
        ref = _ref(x, layer, bias, 11, S, mode, per_sample)
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=_tol(x, layer, S, K))
        assert torch.equal(y, _fused(x, layer, bias, 11, S, mode, per_sample))  # bit-identical rerun


@pytest.mark.parametrize("M", [1, 9, 16, 32])
def test_deterministic_across_threads_and_simd(rng, M):
    layer = make_layer(rng, (67, 300), 4096, 20, 20)
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


def test_rejects_bad_inputs(rng):
    layer = make_layer(rng, (8, 16), 4)
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


def test_dispatch_uses_fused_kernel_for_small_m(rng, monkeypatch):
    calls = []
    real = native.sws_linear_cpu
    monkeypatch.setattr(native, "sws_linear_cpu", lambda *a: calls.append(1) or real(*a))
    means, chol, labels, ell, outl = make_layer(rng, (20, 30), 16, 2, 2)
    with sws_kernels.backend("native"):
        F.sws_linear(torch.randn(4, 30, generator=rng), means, chol, labels, ell, outl, seed=1)
        assert len(calls) == 1
        F.sws_linear(torch.randn(2, 3, 30, generator=rng), means, chol, labels, ell, outl, seed=1)  # 6 rows
        assert len(calls) == 2
        F.sws_linear(torch.randn(33, 30, generator=rng), means, chol, labels, ell, outl, seed=1)  # large M
        F.sws_linear(torch.randn(4, 30, generator=rng), means, chol, labels, ell, outl, seed=1, mode="hierarchical")
        F.sws_linear(torch.randn(4, 30, generator=rng, dtype=D).to(torch.bfloat16), means, chol, labels, ell,
                     outl, seed=1)
        assert len(calls) == 2


@pytest.mark.parametrize("mode", ["paper", "mean"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradients_match_reference(rng, mode, per_sample):
    S, M, (out_f, in_f), K = 2, 5, (23, 31), 64
    means, chol, labels, ell, outl = make_layer(rng, (out_f, in_f), K, 4, 5)
    x = torch.randn(*((S,) if per_sample else ()), M, in_f, generator=rng)
    bias = torch.randn(out_f, generator=rng)
    gy = torch.randn(S, M, out_f, generator=rng)

    def run(backend, dtype):
        cast = lambda t: t.to(dtype).detach().requires_grad_()  # noqa: E731
        xs, m, c, b = cast(x), cast(means), cast(chol), cast(bias)
        o = None if outl is None else (outl[0], cast(outl[1]), cast(outl[2]))
        e = to64(ell) if dtype == D else ell
        with sws_kernels.backend(backend):
            y = F.sws_linear(xs, m, c, labels, e, o, b, seed=9, samples=S, mode=mode, per_sample=per_sample)
        (y * gy.to(dtype)).sum().backward()
        return [y, xs.grad, m.grad, c.grad, b.grad, o[1].grad, o[2].grad]

    got = run("native", torch.float32)
    want = run("reference", D)
    for g, w in zip(got, want):
        if w is None or g is None:  # mean mode: no noise, so no path to some parameters (None or zeros)
            assert (g is None or not g.any()) and (w is None or not w.any())
            continue
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4)
