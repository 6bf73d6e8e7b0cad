"""Native CPU mean-field reconstruct (csrc/cpu/mean_field.cpp) and the bulk normals/softplus it shares with
hierarchical reconstruct (csrc/cpu/vecmath.cpp, AVX2 with a scalar fallback).

Forward against the float64 reference (the normals may differ from PyTorch's by transcendental ulps: the
contract's 1e-5 on normals, times sigma); backward against the float64 reference's explicit gradients;
bit-identical reruns and thread counts; the AVX2 and scalar versions both checked where the CPU has AVX2.
"""
from __future__ import annotations

import pytest
import torch

C = pytest.importorskip("sws_kernels._C", reason="sws_kernels._C is not built (pip install -e .)")
import sws_kernels  # noqa: E402
from sws_kernels import _ops, native, philox  # noqa: E402
from sws_kernels import functional as F  # noqa: E402
from sws_kernels import reference as R  # noqa: E402

SIMD = ["avx2", "scalar"] if C.simd_level() == "avx2" else ["scalar"]


@pytest.fixture(params=SIMD)
def simd(request):
    """Run a test with the vector code on, then off (the dispatch is process-wide: always restored)."""
    native.set_simd(request.param == "avx2")
    try:
        assert native.simd_level() == request.param
        yield request.param
    finally:
        native.set_simd(True)


def _params(shape, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(*shape, generator=g) * 0.1
    rho = torch.randn(*shape, generator=g) * 2 - 4
    flat = rho.view(-1)
    flat[0] = 25.0  # softplus's threshold branch (x itself; softplus' exactly 1)
    if flat.numel() > 2:
        flat[1] = -30.0  # a tiny sigma
        flat[2] = 20.0  # the threshold itself: log1p(exp(20)), sigmoid(20)
    return mu, rho


SHAPES = [(1,), (3, 5), (129,), (7, 13, 3), (4099,), (2, 2051)]  # odd; 4099 and 2*2051 cross the 2048 blocks


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("S", [1, 7])
@pytest.mark.parametrize("purpose", [0, 2])
def test_forward_backward_match_reference(simd, shape, S, purpose):
    mu, rho = _params(shape, hash((shape, S, purpose)) % 1000)
    seed, owner = 2**64 - 3, 9
    w = native.mean_field_reconstruct(mu, rho, seed, S, owner, purpose)
    assert w.shape == (S, *shape) and w.dtype == torch.float32
    ref = R.mean_field_reconstruct(mu.double(), rho.double(), seed=seed, samples=S, owner=owner, purpose=purpose)
    torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-5)

    g = torch.randn(S, *shape, generator=torch.Generator().manual_seed(S))
    g_mu, g_rho = native.mean_field_reconstruct_backward(g, mu, rho, seed, S, owner, purpose)
    r_mu, r_rho = _ops._mf_reference_backward(g.double(), mu.double(), rho.double(), seed, S, owner, purpose)
    # d mu is a plain sum (double accumulators): float32 rounding only
    torch.testing.assert_close(g_mu.double(), r_mu, rtol=1e-6, atol=1e-6)
    # d rho carries the normals' ulps (<= 1e-6 each here, 1e-5 by contract) times |g|, summed over S
    torch.testing.assert_close(g_rho.double(), r_rho, rtol=1e-5, atol=1e-5 * S)
    # reruns are bit-identical
    assert torch.equal(w, native.mean_field_reconstruct(mu, rho, seed, S, owner, purpose))
    again = native.mean_field_reconstruct_backward(g, mu, rho, seed, S, owner, purpose)
    assert torch.equal(g_mu, again[0]) and torch.equal(g_rho, again[1])


def test_bit_identical_across_thread_counts():
    mu, rho = _params((3, 10_007), 5)
    g = torch.randn(4, 3, 10_007)
    before = native.max_threads()
    try:
        native.set_num_threads(1)
        w1 = native.mean_field_reconstruct(mu, rho, 77, 4, 3, 0)
        b1 = native.mean_field_reconstruct_backward(g, mu, rho, 77, 4, 3, 0)
        native.set_num_threads(max(2, before))
        w2 = native.mean_field_reconstruct(mu, rho, 77, 4, 3, 0)
        b2 = native.mean_field_reconstruct_backward(g, mu, rho, 77, 4, 3, 0)
    finally:
        native.set_num_threads(before)
    assert torch.equal(w1, w2) and torch.equal(b1[0], b2[0]) and torch.equal(b1[1], b2[1])


