"""Model conversion: deterministic -> mean-field (to_mean_field), bayesian-torch -> ours (from_bayesian_torch),
mean-field -> SWS (to_sws, the paper's pipeline of SPEC.md section 8, cleaned).

Every function converts in place (like bayesian-torch's dnn_to_bnn) and returns ``(model, report)``; the
report says what was converted and what was skipped and why.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import _checks, _gmm
from . import reference as _ref
from .nn import (MEAN_FIELD_LAYERS, SWS_LAYERS, Codebook, MeanFieldConv1d, MeanFieldConv2d, MeanFieldLinear,
                 SWSConv1d, SWSConv2d, SWSLinear, label_dtype, softplus_inv)
from . import nn as _snn  # the layer-kind registry (SWS_COUNTERPART, the new conv kinds)
from .attention import BayesianMultiheadAttention

log = logging.getLogger("sws_kernels")

__all__ = ["to_mean_field", "from_bayesian_torch", "to_sws"]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent = model
    *path, last = name.split(".")
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, last, new)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")


# --------------------------------------------------------------------------------------------------
# deterministic -> mean-field
# --------------------------------------------------------------------------------------------------

_SKIP_REASONS = {
    nn.RNNBase: "recurrent layers (RNN/LSTM/GRU) are not supported (their fused kernels read the packed weights "
                "directly and sws_kernels has no recurrent layer); kept deterministic",
    nn.Bilinear: "nn.Bilinear is not supported; kept deterministic",
    nn.Embedding: "embeddings are not converted; kept deterministic",
}

# plain PyTorch layer -> its mean-field counterpart (exact types: a subclass may have its own forward)
_PLAIN_TO_MEAN_FIELD = {
    nn.Linear: MeanFieldLinear, nn.Conv1d: MeanFieldConv1d, nn.Conv2d: MeanFieldConv2d, nn.Conv3d: _snn.MeanFieldConv3d,
    nn.ConvTranspose1d: _snn.MeanFieldConvTranspose1d, nn.ConvTranspose2d: _snn.MeanFieldConvTranspose2d,
    nn.ConvTranspose3d: _snn.MeanFieldConvTranspose3d,
}


def _rho_from_delta(w: torch.Tensor, delta: float) -> torch.Tensor:
    """MOPED: sigma = delta |w| -> rho = log(expm1(delta |w|) + 1e-20) (bayesian-torch's get_rho)."""
    return torch.log(torch.expm1(delta * w.abs()) + 1e-20)


def _mean_field_like(m: nn.Module, args) -> nn.Module:
    """The mean-field layer of plain layer ``m``'s kind and hyper-parameters (output_padding included)."""
    cls = _PLAIN_TO_MEAN_FIELD[type(m)]
    if isinstance(m, nn.Linear):
        return cls(m.in_features, m.out_features, *args)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                   m.output_padding, *args)
    return cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, *args,
               padding_mode=m.padding_mode)


def _disable_transformer_fast_path(model: nn.Module) -> List[str]:
    """nn.TransformerEncoder decides at construction whether its eval-mode fast path (nested tensors, a fused
    kernel reading ``self_attn.in_proj_weight`` etc. directly) may run: turn it off where its layers now hold
    Bayesian attention. (The layers' own fast path is skipped by ``in_proj_bias is None``, see
    sws_kernels.attention.) Returns the names of the encoders changed."""
    changed = []
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), BayesianMultiheadAttention) for layer in m.layers):
            if getattr(m, "use_nested_tensor", False):
                m.use_nested_tensor = False
                changed.append(name)
    return changed


