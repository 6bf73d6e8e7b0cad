"""Prediction metrics (SPEC.md section 7).

Each takes ``probs`` as per-sample probabilities [S, B, C] (e.g. from :func:`sws_kernels.predict`) or an
already averaged [B, C]; per-sample probabilities are averaged first (the Bayesian model average
p = mean_s softmax(logits_s), never an average of logits). ``target`` holds class indices [B].
The definitions live in :mod:`sws_kernels.reference` so every backend shares them.
"""
from __future__ import annotations

import torch

from . import reference as _ref

__all__ = ["bma", "accuracy", "nll", "ece", "brier", "predictive_entropy", "mutual_information"]


def bma(probs: torch.Tensor) -> torch.Tensor:
    """Bayesian model average [B, C]: the mean of [S, B, C] over samples ([B, C] passes through)."""
    return _ref.bma(probs)


def accuracy(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of inputs whose averaged prediction's argmax equals the target."""
    return _ref.accuracy(probs, target)


def nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood -mean_b log p_b[y_b] of the averaged prediction."""
    return _ref.nll(probs, target)


def ece(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Expected calibration error over ``n_bins`` equal-width bins of max p (bin b: (b/n, (b+1)/n])."""
    return _ref.ece(probs, target, n_bins)


def brier(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Brier score mean_b sum_c (p_bc - onehot_bc)^2."""
    return _ref.brier(probs, target)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the averaged prediction, per input [B] (total uncertainty)."""
    return _ref.predictive_entropy(probs)


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean minus the mean entropy, per input [B] (epistemic part). Needs [S, B, C]."""
    return _ref.mutual_information(probs)
