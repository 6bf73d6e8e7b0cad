"""reconstruct and its backward on every backend, against the reference (float64 where it matters).

1. The public API (functional.reconstruct, the torch.ops.sws_kernels ops, autograd, opcheck), parametrised
   over backends with @pytest.mark.backends (tests/conftest.py: unavailable backends skip with the reason).
2. The Triton launchers (sws_kernels.triton.reconstruct): the issue's grid of modes x label dtypes x K x
   shapes, small tiles (many blocks and pieces), bit-identical reruns.
3. The native kernels (sws_kernels.native, csrc/cpu and csrc/cuda): every mode x label dtype x with/without
   ellipses/outliers, block/chunk boundaries, the streaming-store path, bit-identical backward across runs,
   OpenMP thread counts and SIMD versions, errors of the C entry points, CUDA against the CPU kernels.

Tolerances: the kernels compute in float32 with the same Philox stream as the reference; normals may differ by
a few ulps of the transcendental functions (SPEC.md section 4: 1e-5 absolute), so forward values agree to
~1e-5 absolute, and gradient sums of N terms to fp32 rounding that grows like sqrt(N).
"""
import math

import pytest
import torch
from conftest import make_layer, to64

import sws_kernels as sws
from sws_kernels import functional as F
from sws_kernels import native
from sws_kernels import reference as R
from sws_kernels.native import _C as C

MODES = ("paper", "hierarchical", "mean")
MODE_CODES = {"paper": 0, "hierarchical": 1, "mean": 2}
LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
D = torch.float64


# ======================================================================================================
# 1. public API, every backend
# ======================================================================================================

CASES = [  # shape, K, E, O, S, label dtype
    ((13, 7), 1, 0, 0, 1, torch.uint8),
    ((13, 7), 5, 3, 2, 7, torch.int8),
    ((3, 5, 3, 3), 300, 4, 5, 3, torch.int16),
    ((1001,), 40, 17, 9, 2, torch.int32),
    ((6, 11), 9, 0, 6, 4, torch.int64),
]


@pytest.mark.backends("reference", "native_cpu")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-K{c[1]}-E{c[2]}-O{c[3]}-S{c[4]}-{c[5]}")
def test_forward_and_grads_match_reference(rng, backend, mode, case):
    shape, K, E, O, S, ldt = case
    means, chol, labels, e, o = make_layer(rng, shape, K, E, O, ldt, device="cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 4 + 3
    kw = dict(seed=seed, samples=S, mode=mode, owner=12345, codebook_owner=2**32 - 7)
    params = [t.clone().requires_grad_() for t in (means, chol)]
    o_par = None if o is None else [o[1].clone().requires_grad_(), o[2].clone().requires_grad_()]
    with backend():
        W = F.reconstruct(params[0], params[1], labels, e, None if o is None else (o[0], *o_par), **kw)
    assert W.shape == (S, *shape) and W.dtype == torch.float32
    # reference in float64 on the same (float32) noise: the kernel's error is fp32 rounding plus the 1e-5
    # the contract allows normals to differ by (transcendental ulps)
    want = R.reconstruct(*to64((means, chol)), labels, to64(e), to64(o), **kw)
    torch.testing.assert_close(W.double(), want, rtol=1e-5, atol=1e-5)

    g = torch.randn(W.shape, generator=rng)
    grads = torch.autograd.grad(W, params + (o_par or []), g, allow_unused=True)  # mean mode: chol unused
    want_g = R.reconstruct_backward(g.double(), *to64((means, chol)), labels, to64(e), to64(o), **kw)
    scale = g.abs().sum().item() / max(K, 1)  # typical magnitude of one segmented sum
    for got, ref, name in zip(grads, want_g, ("means", "chol", "mu_o", "rho_o")):
        got = torch.zeros_like(ref) if got is None else got
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5 * max(1.0, scale), msg=name)


