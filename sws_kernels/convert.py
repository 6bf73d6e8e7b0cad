"""Model conversion: deterministic -> mean-field (to_mean_field), bayesian-torch -> ours (from_bayesian_torch),
mean-field -> SWS (to_sws, the paper's pipeline of SPEC.md section 8, cleaned).

Every function converts in place (like bayesian-torch's dnn_to_bnn) and returns ``(model, report)``; the
report says what was converted and what was skipped and why.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Dict, Optional

import torch
from torch import nn

from . import _checks, _gmm
from . import reference as _ref
from .nn import (MEAN_FIELD_LAYERS, SWS_LAYERS, Codebook, MeanFieldConv1d, MeanFieldConv2d, MeanFieldLinear,
                 SWSConv1d, SWSConv2d, SWSLinear, label_dtype, softplus_inv)

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
    nn.MultiheadAttention: "nn.MultiheadAttention reads its projection weights directly (F.multi_head_attention_forward); "
                           "kept deterministic",
    nn.Conv3d: "no mean-field Conv3d layer in sws_kernels; kept deterministic",
    nn.ConvTranspose1d: "transposed convolutions are not supported; kept deterministic",
    nn.ConvTranspose2d: "transposed convolutions are not supported; kept deterministic",
    nn.ConvTranspose3d: "transposed convolutions are not supported; kept deterministic",
    nn.RNNBase: "recurrent layers (RNN/LSTM/GRU) are not supported; kept deterministic",
    nn.Bilinear: "nn.Bilinear is not supported; kept deterministic",
    nn.Embedding: "embeddings are not converted; kept deterministic",
}


def _rho_from_delta(w: torch.Tensor, delta: float) -> torch.Tensor:
    """MOPED: sigma = delta |w| -> rho = log(expm1(delta |w|) + 1e-20) (bayesian-torch's get_rho)."""
    return torch.log(torch.expm1(delta * w.abs()) + 1e-20)


def to_mean_field(model: nn.Module, prior_mean: float = 0.0, prior_variance: float = 1.0,
                  posterior_mu_init: float = 0.0, posterior_rho_init: float = -3.0, *, moped: bool = False,
                  moped_delta: float = 0.1):
    """Replace every nn.Linear / nn.Conv1d / nn.Conv2d by a mean-field layer, in place (like dnn_to_bnn).

    Hyper-parameters are kept exactly (stride, padding including 'same'/'valid', padding_mode, dilation,
    groups, bias presence), converted layers get ``dnn_to_bnn_flag = True`` (forward returns only the
    output, so nn.Sequential keeps working) and live on the original weight's device. With ``moped=True``
    (MOPED init) mu = the pretrained weight and sigma = moped_delta * |w|, for weights and biases; else
    mu ~ N(posterior_mu_init, 0.1), rho ~ N(posterior_rho_init, 0.1) as in bayesian-torch.

    Subclasses of Linear/Conv (their forward may read ``.weight``), transposed and 3D convolutions,
    recurrent layers, attention and other parametrised modules are kept and listed in
    ``report["skipped"]`` with the reason. Returns ``(model, report)``.
    """
    _check_model(model)
    if isinstance(moped_delta, bool) or not isinstance(moped_delta, (int, float)) or moped_delta <= 0:
        raise ValueError(f"moped_delta: expected a positive float, got {moped_delta!r}")
    converted, skipped = [], {}
    skip_prefixes = []
    targets = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in skip_prefixes):
            continue
        reason = next((r for cls, r in _SKIP_REASONS.items() if isinstance(m, cls)), None)
        if reason is not None:
            skipped[name] = reason
            skip_prefixes.append(name)
            continue
        if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d):
            targets.append((name, m))
        elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            skipped[name] = (f"{type(m).__name__} subclasses {type(m).__mro__[1].__name__} with its own code "
                             "that may read .weight; kept deterministic")
        elif isinstance(m, (*MEAN_FIELD_LAYERS, *SWS_LAYERS, Codebook)):
            continue
        elif any(True for _ in m.parameters(recurse=False)):
            skipped[name] = f"{type(m).__name__} has no Bayesian counterpart; kept deterministic"
    for name, m in targets:
        if name == "":
            raise TypeError(f"model: expected a container of layers, got a bare {type(m).__name__}; "
                            "wrap it (e.g. nn.Sequential(layer)) so it can be replaced")
        args = (prior_mean, prior_variance, posterior_mu_init, posterior_rho_init, m.bias is not None)
        if isinstance(m, nn.Linear):
            new = MeanFieldLinear(m.in_features, m.out_features, *args)
        else:
            cls = MeanFieldConv1d if isinstance(m, nn.Conv1d) else MeanFieldConv2d
            new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, *args,
                      padding_mode=m.padding_mode)
        new = new.to(m.weight.device)
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
    for name, why in skipped.items():
        log.info("to_mean_field: skipped %s: %s", name or "<model>", why)
    return model, {"converted": converted, "skipped": skipped}


# --------------------------------------------------------------------------------------------------
# bayesian-torch -> ours
# --------------------------------------------------------------------------------------------------

