"""The layers' steady-state path (sws_kernels/_bound.py) against the general functional path.

``sws_kernels.validate()`` makes every layer take the general path (every check on every call), so the same
layer, seed and input run once each way: outputs and every gradient must be bit for bit the same (the same
kernels with the same arguments), on every backend this machine has. Then the binding's invalidation: an
in-place edit of an index tensor, a ``.data`` replacement, a new buffer and load_state_dict each rebuild it,
and bad index data is still refused.
"""
import copy

import pytest
import torch

import sws_kernels as sws
from sws_kernels import _bound, native
from sws_kernels import nn as snn

BACKENDS = ["auto"] + (["triton"] if sws.backends()["triton"][0] else [])
# Triton runs on the GPU where there is one (the interpreter runs CPU tensors); the native backends on the CPU.
TRITON_DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dev(backend):
    return TRITON_DEV if backend == "triton" else torch.device("cpu")


def _sws_layer(kind, rng, K=7, mode="paper", specials=True):
    cb = snn.Codebook(K, means=torch.randn(K, 2, generator=rng) * torch.tensor([0.3, 0.5]) + torch.tensor([0, -4.0]))
    if kind == "linear":
        shape, layer_args = (5, 13), (13, 5)
        make = lambda **kw: snn.SWSLinear(*layer_args, codebook=cb, mode=mode, **kw)  # noqa: E731
    else:
        shape = (4, 3, 3, 3) if kind == "conv2d" else (4, 3, 3)
        make = lambda **kw: (snn.SWSConv2d if kind == "conv2d" else snn.SWSConv1d)(  # noqa: E731
            3, 4, 3, padding=1, codebook=cb, mode=mode, **kw)
    n = int(torch.tensor(shape).prod())
    labels = torch.randint(0, K, shape, generator=rng)
    kw = dict(labels=labels)
    if specials:
        perm = torch.randperm(n, generator=rng)
        e_pos, o_pos = perm[:4].sort().values, perm[4:7].sort().values
        kw["ellipse"] = (e_pos, torch.randint(0, K, (4,), generator=rng), torch.randint(0, K, (4,), generator=rng),
                         torch.rand(4, generator=rng))
        kw["outliers"] = (o_pos, torch.randn(3, generator=rng) * 0.3, torch.randn(3, generator=rng) - 4)
    return make(**kw)


def _x(kind, rng, M, S=1, per_sample=False):
    lead = (S,) if per_sample else ()
    if kind == "linear":
        return torch.randn(*lead, M, 13, generator=rng)
    spatial = (6, 5) if kind == "conv2d" else (7,)
    return torch.randn(*lead, M, 3, *spatial, generator=rng)


def _run(layer, x, S, seed, per_sample, grad):
    params = [p for p in layer.parameters()]
    for p in params:
        p.grad = None
    xx = x.clone().requires_grad_(grad is True)
    kw = dict(samples=S, seed=seed, per_sample=per_sample) if S else dict(seed=seed)
    if grad:
        out = layer(xx, **kw)
        out = out[0] if isinstance(out, tuple) else out
        (out * torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)).sum().backward()
        return [out.detach(), xx.grad] + [p.grad for p in params]
    with torch.no_grad():
        out = layer(xx, **kw)
        return [out[0] if isinstance(out, tuple) else out]


def _same(fast, general):
    assert len(fast) == len(general)
    for a, b in zip(fast, general):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert torch.equal(a, b), (a - b).abs().max()


def _both(layer, x, S, seed, per_sample, grad):
    fast = _run(layer, x, S, seed, per_sample, grad)
    with sws.validate():
        general = _run(layer, x, S, seed, per_sample, grad)
    return fast, general


SHAPES = [(1, None, False), (3, 2, False), (2, 3, True), (40, 1, False),  # M = 40: past the fused paths' limit
          (1, 3, False), (1, 2, True)]  # one row per sample: the one-call backward (csrc/cpu/layer.cpp)
