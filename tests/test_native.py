"""The compiled module sws_kernels._C itself, beyond the ops (those live in tests/test_<op>.py).

RNG entry points: Random123 known answers, raw words and uniforms bit-exact against an int64 torch Philox written
here, normals within 1e-5 of the PyTorch reference; the bulk normals (csrc/cpu/vecmath.cpp, AVX2 with a scalar
fallback) in both versions. The C++ argument bundles, the OpenMP thread switch, the build and CUDA status.
Skipped as a whole, with the reason, where the module is not built (pytestmark below, tests/conftest.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from sws_kernels import native, philox
from sws_kernels.native import _C as C

pytestmark = pytest.mark.backends("native_cpu")

M32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------
# A self-contained Philox in int64 torch arithmetic (products split in 16-bit halves: no overflow)
# ---------------------------------------------------------------------------------------------------

def _mulhilo(m: int, x: torch.Tensor):
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_lo, p_hi = x * m_lo, x * m_hi
    return (p_hi + (p_lo >> 16)) >> 16, (((p_hi & 0xFFFF) << 16) + p_lo) & M32


def _philox(c0, c1, c2, c3, k0, k1):
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], -1)


def _stream_words(seed, offset, n, sample, owner, purpose):
    i = torch.arange(offset, offset + n, dtype=torch.int64)
    j = i >> 2
    f = lambda v: torch.full_like(j, v)  # noqa: E731
    w = _philox(j, f(sample), f(owner), f(purpose), f(seed & M32), f(seed >> 32))
    return w, (i & 3)


def _uniform_local(seed, n, sample=0, owner=0, purpose=0, offset=0):
    w, t = _stream_words(seed, offset, n, sample, owner, purpose)
    word = w.gather(-1, t[:, None])[:, 0]
    return (2 * (word >> 9) + 1).to(torch.float32) * 2.0**-24


def _normal_local(seed, n, sample=0, owner=0, purpose=0, offset=0):
    w, t = _stream_words(seed, offset, n, sample, owner, purpose)
    u = (2 * (w >> 9) + 1).to(torch.float32) * 2.0**-24
    two_pi = torch.tensor(2 * math.pi, dtype=torch.float32)
    r01, r23 = torch.sqrt(-2.0 * torch.log(u[:, 0])), torch.sqrt(-2.0 * torch.log(u[:, 2]))
    th01, th23 = two_pi * u[:, 1], two_pi * u[:, 3]
    v = torch.stack([r01 * torch.cos(th01), r01 * torch.sin(th01), r23 * torch.cos(th23), r23 * torch.sin(th23)], -1)
    return v.gather(-1, t[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------------

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_known_answers():
    ctr = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64)
    key = torch.tensor([k for _, k, _ in KAT], dtype=torch.int64)
    out = native.philox4x32(ctr, key)
    assert out.tolist() == [list(o) for _, _, o in KAT]
    assert _philox(*ctr.unbind(-1), *key.unbind(-1)).tolist() == [list(o) for _, _, o in KAT]  # the local model too


def test_philox_random_words_bit_exact():
    g = torch.Generator().manual_seed(1)
    ctr = torch.randint(0, 1 << 32, (1001, 4), generator=g, dtype=torch.int64)
    key = torch.randint(0, 1 << 32, (1001, 2), generator=g, dtype=torch.int64)
    assert torch.equal(native.philox4x32(ctr, key), _philox(*ctr.unbind(-1), *key.unbind(-1)))
    # broadcast key over a batch
    out = native.philox4x32(ctr.reshape(7, 143, 4), key[:1])
    assert torch.equal(out.reshape(-1, 4), _philox(*ctr.unbind(-1), *key[:1].expand(1001, 2).unbind(-1)))


SEEDS = [0, 1, 0x1234_5678_9ABC_DEF0, (1 << 64) - 1, 1 << 63]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 0), (17, 5), (129, 2), (1000, 0), (9, (1 << 34) - 9),
                                      (37, (1 << 32) + 3), (5, (1 << 32) * 3 + 1)])
def test_uniform_bit_exact(seed, n, offset):
    got = native.uniform(seed, n, 3, 0xDEADBEEF, 1, offset)
    want = _uniform_local(seed, n, 3, 0xDEADBEEF, 1, offset)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.equal(got, want)
    assert bool((got > 0).all() and (got < 1).all())


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 1), (130, 0), (11, (1 << 34) - 11), (8, (1 << 32) + 2)])
def test_normal_matches_reference(seed, n, offset):
    got = native.normal(seed, n, 7, 5, 0, offset)
    torch.testing.assert_close(got, _normal_local(seed, n, 7, 5, 0, offset), rtol=0, atol=1e-5)
    want = philox.normal(seed, n, sample=7, owner=5, purpose=0, offset=offset)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(native.uniform(seed, n, 7, 5, 0, offset),
                       philox.uniform(seed, n, sample=7, owner=5, purpose=0, offset=offset))


def test_streams_differ_by_every_counter_word():
    base = native.uniform(99, 64)
    for kw in ({"sample": 1}, {"owner": 1}, {"purpose": 1}):
        assert not torch.equal(base, native.uniform(99, 64, **kw))
    assert not torch.equal(base, native.uniform(99 + (1 << 32), 64))  # the seed's high word is used


def test_normal_moments():
    x = native.normal(2024, 400_000).double()
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


def test_stream_errors():
    out = torch.empty(16)
    with pytest.raises(ValueError, match="uniform.*2\\^34"):
        C.uniform(out.data_ptr(), 16, 0, 0, 0, 0, (1 << 34) - 15)
    with pytest.raises(ValueError, match="normal.*n must be"):
        C.normal(out.data_ptr(), -1, 0)
    with pytest.raises(ValueError, match="sample"):
        C.uniform(out.data_ptr(), 4, 0, 1 << 32)
    with pytest.raises(ValueError, match="owner"):
        C.normal(out.data_ptr(), 4, 0, 0, -1)
    C.uniform(out.data_ptr(), 15, 0, 0, 0, 0, (1 << 34) - 15)  # the last valid window


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
    if C.simd_level() != "avx2":
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


# ---------------------------------------------------------------------------------------------------
# argument bundles, build and CUDA status
# ---------------------------------------------------------------------------------------------------

def test_argument_bundles_round_trip():
    # One struct per op family crosses into C++: every field reads back as written, pointers as addresses.
    a = C.ReconstructArgs(means=16, chol=32, K=5, labels=48, labels_dtype=2, n=7, e_pos=64, e_a=80, e_b=96,
                          e_alpha=112, E=1, o_pos=128, o_mu=144, o_rho=160, O=1, seed=(1 << 64) - 1, seed_dev=176,
                          S=3, mode=1, owner=9, codebook_owner=11)
    want = dict(means=16, chol=32, K=5, labels=48, labels_dtype=2, n=7, e_pos=64, e_a=80, e_b=96, e_alpha=112, E=1,
                o_pos=128, o_mu=144, o_rho=160, O=1, seed=(1 << 64) - 1, seed_dev=176, S=3, mode=1, owner=9,
                codebook_owner=11)
    assert {k: getattr(a, k) for k in want} == want
    a.seed_dev, a.S, a.labels = 0, 4, 0
    assert (a.seed_dev, a.S, a.labels) == (0, 4, 0)
    assert "seed_dev=0x0" in repr(a) and "S=4" in repr(a)
    d = C.ReconstructArgs()
    assert (d.means, d.K, d.S, d.seed, d.seed_dev) == (0, 0, 1, 0, 0)
    m = C.MeanFieldArgs(1, 2, 3, 4, 5, 6, 7, 8)
    assert (m.mu, m.rho, m.n, m.seed, m.seed_dev, m.S, m.owner, m.purpose) == (1, 2, 3, 4, 5, 6, 7, 8)
    lin = C.LinearArgs(out_f=2, in_f=3, x=8, M=1, y=16, ov_idx=24)
    assert (lin.out_f, lin.in_f, lin.x, lin.x_dtype, lin.M, lin.y, lin.bias, lin.ov_idx) == (2, 3, 8, 0, 1, 16, 0, 24)
    with pytest.raises(TypeError):
        C.ReconstructArgs(seed=-1)  # the bundle holds the uint64 seed; native._seed maps int64 seeds onto it


def test_cuda_status_and_module_info():
    usable, reason = native.cuda_status()
    assert isinstance(usable, bool) and isinstance(reason, str) and reason
    assert (native.AVAILABLE_CUDA, native.CUDA_REASON) == (usable, reason)
    assert isinstance(C.with_cuda, bool)
    if C.with_cuda:
        assert C.cuda_runtime_version >= 11000 and C.cuda_archs, (C.cuda_runtime_version, C.cuda_archs)
        probe = C.cuda_probe()
        assert set(probe) == {"driver_version", "count_error", "count_error_name", "count_error_string",
                              "device_count", "devices"}
        if probe["count_error"]:
            assert probe["device_count"] == 0 and probe["count_error_name"].startswith("cuda"), probe
        assert len(probe["devices"]) == probe["device_count"], probe
    else:
        assert not usable and reason.startswith("not built"), reason
        assert not hasattr(C, "cuda_probe")
    assert C.omp_max_threads() >= 1
    with pytest.raises(ValueError, match="set_num_threads"):
        C.set_num_threads(0)
