"""mean_field_reconstruct and its backward on every backend, against the float64 reference.

1. The public API (functional.mean_field_reconstruct, the torch.ops.sws_kernels ops: autograd, opcheck),
   parametrised over backends with @pytest.mark.backends (tests/conftest.py).
2. The Triton launchers (sws_kernels.triton.mean_field).
3. The native kernels: CPU (csrc/cpu/mean_field.cpp, with the AVX2 and the scalar bulk normals of
   csrc/cpu/vecmath.cpp), bit-identical reruns and thread counts, errors of the C entry points; CUDA
   (csrc/cuda/mean_field.cu) against the CPU and the reference where a GPU exists.

Tolerances: forward against the float64 reference within the contract's 1e-5 on normals (times sigma);
d mu is a plain sum (float32 rounding); d rho carries the normals' ulps times |g|, summed over S.
"""
import pytest
import torch

import sws_kernels
from sws_kernels import _ops, native
from sws_kernels import functional as F
from sws_kernels import reference as R
from sws_kernels.native import _C as C


# ======================================================================================================
# 1. public API, every backend
# ======================================================================================================

@pytest.mark.backends("reference", "native_cpu", "triton")
def test_op_autograd_and_opcheck(rng, backend):
    mu = (torch.randn(6, 11, generator=rng).to(backend.device) * 0.1).requires_grad_()
    rho = (torch.randn(6, 11, generator=rng).to(backend.device) - 3).requires_grad_()
    gw = torch.randn(3, 6, 11, generator=rng).to(backend.device)
    with backend():
        w = F.mean_field_reconstruct(mu, rho, seed=4, samples=3, owner=2)
        got = torch.autograd.grad(w, (mu, rho), gw)
        seed = sws_kernels.philox.seed_tensor(4, backend.device)
        torch.library.opcheck(torch.ops.sws_kernels.mean_field_reconstruct.default, (mu, rho, seed, 3, 2, 0))
        torch.library.opcheck(torch.ops.sws_kernels.mean_field_reconstruct_backward.default,
                              (gw, mu.detach(), rho.detach(), seed, 3, 2, 0))
    m64, r64 = mu.detach().double().requires_grad_(), rho.detach().double().requires_grad_()
    wr = R.mean_field_reconstruct(m64, r64, seed=4, samples=3, owner=2)
    torch.testing.assert_close(w.double(), wr.detach(), rtol=1e-6, atol=1e-5)
    for a, b in zip(got, torch.autograd.grad(wr, (m64, r64), gw.double())):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


# ======================================================================================================
# 2. Triton launchers
# ======================================================================================================

@pytest.mark.backends("triton")
@pytest.mark.parametrize("shape,S,purpose", [((1,), 1, 0), ((17, 3), 3, 0), ((129,), 8, 2), ((5, 2, 3, 3), 2, 0)])
def test_triton_forward_backward(rng, backend, shape, S, purpose):
    from sws_kernels.triton import mean_field as TM

    mu = torch.randn(*shape, generator=rng).to(backend.device) * 0.1
    rho = torch.randn(*shape, generator=rng).to(backend.device) * 2 - 4
    rho.view(-1)[0] = 25.0  # the softplus threshold branch
    w = TM.mean_field_reconstruct(mu, rho, 2**64 - 3, S, 9, purpose)
    ref = R.mean_field_reconstruct(mu.double(), rho.double(), seed=2**64 - 3, samples=S, owner=9, purpose=purpose)
    torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-5)
    g = torch.randn(S, *shape, generator=rng).to(backend.device)
    g_mu, g_rho = TM.mean_field_reconstruct_backward(g, mu, rho, 2**64 - 3, S, 9, purpose)
    rmu, rrho = _ops._mf_reference_backward(g.double(), mu.double(), rho.double(), 2**64 - 3, S, 9, purpose)
    torch.testing.assert_close(g_mu.double(), rmu, rtol=1e-6, atol=1e-6 * S)
    torch.testing.assert_close(g_rho.double(), rrho, rtol=1e-5, atol=1e-5 * S)
    assert torch.equal(g_rho, TM.mean_field_reconstruct_backward(g, mu, rho, 2**64 - 3, S, 9, purpose)[1])


# ======================================================================================================
# 3. native kernels
# ======================================================================================================

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
def test_native_forward_backward_match_reference(simd, shape, S, purpose):
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


@pytest.mark.backends("native_cpu")
def test_native_bit_identical_across_thread_counts():
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


@pytest.mark.backends("native_cpu")
def test_native_streams_are_separate():
    mu, rho = _params((257,), 1)
    base = native.mean_field_reconstruct(mu, rho, 5, 2, 3, 0)
    for args in ((6, 2, 3, 0), (5, 2, 4, 0), (5, 2, 3, 2)):
        assert not torch.equal(base, native.mean_field_reconstruct(mu, rho, *args))
    # sample s of an S-sample call is sample s of a longer call (the sample is a counter word)
    assert torch.equal(base, native.mean_field_reconstruct(mu, rho, 5, 5, 3, 0)[:2])


@pytest.mark.backends("native_cpu")
def test_native_errors_name_the_call():
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