@pytest.mark.backends("reference", "native_cpu", "triton")
@pytest.mark.parametrize("mode", MODES)
def test_autograd_through_op(rng, backend, mode):
    means, chol, labels, ell, outl = make_layer(rng, (17, 6), 5, 2, 3, torch.uint8, device=backend.device)
    leaves = [means.clone().requires_grad_(), chol.clone().requires_grad_(), outl[1].clone().requires_grad_(),
              outl[2].clone().requires_grad_()]
    g = torch.randn(3, 17, 6, generator=rng).to(backend.device)
    with backend():
        w = F.reconstruct(leaves[0], leaves[1], labels, ell, (outl[0], leaves[2], leaves[3]), seed=11, samples=3,
                          mode=mode)
    # the reference's mean mode never reads chol (no gradient at all); the kernels' backward ops give zeros
    got = torch.autograd.grad(w, leaves, g, allow_unused=backend.key == "reference")
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    wr = R.reconstruct(ref_leaves[0], ref_leaves[1], labels, to64(ell), (outl[0], ref_leaves[2], ref_leaves[3]),
                       seed=11, samples=3, mode=mode)
    want = torch.autograd.grad(wr, ref_leaves, g.double(), allow_unused=True)
    for a, b in zip(got, want):
        if a is None and b is None:
            continue
        b = torch.zeros_like(a, dtype=D) if b is None else b
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4)


@pytest.mark.backends("reference", "native_cpu")
@pytest.mark.parametrize("mode", MODES)
def test_same_seed_bit_identical(rng, backend, mode):
    means, chol, labels, e, o = make_layer(rng, (37, 29), 50, 11, 7, device="cpu")
    kw = dict(seed=99, samples=3, mode=mode)
    outs = []
    for _ in range(2):
        p = [means.clone().requires_grad_(), chol.clone().requires_grad_(), o[1].clone().requires_grad_(),
             o[2].clone().requires_grad_()]
        with backend():
            W = F.reconstruct(p[0], p[1], labels, e, (o[0], p[2], p[3]), **kw)
        W.backward(torch.ones_like(W))
        outs.append([W.detach()] + [torch.zeros(0) if t.grad is None else t.grad for t in p])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.backends("reference", "native_cpu", "triton")
def test_noncontiguous_inputs(rng, backend):
    means, chol, labels, ell, outl = make_layer(rng, (9, 21), 13, 3, 2, torch.int16, device=backend.device)
    wide = torch.randn(13, 5, generator=rng).to(backend.device)
    wide[:, 1:3] = means
    means_nc = wide[:, 1:3]
    labels_nc = labels.t().contiguous().t()  # same values, transposed strides
    assert not means_nc.is_contiguous() and not labels_nc.is_contiguous()
    for mode in MODES:
        with backend():
            w = F.reconstruct(means_nc, chol, labels_nc, ell, outl, seed=5, samples=3, mode=mode)
        ref = R.reconstruct(means.double(), chol.double(), labels, to64(ell), to64(outl), seed=5, samples=3,
                            mode=mode)
        torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-5)


def _op_args(rng, mode, device, K=6):
    means, chol, labels, e, o = make_layer(rng, (5, 9), K, 3, 2, device=device)
    a = sws._checks.sws(means.requires_grad_(), chol.requires_grad_(), labels, e,
                        (o[0], o[1].requires_grad_(), o[2].requires_grad_()), 2**64 - 3, 3, mode, 4, 8)
    return (a.means, a.chol, a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu, a.o_rho,
            sws.philox.seed_tensor(a.seed, a.means.device), a.samples, sws._checks.MODE_CODES[mode], a.owner,
            a.codebook_owner)


@pytest.mark.backends("reference", "native_cpu", "triton")
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_reconstruct(rng, backend, mode):
    args = _op_args(rng, mode, backend.device)
    with backend():
        torch.library.opcheck(torch.ops.sws_kernels.reconstruct.default, args)


@pytest.mark.backends("reference", "native_cpu", "triton")
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_reconstruct_backward(rng, backend, mode):
    args = _op_args(rng, mode, backend.device)
    grad = torch.randn(args[11], *args[2].shape, generator=rng).to(backend.device)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    with backend():
        torch.library.opcheck(torch.ops.sws_kernels.reconstruct_backward.default, (grad,) + detached)


def test_op_under_torch_compile(rng):
    means, chol, labels, e, o = make_layer(rng, (8, 6), 4, 2, 2, device="cpu")

    def f(m, c):
        return F.reconstruct(m, c, labels, e, o, seed=5, samples=2, mode="hierarchical").sum(0)

    want = f(means, chol)
    got = torch.compile(f, fullgraph=True)(means, chol)
    torch.testing.assert_close(got, want)


