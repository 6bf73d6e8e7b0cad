"""The label-histogram inference path of sws_linear (issue 14): native CPU (csrc/cpu/histogram.cpp) and Triton
(sws_kernels/triton/histogram.py, interpreter), against the reference in float64, and the dispatch choosing it
only without autograd in paper/mean mode with a shared x."""
import pytest
import torch

import sws_kernels as sws
from sws_kernels import _backend, native, reference
from sws_kernels import functional as F

MODES = {"paper": 0, "mean": 2}
needs_native = pytest.mark.skipif(not native.AVAILABLE_CPU, reason="native CPU module not built")


def _layer(out_f, in_f, K, ldt, E, O, gen):
    means = torch.stack([torch.randn(K, generator=gen) * 0.3, torch.randn(K, generator=gen) - 3], -1)
    chol = torch.randn(K, 3, generator=gen) * 0.5
    labels = torch.randint(0, K, (out_f, in_f), generator=gen).to(ldt)
    perm = torch.randperm(out_f * in_f, generator=gen)
    ell = (perm[:E], torch.randint(0, K, (E,), generator=gen), torch.randint(0, K, (E,), generator=gen),
           torch.rand(E, generator=gen))
    outl = (perm[E:E + O], torch.randn(O, generator=gen) * 0.5, torch.randn(O, generator=gen) - 2)
    return means, chol, labels, ell, outl


def _expected(x, means, chol, labels, ell, outl, bias, seed, S, mode):
    """(y, bound): the reference in float64 and an fp32 summation-order bound per element."""
    d = torch.float64
    w = reference.reconstruct(means.to(d), chol.to(d), labels, (*ell[:3], ell[3].to(d)),
                              (outl[0], outl[1].to(d), outl[2].to(d)), seed=seed, samples=S, mode=mode, owner=7,
                              codebook_owner=3)
    x2 = x.reshape(-1, labels.shape[1]).to(d)
    y = torch.matmul(x2, w.transpose(1, 2))
    mag = torch.matmul(x2.abs(), w.abs().transpose(1, 2))
    if bias is not None:
        b = bias.to(d)
        y = y + (b[:, None, :] if b.dim() == 2 else b)
        mag = mag + b.abs()[:, None, :] if b.dim() == 2 else mag + b.abs()
    # fp32 rounding of a sum of `in` products, plus the normals' 1e-5 cross-backend allowance (SPEC.md s. 4)
    return y, 1e-5 * mag + 1e-6