def to_mean_field(model: nn.Module, prior_mean: float = 0.0, prior_variance: float = 1.0,
                  posterior_mu_init: float = 0.0, posterior_rho_init: float = -3.0, *, moped: bool = True,
                  moped_delta: float = 0.1):
    """Replace every nn.Linear / Conv1d / Conv2d / Conv3d / ConvTranspose1d/2d/3d by a mean-field layer and
    every nn.MultiheadAttention by a :class:`~sws_kernels.attention.BayesianMultiheadAttention` (whose q/k/v
    and output projections are mean-field layers), in place (like dnn_to_bnn).

    Hyper-parameters are kept exactly (stride, padding including 'same'/'valid', padding_mode, dilation,
    groups, output_padding, bias presence; attention's heads, dropout, batch_first, kdim/vdim, bias_k/bias_v,
    add_zero_attn), converted layers get ``dnn_to_bnn_flag = True`` (forward returns only the output, so
    nn.Sequential keeps working) and live on the original weight's device. By default (``moped=True``,
    MOPED init, SPEC.md section 8 step 0) mu = the pretrained weight and sigma = moped_delta * |w|, for
    weights and biases, so converting a trained model keeps what it learned; ``moped=False`` gives
    bayesian-torch's random init, mu ~ N(posterior_mu_init, 0.1), rho ~ N(posterior_rho_init, 0.1)
    (posterior_mu_init / posterior_rho_init are used only then). nn.TransformerEncoder(Layer) models keep
    working: their fused eval-mode fast path is never taken (``report["fast_path_disabled"]`` lists the
    encoders whose ``use_nested_tensor`` was turned off).

    Subclasses of those layers (their forward may read ``.weight``), recurrent layers and other
    parametrised modules are kept and listed in ``report["skipped"]`` with the reason. Returns
    ``(model, report)``.
    """
    _check_model(model)
    if isinstance(moped_delta, bool) or not isinstance(moped_delta, (int, float)) or moped_delta <= 0:
        raise ValueError(f"moped_delta: expected a positive float, got {moped_delta!r}")
    converted, skipped = [], {}
    skip_prefixes = []
    targets = []
    plain = tuple(_PLAIN_TO_MEAN_FIELD)
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in skip_prefixes):
            continue
        reason = next((r for cls, r in _SKIP_REASONS.items() if isinstance(m, cls)), None)
        if reason is not None:
            skipped[name] = reason
            skip_prefixes.append(name)
            continue
        if type(m) in _PLAIN_TO_MEAN_FIELD or type(m) is nn.MultiheadAttention:
            targets.append((name, m))
            skip_prefixes.append(name)  # attention's out_proj is converted with it
        elif isinstance(m, (*plain, nn.MultiheadAttention)):
            base = next(c for c in type(m).__mro__[1:] if c in _PLAIN_TO_MEAN_FIELD or c is nn.MultiheadAttention)
            skipped[name] = (f"{type(m).__name__} subclasses {base.__name__} with its own code that may read "
                             ".weight; kept deterministic")
            skip_prefixes.append(name)
        elif isinstance(m, (*MEAN_FIELD_LAYERS, *SWS_LAYERS, Codebook, BayesianMultiheadAttention)):
            continue
        elif any(True for _ in m.parameters(recurse=False)):
            skipped[name] = f"{type(m).__name__} has no Bayesian counterpart; kept deterministic"
    for name, m in targets:
        if name == "":
            raise TypeError(f"model: expected a container of layers, got a bare {type(m).__name__}; "
                            "wrap it (e.g. nn.Sequential(layer)) so it can be replaced")
        if isinstance(m, nn.MultiheadAttention):
            new = BayesianMultiheadAttention.from_torch(m, prior_mean, prior_variance, posterior_mu_init,
                                                        posterior_rho_init, moped=moped, moped_delta=moped_delta,
                                                        rho_from_delta=_rho_from_delta)
            _set_module(model, name, new)
            converted.append(name)
            continue
        args = (prior_mean, prior_variance, posterior_mu_init, posterior_rho_init, m.bias is not None)
        new = _mean_field_like(m, args).to(m.weight.device)
        if moped:
            with torch.no_grad():
                new.weight_mu.copy_(m.weight)
                new.weight_rho.copy_(_rho_from_delta(m.weight, moped_delta))
                if m.bias is not None:
                    new.mu_bias.copy_(m.bias)
                    new.rho_bias.copy_(_rho_from_delta(m.bias, moped_delta))
        new.dnn_to_bnn_flag = True
        new.train(m.training)
        _set_module(model, name, new)
        converted.append(name)
    fast = _disable_transformer_fast_path(model)
    for name, why in skipped.items():
        log.info("to_mean_field: skipped %s: %s", name or "<model>", why)
    return model, {"converted": converted, "skipped": skipped, "fast_path_disabled": fast}


# --------------------------------------------------------------------------------------------------
# bayesian-torch -> ours
# --------------------------------------------------------------------------------------------------

_BT_KINDS = {
    "Linear": MeanFieldLinear, "Conv1d": MeanFieldConv1d, "Conv2d": MeanFieldConv2d, "Conv3d": _snn.MeanFieldConv3d,
    "ConvTranspose1d": _snn.MeanFieldConvTranspose1d, "ConvTranspose2d": _snn.MeanFieldConvTranspose2d,
    "ConvTranspose3d": _snn.MeanFieldConvTranspose3d,
}
_BT_CLASSES = {k + flavour: v for k, v in _BT_KINDS.items() for flavour in ("Reparameterization", "Flipout")}

