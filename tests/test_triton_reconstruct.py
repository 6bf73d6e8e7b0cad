"""Triton reconstruct and mean-field reconstruct (forward, backward, ops) against the float64 reference.

Tolerances: the kernels compute in float32 with the same Philox stream as the reference; normals may differ
by a few ulps of the transcendental functions (SPEC.md section 4: 1e-5 absolute), so forward values agree
to ~1e-5 absolute, and gradient sums of N terms to fp32 rounding that grows like sqrt(N).
"""
import math

import pytest
import torch

import sws_kernels
from sws_kernels import _ops
from sws_kernels import functional as F
from sws_kernels import reference as R

pytest.importorskip("triton")
from sws_kernels.triton import mean_field as TM  # noqa: E402
from sws_kernels.triton import reconstruct as T  # noqa: E402

MODES = ("paper", "hierarchical", "mean")
D = torch.float64
# CUDA tensors where there is a GPU (compiled kernels), else CPU tensors under the interpreter (conftest.py)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_layer(rng, shape, K, E=0, O=0, label_dtype=torch.int16, device=DEV):
    """Fresh random float32 SWS parameters with E ellipse and O outlier positions (disjoint)."""
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
    mv = lambda t: t.to(device)  # noqa: E731
    tmap = lambda tup: None if tup is None else tuple(mv(t) for t in tup)  # noqa: E731
    return mv(means), mv(chol), mv(labels), tmap(ellipse), tmap(outliers)


def to64(tup):
    if tup is None:
        return None
    return tuple(t.double() if t.is_floating_point() else t for t in tup)


def args_of(means, chol, labels, ellipse, outliers, seed, S, mode, owner=3, cb=7):
    a = sws_kernels._checks.sws(means, chol, labels, ellipse, outliers, seed, S, mode, owner, cb)
    return (a.means, a.chol, a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu, a.o_rho, a.seed, S,
            sws_kernels._checks.MODE_CODES[mode], owner, cb)


CASES = [  # (mode, label dtype, K, shape, E, O, S): combined to cover the grid of the issue in few cases
    ("paper", torch.uint8, 1, (17, 3), 2, 3, 1),
    ("hierarchical", torch.int16, 255, (129, 2), 5, 4, 3),
    ("mean", torch.int32, 256, (3, 5, 7), 0, 6, 3),
    ("paper", torch.int64, 4096, (33, 9), 7, 0, 8),
    ("hierarchical", torch.uint8, 3, (2, 130), 0, 0, 8),
    ("hierarchical", torch.int16, 4096, (24, 5), 3, 3, 2),
    ("paper", torch.int8, 100, (1, 1), 0, 0, 3),
    ("mean", torch.uint8, 17, (65, 2), 4, 1, 1),
]


@pytest.mark.parametrize("mode,label_dtype,K,shape,E,O,S", CASES)
def test_reconstruct_forward_backward(rng, mode, label_dtype, K, shape, E, O, S):
    check_reconstruct(rng, mode, label_dtype, K, shape, E, O, S)


@pytest.mark.parametrize("mode", MODES)
def test_small_tiles_multi_block_multi_piece(rng, monkeypatch, mode):
    """Tiles narrower than the data: many blocks per sample, K not a multiple of BLOCK_K, and segments cut
    into several pieces (about 11 entries per component, CHUNK 4)."""
    monkeypatch.setattr(T, "BLOCK", 64)
    monkeypatch.setattr(T, "BLOCK_K", 16)
    monkeypatch.setattr(T, "CHUNK", 4)
    monkeypatch.setattr(T, "PIECES", 4)  # P = ~57 pieces: not a multiple of 4
    check_reconstruct(rng, mode, torch.int16, 19, (29, 7), 4, 5, 3)


def check_reconstruct(rng, mode, label_dtype, K, shape, E, O, S):
    means, chol, labels, ell, outl = make_layer(rng, shape, K, E, O, label_dtype)
    seed = int(torch.randint(0, 2**62, (1,), generator=rng).to(DEV)) * 3
    args = args_of(means, chol, labels, ell, outl, seed, S, mode)
    w = T.reconstruct(*args)
    assert w.shape == (S, *shape) and w.dtype == torch.float32
    ref = R.reconstruct(means.double(), chol.double(), labels, to64(ell), to64(outl), seed=seed, samples=S,
                        mode=mode, owner=3, codebook_owner=7)
    torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(w, T.reconstruct(*args))  # same seed -> identical

    g = torch.randn(S, *shape, generator=rng).to(DEV)
    got = T.reconstruct_backward(g, *args)
    want = R.reconstruct_backward(g.double(), means.double(), chol.double(), labels, to64(ell), to64(outl),
                                  seed=seed, samples=S, mode=mode, owner=3, codebook_owner=7)
    terms = S * math.prod(shape) / K + S
    for name, a, b in zip(("means", "chol", "mu_o", "rho_o"), got, want):
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=2e-5 * math.sqrt(terms), msg=name)
    again = T.reconstruct_backward(g, *args)
    for a, b in zip(got, again):
        assert torch.equal(a, b)  # bit-identical run to run