SWS_CASES = ([("auto", "linear", mode, *shape) for mode in ("paper", "hierarchical", "mean") for shape in SHAPES]
             + [("auto", kind, mode, *shape) for kind in ("conv1d", "conv2d") for mode in ("paper", "hierarchical")
                for shape in SHAPES[:3]]
             + [(b, "linear", "paper", *shape) for b in BACKENDS[1:] for shape in SHAPES]
             + [(b, kind, "mean", 2, 3, True) for b in BACKENDS[1:] for kind in ("linear", "conv2d")])


@pytest.mark.parametrize("backend,kind,mode,M,S,per_sample", SWS_CASES)
def test_sws_layers_match_the_general_path(rng, backend, kind, mode, M, S, per_sample):
    layer = _sws_layer(kind, rng, mode=mode).to(_dev(backend))
    x = _x(kind, rng, M, S or 1, per_sample).to(_dev(backend))
    seed = int(torch.randint(0, 2 ** 62, (), generator=rng))
    with sws.backend(backend):
        for grad in (False, True, "params"):  # "params": x without grad (one-row backward on the CPU)
            _same(*_both(layer, x, S, seed, per_sample, grad))
        # a tensor seed (what seed=None draws) gives the same numbers as the int
        _same(_run(layer, x, S, torch.tensor(seed), per_sample, True), _run(layer, x, S, seed, per_sample, True))
    assert "_sws_binding" in layer.__dict__  # the fast path really ran


MF_CASES = ([("auto", kind, *shape, bias) for kind in ("linear", "conv1d", "conv2d") for shape in SHAPES[:3]
             for bias in (True, False)]
            + [("auto", "linear", *shape, bias) for shape in SHAPES[4:] for bias in (True, False)]
            + [(b, "linear", *shape, True) for b in BACKENDS[1:] for shape in SHAPES[:3]])