def _case(gen, out_f, in_f, K, ldt, M, S, bias_kind):
    means, chol, labels, ell, outl = _layer(out_f, in_f, K, ldt, max(1, out_f * in_f // 200),
                                            max(1, out_f * in_f // 50), gen)
    x = torch.randn(M, in_f, generator=gen)
    bias = {"none": None, "shared": torch.randn(out_f, generator=gen),
            "per_sample": torch.randn(S, out_f, generator=gen)}[bias_kind]
    return x, means, chol, labels, ell, outl, bias


# Triton runs on the GPU where there is one (the interpreter runs CPU tensors).
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on(dev, *objs):
    """Tensors (also inside tuples) moved to dev; None stays None."""
    out = []
    for o in objs:
        if isinstance(o, tuple):
            out.append(tuple(t.to(dev) for t in o))
        else:
            out.append(None if o is None else o.to(dev))
    return out


CASES = [  # (out, in, K, label dtype, M, S, bias): odd shapes (row blocks of 4, 8-column steps with tails)
    (37, 53, 5, torch.uint8, 3, 3, "shared"),
    (17, 129, 256, torch.uint8, 1, 1, "none"),
    (29, 31, 300, torch.int16, 2, 64, "per_sample"),
    (5, 67, 1, torch.int32, 1, 3, "shared"),
    (33, 9, 1500, torch.int32, 4, 3, "none"),
    (22, 75, 40, torch.int8, 5, 20, "per_sample"),  # two 16-sample vectors, x rows in blocks of 2 and 1
    (12, 40, 9, torch.int64, 6, 33, "shared"),
    (13, 20, 50, torch.uint8, 2, 40, "none"),  # K > in: AVX-512 gathers three 16-sample vectors
]


@needs_native
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", CASES)
def test_native_matches_reference(case, mode):
    gen = torch.Generator().manual_seed(hash((case[:4], mode)) % 2**31)
    out_f, in_f, K, ldt, M, S, bk = case
    x, means, chol, labels, ell, outl, bias = _case(gen, out_f, in_f, K, ldt, M, S, bk)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    y = native.sws_linear_histogram_cpu(x, means, chol, labels, *ell, *outl, bias, seed, S, MODES[mode], 7, 3)
    assert y.shape == (S, M, out_f) and y.dtype == torch.float32
    yr, bound = _expected(x, means, chol, labels, ell, outl, bias, seed, S, mode)
    err = (y.double() - yr).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3g}"


@needs_native
@pytest.mark.parametrize("S", [16, 64])  # AVX-512: the sample-vector gather (S <= 32), the histogram (S > 32)
def test_native_deterministic_across_runs_and_threads(S):
    gen = torch.Generator().manual_seed(5)
    x, means, chol, labels, ell, outl, bias = _case(gen, 70, 300, 64, torch.uint8, 3, S, "shared")
    run = lambda: native.sws_linear_histogram_cpu(x, means, chol, labels, *ell, *outl, bias, 11, S, 0, 7, 3)
    before = native.max_threads()
    try:
        a, b = run(), run()
        native.set_num_threads(1)
        c = run()
    finally:
        native.set_num_threads(before)
    assert torch.equal(a, b) and torch.equal(a, c)


@needs_native
@pytest.mark.parametrize("S", [3, 11])
def test_native_scalar_fallback_matches_reference(S):
    """The portable path (no AVX2: scalar normals, product loop) against the reference too."""
    gen = torch.Generator().manual_seed(S)
    x, means, chol, labels, ell, outl, bias = _case(gen, 13, 41, 20, torch.uint8, 2, S, "shared")
    native.set_simd(False)
    try:
        y = native.sws_linear_histogram_cpu(x, means, chol, labels, *ell, *outl, bias, 21, S, 0, 7, 3)
    finally:
        native.set_simd(True)
    yr, bound = _expected(x, means, chol, labels, ell, outl, bias, 21, S, "paper")
    assert bool(((y.double() - yr).abs() <= bound).all())


@pytest.fixture
def simd_level(request, monkeypatch):
    """Run under a capped vector level (SWS_SIMD, read at set_simd(True)); the machine's best level after."""
    level = request.param
    monkeypatch.setenv("SWS_SIMD", level)
    native.set_simd(level != "scalar")
    yield level
    monkeypatch.delenv("SWS_SIMD")
    native.set_simd(True)


@needs_native
@pytest.mark.parametrize("simd_level", ["best", "avx2", "scalar"], indirect=True)
def test_dispatch_ratio_follows_the_vector_level(simd_level):
    """The rows-per-sample crossover in the dispatch table depends on the label pass the CPU runs: the AVX-512
    sample-vector gather pays up to 8 rows per sample, the scalar histogram (AVX2 / scalar machines) up to 2."""
    isa = native.simd_isa()
    assert isa in ("avx512", "avx2", "scalar") and (simd_level == "best" or isa == simd_level)
    want = _backend.LIMITS["histogram_rows_per_sample" if isa == "avx512" else "histogram_rows_per_sample_scalar"]
    S = 2
    rows = want.value * S
    ok = _backend.histogram("native_cpu", rows, S, 0, torch.float32, False, False)
    over = _backend.histogram("native_cpu", rows + 1, S, 0, torch.float32, False, False)
    assert ok[0] is not None and over[0] is None and str(want.value) in over[1]


@needs_native
@pytest.mark.parametrize("simd_level", ["best", "avx2", "scalar"], indirect=True)
@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[2]])
def test_native_every_simd_level_matches_reference(case, simd_level):
    """The level the machine picks (AVX-512: the sample-vector gather up to 32 samples, 16-lane Philox) and the
    forced lower levels (AVX2 histogram + product, 8-lane Philox; portable scalar) against the reference."""
    gen = torch.Generator().manual_seed(hash(case[:4]) % 2**31)
    out_f, in_f, K, ldt, M, S, bk = case
    x, means, chol, labels, ell, outl, bias = _case(gen, out_f, in_f, K, ldt, M, S, bk)
    for mode in MODES:
        y = native.sws_linear_histogram_cpu(x, means, chol, labels, *ell, *outl, bias, 77, S, MODES[mode], 7, 3)
        yr, bound = _expected(x, means, chol, labels, ell, outl, bias, 77, S, mode)
        err = (y.double() - yr).abs()
        assert bool((err <= bound).all()), f"{simd_level} {mode}: max error {err.max().item():.3g}"


