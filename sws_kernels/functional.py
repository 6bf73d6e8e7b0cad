"""The public functional API (SPEC.md section 10): validates, picks a backend, dispatches.

With the reference selected (forced, or because no kernel exists for the device/dtype) a call runs
:mod:`sws_kernels.reference` directly, so autograd sees plain PyTorch (any dtype, higher-order
gradients). Otherwise it runs the torch.library ops of :mod:`sws_kernels._ops`. Layers whose fused
kernels do not exist yet on a backend run "reconstruct with the kernel, then PyTorch's GEMM/conv", the
large-M path of ARCHITECTURE.md.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as _F

from . import _backend, _checks, _ops, reference
from .reference import (  # noqa: F401  (re-exported: same definition on every backend)
    accuracy, brier, ece, elbo_loss, kl_components, kl_gaussian, kl_gaussian_mean, mutual_information, nll,
    predictive_entropy)

log = logging.getLogger("sws_kernels")

__all__ = [
    "sample_components", "reconstruct", "sws_linear", "sws_conv1d", "sws_conv2d", "mean_field_reconstruct",
    "mean_field_linear", "mean_field_conv1d", "mean_field_conv2d", "kl_components", "kl_gaussian",
    "kl_gaussian_mean", "elbo_loss", "accuracy", "nll", "ece", "brier", "predictive_entropy",
    "mutual_information",
]


def sample_components(means, chol, *, seed, samples: int = 1, codebook_owner: int = 0):
    """z[s, k] = means[k] + L_k xi[s, k] -> [samples, K, 2]."""
    return reference.sample_components(means, chol, seed=seed, samples=samples, codebook_owner=codebook_owner)


def _sws_weights(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner):
    a = _checks.sws(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner)
    if torch.compiler.is_compiling():
        # Under torch.compile the opaque op is the graph node; it selects its kernel when it runs.
        return _ops.call_reconstruct(a)
    name, _, why = _backend.select("reconstruct", means.device, means.dtype)
    log.debug("reconstruct: backend %s (%s)", name, why)
    if name == "reference":
        return reference.reconstruct(means, chol, labels, ellipse, outliers, seed=a.seed, samples=a.samples,
                                     mode=a.mode, owner=a.owner, codebook_owner=a.codebook_owner)
    return _ops.call_reconstruct(a)


def reconstruct(means, chol, labels, ellipse=None, outliers=None, *, seed, samples: int = 1, mode: str = "paper",
                owner: int = 0, codebook_owner: int = 0):
    """Sampled weights of an SWS layer -> [samples, *labels.shape] (see :func:`reference.reconstruct`)."""
    return _sws_weights(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner)


def sws_linear(x, means, chol, labels, ellipse=None, outliers=None, bias=None, *, seed, samples: int = 1,
               mode: str = "paper", owner: int = 0, codebook_owner: int = 0, per_sample: bool = False):
    """x [..., in] (or [samples, ..., in] with per_sample=True) -> [samples, ..., out]."""
    _checks.tensor(labels, "labels", ndim=2, integer=True)
    reference._check_bias(bias, labels.shape[0], means.device)
    name, _, why = _backend.select("sws_linear", means.device, means.dtype)
    log.debug("sws_linear: backend %s (%s)", name, why)
    if name == "reference":
        w = _sws_weights(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner)
        return reference._linear(x, w, bias, per_sample)
    a = _checks.sws(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner)
    _check_linear_input(x, a.samples, labels.shape[1], per_sample, means.device)
    return _ops.call_sws_linear(x, a, bias, per_sample)


def _check_linear_input(x, samples, in_f, per_sample, device):
    """The checks of reference._linear, for the fused ops (which never see an invalid x)."""
    _checks.activations(x, "x", device)
    if per_sample and (x.dim() < 2 or x.shape[0] != samples):
        raise ValueError(f"x: expected a leading sample dimension of size {samples} with per_sample=True, "
                         f"got {_checks.describe(x)}")
    if x.shape[-1] != in_f:
        raise ValueError(f"x: expected a last dimension of size {in_f} (in_features), got {_checks.describe(x)}")


def _sws_conv(conv, spatial, x, means, chol, labels, ellipse, outliers, bias, stride, padding, dilation, groups,
              seed, samples, mode, owner, codebook_owner, per_sample):
    _checks.tensor(labels, "labels", ndim=spatial + 2, integer=True)
    reference._check_bias(bias, labels.shape[0], means.device)
    w = _sws_weights(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner)
    return reference._conv(conv, x, w, bias, stride, padding, dilation, groups, per_sample, spatial)


def sws_conv1d(x, means, chol, labels, ellipse=None, outliers=None, bias=None, stride=1, padding=0, dilation=1,
               groups=1, *, seed, samples: int = 1, mode: str = "paper", owner: int = 0, codebook_owner: int = 0,
               per_sample: bool = False):
    """F.conv1d semantics per sample -> [samples, N, out, L']."""
    return _sws_conv(_F.conv1d, 1, x, means, chol, labels, ellipse, outliers, bias, stride, padding, dilation,
                     groups, seed, samples, mode, owner, codebook_owner, per_sample)


def sws_conv2d(x, means, chol, labels, ellipse=None, outliers=None, bias=None, stride=1, padding=0, dilation=1,
               groups=1, *, seed, samples: int = 1, mode: str = "paper", owner: int = 0, codebook_owner: int = 0,
               per_sample: bool = False):
    """F.conv2d semantics per sample -> [samples, N, out, H', W']."""
    return _sws_conv(_F.conv2d, 2, x, means, chol, labels, ellipse, outliers, bias, stride, padding, dilation,
                     groups, seed, samples, mode, owner, codebook_owner, per_sample)


# Mean-field ops have only the reference so far (fused kernels: the Triton and Native issues).

def mean_field_reconstruct(mu, rho, *, seed, samples: int = 1, owner: int = 0):
    """w[s] = mu + softplus(rho) eps[s] -> [samples, *mu.shape]."""
    seed_, samples_, owner_ = _checks.mean_field(mu, rho, seed, samples, owner)
    name, _, why = _backend.select("mean_field_reconstruct", mu.device, mu.dtype)
    log.debug("mean_field_reconstruct: backend %s (%s)", name, why)
    if name == "reference":
        return reference.mean_field_reconstruct(mu, rho, seed=seed, samples=samples, owner=owner)
    return _ops.call_mean_field_reconstruct(mu, rho, seed_, samples_, owner_)


def mean_field_linear(x, mu, rho, bias_mu=None, bias_rho=None, *, seed, samples: int = 1, owner: int = 0,
                      per_sample: bool = False):
    name, _, why = _backend.select("mean_field_linear", mu.device, mu.dtype)
    log.debug("mean_field_linear: backend %s (%s)", name, why)
    if name == "reference":
        return reference.mean_field_linear(x, mu, rho, bias_mu, bias_rho, seed=seed, samples=samples, owner=owner,
                                           per_sample=per_sample)
    _checks.tensor(mu, "mu", ndim=2, floating=True)
    seed_, samples_, owner_ = _checks.mean_field(mu, rho, seed, samples, owner)
    reference._check_bias(bias_mu, mu.shape[0], mu.device)
    _check_linear_input(x, samples_, mu.shape[1], per_sample, mu.device)
    if bias_rho is not None:
        if bias_mu is None:
            raise ValueError("bias_rho: expected None when bias_mu is None, got a tensor")
        _checks.mean_field(bias_mu, bias_rho, seed, samples, owner, "bias_mu", "bias_rho")
        bias = _ops.call_mean_field_reconstruct(bias_mu, bias_rho, seed_, samples_, owner_, purpose=2)
    else:
        bias = bias_mu
    return _ops.call_mean_field_linear(x, mu, rho, bias, seed_, samples_, owner_, per_sample)


def mean_field_conv1d(x, mu, rho, bias_mu=None, bias_rho=None, stride=1, padding=0, dilation=1, groups=1, *,
                      seed, samples: int = 1, owner: int = 0, per_sample: bool = False):
    return reference.mean_field_conv1d(x, mu, rho, bias_mu, bias_rho, stride, padding, dilation, groups, seed=seed,
                                       samples=samples, owner=owner, per_sample=per_sample)


def mean_field_conv2d(x, mu, rho, bias_mu=None, bias_rho=None, stride=1, padding=0, dilation=1, groups=1, *,
                      seed, samples: int = 1, owner: int = 0, per_sample: bool = False):
    return reference.mean_field_conv2d(x, mu, rho, bias_mu, bias_rho, stride, padding, dilation, groups, seed=seed,
                                       samples=samples, owner=owner, per_sample=per_sample)