def test_seed_as_tensor(rng):
    means, chol, labels, e, o = make_layer(rng, (4, 4), 3, 1, 1, device="cpu")
    a = F.reconstruct(means, chol, labels, e, o, seed=torch.tensor(-5), samples=2, mode="hierarchical")
    b = F.reconstruct(means, chol, labels, e, o, seed=2**64 - 5, samples=2, mode="hierarchical")
    assert torch.equal(a, b)


def test_auto_picks_native_for_fp32_cpu_and_reference_for_fp64():
    from sws_kernels import _backend
    name, _, _ = _backend.select("reconstruct", torch.device("cpu"), torch.float32)
    assert name == ("native_cpu" if native.AVAILABLE_CPU else "reference")
    name, _, why = _backend.select("reconstruct", torch.device("cpu"), torch.float64)
    assert name == "reference" and (not native.AVAILABLE_CPU or "dtype" in why)


@pytest.mark.backends("native_cpu", "triton")
def test_forced_kernel_backend_rejects_float64(rng, backend):
    means, chol, labels, e, o = make_layer(rng, (4, 4), 3, 0, 0, device=backend.device)
    with backend(), pytest.raises(TypeError, match="dtype.*float64|float64.*dtype"):
        F.reconstruct(means.double(), chol.double(), labels, seed=1)


@pytest.mark.backends("reference", "native_cpu", "triton")
def test_bad_inputs_raise_before_any_kernel(rng, backend):
    means, chol, labels, e, o = make_layer(rng, (4, 4), 3, 0, 0, device=backend.device)
    with backend():
        with pytest.raises(ValueError, match="labels"):
            F.reconstruct(means, chol, labels + 3, seed=1)
        with pytest.raises(ValueError, match="samples"):
            F.reconstruct(means, chol, labels, seed=1, samples=0)
        with pytest.raises(ValueError, match="seed"):
            F.reconstruct(means, chol, labels, seed=2**64)
        with sws.validate(), pytest.raises(ValueError, match="means.*non-finite"):  # per call: on request only
            F.reconstruct(means * float("nan"), chol, labels, seed=1)
        assert torch.isnan(F.reconstruct(means * float("nan"), chol, labels, seed=1)).all()  # NaN in, NaN out
        with pytest.raises(TypeError, match="labels"):
            F.reconstruct(means, chol, labels.float(), seed=1)


# ======================================================================================================
# 2. Triton launchers
# ======================================================================================================

def _triton():
    from sws_kernels.triton import reconstruct as T

    return T


def _launcher_args(means, chol, labels, ellipse, outliers, seed, S, mode, owner=3, cb=7):
    a = sws._checks.sws(means, chol, labels, ellipse, outliers, seed, S, mode, owner, cb)
    return (a.means, a.chol, a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu, a.o_rho, a.seed, S,
            sws._checks.MODE_CODES[mode], owner, cb)


TRITON_CASES = [  # (mode, label dtype, K, shape, E, O, S): combined to cover the grid of the issue in few cases
    ("paper", torch.uint8, 1, (17, 3), 2, 3, 1),
    ("hierarchical", torch.int16, 255, (129, 2), 5, 4, 3),
    ("mean", torch.int32, 256, (3, 5, 7), 0, 6, 3),
    ("paper", torch.int64, 4096, (33, 9), 7, 0, 8),
    ("hierarchical", torch.uint8, 3, (2, 130), 0, 0, 8),
    ("hierarchical", torch.int16, 4096, (24, 5), 3, 3, 2),
    ("paper", torch.int8, 100, (1, 1), 0, 0, 3),
    ("mean", torch.uint8, 17, (65, 2), 4, 1, 1),
]


@pytest.mark.backends("triton")
@pytest.mark.parametrize("mode,label_dtype,K,shape,E,O,S", TRITON_CASES)
def test_triton_forward_backward(rng, backend, mode, label_dtype, K, shape, E, O, S):
    _check_triton(rng, backend.device, mode, label_dtype, K, shape, E, O, S)


