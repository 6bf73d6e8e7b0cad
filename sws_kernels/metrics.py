"""Prediction metrics (SPEC.md section 7).

Each takes ``probs`` as per-sample probabilities [S, B, C] (e.g. from :func:`sws_kernels.predict`) or an
already averaged [B, C]; per-sample probabilities are averaged first (the Bayesian model average
p = mean_s softmax(logits_s), never an average of logits). ``target`` holds class indices [B].
The definitions live in :mod:`sws_kernels.reference` so every backend shares them.

Every metric first checks that ``probs`` are probabilities: a float tensor of values in [0, 1] whose class
dimension sums to 1 (within a tolerance of the dtype's rounding). Logits are the usual mistake (an ECE of 4
and an NLL of 37 instead of an error): the message says to apply ``softmax(-1)`` first. The check reads the
values (a host sync): metrics are evaluation code, never on a training step's hot path.
"""
from __future__ import annotations

import torch

from . import reference as _ref

__all__ = ["check_probs", "bma", "accuracy", "nll", "ece", "brier", "predictive_entropy", "mutual_information"]


def check_probs(probs, name: str = "probs") -> torch.Tensor:
    """``probs`` unchanged if it holds probabilities ([S, B, C] or [B, C], floating, finite, in [0, 1], summing
    to 1 over the last dimension within ``max(1e-3, 10 eps)`` of its dtype); else TypeError/ValueError."""
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of probabilities, got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor of probabilities, got dtype {probs.dtype}")
    if probs.dim() not in (2, 3):
        raise ValueError(f"{name}: expected per-sample probabilities [samples, batch, classes] or averaged "
                         f"[batch, classes], got shape {tuple(probs.shape)}")
    if probs.numel() == 0:
        raise ValueError(f"{name}: expected at least one input and one class, got shape {tuple(probs.shape)}")
    p = probs.detach()
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name}: expected finite probabilities, got NaN or inf")
    tol = max(1e-3, 10 * torch.finfo(p.dtype).eps)
    lo, hi = float(p.min()), float(p.max())
    sums = p.double().sum(-1)
    s_lo, s_hi = float(sums.min()), float(sums.max())
    if lo < -tol or hi > 1 + tol or s_lo < 1 - tol or s_hi > 1 + tol:
        hint = (" They look like logits: pass logits.softmax(-1) (sws.predict(model, x, samples) returns "
                "per-sample probabilities)." if lo < -tol or hi > 1 + tol or s_hi > 1 + tol else
                " If these are unnormalised scores, normalise them (softmax(-1) for logits).")
        raise ValueError(f"{name}: expected probabilities in [0, 1] that sum to 1 over the last (class) dimension "
                         f"(tolerance {tol:g}), got values in [{lo:.4g}, {hi:.4g}] and sums in [{s_lo:.4g}, "
                         f"{s_hi:.4g}].{hint}")
    return probs


def bma(probs: torch.Tensor) -> torch.Tensor:
    """Bayesian model average [B, C]: the mean of [S, B, C] over samples ([B, C] passes through)."""
    return _ref.bma(check_probs(probs))


def accuracy(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of inputs whose averaged prediction's argmax equals the target."""
    return _ref.accuracy(check_probs(probs), target)


def nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood -mean_b log p_b[y_b] of the averaged prediction."""
    return _ref.nll(check_probs(probs), target)


def ece(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Expected calibration error over ``n_bins`` equal-width bins of max p (bin b: (b/n, (b+1)/n])."""
    return _ref.ece(check_probs(probs), target, n_bins)


def brier(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Brier score mean_b sum_c (p_bc - onehot_bc)^2."""
    return _ref.brier(check_probs(probs), target)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the averaged prediction, per input [B] (total uncertainty)."""
    return _ref.predictive_entropy(check_probs(probs))


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean minus the mean entropy, per input [B] (epistemic part). Needs [S, B, C]."""
    return _ref.mutual_information(check_probs(probs))