@needs_native
def test_wide_normals_equal_avx2_normals(monkeypatch):
    """The AVX-512 bulk normals run the AVX2 operations on 16 lanes: the same floats (and both within the
    contract of the scalar path); on a machine without AVX-512 both calls take the same path."""
    if native.simd_level() != "avx2":
        pytest.skip("no vector path on this CPU")
    n, off = 5000, 123
    best = native.normal(31, n, 3, 9, 0, off)
    monkeypatch.setenv("SWS_SIMD", "avx2")
    native.set_simd(True)
    try:
        narrow = native.normal(31, n, 3, 9, 0, off)
    finally:
        monkeypatch.delenv("SWS_SIMD")
        native.set_simd(True)
    assert torch.equal(best, narrow)
    native.set_simd(False)
    try:
        scalar = native.normal(31, n, 3, 9, 0, off)
    finally:
        native.set_simd(True)
    assert (best - scalar).abs().max().item() < 2e-6


@needs_native
def test_native_rejects_bad_entries():
    gen = torch.Generator().manual_seed(9)
    x, means, chol, labels, ell, outl, bias = _case(gen, 6, 10, 4, torch.uint8, 2, 3, "none")
    twice = (outl[0].clone(), *outl[1:])
    twice[0][0] = ell[0][0]  # the outlier at the ellipse's position
    with pytest.raises(ValueError, match="appears twice"):
        native.sws_linear_histogram_cpu(x, means, chol, labels, *ell, *twice, bias, 1, 3, 0, 7, 3)
    far = (outl[0].clone(), *outl[1:])
    far[0][0] = 60  # n = 60
    with pytest.raises(ValueError, match="out of range"):
        native.sws_linear_histogram_cpu(x, means, chol, labels, *ell, *far, bias, 1, 3, 0, 7, 3)
    comp = (ell[0], ell[1].clone(), *ell[2:])
    comp[1][0] = 4
    with pytest.raises(ValueError, match="components"):
        native.sws_linear_histogram_cpu(x, means, chol, labels, *comp, *outl, bias, 1, 3, 0, 7, 3)


@needs_native
def test_native_entry_index_cache_follows_the_entries():
    """The per-thread cache of the entries' row index is exact: repeated calls, entries changed in place (same
    storage), and more layers than cached sets all match the reference."""
    gen = torch.Generator().manual_seed(13)
    layers = [_case(gen, 23, 37, 11, torch.uint8, 2, 5, "shared") for _ in range(6)]

    def check(case, seed):
        x, means, chol, labels, ell, outl, bias = case
        y = native.sws_linear_histogram_cpu(x, means, chol, labels, *ell, *outl, bias, seed, 5, 0, 7, 3)
        yr, bound = _expected(x, means, chol, labels, ell, outl, bias, seed, 5, "paper")
        assert bool(((y.double() - yr).abs() <= bound).all())

    for rnd in range(2):
        for i, case in enumerate(layers):
            check(case, 100 * rnd + i)
            check(case, 100 * rnd + i)
    x, means, chol, labels, ell, outl, bias = layers[0]
    free = [p for p in range(23 * 37) if p not in set(ell[0].tolist()) | set(outl[0].tolist())]
    outl[0][0] = free[0]  # in place: same pointers, other contents
    outl[1].mul_(-2.0)
    outl[2][-1] = 1.5
    ell[0][0] = free[1]
    check(layers[0], 7)