@pytest.mark.backends("triton")
@pytest.mark.parametrize("mode", MODES)
def test_triton_small_tiles_multi_block_multi_piece(rng, monkeypatch, backend, mode):
    """Tiles narrower than the data: many blocks per sample, K not a multiple of BLOCK_K, and segments cut
    into several pieces (about 11 entries per component, CHUNK 4)."""
    T = _triton()
    monkeypatch.setattr(T, "BLOCK", 64)
    monkeypatch.setattr(T, "BLOCK_K", 16)
    monkeypatch.setattr(T, "CHUNK", 4)
    monkeypatch.setattr(T, "PIECES", 4)  # P = ~57 pieces: not a multiple of 4
    _check_triton(rng, backend.device, mode, torch.int16, 19, (29, 7), 4, 5, 3)


def _check_triton(rng, dev, mode, label_dtype, K, shape, E, O, S):
    T = _triton()
    means, chol, labels, ell, outl = make_layer(rng, shape, K, E, O, label_dtype, device=dev)
    seed = int(torch.randint(0, 2**62, (1,), generator=rng).to(dev)) * 3
    args = _launcher_args(means, chol, labels, ell, outl, seed, S, mode)
    w = T.reconstruct(*args)
    assert w.shape == (S, *shape) and w.dtype == torch.float32
    ref = R.reconstruct(means.double(), chol.double(), labels, to64(ell), to64(outl), seed=seed, samples=S,
                        mode=mode, owner=3, codebook_owner=7)
    torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(w, T.reconstruct(*args))  # same seed -> identical

    g = torch.randn(S, *shape, generator=rng).to(dev)
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


# ======================================================================================================
# 3. native kernels (CPU; CUDA against the CPU where a GPU exists)
# ======================================================================================================

def _problem(K, shape, E, O, label_dtype, seed=0):
    """Seeded float32 problem; ellipse/outlier tuples always given (empty when E/O = 0), as native takes them."""
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
    return native.reconstruct(means, chol, labels, *ell, *out, seed, S, MODE_CODES[mode], owner, cb)


def _native_bwd(g, p, seed, S, mode, owner=3, cb=9):
    means, chol, labels, ell, out = p
    return native.reconstruct_backward(g, means, chol, labels, *ell, *out, seed, S, MODE_CODES[mode], owner, cb)


def _with_threads(k, fn):
    old = C.omp_max_threads()
    C.set_num_threads(k)
    try:
        return fn()
    finally:
        C.set_num_threads(old)


NATIVE_CASES = [  # K, shape, E, O
    (1, (3, 5), 0, 0),
    (1, (17,), 2, 3),
    (5, (2, 3, 3, 3), 0, 0),
    (37, (129,), 9, 0),
    (37, (7, 13), 0, 6),
    (300, (33, 41), 40, 25),
]