@pytest.mark.parametrize("backend,kind,M,S,per_sample,bias", MF_CASES)
def test_mean_field_layers_match_the_general_path(rng, backend, kind, M, S, per_sample, bias):
    if kind == "linear":
        layer = snn.MeanFieldLinear(13, 5, bias=bias)
    else:
        layer = (snn.MeanFieldConv2d if kind == "conv2d" else snn.MeanFieldConv1d)(3, 4, 3, padding=1, bias=bias)
    layer = layer.to(_dev(backend))
    x = _x(kind, rng, M, S or 1, per_sample).to(_dev(backend))
    seed = int(torch.randint(0, 2 ** 62, (), generator=rng))
    with sws.backend(backend):
        for grad in (False, True, "params"):  # "params": x without grad (one-row backward on the CPU)
            _same(*_both(layer, x, S, seed, per_sample, grad))
    if backend == "auto" and native.AVAILABLE_CPU:
        assert "_mf_binding" in layer.__dict__


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_mean_field_output_and_kl_in_one_node_match_two(rng, bias, x_grad):
    """bayesian-torch's default call ``out, kl = layer(x)`` with grad runs one autograd node for both
    (_bound._MFLinearKLFn); its gradients of a loss of both are those of the separate output and KL nodes, bit
    for bit, including into gradients that accumulate."""
    layer = snn.MeanFieldLinear(9, 4, prior_mean=0.1, prior_variance=0.4, bias=bias)
    x = torch.randn(1, 9, generator=rng)
    seed = int(torch.randint(0, 2 ** 62, (), generator=rng))
    params = list(layer.parameters())

    def step(fused):
        xx = x.clone().requires_grad_(x_grad)
        if fused:
            out, kl = layer(xx, seed=seed)
            assert out.grad_fn is kl.grad_fn  # one node
        else:
            out, kl = layer(xx, return_kl=False, seed=seed), layer.kl_loss()
        ((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum() + 0.7 * kl).backward()
        return [out.detach(), kl.detach(), xx.grad] + [p.grad.clone() for p in params]

    for p in params:
        p.grad = torch.full_like(p, 0.3)
    one = step(True) + step(True)  # the second accumulates into the first's gradients
    for p in params:
        p.grad = torch.full_like(p, 0.3)
    two = step(False) + step(False)
    _same(one, two)
    # a loss of the output alone, and of the KL alone (the other output's gradient is None)
    for p in params:
        p.grad = None
    out, kl = layer(x, seed=seed)
    kl.backward()
    by_kl = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    layer.kl_loss().backward()
    _same(by_kl, [p.grad for p in params])


def test_mean_field_kl_is_reused_only_while_unchanged():
    layer = snn.MeanFieldLinear(6, 4)
    x = torch.randn(2, 6)
    with torch.no_grad():
        _, k1 = layer(x)
        _, k2 = layer(x)
        assert torch.equal(k1, k2) and k1 is not k2
        k2.add_(1)  # the caller's copy: the cache is untouched
        assert torch.equal(layer(x)[1], k1)
        layer.mu_weight.add_(0.5)  # an in-place update (what an optimiser does)
        _, k3 = layer(x)
        layer.prior_weight_sigma.fill_(0.5)
        _, k4 = layer(x)
    with sws.validate():  # the general formula: the same value to float32 rounding (native sums in double)
        torch.testing.assert_close(layer(x)[1].detach(), k4, rtol=2e-6, atol=0)
    assert not torch.equal(k3, k1) and not torch.equal(k4, k3)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_mean_field_kl_with_grad_matches_the_reference(rng, bias, kind):
    if kind == "linear":
        layer = snn.MeanFieldLinear(37, 11, prior_mean=0.1, prior_variance=0.3, bias=bias)
    else:
        layer = snn.MeanFieldConv2d(3, 5, 3, prior_variance=0.7, bias=bias)
    with torch.no_grad():  # fresh random parameters, not the init's
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.5 + (-3.0 if "rho" in _name(layer, p) else 0.0))
    params = list(layer.parameters())
    kl = layer.kl_loss()
    assert kl.grad_fn is not None
    fast = torch.autograd.grad(kl * 3.0, params)
    with sws.validate():
        general = layer.kl_loss()
        slow = torch.autograd.grad(general * 3.0, params)
    # float64 reference of the same formula
    ref = sum(sws.reference.kl_gaussian_mean(mu.double(), rho.double(), pm.double(), ps.double())
              for mu, rho, pm, ps in _pairs(layer))
    torch.testing.assert_close(kl.double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(general.detach(), kl.detach(), rtol=2e-6, atol=0)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _name(layer, p):
    return next(n for n, q in layer.named_parameters() if q is p)


def _pairs(layer):
    out = [(layer.weight_mu, layer.weight_rho, layer.prior_weight_mu, layer.prior_weight_sigma)]
    if layer.mu_bias is not None:
        out.append((layer.mu_bias, layer.rho_bias, layer.prior_bias_mu, layer.prior_bias_sigma))
    return [tuple(t.detach() for t in pair) for pair in out]


def test_binding_follows_optimizer_steps_and_in_place_edits(rng):
    layer = _sws_layer("linear", rng)
    x = _x("linear", rng, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):  # parameters updated in place: the binding stays, the kernels read the new values
        out = layer(x, seed=11)
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            fast = layer(x, seed=11)
            with sws.validate():
                assert torch.equal(fast, layer(x, seed=11))
    b = layer.__dict__["_sws_binding"]
    with torch.no_grad():
        layer.labels[0, 0] = (int(layer.labels[0, 0]) + 1) % 7  # an in-place index edit: rebuilt
        fast = layer(x, seed=11)
        assert layer.__dict__["_sws_binding"] is not b
        with sws.validate():
            assert torch.equal(fast, layer(x, seed=11))
        layer.labels[0, 1] = 99  # out of range: the rebuild's data check refuses it
        with pytest.raises(ValueError, match="labels"):
            layer(x, seed=11)
        layer.labels[0, 1] = 0
        # a .data replacement of a parameter (same object, new address) rebuilds the binding too
        layer.codebook.means.data = layer.codebook.means.data.clone() + 0.01
        fast = layer(x, seed=11)
        with sws.validate():
            assert torch.equal(fast, layer(x, seed=11))


def test_binding_after_load_state_dict_and_deepcopy(rng):
    a = _sws_layer("linear", rng)
    b = copy.deepcopy(a)
    x = _x("linear", rng, 3)
    with torch.no_grad():
        a(x, seed=2)
        b(x, seed=2)
        state = {k: v.clone() for k, v in a.state_dict().items()}
        state["labels"] = torch.randint(0, 7, state["labels"].shape, generator=rng).to(state["labels"].dtype)
        state["codebook.means"] = state["codebook.means"] + 0.1
        a.load_state_dict(state)
        fast = a(x, seed=2)
        with sws.validate():
            assert torch.equal(fast, a(x, seed=2))
        assert not torch.equal(fast, b(x, seed=2))  # the copy kept its own binding and state


def test_general_path_still_reports_bad_inputs(rng):
    layer = _sws_layer("linear", rng)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(2, 12))
    with pytest.raises(TypeError, match="x"):
        layer(torch.ones(2, 13, dtype=torch.int64))
    mf = snn.MeanFieldLinear(13, 5)
    with pytest.raises(ValueError, match="x"):
        mf(torch.randn(2, 12))


