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

from . import _backend, _checks, _ops, native, philox, reference
from .reference import (  # noqa: F401  (re-exported: same definition on every backend)
    accuracy, brier, ece, elbo_loss, kl_gaussian, kl_gaussian_mean, mutual_information, nll, predictive_entropy)

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


def _compiling() -> bool:
    """True while torch.compile traces: the data-dependent checks (min/max of labels, finiteness, unique
    positions) and the backend choice (a ContextVar) cannot be traced, so the traced path builds the op
    arguments without them and calls the opaque ops, which pick their backend when they run."""
    return torch.compiler.is_compiling()


def _traced_args(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner):
    """_checks.SWSArgs without the data-dependent checks (see _compiling); run the same call eagerly to validate."""
    dev, dt = means.device, means.dtype
    i64 = dict(dtype=torch.int64, device=dev)
    if ellipse is None:
        e_pos = e_a = e_b = torch.zeros(0, **i64)
        e_alpha = torch.zeros(0, dtype=dt, device=dev)
    else:
        e_pos, e_a, e_b, e_alpha = ellipse
        e_pos, e_a, e_b, e_alpha = e_pos.long(), e_a.long(), e_b.long(), e_alpha.to(dt)
    if outliers is None:
        o_pos = torch.zeros(0, **i64)
        o_mu = o_rho = torch.zeros(0, dtype=dt, device=dev)
    else:
        o_pos, o_mu, o_rho = outliers
        o_pos = o_pos.long()
    return _checks.SWSArgs(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples,
                           _checks.mode(mode), owner, codebook_owner)


def _emap(t, elem_offset, row_stride):
    """The op arguments (elem_offset, row_stride) of a shard mapping (reference.element_map): (0, 0) for the
    identity, so unsharded calls run exactly as before."""
    if elem_offset == 0 and row_stride is None:
        return 0, 0
    if not isinstance(t, torch.Tensor):
        return elem_offset, row_stride  # the call's own type checks raise
    off, stride, row_len = reference.element_map(t.shape, elem_offset, row_stride)
    return (0, 0) if reference.is_identity_map(off, stride, row_len) else (off, stride)


def _sws_weights(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner, emap=(0, 0)):
    if _compiling():
        return _ops.call_reconstruct(_traced_args(means, chol, labels, ellipse, outliers, seed, samples, mode, owner,
                                                  codebook_owner), *emap)
    a = _checks.sws(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner)
    if torch.compiler.is_compiling():
        # Under torch.compile the opaque op is the graph node; it selects its kernel when it runs.
        return _ops.call_reconstruct(a, *emap)
    name, _, why = _backend.select("reconstruct", means.device, means.dtype)
    log.debug("reconstruct: backend %s (%s)", name, why)
    if name == "reference":
        return reference.reconstruct(means, chol, labels, ellipse, outliers, seed=a.seed, samples=a.samples,
                                     mode=a.mode, owner=a.owner, codebook_owner=a.codebook_owner,
                                     elem_offset=emap[0], row_stride=emap[1] or None)
    return _ops.call_reconstruct(a, *emap)


def reconstruct(means, chol, labels, ellipse=None, outliers=None, *, seed, samples: int = 1, mode: str = "paper",
                owner: int = 0, codebook_owner: int = 0, elem_offset: int = 0, row_stride=None):
    """Sampled weights of an SWS layer -> [samples, *labels.shape] (see :func:`reference.reconstruct`).
    ``elem_offset``/``row_stride``: ``labels`` is a shard of a larger weight and draws that weight's noise
    (tensor parallelism; :func:`sws_kernels.reference.element_map`)."""
    emap = _emap(labels, elem_offset, row_stride)
    return _sws_weights(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner, emap)