@pytest.mark.backends("native_cpu")
@pytest.mark.parametrize("mode", list(MODE_CODES))
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("K,shape,E,O", NATIVE_CASES)
@pytest.mark.parametrize("S", [1, 7])
def test_native_matches_reference(mode, label_dtype, K, shape, E, O, S):
    p = _problem(K, shape, E, O, label_dtype, seed=K + E + O)
    means, chol, labels, ell, out = p
    seed = 0xFEDC_BA98_7654_3210
    kw = dict(seed=seed, samples=S, mode=mode, owner=3, codebook_owner=9)
    ell_r = ell if E else None
    out_r = out if O else None

    w = _native_fwd(p, seed, S, mode)
    assert w.dtype == torch.float32 and w.shape == (S, *shape)
    w_ref = R.reconstruct(means, chol, labels, ell_r, out_r, **kw)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-5)
    if mode == "mean":
        assert torch.equal(w, w_ref)  # no transcendental on this path

    g = torch.randn(S, *shape, generator=torch.Generator().manual_seed(5))
    got = _native_bwd(g, p, seed, S, mode)
    ell_d = (ell[0], ell[1], ell[2], ell[3].to(D)) if E else None
    out_d = (out[0], out[1].to(D), out[2].to(D)) if O else None
    want = R.reconstruct_backward(g.to(D), means.to(D), chol.to(D), labels, ell_d, out_d, **kw)
    for name, a, b in zip(("means", "chol", "mu_o", "rho_o"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a.to(D), b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.backends("native_cpu")
def test_native_backward_through_autograd_vs_reference_autograd():
    """The native backward is the VJP of the native forward (checked against torch autograd on the reference)."""
    p = _problem(11, (9, 7), 5, 4, torch.int16, seed=3)
    means, chol, labels, ell, out = p
    S, seed = 3, 77
    for mode in MODE_CODES:
        m = means.clone().double().requires_grad_()
        c = chol.clone().double().requires_grad_()
        mu = out[1].double().requires_grad_()
        rho = out[2].double().requires_grad_()
        w = R.reconstruct(m, c, labels, (ell[0], ell[1], ell[2], ell[3].double()), (out[0], mu, rho),
                          seed=seed, samples=S, mode=mode, owner=3, codebook_owner=9)
        g = torch.randn(w.shape, dtype=D, generator=torch.Generator().manual_seed(1))
        want = torch.autograd.grad(w, (m, c, mu, rho), g, allow_unused=True)
        got = _native_bwd(g.float(), p, seed, S, mode)
        for a, b in zip(got, want):
            b = torch.zeros_like(a, dtype=D) if b is None else b
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=2e-5)


@pytest.mark.backends("native_cpu")
def test_native_overrides_ignore_labels_at_their_positions():
    p = _problem(6, (50,), 4, 3, torch.int32, seed=8)
    means, chol, labels, ell, out = p
    other = labels.clone()
    other[ell[0]] = (other[ell[0]] + 1) % 6
    other[out[0]] = (other[out[0]] + 2) % 6
    for mode in MODE_CODES:
        a = _native_fwd(p, 5, 2, mode)
        b = _native_fwd((means, chol, other, ell, out), 5, 2, mode)
        assert torch.equal(a, b)
        ga = _native_bwd(torch.ones(2, 50), p, 5, 2, mode)
        gb = _native_bwd(torch.ones(2, 50), (means, chol, other, ell, out), 5, 2, mode)
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.backends("native_cpu")
def test_native_hierarchical_blocks_and_odd_sizes():
    """n spanning several forward blocks/backward chunks, not a multiple of 4, vs the reference."""
    p = _problem(50, (3 * 4096 + 3,), 30, 20, torch.int16, seed=4)
    means, chol, labels, ell, out = p
    w = _native_fwd(p, 1234, 2, "hierarchical")
    w_ref = R.reconstruct(means, chol, labels, ell, out, seed=1234, samples=2, mode="hierarchical", owner=3,
                          codebook_owner=9)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.backends("native_cpu")
def test_native_large_output_streaming_path():
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


@pytest.mark.backends("native_cpu")
@pytest.mark.parametrize("mode", list(MODE_CODES))
def test_native_backward_bit_identical_across_runs_and_threads(mode):
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


@pytest.mark.backends("native_cpu")
def test_native_many_components_backward():
    """K * S too big for many chunk partials: fewer, longer chunks, still right."""
    p = _problem(200_000, (150_001,), 10, 10, torch.int32, seed=6)
    means, chol, labels, ell, out = p
    g = torch.randn(2, 150_001, generator=torch.Generator().manual_seed(3))
    got = _native_bwd(g, p, 1, 2, "hierarchical")
    want = R.reconstruct_backward(g.to(D), means.to(D), chol.to(D), labels,
                                  (ell[0], ell[1], ell[2], ell[3].to(D)), (out[0], out[1].to(D), out[2].to(D)),
                                  seed=1, samples=2, mode="hierarchical", owner=3, codebook_owner=9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.to(D), b, rtol=1e-5, atol=1e-5)


def test_native_hierarchical_both_simd_versions(simd):
    """Hierarchical reconstruct uses the bulk normals (vecmath.cpp) in forward and backward."""
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


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("n", [(1 << 22) + 8, 1003])  # large: S = 1 streaming stores; small and odd: tails
def test_native_one_sample_gather(simd, label_dtype, n):
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


@pytest.mark.backends("native_cpu")
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
def test_native_bad_sizes(over, match):
    p = _problem(4, (10,), 2, 2, torch.int64)
    out = torch.empty(2, 10)
    with pytest.raises(ValueError, match=match):
        C.reconstruct_cpu(_raw_args(p, **over), out.data_ptr())


@pytest.mark.backends("native_cpu")
def test_native_bundle_seed_matches_positional_seed():
    # The seed travels in the bundle: a CPU seed tensor, its int value and the uint64 bits agree.
    p = _problem(6, (5, 7), 2, 1, torch.int16)
    means, chol, labels, ell, out = p
    for seed in (-3, torch.tensor(-3, dtype=torch.int64), (1 << 64) - 3):
        w = native.reconstruct(means, chol, labels, *ell, *out, seed, 2, 1, 4, 5)
        args = _raw_args(p, seed=(1 << 64) - 3, mode=1, owner=4, codebook_owner=5)
        raw = torch.empty(2, 35)
        C.reconstruct_cpu(args, raw.data_ptr())
        assert torch.equal(w.reshape(2, 35), raw)


@pytest.mark.backends("native_cpu")
def test_native_bad_entries():
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


@pytest.mark.backends("native_cuda")
@pytest.mark.parametrize("mode", list(MODE_CODES))
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int64])
@pytest.mark.parametrize("K,shape,E,O", NATIVE_CASES + [(7000, (100_003,), 500, 300), (4096, (4096, 33), 100, 50)])
@pytest.mark.parametrize("S", [1, 7])
def test_native_cuda_matches_cpu(backend, mode, label_dtype, K, shape, E, O, S):
    p = _problem(K, shape, E, O, label_dtype, seed=K + S)
    w_cpu = _native_fwd(p, 31, S, mode)
    pc = backend.to(*p)
    w = _native_fwd(pc, 31, S, mode)
    torch.testing.assert_close(w.cpu(), w_cpu, rtol=1e-5, atol=1e-5)
    g = torch.randn(S, *shape, generator=torch.Generator().manual_seed(4))
    got_cpu = _native_bwd(g, p, 31, S, mode)
    got = _native_bwd(g.cuda(), pc, 31, S, mode)
    again = _native_bwd(g.cuda(), pc, 31, S, mode)
    for a, b, c in zip(got, again, got_cpu):
        assert torch.equal(a, b)  # deterministic
        torch.testing.assert_close(a.cpu(), c, rtol=1e-5, atol=1e-5)


