"""Model conversion: deterministic -> mean-field (to_mean_field), bayesian-torch -> ours (from_bayesian_torch),
mean-field -> SWS (to_sws, the paper's pipeline of SPEC.md section 8, cleaned).

Every function converts in place (like bayesian-torch's dnn_to_bnn) and returns ``(model, report)``; the
report says what was converted and what was skipped and why.
"""
from __future__ import annotations

import copy
import logging
import math
import time
import warnings
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
    ``get_kl_loss`` keep working. Flipout layers keep their estimator (``estimator = "flipout"`` on our
    layer, listed in ``report["flipout"]``): the mean through PyTorch's op plus the perturbation sampled by
    our kernel with per-example random signs (:meth:`sws_kernels.nn._MeanFieldLayer._flipout_call`). LSTM
    layers are kept with their inner layers (``report["skipped"]`` says why). bayesian-torch need not be installed: layers are
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
        if type(m).__name__.endswith("Flipout"):
            new.estimator = "flipout"
            flipout.append(name)
        new.train(m.training)
        _set_module(model, name, new)
        converted.append(name)
    return model, {"converted": converted, "skipped": skipped, "flipout": flipout}


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


def _state_bytes(modules) -> int:
    """Bytes of every tensor the modules' state_dicts hold, each tensor counted once (shared codebooks)."""
    seen, total = set(), 0
    for m in modules:
        for t in m.state_dict(keep_vars=True).values():
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


#: ``num_components="auto"`` picks K = min(AUTO_MAX_COMPONENTS, inliers // AUTO_INLIERS_PER_COMPONENT), at least 1.
#: 256 keeps labels uint8 (1 byte per weight): with int16 labels (K > 256) an SWS model cannot be 4x smaller in
#: memory than its fp32 mean-field source (2 of its 8 bytes per weight), which the paper's "75% smaller" needs.
AUTO_MAX_COMPONENTS = 256
AUTO_INLIERS_PER_COMPONENT = 50
#: the chi-squared(2) 99.9% quantile: -2 log(0.001)
DEFAULT_ELLIPSE_CHI2 = 13.816
#: tau_w="auto": max(AUTO_TAU_W_FLOOR, the AUTO_TAU_W_QUANTILE quantile of |mu|)
AUTO_TAU_W_FLOOR = 0.2
AUTO_TAU_W_QUANTILE = 0.99
#: fine cells per coordinate of the assignment's pruning grid (used from 4 * 256^2 inliers up)
_ASSIGN_GRID = 256


@dataclass
class _Gathered:
    """The mean-field layers to convert, weight i of layer l at global index offsets[l] + i (flattened
    row-major); read in chunks, never concatenated (bounded memory at any model size)."""
    layers: List[Tuple[str, nn.Module]]
    offsets: List[int]
    params_before: int
    bytes_before: int
    bytes_before_parts: dict
    work_dev: torch.device
    chunk: int

    @property
    def num_weights(self) -> int:
        return self.offsets[-1]

    def flat(self, i: int, which: str) -> torch.Tensor:
        m = self.layers[i][1]
        return (m.weight_mu if which == "mu" else m.weight_rho).detach().reshape(-1)

    def chunks(self, with_rho: bool = True):
        """Yields (layer index, local start, global start, mu, rho) float32 chunks on the working device (every
        threshold is compared in float32, the weights' own precision, so all passes agree)."""
        for i in range(len(self.layers)):
            mu_f = self.flat(i, "mu")
            rho_f = self.flat(i, "rho") if with_rho else None
            for lo in range(0, mu_f.numel(), self.chunk):
                hi = min(lo + self.chunk, mu_f.numel())
                mu = mu_f[lo:hi].to(self.work_dev, torch.float32)
                rho = rho_f[lo:hi].to(self.work_dev, torch.float32) if with_rho else None
                yield i, lo, self.offsets[i] + lo, mu, rho


@dataclass
class _Outliers:
    """Outliers found before the fit: |mu| >= tau_w, and the top-gradient weights (sorted global positions)."""
    tau_w: float
    tau_w_quantile: Optional[float]
    grad_pos: torch.Tensor
    n_magnitude: int
    n_gradient: int
    n_inliers: int

    def mask(self, glo: int, mu: torch.Tensor) -> torch.Tensor:
        """Outlier mask of a chunk starting at global index ``glo``."""
        out = mu.abs() >= self.tau_w
        if self.grad_pos.numel():
            a, b = torch.searchsorted(self.grad_pos, torch.tensor([glo, glo + mu.numel()],
                                                                   device=self.grad_pos.device)).tolist()
            if b > a:
                out[(self.grad_pos[a:b] - glo).to(out.device)] = True
        return out


