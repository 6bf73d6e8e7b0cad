"""Training and prediction helpers: the summed KL of a model, the ELBO loss, and batched MC prediction.

KL convention (SPEC.md section 6): every weight's, outlier's and component's KL is *summed*; each codebook
counts once however many layers share it; the ELBO divides the total by the training-set size N. (The
mean-field layers' own ``kl_loss()`` keeps bayesian-torch's per-tensor-mean convention for code that calls
``get_kl_loss``; :func:`kl_loss` here does not use it.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, reference as _ref
from .nn import MEAN_FIELD_LAYERS, SWS_LAYERS, Codebook, sample_mode

__all__ = ["kl_loss", "elbo_loss", "predict"]


def _bayesian_torch_kl_sum(m: nn.Module):
    """Summed KL of an unconverted bayesian-torch Reparameterization/Flipout layer, else None."""
    if not hasattr(m, "kl_div") or not hasattr(m, "prior_weight_mu"):
        return None
    mu = getattr(m, "mu_weight", None)
    rho = getattr(m, "rho_weight", None)
    if mu is None:
        mu, rho = getattr(m, "mu_kernel", None), getattr(m, "rho_kernel", None)
    if not isinstance(mu, torch.Tensor) or not isinstance(rho, torch.Tensor):
        return None
    kl = _ref.kl_gaussian(mu, rho, m.prior_weight_mu, m.prior_weight_sigma)
    if getattr(m, "mu_bias", None) is not None:
        kl = kl + _ref.kl_gaussian(m.mu_bias, m.rho_bias, m.prior_bias_mu, m.prior_bias_sigma)
    return kl


def kl_loss(model: nn.Module) -> torch.Tensor:
    """Total KL(q || p) of a model, summed (SPEC.md section 6).

    Counts every mean-field layer (weight and bias), every SWS layer's outliers and every codebook once
    (``model.modules()`` yields a shared module once). Unconverted bayesian-torch layers are included with
    their KL summed too. Returns a 0-d float32 tensor (0 for a model with no Bayesian layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
    total = None
    for m in model.modules():
        if isinstance(m, Codebook) or isinstance(m, SWS_LAYERS):
            kl = m.kl_loss()
        elif isinstance(m, MEAN_FIELD_LAYERS):
            kl = m.kl_sum()
        else:
            kl = _bayesian_torch_kl_sum(m)
            if kl is None:
                continue
        total = kl if total is None else total + kl
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total


def elbo_loss(logits: torch.Tensor, target: torch.Tensor, model: nn.Module, num_data: int,
              beta: float = 1.0) -> torch.Tensor:
    """Minibatch negative ELBO: mean cross-entropy + beta * kl_loss(model) / num_data.

    ``logits`` [B, C], or [S, B, C] for S samples (then the cross-entropy of the Bayesian model average).
    ``num_data`` is the training-set size N (not the batch size).
    """
    _checks.tensor(logits, "logits", floating=True)
    _checks.tensor(target, "target")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
        raise ValueError(f"beta: expected a non-negative float, got {beta!r}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected [batch, classes] or [samples, batch, classes], got {_checks.describe(logits)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[-2]:
        raise ValueError(f"target: expected class indices of shape [{logits.shape[-2]}], got {_checks.describe(target)}")
    return _ref.elbo_loss(logits, target, kl_loss(model), num_data, beta)


def predict(model: nn.Module, x: torch.Tensor, samples: int = 30, *, seed=None, logits: bool = False) -> torch.Tensor:
    """Per-sample class probabilities [S, B, C] from S weight samples in one batched pass.

    The input is repeated S times along the batch dimension and every Bayesian layer applies sample s's
    weights to slice s (:func:`sws_kernels.nn.sample_mode`), so each layer makes one call for all S
    samples. Runs under ``torch.no_grad()`` and does not change the model's train/eval mode: call
    ``model.eval()`` first if it has BatchNorm or dropout. With ``logits=True`` returns logits instead.
    Average over dim 0 for the Bayesian model average (:mod:`sws_kernels.metrics` accept either).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
    _checks.tensor(x, "x", floating=True)
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x: expected a non-empty batch [B, ...], got {_checks.describe(x)}")
    S = _checks.samples(samples)
    B = x.shape[0]
    for name, m in model.named_modules():
        # bayesian-torch layers draw one weight per call for the whole batch: in the folded S*B batch all
        # S "samples" would share it and the prediction would silently lose its spread.
        if (type(m).__module__ or "").startswith("bayesian_torch") and hasattr(m, "kl_loss"):
            raise TypeError(f"model: module {name!r} is a bayesian-torch {type(m).__name__}, which cannot draw "
                            "one weight sample per slice; convert it with sws_kernels.convert.from_bayesian_torch")
    xs = x.repeat(S, *([1] * (x.dim() - 1)))
    # shared: the first Bayesian layer sees xs itself and makes one shared-input call (sample_mode's docstring)
    with torch.no_grad(), sample_mode(S, seed, batch=B, shared=(xs, x)):
        out = model(xs)
    if isinstance(out, tuple):  # bayesian-torch-style (out, kl)
        out = out[0]
    if out.dim() < 2 or out.shape[0] != S * B:
        raise ValueError(f"model: expected an output [S*B, classes] = [{S * B}, C] in sample mode, got "
                         f"{_checks.describe(out)}")
    out = out.reshape(S, B, *out.shape[1:])
    return out if logits else F.softmax(out.float(), dim=-1)
