"""The SWS layer contract (SPEC.md sections 2-7) in plain PyTorch.

This file is the definition every kernel is tested against. It is written to be read, not to be fast:
each function is the formula of the spec, differentiable by autograd (gradcheck passes in float64), and
draws its noise from :mod:`sws_kernels.philox`, so a kernel drawing the same stream must agree with it
element by element. Noise is a function of (seed, sample, owner, purpose, element): nothing random is
stored, so forward and backward are deterministic.

Noise is computed in float32 (the RNG contract) and cast to the parameters' dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import _checks, philox

__all__ = [
    "softplus",
    "component_noise",
    "weight_noise",
    "sample_components",
    "reconstruct",
    "reconstruct_backward",
    "sws_linear",
    "sws_conv1d",
    "sws_conv2d",
    "mean_field_reconstruct",
    "mean_field_bias",
    "element_map",
    "global_index",
    "mean_field_linear",
    "mean_field_conv1d",
    "mean_field_conv2d",
    "kl_components",
    "kl_gaussian",
    "kl_gaussian_mean",
    "elbo_loss",
    "bma",
    "accuracy",
    "nll",
    "ece",
    "brier",
    "predictive_entropy",
    "mutual_information",
]


def softplus(x: torch.Tensor) -> torch.Tensor:
    """sigma(rho) = log1p(exp(rho)) (PyTorch's softplus: x itself above 20)."""
    return F.softplus(x)


def softplus_grad(x: torch.Tensor) -> torch.Tensor:
    """d softplus / dx as PyTorch computes it: sigmoid(x), exactly 1 above the threshold 20."""
    return torch.where(x > 20, torch.ones_like(x), torch.sigmoid(x))


def _cholesky(chol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = [[softplus(a), 0], [b, softplus(c)]] as its three entries (l11, l21, l22)."""
    a, b, c = chol.unbind(-1)
    return softplus(a), b, softplus(c)


# --------------------------------------------------------------------------------------------------
# Noise (SPEC.md section 3)
# --------------------------------------------------------------------------------------------------

def component_noise(seed: int, samples: int, K: int, *, codebook_owner: int = 0, dtype=torch.float32,
                    device=None) -> torch.Tensor:
    """xi[s, k] = normals 2k, 2k+1 of stream (seed, s, codebook_owner, purpose 1): [S, K, 2]."""
    s = torch.arange(samples, dtype=torch.int64, device=device)
    xi = philox.normal_trusted(seed, 2 * K, sample=s, owner=codebook_owner, purpose=philox.PURPOSE_COMPONENT,
                               device=device)
    return xi.view(samples, K, 2).to(dtype)


def weight_noise(seed: int, samples: int, index: torch.Tensor, *, owner: int = 0,
                 purpose: int = philox.PURPOSE_WEIGHT, dtype=torch.float32) -> torch.Tensor:
    """eps[s, i] for the flat weight indices ``index``: [S, len(index)]."""
    s = torch.arange(samples, dtype=torch.int64, device=index.device)[:, None]
    return philox.normal_at_trusted(seed, index[None, :], sample=s, owner=owner, purpose=purpose).to(dtype)


def _dense_noise(seed: int, samples: int, n: int, *, owner: int, purpose: int, dtype, device) -> torch.Tensor:
    s = torch.arange(samples, dtype=torch.int64, device=device)
    return philox.normal_trusted(seed, n, sample=s, owner=owner, purpose=purpose, device=device).to(dtype)


# --------------------------------------------------------------------------------------------------
# Global element mapping (tensor-parallel shards, issue 18 item 5)
# --------------------------------------------------------------------------------------------------
# A weight tensor of shape [rows, ...] is read as rows of row_len = numel / rows elements. A shard of a larger
# (unsharded) weight draws the noise of its place in that weight: local element i = r * row_len + c has the
# GLOBAL element index  elem_offset + r * row_stride + c  in the RNG contract (SPEC.md section 4).
#   - output-row (colwise) shard, rows [r0, r1) of [OUT, IN]:  elem_offset = r0 * IN, row_stride = IN
#   - input-column (rowwise) shard, columns [c0, c1):          elem_offset = c0,      row_stride = IN
# The default (elem_offset 0, row_stride None or 0 = row_len) is the identity: today's streams bit for bit.
# Ellipse/outlier positions stay local (they place values in the local tensor); their noise is mapped the same
# way. A sampled mean-field bias (purpose 2, one element per output row) of a shard is indexed by its global
# output row: element elem_offset // row_stride + j for local row j (colwise: r0 + j; rowwise: j).
# Component noise (purpose 1, per codebook) has no weight index and is unaffected.

def element_map(shape, elem_offset=0, row_stride=None, name: str = "elem_offset") -> tuple[int, int, int]:
    """Validated mapping of a weight of ``shape``: (elem_offset, row_stride, row_len), row_stride resolved."""
    for nm, v in (("elem_offset", elem_offset), ("row_stride", row_stride)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{nm}: expected an int, got {_checks.describe(v)}")
    shape = tuple(int(d) for d in shape)
    rows = shape[0] if shape else 1
    n = math.prod(shape)
    row_len = n // rows if rows else 0
    if elem_offset < 0:
        raise ValueError(f"elem_offset: expected a non-negative global element index, got {elem_offset}")
    stride = row_len if row_stride is None or row_stride == 0 else row_stride
    if stride < row_len:
        raise ValueError(f"row_stride: expected at least the local row length {row_len} (rows of the shard must not "
                         f"overlap in the global weight), got {row_stride}")
    last = elem_offset + (max(rows, 1) - 1) * stride + row_len if n else elem_offset
    if last > philox.MAX_ELEMENT:
        raise ValueError(f"{name}: the global element indices of this shard reach {last - 1}, beyond the RNG "
                         f"stream limit 2**34 - 1 (elem_offset={elem_offset}, row_stride={stride}, shape={shape})")
    return int(elem_offset), int(stride), int(row_len)


def is_identity_map(elem_offset, row_stride, row_len) -> bool:
    return elem_offset == 0 and row_stride in (None, 0, row_len)


def global_index(local: torch.Tensor, row_len: int, elem_offset: int = 0, row_stride: Optional[int] = None) -> torch.Tensor:
    """Global element indices (int64) of the local flat indices ``local`` under the mapping above."""
    local = local.long()
    if row_stride is None or row_stride == 0 or row_stride == row_len or row_len == 0:
        return local + elem_offset if elem_offset else local
    return elem_offset + torch.div(local, row_len, rounding_mode="floor") * row_stride + local % row_len


def _mapped_dense_noise(seed, samples, shape, *, owner, purpose, dtype, device, elem_offset=0, row_stride=None):
    """eps[s, i] for every local element of a tensor of ``shape``: [S, n], mapped to its global elements."""
    n = math.prod(shape)
    rows = shape[0] if len(shape) else 1
    row_len = n // rows if rows else 0
    if is_identity_map(elem_offset, row_stride, row_len):
        return _dense_noise(seed, samples, n, owner=owner, purpose=purpose, dtype=dtype, device=device)
    idx = global_index(torch.arange(n, dtype=torch.int64, device=device), row_len, elem_offset, row_stride)
    return weight_noise(seed, samples, idx, owner=owner, purpose=purpose, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# SWS reconstruction (SPEC.md sections 2-3)
# --------------------------------------------------------------------------------------------------

def sample_components(means: torch.Tensor, chol: torch.Tensor, *, seed, samples: int = 1,
                      codebook_owner: int = 0) -> torch.Tensor:
    """z[s, k] = means[k] + L_k xi[s, k] -> [S, K, 2] (columns: z_mu, z_rho)."""
    means, chol = _checks.codebook(means, chol)
    seed = philox.check_seed(seed)
    samples = _checks.samples(samples)
    codebook_owner = _checks.word(codebook_owner, "codebook_owner")
    xi = component_noise(seed, samples, means.shape[0], codebook_owner=codebook_owner, dtype=means.dtype,
                         device=means.device)
    l11, l21, l22 = _cholesky(chol)
    z_mu = means[:, 0] + l11 * xi[..., 0]
    z_rho = means[:, 1] + l21 * xi[..., 0] + l22 * xi[..., 1]
    return torch.stack([z_mu, z_rho], dim=-1)


def reconstruct(means: torch.Tensor, chol: torch.Tensor, labels: torch.Tensor,
                ellipse: Optional[Sequence[torch.Tensor]] = None, outliers: Optional[Sequence[torch.Tensor]] = None,
                *, seed, samples: int = 1, mode: str = "paper", owner: int = 0,
                codebook_owner: int = 0, elem_offset: int = 0, row_stride: Optional[int] = None) -> torch.Tensor:
    """Sampled weights W[s] of one SWS layer: [samples, *labels.shape] in the dtype of ``means``.

    Inliers take their component's value, ellipse weights blend two components with alpha, outliers
    keep their own Gaussian (SPEC.md section 3, table of modes). ``elem_offset``/``row_stride``: the labels are
    a shard of a larger weight and draw its noise (see :func:`element_map`).
    """
    a = _checks.sws(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner)
    off, stride, row_len = element_map(labels.shape, elem_offset, row_stride)
    S, dt, dev = a.samples, means.dtype, means.device
    n = labels.numel()
    lab = labels.reshape(-1).long()

    if a.mode == "mean":
        w = means[:, 0][lab].expand(S, n)
        if a.e_pos.numel():
            e_val = a.e_alpha * means[a.e_a, 0] + (1 - a.e_alpha) * means[a.e_b, 0]
            w = w.index_copy(1, a.e_pos, e_val.expand(S, -1))
        if a.o_pos.numel():
            w = w.index_copy(1, a.o_pos, a.o_mu.expand(S, -1))
        return w.reshape(S, *labels.shape)

    z = sample_components(means, chol, seed=a.seed, samples=S, codebook_owner=a.codebook_owner)
    z_mu, z_rho = z[..., 0], z[..., 1]  # [S, K]
    w = z_mu[:, lab]  # [S, n]
    if a.mode == "hierarchical":
        eps = _mapped_dense_noise(a.seed, S, tuple(labels.shape), owner=a.owner, purpose=philox.PURPOSE_WEIGHT,
                                  dtype=dt, device=dev, elem_offset=off, row_stride=stride)
        w = w + softplus(z_rho[:, lab]) * eps
    if a.e_pos.numel():
        alpha = a.e_alpha
        e_val = alpha * z_mu[:, a.e_a] + (1 - alpha) * z_mu[:, a.e_b]
        if a.mode == "hierarchical":
            std = alpha * softplus(z_rho[:, a.e_a]) + (1 - alpha) * softplus(z_rho[:, a.e_b])
            e_val = e_val + std * weight_noise(a.seed, S, global_index(a.e_pos, row_len, off, stride), owner=a.owner,
                                               dtype=dt)
        w = w.index_copy(1, a.e_pos, e_val)
    if a.o_pos.numel():
        eps_o = weight_noise(a.seed, S, global_index(a.o_pos, row_len, off, stride), owner=a.owner, dtype=dt)
        w = w.index_copy(1, a.o_pos, a.o_mu + softplus(a.o_rho) * eps_o)
    return w.reshape(S, *labels.shape)


def reconstruct_backward(grad_w: torch.Tensor, means, chol, labels, ellipse=None, outliers=None, *, seed,
                         samples: int = 1, mode: str = "paper", owner: int = 0, codebook_owner: int = 0,
                         elem_offset: int = 0, row_stride: Optional[int] = None):
    """The vector-Jacobian product of :func:`reconstruct`, written out: dW -> (d means, d chol, d mu_o, d rho_o).

    It is the backward every kernel implements (the noise regenerated from the seed) and is tested
    against autograd through :func:`reconstruct`. With z = m + L xi and W built from z:
    dz_mu[s,k] = sum of dW over k's inliers + alpha-weighted ellipse terms; in hierarchical mode
    dz_rho[s,k] = softplus'(z_rho) * the same sums of dW * eps; then d m = sum_s dz,
    d a = sum_s dz_mu xi0 softplus'(a), d b = sum_s dz_rho xi0, d c = sum_s dz_rho xi1 softplus'(c).
    """
    a = _checks.sws(means, chol, labels, ellipse, outliers, seed, samples, mode, owner, codebook_owner)
    S, K, dt, dev, n = a.samples, means.shape[0], means.dtype, means.device, labels.numel()
    off, stride, row_len = element_map(labels.shape, elem_offset, row_stride)
    if tuple(grad_w.shape) != (S, *labels.shape):
        raise ValueError(f"grad_w: expected shape {(S, *labels.shape)}, got {_checks.describe(grad_w)}")
    g = grad_w.reshape(S, n).to(dt)
    inlier = torch.ones(n, dtype=torch.bool, device=dev)
    inlier[a.e_pos] = False
    inlier[a.o_pos] = False
    lab_i = labels.reshape(-1)[inlier].long()
    g_i, g_e, g_o = g[:, inlier], g[:, a.e_pos], g[:, a.o_pos]
    alpha = a.e_alpha

    def by_component(v_i, v_e):  # [S, n_in], [S, E] -> [S, K]: segmented sums per component
        acc = torch.zeros(S, K, dtype=dt, device=dev).index_add(1, lab_i, v_i)
        return acc.index_add(1, a.e_a, alpha * v_e).index_add(1, a.e_b, (1 - alpha) * v_e)

    zeros_o = torch.zeros_like(a.o_mu)
    dz_mu = by_component(g_i, g_e)
    if a.mode == "mean":
        g_means = torch.stack([dz_mu.sum(0), torch.zeros(K, dtype=dt, device=dev)], -1)
        return g_means, torch.zeros_like(chol), g_o.sum(0), zeros_o
    xi = component_noise(a.seed, S, K, codebook_owner=a.codebook_owner, dtype=dt, device=dev)
    if a.mode == "hierarchical":
        z = sample_components(means, chol, seed=a.seed, samples=S, codebook_owner=a.codebook_owner)
        eps = _mapped_dense_noise(a.seed, S, tuple(labels.shape), owner=a.owner, purpose=philox.PURPOSE_WEIGHT,
                                  dtype=dt, device=dev, elem_offset=off, row_stride=stride)
        dz_rho = softplus_grad(z[..., 1]) * by_component(g_i * eps[:, inlier], g_e * eps[:, a.e_pos])
    else:
        dz_rho = torch.zeros_like(dz_mu)
    ca, cb, cc = chol.unbind(-1)
    g_means = torch.stack([dz_mu.sum(0), dz_rho.sum(0)], -1)
    g_chol = torch.stack([(dz_mu * xi[..., 0]).sum(0) * softplus_grad(ca), (dz_rho * xi[..., 0]).sum(0),
                          (dz_rho * xi[..., 1]).sum(0) * softplus_grad(cc)], -1)
    eps_o = weight_noise(a.seed, S, global_index(a.o_pos, row_len, off, stride), owner=a.owner, dtype=dt)
    return g_means, g_chol, g_o.sum(0), (g_o * eps_o).sum(0) * softplus_grad(a.o_rho)


# --------------------------------------------------------------------------------------------------
# Mean-field reconstruction (SPEC.md section 3, last paragraph)
# --------------------------------------------------------------------------------------------------

def mean_field_reconstruct(mu: torch.Tensor, rho: torch.Tensor, *, seed, samples: int = 1, owner: int = 0,
                           purpose: int = philox.PURPOSE_WEIGHT, elem_offset: int = 0,
                           row_stride: Optional[int] = None) -> torch.Tensor:
    """w[s, i] = mu_i + softplus(rho_i) eps[s, i] -> [samples, *mu.shape] (eps of the global element of i under
    ``elem_offset``/``row_stride``, :func:`element_map`)."""
    seed, samples, owner = _checks.mean_field(mu, rho, seed, samples, owner)
    off, stride, _ = element_map(mu.shape, elem_offset, row_stride)
    eps = _mapped_dense_noise(seed, samples, tuple(mu.shape), owner=owner, purpose=purpose, dtype=mu.dtype,
                              device=mu.device, elem_offset=off, row_stride=stride)
    return mu + softplus(rho) * eps.view(samples, *mu.shape)


def mean_field_bias(bias_mu: Optional[torch.Tensor], bias_rho: Optional[torch.Tensor], *, seed, samples: int,
                    owner: int, bias_offset: int = 0) -> Optional[torch.Tensor]:
    """Per-sample bias [S, out]: sampled with purpose 2 when it has a rho, else deterministic (or None).
    ``bias_offset``: the global output row of the first entry (a shard of a larger layer)."""
    if bias_mu is None:
        if bias_rho is not None:
            raise ValueError("bias_rho: expected None when bias_mu is None, got a tensor")
        return None
    _checks.tensor(bias_mu, "bias_mu", ndim=1, floating=True)
    if bias_rho is None:
        return bias_mu.expand(samples, -1)
    return mean_field_reconstruct(bias_mu, bias_rho, seed=seed, samples=samples, owner=owner,
                                  purpose=philox.PURPOSE_BIAS, elem_offset=bias_offset)


# --------------------------------------------------------------------------------------------------
# Layers: linear and conv, S samples (SPEC.md section 5)
# --------------------------------------------------------------------------------------------------

def _linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], per_sample: bool) -> torch.Tensor:
    """y[s] = x[s or shared] W[s]^T + bias[s]; w [S, out, in], bias [S, out] or [out] or None."""
    S, out_f, in_f = w.shape
    _checks.activations(x, "x", w.device)
    if per_sample:
        if x.dim() < 2 or x.shape[0] != S:
            raise ValueError(f"x: expected a leading sample dimension of size {S} with per_sample=True, "
                             f"got {_checks.describe(x)}")
        xs = x
    else:
        xs = x.unsqueeze(0).expand(S, *x.shape)
    if x.shape[-1] != in_f:
        raise ValueError(f"x: expected a last dimension of size {in_f} (in_features), got {_checks.describe(x)}")
    w = w.to(x.dtype)
    # one batched matmul over samples: [S, M, in] @ [S, in, out]
    m = math.prod(xs.shape[1:-1])  # explicit: reshape(S, -1, 0) is ambiguous for an empty layer
    y = torch.matmul(xs.reshape(S, m, in_f), w.transpose(1, 2)).reshape(S, *xs.shape[1:-1], out_f)
    if bias is not None:
        b = bias.to(x.dtype)
        b = b if b.dim() == 2 else b.expand(S, -1)
        y = y + b.reshape(S, *([1] * (y.dim() - 2)), out_f)
    return y


def _conv(conv, x, w, bias, stride, padding, dilation, groups, per_sample: bool, spatial: int):
    S = w.shape[0]
    _checks.conv_x(x, S, per_sample, spatial, w.device)
    if isinstance(groups, int) and groups >= 1:  # else the vendor conv raises its own error for groups
        _checks.conv_input(x, w.shape[1:], groups, padding, dilation, spatial)
    w = w.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
        bias = bias if bias.dim() == 2 else bias.expand(S, -1)
    outs = []
    for s in range(S):
        xs = x[s] if per_sample else x
        outs.append(conv(xs, w[s], None if bias is None else bias[s], stride, padding, dilation, groups))
    return torch.stack(outs)


def _check_bias(bias, out_f: int, device):
    if bias is not None:
        _checks.tensor(bias, "bias", ndim=1, floating=True, device=device)
        if bias.shape[0] != out_f:
            raise ValueError(f"bias: expected {out_f} entries (out_features), got {_checks.describe(bias)}")


def sws_linear(x, means, chol, labels, ellipse=None, outliers=None, bias=None, *, seed, samples: int = 1,
               mode: str = "paper", owner: int = 0, codebook_owner: int = 0, per_sample: bool = False,
               elem_offset: int = 0, row_stride: Optional[int] = None):
    """SWS linear layer: x [..., in] (or [samples, ..., in] with per_sample) -> [samples, ..., out]."""
    _checks.tensor(labels, "labels", ndim=2, integer=True)
    _check_bias(bias, labels.shape[0], means.device)
    w = reconstruct(means, chol, labels, ellipse, outliers, seed=seed, samples=samples, mode=mode, owner=owner,
                    codebook_owner=codebook_owner, elem_offset=elem_offset, row_stride=row_stride)
    return _linear(x, w, bias, per_sample)


def _sws_conv(conv, spatial, x, means, chol, labels, ellipse, outliers, bias, stride, padding, dilation, groups,
              seed, samples, mode, owner, codebook_owner, per_sample):
    _checks.tensor(labels, "labels", ndim=spatial + 2, integer=True)
    _check_bias(bias, labels.shape[0], means.device)
    w = reconstruct(means, chol, labels, ellipse, outliers, seed=seed, samples=samples, mode=mode, owner=owner,
                    codebook_owner=codebook_owner)
    return _conv(conv, x, w, bias, stride, padding, dilation, groups, per_sample, spatial)


def sws_conv1d(x, means, chol, labels, ellipse=None, outliers=None, bias=None, stride=1, padding=0, dilation=1,
               groups=1, *, seed, samples: int = 1, mode: str = "paper", owner: int = 0, codebook_owner: int = 0,
               per_sample: bool = False):
    """SWS conv1d with F.conv1d semantics per sample -> [samples, N, out, L']."""
    return _sws_conv(F.conv1d, 1, x, means, chol, labels, ellipse, outliers, bias, stride, padding, dilation,
                     groups, seed, samples, mode, owner, codebook_owner, per_sample)


def sws_conv2d(x, means, chol, labels, ellipse=None, outliers=None, bias=None, stride=1, padding=0, dilation=1,
               groups=1, *, seed, samples: int = 1, mode: str = "paper", owner: int = 0, codebook_owner: int = 0,
               per_sample: bool = False):
    """SWS conv2d with F.conv2d semantics per sample -> [samples, N, out, H', W']."""
    return _sws_conv(F.conv2d, 2, x, means, chol, labels, ellipse, outliers, bias, stride, padding, dilation,
                     groups, seed, samples, mode, owner, codebook_owner, per_sample)


def mean_field_linear(x, mu, rho, bias_mu=None, bias_rho=None, *, seed, samples: int = 1, owner: int = 0,
                      per_sample: bool = False, elem_offset: int = 0, row_stride: Optional[int] = None):
    """Mean-field linear layer (bayesian-torch's LinearReparameterization, S samples) -> [samples, ..., out].
    A shard (``elem_offset``/``row_stride``, :func:`element_map`) draws its weights' and its bias's global noise."""
    _checks.tensor(mu, "mu", ndim=2, floating=True)
    off, stride, _ = element_map(mu.shape, elem_offset, row_stride)
    w = mean_field_reconstruct(mu, rho, seed=seed, samples=samples, owner=owner, elem_offset=off, row_stride=stride)
    _check_bias(bias_mu, mu.shape[0], mu.device)
    b = mean_field_bias(bias_mu, bias_rho, seed=seed, samples=samples, owner=owner,
                        bias_offset=off // stride if stride else 0)
    return _linear(x, w, b, per_sample)


def _mf_conv(conv, spatial, x, mu, rho, bias_mu, bias_rho, stride, padding, dilation, groups, seed, samples, owner,
             per_sample):
    _checks.tensor(mu, "mu", ndim=spatial + 2, floating=True)
    w = mean_field_reconstruct(mu, rho, seed=seed, samples=samples, owner=owner)
    _check_bias(bias_mu, mu.shape[0], mu.device)
    b = mean_field_bias(bias_mu, bias_rho, seed=seed, samples=samples, owner=owner)
    return _conv(conv, x, w, b, stride, padding, dilation, groups, per_sample, spatial)


def mean_field_conv1d(x, mu, rho, bias_mu=None, bias_rho=None, stride=1, padding=0, dilation=1, groups=1, *,
                      seed, samples: int = 1, owner: int = 0, per_sample: bool = False):
    return _mf_conv(F.conv1d, 1, x, mu, rho, bias_mu, bias_rho, stride, padding, dilation, groups, seed, samples,
                    owner, per_sample)


def mean_field_conv2d(x, mu, rho, bias_mu=None, bias_rho=None, stride=1, padding=0, dilation=1, groups=1, *,
                      seed, samples: int = 1, owner: int = 0, per_sample: bool = False):
    return _mf_conv(F.conv2d, 2, x, mu, rho, bias_mu, bias_rho, stride, padding, dilation, groups, seed, samples,
                    owner, per_sample)


# --------------------------------------------------------------------------------------------------
# KL and loss (SPEC.md section 6)
# --------------------------------------------------------------------------------------------------

def _cov(chol: torch.Tensor) -> torch.Tensor:
    l11, l21, l22 = _cholesky(chol)
    return torch.stack([torch.stack([l11 * l11, l11 * l21], -1),
                        torch.stack([l11 * l21, l21 * l21 + l22 * l22], -1)], -2)


def kl_components(means, chol, means0, chol0) -> torch.Tensor:
    """sum_k KL(N(m_k, Sigma_k) || N(m0_k, Sigma0_k)) for 2D Gaussians with Cholesky parameters."""
    means, chol = _checks.codebook(means, chol)
    _checks.codebook(means0, chol0)
    if means0.shape != means.shape:
        raise ValueError(f"means0: expected shape {tuple(means.shape)}, got {_checks.describe(means0)}")
    l11, l21, l22 = _cholesky(chol)
    p11, p21, p22 = _cholesky(chol0.to(means.dtype))
    # Sigma0^-1 applied through L0: tr(Sigma0^-1 Sigma) = ||L0^-1 L||_F^2, Mahalanobis = ||L0^-1 d||^2.
    def solve(v1, v2):  # L0^-1 [v1; v2] by forward substitution
        y1 = v1 / p11
        return y1, (v2 - p21 * y1) / p22
    c1 = solve(l11, l21)  # first column of L
    c2 = solve(torch.zeros_like(l22), l22)
    trace = c1[0] ** 2 + c1[1] ** 2 + c2[0] ** 2 + c2[1] ** 2
    d = means0.to(means.dtype) - means
    y = solve(d[:, 0], d[:, 1])
    maha = y[0] ** 2 + y[1] ** 2
    logdet = 2 * (torch.log(p11) + torch.log(p22) - torch.log(l11) - torch.log(l22))
    return 0.5 * (trace + maha - 2 + logdet).sum()


def _kl_terms(mu, rho, mu0, sigma0):
    sigma = softplus(rho)
    mu0 = torch.as_tensor(mu0, dtype=mu.dtype, device=mu.device)
    sigma0 = torch.as_tensor(sigma0, dtype=mu.dtype, device=mu.device)
    return torch.log(sigma0 / sigma) + (sigma ** 2 + (mu - mu0) ** 2) / (2 * sigma0 ** 2) - 0.5


def kl_gaussian(mu, rho, mu0=0.0, sigma0=1.0) -> torch.Tensor:
    """sum_i KL(N(mu_i, softplus(rho_i)^2) || N(mu0, sigma0^2)): outlier and mean-field weights."""
    return _kl_terms(mu, rho, mu0, sigma0).sum()


def kl_gaussian_mean(mu, rho, mu0=0.0, sigma0=1.0) -> torch.Tensor:
    """bayesian-torch's per-tensor convention: the same KL averaged over the tensor's elements."""
    return _kl_terms(mu, rho, mu0, sigma0).mean()


def elbo_loss(logits, target, kl, num_data: int, beta: float = 1.0) -> torch.Tensor:
    """mean cross-entropy + beta * KL / N_train. ``logits`` [B, C] or [S, B, C] (then the BMA's NLL)."""
    if not isinstance(num_data, int) or num_data < 1:
        raise ValueError(f"num_data: expected a positive int (training set size), got {num_data!r}")
    if logits.dim() == 3:
        ce = -(torch.logsumexp(F.log_softmax(logits, -1), 0) - math.log(logits.shape[0]))
        ce = ce.gather(-1, target[:, None])[:, 0].mean()
    else:
        ce = F.cross_entropy(logits, target)
    return ce + beta * kl / num_data


# --------------------------------------------------------------------------------------------------
# Prediction metrics (SPEC.md section 7). ``probs``: [S, B, C] per-sample or [B, C] averaged.
# --------------------------------------------------------------------------------------------------

def bma(probs: torch.Tensor) -> torch.Tensor:
    """Bayesian model average p = mean_s softmax(logits_s); accepts [S, B, C] or an average [B, C]."""
    if probs.dim() == 3:
        return probs.mean(0)
    if probs.dim() != 2:
        raise ValueError(f"probs: expected [samples, batch, classes] or [batch, classes], got {_checks.describe(probs)}")
    return probs


def _target(target, p):
    if target.dim() != 1 or target.shape[0] != p.shape[0]:
        raise ValueError(f"target: expected class indices of shape [{p.shape[0]}], got {_checks.describe(target)}")
    return target.long()


def accuracy(probs, target) -> torch.Tensor:
    p = bma(probs)
    return (p.argmax(-1) == _target(target, p)).to(p.dtype).mean()


def nll(probs, target) -> torch.Tensor:
    p = bma(probs)
    py = p.gather(-1, _target(target, p)[:, None])[:, 0]
    return -torch.log(py.clamp_min(torch.finfo(p.dtype).tiny)).mean()


def ece(probs, target, n_bins: int = 15) -> torch.Tensor:
    """Expected calibration error: sum_b |B_b|/N |acc_b - conf_b| over equal-width bins of max p in (0, 1]."""
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins: expected a positive int, got {n_bins!r}")
    p = bma(probs)
    conf, pred = p.max(-1)
    correct = (pred == _target(target, p)).to(p.dtype)
    # bin b holds conf in (b/n, (b+1)/n]
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    total = torch.zeros(n_bins, dtype=p.dtype, device=p.device)
    count = total.index_add(0, idx, torch.ones_like(conf))
    acc_sum = total.index_add(0, idx, correct)
    conf_sum = total.index_add(0, idx, conf)
    return ((acc_sum - conf_sum).abs().sum() / p.shape[0])


def brier(probs, target) -> torch.Tensor:
    """mean_b sum_c (p_bc - onehot_bc)^2."""
    p = bma(probs)
    onehot = F.one_hot(_target(target, p), p.shape[-1]).to(p.dtype)
    return ((p - onehot) ** 2).sum(-1).mean()


def _entropy(p):
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


def predictive_entropy(probs) -> torch.Tensor:
    """Entropy of the averaged prediction, per input: [B]."""
    return _entropy(bma(probs))


def mutual_information(probs) -> torch.Tensor:
    """H[mean_s p_s] - mean_s H[p_s] per input: [B]. Needs per-sample probabilities [S, B, C]."""
    if probs.dim() != 3:
        raise ValueError(f"probs: expected per-sample probabilities [samples, batch, classes], got {_checks.describe(probs)}")
    return _entropy(probs.mean(0)) - _entropy(probs).mean(0)