_BT_LSTM_REASON = ("bayesian-torch's LSTM is kept as it is, with its inner Linear layers: it draws new ih/hh "
                   "weights at every time step and returns the KL summed over steps (its own estimator, which "
                   "sws_kernels' layers would change), and sws_kernels has no recurrent layer")


def _prior_value(t, name):
    """A scalar when the prior tensor is constant (the usual case), else the tensor itself."""
    if not isinstance(t, torch.Tensor):
        return float(t)
    if t.numel() and bool((t == t.reshape(-1)[0]).all()):
        return float(t.reshape(-1)[0])
    return t.detach().clone()


def from_bayesian_torch(model: nn.Module):
    """Replace bayesian-torch's Linear / Conv1d/2d/3d / ConvTranspose1d/2d/3d layers (Reparameterization and
    Flipout) by ours, in place.

    mu/rho, priors (including non-constant prior tensors), posterior inits, bias presence, output_padding and
    ``dnn_to_bnn_flag`` carry over, so the forward contract (``(out, kl)`` or ``out``) and bayesian-torch's
    ``get_kl_loss`` keep working. Flipout layers become reparameterisation layers (listed in
    ``report["flipout_as_reparameterization"]``): the same posterior and the same output distribution for
    each example, another gradient estimator (flipout decorrelates the examples of a batch with random
    signs; ours draws one weight sample per call, per sample with ``samples=``). LSTM layers are kept with
    their inner layers (``report["skipped"]`` says why). bayesian-torch need not be installed: layers are
    recognised by class name and module. Returns ``(model, report)``.
    """
    _check_model(model)
    converted, skipped, flipout = [], {}, []
    todo, skip_prefixes = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in skip_prefixes):
            continue
        mod = type(m).__module__ or ""
        if not mod.startswith("bayesian_torch"):
            continue
        cls = _BT_CLASSES.get(type(m).__name__)
        if cls is None:
            if "layers" in mod and hasattr(m, "kl_loss") and type(m).__name__ != "BaseVariationalLayer_":
                skipped[name] = (_BT_LSTM_REASON if "LSTM" in type(m).__name__ else
                                 f"{type(m).__name__} has no sws_kernels counterpart; kept")
                skip_prefixes.append(name)
            continue
        todo.append((name, m, cls))
    for name, m, cls in todo:
        if name == "":
            raise TypeError(f"model: expected a container of layers, got a bare {type(m).__name__}; wrap it")
        mu_init = m.posterior_mu_init[0] if isinstance(m.posterior_mu_init, tuple) else m.posterior_mu_init
        rho_init = m.posterior_rho_init[0] if isinstance(m.posterior_rho_init, tuple) else m.posterior_rho_init
        has_bias = getattr(m, "mu_bias", None) is not None
        pargs = (float(m.prior_mean), float(m.prior_variance), float(mu_init), float(rho_init), has_bias)
        if cls is MeanFieldLinear:
            new = cls(m.in_features, m.out_features, *pargs)
            mu, rho = m.mu_weight, m.rho_weight
        elif issubclass(cls, _snn._MeanFieldConvTransposeNd):
            new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                      m.output_padding, *pargs)
            mu, rho = m.mu_kernel, m.rho_kernel
        else:
            new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, *pargs)
            mu, rho = m.mu_kernel, m.rho_kernel
        if tuple(new.weight_mu.shape) != tuple(mu.shape):
            raise ValueError(f"{name}: expected weight shape {tuple(new.weight_mu.shape)} from its hyper-parameters, "
                             f"got {tuple(mu.shape)}")
        new = new.to(mu.device)
        with torch.no_grad():
            new.weight_mu.copy_(mu)
            new.weight_rho.copy_(rho)
            if has_bias:
                new.mu_bias.copy_(m.mu_bias)
                new.rho_bias.copy_(m.rho_bias)
        for ours, theirs in (("prior_weight_mu", "prior_weight_mu"), ("prior_weight_sigma", "prior_weight_sigma"),
                             ("prior_bias_mu", "prior_bias_mu"), ("prior_bias_sigma", "prior_bias_sigma")):
            t = getattr(m, theirs, None)
            if t is None or getattr(new, ours) is None:
                continue
            v = _prior_value(t, theirs)
            setattr(new, ours, torch.as_tensor(v, dtype=torch.float32, device=mu.device).clone())
        new.dnn_to_bnn_flag = bool(getattr(m, "dnn_to_bnn_flag", False))
        new.train(m.training)
        _set_module(model, name, new)
        converted.append(name)
        if type(m).__name__.endswith("Flipout"):
            flipout.append(name)
    return model, {"converted": converted, "skipped": skipped, "flipout_as_reparameterization": flipout}


