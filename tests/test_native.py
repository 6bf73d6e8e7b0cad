"""The compiled module sws_kernels._C (CPU kernels; the CUDA ones only where a GPU is present).

RNG: Random123 known answers, raw words and uniforms bit-exact against an int64 torch Philox written
here, normals within 1e-5 of the PyTorch reference. reconstruct: every mode x label dtype x
with/without ellipses/outliers against sws_kernels.reference (forward in float32, backward against the
float64 reference), bit-identical backward across runs and OpenMP thread counts, clear errors.
"""
from __future__ import annotations

import math

import pytest
import torch

C = pytest.importorskip("sws_kernels._C", reason="sws_kernels._C is not built (pip install -e .)")
from sws_kernels import native  # noqa: E402

M32 = 0xFFFFFFFF
MODES = {"paper": 0, "hierarchical": 1, "mean": 2}
LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


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
    philox = pytest.importorskip("sws_kernels.philox")
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
# reconstruct
# ---------------------------------------------------------------------------------------------------

def _problem(K, shape, E, O, label_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    means = torch.stack([torch.randn(K, generator=g) * 0.1, torch.randn(K, generator=g) - 3], -1)
    chol = torch.randn(K, 3, generator=g)
    hi = min(K, int(torch.iinfo(label_dtype).max) + 1)
    labels = torch.randint(0, hi, shape, generator=g).to(label_dtype)
    perm = torch.randperm(n, generator=g)
    e_pos = perm[:E].clone()
    e_a = torch.randint(0, hi, (E,), generator=g)
    e_b = torch.randint(0, hi, (E,), generator=g)
    e_alpha = torch.rand(E, generator=g)
    o_pos = perm[E:E + O].clone()
    o_mu = torch.randn(O, generator=g) * 0.3
    o_rho = torch.randn(O, generator=g) - 2
    return means, chol, labels, (e_pos, e_a, e_b, e_alpha), (o_pos, o_mu, o_rho)


def _native_fwd(p, seed, S, mode, owner=3, cb=9):
    means, chol, labels, ell, out = p
    return native.reconstruct(means, chol, labels, *ell, *out, seed, S, MODES[mode], owner, cb)


def _native_bwd(g, p, seed, S, mode, owner=3, cb=9):
    means, chol, labels, ell, out = p
    return native.reconstruct_backward(g, means, chol, labels, *ell, *out, seed, S, MODES[mode], owner, cb)


CASES = [  # K, shape, E, O
    (1, (3, 5), 0, 0),
    (1, (17,), 2, 3),
    (5, (2, 3, 3, 3), 0, 0),
    (37, (129,), 9, 0),
    (37, (7, 13), 0, 6),
    (300, (33, 41), 40, 25),
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("K,shape,E,O", CASES)
@pytest.mark.parametrize("S", [1, 7])
def test_reconstruct_matches_reference(mode, label_dtype, K, shape, E, O, S):
    reference = pytest.importorskip("sws_kernels.reference")
    p = _problem(K, shape, E, O, label_dtype, seed=K + E + O)
    means, chol, labels, ell, out = p
    seed = 0xFEDC_BA98_7654_3210
    kw = dict(seed=seed, samples=S, mode=mode, owner=3, codebook_owner=9)
    ell_r = ell if E else None
    out_r = out if O else None

    w = _native_fwd(p, seed, S, mode)
    assert w.dtype == torch.float32 and w.shape == (S, *shape)
    w_ref = reference.reconstruct(means, chol, labels, ell_r, out_r, **kw)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-5)
    if mode == "mean":
        assert torch.equal(w, w_ref)  # no transcendental on this path

    g = torch.randn(S, *shape, generator=torch.Generator().manual_seed(5))
    got = _native_bwd(g, p, seed, S, mode)
    d = torch.float64
    ell_d = (ell[0], ell[1], ell[2], ell[3].to(d)) if E else None
    out_d = (out[0], out[1].to(d), out[2].to(d)) if O else None
    want = reference.reconstruct_backward(g.to(d), means.to(d), chol.to(d), labels, ell_d, out_d, **kw)
    for name, a, b in zip(("means", "chol", "mu_o", "rho_o"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a.to(d), b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_backward_through_autograd_vs_reference_autograd():
    """The native backward is the VJP of the native forward (checked against torch autograd on the reference)."""
    reference = pytest.importorskip("sws_kernels.reference")
    p = _problem(11, (9, 7), 5, 4, torch.int16, seed=3)
    means, chol, labels, ell, out = p
    S, seed = 3, 77
    for mode in MODES:
        m = means.clone().double().requires_grad_()
        c = chol.clone().double().requires_grad_()
        mu = out[1].double().requires_grad_()
        rho = out[2].double().requires_grad_()
        w = reference.reconstruct(m, c, labels, (ell[0], ell[1], ell[2], ell[3].double()), (out[0], mu, rho),
                                  seed=seed, samples=S, mode=mode, owner=3, codebook_owner=9)
        g = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        want = torch.autograd.grad(w, (m, c, mu, rho), g, allow_unused=True)
        got = _native_bwd(g.float(), p, seed, S, mode)
        for a, b in zip(got, want):
            b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=2e-5)


def test_overrides_ignore_labels_at_their_positions():
    p = _problem(6, (50,), 4, 3, torch.int32, seed=8)
    means, chol, labels, ell, out = p
    other = labels.clone()
    other[ell[0]] = (other[ell[0]] + 1) % 6
    other[out[0]] = (other[out[0]] + 2) % 6
    for mode in MODES:
        a = _native_fwd(p, 5, 2, mode)
        b = _native_fwd((means, chol, other, ell, out), 5, 2, mode)
        assert torch.equal(a, b)
        ga = _native_bwd(torch.ones(2, 50), p, 5, 2, mode)
        gb = _native_bwd(torch.ones(2, 50), (means, chol, other, ell, out), 5, 2, mode)
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_hierarchical_blocks_and_odd_sizes():
    """n spanning several forward blocks/backward chunks, not a multiple of 4, vs the reference."""
    reference = pytest.importorskip("sws_kernels.reference")
    p = _problem(50, (3 * 4096 + 3,), 30, 20, torch.int16, seed=4)
    means, chol, labels, ell, out = p
    w = _native_fwd(p, 1234, 2, "hierarchical")
    w_ref = reference.reconstruct(means, chol, labels, ell, out, seed=1234, samples=2, mode="hierarchical",
                                  owner=3, codebook_owner=9)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-5)


def test_large_output_streaming_path():
    """Outputs >= 16 MB take the streaming-store path; n % 4 != 0 takes the plain one."""
    for n in (1 << 20, (1 << 20) + 1):
        p = _problem(4096, (n,), 100, 100, torch.int16, seed=2)
        means, chol, labels, ell, out = p
        w = _native_fwd(p, 9, 5, "paper")
        z_mu = _native_fwd((means, chol, torch.arange(4096, dtype=torch.int16), (ell[0][:0],) * 3 + (ell[3][:0],),
                            (out[0][:0], out[1][:0], out[2][:0])), 9, 5, "paper")
        keep = torch.ones(n, dtype=torch.bool)
        keep[ell[0]] = False
        keep[out[0]] = False
        assert torch.equal(w[:, keep], z_mu[:, labels[keep].long()])


def _with_threads(k, fn):
    old = C.omp_max_threads()
    C.set_num_threads(k)
    try:
        return fn()
    finally:
        C.set_num_threads(old)


@pytest.mark.parametrize("mode", list(MODES))
def test_backward_bit_identical_across_runs_and_threads(mode):
    # n over several 65536-weight chunks, many ellipses: any order dependence would show.
    p = _problem(97, (200_003,), 3000, 500, torch.int32, seed=11)
    g = torch.randn(3, 200_003, generator=torch.Generator().manual_seed(2)) * 10

    def run():
        return _native_bwd(g, p, 42, 3, mode)

    first = run()
    for k in (1, 2, 3, 4):
        for _ in range(2):
            again = _with_threads(k, run)
            assert all(torch.equal(a, b) for a, b in zip(first, again)), f"threads={k}"
    w1 = _with_threads(1, lambda: _native_fwd(p, 42, 3, mode))
    w3 = _with_threads(3, lambda: _native_fwd(p, 42, 3, mode))
    assert torch.equal(w1, w3)


def test_many_components_backward():
    """K * S too big for many chunk partials: fewer, longer chunks, still right."""
    reference = pytest.importorskip("sws_kernels.reference")
    p = _problem(200_000, (150_001,), 10, 10, torch.int32, seed=6)
    means, chol, labels, ell, out = p
    g = torch.randn(2, 150_001, generator=torch.Generator().manual_seed(3))
    got = _native_bwd(g, p, 1, 2, "hierarchical")
    d = torch.float64
    want = reference.reconstruct_backward(g.to(d), means.to(d), chol.to(d), labels,
                                          (ell[0], ell[1], ell[2], ell[3].to(d)), (out[0], out[1].to(d), out[2].to(d)),
                                          seed=1, samples=2, mode="hierarchical", owner=3, codebook_owner=9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.to(d), b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------

def _raw_args(p, **over):
    """The C++ argument bundle (_C.ReconstructArgs) of problem p, with fields overridden."""
    means, chol, labels, ell, out = p
    a = dict(means=means.data_ptr(), chol=chol.data_ptr(), K=means.shape[0], labels=labels.data_ptr(),
             labels_dtype=native._LABEL_CODES[labels.dtype], n=labels.numel(), e_pos=ell[0].data_ptr(),
             e_a=ell[1].data_ptr(), e_b=ell[2].data_ptr(), e_alpha=ell[3].data_ptr(), E=ell[0].numel(),
             o_pos=out[0].data_ptr(), o_mu=out[1].data_ptr(), o_rho=out[2].data_ptr(), O=out[0].numel(),
             seed=1, S=2, mode=0, owner=0, codebook_owner=0)
    a.update(over)
    return C.ReconstructArgs(**a)


@pytest.mark.parametrize("over,match", [
    ({"K": 0}, "reconstruct_cpu: K"),
    ({"S": 0}, "reconstruct_cpu: S"),
    ({"n": (1 << 34) + 1}, "reconstruct_cpu: n = .* 2\\^34"),
    ({"n": -1}, "reconstruct_cpu: n must be"),
    ({"mode": 3}, "reconstruct_cpu: mode"),
    ({"labels_dtype": 9}, "reconstruct_cpu: labels_dtype"),
    ({"owner": 1 << 32}, "reconstruct_cpu: owner"),
    ({"E": -1}, "reconstruct_cpu: E"),
    ({"means": 0}, "reconstruct_cpu: means/chol pointer is null"),
    ({"e_alpha": 0}, "reconstruct_cpu: e_pos/e_a/e_b/e_alpha pointer is null with E = 2"),
    ({"o_rho": 0}, "reconstruct_cpu: o_pos/o_mu/o_rho pointer is null with O = 2"),
])
def test_reconstruct_bad_sizes(over, match):
    p = _problem(4, (10,), 2, 2, torch.int64)
    out = torch.empty(2, 10)
    with pytest.raises(ValueError, match=match):
        C.reconstruct_cpu(_raw_args(p, **over), out.data_ptr())


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


def test_bundle_seed_matches_positional_seed():
    # The seed travels in the bundle: a CPU seed tensor, its int value and the uint64 bits agree.
    p = _problem(6, (5, 7), 2, 1, torch.int16)
    means, chol, labels, ell, out = p
    for seed in (-3, torch.tensor(-3, dtype=torch.int64), (1 << 64) - 3):
        w = native.reconstruct(means, chol, labels, *ell, *out, seed, 2, 1, 4, 5)
        args = _raw_args(p, seed=(1 << 64) - 3, mode=1, owner=4, codebook_owner=5)
        raw = torch.empty(2, 35)
        C.reconstruct_cpu(args, raw.data_ptr())
        assert torch.equal(w.reshape(2, 35), raw)


def test_linear_overrides_row_offsets(rng):
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


def test_reconstruct_bad_entries():
    p = _problem(4, (10,), 2, 2, torch.int64)
    means, chol, labels, ell, out = p
    bad_label = labels.clone()
    bad_label[3] = 4
    with pytest.raises(ValueError, match="reconstruct_cpu: a label is outside"):
        native.reconstruct(means, chol, bad_label, *ell, *out, 1, 2, 0, 0, 0)
    with pytest.raises(ValueError, match="reconstruct_backward_cpu: a label is outside"):
        native.reconstruct_backward(torch.ones(2, 10), means, chol, bad_label, *ell, *out, 1, 2, 1, 0, 0)
    dup = (ell[0].clone(), ell[1], ell[2], ell[3])
    dup[0][1] = out[0][0]
    with pytest.raises(ValueError, match="appears twice"):
        native.reconstruct(means, chol, labels, *dup, *out, 1, 2, 0, 0, 0)
    far = (torch.tensor([10, 0]), ell[1], ell[2], ell[3])
    with pytest.raises(ValueError, match="out of range"):
        native.reconstruct(means, chol, labels, *far, *out, 1, 2, 0, 0, 0)
    comp = (ell[0], torch.tensor([0, 4]), ell[2], ell[3])
    with pytest.raises(ValueError, match="components"):
        native.reconstruct(means, chol, labels, *comp, *out, 1, 2, 0, 0, 0)
    with pytest.raises(TypeError, match="means"):
        native.reconstruct(means.double(), chol, labels, *ell, *out, 1, 2, 0, 0, 0)
    with pytest.raises(ValueError, match="grad_w"):
        native.reconstruct_backward(torch.ones(3, 10), means, chol, labels, *ell, *out, 1, 2, 0, 0, 0)


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


# ---------------------------------------------------------------------------------------------------
# CUDA (only with a GPU): same checks against the CPU kernels
# ---------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not native.AVAILABLE_CUDA, reason=f"native CUDA unavailable: {native.CUDA_REASON}")


def _to(p, dev):
    means, chol, labels, ell, out = p
    return (means.to(dev), chol.to(dev), labels.to(dev), tuple(t.to(dev) for t in ell), tuple(t.to(dev) for t in out))


@cuda
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int64])
@pytest.mark.parametrize("K,shape,E,O", CASES + [(7000, (100_003,), 500, 300), (4096, (4096, 33), 100, 50)])
@pytest.mark.parametrize("S", [1, 7])
def test_cuda_matches_cpu(mode, label_dtype, K, shape, E, O, S):
    p = _problem(K, shape, E, O, label_dtype, seed=K + S)
    w_cpu = _native_fwd(p, 31, S, mode)
    pc = _to(p, "cuda")
    w = _native_fwd(pc, 31, S, mode)
    torch.testing.assert_close(w.cpu(), w_cpu, rtol=1e-5, atol=1e-5)
    g = torch.randn(S, *shape, generator=torch.Generator().manual_seed(4))
    got_cpu = _native_bwd(g, p, 31, S, mode)
    got = _native_bwd(g.cuda(), pc, 31, S, mode)
    again = _native_bwd(g.cuda(), pc, 31, S, mode)
    for a, b, c in zip(got, again, got_cpu):
        assert torch.equal(a, b)  # deterministic
        torch.testing.assert_close(a.cpu(), c, rtol=1e-5, atol=1e-5)
