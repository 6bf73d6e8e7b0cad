"""Drop-in use: bayesian-torch models survive from_bayesian_torch and to_sws unchanged, the three KL sums agree,
and every converted layer kind matches its reference (forward distribution, exact samples, gradients)."""
import copy
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sws_kernels as sws
from sws_kernels import convert
from sws_kernels import nn as snn
from sws_kernels import reference as R

L = pytest.importorskip("bayesian_torch.layers")
get_kl_loss = pytest.importorskip("bayesian_torch.models.dnn_to_bnn").get_kl_loss


def _close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# a model written the way bayesian-torch's documentation and model zoo write them
# --------------------------------------------------------------------------------------------------

class BTBlock(nn.Module):
    """bayesian-torch's resnet_variational BasicBlock style: every layer returns (out, kl); the shortcut's
    BatchNorm2dLayer takes the (out, kl) tuple (and returns (out, 0), so the conv's KL is added before it)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = L.Conv2dReparameterization(in_channels=cin, out_channels=cout, kernel_size=3, stride=stride,
                                                padding=1, prior_mean=0.0, prior_variance=0.1, posterior_mu_init=0.0,
                                                posterior_rho_init=-5.0, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = L.Conv2dFlipout(in_channels=cout, out_channels=cout, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv_sc = L.Conv2dReparameterization(in_channels=cin, out_channels=cout, kernel_size=1, stride=stride,
                                                  bias=False)
        self.bn_sc = L.BatchNorm2dLayer(cout)

    def forward(self, x):
        kl_sum = 0
        out, kl = self.conv1(x)
        kl_sum += kl
        out = F.relu(self.bn1(out))
        out, kl = self.conv2(out)
        kl_sum += kl
        out = self.bn2(out)
        shortcut = self.conv_sc(x)
        kl_sum += shortcut[1]
        residual, _ = self.bn_sc(shortcut)
        return F.relu(out + residual), kl_sum


class BTNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = BTBlock(3, 4, stride=2)
        self.up = L.ConvTranspose2dReparameterization(4, 4, 2, stride=2)
        self.fc = L.LinearReparameterization(in_features=4, out_features=3)

    def forward(self, x):
        kl_sum = 0
        out, kl = self.block(x)
        kl_sum += kl
        out, kl = self.up(out)
        kl_sum += kl
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        out, kl = self.fc(out)
        kl_sum += kl
        return out, kl_sum


def test_bayesian_torch_model_survives_from_bayesian_torch_and_to_sws(rng):
    torch.manual_seed(0)
    net = BTNet()
    x = torch.randn(4, 3, 8, 8, generator=rng)
    y = torch.randint(0, 3, (4,), generator=rng)
    out, kl = net(x)  # bayesian-torch itself
    _close(kl, get_kl_loss(net))
    kl_bt = get_kl_loss(net).detach()

    net, rep = convert.from_bayesian_torch(net)
    assert sorted(rep["converted"]) == ["block.conv1", "block.conv2", "block.conv_sc", "fc", "up"]
    assert rep["flipout"] == ["block.conv2"] and net.block.conv2.estimator == "flipout"
    out, kl = net(x)  # unchanged model code, our layers
    assert out.shape == (4, 3)
    _close(kl, kl_bt)  # bayesian-torch's per-tensor-mean KL, same value
    _close(kl, get_kl_loss(net))

    net, rep = convert.to_sws(net, num_components=4, progress=False)
    kinds = {type(m).__name__ for m in net.modules() if isinstance(m, snn.SWS_LAYERS)}
    assert kinds == {"SWSConv2d", "SWSConvTranspose2d", "SWSLinear"}
    out, kl = net(x)  # still unchanged model code: tuples everywhere, BatchNorm2dLayer gets (out, kl)
    assert out.shape == (4, 3) and kl.dim() == 0
    # the three KL sums of issue 12: what the layers return == bayesian-torch's get_kl_loss == sws.kl_loss
    _close(kl, get_kl_loss(net))
    _close(kl, sws.kl_loss(net))
    # the same gradients as sws.kl_loss: the codebook counted once
    cb = net.fc.codebook
    g1 = torch.autograd.grad(kl, [cb.means, cb.chol], retain_graph=True)
    g2 = torch.autograd.grad(sws.kl_loss(net), [cb.means, cb.chol])
    for a, b in zip(g1, g2):
        _close(a, b)
    # bayesian-torch's training recipe runs unchanged
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        out, kl = net(x)
        (F.cross_entropy(out, y) + kl / 1000).backward()
        opt.step()
    net.eval()
    assert sws.predict(net, x, samples=3).shape == (3, 4, 3)  # the (out, kl) model output is understood


def test_dnn_to_bnn_model_returns_only_out_and_kls_agree(rng):
    dnn_to_bnn = pytest.importorskip("bayesian_torch.models.dnn_to_bnn").dnn_to_bnn
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.ConvTranspose2d(3, 2, 3, stride=2, output_padding=1),
                          nn.Flatten(), nn.Linear(2 * 12 * 12, 3))
    dnn_to_bnn(model, {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
                       "type": "Reparameterization", "moped_enable": False, "moped_delta": 0.5})
    x = torch.randn(2, 2, 7, 7, generator=rng)
    # bayesian-torch's dnn_to_bnn drops ConvTranspose's output_padding (a known defect): its model cannot run this
    # input; ours keeps what the layer says it has. Restore the value the deterministic layer had.
    model[2].output_padding = 1
    convert.from_bayesian_torch(model)
    assert isinstance(model[2], snn.MeanFieldConvTranspose2d) and model[2].output_padding == (1, 1)
    assert model(x).shape == (2, 3)
    convert.to_sws(model, num_components=3, progress=False)
    y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3)  # dnn_to_bnn_flag carried over: out only
    layers = [m for m in model.modules() if isinstance(m, snn.SWS_LAYERS)]
    assert all(m.dnn_to_bnn_flag and m.return_kl for m in layers)
    total = sum(m.layer_kl() for m in layers)
    _close(total, get_kl_loss(model))
    _close(total, sws.kl_loss(model))


def test_plain_sws_layer_contract(rng):
    cb = snn.Codebook(5)
    lin = snn.SWSLinear(4, 3, codebook=cb)
    x = torch.randn(2, 4, generator=rng)
    assert isinstance(lin(x), torch.Tensor) and lin(x, samples=2).shape == (2, 2, 3)  # unchanged default
    out, kl = lin(x, return_kl=True)
    assert out.shape == (2, 3)
    _close(kl, lin.layer_kl())
    out, kl = lin(x, True)  # bayesian-torch's positional return_kl
    assert isinstance(lin(x, False), torch.Tensor)
    lin.return_kl = True
    assert isinstance(lin(x), tuple) and isinstance(lin(x, return_kl=False), torch.Tensor)
    assert lin(x, samples=2)[0].shape == (2, 2, 3)
    lin.dnn_to_bnn_flag = True
    assert isinstance(lin(x), torch.Tensor) and isinstance(lin(x, return_kl=True), torch.Tensor)
    with pytest.raises(TypeError, match="return_kl"):
        lin(x, True, return_kl=True)
    with pytest.raises(TypeError, match="return_kl"):
        snn.SWSLinear(4, 3, codebook=cb, return_kl=1)


def test_kl_shares_with_shared_codebooks(rng):
    """The codebook's KL is attributed to its layers by weight count: shares sum to one, counted once."""
    torch.manual_seed(2)
    cb1, cb2 = snn.Codebook(6), snn.Codebook(4)
    outl = (torch.tensor([0, 5]), torch.tensor([0.3, -0.2]), torch.tensor([-4.0, -3.0]))
    model = nn.ModuleDict({
        "a": snn.SWSLinear(5, 4, codebook=cb1, outliers=outl, return_kl=True),
        "b": snn.SWSConv2d(2, 3, 3, codebook=cb1, return_kl=True),
        "c": snn.SWSConvTranspose1d(3, 2, 3, codebook=cb2, return_kl=True),
        "d": snn.SWSConv3d(1, 2, 2, codebook=cb1, return_kl=True),
    })
    with torch.no_grad():  # move off the prior so every term is non-zero
        for cb in (cb1, cb2):
            cb.means.add_(0.05 * torch.randn(cb.means.shape, generator=rng))
            cb.chol.add_(0.05 * torch.randn(cb.chol.shape, generator=rng))
        model["a"].outlier_mu.add_(0.1)
    inputs = {"a": torch.randn(2, 5), "b": torch.randn(1, 2, 4, 4), "c": torch.randn(1, 3, 4),
              "d": torch.randn(1, 1, 3, 3, 3)}

    def returned():
        return sum(model[k](inputs[k])[1] for k in model)

    assert cb1.num_weights() == 20 + 54 + 16 and cb2.num_weights() == 18
    _close(model["b"].layer_kl(), cb1.kl_loss() * 54 / 90)
    _close(returned(), sws.kl_loss(model))
    _close(returned(), get_kl_loss(model))
    _close(sws.kl_loss(model), cb1.kl_loss() + cb2.kl_loss() + model["a"].kl_loss())
    # a codebook reassigned by hand, a deep copy, a discarded layer: the shares follow
    model["c"].codebook = cb1
    assert cb2.num_weights() == 0 and cb1.num_weights() == 108
    _close(returned(), sws.kl_loss(model))
    twin = copy.deepcopy(model)
    assert twin["a"].codebook is not cb1 and twin["a"].codebook.num_weights() == 108
    _close(sum(twin[k](inputs[k])[1] for k in twin), sws.kl_loss(twin))
    extra = snn.SWSLinear(5, 4, codebook=cb1)
    assert cb1.num_weights() == 128  # a live layer outside the model still holds its share (documented)
    del extra
    gc.collect()
    assert cb1.num_weights() == 108
    _close(returned(), get_kl_loss(model))


