"""sws_kernels.nn: codebook, SWS layers and mean-field layers against the functional API and bayesian-torch."""
import math

import pytest
import torch
import torch.nn.functional as F

import sws_kernels as sws
from sws_kernels import functional as SF
from sws_kernels import nn as snn


def _special(n, K, g, n_e=3, n_o=4):
    """Random disjoint ellipse/outlier positions with random components, alphas and outlier params."""
    perm = torch.randperm(n, generator=g)
    n_e, n_o = min(n_e, n // 3), min(n_o, n // 3)
    e_pos, o_pos = perm[:n_e], perm[n_e:n_e + n_o]
    ell = (e_pos, torch.randint(0, K, (n_e,), generator=g), torch.randint(0, K, (n_e,), generator=g),
           torch.rand(n_e, generator=g))
    outl = (o_pos, 0.3 * torch.randn(n_o, generator=g), -4 + 0.5 * torch.randn(n_o, generator=g))
    return ell, outl


def _codebook(K, g, rng_id=None):
    means = torch.stack([0.2 * torch.randn(K, generator=g), -4 + 0.5 * torch.randn(K, generator=g)], -1)
    chol = torch.stack([-4 + 0.3 * torch.randn(K, generator=g), 0.05 * torch.randn(K, generator=g),
                        -2 + 0.3 * torch.randn(K, generator=g)], -1)
    return snn.Codebook(K, means=means, chol=chol, rng_id=rng_id)


# ---------------------------------------------------------------------------------------------------
# Codebook
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [1, 2, 7, 300])
def test_codebook_default_init(K):
    cb = snn.Codebook(K)
    assert cb.means.shape == (K, 2) and cb.chol.shape == (K, 3)
    assert cb.means.dtype == torch.float32 and cb.means.requires_grad and cb.chol.requires_grad
    assert torch.equal(cb.means0, cb.means.detach()) and torch.equal(cb.chol0, cb.chol.detach())
    mu, rho = cb.means.detach()[:, 0], cb.means.detach()[:, 1]
    assert float(mu.min()) >= -0.2 - 1e-6 and float(mu.max()) <= 0.2 + 1e-6
    assert float(rho.min()) >= -5 and float(rho.max()) <= -3
    if K > 1:
        assert mu.unique().numel() == K  # spread, not collapsed
    assert float(cb.kl_loss().abs()) < 1e-4  # posterior = prior at init


def test_codebook_bad_inputs():
    with pytest.raises(TypeError, match="num_components"):
        snn.Codebook(2.5)
    with pytest.raises(ValueError, match="num_components"):
        snn.Codebook(0)
    with pytest.raises(ValueError, match="means"):
        snn.Codebook(3, means=torch.randn(4, 2))
    with pytest.raises(ValueError, match="means"):
        snn.Codebook(2, means=torch.tensor([[0.0, float("nan")], [0.1, -4.0]]))
    with pytest.raises(ValueError, match="chol"):
        snn.Codebook(2, means=torch.randn(2, 2), chol=torch.randn(3, 3))
    with pytest.raises(ValueError, match="rng_id"):
        snn.Codebook(2, rng_id=1 << 32)


def test_label_dtype_narrowest():
    assert snn.label_dtype(1) == torch.uint8 and snn.label_dtype(256) == torch.uint8
    assert snn.label_dtype(257) == torch.int16 and snn.label_dtype(32768) == torch.int16
    assert snn.label_dtype(32769) == torch.int32
    layer = snn.SWSLinear(3, 2, codebook=snn.Codebook(300))
    assert layer.labels.dtype == torch.int16 and layer.ellipse_a.dtype == torch.int16