@needs_native
@pytest.mark.parametrize("ldt", [torch.int8, torch.int16])
@pytest.mark.parametrize("col,value", [(4, 7), (19, -1), (9, -3), (20, 7)])
def test_native_rejects_labels_out_of_range_in_the_loop(ldt, col, value):
    """int8/int16 labels are range-checked inside the AVX-512 gather's loop (8 at a time; tail one by one)."""
    gen = torch.Generator().manual_seed(10)
    x, means, chol, labels, ell, outl, bias = _case(gen, 9, 21, 7, ldt, 2, 5, "none")
    bad = labels.clone()
    bad[5, col] = value
    with pytest.raises(ValueError, match="outside"):
        native.sws_linear_histogram_cpu(x, means, chol, bad, *ell, *outl, bias, 1, 5, 0, 7, 3)


@needs_native
def test_native_rejects_what_it_cannot_do():
    gen = torch.Generator().manual_seed(6)
    x, means, chol, labels, ell, outl, bias = _case(gen, 6, 10, 4, torch.uint8, 2, 3, "none")
    with pytest.raises(ValueError, match="mode"):
        native.sws_linear_histogram_cpu(x, means, chol, labels, *ell, *outl, bias, 1, 3, 1, 7, 3)
    bad = labels.clone()
    bad[3, 4] = 4  # == K: outside [0, K)
    with pytest.raises(ValueError, match="outside"):
        native.sws_linear_histogram_cpu(x, means, chol, bad, *ell, *outl, bias, 1, 3, 0, 7, 3)


TRITON_CASES = [  # small: the interpreter's cost grows with programs x loop iterations
    (37, 53, 5, torch.uint8, 3, 3, "shared"),
    (19, 17, 40, torch.int16, 1, 64, "per_sample"),
    (5, 40, 1, torch.int32, 2, 1, "none"),
]


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference(case, monkeypatch):
    if not sws.backends()["triton"][0]:
        pytest.skip(sws.backends()["triton"][1])
    from sws_kernels.triton import histogram as th

    monkeypatch.setattr(th, "_MIN_PROGRAMS", 64)  # several column splits, as on a GPU (summed in a fixed order)

    gen = torch.Generator().manual_seed(hash(case[:4]) % 2**31)
    out_f, in_f, K, ldt, M, S, bk = case
    x, means, chol, labels, ell, outl, bias = _case(gen, out_f, in_f, K, ldt, M, S, bk)
    args = _on(DEV, x, means, chol, labels, ell, outl, bias)
    for mode in MODES:
        y = th.sws_linear_histogram(*args[:4], *args[4], *args[5], args[6], torch.tensor(99, device=DEV), S,
                                    MODES[mode], 7, 3).cpu()
        yr, bound = _expected(x, means, chol, labels, ell, outl, bias, 99, S, mode)
        err = (y.double() - yr).abs()
        assert bool((err <= bound).all()), f"{mode}: max error {err.max().item():.3g}"


def test_triton_bf16_activations():
    """bf16 x (the GPU's production dtype): y in bf16, within one bf16 rounding of the float64 reference."""
    if not sws.backends()["triton"][0]:
        pytest.skip(sws.backends()["triton"][1])
    from sws_kernels.triton import histogram as th

    gen = torch.Generator().manual_seed(12)
    x, means, chol, labels, ell, outl, bias = _case(gen, 23, 45, 30, torch.uint8, 2, 5, "shared")
    xb = x.bfloat16()
    a = _on(DEV, xb, means, chol, labels, ell, outl, bias)
    y = th.sws_linear_histogram(*a[:4], *a[4], *a[5], a[6], torch.tensor(4, device=DEV), 5, 0, 7, 3).cpu()
    assert y.dtype == torch.bfloat16
    yr, bound = _expected(xb.float(), means, chol, labels, ell, outl, bias, 4, 5, "paper")
    err = (y.double() - yr).abs()
    assert bool((err <= bound + 2.0 ** -7 * yr.abs()).all()), f"max error {err.max().item():.3g}"


# ---- dispatch ----------------------------------------------------------------------------------------------