def _sws_like(m: nn.Module, common: dict) -> nn.Module:
    """The SWS layer to_sws puts in mean-field layer ``m``'s place (SPEC.md section 8, step 7): the same kind
    and hyper-parameters, bias = mu_bias (deterministic), and m's forward contract: ``return_kl=True`` with
    m's ``dnn_to_bnn_flag``, so it returns ``(out, kl)`` where m did and ``out`` where m did (its KL is
    :meth:`~sws_kernels.nn._SWSLayer.layer_kl`)."""
    has_bias = m.mu_bias is not None
    cls = next(s for mf, s in _snn.SWS_COUNTERPART.items() if isinstance(m, mf))
    if isinstance(m, MeanFieldLinear):
        new = cls(m.in_features, m.out_features, has_bias, **common)
    elif isinstance(m, _snn._MeanFieldConvTransposeNd):
        new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.output_padding, m.groups,
                  has_bias, m.dilation, **common)
    else:
        new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                  has_bias, padding_mode=m.padding_mode, **common)
    new.return_kl = True
    new.dnn_to_bnn_flag = m.dnn_to_bnn_flag
    if has_bias:
        with torch.no_grad():
            new.bias.copy_(m.mu_bias.detach())
    new.train(m.training)
    return new


# --------------------------------------------------------------------------------------------------
# mean-field -> SWS
# --------------------------------------------------------------------------------------------------

def _param_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Gathered:
    """Every mean-field weight's (mu, rho) in one float64 vector, layer i owning [offsets[i], offsets[i+1])."""
    layers: List[Tuple[str, nn.Module]]
    offsets: List[int]
    mu: torch.Tensor
    rho: torch.Tensor
    params_before: int
    bytes_before: int

    @property
    def num_weights(self) -> int:
        return self.offsets[-1]


@dataclass
class _Outliers:
    """Outliers found before the fit (masks over all weights) and the inliers' flat indices."""
    by_magnitude: torch.Tensor
    by_gradient: torch.Tensor
    mask: torch.Tensor
    inliers: torch.Tensor


@dataclass
class _Fit:
    """The GMM fitted in the standardised space z = (x - center) / scale, x = (mu, rho)."""
    center: torch.Tensor
    scale: torch.Tensor
    Z: torch.Tensor
    n_fit: int
    K: int
    weights: torch.Tensor
    means: torch.Tensor
    S: torch.Tensor
    info: dict


@dataclass
class _Assignment:
    """Inliers that stay inliers (flat indices) with their top-2 components, ellipse flags and alphas; the
    weights that became outliers after the fit; the components too small to keep."""
    inliers: torch.Tensor
    c1: torch.Tensor
    c2: torch.Tensor
    is_ellipse: torch.Tensor
    alpha: torch.Tensor
    small: torch.Tensor
    out_small_idx: torch.Tensor
    out_ellipse_idx: torch.Tensor


@dataclass
class _Merged:
    """Compacted components after W2 merging (standardised space) and the inliers' labels into them."""
    means: torch.Tensor
    S: torch.Tensor
    lab1: torch.Tensor
    lab2: torch.Tensor
    is_ellipse: torch.Tensor

    @property
    def K(self) -> int:
        return self.means.shape[0]