# --------------------------------------------------------------------------------------------------
# every bayesian-torch layer kind
# --------------------------------------------------------------------------------------------------

KINDS = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


def _bt_layer(kind, flavour):
    cls = getattr(L, kind + flavour)
    prior = dict(prior_mean=0.1, prior_variance=0.5, posterior_mu_init=0.0, posterior_rho_init=-2.0)
    if kind == "Linear":
        return cls(in_features=5, out_features=3, **prior)
    if kind.startswith("ConvTranspose"):
        # bayesian-torch 0.5.0's ConvTranspose1d/2dFlipout give prior_weight_sigma the shape of a forward conv's
        # kernel [out, in/groups, k]: their own KL fails unless in_channels == out_channels
        out = 4 if flavour == "Flipout" and kind != "ConvTranspose3d" else 6
        return cls(in_channels=4, out_channels=out, kernel_size=3, stride=2, padding=1, dilation=1, groups=2,
                   output_padding=1, **prior)
    return cls(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=1, dilation=1, groups=2, **prior)


def _input(kind, rng, lead=()):
    if kind == "Linear":
        return torch.randn(*lead, 2, 5, generator=rng)
    spatial = int(kind[-2])
    size = 3 if spatial == 3 else 4
    return torch.randn(*lead, 2, 4, *([size] * spatial), generator=rng)