def test_streams_are_separate():
    mu, rho = _params((257,), 1)
    base = native.mean_field_reconstruct(mu, rho, 5, 2, 3, 0)
    for args in ((6, 2, 3, 0), (5, 2, 4, 0), (5, 2, 3, 2)):
        assert not torch.equal(base, native.mean_field_reconstruct(mu, rho, *args))
    # sample s of an S-sample call is sample s of a longer call (the sample is a counter word)
    assert torch.equal(base, native.mean_field_reconstruct(mu, rho, 5, 5, 3, 0)[:2])


def test_op_autograd_opcheck_and_functional():
    g = torch.Generator().manual_seed(3)
    mu = (torch.randn(6, 11, generator=g) * 0.1).requires_grad_()
    rho = (torch.randn(6, 11, generator=g) - 3).requires_grad_()
    gw = torch.randn(3, 6, 11, generator=g)
    with sws_kernels.backend("native"):
        w = F.mean_field_reconstruct(mu, rho, seed=4, samples=3, owner=2)
        got = torch.autograd.grad(w, (mu, rho), gw)
        seed = sws_kernels.philox.seed_tensor(4)
        torch.library.opcheck(torch.ops.sws_kernels.mean_field_reconstruct.default, (mu, rho, seed, 3, 2, 0))
        torch.library.opcheck(torch.ops.sws_kernels.mean_field_reconstruct_backward.default,
                              (gw, mu.detach(), rho.detach(), seed, 3, 2, 0))
    m64, r64 = mu.detach().double().requires_grad_(), rho.detach().double().requires_grad_()
    wr = R.mean_field_reconstruct(m64, r64, seed=4, samples=3, owner=2)
    torch.testing.assert_close(w.double(), wr.detach(), rtol=1e-6, atol=1e-5)
    for a, b in zip(got, torch.autograd.grad(wr, (m64, r64), gw.double())):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_mean_field_linear_native_cpu_matches_reference():
    """mean_field_linear on the CPU: native reconstruct + PyTorch GEMM, gradients through the native backward."""
    g = torch.Generator().manual_seed(8)
    mu = (torch.randn(17, 13, generator=g) * 0.1).requires_grad_()
    rho = (torch.randn(17, 13, generator=g) - 3).requires_grad_()
    bm, br = torch.randn(17, generator=g) * 0.1, torch.randn(17, generator=g) - 3
    x = torch.randn(3, 13, generator=g, requires_grad=True)
    outs = {}
    for be in ("native", "reference"):
        with sws_kernels.backend(be):
            y = F.mean_field_linear(x, mu, rho, bm, br, seed=11, samples=2, owner=4)
            outs[be] = (y, *torch.autograd.grad((y * y).sum(), (x, mu, rho)))
    for a, b in zip(outs["native"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_errors_name_the_call():
    mu, rho = _params((10,), 0)
    out = torch.empty(10)
    def args(n=10, S=1, owner=0, purpose=0):
        return C.MeanFieldArgs(mu=mu.data_ptr(), rho=rho.data_ptr(), n=n, seed=0, S=S, owner=owner, purpose=purpose)

    with pytest.raises(ValueError, match="mean_field_reconstruct_cpu: S"):
        C.mean_field_reconstruct_cpu(args(S=0), out.data_ptr())
    with pytest.raises(ValueError, match="mean_field_reconstruct_cpu: owner"):
        C.mean_field_reconstruct_cpu(args(owner=1 << 32), out.data_ptr())
    with pytest.raises(ValueError, match="mean_field_reconstruct_cpu: purpose"):
        C.mean_field_reconstruct_cpu(args(purpose=-1), out.data_ptr())
    with pytest.raises(ValueError, match="mean_field_reconstruct_cpu: n = .* 2\\^34"):
        C.mean_field_reconstruct_cpu(args(n=(1 << 34) + 1), out.data_ptr())
    with pytest.raises(ValueError, match="mean_field_reconstruct_backward_cpu: grad_mu_ptr is a null pointer"):
        C.mean_field_reconstruct_backward_cpu(args(), out.data_ptr(), 0, out.data_ptr())
    with pytest.raises(ValueError, match="mean_field_reconstruct_cpu: rho is a null pointer"):
        C.mean_field_reconstruct_cpu(C.MeanFieldArgs(mu=mu.data_ptr(), n=10), out.data_ptr())
    with pytest.raises(ValueError, match="rho: expected shape"):
        native.mean_field_reconstruct(mu, rho[:9], 0, 1, 0, 0)
    with pytest.raises(ValueError, match="grad_w: expected shape"):
        native.mean_field_reconstruct_backward(torch.zeros(2, 10), mu, rho, 0, 1, 0, 0)
    with pytest.raises(TypeError, match="mu: expected dtype"):
        native.mean_field_reconstruct(mu.double(), rho, 0, 1, 0, 0)


# ---------------------------------------------------------------------------------------------------
# The bulk normals (vecmath.cpp) on their own
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 0x0123_4567_89AB_CDEF, 2**64 - 1])
@pytest.mark.parametrize("n,offset", [(1, 0), (5, 3), (4133, 1), (300, (1 << 34) - 300), (77, (1 << 32) + 6)])
def test_bulk_normals_match_reference(simd, seed, n, offset):
    got = native.normal(seed, n, 4, 0xABCDEF01, 2, offset)
    want = philox.normal(seed, n, sample=4, owner=0xABCDEF01, purpose=2, offset=offset)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the uniforms (and so the words) are untouched by the vector code: bit-exact
    assert torch.equal(native.uniform(seed, n, 4, 0xABCDEF01, 2, offset),
                       philox.uniform(seed, n, sample=4, owner=0xABCDEF01, purpose=2, offset=offset))