_BT_CLASSES = {
    "LinearReparameterization": MeanFieldLinear, "LinearFlipout": MeanFieldLinear,
    "Conv1dReparameterization": MeanFieldConv1d, "Conv1dFlipout": MeanFieldConv1d,
    "Conv2dReparameterization": MeanFieldConv2d, "Conv2dFlipout": MeanFieldConv2d,
}


def _prior_value(t, name):
    """A scalar when the prior tensor is constant (the usual case), else the tensor itself."""
    if not isinstance(t, torch.Tensor):
        return float(t)
    if t.numel() and bool((t == t.reshape(-1)[0]).all()):
        return float(t.reshape(-1)[0])
    return t.detach().clone()


def from_bayesian_torch(model: nn.Module):
    """Replace bayesian-torch's Linear/Conv1d/Conv2d Reparameterization (and Flipout) layers by ours, in place.

    mu/rho, priors (including non-constant prior tensors), posterior inits, bias presence and
    ``dnn_to_bnn_flag`` carry over, so the forward contract (``(out, kl)`` or ``out``) and bayesian-torch's
    ``get_kl_loss`` keep working. Flipout layers become reparameterisation layers: the same posterior and
    output distribution per input, another gradient estimator. Other bayesian-torch layers (Conv3d,
    transposed convolutions, LSTM) are kept and listed in ``report["skipped"]``. bayesian-torch need not
    be installed: layers are recognised by class name and module. Returns ``(model, report)``.
    """
    _check_model(model)
    converted, skipped = [], {}
    todo = []
    for name, m in model.named_modules():
        mod = type(m).__module__ or ""
        if not mod.startswith("bayesian_torch"):
            continue
        cls = _BT_CLASSES.get(type(m).__name__)
        if cls is None:
            if "layers" in mod and type(m).__name__ != "BaseVariationalLayer_":
                skipped[name] = f"{type(m).__name__} has no sws_kernels counterpart; kept"
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
    return model, {"converted": converted, "skipped": skipped}


# --------------------------------------------------------------------------------------------------
# mean-field -> SWS
# --------------------------------------------------------------------------------------------------

