"""The pure-PyTorch reference against the spec's formulas, autograd's gradcheck and bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

import sws_kernels as sws
from sws_kernels import philox
from sws_kernels import reference as R

MODES = ("paper", "hierarchical", "mean")
D = torch.float64


def sp(x):
    return math.log1p(math.exp(x)) if x <= 20 else x


def make_layer(rng, shape, K, E=0, O=0, dtype=D, label_dtype=torch.int16):
    """Fresh random SWS parameters with E ellipse and O outlier positions (disjoint)."""
    n = math.prod(shape)
    means = torch.randn(K, 2, generator=rng, dtype=dtype) * torch.tensor([0.1, 1.0], dtype=dtype)
    means[:, 1] -= 3
    chol = torch.randn(K, 3, generator=rng, dtype=dtype) * 0.5 - torch.tensor([2.0, 0.0, 2.0], dtype=dtype)
    labels = torch.randint(0, K, shape, generator=rng).to(label_dtype)
    pos = torch.randperm(n, generator=rng)[: E + O]
    ellipse = outliers = None
    if E:
        ellipse = (pos[:E], torch.randint(0, K, (E,), generator=rng), torch.randint(0, K, (E,), generator=rng),
                   torch.rand(E, generator=rng, dtype=dtype))
    if O:
        outliers = (pos[E:], torch.randn(O, generator=rng, dtype=dtype) * 0.3,
                    torch.randn(O, generator=rng, dtype=dtype) - 3)
    return means, chol, labels, ellipse, outliers


def loop_reconstruct(means, chol, labels, ellipse, outliers, seed, S, mode, owner, cb_owner):
    """SPEC.md section 3 read literally, one weight at a time (independent of reference.py)."""
    K, n = means.shape[0], labels.numel()
    lab = labels.reshape(-1).tolist()
    out = torch.empty(S, n, dtype=D)
    e_map = {} if ellipse is None else {int(p): (int(a), int(b), float(al)) for p, a, b, al in zip(*ellipse)}
    o_map = {} if outliers is None else {int(p): (float(m), float(r)) for p, m, r in zip(*outliers)}
    for s in range(S):
        xi = philox.normal(seed, 2 * K, sample=s, owner=cb_owner, purpose=1).double().view(K, 2)
        eps = philox.normal(seed, n, sample=s, owner=owner, purpose=0).double()
        z = []
        for k in range(K):
            m_mu, m_rho = means[k].tolist()
            a, b, c = chol[k].tolist()
            z.append((m_mu + sp(a) * xi[k, 0].item(), m_rho + b * xi[k, 0].item() + sp(c) * xi[k, 1].item()))
        for i in range(n):
            if i in o_map:
                mu, rho = o_map[i]
                out[s, i] = mu if mode == "mean" else mu + sp(rho) * eps[i].item()
            elif i in e_map:
                a, b, al = e_map[i]
                if mode == "mean":
                    out[s, i] = al * means[a, 0].item() + (1 - al) * means[b, 0].item()
                else:
                    v = al * z[a][0] + (1 - al) * z[b][0]
                    if mode == "hierarchical":
                        v += (al * sp(z[a][1]) + (1 - al) * sp(z[b][1])) * eps[i].item()
                    out[s, i] = v
            else:
                c = lab[i]
                if mode == "mean":
                    out[s, i] = means[c, 0].item()
                elif mode == "paper":
                    out[s, i] = z[c][0]
                else:
                    out[s, i] = z[c][0] + sp(z[c][1]) * eps[i].item()
    return out.view(S, *labels.shape)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,K,E,O,S", [((5, 7), 4, 3, 2, 3), ((3, 2, 3, 3), 1, 0, 2, 1), ((13,), 6, 2, 0, 7)])
def test_reconstruct_matches_spec_loop(rng, mode, shape, K, E, O, S):
    means, chol, labels, ellipse, outliers = make_layer(rng, shape, K, E, O)
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 3
    got = R.reconstruct(means, chol, labels, ellipse, outliers, seed=seed, samples=S, mode=mode, owner=11,
                        codebook_owner=4)
    want = loop_reconstruct(means, chol, labels, ellipse, outliers, seed, S, mode, 11, 4)
    assert got.shape == (S, *shape) and got.dtype == D
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sample_components_definition(rng):
    means, chol, *_ = make_layer(rng, (3,), 5)
    z = R.sample_components(means, chol, seed=12, samples=4, codebook_owner=2)
    xi = philox.normal(12, 10, sample=torch.arange(4), owner=2, purpose=1).double().view(4, 5, 2)
    L = torch.zeros(5, 2, 2, dtype=D)
    L[:, 0, 0], L[:, 1, 0], L[:, 1, 1] = F.softplus(chol[:, 0]), chol[:, 1], F.softplus(chol[:, 2])
    want = means + torch.einsum("kij,skj->ski", L, xi)
    torch.testing.assert_close(z, want)


def test_paper_mode_moments():
    """Inliers of one component share one value per sample; over samples it is N(m_mu, softplus(a)^2)."""
    means = torch.tensor([[0.3, -2.0], [-0.1, -4.0]], dtype=D)
    chol = torch.tensor([[math.log(math.expm1(0.5)), 0.2, -1.0], [0.0, 0.0, 0.0]], dtype=D)
    labels = torch.tensor([0, 0, 1, 0], dtype=torch.uint8)
    W = R.reconstruct(means, chol, labels, seed=1, samples=20000)
    assert torch.equal(W[:, 0], W[:, 1]) and torch.equal(W[:, 0], W[:, 3])
    assert abs(W[:, 0].mean() - 0.3) < 5 * 0.5 / math.sqrt(20000)
    assert abs(W[:, 0].std() - 0.5) < 0.02


def test_hierarchical_per_weight_noise():
    means = torch.tensor([[0.0, -1.0]], dtype=D)
    chol = torch.tensor([[-30.0, 0.0, -30.0]], dtype=D)  # L ~ 0: z = means
    labels = torch.zeros(50000, dtype=torch.int32)
    W = R.reconstruct(means, chol, labels, seed=3, samples=1, mode="hierarchical")
    assert abs(W.std().item() - sp(-1.0)) < 0.01
    assert abs(W.mean().item()) < 0.01


def test_mean_mode_ignores_seed(rng):
    layer = make_layer(rng, (4, 6), 3, 2, 2)
    a = R.reconstruct(*layer, seed=1, samples=2, mode="mean")
    b = R.reconstruct(*layer, seed=2, samples=2, mode="mean")
    assert torch.equal(a, b) and torch.equal(a[0], a[1])


def test_same_seed_same_output_different_seed_differs(rng):
    layer = make_layer(rng, (4, 6), 3, 2, 2)
    for mode in ("paper", "hierarchical"):
        a = R.reconstruct(*layer, seed=5, samples=3, mode=mode)
        assert torch.equal(a, R.reconstruct(*layer, seed=5, samples=3, mode=mode))
        assert not torch.equal(a, R.reconstruct(*layer, seed=6, samples=3, mode=mode))
        assert not torch.equal(a[0], a[1])


def test_label_dtypes_agree(rng):
    means, chol, labels, e, o = make_layer(rng, (6, 5), 7, 2, 1)
    ref = R.reconstruct(means, chol, labels.long(), e, o, seed=8, samples=2, mode="hierarchical")
    for dt in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert torch.equal(R.reconstruct(means, chol, labels.to(dt), e, o, seed=8, samples=2, mode="hierarchical"),
                           ref)


# ---------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("K,S", [(1, 1), (4, 7)])
def test_gradcheck_reconstruct(rng, mode, K, S):
    means, chol, labels, e, o = make_layer(rng, (3, 5), K, 2, 2)
    o_pos = o[0]

    def f(m, c, mu, rho):
        return R.reconstruct(m, c, labels, e, (o_pos, mu, rho), seed=77, samples=S, mode=mode, owner=3,
                             codebook_owner=1)

    inputs = [t.clone().requires_grad_() for t in (means, chol, o[1], o[2])]
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("mode", MODES)
def test_explicit_backward_matches_autograd(rng, mode):
    means, chol, labels, e, o = make_layer(rng, (9, 11), 6, 5, 4)
    params = [t.clone().requires_grad_() for t in (means, chol, o[1], o[2])]
    W = R.reconstruct(params[0], params[1], labels, e, (o[0], params[2], params[3]), seed=2**64 - 1, samples=7,
                      mode=mode, owner=2**32 - 1, codebook_owner=9)
    g = torch.randn(W.shape, generator=rng, dtype=D)
    auto = torch.autograd.grad(W, params, g, allow_unused=True)
    mine = R.reconstruct_backward(g, means, chol, labels, e, o, seed=2**64 - 1, samples=7, mode=mode,
                                  owner=2**32 - 1, codebook_owner=9)
    for a, b in zip(auto, mine):
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b)


def test_gradcheck_sample_components(rng):
    means, chol, *_ = make_layer(rng, (3,), 3)
    f = lambda m, c: R.sample_components(m, c, seed=4, samples=3)  # noqa: E731
    assert torch.autograd.gradcheck(f, (means.requires_grad_(), chol.requires_grad_()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck_sws_linear(rng, mode, per_sample):
    means, chol, labels, e, o = make_layer(rng, (5, 3), 4, 1, 2)
    S = 3
    x = torch.randn(*((S,) if per_sample else ()), 2, 4, 3, generator=rng, dtype=D)
    bias = torch.randn(5, generator=rng, dtype=D)

    def f(x, m, c, mu, rho, b):
        return R.sws_linear(x, m, c, labels, e, (o[0], mu, rho), b, seed=9, samples=S, mode=mode,
                            per_sample=per_sample)

    inputs = [t.clone().requires_grad_() for t in (x, means, chol, o[1], o[2], bias)]
    y = f(*inputs)
    assert y.shape == (S, 2, 4, 5)
    assert torch.autograd.gradcheck(f, inputs)


def test_sws_linear_is_x_wt_plus_b(rng):
    means, chol, labels, e, o = make_layer(rng, (6, 4), 3, 1, 1)
    x = torch.randn(7, 4, generator=rng, dtype=D)
    b = torch.randn(6, generator=rng, dtype=D)
    W = R.reconstruct(means, chol, labels, e, o, seed=1, samples=2)
    y = R.sws_linear(x, means, chol, labels, e, o, b, seed=1, samples=2)
    for s in range(2):
        torch.testing.assert_close(y[s], F.linear(x, W[s], b))


@pytest.mark.parametrize("conv,spatial,kw", [
    ("sws_conv2d", 2, dict(stride=2, padding=1, dilation=1, groups=2)),
    ("sws_conv2d", 2, dict(stride=1, padding=(0, 2), dilation=2, groups=1)),
    ("sws_conv1d", 1, dict(stride=2, padding=1, dilation=1, groups=1)),
])
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck_sws_conv(rng, conv, spatial, kw, per_sample):
    S, cin, cout = 2, 4, 6
    wshape = (cout, cin // kw["groups"]) + (3,) * spatial
    means, chol, labels, e, o = make_layer(rng, wshape, 3, 2, 2)
    x = torch.randn(*((S,) if per_sample else ()), 2, cin, *(7,) * spatial, generator=rng, dtype=D)
    bias = torch.randn(cout, generator=rng, dtype=D)
    fn = getattr(R, conv)
    ref_conv = F.conv2d if spatial == 2 else F.conv1d

    def f(x, m, c, mu, rho, b):
        return fn(x, m, c, labels, e, (o[0], mu, rho), b, seed=5, samples=S, mode="hierarchical",
                  per_sample=per_sample, **kw)

    inputs = [t.clone().requires_grad_() for t in (x, means, chol, o[1], o[2], bias)]
    y = f(*inputs)
    W = R.reconstruct(means, chol, labels, e, o, seed=5, samples=S, mode="hierarchical")
    for s in range(S):
        torch.testing.assert_close(y[s].detach(), ref_conv(x[s] if per_sample else x, W[s], bias, **kw))
    assert torch.autograd.gradcheck(f, inputs)


def test_mean_field_reconstruct_definition(rng):
    mu = torch.randn(3, 5, generator=rng, dtype=D)
    rho = torch.randn(3, 5, generator=rng, dtype=D) - 2
    w = R.mean_field_reconstruct(mu, rho, seed=21, samples=4, owner=6)
    eps = philox.normal(21, 15, sample=torch.arange(4), owner=6, purpose=0).double().view(4, 3, 5)
    torch.testing.assert_close(w, mu + F.softplus(rho) * eps)


@pytest.mark.parametrize("bias_rho", [False, True])
def test_gradcheck_mean_field_linear(rng, bias_rho):
    mu = torch.randn(4, 3, generator=rng, dtype=D)
    rho = torch.randn(4, 3, generator=rng, dtype=D) - 2
    bmu = torch.randn(4, generator=rng, dtype=D)
    brho = torch.randn(4, generator=rng, dtype=D) - 2
    x = torch.randn(5, 3, generator=rng, dtype=D)

    def f(x, mu, rho, bmu, brho):
        return R.mean_field_linear(x, mu, rho, bmu, brho if bias_rho else None, seed=3, samples=3, owner=2)

    inputs = [t.clone().requires_grad_() for t in (x, mu, rho, bmu, brho)]
    y = f(*inputs)
    eps_b = philox.normal(3, 4, sample=torch.arange(3), owner=2, purpose=2).double()
    b = bmu + F.softplus(brho) * eps_b if bias_rho else bmu.expand(3, 4)
    W = R.mean_field_reconstruct(mu, rho, seed=3, samples=3, owner=2)
    for s in range(3):
        torch.testing.assert_close(y[s].detach(), F.linear(x, W[s], b[s]))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("conv", ["mean_field_conv1d", "mean_field_conv2d"])
def test_gradcheck_mean_field_conv(rng, conv):
    spatial = 1 if conv.endswith("1d") else 2
    mu = torch.randn(4, 2, *(3,) * spatial, generator=rng, dtype=D)
    rho = torch.randn(mu.shape, generator=rng, dtype=D) - 2
    bmu = torch.randn(4, generator=rng, dtype=D)
    brho = torch.randn(4, generator=rng, dtype=D) - 2
    x = torch.randn(2, 4, *(6,) * spatial, generator=rng, dtype=D)

    def f(x, mu, rho, bmu, brho):
        return getattr(R, conv)(x, mu, rho, bmu, brho, stride=1, padding=1, groups=2, seed=3, samples=2)

    inputs = [t.clone().requires_grad_() for t in (x, mu, rho, bmu, brho)]
    assert f(*inputs).shape == (2, 2, 4, *(6,) * spatial)
    assert torch.autograd.gradcheck(f, inputs)


# ---------------------------------------------------------------------------------------------------
# KL, loss, metrics
# ---------------------------------------------------------------------------------------------------

def _mvn(means, chol):
    L = torch.zeros(means.shape[0], 2, 2, dtype=means.dtype)
    L[:, 0, 0], L[:, 1, 0], L[:, 1, 1] = F.softplus(chol[:, 0]), chol[:, 1], F.softplus(chol[:, 2])
    return torch.distributions.MultivariateNormal(means, scale_tril=L)


def test_kl_components_matches_torch_distributions(rng):
    m, c, *_ = make_layer(rng, (1,), 6)
    m0, c0, *_ = make_layer(rng, (1,), 6)
    want = torch.distributions.kl_divergence(_mvn(m, c), _mvn(m0, c0)).sum()
    torch.testing.assert_close(R.kl_components(m, c, m0, c0), want)
    assert R.kl_components(m, c, m, c).abs() < 1e-12
    f = lambda m, c: R.kl_components(m, c, m0, c0)  # noqa: E731
    assert torch.autograd.gradcheck(f, (m.requires_grad_(), c.requires_grad_()))


def test_kl_gaussian_matches_torch_distributions(rng):
    mu = torch.randn(20, generator=rng, dtype=D)
    rho = torch.randn(20, generator=rng, dtype=D)
    q = torch.distributions.Normal(mu, F.softplus(rho))
    p = torch.distributions.Normal(torch.full_like(mu, 0.1), torch.full_like(mu, 0.7))
    kl = torch.distributions.kl_divergence(q, p)
    torch.testing.assert_close(R.kl_gaussian(mu, rho, 0.1, 0.7), kl.sum())
    torch.testing.assert_close(R.kl_gaussian_mean(mu, rho, 0.1, 0.7), kl.mean())
    assert torch.autograd.gradcheck(lambda a, b: R.kl_gaussian(a, b, 0.1, 0.7),
                                    (mu.requires_grad_(), rho.requires_grad_()))


def test_elbo_loss(rng):
    logits = torch.randn(8, 5, generator=rng, dtype=D)
    target = torch.randint(0, 5, (8,), generator=rng)
    kl = torch.tensor(123.0, dtype=D)
    torch.testing.assert_close(R.elbo_loss(logits, target, kl, 1000, beta=0.5),
                               F.cross_entropy(logits, target) + 0.5 * 123.0 / 1000)
    with pytest.raises(ValueError, match="num_data"):
        R.elbo_loss(logits, target, kl, 0)


def test_metrics_on_hand_computed_example():
    # two samples, three inputs, two classes
    p = torch.tensor([[[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]],
                      [[0.7, 0.3], [0.2, 0.8], [0.9, 0.1]]], dtype=D)
    y = torch.tensor([0, 0, 0])
    pm = p.mean(0)  # [[.8,.2],[.3,.7],[.7,.3]]
    assert R.accuracy(p, y).item() == pytest.approx(2 / 3)
    assert R.nll(p, y).item() == pytest.approx(-(math.log(0.8) + math.log(0.3) + math.log(0.7)) / 3)
    assert R.brier(p, y).item() == pytest.approx(((0.2**2 * 2) + (0.7**2 * 2) + (0.3**2 * 2)) / 3)
    # ECE, 10 bins: conf .8 (correct) bin 8, .7 (wrong, pred 1) bin 7 (0.6,0.7], .7 (correct) bin 7
    assert R.ece(p, y, n_bins=10).item() == pytest.approx((abs(1 - 0.8) + abs(1 - 1.4)) / 3)
    H = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    torch.testing.assert_close(R.predictive_entropy(p), H(pm))
    torch.testing.assert_close(R.mutual_information(p), H(pm) - H(p).mean(0))
    assert (R.mutual_information(p) >= 0).all()


def test_ece_perfectly_calibrated_is_zero():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    assert R.ece(p, torch.tensor([0, 1])).item() == 0.0


def test_metric_errors():
    with pytest.raises(ValueError, match="probs"):
        R.mutual_information(torch.rand(3, 2))
    with pytest.raises(ValueError, match="target"):
        R.accuracy(torch.rand(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="n_bins"):
        R.ece(torch.rand(3, 2), torch.tensor([0, 1, 1]), n_bins=0)


# ---------------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the argument
# ---------------------------------------------------------------------------------------------------

def _args(rng):
    means, chol, labels, e, o = make_layer(rng, (4, 5), 3, 2, 2, dtype=torch.float32)
    return dict(means=means, chol=chol, labels=labels, ellipse=e, outliers=o)


@pytest.mark.parametrize("mutate,err,match", [
    (lambda a: a.update(labels=torch.full((4, 5), 3, dtype=torch.int16)), ValueError, "labels.*\\[0, 3\\)"),
    (lambda a: a.update(labels=torch.full((4, 5), -1, dtype=torch.int16)), ValueError, "labels"),
    (lambda a: a.update(labels=torch.zeros(4, 5)), TypeError, "labels.*integer"),
    (lambda a: a.update(means=a["means"].double()), TypeError, "chol.*dtype"),
    (lambda a: a.update(means=a["means"][:, :1]), ValueError, "means"),
    (lambda a: a.update(chol=a["chol"][:2]), ValueError, "chol.*3 rows"),
    (lambda a: a.update(means=torch.zeros(0, 2), chol=torch.zeros(0, 3)), ValueError, "K >= 1"),
    (lambda a: a.update(labels=a["labels"].to("meta")), ValueError, "labels.*device"),
    (lambda a: a.update(ellipse=(a["ellipse"][0], a["ellipse"][1], a["ellipse"][2], torch.tensor([0.5, 1.5]))),
     ValueError, "alpha"),
    (lambda a: a.update(ellipse=(a["ellipse"][0], torch.tensor([0, 3]), a["ellipse"][2], a["ellipse"][3])),
     ValueError, "comp_a"),
    (lambda a: a.update(outliers=(a["ellipse"][0], a["outliers"][1], a["outliers"][2])), ValueError, "at most once"),
    (lambda a: a.update(outliers=(torch.tensor([0, 20]), a["outliers"][1], a["outliers"][2])), ValueError,
     "outlier positions"),
    (lambda a: a.update(outliers=(a["outliers"][0], a["outliers"][1][:1], a["outliers"][2])), ValueError,
     "outlier mu"),
    (lambda a: a.update(ellipse=(1, 2)), TypeError, "ellipse"),
])
def test_reconstruct_bad_inputs(rng, mutate, err, match):
    a = _args(rng)
    mutate(a)
    with pytest.raises(err, match=match):
        R.reconstruct(a["means"], a["chol"], a["labels"], a["ellipse"], a["outliers"], seed=1, samples=2)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a["means"].__setitem__((1, 0), float("nan")), "means.*non-finite"),
    (lambda a: a["chol"].__setitem__((0, 2), float("inf")), "chol.*non-finite"),
    (lambda a: a.update(outliers=(a["outliers"][0], a["outliers"][1], torch.tensor([1.0, float("nan")]))),
     "outlier rho"),
])
def test_reconstruct_non_finite_parameters(rng, mutate, match):
    """Trainable parameters are checked for finiteness when they enter a module and with sws.validate() /
    SWS_VALIDATE=1, not per call (a NaN gives NaN, never a crash: PyTorch does not check either)."""
    a = _args(rng)
    mutate(a)
    call = lambda: R.reconstruct(a["means"], a["chol"], a["labels"], a["ellipse"], a["outliers"], seed=1,  # noqa
                                 samples=2)
    with sws.validate(), pytest.raises(ValueError, match=match):
        call()
    assert call().shape == (2, 4, 5)


def test_reconstruct_nan_gives_nan(rng):
    a = _args(rng)
    a["means"][:, 0] = float("nan")
    assert torch.isnan(R.reconstruct(a["means"], a["chol"], a["labels"], seed=1, samples=2)).all()


@pytest.mark.parametrize("kw,err,match", [
    (dict(seed=-1), ValueError, "seed"), (dict(seed=2**64), ValueError, "seed"), (dict(seed="1"), TypeError, "seed"),
    (dict(samples=0), ValueError, "samples"), (dict(samples=2.0), TypeError, "samples"),
    (dict(mode="bogus"), ValueError, "mode"), (dict(owner=2**32), ValueError, "owner"),
    (dict(codebook_owner=-1), ValueError, "codebook_owner"),
])
def test_reconstruct_bad_scalars(rng, kw, err, match):
    a = _args(rng)
    call = dict(seed=1, samples=2)
    call.update(kw)
    with pytest.raises(err, match=match):
        R.reconstruct(a["means"], a["chol"], a["labels"], a["ellipse"], a["outliers"], **call)


def test_linear_and_conv_shape_errors(rng):
    a = _args(rng)
    with pytest.raises(ValueError, match="x.*in_features"):
        R.sws_linear(torch.randn(3, 4), a["means"], a["chol"], a["labels"], seed=1)
    with pytest.raises(ValueError, match="x.*sample dimension"):
        R.sws_linear(torch.randn(3, 5), a["means"], a["chol"], a["labels"], seed=1, samples=2, per_sample=True)
    with pytest.raises(ValueError, match="bias"):
        R.sws_linear(torch.randn(3, 5), a["means"], a["chol"], a["labels"], bias=torch.zeros(3), seed=1)
    with pytest.raises(TypeError, match="x"):
        R.sws_linear(torch.ones(3, 5, dtype=torch.int32), a["means"], a["chol"], a["labels"], seed=1)
    with pytest.raises(ValueError, match="x.*dimensions"):
        R.sws_conv2d(torch.randn(1, 2, 5), a["means"], a["chol"], torch.zeros(3, 2, 1, 1, dtype=torch.uint8),
                     seed=1)
    with pytest.raises(ValueError, match="rho"):
        R.mean_field_linear(torch.randn(2, 3), torch.zeros(4, 3), torch.zeros(4, 2), seed=1)