def test_vector_normals_accuracy_and_position_independence():
    if "avx2" not in SIMD:
        pytest.skip("this CPU has no AVX2+FMA: only the scalar version exists")
    n = 1 << 20
    vec = native.normal(99, n, 1, 2, 0)
    native.set_simd(False)
    try:
        sca = native.normal(99, n, 1, 2, 0)
    finally:
        native.set_simd(True)
    err = (vec - sca).abs().max().item()
    assert err < 2e-6, err  # polynomial log/sincos: well inside the contract's 1e-5
    # a window that starts and ends mid-group gets the same floats as the full call (tails are full groups)
    for off, m in ((3, 29), (1001, 4095), (n - 37, 37)):
        assert torch.equal(native.normal(99, m, 1, 2, 0, off), vec[off:off + m])


def test_hierarchical_reconstruct_both_simd_versions(simd):
    """Hierarchical reconstruct uses the bulk normals in forward and backward."""
    g = torch.Generator().manual_seed(12)
    K, shape, S = 37, (9, 461), 3
    means = torch.stack([torch.randn(K, generator=g) * 0.1, torch.randn(K, generator=g) - 3], -1)
    chol = torch.randn(K, 3, generator=g)
    labels = torch.randint(0, K, shape, generator=g).to(torch.int16)
    e = torch.empty(0, dtype=torch.int64)
    f = torch.empty(0)
    w = native.reconstruct(means, chol, labels, e, e, e, f, e, f, f, 21, S, 1, 3, 9)
    ref = R.reconstruct(means.double(), chol.double(), labels, seed=21, samples=S, mode="hierarchical", owner=3,
                        codebook_owner=9)
    torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-5)
    gw = torch.randn(S, *shape, generator=g)
    got = native.reconstruct_backward(gw, means, chol, labels, e, e, e, f, e, f, f, 21, S, 1, 3, 9)
    want = R.reconstruct_backward(gw.double(), means.double(), chol.double(), labels, seed=21, samples=S,
                                  mode="hierarchical", owner=3, codebook_owner=9)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("n", [(1 << 22) + 8, 1003])  # large: S = 1 streaming stores; small and odd: tails
def test_one_sample_gather(simd, label_dtype, n):
    """S = 1 paper/mean forward (the AVX2 vgatherdps path): mean mode is a pure gather, so bit-exact."""
    g = torch.Generator().manual_seed(n % 97)
    K = min(300, int(torch.iinfo(label_dtype).max) + 1)
    means = torch.randn(K, 2, generator=g)
    chol = torch.randn(K, 3, generator=g)
    labels = torch.randint(0, K, (n,), generator=g).to(label_dtype)
    e, f = torch.empty(0, dtype=torch.int64), torch.empty(0)
    w = native.reconstruct(means, chol, labels, e, e, e, f, e, f, f, 3, 1, 2, 0, 0)
    assert torch.equal(w[0], means[:, 0][labels.long()])
    wp = native.reconstruct(means, chol, labels, e, e, e, f, e, f, f, 3, 1, 0, 0, 0)
    z = R.sample_components(means, chol, seed=3, samples=1)[0, :, 0]
    torch.testing.assert_close(wp[0], z[labels.long()], rtol=1e-6, atol=1e-5)
