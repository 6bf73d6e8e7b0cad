"""THE op catalogue: every torch.library op of sws_kernels, with its schema, fake kernel and autograd.

Each op is an opaque ``torch.library.custom_op`` whose implementation asks :mod:`._backend` for a kernel
(native C++/CUDA, Triton) and falls back to :mod:`.reference`, so every op runs, and passes
``torch.library.opcheck``, on a CPU. Inputs reaching these ops are already validated by
:mod:`.functional` (the public entry point); the ops themselves only check what a kernel needs to be
memory-safe.

Schemas carry the seed as a 0-dim int64 tensor holding the uint64 seed's bits (SPEC.md section 4): kernels
read it from memory, so no op reads it on the host (no sync), torch.compile traces it as a graph input and a
CUDA graph replays whatever value the tensor holds at replay. Modes are int codes (0 paper, 1 hierarchical,
2 mean).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import Tensor

from . import _backend, _checks, native, philox, reference

log = logging.getLogger("sws_kernels")

_MODES = _checks.MODES


def _ellipse(e_pos, e_a, e_b, e_alpha):
    return None if e_pos.numel() == 0 else (e_pos, e_a, e_b, e_alpha)


def _outliers(o_pos, o_mu, o_rho):
    return None if o_pos.numel() == 0 else (o_pos, o_mu, o_rho)


# Global element mapping of a shard (tensor parallelism, reference.element_map): every op takes trailing
# ``elem_offset`` (int, default 0) and ``row_stride`` (int, default 0 = the local row length): the identity, under
# which every kernel runs exactly as before. A non-identity mapping goes to kernels that declare support for it
# (attribute ``sws_elem_map``), else to the reference.

def _row_len(t: Tensor) -> int:
    return t.numel() // t.shape[0] if t.dim() and t.shape[0] else (1 if t.dim() == 0 else 0)


def _identity_map(elem_offset: int, row_stride: int, row_len: int) -> bool:
    return elem_offset == 0 and row_stride in (0, row_len)


def _map_kwargs(kernel, elem_offset: int, row_stride: int, row_len: int):
    """{} for the identity map (the kernels' own defaults); the mapping for kernels that take one; None when the
    kernel does not (the caller then runs the reference)."""
    if _identity_map(elem_offset, row_stride, row_len):
        return {}
    if kernel is not None and getattr(kernel, "sws_elem_map", False):
        return {"elem_offset": elem_offset, "row_stride": row_stride or row_len}
    return None


def _ref_stride(row_stride: int):
    return None if row_stride == 0 else row_stride


# ------------------------------------------------------------------------------------------------------
# reconstruct
# ------------------------------------------------------------------------------------------------------

def _reconstruct_impl(means: Tensor, chol: Tensor, labels: Tensor, e_pos: Tensor, e_a: Tensor, e_b: Tensor,
                e_alpha: Tensor, o_pos: Tensor, o_mu: Tensor, o_rho: Tensor, seed: Tensor, samples: int, mode: int,
                owner: int, codebook_owner: int, elem_offset: int = 0, row_stride: int = 0) -> Tensor:
    """Sampled weights [samples, *labels.shape] (SPEC.md section 5, reconstruct)."""
    name, kernel, why = _backend.select("reconstruct", means.device, means.dtype)
    log.debug("reconstruct: backend %s (%s)", name, why)
    mk = _map_kwargs(kernel, elem_offset, row_stride, _row_len(labels))
    if kernel is None or mk is None:
        return reference.reconstruct(means, chol, labels, _ellipse(e_pos, e_a, e_b, e_alpha),
                                     _outliers(o_pos, o_mu, o_rho), seed=seed, samples=samples,
                                     mode=_MODES[mode], owner=owner, codebook_owner=codebook_owner,
                                     elem_offset=elem_offset, row_stride=_ref_stride(row_stride)).contiguous()
    return kernel(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode, owner,
                  codebook_owner, **mk)


reconstruct = torch.library.custom_op("sws_kernels::reconstruct", _reconstruct_impl, mutates_args=())


@reconstruct.register_fake
def _(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode, owner,
      codebook_owner, elem_offset=0, row_stride=0):
    return means.new_empty((samples, *labels.shape))


def _reconstruct_backward_impl(grad_w: Tensor, means: Tensor, chol: Tensor, labels: Tensor, e_pos: Tensor, e_a: Tensor,
                         e_b: Tensor, e_alpha: Tensor, o_pos: Tensor, o_mu: Tensor, o_rho: Tensor, seed: Tensor,
                         samples: int, mode: int, owner: int,
                         codebook_owner: int, elem_offset: int = 0,
                         row_stride: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dW -> (d means, d chol, d outlier mu, d outlier rho), noise regenerated from the seed."""
    name, kernel, why = _backend.select("reconstruct_backward", means.device, means.dtype)
    log.debug("reconstruct_backward: backend %s (%s)", name, why)
    mk = _map_kwargs(kernel, elem_offset, row_stride, _row_len(labels))
    if kernel is None or mk is None:
        g = reference.reconstruct_backward(grad_w, means, chol, labels, _ellipse(e_pos, e_a, e_b, e_alpha),
                                           _outliers(o_pos, o_mu, o_rho), seed=seed, samples=samples,
                                           mode=_MODES[mode], owner=owner, codebook_owner=codebook_owner,
                                           elem_offset=elem_offset, row_stride=_ref_stride(row_stride))
        return tuple(t.contiguous() for t in g)
    return kernel(grad_w, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode,
                  owner, codebook_owner, **mk)


reconstruct_backward = torch.library.custom_op("sws_kernels::reconstruct_backward", _reconstruct_backward_impl, mutates_args=())


@reconstruct_backward.register_fake
def _(grad_w, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode, owner,
      codebook_owner, elem_offset=0, row_stride=0):
    return means.new_empty(means.shape), chol.new_empty(chol.shape), o_mu.new_empty(o_mu.shape), \
        o_rho.new_empty(o_rho.shape)


def _reconstruct_setup(ctx, inputs, output):
    (means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode, owner,
     codebook_owner, *emap) = inputs
    # Only parameters and indices are saved: the noise is regenerated from (seed, samples) in backward.
    ctx.save_for_backward(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed)
    ctx.args = (samples, mode, owner, codebook_owner, *emap)
    ctx.n_map = len(emap)


def _reconstruct_backward(ctx, grad, eager: bool = False):
    *saved, seed = ctx.saved_tensors
    rb = _reconstruct_backward_impl if eager else torch.ops.sws_kernels.reconstruct_backward
    g_means, g_chol, g_mu, g_rho = rb(grad.contiguous(), *saved, seed, *ctx.args)
    # alpha is a buffer (SPEC.md section 2): not trained, no gradient.
    return (g_means, g_chol, None, None, None, None, None, None, g_mu, g_rho, None, None, None, None, None,
            *([None] * ctx.n_map))


torch.library.register_autograd("sws_kernels::reconstruct", _reconstruct_backward, setup_context=_reconstruct_setup)


# ------------------------------------------------------------------------------------------------------
# Kernel registrations (backend -> kernel). Availability is decided at call time by _backend.select.
# ------------------------------------------------------------------------------------------------------

# A shard's element mapping (elem_offset/row_stride) goes into the argument bundle's fields (csrc/common.h); the
# unsharded call is native's own function, untouched.
def _map_bundle(p, elem_offset: int, row_stride: int, row_len: int):
    p.args.elem_offset, p.args.row_stride, p.args.row_len = elem_offset, row_stride, row_len
    return p


def _native_reconstruct(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode, owner,
                        codebook_owner, *, elem_offset: int = 0, row_stride: int = 0):
    if elem_offset == 0 and row_stride in (0, _row_len(labels)):
        return native.reconstruct(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples,
                                  mode, owner, codebook_owner)
    p = _map_bundle(native.prepare(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, mode, owner,
                                   codebook_owner), elem_offset, row_stride, _row_len(labels))
    return native.reconstruct_prepared(p, seed, int(samples))


def _native_reconstruct_backward(grad_w, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed,
                                 samples, mode, owner, codebook_owner, *, elem_offset: int = 0, row_stride: int = 0):
    if elem_offset == 0 and row_stride in (0, _row_len(labels)):
        return native.reconstruct_backward(grad_w, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho,
                                           seed, samples, mode, owner, codebook_owner)
    p = _map_bundle(native.prepare(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, mode, owner,
                                   codebook_owner), elem_offset, row_stride, _row_len(labels))
    return native.reconstruct_backward_prepared(p, grad_w, seed, int(samples), (labels, e_pos, e_a, e_b, e_alpha, o_pos))


def _native_mean_field_reconstruct(mu, rho, seed, samples, owner, purpose, *, elem_offset: int = 0,
                                   row_stride: int = 0):
    if elem_offset == 0 and row_stride in (0, _row_len(mu)):
        return native.mean_field_reconstruct(mu, rho, seed, samples, owner, purpose)
    p = _map_bundle(native.prepare_mean_field(mu, rho, owner, purpose), elem_offset, row_stride, _row_len(mu))
    return native.mean_field_reconstruct_prepared(p, seed, int(samples))


def _native_mean_field_reconstruct_backward(grad_w, mu, rho, seed, samples, owner, purpose, *, elem_offset: int = 0,
                                            row_stride: int = 0):
    if elem_offset == 0 and row_stride in (0, _row_len(mu)):
        return native.mean_field_reconstruct_backward(grad_w, mu, rho, seed, samples, owner, purpose)
    p = _map_bundle(native.prepare_mean_field(mu, rho, owner, purpose), elem_offset, row_stride, _row_len(mu))
    return native.mean_field_reconstruct_backward_prepared(p, grad_w, seed, int(samples))


for _fn in (_native_reconstruct, _native_reconstruct_backward, _native_mean_field_reconstruct,
            _native_mean_field_reconstruct_backward):
    _fn.sws_elem_map = True  # takes a shard's mapping (see _map_kwargs)
for _name in ("native_cpu", "native_cuda"):
    _backend.register_kernel("reconstruct", _name)(_native_reconstruct)
    _backend.register_kernel("reconstruct_backward", _name)(_native_reconstruct_backward)
# mean-field: csrc/cpu/mean_field.cpp (OpenMP + AVX2 normals), csrc/cuda/mean_field.cu.
for _name in ("native_cpu", "native_cuda"):
    _backend.register_kernel("mean_field_reconstruct", _name)(_native_mean_field_reconstruct)
    _backend.register_kernel("mean_field_reconstruct_backward", _name)(_native_mean_field_reconstruct_backward)


# Linear layers, native. On the CPU, M <= 32 rows per sample with float32 activations in paper/mean mode runs
# the fused kernel (csrc/cpu/linear.cpp): writing W (4 bytes per weight) and the GEMM reading it back are
# memory bound at small M, while the fused kernel reads 1-2 label bytes per weight; otherwise (hierarchical:
# a normal per weight; larger M: compute bound; other dtypes) reconstruct in C++ then PyTorch's GEMM. On CUDA,
# M <= 16 rows per sample runs the fused lookup-in-GEMM kernel (csrc/cuda/linear.cu); larger M is compute
# bound: reconstruct -> cuBLAS. The op's autograd then runs the native reconstruct backward on dW.
# (_linear/_dx_reference are looked up at call time.)
def _native_sws_linear(x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed, samples,
                       mode, owner, codebook_owner, per_sample, *, fused: bool, **emap):
    lead = x.shape[1:-1] if per_sample else x.shape[:-1]
    if fused and emap and not x.is_cuda:  # a shard (see _map_bundle): the CPU fused kernel over a mapped bundle
        p = _map_bundle(native.prepare(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, mode, owner,
                                       codebook_owner), emap["elem_offset"], emap["row_stride"], labels.shape[1])
        y = native.sws_linear_cpu_prepared(p, x, bias, seed, int(samples), per_sample)
        return y.reshape(samples, *lead, labels.shape[0])
    # A shard on CUDA takes reconstruct (mapped) + cuBLAS: csrc/cuda/linear.cu's fused kernel reads no mapping (its
    # register allocation is at the edge: the two extra fields made ptxas spill in more variants).
    if fused and not emap:  # _backend.plan checked the fused kernel's limits (LIMITS cuda/cpu_fused_max_m, dtype, mode)
        run = native.sws_linear_cuda if x.is_cuda else native.sws_linear_cpu
        y = run(x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed, samples, mode, owner,
                codebook_owner, per_sample)
        return y.reshape(samples, *lead, labels.shape[0])
    w = _native_reconstruct(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode,
                            owner, codebook_owner, **emap)
    return _vendor_linear(x, w, bias, per_sample)


def _vendor_linear(x, w, bias, per_sample: bool) -> Tensor:
    """y = x W^T + b over a reconstructed W [S, out, in] (the unfused paths): one F.linear (addmm) for the common
    single-sample call with a shared x, ~5 us less than reference._linear's batched matmul + broadcast add on a
    small layer; otherwise reference._linear. x was checked by the caller."""
    if w.shape[0] == 1 and not per_sample and x.dtype is w.dtype and (bias is None or bias.dtype is w.dtype):
        b = None if bias is None else (bias[0] if bias.dim() == 2 else bias)
        return torch.nn.functional.linear(x, w[0], b).unsqueeze(0)
    return reference._linear(x, w, bias, per_sample).contiguous()


def _native_sws_linear_dx(grad_y, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples,
                          mode, owner, codebook_owner, per_sample, *, fused: bool = False, **emap):
    w = _native_reconstruct(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode,
                            owner, codebook_owner, **emap)
    return _dx_reference(grad_y, w, samples, per_sample, labels.shape[1])


def _native_mean_field_linear(x, mu, rho, bias, seed, samples, owner, per_sample, *, fused: bool = False, **emap):
    w = _native_mean_field_reconstruct(mu, rho, seed, samples, owner, 0, **emap)
    return _vendor_linear(x, w, bias, per_sample)


def _native_mean_field_linear_dx(grad_y, mu, rho, seed, samples, owner, per_sample, *, fused: bool = False, **emap):
    w = _native_mean_field_reconstruct(mu, rho, seed, samples, owner, 0, **emap)
    return _dx_reference(grad_y, w, samples, per_sample, mu.shape[1])


for _fn in (_native_sws_linear, _native_sws_linear_dx, _native_mean_field_linear, _native_mean_field_linear_dx):
    _fn.sws_elem_map = True


for _name in ("native_cpu", "native_cuda"):
    _backend.register_kernel("sws_linear", _name)(_native_sws_linear)
    _backend.register_kernel("sws_linear_dx", _name)(_native_sws_linear_dx)
    _backend.register_kernel("mean_field_linear", _name)(_native_mean_field_linear)
    _backend.register_kernel("mean_field_linear_dx", _name)(_native_mean_field_linear_dx)


def call_reconstruct(a: _checks.SWSArgs, elem_offset: int = 0, row_stride: int = 0) -> Tensor:
    """Run the reconstruct op on validated arguments (see :func:`sws_kernels._checks.sws`)."""
    emap = () if elem_offset == 0 and row_stride == 0 else (elem_offset, row_stride)
    return _call("reconstruct", a.means, a.chol, a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu, a.o_rho,
                 philox.seed_tensor(a.seed, a.means.device), a.samples, _checks.MODE_CODES[a.mode], a.owner,
                 a.codebook_owner, *emap)


# ------------------------------------------------------------------------------------------------------
# mean-field reconstruct (SPEC.md section 3, last paragraph): w[s] = mu + softplus(rho) eps[s]
# ------------------------------------------------------------------------------------------------------

def _mf_reference_backward(grad_w, mu, rho, seed, samples, owner, purpose, elem_offset=0, row_stride=0):
    eps = reference._mapped_dense_noise(seed, samples, tuple(mu.shape), owner=owner, purpose=purpose, dtype=mu.dtype,
                                        device=mu.device, elem_offset=elem_offset,
                                        row_stride=_ref_stride(row_stride)).view(samples, *mu.shape)
    g = grad_w.to(mu.dtype)
    return g.sum(0), ((g * eps).sum(0) * reference.softplus_grad(rho))


def _mean_field_reconstruct_impl(mu: Tensor, rho: Tensor, seed: Tensor, samples: int, owner: int, purpose: int,
                                 elem_offset: int = 0, row_stride: int = 0) -> Tensor:
    """[samples, *mu.shape]; ``purpose`` 0 for weights, 2 for a sampled bias."""
    name, kernel, why = _backend.select("mean_field_reconstruct", mu.device, mu.dtype)
    log.debug("mean_field_reconstruct: backend %s (%s)", name, why)
    mk = _map_kwargs(kernel, elem_offset, row_stride, _row_len(mu))
    if kernel is None or mk is None:
        return reference.mean_field_reconstruct(mu, rho, seed=seed, samples=samples, owner=owner,
                                                purpose=purpose, elem_offset=elem_offset,
                                                row_stride=_ref_stride(row_stride)).contiguous()
    return kernel(mu, rho, seed, samples, owner, purpose, **mk)


mean_field_reconstruct = torch.library.custom_op("sws_kernels::mean_field_reconstruct", _mean_field_reconstruct_impl, mutates_args=())


@mean_field_reconstruct.register_fake
def _(mu, rho, seed, samples, owner, purpose, elem_offset=0, row_stride=0):
    return mu.new_empty((samples, *mu.shape))


def _mean_field_reconstruct_backward_impl(grad_w: Tensor, mu: Tensor, rho: Tensor, seed: Tensor, samples: int, owner: int,
                                    purpose: int, elem_offset: int = 0,
                                    row_stride: int = 0) -> tuple[Tensor, Tensor]:
    """dW -> (d mu, d rho), the noise regenerated from the seed."""
    name, kernel, why = _backend.select("mean_field_reconstruct_backward", mu.device, mu.dtype)
    log.debug("mean_field_reconstruct_backward: backend %s (%s)", name, why)
    mk = _map_kwargs(kernel, elem_offset, row_stride, _row_len(mu))
    if kernel is None or mk is None:
        return tuple(t.contiguous() for t in _mf_reference_backward(grad_w, mu, rho, seed, samples, owner, purpose,
                                                                    elem_offset, row_stride))
    return kernel(grad_w, mu, rho, seed, samples, owner, purpose, **mk)


mean_field_reconstruct_backward = torch.library.custom_op("sws_kernels::mean_field_reconstruct_backward", _mean_field_reconstruct_backward_impl, mutates_args=())


@mean_field_reconstruct_backward.register_fake
def _(grad_w, mu, rho, seed, samples, owner, purpose, elem_offset=0, row_stride=0):
    return mu.new_empty(mu.shape), rho.new_empty(rho.shape)


def _mf_setup(ctx, inputs, output):
    mu, rho, seed, samples, owner, purpose, *emap = inputs
    ctx.save_for_backward(mu, rho, seed)  # the noise is regenerated, never saved
    ctx.args = (samples, owner, purpose, *emap)


def _mf_backward(ctx, grad, eager: bool = False):
    mu, rho, seed = ctx.saved_tensors
    mb = _mean_field_reconstruct_backward_impl if eager else torch.ops.sws_kernels.mean_field_reconstruct_backward
    g_mu, g_rho = mb(grad.contiguous(), mu, rho, seed, *ctx.args)
    return (g_mu, g_rho, None, None, None, None, *([None] * (len(ctx.args) - 3)))


torch.library.register_autograd("sws_kernels::mean_field_reconstruct", _mf_backward, setup_context=_mf_setup)


def call_mean_field_reconstruct(mu, rho, seed: Tensor, samples: int, owner: int, purpose: int = 0,
                                elem_offset: int = 0, row_stride: int = 0) -> Tensor:
    emap = () if elem_offset == 0 and row_stride == 0 else (elem_offset, row_stride)
    return _call("mean_field_reconstruct", mu, rho, philox.seed_tensor(seed, mu.device), samples, owner, purpose,
                 *emap)


# ------------------------------------------------------------------------------------------------------
# fused linear layers: y[s] = x[s or shared] W[s]^T + bias, W generated inside the GEMM by the kernel.
# Backward: dx by the *_dx op (the weight regenerated tile by tile); dW = dy^T x (one batched GEMM) then the
# reconstruct backward ops reduce it into the parameters' gradients (deterministically). Why dW is materialised
# (in the activations' dtype: 2 bytes per weight and sample, written once and read once): reducing GEMM tiles
# straight into K components needs either float atomics (order-dependent, ruled out) or per-weight gathers of
# M rows of dy and x (M loads per weight, no tensor cores), both dearer than the bf16 dW round trip at the
# issue's sizes. A fused reduction only pays when S * n * 2 bytes does not fit in memory.
# ------------------------------------------------------------------------------------------------------

def _x3(x, samples, per_sample, in_f):
    lead = samples if per_sample else 1
    return x.reshape(lead, x.numel() // (lead * in_f) if in_f else math.prod(x.shape[:-1]) // lead, in_f)


def _grad_w(gy, x, samples, per_sample, out_f, in_f, dtype, op):
    """dW[s] = dy[s]^T x[s or shared]: [S, out, in], one batched GEMM in the activations' dtype (fp32
    accumulation inside the GEMM, as PyTorch's own weight gradient of a bf16 linear: an fp32 GEMM would be
    ~10x slower at training sizes). The Triton backward kernels (``op``) read it in any float dtype; other
    backends get the parameters' dtype."""
    if samples == 1 and x.dtype is gy.dtype:  # one GEMM, no batch dimension: ~3 us less on a small layer
        m = math.prod(gy.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous for an empty layer
        gw = gy.reshape(m, out_f).t().mm(x.reshape(m, in_f)).unsqueeze(0)
    else:
        g3 = gy.reshape(samples, math.prod(gy.shape[1:-1]), out_f)
        x3 = _x3(x, samples, per_sample, in_f).to(gy.dtype)
        gw = torch.matmul(g3.transpose(1, 2), x3)
    if gw.dtype is dtype:
        return gw
    return gw if _backend.select(op, gw.device, dtype)[0] == "triton" else gw.to(dtype)


def _grad_bias(gy, bias, samples, out_f):
    if bias is None:
        return None
    g3 = gy.reshape(samples, math.prod(gy.shape[1:-1]), out_f)
    if g3.dtype is not torch.float32:
        g3 = g3.to(torch.float32)
    g = g3.sum(1) if bias.dim() == 2 else g3.sum((0, 1))
    return g if g.dtype is bias.dtype else g.to(bias.dtype)


def _rows(t: Tensor, samples: int) -> int:
    """Rows per sample of an activation tensor [(S,) ..., features]: what the fused/unfused choice depends on."""
    return t.numel() // max(1, t.shape[-1] * samples)


def _dx_reference(gy, w, samples, per_sample, in_f):
    g3 = gy.reshape(samples, math.prod(gy.shape[1:-1]), w.shape[1])
    dx = torch.matmul(g3, w.to(gy.dtype))
    dx = dx if per_sample else dx.sum(0)
    return dx.reshape(*((samples,) if per_sample else ()), *gy.shape[1:-1], in_f).contiguous()


def _sws_linear_impl(x: Tensor, means: Tensor, chol: Tensor, labels: Tensor, e_pos: Tensor, e_a: Tensor, e_b: Tensor,
               e_alpha: Tensor, o_pos: Tensor, o_mu: Tensor, o_rho: Tensor, bias: Optional[Tensor], seed: Tensor,
               samples: int, mode: int, owner: int, codebook_owner: int, per_sample: bool, elem_offset: int = 0,
               row_stride: int = 0) -> Tensor:
    """SWS linear: x [..., in] (or [S, ..., in] per_sample) -> [S, ..., out] in x's dtype."""
    # an empty weight (0 rows or 0 columns) never takes a fused kernel: rows 0 selects reconstruct + GEMM
    rows = _rows(x, samples if per_sample else 1) if labels.numel() else 0
    plan = _backend.plan("sws_linear", means.device, means.dtype, rows=rows, act_dtype=x.dtype, mode=mode)
    kernel = plan.kernel
    mk = _map_kwargs(kernel, elem_offset, row_stride, _row_len(labels))
    if kernel is None or mk is None:
        w = reference.reconstruct(means, chol, labels, _ellipse(e_pos, e_a, e_b, e_alpha),
                                  _outliers(o_pos, o_mu, o_rho), seed=seed, samples=samples, mode=_MODES[mode],
                                  owner=owner, codebook_owner=codebook_owner, elem_offset=elem_offset,
                                  row_stride=_ref_stride(row_stride))
        return reference._linear(x, w, bias, per_sample).contiguous()
    return kernel(x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed, samples, mode,
                  owner, codebook_owner, per_sample, fused=plan.fused, **mk)


sws_linear = torch.library.custom_op("sws_kernels::sws_linear", _sws_linear_impl, mutates_args=())


@sws_linear.register_fake
def _(x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed, samples, mode, owner,
      codebook_owner, per_sample, elem_offset=0, row_stride=0):
    lead = x.shape[1:-1] if per_sample else x.shape[:-1]
    return x.new_empty((samples, *lead, labels.shape[0]))


def _sws_linear_dx_impl(grad_y: Tensor, means: Tensor, chol: Tensor, labels: Tensor, e_pos: Tensor, e_a: Tensor,
                  e_b: Tensor, e_alpha: Tensor, o_pos: Tensor, o_mu: Tensor, o_rho: Tensor, seed: Tensor, samples: int,
                  mode: int, owner: int, codebook_owner: int, per_sample: bool, elem_offset: int = 0,
                  row_stride: int = 0) -> Tensor:
    """grad_y [S, ..., out] -> dx (x's shape: summed over samples when x is shared)."""
    rows = _rows(grad_y, samples) if labels.numel() else 0
    plan = _backend.plan("sws_linear_dx", means.device, means.dtype, rows=rows, act_dtype=grad_y.dtype, mode=mode)
    kernel = plan.kernel
    mk = _map_kwargs(kernel, elem_offset, row_stride, _row_len(labels))
    if kernel is None or mk is None:
        w = reference.reconstruct(means, chol, labels, _ellipse(e_pos, e_a, e_b, e_alpha),
                                  _outliers(o_pos, o_mu, o_rho), seed=seed, samples=samples, mode=_MODES[mode],
                                  owner=owner, codebook_owner=codebook_owner, elem_offset=elem_offset,
                                  row_stride=_ref_stride(row_stride))
        return _dx_reference(grad_y, w, samples, per_sample, labels.shape[1])
    return kernel(grad_y, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode,
                  owner, codebook_owner, per_sample, fused=plan.fused, **mk)


sws_linear_dx = torch.library.custom_op("sws_kernels::sws_linear_dx", _sws_linear_dx_impl, mutates_args=())


@sws_linear_dx.register_fake
def _(grad_y, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode, owner,
      codebook_owner, per_sample, elem_offset=0, row_stride=0):
    return grad_y.new_empty((*((samples,) if per_sample else ()), *grad_y.shape[1:-1], labels.shape[1]))


def _sws_linear_setup(ctx, inputs, output):
    (x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed, samples, mode, owner,
     codebook_owner, per_sample, *emap) = inputs
    ctx.save_for_backward(x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed)
    ctx.args = (samples, mode, owner, codebook_owner, per_sample)
    ctx.emap = tuple(emap)


def _sws_linear_backward(ctx, gy, eager: bool = False):
    x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed = ctx.saved_tensors
    samples, mode, owner, codebook_owner, per_sample = ctx.args
    emap = getattr(ctx, "emap", ())
    dx_op = _sws_linear_dx_impl if eager else torch.ops.sws_kernels.sws_linear_dx
    rb = _reconstruct_backward_impl if eager else torch.ops.sws_kernels.reconstruct_backward
    gy = gy.contiguous()
    params = (means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho)
    gx = None
    if ctx.needs_input_grad[0]:
        gx = dx_op(gy, *params, seed, samples, mode, owner, codebook_owner, per_sample, *emap)
    out_f, in_f = labels.shape
    gw = _grad_w(gy, x, samples, per_sample, out_f, in_f, means.dtype, "reconstruct_backward")
    gw = gw.view(samples, out_f, in_f)
    g_means, g_chol, g_mu, g_rho = rb(gw, *params, seed, samples, mode, owner, codebook_owner, *emap)
    return (gx, g_means, g_chol, None, None, None, None, None, None, g_mu, g_rho,
            _grad_bias(gy, bias, samples, out_f), None, None, None, None, None, None, *([None] * len(emap)))


torch.library.register_autograd("sws_kernels::sws_linear", _sws_linear_backward, setup_context=_sws_linear_setup)


def call_sws_linear(x, a: _checks.SWSArgs, bias, per_sample: bool, elem_offset: int = 0, row_stride: int = 0) -> Tensor:
    emap = () if elem_offset == 0 and row_stride == 0 else (elem_offset, row_stride)
    return _call("sws_linear", x, a.means, a.chol, a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu,
                 a.o_rho, bias, philox.seed_tensor(a.seed, a.means.device), a.samples, _checks.MODE_CODES[a.mode],
                 a.owner, a.codebook_owner, per_sample, *emap)


def _mean_field_linear_impl(x: Tensor, mu: Tensor, rho: Tensor, bias: Optional[Tensor], seed: Tensor, samples: int,
                      owner: int, per_sample: bool, elem_offset: int = 0, row_stride: int = 0) -> Tensor:
    """Mean-field linear with in-kernel noise; ``bias`` None, [out] or a sampled [S, out] (sampled by the caller:
    the mapping here is the weight's)."""
    rows = _rows(x, samples if per_sample else 1) if mu.numel() else 0
    plan = _backend.plan("mean_field_linear", mu.device, mu.dtype, rows=rows, act_dtype=x.dtype, mode=0)
    kernel = plan.kernel
    mk = _map_kwargs(kernel, elem_offset, row_stride, _row_len(mu))
    if kernel is None or mk is None:
        w = reference.mean_field_reconstruct(mu, rho, seed=seed, samples=samples, owner=owner, elem_offset=elem_offset,
                                             row_stride=_ref_stride(row_stride))
        return reference._linear(x, w, bias, per_sample).contiguous()
    return kernel(x, mu, rho, bias, seed, samples, owner, per_sample, fused=plan.fused, **mk)


mean_field_linear = torch.library.custom_op("sws_kernels::mean_field_linear", _mean_field_linear_impl, mutates_args=())


@mean_field_linear.register_fake
def _(x, mu, rho, bias, seed, samples, owner, per_sample, elem_offset=0, row_stride=0):
    lead = x.shape[1:-1] if per_sample else x.shape[:-1]
    return x.new_empty((samples, *lead, mu.shape[0]))


def _mean_field_linear_dx_impl(grad_y: Tensor, mu: Tensor, rho: Tensor, seed: Tensor, samples: int, owner: int,
                         per_sample: bool, elem_offset: int = 0, row_stride: int = 0) -> Tensor:
    rows = _rows(grad_y, samples) if mu.numel() else 0
    plan = _backend.plan("mean_field_linear_dx", mu.device, mu.dtype, rows=rows, act_dtype=grad_y.dtype, mode=0)
    kernel = plan.kernel
    mk = _map_kwargs(kernel, elem_offset, row_stride, _row_len(mu))
    if kernel is None or mk is None:
        w = reference.mean_field_reconstruct(mu, rho, seed=seed, samples=samples, owner=owner, elem_offset=elem_offset,
                                             row_stride=_ref_stride(row_stride))
        return _dx_reference(grad_y, w, samples, per_sample, mu.shape[1])
    return kernel(grad_y, mu, rho, seed, samples, owner, per_sample, fused=plan.fused, **mk)


mean_field_linear_dx = torch.library.custom_op("sws_kernels::mean_field_linear_dx", _mean_field_linear_dx_impl, mutates_args=())


@mean_field_linear_dx.register_fake
def _(grad_y, mu, rho, seed, samples, owner, per_sample, elem_offset=0, row_stride=0):
    return grad_y.new_empty((*((samples,) if per_sample else ()), *grad_y.shape[1:-1], mu.shape[1]))


def _mf_linear_setup(ctx, inputs, output):
    x, mu, rho, bias, seed, samples, owner, per_sample, *emap = inputs
    ctx.save_for_backward(x, mu, rho, bias, seed)
    ctx.args = (samples, owner, per_sample)
    ctx.emap = tuple(emap)


def _mf_linear_backward(ctx, gy, eager: bool = False):
    x, mu, rho, bias, seed = ctx.saved_tensors
    samples, owner, per_sample = ctx.args
    emap = getattr(ctx, "emap", ())
    dx_op = _mean_field_linear_dx_impl if eager else torch.ops.sws_kernels.mean_field_linear_dx
    mb = _mean_field_reconstruct_backward_impl if eager else torch.ops.sws_kernels.mean_field_reconstruct_backward
    gy = gy.contiguous()
    gx = None
    if ctx.needs_input_grad[0]:
        gx = dx_op(gy, mu, rho, seed, samples, owner, per_sample, *emap)
    out_f, in_f = mu.shape
    gw = _grad_w(gy, x, samples, per_sample, out_f, in_f, mu.dtype, "mean_field_reconstruct_backward")
    g_mu, g_rho = mb(gw, mu, rho, seed, samples, owner, 0, *emap)
    return (gx, g_mu, g_rho, _grad_bias(gy, bias, samples, out_f), None, None, None, None, *([None] * len(emap)))


torch.library.register_autograd("sws_kernels::mean_field_linear", _mf_linear_backward, setup_context=_mf_linear_setup)


def call_mean_field_linear(x, mu, rho, bias, seed: Tensor, samples: int, owner: int, per_sample: bool,
                           elem_offset: int = 0, row_stride: int = 0) -> Tensor:
    emap = () if elem_offset == 0 and row_stride == 0 else (elem_offset, row_stride)
    return _call("mean_field_linear", x, mu, rho, bias, philox.seed_tensor(seed, mu.device), samples, owner,
                 per_sample, *emap)


# ------------------------------------------------------------------------------------------------------
# Eager fast path. An eager call of a custom op with registered autograd pays torch.library's per-call Python
# plumbing: measured on a 16x16 SWSLinear (benchmarks/bench_overhead.py --profile), fill_defaults alone cost
# 61 us of a ~300 us forward + backward (it rescans the 18-argument schema per argument) and the dispatcher
# ~11 us per op, several times a kernel's own cost. So eager calls run the same implementations (the _*_impl
# functions the ops wrap) and the same setup/backward formulas through a plain autograd.Function, and under no
# grad call the implementation directly; torch.compile (and opcheck) keep going through the registered ops,
# which stay opaque to the compiler.
# ------------------------------------------------------------------------------------------------------

def _eager_function(name, impl, setup, backward):
    def forward(ctx, *inputs):
        out = impl(*inputs)
        setup(ctx, inputs, out)
        return out

    def bwd(ctx, *grads):
        return backward(ctx, *grads, eager=True)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(bwd)})


_EAGER = {
    "reconstruct": (_reconstruct_impl, _eager_function("_Reconstruct", _reconstruct_impl, _reconstruct_setup,
                                                       _reconstruct_backward)),
    "mean_field_reconstruct": (_mean_field_reconstruct_impl,
                               _eager_function("_MeanFieldReconstruct", _mean_field_reconstruct_impl, _mf_setup,
                                               _mf_backward)),
    "sws_linear": (_sws_linear_impl, _eager_function("_SWSLinear", _sws_linear_impl, _sws_linear_setup,
                                                     _sws_linear_backward)),
    "mean_field_linear": (_mean_field_linear_impl, _eager_function("_MeanFieldLinear", _mean_field_linear_impl,
                                                                   _mf_linear_setup, _mf_linear_backward)),
}


def _call(op: str, *args):
    """Run op ``op``: the registered custom op while torch.compile traces, else the eager fast path."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.sws_kernels, op)(*args)
    impl, fn = _EAGER[op]
    if torch.is_grad_enabled():
        return fn.apply(*args)
    return impl(*args)


# --- Triton kernel registrations ---
# Imported lazily inside each wrapper: `import sws_kernels` must work without triton; _backend.select only
# hands out these kernels when the triton backend is available.

def _triton_kernel(module: str, fn: str):
    def kernel(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(f"sws_kernels.triton.{module}"), fn)(*args, **kwargs)

    kernel.__name__ = f"triton_{fn}"
    kernel.sws_elem_map = True  # every Triton launcher takes a shard's elem_offset/row_stride
    return kernel


for _op, _mod in (("reconstruct", "reconstruct"), ("reconstruct_backward", "reconstruct"),
                  ("mean_field_reconstruct", "mean_field"), ("mean_field_reconstruct_backward", "mean_field"),
                  ("sws_linear", "linear"), ("sws_linear_dx", "linear"), ("mean_field_linear", "linear"),
                  ("mean_field_linear_dx", "linear")):
    _backend.register_kernel(_op, "triton")(_triton_kernel(_mod, _op))