def _check_to_sws_args(model, num_components, tau_w, tau_d, mahalanobis, grad_fraction, mode, gradients):
    """to_sws's argument checks; returns the mean-field layers to convert as [(name, module)]."""
    _check_model(model)
    K_req = num_components
    if isinstance(K_req, bool) or not isinstance(K_req, int) or K_req < 1:
        raise ValueError(f"num_components: expected a positive int, got {K_req!r}")
    for nm, v in (("tau_w", tau_w), ("tau_d", tau_d), ("mahalanobis", mahalanobis)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{nm}: expected a non-negative float, got {v!r}")
    if not 0 <= grad_fraction < 1:
        raise ValueError(f"grad_fraction: expected a value in [0, 1), got {grad_fraction!r}")
    _checks.mode(mode)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MEAN_FIELD_LAYERS)]
    if not layers:
        kinds = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(False))})
        raise TypeError("model: expected at least one sws_kernels mean-field layer (MeanFieldLinear/Conv1d/Conv2d; "
                        f"use to_mean_field or from_bayesian_torch first), found parametrised modules {kinds}")
    if any(n == "" for n, _ in layers):
        raise TypeError("model: expected a container of layers, got a bare mean-field layer; wrap it")
    if gradients is not None and not isinstance(gradients, dict):
        raise TypeError(f"gradients: expected a dict {{layer name: tensor}}, got {_checks.describe(gradients)}")
    names = [n for n, _ in layers]
    if gradients:
        unknown = sorted(set(gradients) - set(names))
        if unknown:
            raise ValueError(f"gradients: expected keys among the mean-field layers {names}, got unknown {unknown}")
    return layers


def _gather(layers, work_dev) -> _Gathered:
    """SPEC.md section 8, step 1: (mu, rho) of every mean-field weight (biases excluded), flattened in layer
    order into float64 vectors on ``work_dev``; the parameter count and bytes before conversion."""
    offsets = [0]
    for _, m in layers:
        offsets.append(offsets[-1] + m.weight_mu.numel())
    mu = torch.cat([m.weight_mu.detach().reshape(-1).to(work_dev, torch.float64) for _, m in layers])
    rho = torch.cat([m.weight_rho.detach().reshape(-1).to(work_dev, torch.float64) for _, m in layers])
    before_tensors = [p.detach() for _, m in layers for p in m.parameters(recurse=False)]
    return _Gathered(layers, offsets, mu, rho, sum(t.numel() for t in before_tensors), _param_bytes(before_tensors))


def _find_outliers(g: _Gathered, tau_w, gradients, grad_fraction, work_dev) -> _Outliers:
    """SPEC.md section 8, step 2 (before the fit): outliers by magnitude (|mu| >= tau_w) and, when
    ``gradients`` is given, the top ``grad_fraction`` of |accumulated mu-gradient|. The third kind (members
    of tiny components) needs the fit: :func:`_assign`."""
    N = g.num_weights
    out_w = g.mu.abs() >= tau_w
    out_g = torch.zeros(N, dtype=torch.bool, device=work_dev)
    if gradients:
        grad = torch.zeros(N, dtype=torch.float64, device=work_dev)
        for i, (n, m) in enumerate(g.layers):
            if n in gradients:
                gt = gradients[n]
                _checks.tensor(gt, f"gradients[{n!r}]", floating=True)
                if tuple(gt.shape) != tuple(m.weight_mu.shape):
                    raise ValueError(f"gradients[{n!r}]: expected the weight shape {tuple(m.weight_mu.shape)}, "
                                     f"got {_checks.describe(gt)}")
                grad[g.offsets[i]:g.offsets[i + 1]] = gt.detach().reshape(-1).to(work_dev, torch.float64).abs()
        n_top = int(math.ceil(grad_fraction * N))
        if n_top:
            out_g[torch.topk(grad, n_top).indices] = True
    outlier = out_w | out_g
    inl = (~outlier).nonzero().squeeze(1)
    if inl.numel() == 0:
        raise ValueError(f"tau_w: every weight is an outlier (|mu| >= {tau_w} or top gradients); nothing to fit")
    return _Outliers(out_w, out_g, outlier, inl)


def _fit_gmm(g: _Gathered, inl, K_req, fit_samples, gen, max_iter, tol, reg, progress, notes, work_dev) -> _Fit:
    """SPEC.md section 8, step 3: a full-covariance 2D GMM (k-means++ then EM, float64) fitted to
    ``fit_samples`` random inliers in the space standardised per coordinate; K is capped by the number of
    points fitted (said in ``notes``)."""
    X = torch.stack([g.mu[inl], g.rho[inl]], -1)
    center = X.mean(0)
    scale = X.std(0).clamp_min(1e-12)
    Z = (X - center) / scale
    n_fit = min(fit_samples, Z.shape[0])
    sub = torch.randperm(Z.shape[0], generator=gen)[:n_fit].to(work_dev)
    K = min(K_req, n_fit)
    if K < K_req:
        notes.append(f"num_components reduced from {K_req} to {K}: only {n_fit} points to fit")
    weights, means, S, info = _gmm.fit_em(Z[sub], K, generator=gen, max_iter=max_iter, tol=tol, reg=reg,
                                          progress=progress)
    return _Fit(center, scale, Z, n_fit, K, weights, means, S, info)