def _cuda_params(shape, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(*shape, generator=g) * 0.1
    rho = torch.randn(*shape, generator=g) * 2 - 4
    rho.view(-1)[0] = 25.0  # softplus threshold branch
    return mu, rho


@pytest.mark.backends("native_cuda")
@pytest.mark.parametrize("shape", [(1,), (3, 5), (129,), (4099,), (257, 33)])
@pytest.mark.parametrize("S", [1, 7])
@pytest.mark.parametrize("purpose", [0, 2])
def test_native_cuda_matches_cpu_and_reference(backend, shape, S, purpose):
    mu, rho = _cuda_params(shape, S + purpose)
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


# ======================================================================================================
# Shards (tensor parallelism, issue 18 item 5): a block of mu/rho with elem_offset/row_stride draws the noise
# of its place in the unsharded weight, on every backend
# ======================================================================================================

from tp_helpers import SHARDS, shard_ids  # noqa: E402


@pytest.mark.backends("reference", "native_cpu", "native_cuda", "triton")
@pytest.mark.parametrize("case", SHARDS, ids=shard_ids)
def test_shard_reproduces_its_block(rng, backend, case):
    shape, (r0, r1, c0, c1) = case
    mu = torch.randn(*shape, generator=rng).to(backend.device) * 0.1
    rho = torch.randn(*shape, generator=rng).to(backend.device) - 3
    mp = dict(elem_offset=r0 * shape[1] + c0, row_stride=shape[1])
    kw = dict(seed=int(torch.randint(0, 2**62, (1,), generator=rng)), samples=3, owner=19)
    ms, rs = mu[r0:r1, c0:c1].clone().requires_grad_(), rho[r0:r1, c0:c1].clone().requires_grad_()
    with backend():
        full = F.mean_field_reconstruct(mu, rho, **kw)
        w = F.mean_field_reconstruct(ms, rs, **kw, **mp)
    torch.testing.assert_close(w, full[:, r0:r1, c0:c1], rtol=1e-6, atol=1e-5)
    m64, r64 = ms.detach().double().requires_grad_(), rs.detach().double().requires_grad_()
    wr = R.mean_field_reconstruct(m64, r64, **kw, **mp)
    torch.testing.assert_close(w.double(), wr.detach(), rtol=1e-6, atol=1e-5)
    gw = torch.randn(w.shape, generator=rng).to(backend.device)
    got = torch.autograd.grad(w, (ms, rs), gw)
    for a, b in zip(got, torch.autograd.grad(wr, (m64, r64), gw.double())):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    # a 1-D shard (a bias: rows of length 1) is indexed by its global entries
    b_mu, b_rho = mu[:, 0].contiguous(), rho[:, 0].contiguous()
    with backend():
        bfull = F.mean_field_reconstruct(b_mu, b_rho, **kw)
        bs = F.mean_field_reconstruct(b_mu[r0:r1], b_rho[r0:r1], **kw, elem_offset=r0)
    torch.testing.assert_close(bs, bfull[:, r0:r1], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape,block", [((7, 10), (2, 6, 3, 9)), ((20, 300), (3, 17, 5, 297)),
                                         ((4, 4096), (0, 4, 2048, 4096)), ((30,), (7, 29, 0, 1))])
@pytest.mark.parametrize("purpose", [0, 2])
def test_native_shard_kernels_match_reference(simd, shape, block, purpose):
    """The native mean-field kernels themselves (no reference fallback) on shards, AVX2 and scalar normals,
    row segments crossing the 2048-element blocks."""
    from sws_kernels import _ops
    g = torch.Generator().manual_seed(5)
    mu = torch.randn(*shape, generator=g) * 0.1
    rho = torch.randn(*shape, generator=g) - 3
    r0, r1, c0, c1 = block
    if len(shape) == 1:
        ms, rs, mp = mu[r0:r1], rho[r0:r1], dict(elem_offset=r0, row_stride=1)
    else:
        ms, rs = mu[r0:r1, c0:c1].contiguous(), rho[r0:r1, c0:c1].contiguous()
        mp = dict(elem_offset=r0 * shape[1] + c0, row_stride=shape[1])
    seed = sws_kernels.philox.seed_tensor(2**63 + 12345)
    w = _ops._native_mean_field_reconstruct(ms, rs, seed, 3, 17, purpose, **mp)
    want = R.mean_field_reconstruct(ms.double(), rs.double(), seed=2**63 + 12345, samples=3, owner=17,
                                    purpose=purpose, **mp)
    torch.testing.assert_close(w.double(), want, rtol=1e-6, atol=1e-5)
    full = R.mean_field_reconstruct(mu, rho, seed=2**63 + 12345, samples=3, owner=17, purpose=purpose)
    blockw = full[:, r0:r1] if len(shape) == 1 else full[:, r0:r1, c0:c1]
    torch.testing.assert_close(w, blockw, rtol=1e-6, atol=1e-5)
    gw = torch.randn(w.shape, generator=g)
    got = _ops._native_mean_field_reconstruct_backward(gw, ms, rs, seed, 3, 17, purpose, **mp)
    want_g = _ops._mf_reference_backward(gw.double(), ms.double(), rs.double(), 2**63 + 12345, 3, 17, purpose,
                                         mp["elem_offset"], mp["row_stride"])
    for a, b in zip(got, want_g):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