def sws_linear(x, means, chol, labels, ellipse=None, outliers=None, bias=None, *, seed, samples: int = 1,
               mode: str = "paper", owner: int = 0, codebook_owner: int = 0, per_sample: bool = False,
               elem_offset: int = 0, row_stride=None):
    """x [..., in] (or [samples, ..., in] with per_sample=True) -> [samples, ..., out]. ``elem_offset`` /
    ``row_stride``: the layer is a shard of a larger one (see :func:`reconstruct`)."""
    emap = _emap(labels, elem_offset, row_stride)
    if _compiling():
        a = _traced_args(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner)
        return _ops.call_sws_linear(x, a, bias, per_sample, *emap)
    _checks.tensor(labels, "labels", ndim=2, integer=True)
    reference._check_bias(bias, labels.shape[0], means.device)
    name, _, why = _backend.select("sws_linear", means.device, means.dtype)
    log.debug("sws_linear: backend %s (%s)", name, why)
    if name == "reference":
        w = _sws_weights(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner, emap)
        return reference._linear(x, w, bias, per_sample)
    a = _checks.sws(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner)
    _check_linear_input(x, a.samples, labels.shape[1], per_sample, means.device)
    if emap != (0, 0):  # a shard: the histogram path (csrc/cpu/histogram.cpp) draws unmapped outlier noise
        return _ops.call_sws_linear(x, a, bias, per_sample, *emap)
    # ---- issue 14: inference (torch.no_grad) in paper/mean mode with a shared x: the label-histogram path ----
    hk, hwhy = _backend.histogram(name, _ops._rows(x, 1) if labels.numel() else 0, a.samples, _checks.MODE_CODES[a.mode], x.dtype,
                                  per_sample, torch.is_grad_enabled())
    log.debug("sws_linear: %s", hwhy)
    if hk is not None:
        y = hk(x, a.means, a.chol, a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu, a.o_rho, bias,
               philox.seed_tensor(a.seed, means.device), a.samples, _checks.MODE_CODES[a.mode], a.owner,
               a.codebook_owner)
        return y.reshape(a.samples, *x.shape[:-1], labels.shape[0])
    # ---- end issue 14 ----
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
    if not _compiling() and _backend.select("reconstruct", means.device, means.dtype)[0] == "reference":
        return reference._conv(conv, x, w, bias, stride, padding, dilation, groups, per_sample, spatial)
    return _conv_all_samples(conv, x, w, bias, stride, padding, dilation, groups, per_sample, spatial)