def test_labels_none_nearest_component(rng):
    cb = snn.Codebook(9)
    layer = snn.SWSLinear(31, 5, codebook=cb)
    assert layer.labels.shape == (5, 31) and layer.labels.dtype == torch.uint8
    # every weight's label is a nearest component in mu: re-derive with a brute-force argmin
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    w = torch.empty(5, 31)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    lab = snn.nearest_component(w, cb.means.detach()[:, 0])
    brute = (w.reshape(-1, 1) - cb.means.detach()[None, :, 0]).abs()
    best = brute.min(1).values
    assert torch.allclose(brute.gather(1, lab.reshape(-1, 1))[:, 0], best)


# ---------------------------------------------------------------------------------------------------
# SWS layers vs the functional API
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["paper", "hierarchical", "mean"])
@pytest.mark.parametrize("in_f,out_f,batch", [(1, 3, 1), (17, 2, 3), (5, 129, 2)])
def test_sws_linear_matches_functional(rng, mode, in_f, out_f, batch):
    K = 11
    cb = _codebook(K, rng)
    labels = torch.randint(0, K, (out_f, in_f), generator=rng)
    ell, outl = _special(in_f * out_f, K, rng)
    layer = snn.SWSLinear(in_f, out_f, codebook=cb, mode=mode, labels=labels, ellipse=ell, outliers=outl)
    x = torch.randn(batch, 2, in_f, generator=rng)
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    want = SF.sws_linear(x, cb.means, cb.chol, layer.labels, layer._ellipse(), layer._outliers(), layer.bias,
                         seed=seed, samples=4, mode=mode, owner=layer.owner, codebook_owner=cb.owner)
    got = layer(x, samples=4, seed=seed)
    assert got.shape == (4, batch, 2, out_f)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    one = layer(x, seed=seed)  # samples=None: the usual shape, sample 0
    assert one.shape == (batch, 2, out_f)
    torch.testing.assert_close(one, want[0])
    # the same weights through sample_weights and F.linear
    w = layer.sample_weights(samples=4, seed=seed, mode=mode)
    torch.testing.assert_close(got[2], F.linear(x, w[2], layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,spatial", [(snn.SWSConv1d, 1), (snn.SWSConv2d, 2)])
@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 1, 1, 3), (1, 2, 2, 1)])
def test_sws_conv_matches_torch_conv(rng, cls, spatial, stride, padding, dilation, groups):
    K = 6
    cb = _codebook(K, rng)
    layer = cls(6, 9, 3, stride, padding, dilation, groups, codebook=cb, mode="hierarchical",
                labels=None)
    layer.labels.copy_(torch.randint(0, K, layer.weight_shape, generator=rng).to(layer.labels.dtype))
    x = torch.randn(2, 6, *([7] * spatial), generator=rng)
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    y = layer(x, samples=3, seed=seed)
    w = layer.sample_weights(samples=3, seed=seed)
    conv = F.conv1d if spatial == 1 else F.conv2d
    for s in range(3):
        torch.testing.assert_close(y[s], conv(x, w[s], layer.bias, stride, padding, dilation, groups),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_conv_padding_mode(rng, padding_mode):
    ref = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    mf = snn.MeanFieldConv2d(3, 4, 3, 1, 1, padding_mode=padding_mode)
    with torch.no_grad():
        mf.mu_kernel.copy_(ref.weight)
        mf.mu_bias.copy_(ref.bias)
        mf.rho_kernel.fill_(-30.0)  # sigma ~ 1e-13: the deterministic conv
        mf.rho_bias.fill_(-30.0)
    x = torch.randn(2, 3, 5, 6, generator=rng)
    torch.testing.assert_close(mf(x, return_kl=False), ref(x), rtol=1e-5, atol=1e-5)
    ys = mf(x, return_kl=False, samples=2)
    torch.testing.assert_close(ys[1], ref(x), rtol=1e-5, atol=1e-5)


def test_seed_none_reproducible_and_fresh(rng):
    layer = snn.SWSLinear(4, 3, codebook=_codebook(5, rng))
    x = torch.randn(2, 4, generator=rng)
    torch.manual_seed(123)
    a = layer(x, samples=2)
    torch.manual_seed(123)
    b = layer(x, samples=2)
    c = layer(x, samples=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_per_sample_input_and_mode_switch(rng):
    layer = snn.SWSLinear(5, 4, codebook=_codebook(8, rng))
    xs = torch.randn(3, 2, 5, generator=rng)
    y = layer(xs, samples=3, seed=7, per_sample=True)
    w = layer.sample_weights(samples=3, seed=7)
    for s in range(3):
        torch.testing.assert_close(y[s], F.linear(xs[s], w[s], layer.bias), rtol=1e-5, atol=1e-5)
    layer.mode = "mean"
    torch.testing.assert_close(layer(xs[0]), layer(xs[0]), rtol=0, atol=0)  # deterministic
    torch.testing.assert_close(layer(xs[0]), F.linear(xs[0], layer.mean_weight(), layer.bias))
    with pytest.raises(ValueError, match="mode"):
        layer.mode = "bogus"


def test_sws_bad_inputs(rng):
    cb = snn.Codebook(4)
    with pytest.raises(TypeError, match="codebook"):
        snn.SWSLinear(3, 2, codebook=torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"labels.*num_components=4"):  # codebook with too few components
        snn.SWSLinear(3, 2, codebook=cb, labels=torch.full((2, 3), 4))
    with pytest.raises(ValueError, match="labels.*weight shape"):
        snn.SWSLinear(3, 2, codebook=cb, labels=torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="labels"):
        snn.SWSLinear(3, 2, codebook=cb, labels=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="in_features"):
        snn.SWSLinear(0, 2, codebook=cb)
    with pytest.raises(TypeError, match="bias"):
        snn.SWSLinear(3, 2, 1.0, codebook=cb)
    with pytest.raises(ValueError, match="mode"):
        snn.SWSLinear(3, 2, codebook=cb, mode="sampled")
    with pytest.raises(ValueError, match="outlier positions"):
        snn.SWSLinear(3, 2, codebook=cb, outliers=(torch.tensor([6]), torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="groups"):
        snn.SWSConv2d(4, 6, 3, groups=4, codebook=cb)
    layer = snn.SWSLinear(3, 2, codebook=cb)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(5, 4))
    with pytest.raises(ValueError, match="samples"):
        layer(torch.randn(5, 3), samples=0)
    with torch.no_grad():
        cb.chol[:, 0] = float("inf")  # every component, so every weight is non-finite
    # Trainable parameters are not checked per step (a NaN/inf gives NaN/inf, never a crash) ...
    assert not torch.isfinite(layer(torch.randn(5, 3), seed=1)).all()
    with sws.validate(), pytest.raises(ValueError, match="chol"):  # ... but on request, named
        layer(torch.randn(5, 3))
    with pytest.raises(ValueError, match="chol.*non-finite"):  # and when they enter a module
        snn.Codebook(cb.num_components, means=cb.means.detach(), chol=cb.chol.detach())


def test_shared_codebook_parameters_once(rng):
    cb = _codebook(5, rng)
    model = torch.nn.Sequential(snn.SWSLinear(4, 6, codebook=cb), torch.nn.ReLU(), snn.SWSLinear(6, 2, codebook=cb))
    params = list(model.parameters())
    assert sum(p is cb.means for p in params) == 1 and sum(p is cb.chol for p in params) == 1
    assert sum(m is cb for m in model.modules()) == 1
    sd = model.state_dict()
    assert torch.equal(sd["0.codebook.means"], sd["2.codebook.means"])


def test_state_dict_round_trip_narrow_labels(rng):
    K = 300  # int16 labels
    cb = _codebook(K, rng, rng_id=77)
    ell, outl = _special(3 * 4 * 2 * 1, K, rng, n_e=5, n_o=6)
    layer = snn.SWSConv2d(4, 3, (2, 1), bias=True, codebook=cb, ellipse=ell, outliers=outl, rng_id=991)
    sd = layer.state_dict()
    assert sd["labels"].dtype == torch.int16 and int(sd["rng_id"]) == 991 and int(sd["codebook.rng_id"]) == 77
    # A fresh layer with another K, no ellipses/outliers and another rng_id adopts the saved sizes/dtypes/ids.
    fresh = snn.SWSConv2d(4, 3, (2, 1), codebook=snn.Codebook(3))
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    assert fresh.owner == 991 and fresh.codebook.owner == 77 and fresh.codebook.num_components == K
    x = torch.randn(2, 4, 5, 3, generator=rng)
    torch.testing.assert_close(fresh(x, samples=2, seed=5), layer(x, samples=2, seed=5), rtol=0, atol=0)


def test_rng_ids_distinct_by_default():
    cb = snn.Codebook(3)
    layers = [snn.SWSLinear(2, 2, codebook=cb) for _ in range(5)] + [snn.MeanFieldLinear(2, 2) for _ in range(5)]
    ids = [m.owner for m in layers]
    assert len(set(ids)) == len(ids)
    assert all(int(m.rng_id) == m.owner for m in layers)


# ---------------------------------------------------------------------------------------------------
# Mean-field layers
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_mean_field_linear_matches_functional(rng, bias):
    layer = snn.MeanFieldLinear(7, 3, 0.1, 0.5, 0.0, -4.0, bias)
    assert layer.prior_mean == 0.1 and layer.prior_variance == 0.5 and layer.bias is bias
    assert abs(float(layer.mu_weight.mean())) < 0.2 and abs(float(layer.rho_weight.mean()) + 4) < 0.2
    x = torch.randn(3, 7, generator=rng)
    out, kl = layer(x, seed=11)
    want = SF.mean_field_linear(x, layer.mu_weight, layer.rho_weight, layer.mu_bias, layer.rho_bias, seed=11,
                                samples=1, owner=layer.owner)[0]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    kl_want = sws.reference.kl_gaussian_mean(layer.mu_weight, layer.rho_weight, 0.1, 0.5)
    if bias:
        kl_want = kl_want + sws.reference.kl_gaussian_mean(layer.mu_bias, layer.rho_bias, 0.1, 0.5)
    torch.testing.assert_close(kl, kl_want)
    torch.testing.assert_close(layer.kl_loss(), kl_want)
    assert layer(x, return_kl=False).shape == (3, 3)
    layer.dnn_to_bnn_flag = True
    assert isinstance(layer(x), torch.Tensor)  # bayesian-torch: converted layers return only out
    assert layer(x, samples=5).shape == (5, 3, 3)


def test_mean_field_conv_matches_functional(rng):
    layer = snn.MeanFieldConv1d(4, 6, 3, 2, 1, 1, 2, bias=False)
    x = torch.randn(2, 4, 9, generator=rng)
    out = layer(x, return_kl=False, samples=3, seed=3)
    w = layer.sample_weights(samples=3, seed=3)
    for s in range(3):
        torch.testing.assert_close(out[s], F.conv1d(x, w[s], None, 2, 1, 1, 2), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="prior_mean"):
        snn.MeanFieldLinear(3, 2, True)  # bayesian-torch's third positional arg is prior_mean, not bias
    with pytest.raises(TypeError, match="bias"):
        snn.MeanFieldLinear(3, 2, bias=1)
    with pytest.raises(ValueError, match="prior_variance"):
        snn.MeanFieldLinear(3, 2, 0, 0.0)


bt = pytest.importorskip  # alias, used below to keep bayesian-torch optional


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_mean_field_matches_bayesian_torch_api(rng, kind):
    layers = bt("bayesian_torch.layers")
    if kind == "linear":
        theirs = layers.LinearReparameterization(6, 4, 0.05, 0.7, 0.0, -3.5, True)
        ours = snn.MeanFieldLinear(6, 4, 0.05, 0.7, 0.0, -3.5, True)
        x = torch.randn(3, 6, generator=rng)
    elif kind == "conv1d":
        theirs = layers.Conv1dReparameterization(4, 6, 3, 1, 1, 1, 2, 0.05, 0.7, 0.0, -3.5, False)
        ours = snn.MeanFieldConv1d(4, 6, 3, 1, 1, 1, 2, 0.05, 0.7, 0.0, -3.5, False)
        x = torch.randn(3, 4, 8, generator=rng)
    else:
        theirs = layers.Conv2dReparameterization(4, 6, 3, 2, 1, 1, 1, 0.05, 0.7, 0.0, -3.5, True)
        ours = snn.MeanFieldConv2d(4, 6, 3, 2, 1, 1, 1, 0.05, 0.7, 0.0, -3.5, True)
        x = torch.randn(3, 4, 8, 8, generator=rng)
    # the same persistent state_dict keys (plus our rng_id), and theirs loads into ours strictly
    assert set(ours.state_dict()) - {"rng_id"} == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.kl_loss(), theirs.kl_loss())
    out, kl = ours(x)
    out_t, kl_t = theirs(x)
    assert out.shape == out_t.shape
    torch.testing.assert_close(kl, kl_t)


def test_new_conv_kinds_state_dict_pickle_and_bad_inputs(rng):
    """Conv3d / ConvTranspose layers (issue 12): state_dict round trip with other fitted sizes, pickling after a
    forward (per-layer bindings are left out), bayesian-torch state_dicts load, argument checks."""
    import io
    cb = _codebook(7, rng)
    n = 4 * 3 * 2 * 2  # ConvTranspose2d(4, 6, 2, groups=2): weight [in=4, out/groups=3, 2, 2]
    ell, outl = _special(n, 7, rng, n_e=3, n_o=4)
    layer = snn.SWSConvTranspose2d(4, 6, 2, stride=2, groups=2, codebook=cb, ellipse=ell, outliers=outl,
                                   return_kl=True)
    assert layer.weight_shape == (4, 3, 2, 2) and layer.bias.shape == (6,)
    x = torch.randn(2, 4, 3, 3, generator=rng)
    y, kl = layer(x, samples=2, seed=3)
    assert y.shape == (2, 2, 6, 6, 6)
    fresh = snn.SWSConvTranspose2d(4, 6, 2, stride=2, groups=2, codebook=snn.Codebook(3))
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x, samples=2, seed=3), y, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(torch.nn.Sequential(layer, snn.MeanFieldConv3d(6, 2, 1)), buf)  # after a forward
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    out, kl2 = back[0](x, samples=2, seed=3)
    torch.testing.assert_close(out, y, rtol=0, atol=0)
    torch.testing.assert_close(kl2, kl)
    bt = pytest.importorskip("bayesian_torch.layers").ConvTranspose3dReparameterization(2, 4, 3, stride=2)
    ours = snn.MeanFieldConvTranspose3d(2, 4, 3, stride=2)
    ours.load_state_dict(bt.state_dict())  # bayesian-torch's parameter names, no rng_id
    torch.testing.assert_close(ours.mu_kernel, bt.mu_kernel)
    with pytest.raises(ValueError, match="padding"):
        snn.SWSConvTranspose1d(2, 2, 3, padding="same", codebook=cb)
    with pytest.raises(ValueError, match="output_padding"):
        snn.SWSConvTranspose2d(2, 2, 3, stride=2, output_padding=2, codebook=cb)
    with pytest.raises(TypeError, match="output_padding"):
        snn.MeanFieldConvTranspose1d(2, 2, 3, output_padding=(1, 1))
    with pytest.raises(ValueError, match="groups"):
        snn.SWSConv3d(3, 4, 1, groups=2, codebook=cb)
    with pytest.raises(ValueError, match="x: expected 5 dimensions"):
        snn.SWSConv3d(2, 4, 1, codebook=cb)(torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="input channels"):
        layer(torch.randn(2, 5, 3, 3))