@dataclass
class _Fit:
    """The GMM fitted in the standardised space z = (x - center) / scale, x = (mu, rho)."""
    center: torch.Tensor
    scale: torch.Tensor
    Zfit: torch.Tensor
    n_fit: int
    K: int
    weights: torch.Tensor
    means: torch.Tensor
    S: torch.Tensor
    info: dict


@dataclass
class _Assignment:
    """Per layer: each weight's most responsible component (int16/int32, -1 for an outlier, on the working
    device); the ellipse weights (sorted global positions, second component, log-responsibility gap); the
    count of each outlier kind found after the fit and the components too small to keep."""
    labels: List[torch.Tensor]
    ell_pos: torch.Tensor
    ell_c2: torch.Tensor
    ell_gap: torch.Tensor
    counts: torch.Tensor
    small: torch.Tensor
    n_small_members: int
    n_partner_dropped: int
    stats: dict


@dataclass
class _Merged:
    """Compacted components after W2 merging (standardised space) and the map old component -> new label
    (-1: dropped)."""
    means: torch.Tensor
    S: torch.Tensor
    final_map: torch.Tensor

    @property
    def K(self) -> int:
        return self.means.shape[0]


def _check_to_sws_args(model, num_components, tau_w, tau_d, ellipse_chi2, grad_fraction, mode, gradients,
                       min_component_size, fit_samples, chunk_size):
    """to_sws's argument checks; returns the mean-field layers to convert as [(name, module)]."""
    _check_model(model)
    K_req = num_components
    if K_req != "auto" and (isinstance(K_req, bool) or not isinstance(K_req, int) or K_req < 1):
        raise ValueError(f"num_components: expected a positive int or 'auto', got {K_req!r}")
    if tau_w != "auto" and (isinstance(tau_w, bool) or not isinstance(tau_w, (int, float)) or not tau_w >= 0):
        raise ValueError(f"tau_w: expected a non-negative float or 'auto', got {tau_w!r}")
    for nm, v in (("tau_d", tau_d), ("ellipse_chi2", ellipse_chi2)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{nm}: expected a non-negative float, got {v!r}")
    if isinstance(grad_fraction, bool) or not isinstance(grad_fraction, (int, float)) or not 0 <= grad_fraction < 1:
        raise ValueError(f"grad_fraction: expected a value in [0, 1), got {grad_fraction!r}")
    for nm, v, lo in (("min_component_size", min_component_size, 0), ("fit_samples", fit_samples, 1),
                      ("chunk_size", chunk_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{nm}: expected an int >= {lo}, got {v!r}")
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
        for n, m in layers:
            if n in gradients:
                gt = gradients[n]
                _checks.tensor(gt, f"gradients[{n!r}]", floating=True)
                if tuple(gt.shape) != tuple(m.weight_mu.shape):
                    raise ValueError(f"gradients[{n!r}]: expected the weight shape {tuple(m.weight_mu.shape)}, "
                                     f"got {_checks.describe(gt)}")
    return layers


def _gather(layers, work_dev, chunk) -> _Gathered:
    """SPEC.md section 8, step 1: the mean-field weights (biases excluded) in layer order, read in chunks of
    ``chunk`` as float64 on ``work_dev``; the trainable parameters and bytes (per part) before conversion."""
    offsets = [0]
    for _, m in layers:
        offsets.append(offsets[-1] + m.weight_mu.numel())
    mods = [m for _, m in layers]
    params = [p.detach() for m in mods for p in m.parameters(recurse=False)]
    w = _param_bytes([t for m in mods for t in (m.weight_mu, m.weight_rho)])
    b = _param_bytes([t for m in mods if m.mu_bias is not None for t in (m.mu_bias, m.rho_bias)])
    total = _state_bytes(mods)
    parts = {"weights": w, "biases": b, "other": total - w - b, "total": total}
    return _Gathered(layers, offsets, sum(t.numel() for t in params), total, parts, work_dev, chunk)


def _top_values(chunks, k: int, with_index: bool = False):
    """The k largest values over an iterable of (global start, 1-D values) chunks, in bounded memory
    (a running top-k over buffers of at least k values: O(N) work, O(k + chunk) memory). Returns the values
    (descending) and, with ``with_index``, their global positions."""
    best_v = best_i = None
    buf_v, buf_i, buffered = [], [], 0

    def flush():
        nonlocal best_v, best_i, buf_v, buf_i, buffered
        v = torch.cat(([best_v] if best_v is not None else []) + buf_v)
        i = torch.cat(([best_i] if best_i is not None else []) + buf_i) if with_index else None
        top = v.topk(min(k, v.numel()))
        best_v = top.values
        best_i = i[top.indices] if with_index else None
        buf_v, buf_i, buffered = [], [], 0
    for glo, v in chunks:
        buf_v.append(v)
        if with_index:
            buf_i.append(torch.arange(glo, glo + v.numel(), device=v.device))
        buffered += v.numel()
        if buffered >= max(k, 1 << 20):
            flush()
    if buffered or best_v is None:
        flush()
    return best_v, best_i


def _find_outliers(g: _Gathered, tau_w, gradients, grad_fraction) -> _Outliers:
    """SPEC.md section 8, step 2 (before the fit): outliers by magnitude, |mu| >= tau_w, with ``tau_w="auto"``
    = max(0.2, the 99th percentile of |mu| over all weights, nearest rank) so about 1% of the weights at
    most; and, when ``gradients`` is given, the top ``grad_fraction`` of |accumulated mu-gradient| (weights
    with a zero gradient never count). The third kind (members of tiny components) needs the fit: :func:`_assign`."""
    N = g.num_weights
    q = None
    if tau_w == "auto":
        k = N - math.ceil(AUTO_TAU_W_QUANTILE * N) + 1  # the ceil(0.99 N)-th smallest is the k-th largest
        vals, _ = _top_values(((glo, mu.abs().float()) for _, _, glo, mu, _ in g.chunks(with_rho=False)), k)
        q = float(vals[k - 1])
        tau = max(AUTO_TAU_W_FLOOR, q)
    else:
        tau = float(tau_w)
    grad_pos = torch.zeros(0, dtype=torch.int64, device=g.work_dev)
    if gradients:
        n_top = int(math.ceil(grad_fraction * N))
        if n_top:
            def grad_chunks():
                for i, (n, m) in enumerate(g.layers):
                    if n not in gradients:
                        continue
                    gf = gradients[n].detach().reshape(-1)
                    for lo in range(0, gf.numel(), g.chunk):
                        yield g.offsets[i] + lo, gf[lo:lo + g.chunk].to(g.work_dev, torch.float64).abs()
            vals, pos = _top_values(grad_chunks(), n_top, with_index=True)
            if vals is not None and vals.numel():
                grad_pos = torch.sort(pos[vals > 0]).values
    n_mag = n_grad_only = 0
    for _, _, glo, mu, _ in g.chunks(with_rho=False):
        mag = mu.abs() >= tau
        n_mag += int(mag.sum())
        if grad_pos.numel():
            a, b = torch.searchsorted(grad_pos, torch.tensor([glo, glo + mu.numel()], device=grad_pos.device)).tolist()
            n_grad_only += int((~mag[(grad_pos[a:b] - glo).to(mag.device)]).sum())
    n_inl = N - n_mag - n_grad_only
    if n_inl == 0:
        raise ValueError(f"tau_w: every weight is an outlier (|mu| >= {tau} or top gradients); nothing to fit")
    return _Outliers(tau, q, grad_pos, n_mag, n_grad_only, n_inl)


def _sample_inliers(g: _Gathered, o: _Outliers, n_want: int, gen) -> torch.Tensor:
    """Up to ``n_want`` inliers drawn uniformly without replacement, as [n, 2] float64 (mu, rho) on the
    working device; indices drawn with ``gen`` (CPU), so the sample does not depend on the device."""
    N = g.num_weights
    if N <= 4 * n_want:
        idx = torch.randperm(N, generator=gen)
    else:  # oversample to cover the outliers, dedupe, random order
        m = min(N, int(n_want * N / max(o.n_inliers, 1) * 1.1) + 1024)
        idx = torch.randint(0, N, (m,), generator=gen).unique()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
    offs = torch.tensor(g.offsets)
    layer = torch.searchsorted(offs, idx, right=True) - 1
    mu = torch.empty(idx.numel(), dtype=torch.float64)
    rho = torch.empty(idx.numel(), dtype=torch.float64)
    for i in layer.unique().tolist():
        sel = (layer == i).nonzero().squeeze(1)
        loc = idx[sel] - g.offsets[i]
        dev = g.layers[i][1].weight_mu.device
        mu[sel] = g.flat(i, "mu")[loc.to(dev)].to("cpu", torch.float64)
        rho[sel] = g.flat(i, "rho")[loc.to(dev)].to("cpu", torch.float64)
    keep = mu.float().abs() < o.tau_w  # float32, as in every other pass
    if o.grad_pos.numel():
        gp = o.grad_pos.cpu()
        pos = torch.searchsorted(gp, idx).clamp_max(gp.numel() - 1)
        keep &= gp[pos] != idx
    sel = keep.nonzero().squeeze(1)[:n_want]
    return torch.stack([mu[sel], rho[sel]], -1).to(g.work_dev)


def _auto_components(n_inliers: int) -> int:
    return max(1, min(AUTO_MAX_COMPONENTS, n_inliers // AUTO_INLIERS_PER_COMPONENT))


def _fit_gmm(g: _Gathered, o: _Outliers, K_req, fit_samples, gen, max_iter, tol, reg, progress, notes) -> _Fit:
    """SPEC.md section 8, step 3: a full-covariance 2D GMM (batched k-means++ then EM, float64) fitted to
    ``fit_samples`` random inliers in the space standardised per coordinate (by the sample's mean and std).
    ``num_components="auto"``: K = min(256, inliers // 50); K is capped by the points fitted (said in ``notes``)."""
    X = _sample_inliers(g, o, fit_samples, gen)
    center = X.mean(0)
    scale = X.std(0).nan_to_num(1.0).clamp_min(1e-12) if X.shape[0] > 1 else torch.ones_like(center)
    Z = (X - center) / scale
    n_fit = Z.shape[0]
    K = _auto_components(o.n_inliers) if K_req == "auto" else K_req
    if K > n_fit:
        notes.append(f"num_components reduced from {K} to {n_fit}: only {n_fit} points to fit")
        K = n_fit
    weights, means, S, info = _gmm.fit_em(Z, K, generator=gen, max_iter=max_iter, tol=tol, reg=reg, progress=progress)
    return _Fit(center, scale, Z, n_fit, K, weights, means, S, info)


def _assign(g: _Gathered, o: _Outliers, fit: _Fit, min_component_size, ellipse_chi2, progress) -> _Assignment:
    """SPEC.md section 8, step 4 (and step 2's post-fit outliers), in chunks: every inlier goes to its most
    responsible component (exact top two, :class:`_gmm.Top2`, pruned on a grid for large models); members of
    components with <= ``min_component_size`` weights become outliers; an inlier whose squared Mahalanobis
    distance to its component exceeds ``ellipse_chi2`` becomes an ellipse weight between its top two
    components with alpha = r1 / (r1 + r2) = sigmoid(log r1 - log r2), unless its second component was
    dropped as too small (then it becomes an outlier). Memory: the int16 label of every weight plus one chunk."""
    K, dev = fit.K, g.work_dev
    top2 = _gmm.Top2(fit.weights, fit.means, fit.S)
    grid = _ASSIGN_GRID
    use_grid = K >= 3 and o.n_inliers >= 4 * grid * grid
    index = None
    if use_grid:
        # cells: quantiles of the fitted sample in (mu, rho) (float32 in, like the chunks); boxes: the extremes of
        # the inliers each cell holds, mapped to the standardised space (a monotone map: the bounds stay exact)
        index = _gmm.GridIndex((fit.Zfit * fit.scale + fit.center).float(), grid)
        lo = torch.full((grid * grid, 2), math.inf, dtype=torch.float64, device=dev)
        hi = torch.full((grid * grid, 2), -math.inf, dtype=torch.float64, device=dev)
        for _, _, glo, mu, rho in g.chunks():
            x = torch.stack([mu, rho], -1)[~o.mask(glo, mu)]
            _gmm.grid_boxes_update(lo, hi, x, index(x))
        top2.set_grid(index, (lo - fit.center) / fit.scale, (hi - fit.center) / fit.scale, chi2=ellipse_chi2)
    ltype = torch.int16 if K <= 32767 else torch.int32
    labels = [torch.empty(m.weight_mu.numel(), dtype=ltype, device=dev) for _, m in g.layers]
    counts = torch.zeros(K + 1, dtype=torch.int64, device=dev)
    e_pos, e_c1, e_c2, e_gap = [], [], [], []
    n_sure = 0
    total = sum(math.ceil(m.weight_mu.numel() / g.chunk) for _, m in g.layers)
    for i, lo_, glo, mu, rho in _gmm._progress(g.chunks(), total, "SWS assign", progress):
        out = o.mask(glo, mu)
        x = torch.stack([mu, rho], -1)
        if index is not None:
            # cells whose top component is certain and whose points all pass the ellipse test need nothing else
            cell = index(x)
            lab = torch.where(out, -1, top2.sure[cell])
            rest = (lab < 0) & ~out
        else:
            cell = None
            lab = torch.full((mu.numel(),), -1, dtype=torch.int64, device=dev)
            rest = ~out
        idx = rest.nonzero().squeeze(1)
        n_sure += mu.numel() - int(out.sum()) - idx.numel()
        if idx.numel():
            z = (x[idx].double() - fit.center) / fit.scale
            c1, c2, gap, maha = top2(z, None if cell is None else cell[idx])
            lab[idx] = c1
            e = (maha > ellipse_chi2) & (c1 != c2)
            if bool(e.any()):
                e_pos.append(idx[e] + glo)
                e_c1.append(c1[e])
                e_c2.append(c2[e])
                e_gap.append(gap[e])
        counts += torch.bincount(lab + 1, minlength=K + 1)
        labels[i][lo_:lo_ + mu.numel()] = lab.to(ltype)
    counts = counts[1:]
    top2.stats["sure_points"] = n_sure
    small = counts <= min_component_size
    if bool(small.all()):
        raise ValueError(f"min_component_size: every fitted component has <= {min_component_size} members "
                         f"(largest: {int(counts.max())}); nothing would remain for the codebook: lower "
                         f"min_component_size or ask for fewer num_components")
    cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt, device=dev)  # noqa: E731
    ell_pos, ell_c1, ell_c2, ell_gap = (cat(e_pos, torch.int64), cat(e_c1, torch.int64), cat(e_c2, torch.int64),
                                        cat(e_gap, torch.float64))
    # members of tiny components become outliers (ellipse candidates among them too)
    n_small = 0
    for i, lab in enumerate(labels):
        for lo_ in range(0, lab.numel(), g.chunk):
            seg = lab[lo_:lo_ + g.chunk]
            l64 = seg.long()
            sm = (l64 >= 0) & small[l64.clamp_min(0)]
            n_small += int(sm.sum())
            seg[sm] = -1
    keep = ~small[ell_c1]
    ell_pos, ell_c1, ell_c2, ell_gap = ell_pos[keep], ell_c1[keep], ell_c2[keep], ell_gap[keep]
    # an ellipse whose second component was dropped keeps neither: it becomes an outlier
    drop = small[ell_c2]
    if bool(drop.any()):
        dp = ell_pos[drop]
        li = torch.searchsorted(torch.tensor(g.offsets, device=dev), dp, right=True) - 1
        for i in li.unique().tolist():
            labels[i][dp[li == i] - g.offsets[i]] = -1
    counts = counts.clone()
    counts[small] = 0
    if bool(drop.any()):
        counts -= torch.bincount(ell_c1[drop], minlength=K)
    keep = ~drop
    stats = dict(top2.stats, grid=use_grid)
    return _Assignment(labels, ell_pos[keep], ell_c2[keep], ell_gap[keep], counts, small, n_small,
                       int(drop.sum()), stats)


def _merge(fit: _Fit, a: _Assignment, tau_d) -> _Merged:
    """SPEC.md section 8, step 5: drop the tiny components, merge those closer than ``tau_d`` in squared W2
    distance (standardised space, mass = the fit's soft counts) by moment matching to a fixed point, and
    compact away components no weight uses (labels 0..K'-1 in the order of the fit)."""
    dev = fit.means.device
    alive = ~a.small
    old_ids = alive.nonzero().squeeze(1)
    mass = fit.weights[alive] * fit.n_fit
    mass, m_means, m_S, mapping = _gmm.merge_w2(mass, fit.means[alive], fit.S[alive], tau_d)
    full_map = torch.full((fit.K,), -1, dtype=torch.int64, device=dev)
    full_map[old_ids] = mapping
    used = torch.zeros(m_means.shape[0], dtype=torch.bool, device=dev)
    used[full_map[(a.counts > 0) & alive]] = True
    used[full_map[a.ell_c2]] = True
    compact = torch.cumsum(used.long(), 0) - 1
    final_map = torch.where(full_map >= 0, compact[full_map.clamp_min(0)], full_map)
    return _Merged(m_means[used], m_S[used], final_map)


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


def _layer_parts(g: _Gathered, a: _Assignment, merged: _Merged):
    """SPEC.md section 8, step 6, the data of every new layer: labels (the merged, compacted component in the
    narrowest dtype; 0 for outliers, which the kernels never read), ellipses (local positions, the two
    components, alpha) and outliers (local positions with their own float32 mu, rho), on the layer's
    device. An ellipse whose two components merged becomes an ordinary inlier. Frees the working labels."""
    ldt = label_dtype(merged.K)
    fm = merged.final_map
    parts = []
    e_lo = 0
    for i, (name, m) in enumerate(g.layers):
        dev = m.weight_mu.device
        lab_w = a.labels[i]
        lab = torch.empty(lab_w.numel(), dtype=ldt, device=dev)
        out_pos = []
        for lo in range(0, lab_w.numel(), g.chunk):
            seg = lab_w[lo:lo + g.chunk].long()
            out = seg < 0
            lab[lo:lo + seg.numel()] = torch.where(out, 0, fm[seg.clamp_min(0)]).to(dev, ldt)
            out_pos.append(out.nonzero().squeeze(1) + lo)
        a.labels[i] = None  # free as we go
        o_loc = torch.cat(out_pos).to(dev)
        e_hi = int(torch.searchsorted(a.ell_pos, torch.tensor(g.offsets[i + 1], device=a.ell_pos.device)))
        e_loc = (a.ell_pos[e_lo:e_hi] - g.offsets[i]).to(dev)
        ea = lab.reshape(-1)[e_loc].long()
        eb = fm[a.ell_c2[e_lo:e_hi]].to(dev)
        ealpha = torch.sigmoid(a.ell_gap[e_lo:e_hi]).to(dev, torch.float32)  # r1 / (r1 + r2)
        real = ea != eb  # both of its components merged: an ordinary inlier
        e_loc, ea, eb, ealpha = e_loc[real], ea[real], eb[real], ealpha[real]
        e_lo = e_hi
        mu_f, rho_f = g.flat(i, "mu"), g.flat(i, "rho")
        parts.append({
            "labels": lab.reshape(tuple(m.weight_mu.shape)),
            "ellipse": (e_loc, ea, eb, ealpha),
            "outliers": (o_loc, mu_f[o_loc].float(), rho_f[o_loc].float()),
        })
    return parts, ldt


def _build_layers(model, g: _Gathered, parts, codebook: Codebook, mode):
    """SPEC.md section 8, steps 6-7: replace every mean-field layer in place by the SWS layer of the same kind
    and hyper-parameters (:func:`_sws_like`: any kind in sws_kernels.nn.SWS_COUNTERPART, attention
    projections included): labels (narrowest integer dtype), ellipse and outlier buffers (outliers keep their
    own mu, rho), the shared codebook, the layer's rng_id; bias = mu_bias (deterministic); the replaced
    layer's forward contract."""
    for i, (name, m) in enumerate(g.layers):
        common = dict(codebook=codebook, mode=mode, labels=parts[i]["labels"], ellipse=parts[i]["ellipse"],
                      outliers=parts[i]["outliers"], rng_id=m.owner)
        _set_module(model, name, _sws_like(m, common))


def _size_parts(modules) -> Tuple[dict, Optional[dict]]:
    """Bytes of the SWS layers by part, in memory and (when sws_kernels.io reports it) on disk."""
    from . import io as _io

    rep = _io.size_report(nn.ModuleList(modules))
    if isinstance(rep.get("memory"), dict):  # {"memory": {...}, "disk": {...}}
        mem, disk = dict(rep["memory"]), (dict(rep["disk"]) if isinstance(rep.get("disk"), dict) else None)
    else:
        mem, disk = dict(rep), None

    def norm(d):
        out = {"labels": d.get("labels", 0), "codebook": d.get("codebooks", d.get("codebook", 0)),
               "ellipses": d.get("ellipses", 0), "outliers": d.get("outliers", 0),
               "biases": d.get("sws_bias", d.get("biases", 0))}
        total = d.get("total", sum(v for k, v in d.items() if k != "total" and isinstance(v, int)))
        out["other"] = total - sum(out.values())
        out["total"] = total
        return out
    return norm(mem), (norm(disk) if disk is not None else None)


def _report(g: _Gathered, o: _Outliers, a: _Assignment, fit: _Fit, codebook: Codebook, parts, ldt, new_layers,
            thresholds, times, notes) -> dict:
    """SPEC.md section 8, step 6's report: counts of Gaussians / ellipses / outliers (by reason), every
    threshold used, trainable parameters and bytes (in memory and, when known, on disk; per part) before and
    after with their ratios, EM and assignment diagnostics, the time of each step. Warns (and sets
    ``smaller`` False) when the SWS layers are not smaller than the mean-field ones."""
    names = [n for n, _ in g.layers]
    N = g.num_weights
    n_out = sum(int(p["outliers"][0].numel()) for p in parts)
    n_ell = sum(int(p["ellipse"][0].numel()) for p in parts)
    trainable_after = sum(p.numel() for p in (codebook.means, codebook.chol)) + sum(
        m.outlier_mu.numel() + m.outlier_rho.numel() + (m.bias.numel() if m.bias is not None else 0)
        for m in new_layers)
    mem_after, disk_after = _size_parts(new_layers)
    bytes_after = mem_after["total"]
    warn = []
    if bytes_after >= g.bytes_before:
        warn.append(f"to_sws: the SWS layers take {bytes_after:,} bytes, not fewer than the mean-field layers' "
                    f"{g.bytes_before:,} ({n_out:,} outliers, {n_ell:,} ellipse weights, K = {codebook.num_components} "
                    f"of {N:,} weights): ask for fewer num_components or a larger tau_w")
    for w in warn:
        warnings.warn(w, stacklevel=3)
        log.warning(w)
    rep = {
        "layers": names,
        "num_weights": N,
        "gaussians": codebook.num_components,
        "gaussians_fitted": fit.K,
        "ellipses": n_ell,
        "outliers": n_out,
        "outliers_by_reason": {"magnitude": o.n_magnitude, "gradient": o.n_gradient,
                               "small_component": a.n_small_members,
                               "ellipse_partner_dropped": a.n_partner_dropped},
        "inliers": N - n_out - n_ell,
        "label_dtype": str(ldt).replace("torch.", ""),
        "thresholds": thresholds,
        "params_before": g.params_before,
        "params_after": trainable_after,
        "params_ratio": g.params_before / max(trainable_after, 1),
        "bytes_before": g.bytes_before,
        "bytes_after": bytes_after,
        "bytes_ratio": g.bytes_before / max(bytes_after, 1),
        "bytes": {"memory": {"before": g.bytes_before_parts, "after": mem_after}},
        "smaller": bytes_after < g.bytes_before,
        "warnings": warn,
        "em": fit.info,
        "assign": a.stats,
        "seconds_fit": times["fit"],
        "seconds_by_step": times,
        "seconds": sum(times.values()),
        "notes": notes,
    }
    if disk_after is not None:
        rep["bytes"]["disk"] = {"after": disk_after}
        rep["file_bytes_after"] = disk_after["total"]
    return rep


def to_sws(model: nn.Module, num_components="auto", *, tau_w="auto", tau_d: float = 1e-4,
           gradients: Optional[Dict[str, torch.Tensor]] = None, grad_fraction: float = 0.01,
           min_component_size: int = 20, ellipse_chi2: float = DEFAULT_ELLIPSE_CHI2, fit_samples: int = 65536,
           max_iter: int = 30, tol: float = 1e-5, reg: float = 1e-5, mode: str = "paper", seed: int = 0,
           device=None, progress: Optional[bool] = None, inplace: bool = True, chunk_size: int = 1 << 16):
    """Compress a mean-field BNN into an SWS BNN with one shared codebook (SPEC.md section 8).

    Steps: gather (mu, rho) of every mean-field weight (biases excluded; they become the SWS layers'
    deterministic biases, = mu_bias); outliers are |mu| >= ``tau_w`` (``"auto"``: max(0.2, the 99th
    percentile of |mu|), so about 1% at most), the top ``grad_fraction`` of |accumulated mu-gradient| when
    ``gradients`` ({layer name: tensor of the weight's shape}, e.g. summed |dL/dmu| over an epoch) is given,
    and after the fit the members of components with <= ``min_component_size`` weights; a full-covariance
    2D GMM (batched k-means++ then EM, float64, in the space standardised per coordinate, diagonal jitter
    ``reg``) with ``num_components`` components (``"auto"``: min(256, inliers // 50), so labels are uint8
    and every component has ~50 weights or more; an int up to 4096 and beyond is taken as given) is fitted
    to ``fit_samples`` random inliers; every inlier goes to its most responsible component, or, when its
    squared Mahalanobis distance to it exceeds ``ellipse_chi2`` (default 13.816, the chi^2_2 99.9%
    quantile), becomes an ellipse weight blending its two most responsible components with alpha =
    r1 / (r1 + r2) = sigmoid(log r1 - log r2); components closer than ``tau_d`` in squared 2-Wasserstein
    distance (standardised space) merge by mass-weighted moment matching until none is; labels are
    compacted. Posterior = prior = the fit.

    Converts in place (like bayesian-torch's dnn_to_bnn); ``inplace=False`` converts a deep copy and leaves
    ``model`` as it was, so it can be retried with another K. Works where the model is (CPU or GPU; the
    fit and assignment are plain torch on ``device``, default the first layer's), in chunks of
    ``chunk_size`` weights: beyond the model it holds a 2-byte working label per weight and one chunk.
    Progress bars (tqdm) only when ``progress`` is True, or None (default) and stderr is a terminal.

    Each step is one function of this module (``_gather``, ``_find_outliers``, ``_fit_gmm``, ``_assign``,
    ``_merge``, ``_codebook_from_fit``, ``_layer_parts``, ``_build_layers``, ``_report``) whose docstring
    names its SPEC step.

    Returns ``(model, report)``. The report has the counts of Gaussians / ellipses / outliers (by reason),
    ``thresholds`` (every threshold used, auto ones resolved), trainable parameters and bytes before and
    after with their ratios, ``bytes`` per part (labels, codebook, ellipses, outliers, biases) in memory
    and, when sws_kernels.io reports it, on disk, ``smaller`` (False, with a warning, when the SWS layers
    are not smaller than the mean-field ones), EM/assignment diagnostics and the seconds of each step.
    Timing: benchmarks/bench_convert.py and benchmarks/RESULTS.md.
    """
    t0 = time.perf_counter()
    layers = _check_to_sws_args(model, num_components, tau_w, tau_d, ellipse_chi2, grad_fraction, mode, gradients,
                                min_component_size, fit_samples, chunk_size)
    if not inplace:
        model = copy.deepcopy(model)
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MEAN_FIELD_LAYERS)]
    work_dev = torch.device(device) if device is not None else layers[0][1].weight_mu.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    notes, times = [], {}

    def lap(name, t=[t0]):  # noqa: B006 - a running clock
        now = time.perf_counter()
        times[name] = now - t[0]
        t[0] = now
    # SPEC.md section 8, one function per step
    with torch.no_grad():
        gathered = _gather(layers, work_dev, chunk_size)                                    # 1. (mu, rho)
        outliers = _find_outliers(gathered, tau_w, gradients, grad_fraction)                # 2. outliers
        lap("outliers")
        fit = _fit_gmm(gathered, outliers, num_components, fit_samples, gen, max_iter, tol, reg, progress,
                       notes)                                                               # 3. GMM fit
        lap("fit")
        assignment = _assign(gathered, outliers, fit, min_component_size, ellipse_chi2, progress)  # 4. labels
        lap("assign")
        merged = _merge(fit, assignment, tau_d)                                             # 5. W2 merging
        codebook = _codebook_from_fit(fit, merged, layers[0][1].weight_mu.device)           # 6. posterior = prior
        parts, ldt = _layer_parts(gathered, assignment, merged)                             # 6. layer data
        _build_layers(model, gathered, parts, codebook, mode)                               # 6. the SWS layers
        lap("build")
    thresholds = {"num_components": num_components, "num_components_fitted": fit.K, "tau_w": outliers.tau_w,
                  "tau_w_rule": (f"auto: max({AUTO_TAU_W_FLOOR}, {AUTO_TAU_W_QUANTILE:.0%} quantile of |mu| = "
                                 f"{outliers.tau_w_quantile:.6g})" if tau_w == "auto" else "given"),
                  "tau_d": tau_d, "ellipse_chi2": ellipse_chi2, "min_component_size": min_component_size,
                  "grad_fraction": grad_fraction if gradients else None, "fit_samples": fit_samples,
                  "reg": reg, "max_iter": max_iter, "tol": tol}
    new_layers = [dict(model.named_modules())[n] for n, _ in layers]
    report = _report(gathered, outliers, assignment, fit, codebook, parts, ldt, new_layers, thresholds, times,
                     notes)                                                                 # 6. the report
    return model, report