def _vendor(layer, x, w, b):
    if isinstance(layer, (snn.MeanFieldLinear, snn.SWSLinear)):
        return F.linear(x, w, b)
    n = len(layer.kernel_size)
    if hasattr(layer, "output_padding"):
        return getattr(F, f"conv_transpose{n}d")(x, w, b, layer.stride, layer.padding, layer.output_padding,
                                                 layer.groups, layer.dilation)
    pad = layer.padding
    if getattr(layer, "padding_mode", "zeros") != "zeros":  # nn.ConvNd's way: pad explicitly, then convolve
        x = F.pad(x, [p for d in reversed(layer.padding) for p in (d, d)], mode=layer.padding_mode)
        pad = 0
    return getattr(F, f"conv{n}d")(x, w, b, layer.stride, pad, layer.dilation, layer.groups)


def _flipout_reference(layer, x, s, seed):
    """Flipout for MC sample s written out from the RNG contract: the mean through PyTorch's op, plus the op on
    x * r of sigma * eps (weight stream purpose 0, bias purpose 2), times t; r, t = signs of the uniforms of
    purposes 3 and 4 (< 0.5 -> -1)."""
    def stream(n, purpose, normal=True):
        f = sws.philox.normal if normal else sws.philox.uniform
        return f(seed, n, sample=s, owner=layer.owner, purpose=purpose)

    def signs(shape, purpose):
        return torch.where(stream(math.prod(shape), purpose, normal=False) < 0.5, -1.0, 1.0).view(shape)

    mu, rho = layer.weight_mu, layer.weight_rho
    dw = R.softplus(rho) * stream(mu.numel(), 0).view(mu.shape)
    db = None if layer.mu_bias is None else R.softplus(layer.rho_bias) * stream(layer.mu_bias.numel(), 2)
    mean = _vendor(layer, x, mu, layer.mu_bias)
    delta = _vendor(layer, x * signs(x.shape, 3), dw, db)
    return mean + delta * signs(delta.shape, 4)