def _assign(fit: _Fit, inl, min_component_size, mahalanobis, progress) -> _Assignment:
    """SPEC.md section 8, step 4 (and step 2's post-fit outliers): every inlier goes to its most responsible
    component; members of components with <= ``min_component_size`` weights become outliers; an inlier whose
    squared Mahalanobis distance exceeds ``mahalanobis`` becomes an ellipse weight between its top two
    components with alpha = r1 / (r1 + r2) = sigmoid(log r1 - log r2), unless its second component was
    dropped as too small (then it becomes an outlier)."""
    c1, c2, gap, maha = _gmm.assign_top2_grid(fit.Z, fit.weights, fit.means, fit.S, progress=progress)
    counts = torch.bincount(c1, minlength=fit.K)
    small = counts <= min_component_size
    if bool(small.all()):
        raise ValueError(f"min_component_size: every fitted component has <= {min_component_size} members "
                         f"(largest: {int(counts.max())}); nothing would remain for the codebook")
    small_member = small[c1]
    # members of tiny components become outliers
    out_small_idx = inl[small_member]
    keep = ~small_member
    inl, c1, c2, gap, maha = inl[keep], c1[keep], c2[keep], gap[keep], maha[keep]
    is_ell = (maha > mahalanobis) & (c1 != c2)
    ell_small = is_ell & small[c2]  # its second component was dropped: keep the weight's own Gaussian
    out_ell_idx = inl[ell_small]
    is_ell = is_ell & ~ell_small
    keep2 = ~ell_small
    inl, c1, c2, gap, is_ell = inl[keep2], c1[keep2], c2[keep2], gap[keep2], is_ell[keep2]
    alpha = torch.sigmoid(gap)  # r1 / (r1 + r2), from log responsibilities
    return _Assignment(inl, c1, c2, is_ell, alpha, small, out_small_idx, out_ell_idx)


def _merge(fit: _Fit, a: _Assignment, tau_d, work_dev) -> _Merged:
    """SPEC.md section 8, step 5: drop the tiny components, merge those closer than ``tau_d`` in squared W2
    distance (standardised space, mass = soft counts) by moment matching to a fixed point, relabel, and
    compact away components no weight uses. An ellipse whose two components merged becomes an inlier."""
    alive = ~a.small
    old_ids = alive.nonzero().squeeze(1)
    mass = fit.weights[alive] * fit.n_fit
    mass, m_means, m_S, mapping = _gmm.merge_w2(mass, fit.means[alive], fit.S[alive], tau_d)
    full_map = torch.full((fit.K,), -1, dtype=torch.int64, device=work_dev)
    full_map[old_ids] = mapping
    lab1, lab2 = full_map[a.c1], full_map[a.c2]
    merged_same = a.is_ellipse & (lab1 == lab2)  # both of its components merged: an ordinary inlier
    is_ell = a.is_ellipse & ~merged_same
    used = torch.zeros(m_means.shape[0], dtype=torch.bool, device=work_dev)
    used[lab1] = True
    used[lab2[is_ell]] = True
    compact = torch.cumsum(used.long(), 0) - 1
    return _Merged(m_means[used], m_S[used], compact[lab1], compact[lab2], is_ell)


def _codebook_from_fit(fit: _Fit, merged: _Merged, device) -> Codebook:
    """SPEC.md section 8, step 6 (posterior = prior = the fit): the merged components mapped back from the
    standardised space to (mu, rho) (mean = center + scale * z, Sigma = D Sigma_z D) as one Codebook."""
    scale = fit.scale
    means_o = fit.center + scale * merged.means
    S11 = merged.S[:, 0] * scale[0] ** 2
    S12 = merged.S[:, 1] * scale[0] * scale[1]
    S22 = merged.S[:, 2] * scale[1] ** 2
    l11 = torch.sqrt(S11)
    l21 = S12 / l11
    l22 = torch.sqrt((S22 - l21 ** 2).clamp_min(1e-30))
    chol = torch.stack([softplus_inv(l11.float()), l21.float(), softplus_inv(l22.float())], -1)
    return Codebook(merged.K, means=means_o.float(), chol=chol).to(device)