def test_noncontiguous_inputs(rng):
    means, chol, labels, ell, outl = make_layer(rng, (9, 21), 13, 3, 2, torch.int16)
    wide = torch.randn(13, 5, generator=rng).to(DEV)
    wide[:, 1:3] = means
    means_nc = wide[:, 1:3]
    labels_nc = labels.t().contiguous().t()  # same values, transposed strides
    assert not means_nc.is_contiguous() and not labels_nc.is_contiguous()
    for mode in MODES:
        with sws_kernels.backend("triton"):
            w = F.reconstruct(means_nc, chol, labels_nc, ell, outl, seed=5, samples=3, mode=mode)
        ref = R.reconstruct(means.double(), chol.double(), labels, to64(ell), to64(outl), seed=5, samples=3,
                            mode=mode)
        torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_autograd_through_op(rng, mode):
    means, chol, labels, ell, outl = make_layer(rng, (17, 6), 5, 2, 3, torch.uint8)
    leaves = [means.clone().requires_grad_(), chol.clone().requires_grad_(), outl[1].clone().requires_grad_(),
              outl[2].clone().requires_grad_()]
    g = torch.randn(3, 17, 6, generator=rng).to(DEV)
    with sws_kernels.backend("triton"):
        w = F.reconstruct(leaves[0], leaves[1], labels, ell, (outl[0], leaves[2], leaves[3]), seed=11, samples=3,
                          mode=mode)
    got = torch.autograd.grad(w, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    wr = R.reconstruct(ref_leaves[0], ref_leaves[1], labels, to64(ell), (outl[0], ref_leaves[2], ref_leaves[3]),
                       seed=11, samples=3, mode=mode)
    want = torch.autograd.grad(wr, ref_leaves, g.double(), allow_unused=True)
    for a, b in zip(got, want):
        b = torch.zeros_like(a, dtype=D) if b is None else b
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4)


def test_opcheck_reconstruct_ops(rng):
    means, chol, labels, ell, outl = make_layer(rng, (7, 5), 4, 2, 2, torch.int16)
    with sws_kernels.backend("triton"):
        for mode in MODES:
            args = args_of(means.requires_grad_(), chol.requires_grad_(), labels, ell, outl, 2**63 + 5, 2, mode)
            args = list(args)
            args[10] = sws_kernels.philox.seed_tensor(args[10], DEV)
            torch.library.opcheck(torch.ops.sws_kernels.reconstruct.default, tuple(args))
            g = torch.randn(2, 7, 5, generator=rng).to(DEV)
            torch.library.opcheck(torch.ops.sws_kernels.reconstruct_backward.default,
                                  (g, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args]))


def test_triton_dtype_error():
    means = torch.randn(3, 2, dtype=D, device=DEV)
    chol = torch.randn(3, 3, dtype=D, device=DEV)
    with sws_kernels.backend("triton"), pytest.raises(TypeError, match="dtype"):
        F.reconstruct(means, chol, torch.zeros(4, dtype=torch.int16, device=DEV), seed=1)


# ------------------------------------------------------------------------------------------------------
# mean field
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,S,purpose", [((1,), 1, 0), ((17, 3), 3, 0), ((129,), 8, 2), ((5, 2, 3, 3), 2, 0)])
def test_mean_field_reconstruct(rng, shape, S, purpose):
    mu = torch.randn(*shape, generator=rng).to(DEV) * 0.1
    rho = torch.randn(*shape, generator=rng).to(DEV) * 2 - 4
    rho.view(-1)[0] = 25.0  # the softplus threshold branch
    w = TM.mean_field_reconstruct(mu, rho, 2**64 - 3, S, 9, purpose)
    ref = R.mean_field_reconstruct(mu.double(), rho.double(), seed=2**64 - 3, samples=S, owner=9, purpose=purpose)
    torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-5)
    g = torch.randn(S, *shape, generator=rng).to(DEV)
    g_mu, g_rho = TM.mean_field_reconstruct_backward(g, mu, rho, 2**64 - 3, S, 9, purpose)
    rmu, rrho = _ops._mf_reference_backward(g.double(), mu.double(), rho.double(), 2**64 - 3, S, 9, purpose)
    torch.testing.assert_close(g_mu.double(), rmu, rtol=1e-6, atol=1e-6 * S)
    torch.testing.assert_close(g_rho.double(), rrho, rtol=1e-5, atol=1e-5 * S)
    assert torch.equal(g_rho, TM.mean_field_reconstruct_backward(g, mu, rho, 2**64 - 3, S, 9, purpose)[1])


def test_mean_field_op_autograd_and_opcheck(rng):
    mu = (torch.randn(6, 11, generator=rng).to(DEV) * 0.1).requires_grad_()
    rho = (torch.randn(6, 11, generator=rng).to(DEV) - 3).requires_grad_()
    with sws_kernels.backend("triton"):
        w = F.mean_field_reconstruct(mu, rho, seed=4, samples=3, owner=2)
        g = torch.randn(3, 6, 11, generator=rng).to(DEV)
        got = torch.autograd.grad(w, (mu, rho), g)
        seed = sws_kernels.philox.seed_tensor(4, DEV)
        torch.library.opcheck(torch.ops.sws_kernels.mean_field_reconstruct.default, (mu, rho, seed, 3, 2, 0))
        torch.library.opcheck(torch.ops.sws_kernels.mean_field_reconstruct_backward.default,
                              (g, mu.detach(), rho.detach(), seed, 3, 2, 0))
    m64, r64 = mu.detach().double().requires_grad_(), rho.detach().double().requires_grad_()
    wr = R.mean_field_reconstruct(m64, r64, seed=4, samples=3, owner=2)
    torch.testing.assert_close(w.double(), wr.detach(), rtol=1e-6, atol=1e-5)
    want = torch.autograd.grad(wr, (m64, r64), g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