def _conv_all_samples(conv, x, w, bias, stride, padding, dilation, groups, per_sample: bool, spatial: int):
    """All S samples in ONE vendor conv call (reference._conv loops over samples).

    x shared: the S sampled kernels are stacked along output channels, interleaved per group ([g, S, out/g])
    so each group still sees its own input channels; per-sample x [S, N, C, ...]: the samples go to the
    channel axis and a grouped conv with S * groups groups pairs each input slice with its own kernels.
    """
    S, out_f = w.shape[0], w.shape[1]
    # the checks of reference._conv (same messages)
    _checks.conv_x(x, S, per_sample, spatial, w.device)
    if not isinstance(groups, int) or groups < 1 or out_f % groups:
        raise ValueError(f"groups: expected a positive int dividing out_channels = {out_f}, got {groups!r}")
    _checks.conv_input(x, w.shape[1:], groups, padding, dilation, spatial)
    w = w.to(x.dtype)
    kshape = w.shape[2:]
    if bias is not None:
        bias = bias.to(x.dtype)
        bias = bias if bias.dim() == 2 else bias.expand(S, -1)
    if per_sample:
        N = x.shape[1]
        xs = x.transpose(0, 1).reshape(N, S * x.shape[2], *x.shape[3:])
        y = conv(xs, w.reshape(S * out_f, *kshape), None if bias is None else bias.reshape(-1), stride, padding,
                 dilation, S * groups)
        return y.view(N, S, out_f, *y.shape[2:]).transpose(0, 1)
    g = groups
    wg = w.reshape(S, g, out_f // g, *kshape).transpose(0, 1).reshape(S * out_f, *kshape)
    bg = None if bias is None else bias.reshape(S, g, out_f // g).transpose(0, 1).reshape(-1)
    y = conv(x, wg, bg, stride, padding, dilation, g)
    N = x.shape[0]
    return y.view(N, g, S, out_f // g, *y.shape[2:]).permute(2, 0, 1, 3, *range(4, 4 + spatial)).reshape(
        S, N, out_f, *y.shape[2:])


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


# Mean-field ops: the same dispatch (reference path direct, else the ops with Triton or native kernels).

def mean_field_reconstruct(mu, rho, *, seed, samples: int = 1, owner: int = 0, elem_offset: int = 0,
                           row_stride=None):
    """w[s] = mu + softplus(rho) eps[s] -> [samples, *mu.shape]; ``elem_offset``/``row_stride``: a shard of a
    larger weight (:func:`sws_kernels.reference.element_map`)."""
    emap = _emap(mu, elem_offset, row_stride)
    if _compiling():
        return _ops.call_mean_field_reconstruct(mu, rho, seed, samples, owner, 0, *emap)
    seed_, samples_, owner_ = _checks.mean_field(mu, rho, seed, samples, owner)
    name, _, why = _backend.select("mean_field_reconstruct", mu.device, mu.dtype)
    log.debug("mean_field_reconstruct: backend %s (%s)", name, why)
    if name == "reference":
        return reference.mean_field_reconstruct(mu, rho, seed=seed, samples=samples, owner=owner,
                                                elem_offset=emap[0], row_stride=emap[1] or None)
    return _ops.call_mean_field_reconstruct(mu, rho, seed_, samples_, owner_, 0, *emap)


def mean_field_linear(x, mu, rho, bias_mu=None, bias_rho=None, *, seed, samples: int = 1, owner: int = 0,
                      per_sample: bool = False, elem_offset: int = 0, row_stride=None):
    """Mean-field linear; ``elem_offset``/``row_stride``: a shard of a larger layer, whose sampled bias entry j
    draws element ``elem_offset // row_stride + j`` (its global output row) of the bias stream."""
    emap = _emap(mu, elem_offset, row_stride)
    bias_off = emap[0] // emap[1] if emap[1] else 0
    if _compiling():
        bias = bias_mu
        if bias_rho is not None:
            bias = _ops.call_mean_field_reconstruct(bias_mu, bias_rho, seed, samples, owner, 2, bias_off, 0)
        return _ops.call_mean_field_linear(x, mu, rho, bias, seed, samples, owner, per_sample, *emap)
    name, _, why = _backend.select("mean_field_linear", mu.device, mu.dtype)
    log.debug("mean_field_linear: backend %s (%s)", name, why)
    if name == "reference":
        return reference.mean_field_linear(x, mu, rho, bias_mu, bias_rho, seed=seed, samples=samples, owner=owner,
                                           per_sample=per_sample, elem_offset=emap[0], row_stride=emap[1] or None)
    _checks.tensor(mu, "mu", ndim=2, floating=True)
    seed_, samples_, owner_ = _checks.mean_field(mu, rho, seed, samples, owner)
    reference._check_bias(bias_mu, mu.shape[0], mu.device)
    _check_linear_input(x, samples_, mu.shape[1], per_sample, mu.device)
    if bias_rho is not None:
        if bias_mu is None:
            raise ValueError("bias_rho: expected None when bias_mu is None, got a tensor")
        _checks.mean_field(bias_mu, bias_rho, seed, samples, owner, "bias_mu", "bias_rho")
        bias = _ops.call_mean_field_reconstruct(bias_mu, bias_rho, seed_, samples_, owner_, 2, bias_off, 0)
    else:
        bias = bias_mu
    return _ops.call_mean_field_linear(x, mu, rho, bias, seed_, samples_, owner_, per_sample, *emap)


def _mf_conv(conv, spatial, x, mu, rho, bias_mu, bias_rho, stride, padding, dilation, groups, seed, samples, owner,
             per_sample):
    """Mean-field conv with the selected backend's reconstruction and all samples in one vendor conv call."""
    _checks.tensor(mu, "mu", ndim=spatial + 2, floating=True)
    if _compiling():  # see _compiling: the data-dependent checks run eagerly only
        seed_, samples_, owner_ = seed, samples, owner
    else:
        seed_, samples_, owner_ = _checks.mean_field(mu, rho, seed, samples, owner)
    reference._check_bias(bias_mu, mu.shape[0], mu.device)
    w = _ops.call_mean_field_reconstruct(mu, rho, seed_, samples_, owner_)
    if bias_rho is not None:
        if bias_mu is None:
            raise ValueError("bias_rho: expected None when bias_mu is None, got a tensor")
        if not _compiling():
            _checks.mean_field(bias_mu, bias_rho, seed, samples, owner, "bias_mu", "bias_rho")
        bias = _ops.call_mean_field_reconstruct(bias_mu, bias_rho, seed_, samples_, owner_, purpose=2)
    else:
        bias = bias_mu
    return _conv_all_samples(conv, x, w, bias, stride, padding, dilation, groups, per_sample, spatial)


def _mf_reference_selected(mu) -> bool:
    if not hasattr(mu, "device"):
        return True  # not a tensor: the reference path raises the TypeError
    if _compiling():
        return False  # the ops choose their backend when they run
    return _backend.select("mean_field_reconstruct", mu.device, mu.dtype)[0] == "reference"


def mean_field_conv1d(x, mu, rho, bias_mu=None, bias_rho=None, stride=1, padding=0, dilation=1, groups=1, *,
                      seed, samples: int = 1, owner: int = 0, per_sample: bool = False):
    if not _mf_reference_selected(mu):
        return _mf_conv(_F.conv1d, 1, x, mu, rho, bias_mu, bias_rho, stride, padding, dilation, groups, seed,
                        samples, owner, per_sample)
    return reference.mean_field_conv1d(x, mu, rho, bias_mu, bias_rho, stride, padding, dilation, groups, seed=seed,
                                       samples=samples, owner=owner, per_sample=per_sample)


def mean_field_conv2d(x, mu, rho, bias_mu=None, bias_rho=None, stride=1, padding=0, dilation=1, groups=1, *,
                      seed, samples: int = 1, owner: int = 0, per_sample: bool = False):
    if not _mf_reference_selected(mu):
        return _mf_conv(_F.conv2d, 2, x, mu, rho, bias_mu, bias_rho, stride, padding, dilation, groups, seed,
                        samples, owner, per_sample)
    return reference.mean_field_conv2d(x, mu, rho, bias_mu, bias_rho, stride, padding, dilation, groups, seed=seed,
                                       samples=samples, owner=owner, per_sample=per_sample)


class _KLComponents(torch.autograd.Function):
    """sum_k KL(N(m_k, L_k L_k^T) || N(m0_k, L0_k L0_k^T)) with its gradient written out.

    Why not autograd through :func:`reference.kl_components`: it runs every training step, and with K = 4096
    its ~70 tiny ops (forward + autograd backward) cost 0.7 ms on the 2-core CPU, a quarter of an SWS
    linear layer's whole training step at M = 16; this form needs about a third of the ops. With
    u = l11/p11, v = (l21 - p21 u)/p22, w = l22/p22 (L0^-1 L, entry by entry) and y = L0^-1 (m0 - m):
    KL = 1/2 sum(u^2 + v^2 + w^2 + |y|^2 - 2) + sum(log p11 + log p22 - log l11 - log l22).
    The prior (means0, chol0) is a buffer: it gets no gradient (the reference path serves one that does).
    """

    @staticmethod
    def forward(ctx, means, chol, means0, chol0):
        # Work on contiguous rows: PyTorch's softplus on a strided column is ~7x slower than on a row.
        ct, c0t = chol.t().contiguous(), chol0.t().contiguous()
        a, b, c = ct
        l11, l22 = _F.softplus(ct[0::2])
        p11, p22 = _F.softplus(c0t[0::2])
        p21 = c0t[1]
        u = l11 / p11
        v = (b - p21 * u) / p22
        w = l22 / p22
        d0, d1 = (means0 - means).t()
        y0 = d0 / p11
        y1 = (d1 - p21 * y0) / p22
        kl = 0.5 * (u * u + v * v + w * w + y0 * y0 + y1 * y1 - 2) + torch.log(p11 * p22 / (l11 * l22))
        ctx.save_for_backward(a, c, l11, l22, p11, p21, p22, u, v, w, y0, y1)
        return kl.sum()

    @staticmethod
    def backward(ctx, g):
        a, c, l11, l22, p11, p21, p22, u, v, w, y0, y1 = ctx.saved_tensors
        d_l11 = (u - v * p21 / p22) / p11 - 1 / l11
        d_b = v / p22
        d_l22 = w / p22 - 1 / l22
        g_chol = torch.stack([d_l11 * reference.softplus_grad(a), d_b, d_l22 * reference.softplus_grad(c)], -1)
        # d KL / d m = -(d KL / d (m0 - m))
        g_means = torch.stack([y1 * p21 / (p22 * p11) - y0 / p11, -y1 / p22], -1)
        return g * g_means, g * g_chol, None, None


class _KLComponentsNative(torch.autograd.Function):
    """:class:`_KLComponents` in one native call (csrc/cpu/kl.cpp: value and gradient together, float32 terms
    summed in double) for float32 CPU codebooks: ~35 PyTorch ops cost ~55 us on a small codebook, more than an
    SWS layer's whole training step."""

    @staticmethod
    def forward(ctx, means, chol, means0, chol0):
        value, ctx.g_means, ctx.g_chol = native.kl_components(means, chol, means0, chol0,
                                                              means.requires_grad or chol.requires_grad)
        return torch.scalar_tensor(value, dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.g_means, g * ctx.g_chol, None, None


def kl_components(means, chol, means0, chol0):
    """sum_k KL(N(m_k, Sigma_k) || N(m0_k, Sigma0_k)) (SPEC.md section 6); same value as the reference."""
    _checks.codebook(means, chol)
    _checks.codebook(means0, chol0)
    if means0.shape != means.shape:
        raise ValueError(f"means0: expected shape {tuple(means.shape)}, got {_checks.describe(means0)}")
    if means0.requires_grad or chol0.requires_grad:  # a trainable prior: let autograd differentiate everything
        return reference.kl_components(means, chol, means0, chol0)
    if (means.dtype is torch.float32 and chol.dtype is torch.float32 and means0.dtype is torch.float32
            and chol0.dtype is torch.float32 and means.is_cpu and chol.is_cpu and means0.is_cpu and chol0.is_cpu
            and not torch.compiler.is_compiling()
            and _backend.select("reconstruct", means.device, torch.float32)[0] == "native_cpu"):
        return _KLComponentsNative.apply(means, chol, means0, chol0)
    return _KLComponents.apply(means, chol, means0.to(means.dtype), chol0.to(means.dtype))