def _build_layers(model, g: _Gathered, outliers: _Outliers, a: _Assignment, merged: _Merged, codebook: Codebook,
                  mode, work_dev):
    """SPEC.md section 8, step 6: replace every mean-field layer in place by the SWS layer of the same
    hyper-parameters: labels (narrowest integer dtype), ellipse and outlier buffers (outliers keep their own
    mu, rho), the shared codebook, the layer's rng_id; bias = mu_bias (deterministic). Returns the full
    outlier and ellipse masks over all weights and the label dtype, for the report."""
    N = g.num_weights
    inl, is_ell = a.inliers, merged.is_ellipse
    out_all = torch.zeros(N, dtype=torch.bool, device=work_dev)
    out_all[outliers.mask] = True
    out_all[a.out_small_idx] = True
    out_all[a.out_ellipse_idx] = True
    label_full = torch.zeros(N, dtype=torch.int64, device=work_dev)
    label_full[inl] = merged.lab1
    ell_full = torch.zeros(N, dtype=torch.bool, device=work_dev)
    ell_full[inl[is_ell]] = True
    comp_b_full = torch.zeros(N, dtype=torch.int64, device=work_dev)
    comp_b_full[inl[is_ell]] = merged.lab2[is_ell]
    alpha_full = torch.zeros(N, dtype=torch.float64, device=work_dev)
    alpha_full[inl[is_ell]] = a.alpha[is_ell]
    # outliers' labels point at their nearest component (unused by the kernels, but a valid index)
    ldt = label_dtype(merged.K)
    for i, (name, m) in enumerate(g.layers):
        lo, hi = g.offsets[i], g.offsets[i + 1]
        dev = m.weight_mu.device
        shape = tuple(m.weight_mu.shape)
        lab = label_full[lo:hi]
        e_loc = ell_full[lo:hi].nonzero().squeeze(1)
        o_loc = out_all[lo:hi].nonzero().squeeze(1)
        ellipse = (e_loc.to(dev), lab[e_loc].to(dev), comp_b_full[lo:hi][e_loc].to(dev),
                   alpha_full[lo:hi][e_loc].float().to(dev))
        outl = (o_loc.to(dev), g.mu[lo:hi][o_loc].float().to(dev), g.rho[lo:hi][o_loc].float().to(dev))
        common = dict(codebook=codebook, mode=mode, labels=lab.reshape(shape).to(dev), ellipse=ellipse,
                      outliers=outl, rng_id=m.owner)
        _set_module(model, name, _sws_like(m, common))
    return out_all, ell_full, ldt


def _report(model, g: _Gathered, outliers: _Outliers, a: _Assignment, fit: _Fit, codebook: Codebook, out_all,
            ell_full, ldt, t0, t_fit, notes) -> dict:
    """SPEC.md section 8, step 6's report: counts of Gaussians / ellipses / outliers (by reason), trainable
    parameters and bytes before and after with their ratios, EM diagnostics and the time taken."""
    names = [n for n, _ in g.layers]
    N = g.num_weights
    new_layers = [dict(model.named_modules())[n] for n in names]
    cb_params = [codebook.means, codebook.chol]
    trainable_after = sum(p.numel() for p in cb_params) + sum(
        m.outlier_mu.numel() + m.outlier_rho.numel() + (m.bias.numel() if m.bias is not None else 0)
        for m in new_layers)
    # everything the converted layers store (the shared codebook once, priors and buffers included)
    seen, stored_after = set(), []
    for m in new_layers:
        for t in m.state_dict(keep_vars=True).values():
            if id(t) not in seen:
                seen.add(id(t))
                stored_after.append(t)
    bytes_after = _param_bytes(stored_after)
    n_out = int(out_all.sum())
    out_w, out_g = outliers.by_magnitude, outliers.by_gradient
    return {
        "layers": names,
        "num_weights": N,
        "gaussians": codebook.num_components,
        "gaussians_fitted": fit.K,
        "ellipses": int(ell_full.sum()),
        "outliers": n_out,
        "outliers_by_reason": {"magnitude": int(out_w.sum()), "gradient": int((out_g & ~out_w).sum()),
                               "small_component": int(a.out_small_idx.numel()),
                               "ellipse_partner_dropped": int(a.out_ellipse_idx.numel())},
        "inliers": N - n_out - int(ell_full.sum()),
        "label_dtype": str(ldt).replace("torch.", ""),
        "params_before": g.params_before,
        "params_after": trainable_after,
        "params_ratio": g.params_before / max(trainable_after, 1),
        "bytes_before": g.bytes_before,
        "bytes_after": bytes_after,
        "bytes_ratio": g.bytes_before / max(bytes_after, 1),
        "em": fit.info,
        "seconds_fit": t_fit,
        "seconds": time.perf_counter() - t0,
        "notes": notes,
    }