def _reference_out(layer, x, S, seed, per_sample=False):
    """The reference path: reference.py's weights for that seed, then the vendor op one sample at a time."""
    if isinstance(layer, snn.SWS_LAYERS):
        cb = layer.codebook
        w = R.reconstruct(cb.means, cb.chol, layer.labels, layer._ellipse(), layer._outliers(), seed=seed, samples=S,
                          mode=layer.mode, owner=layer.owner, codebook_owner=cb.owner)
        b = None if layer.bias is None else layer.bias.expand(S, -1)
    elif layer.estimator == "flipout":
        return torch.stack([_flipout_reference(layer, x[s] if per_sample else x, s, seed) for s in range(S)])
    else:
        w = R.mean_field_reconstruct(layer.weight_mu, layer.weight_rho, seed=seed, samples=S, owner=layer.owner)
        b = R.mean_field_bias(layer.mu_bias, layer.rho_bias, seed=seed, samples=S, owner=layer.owner)
    return torch.stack([_vendor(layer, x[s] if per_sample else x, w[s], None if b is None else b[s])
                        for s in range(S)])


def _check_exact_and_grads(layer, x, S=3, seed=77, per_sample=False):
    params = [p for p in layer.parameters() if p.requires_grad and p.numel()]
    xg = x.clone().requires_grad_()
    kw = dict(return_kl=False, samples=S, seed=seed, per_sample=per_sample)
    got = layer(xg, **kw)
    want_x = x.clone().requires_grad_()
    want = _reference_out(layer, want_x, S, seed, per_sample)
    _close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(got.shape)
    a = torch.autograd.grad((got * g).sum(), params + [xg])
    b = torch.autograd.grad((want * g).sum(), params + [want_x])
    for ga, gb in zip(a, b):
        _close(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def bt_zoo():
    torch.manual_seed(3)
    return nn.ModuleDict({k + f: _bt_layer(k, f) for k in KINDS for f in ("Reparameterization", "Flipout")})


def test_every_bayesian_torch_layer_converts(rng, bt_zoo):
    zoo = copy.deepcopy(bt_zoo)
    theirs = copy.deepcopy(bt_zoo)
    zoo, rep = convert.from_bayesian_torch(zoo)
    assert sorted(rep["converted"]) == sorted(zoo.keys()) and not rep["skipped"]
    assert sorted(rep["flipout"]) == sorted(k for k in zoo if k.endswith("Flipout"))
    for name, ours in zoo.items():
        S = 1500 if ours.estimator == "reparameterization" else 500  # flipout's signs: one stream per element
        kind = name.replace("Reparameterization", "").replace("Flipout", "")
        assert type(ours).__name__ == "MeanField" + kind, name
        bt = theirs[name]
        _close(ours.kl_loss(), bt.kl_loss())
        x = _input(kind, rng)
        out_t, kl_t = bt(x)  # their layer: same shapes and KL through forward
        out, kl = ours(x)
        assert out.shape == out_t.shape, name
        _close(kl, kl_t)
        # forward distribution: S samples in one call against the closed-form moments of the posterior
        with torch.no_grad():
            ys = ours(x, return_kl=False, samples=S)
            mean_w = _vendor(ours, x, ours.weight_mu, ours.mu_bias)
            var_w = _vendor(ours, x * x, R.softplus(ours.weight_rho) ** 2, R.softplus(ours.rho_bias) ** 2)
        std = var_w.sqrt()
        assert float(((ys.mean(0) - mean_w).abs() / std).max()) < 5 * math.sqrt(1 / S) * 1.5, name
        assert float((ys.var(0) / var_w - 1).abs().max()) < 6 * math.sqrt(2 / S), name
        # exact samples and gradients against the reference path, shared and per-sample inputs
        _check_exact_and_grads(ours, x)
        _check_exact_and_grads(ours, _input(kind, rng, lead=(3,)), per_sample=True)


def test_every_kind_after_to_sws(rng, bt_zoo):
    zoo = copy.deepcopy(bt_zoo)
    convert.from_bayesian_torch(zoo)
    zoo, rep = convert.to_sws(zoo, num_components=4, progress=False)
    assert rep["outliers"] > 0
    cb = next(iter(zoo.values())).codebook
    total = 0
    for name, layer in zoo.items():
        kind = name.replace("Reparameterization", "").replace("Flipout", "")
        assert type(layer).__name__ == "SWS" + kind, name
        assert layer.return_kl and not layer.dnn_to_bnn_flag and layer.codebook is cb
        x = _input(kind, rng)
        out, kl = layer(x)  # the mean-field layer returned (out, kl): so does its replacement
        total = total + kl
        _check_exact_and_grads(layer, x)
        _check_exact_and_grads(layer, _input(kind, rng, lead=(2,)), S=2, per_sample=True)
    _close(total, sws.kl_loss(zoo))
    _close(total, get_kl_loss(zoo))


def test_lstm_is_kept_with_its_inner_layers():
    model = nn.ModuleDict({"lstm": L.LSTMReparameterization(3, 4), "fc": L.LinearReparameterization(4, 2)})
    model, rep = convert.from_bayesian_torch(model)
    assert rep["converted"] == ["fc"] and "time step" in rep["skipped"]["lstm"]
    assert type(model["lstm"].ih).__name__ == "LinearReparameterization"  # untouched inside
    out, _, kl = model["lstm"](torch.randn(2, 5, 3))
    assert out.shape == (2, 5, 4)


# --------------------------------------------------------------------------------------------------
# plain PyTorch modules of the new kinds
# --------------------------------------------------------------------------------------------------

def test_plain_conv3d_and_transposed_convert(rng):
    torch.manual_seed(4)
    det = nn.ModuleDict({
        "c3": nn.Conv3d(2, 4, 3, padding=1, padding_mode="replicate", groups=2),
        "t1": nn.ConvTranspose1d(4, 2, 3, stride=2, output_padding=1, dilation=2, groups=2),
        "t2": nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, bias=False),
        "t3": nn.ConvTranspose3d(2, 2, 2, stride=2),
    })
    xs = {"c3": torch.randn(2, 2, 4, 4, 4, generator=rng), "t1": torch.randn(2, 4, 5, generator=rng),
          "t2": torch.randn(2, 4, 3, 3, generator=rng), "t3": torch.randn(1, 2, 2, 2, 2, generator=rng)}
    want = {k: det[k](x) for k, x in xs.items()}
    want_size = det["t2"](xs["t2"], output_size=(5, 5))
    bnn, rep = convert.to_mean_field(copy.deepcopy(det), moped=True, moped_delta=1e-7)
    assert sorted(rep["converted"]) == ["c3", "t1", "t2", "t3"]
    assert bnn["t1"].output_padding == (1,) and bnn["t1"].dilation == (2,) and bnn["c3"].padding_mode == "replicate"
    for k, x in xs.items():
        _close(bnn[k](x), want[k], rtol=1e-4, atol=1e-5)
    _close(bnn["t2"](xs["t2"], output_size=(5, 5)), want_size, rtol=1e-4, atol=1e-5)
    convert.to_sws(bnn, num_components=3, progress=False)
    for k, x in xs.items():
        layer = bnn[k]
        assert isinstance(layer, snn.SWS_LAYERS) and layer(x).shape == want[k].shape
        _check_exact_and_grads(layer, x, S=2)
    assert bnn["t2"](xs["t2"], output_size=(5, 5)).shape == want_size.shape
    with pytest.raises(ValueError, match="output_size"):
        bnn["t2"](xs["t2"], output_size=(9, 9))
    with pytest.raises(ValueError, match="output_padding"):
        snn.MeanFieldConvTranspose2d(2, 2, 3, stride=1, output_padding=1)
    with pytest.raises(ValueError, match="padding_mode"):
        snn.SWSConvTranspose1d(2, 2, 3, codebook=snn.Codebook(3), padding_mode="reflect")