@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the histogram kernels the dispatch hands out (the real kernels still run)."""
    calls = []
    for name, fn in list(_backend.HISTOGRAM_KERNELS.items()):
        def wrapped(*args, _fn=fn, _name=name):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setitem(_backend.HISTOGRAM_KERNELS, name, wrapped)
    return calls


def _backend_name():
    return "native" if native.AVAILABLE_CPU else "triton"


def test_dispatch_picks_histogram_only_without_autograd(spy):
    if _backend_name() == "triton" and not sws.backends()["triton"][0]:
        pytest.skip("no kernel backend")
    gen = torch.Generator().manual_seed(8)
    x, means, chol, labels, ell, outl, bias = _case(gen, 21, 35, 9, torch.uint8, 2, 4, "shared")
    dev = DEV if _backend_name() == "triton" else torch.device("cpu")
    x, means, chol, labels, ell, outl, bias = _on(dev, x, means, chol, labels, ell, outl, bias)
    kw = dict(seed=1234, samples=4, owner=7, codebook_owner=3)
    with sws.backend(_backend_name()):
        with torch.no_grad():
            y = F.sws_linear(x, means, chol, labels, ell, outl, bias, **kw)
        assert len(spy) == 1
        cpu = _on(torch.device("cpu"), x, means, chol, labels, ell, outl, bias)
        yr, bound = _expected(*cpu, 1234, 4, "paper")
        assert bool(((y.cpu().double() - yr).abs() <= bound).all())
        # grad enabled (training): today's path, and gradients flow
        m = means.clone().requires_grad_()
        y2 = F.sws_linear(x, m, chol, labels, ell, outl, bias, **kw)
        y2.sum().backward()
        assert len(spy) == 1 and m.grad is not None
        with torch.no_grad():
            F.sws_linear(x, means, chol, labels, ell, outl, bias, mode="hierarchical", **kw)  # a normal per weight
            F.sws_linear(x.expand(4, 2, 35), means, chol, labels, ell, outl, bias, per_sample=True, **kw)
            F.sws_linear(torch.randn(40, 35, device=dev), means, chol, labels, ell, outl, bias, **kw)  # 40 > 8 x 4
            F.sws_linear(x, means, chol, labels, ell, outl, bias, mode="mean", **kw)
        assert len(spy) == 2
    with sws.backend("reference"), torch.no_grad():
        F.sws_linear(x, means, chol, labels, ell, outl, bias, **kw)
    assert len(spy) == 2


def test_histogram_plan_reasons():
    k, why = _backend.histogram("native_cpu", 1, 16, 0, torch.float32, False, False)
    assert k is not None and "histogram" in why
    assert _backend.histogram("native_cpu", 1, 16, 0, torch.float32, False, True)[0] is None
    assert _backend.histogram("native_cpu", 1, 16, 1, torch.float32, False, False)[0] is None
    assert _backend.histogram("native_cpu", 1, 16, 0, torch.float32, True, False)[0] is None
    assert _backend.histogram("native_cpu", 1, 16, 0, torch.bfloat16, False, False)[0] is None
    assert _backend.histogram("native_cuda", 1, 16, 0, torch.float32, False, False)[0] is None
    big = _backend.LIMITS["cpu_histogram_max_m"].value + 1
    assert _backend.histogram("native_cpu", big, 10**6, 0, torch.float32, False, False)[0] is None


def test_predict_takes_the_histogram_path_in_the_first_layer(monkeypatch):
    """sws_kernels.predict folds S copies of x into the batch; the first layer's input is that folded tensor, so
    it makes one shared-x call (sample_mode's `shared`) and the dispatch can pick the histogram path."""
    if not native.AVAILABLE_CPU:
        pytest.skip("native CPU backend not built")
    from sws_kernels import nn as snn

    calls = []
    real = native.sws_linear_histogram_cpu_prepared

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "sws_linear_histogram_cpu_prepared", counting)
    gen = torch.Generator().manual_seed(3)
    cb = snn.Codebook(12)
    model = torch.nn.Sequential(snn.SWSLinear(40, 24, codebook=cb), torch.nn.ReLU(), snn.SWSLinear(24, 5, codebook=cb))
    x = torch.randn(2, 40, generator=gen)
    p = sws.predict(model, x, samples=16, seed=9)
    assert len(calls) == 1  # the first layer; the second sees per-sample activations
    with torch.no_grad(), snn.sample_mode(16, 9, batch=2):  # the same pass without `shared`: S identical slices
        q = model(x.repeat(16, 1)).reshape(16, 2, 5).softmax(-1)
    assert len(calls) == 1
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