def test_clear_drops_bindings(rng):
    layer = _sws_layer("linear", rng)
    layer(_x("linear", rng, 1))
    _bound.clear(layer)
    assert "_sws_binding" not in layer.__dict__


def test_threads_sharing_one_layer_each_get_their_own_seed(rng):
    """The native bundle's per-call fields (seed, samples) are shared by every call of a layer: concurrent calls
    from several threads must each launch with their own seed (numpy-style races would mix them silently)."""
    import threading

    layer = _sws_layer("linear", rng)
    mf = snn.MeanFieldLinear(13, 5)
    x = _x("linear", rng, 3)
    with torch.no_grad():
        want = {s: (layer(x, seed=s, samples=2), mf(x, seed=s, samples=2)[0]) for s in range(8)}
    bad = []

    def work(s):
        with torch.no_grad():
            for _ in range(200):
                a, b = layer(x, seed=s, samples=2), mf(x, seed=s, samples=2)[0]
                if not (torch.equal(a, want[s][0]) and torch.equal(b, want[s][1])):
                    bad.append(s)
                    return

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


@pytest.mark.skipif(not native.AVAILABLE_CPU, reason="native CPU module not built")
def test_bundle_follows_storage_that_moves_away_and_back(rng):
    """A forward launch skips the address re-read after the binding's own check (its addresses unchanged since
    the bundle was built) -- unless a launch ever re-pointed the bundle: storage that moved (a backward after an
    FSDP2 reshard) and came back to the binding's addresses would pass the check while the bundle pointed at the
    intermediate storage."""
    layer = _sws_layer("linear", rng)
    x = _x("linear", rng, 1)
    with torch.no_grad():
        layer(x, seed=1)
    p = layer._sws_binding.prep
    means = layer.codebook.means
    home = means.data
    assert p.refresh(True).means == home.data_ptr() and not p.moved
    means.data = home.clone()  # moved: a launch that re-reads addresses re-points the bundle
    assert p.refresh().means == means.data_ptr() != home.data_ptr() and p.moved
    means.data = home  # back home: the binding's addresses match again
    assert p.refresh(True).means == home.data_ptr()  # re-read although "checked": the bundle had moved
    _same(*_both(layer, x, None, 3, False, False))  # and the launch reads the right memory


@pytest.mark.parametrize("kind", ["sws", "mf"])
def test_storage_moved_between_forward_and_backward(rng, kind):
    """FSDP2 frees a layer's parameters after its forward and gathers them into new memory before its backward:
    the backward must launch at the parameters' current addresses (stale ones read freed memory)."""
    layer = _sws_layer("linear", rng) if kind == "sws" else snn.MeanFieldLinear(13, 5)
    x = _x("linear", rng, 3)
    weights = torch.linspace(-1, 1, 2 * 3 * 5).view(2, 3, 5)

    def grads(move):
        for p in layer.parameters():
            p.grad = None
        out = layer(x, samples=2, seed=4)
        out = out[0] if isinstance(out, tuple) else out
        if move:
            for p in layer.parameters():
                p.data = p.data.clone()  # same values, new storage; the old one is freed
            junk = [torch.full((64,), float("nan")) for _ in range(64)]  # reuse the freed blocks  # noqa: F841
        (out * weights).sum().backward()
        return [p.grad.clone() for p in layer.parameters()]

    _same(grads(True), grads(False))