def test_flipout_decorrelates_the_examples_of_a_batch(rng):
    """What users pick flipout for: with one weight draw per call, reparameterization gives every example of
    a batch the same perturbation (identical inputs -> identical outputs); flipout's random signs make the
    examples' perturbations uncorrelated, with each example's distribution unchanged."""
    torch.manual_seed(6)
    model = nn.ModuleDict({"f": L.LinearFlipout(6, 4, posterior_rho_init=-1.0),
                           "r": L.LinearReparameterization(6, 4, posterior_rho_init=-1.0)})
    convert.from_bayesian_torch(model)
    with torch.no_grad():
        model["r"].load_state_dict(model["f"].state_dict())
    x = torch.randn(1, 6, generator=rng).expand(2, 6)  # two identical examples
    with torch.no_grad():  # 1500 MC samples, each its own weight draw (and signs), as 1500 calls would be
        yf = model["f"](x, return_kl=False, samples=1500)
        yr = model["r"](x, return_kl=False, samples=1500)
    corr = lambda y: float(torch.corrcoef(torch.stack([y[:, 0, 0], y[:, 1, 0]]))[0, 1])  # noqa: E731
    assert corr(yr) > 0.999 and abs(corr(yf)) < 0.15
    torch.testing.assert_close(yf.var(0), yr.var(0), rtol=0.25, atol=0)  # same per-example spread