# ======================================================================================================
# 4. Shards (tensor parallelism, issue 18 item 5): a block of the weight with elem_offset/row_stride draws
#    exactly the noise of its place in the unsharded weight, on every backend
# ======================================================================================================

from tp_helpers import SHARDS, cut_sws, outlier_mask, shard_ids  # noqa: E402


@pytest.mark.backends("reference", "native_cpu", "native_cuda", "triton")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", SHARDS, ids=shard_ids)
def test_shard_reproduces_its_block_of_the_unsharded_weight(rng, backend, mode, case):
    shape, block = case
    r0, r1, c0, c1 = block
    means, chol, labels, e, o = make_layer(rng, shape, 6, 5, 6, torch.uint8, device=backend.device)
    kw = dict(seed=int(torch.randint(0, 2**62, (1,), generator=rng)), samples=3, mode=mode, owner=77,
              codebook_owner=5)
    with backend():
        full = F.reconstruct(means, chol, labels, e, o, **kw)
    lab, es, os_, mp = cut_sws(labels, e, o, block)
    m = means.clone().requires_grad_()
    c = chol.clone().requires_grad_()
    o_par = [os_[1].clone().requires_grad_(), os_[2].clone().requires_grad_()]
    with backend():
        W = F.reconstruct(m, c, lab, es, (os_[0], *o_par), **kw, **mp)
    assert W.shape == (3, r1 - r0, c1 - c0)
    want = R.reconstruct(*to64((means, chol)), lab, to64(es), to64(os_), **kw, **mp)
    torch.testing.assert_close(W.double(), want, rtol=1e-5, atol=1e-5)
    # the reference shard is its block of the reference unsharded weight (same noise; float64 vector/scalar
    # softplus may differ in the last ulp between tensor sizes)
    want_full = R.reconstruct(*to64((means, chol)), labels, to64(e), to64(o), **kw)
    torch.testing.assert_close(want, want_full[:, r0:r1, c0:c1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W, full[:, r0:r1, c0:c1], rtol=1e-5, atol=1e-5)

    g = torch.randn(W.shape, generator=rng).to(backend.device)
    grads = torch.autograd.grad(W, [m, c] + o_par, g, allow_unused=True)
    want_g = R.reconstruct_backward(g.double(), *to64((means, chol)), lab, to64(es), to64(os_), **kw, **mp)
    # and it is the unsharded backward of a gradient that is zero outside the block (outliers: the block's)
    gf = torch.zeros(3, *shape, dtype=D, device=backend.device)
    gf[:, r0:r1, c0:c1] = g.double()
    full_g = R.reconstruct_backward(gf, *to64((means, chol)), labels, to64(e), to64(o), **kw)
    om = outlier_mask(o, shape[1], block)
    for a, b in zip(want_g, (full_g[0], full_g[1], full_g[2][om], full_g[3][om])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for got, ref, name in zip(grads, want_g, ("means", "chol", "mu_o", "rho_o")):
        got = torch.zeros_like(ref) if got is None else got
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5 * max(1.0, g.abs().sum().item() / 6),
                                   msg=name)


def test_shard_mapping_errors(rng):
    means, chol, labels, e, o = make_layer(rng, (4, 5), 3, 0, 0, torch.uint8, device="cpu")
    kw = dict(seed=1, samples=1)
    with pytest.raises(ValueError, match="row_stride"):
        F.reconstruct(means, chol, labels, **kw, elem_offset=0, row_stride=3)
    with pytest.raises(ValueError, match="elem_offset"):
        F.reconstruct(means, chol, labels, **kw, elem_offset=-1)
    with pytest.raises(ValueError, match="2\\*\\*34"):
        F.reconstruct(means, chol, labels, **kw, elem_offset=2**34 - 10, row_stride=5)
    with pytest.raises(TypeError, match="row_stride"):
        F.reconstruct(means, chol, labels, **kw, row_stride=5.0)
    # the identity mapping is today's stream bit for bit
    assert torch.equal(F.reconstruct(means, chol, labels, **kw, mode="hierarchical", elem_offset=0, row_stride=5),
                       F.reconstruct(means, chol, labels, **kw, mode="hierarchical"))


@pytest.mark.backends("native_cpu")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,block", [((7, 10), (2, 6, 3, 9)), ((40, 301), (3, 33, 7, 298)),
                                         ((20, 512), (4, 20, 0, 512)), ((9, 1100), (0, 9, 512, 1024))])