def _param_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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

    Returns ``(model, report)``; the report has the counts of Gaussians / ellipses / outliers (by reason),
    trainable parameters and bytes before and after with their ratios, EM diagnostics and the time taken.
    Timing (benchmarks/bench_convert.py, 11,678,912 ResNet-18 weights, K = 4096, 2-core CPU shared with
    other jobs): 386 s wall at load average ~4 (222 s to the end of EM, the rest the exact top-2
    assignment of every weight with grid pruning); 579 s wall at load average ~6. Result: 3,910
    Gaussians, 794,294 ellipses, 22,318 outliers; 358x fewer trainable parameters, 2.5x fewer bytes.
    Note: by construction ~5% of a Gaussian's own members exceed the chi^2_2 95% quantile, so the
    Mahalanobis rule of SPEC.md makes ~5-7% of the weights ellipses.
    """
    _check_model(model)
    t0 = time.perf_counter()
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
    work_dev = torch.device(device) if device is not None else layers[0][1].weight_mu.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    notes = []

    # 1. gather
    sizes = [m.weight_mu.numel() for _, m in layers]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    N = offsets[-1]
    mu = torch.cat([m.weight_mu.detach().reshape(-1).to(work_dev, torch.float64) for _, m in layers])
    rho = torch.cat([m.weight_rho.detach().reshape(-1).to(work_dev, torch.float64) for _, m in layers])
    before_tensors = [p.detach() for _, m in layers for p in m.parameters(recurse=False)]
    params_before = sum(t.numel() for t in before_tensors)
    bytes_before = _param_bytes(before_tensors)

    # 2. outliers by magnitude and gradient
    out_w = mu.abs() >= tau_w
    out_g = torch.zeros(N, dtype=torch.bool, device=work_dev)
    if gradients:
        g = torch.zeros(N, dtype=torch.float64, device=work_dev)
        for i, (n, m) in enumerate(layers):
            if n in gradients:
                gt = gradients[n]
                _checks.tensor(gt, f"gradients[{n!r}]", floating=True)
                if tuple(gt.shape) != tuple(m.weight_mu.shape):
                    raise ValueError(f"gradients[{n!r}]: expected the weight shape {tuple(m.weight_mu.shape)}, "
                                     f"got {_checks.describe(gt)}")
                g[offsets[i]:offsets[i + 1]] = gt.detach().reshape(-1).to(work_dev, torch.float64).abs()
        n_top = int(math.ceil(grad_fraction * N))
        if n_top:
            out_g[torch.topk(g, n_top).indices] = True
    outlier = out_w | out_g
    inl = (~outlier).nonzero().squeeze(1)
    if inl.numel() == 0:
        raise ValueError(f"tau_w: every weight is an outlier (|mu| >= {tau_w} or top gradients); nothing to fit")

    # 3. fit the GMM in the standardised space
    X = torch.stack([mu[inl], rho[inl]], -1)
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
    t_fit = time.perf_counter() - t0

    # 4. assign every inlier; Mahalanobis test -> ellipses
    c1, c2, gap, maha = _gmm.assign_top2_grid(Z, weights, means, S, progress=progress)
    counts = torch.bincount(c1, minlength=K)
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

    # 5. merge by W2 (mass = soft counts), relabel and compact
    alive = ~small
    old_ids = alive.nonzero().squeeze(1)
    mass = weights[alive] * n_fit
    mass, m_means, m_S, mapping = _gmm.merge_w2(mass, means[alive], S[alive], tau_d)
    full_map = torch.full((K,), -1, dtype=torch.int64, device=work_dev)
    full_map[old_ids] = mapping
    lab1, lab2 = full_map[c1], full_map[c2]
    merged_same = is_ell & (lab1 == lab2)  # both of its components merged: an ordinary inlier
    is_ell = is_ell & ~merged_same
    K_final = m_means.shape[0]
    used = torch.zeros(K_final, dtype=torch.bool, device=work_dev)
    used[lab1] = True
    used[lab2[is_ell]] = True
    compact = torch.cumsum(used.long(), 0) - 1
    lab1, lab2 = compact[lab1], compact[lab2]
    m_means, m_S = m_means[used], m_S[used]
    K_final = m_means.shape[0]

    # back to (mu, rho): mean = center + scale * z, Sigma = D Sigma_z D
    means_o = center + scale * m_means
    S11 = m_S[:, 0] * scale[0] ** 2
    S12 = m_S[:, 1] * scale[0] * scale[1]
    S22 = m_S[:, 2] * scale[1] ** 2
    l11 = torch.sqrt(S11)
    l21 = S12 / l11
    l22 = torch.sqrt((S22 - l21 ** 2).clamp_min(1e-30))
    chol = torch.stack([softplus_inv(l11.float()), l21.float(), softplus_inv(l22.float())], -1)
    codebook = Codebook(K_final, means=means_o.float(), chol=chol).to(layers[0][1].weight_mu.device)

    # 6. build the SWS layers
    out_all = torch.zeros(N, dtype=torch.bool, device=work_dev)
    out_all[outlier] = True
    out_all[out_small_idx] = True
    out_all[out_ell_idx] = True
    label_full = torch.zeros(N, dtype=torch.int64, device=work_dev)
    label_full[inl] = lab1
    ell_full = torch.zeros(N, dtype=torch.bool, device=work_dev)
    ell_full[inl[is_ell]] = True
    comp_b_full = torch.zeros(N, dtype=torch.int64, device=work_dev)
    comp_b_full[inl[is_ell]] = lab2[is_ell]
    alpha_full = torch.zeros(N, dtype=torch.float64, device=work_dev)
    alpha_full[inl[is_ell]] = alpha[is_ell]
    # outliers' labels point at their nearest component (unused by the kernels, but a valid index)
    ldt = label_dtype(K_final)
    for i, (name, m) in enumerate(layers):
        lo, hi = offsets[i], offsets[i + 1]
        dev = m.weight_mu.device
        shape = tuple(m.weight_mu.shape)
        lab = label_full[lo:hi]
        e_loc = ell_full[lo:hi].nonzero().squeeze(1)
        o_loc = out_all[lo:hi].nonzero().squeeze(1)
        ellipse = (e_loc.to(dev), lab[e_loc].to(dev), comp_b_full[lo:hi][e_loc].to(dev),
                   alpha_full[lo:hi][e_loc].float().to(dev))
        outl = (o_loc.to(dev), mu[lo:hi][o_loc].float().to(dev), rho[lo:hi][o_loc].float().to(dev))
        common = dict(codebook=codebook, mode=mode, labels=lab.reshape(shape).to(dev), ellipse=ellipse,
                      outliers=outl, rng_id=m.owner)
        has_bias = m.mu_bias is not None
        if isinstance(m, MeanFieldLinear):
            new = SWSLinear(m.in_features, m.out_features, has_bias, **common)
        else:
            cls = SWSConv1d if isinstance(m, MeanFieldConv1d) else SWSConv2d
            new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                      has_bias, padding_mode=m.padding_mode, **common)
        if has_bias:
            with torch.no_grad():
                new.bias.copy_(m.mu_bias.detach())
        new.train(m.training)
        _set_module(model, name, new)

    # report
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
    report = {
        "layers": names,
        "num_weights": N,
        "gaussians": K_final,
        "gaussians_fitted": K,
        "ellipses": int(ell_full.sum()),
        "outliers": n_out,
        "outliers_by_reason": {"magnitude": int(out_w.sum()), "gradient": int((out_g & ~out_w).sum()),
                               "small_component": int(out_small_idx.numel()),
                               "ellipse_partner_dropped": int(out_ell_idx.numel())},
        "inliers": N - n_out - int(ell_full.sum()),
        "label_dtype": str(ldt).replace("torch.", ""),
        "params_before": params_before,
        "params_after": trainable_after,
        "params_ratio": params_before / max(trainable_after, 1),
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "bytes_ratio": bytes_before / max(bytes_after, 1),
        "em": info,
        "seconds_fit": t_fit,
        "seconds": time.perf_counter() - t0,
        "notes": notes,
    }
    return model, report
