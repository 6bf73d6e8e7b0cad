"""reconstruct through the public API and the op catalogue, on every available backend, vs the reference."""
import math

import pytest
import torch

import sws_kernels as sws
from sws_kernels import _ops, native
from sws_kernels import functional as F
from sws_kernels import reference as R

MODES = ("paper", "hierarchical", "mean")

BACKENDS = ["reference"] + (["native"] if native.AVAILABLE_CPU else [])


def layer(rng, shape, K, E, O, label_dtype=torch.int16):
    n = math.prod(shape)
    means = torch.randn(K, 2, generator=rng) * torch.tensor([0.1, 1.0]) - torch.tensor([0.0, 3.0])
    chol = torch.randn(K, 3, generator=rng) * 0.5 - torch.tensor([2.0, 0.0, 2.0])
    labels = torch.randint(0, K, shape, generator=rng).to(label_dtype)
    pos = torch.randperm(n, generator=rng)[: E + O]
    e = (pos[:E], torch.randint(0, K, (E,), generator=rng), torch.randint(0, K, (E,), generator=rng),
         torch.rand(E, generator=rng)) if E else None
    o = (pos[E:], torch.randn(O, generator=rng) * 0.3, torch.randn(O, generator=rng) - 3) if O else None
    return means, chol, labels, e, o


def f64(t):
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(f64(x) for x in t)
    return t.double() if t.dtype.is_floating_point else t


CASES = [  # shape, K, E, O, S, label dtype
    ((13, 7), 1, 0, 0, 1, torch.uint8),
    ((13, 7), 5, 3, 2, 7, torch.int8),
    ((3, 5, 3, 3), 300, 4, 5, 3, torch.int16),
    ((1001,), 40, 17, 9, 2, torch.int32),
    ((6, 11), 9, 0, 6, 4, torch.int64),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-K{c[1]}-E{c[2]}-O{c[3]}-S{c[4]}-{c[5]}")
def test_forward_and_grads_match_reference(rng, backend, mode, case):
    shape, K, E, O, S, ldt = case
    means, chol, labels, e, o = layer(rng, shape, K, E, O, ldt)
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 4 + 3
    kw = dict(seed=seed, samples=S, mode=mode, owner=12345, codebook_owner=2**32 - 7)
    params = [t.clone().requires_grad_() for t in (means, chol)]
    o_par = None if o is None else [o[1].clone().requires_grad_(), o[2].clone().requires_grad_()]
    with sws.backend(backend):
        W = F.reconstruct(params[0], params[1], labels, e, None if o is None else (o[0], *o_par), **kw)
    assert W.shape == (S, *shape) and W.dtype == torch.float32
    # reference in float64 on the same (float32) noise: the kernel's error is fp32 rounding plus the 1e-5
    # the contract allows normals to differ by (transcendental ulps)
    want = R.reconstruct(*f64((means, chol)), labels, f64(e), f64(o), **kw)
    torch.testing.assert_close(W.double(), want, rtol=1e-5, atol=1e-5)

    g = torch.randn(W.shape, generator=rng)
    grads = torch.autograd.grad(W, params + (o_par or []), g, allow_unused=True)  # mean mode: chol unused
    want_g = R.reconstruct_backward(g.double(), *f64((means, chol)), labels, f64(e), f64(o), **kw)
    scale = g.abs().sum().item() / max(K, 1)  # typical magnitude of one segmented sum
    for got, ref, name in zip(grads, want_g, ("means", "chol", "mu_o", "rho_o")):
        got = torch.zeros_like(ref) if got is None else got
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5 * max(1.0, scale), msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_same_seed_bit_identical(rng, backend, mode):
    means, chol, labels, e, o = layer(rng, (37, 29), 50, 11, 7)
    kw = dict(seed=99, samples=3, mode=mode)
    outs = []
    for _ in range(2):
        p = [means.clone().requires_grad_(), chol.clone().requires_grad_(), o[1].clone().requires_grad_(),
             o[2].clone().requires_grad_()]
        with sws.backend(backend):
            W = F.reconstruct(p[0], p[1], labels, e, (o[0], p[2], p[3]), **kw)
        W.backward(torch.ones_like(W))
        outs.append([W.detach()] + [torch.zeros(0) if t.grad is None else t.grad for t in p])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _op_args(rng, mode, K=6):
    means, chol, labels, e, o = layer(rng, (5, 9), K, 3, 2)
    a = sws._checks.sws(means.requires_grad_(), chol.requires_grad_(), labels, e,
                        (o[0], o[1].requires_grad_(), o[2].requires_grad_()), 2**64 - 3, 3, mode, 4, 8)
    return (a.means, a.chol, a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu, a.o_rho,
            sws.philox.seed_tensor(a.seed, a.means.device), a.samples, sws._checks.MODE_CODES[mode], a.owner, a.codebook_owner)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_reconstruct(rng, backend, mode):
    args = _op_args(rng, mode)
    with sws.backend(backend):
        torch.library.opcheck(torch.ops.sws_kernels.reconstruct.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_reconstruct_backward(rng, backend):
    args = _op_args(rng, "hierarchical")
    grad = torch.randn(args[11], *args[2].shape, generator=rng)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    with sws.backend(backend):
        torch.library.opcheck(torch.ops.sws_kernels.reconstruct_backward.default, (grad,) + detached)


def test_op_under_torch_compile(rng):
    means, chol, labels, e, o = layer(rng, (8, 6), 4, 2, 2)

    def f(m, c):
        return F.reconstruct(m, c, labels, e, o, seed=5, samples=2, mode="hierarchical").sum(0)

    want = f(means, chol)
    got = torch.compile(f, fullgraph=True)(means, chol)
    torch.testing.assert_close(got, want)


def test_seed_as_tensor(rng):
    means, chol, labels, e, o = layer(rng, (4, 4), 3, 1, 1)
    a = F.reconstruct(means, chol, labels, e, o, seed=torch.tensor(-5), samples=2, mode="hierarchical")
    b = F.reconstruct(means, chol, labels, e, o, seed=2**64 - 5, samples=2, mode="hierarchical")
    assert torch.equal(a, b)


def test_auto_picks_native_for_fp32_cpu_and_reference_for_fp64():
    from sws_kernels import _backend
    name, _, _ = _backend.select("reconstruct", torch.device("cpu"), torch.float32)
    assert name == ("native_cpu" if native.AVAILABLE_CPU else "reference")
    name, _, why = _backend.select("reconstruct", torch.device("cpu"), torch.float64)
    assert name == "reference" and (not native.AVAILABLE_CPU or "dtype" in why)


@pytest.mark.skipif(not native.AVAILABLE_CPU, reason=f"native CPU module: {native.CPU_REASON}")
def test_forced_native_rejects_float64(rng):
    means, chol, labels, e, o = layer(rng, (4, 4), 3, 0, 0)
    with sws.backend("native"), pytest.raises(TypeError, match="float64"):
        F.reconstruct(means.double(), chol.double(), labels, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_before_any_kernel(rng, backend):
    means, chol, labels, e, o = layer(rng, (4, 4), 3, 0, 0)
    with sws.backend(backend):
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