def test_native_shard_kernels_match_reference(rng, simd, mode, shape, block):
    """The native kernels themselves (no reference fallback) on shards: unaligned offsets/strides, row segments
    crossing the forward's 4096-element blocks, AVX2 and scalar normals."""
    from sws_kernels import _ops
    means, chol, labels, e, o = make_layer(rng, shape, 9, 30, 40, torch.int16, device="cpu")
    lab, es, os_, mp = cut_sws(labels, e, o, block)
    es = es if es is not None and es[0].numel() else None
    i64 = dict(dtype=torch.int64)
    ep, ea, eb, eal = es if es is not None else (torch.zeros(0, **i64),) * 3 + (torch.zeros(0),)
    op, omu, orho = os_
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    args = (means, chol, lab, ep.long(), ea.long(), eb.long(), eal, op.long(), omu, orho,
            sws.philox.seed_tensor(seed), 2, MODE_CODES[mode], 31, 4)
    W = _ops._native_reconstruct(*args, elem_offset=mp["elem_offset"], row_stride=mp["row_stride"])
    want = R.reconstruct(*to64((means, chol)), lab, to64(es), to64(os_), seed=seed, samples=2, mode=mode, owner=31,
                         codebook_owner=4, **mp)
    torch.testing.assert_close(W.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn(W.shape, generator=rng)
    got = _ops._native_reconstruct_backward(g, *args, elem_offset=mp["elem_offset"], row_stride=mp["row_stride"])
    want_g = R.reconstruct_backward(g.double(), *to64((means, chol)), lab, to64(es), to64(os_), seed=seed, samples=2,
                                    mode=mode, owner=31, codebook_owner=4, **mp)
    for a, b, name in zip(got, want_g, ("means", "chol", "mu_o", "rho_o")):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * max(1.0, g.abs().sum().item() / 9), msg=name)