def to_sws(model: nn.Module, num_components: int = 4096, *, tau_w: float = 0.2, tau_d: float = 1e-4,
           gradients: Optional[Dict[str, torch.Tensor]] = None, grad_fraction: float = 0.01,
           min_component_size: int = 20, mahalanobis: float = 5.991, fit_samples: int = 65536,
           max_iter: int = 30, tol: float = 1e-5, reg: float = 1e-5, mode: str = "paper", seed: int = 0,
           device=None, progress: bool = True):
    """Compress a mean-field BNN into an SWS BNN with one shared codebook (SPEC.md section 8), in place.

    Steps: gather (mu, rho) of every mean-field weight (biases excluded; they become the SWS layers'
    deterministic biases, = mu_bias); outliers are |mu| >= tau_w, the top ``grad_fraction`` of
    |accumulated mu-gradient| when ``gradients`` ({layer name: tensor of the weight's shape}, e.g. summed
    |dL/dmu| over an epoch) is given, and after the fit the members of components with <=
    ``min_component_size`` weights; a full-covariance 2D GMM (k-means++ then EM, float64, in the space
    standardised per coordinate, diagonal jitter ``reg``) is fitted to ``fit_samples`` random inliers;
    every inlier goes to its most responsible component, or, when its squared Mahalanobis distance to it
    exceeds ``mahalanobis`` (chi^2_2 95%), becomes an ellipse weight blending its two most responsible
    components with alpha = r1 / (r1 + r2) = sigmoid(log r1 - log r2); components closer than ``tau_d``
    in squared 2-Wasserstein distance (measured in the standardised space) merge by mass-weighted moment
    matching until none is; labels are compacted. Posterior = prior = the fit.

    Each step is one function of this module (``_gather``, ``_find_outliers``, ``_fit_gmm``, ``_assign``,
    ``_merge``, ``_codebook_from_fit``, ``_build_layers``, ``_report``) whose docstring names its SPEC step.

    Returns ``(model, report)``; the report has the counts of Gaussians / ellipses / outliers (by reason),
    trainable parameters and bytes before and after with their ratios, EM diagnostics and the time taken.
    Timing (benchmarks/bench_convert.py, 11,678,912 ResNet-18 weights, K = 4096, 2-core CPU shared with
    other jobs): 386 s wall at load average ~4 (222 s to the end of EM, the rest the exact top-2
    assignment of every weight with grid pruning); 579 s wall at load average ~6. Result: 3,910
    Gaussians, 794,294 ellipses, 22,318 outliers; 358x fewer trainable parameters, 2.5x fewer bytes.
    Note: by construction ~5% of a Gaussian's own members exceed the chi^2_2 95% quantile, so the
    Mahalanobis rule of SPEC.md makes ~5-7% of the weights ellipses.
    """
    t0 = time.perf_counter()
    layers = _check_to_sws_args(model, num_components, tau_w, tau_d, mahalanobis, grad_fraction, mode, gradients)
    work_dev = torch.device(device) if device is not None else layers[0][1].weight_mu.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    notes = []
    # SPEC.md section 8, one function per step
    gathered = _gather(layers, work_dev)                                              # 1. (mu, rho)
    outliers = _find_outliers(gathered, tau_w, gradients, grad_fraction, work_dev)    # 2. outliers
    fit = _fit_gmm(gathered, outliers.inliers, num_components, fit_samples, gen, max_iter, tol, reg, progress,
                   notes, work_dev)                                                   # 3. GMM fit
    t_fit = time.perf_counter() - t0
    assignment = _assign(fit, outliers.inliers, min_component_size, mahalanobis, progress)  # 4. labels, ellipses
    merged = _merge(fit, assignment, tau_d, work_dev)                                 # 5. W2 merging
    codebook = _codebook_from_fit(fit, merged, layers[0][1].weight_mu.device)         # 6. posterior = prior = fit
    out_all, ell_full, ldt = _build_layers(model, gathered, outliers, assignment, merged, codebook, mode,
                                           work_dev)                                  # 6. the SWS layers
    report = _report(model, gathered, outliers, assignment, fit, codebook, out_all, ell_full, ldt, t0, t_fit,
                     notes)                                                           # 6. the report
    return model, report
