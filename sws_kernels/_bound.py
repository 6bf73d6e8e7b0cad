"""The layers' steady-state call: arguments bound once, launched with a fresh seed per call (issue 11).

A layer's tensors are validated when they enter (construction, buffer assignment, ``load_state_dict``,
``to_sws``, ``sws_kernels.load``: see ``_checks``), so its forward has nothing to re-check but its input. The
public functional API still runs its structural checks, argument conversions (int64 copies of the ellipse
components) and, for the native backends, ~15 tensor checks of ``native.prepare`` on every call: together
more than a small layer's kernels cost (benchmarks/bench_overhead.py). Here a layer keeps a *binding*:

- the converted, checked argument tuple of the reconstruct family (what ``_checks.sws`` returns minus the
  per-call seed and sample count) and, for the native backends, a ``native.Prepared`` bundle whose per-call
  fields (seed, samples) are written right before each launch;
- valid while every tensor is the same object at the same address, the index tensors (labels, ellipse and
  outlier positions/components/alpha) at the same ``_version``, and the mode and rng ids unchanged. An
  optimiser step updates parameters in place (same object, same address): the binding stays valid and the
  kernels read the new values. An in-place edit of an index tensor, a ``.data`` replacement, a new buffer or
  a loaded state rebuilds it (and so re-runs the data checks on the new index values, once).

The call then runs one small ``torch.autograd.Function`` per layer (forward and backward written out over
the same kernels as the ops in ``_ops``) or, without grad, the kernel alone. Where Python dominates a small layer's
step (benchmarks/bench_overhead.py), steps are merged without changing a bit of the result: a one-sample call
(``samples=None``) allocates its output without the sample dimension; with one input row per sample the backward's
parameter gradients come from one native call (csrc/cpu/layer.cpp: the weight gradient is an outer product, exact
in any order); ``out, kl = MeanFieldLinear(x)`` is one autograd node; the native ``*_run`` entries take a call's
seed, S and addresses as arguments (no per-call writes into the shared bundles). Anything this path does not
serve returns ``None`` and the layer takes the general functional path: torch.compile tracing (the
registered custom ops stay the graph nodes), ``SWS_VALIDATE=1`` / ``sws_kernels.validate()`` (every check on
every call), the reference backend (forced or the only one), non-contiguous or non-float32 parameters.

Numerics are those of the general path: the same kernels with the same arguments (tests/test_bound.py
compares outputs and every gradient bit for bit).
"""
from __future__ import annotations

import ctypes
import math
import operator
from typing import Optional

import torch

from . import _backend, _checks, _ops, native, philox, reference

__all__ = ["sws_linear", "sws_weights", "mean_field_linear", "mean_field_weights", "mean_field_kl", "clear"]

_NATIVE = ("native_cpu", "native_cuda")
# map() over these runs in C: the validity checks below are on every call
_PTR = torch.Tensor.data_ptr
_VERSION = operator.attrgetter("_version")


def _usable() -> bool:
    """False where the general path must run: tracing (custom ops), or every check on every call."""
    return not (torch.compiler.is_compiling() or _checks.always())


def _seed_for(seed, dev, backend):
    """The seed as the backend wants it: native kernels take an int or a 0-dim int64 tensor (read from memory),
    Triton a 0-dim int64 tensor on the parameters' device. Checked like the functional API checks it."""
    if isinstance(seed, torch.Tensor) and seed.dtype is torch.int64 and seed.dim() == 0:
        if backend in _NATIVE or seed.device == dev:
            return seed
        return seed.to(dev)
    seed = philox.check_seed(seed)
    return seed if backend in _NATIVE else philox.seed_tensor(seed, dev)


# ------------------------------------------------------------------------------------------------------
# SWS layers
# ------------------------------------------------------------------------------------------------------

class _SWSBinding:
    __slots__ = ("ids", "ptrs", "versions", "meta", "tensors", "prep", "index", "plans", "__weakref__")


def _sws_current(layer):
    """The layer's tensors, read straight from the module dicts (nn.Module.__getattr__ costs ~0.3 us each), then
    the layer's and the codebook's rng_id buffers (their identity and version stand for the owner ids)."""
    buf = layer._buffers
    par = layer._parameters
    cb = layer._modules["codebook"]
    cbp = cb._parameters
    # labels: a buffer, or a frozen parameter where sws_kernels.distributed.fully_shard shards them with the layer
    return (cbp["means"], cbp["chol"], buf["labels"] if "labels" in buf else par["labels"], buf["ellipse_pos"],
            buf["ellipse_a"], buf["ellipse_b"],
            buf["ellipse_alpha"], buf["outlier_pos"], par["outlier_mu"], par["outlier_rho"], par["bias"],
            buf["rng_id"], cb._buffers["rng_id"]), cb


def _sws_binding(layer) -> Optional[_SWSBinding]:
    """The layer's binding if still valid: the same tensor objects (ids) at the same addresses, the index tensors
    and the rng_id buffers at the same versions, the same mode; else a new one."""
    cur, cb = _sws_current(layer)
    b = layer.__dict__.get("_sws_binding")
    if b is not None:
        try:
            if (b.meta[0] == layer._mode and list(map(id, cur)) == b.ids and list(map(_PTR, cur[:10])) == b.ptrs
                    and list(map(_VERSION, cur[2:8] + cur[11:])) == b.versions):
                return b
        except RuntimeError:  # an inference tensor has no version counter: no binding
            return None
    return _sws_bind(layer, cur, cb, (layer.mode, layer._owner, cb._owner))


def _sws_bind(layer, cur, cb, meta) -> Optional[_SWSBinding]:
    means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias = cur[:11]
    # the tuples even when empty, so the converted arguments alias the layer's own (empty) outlier parameters
    a = _checks.sws(means, chol, labels, (e_pos, e_a, e_b, e_alpha), (o_pos, o_mu, o_rho), 0, 1, layer.mode,
                    layer._owner, cb._owner)
    b = _SWSBinding()
    try:
        b.versions = list(map(_VERSION, cur[2:8] + cur[11:]))
    except RuntimeError:
        return None
    b.ids = list(map(id, cur))
    b.ptrs = list(map(_PTR, cur[:10]))
    b.meta = meta
    mode = _checks.MODE_CODES[a.mode]
    b.tensors = (a.means, a.chol, a.labels, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.o_pos, a.o_mu, a.o_rho)
    b.index = (labels, e_pos, e_a, e_b, e_alpha, o_pos)
    b.prep = None
    if (means.dtype is torch.float32 and native.AVAILABLE_CPU
            and (means.is_cpu or native.AVAILABLE_CUDA)):
        p = native.prepare(*b.tensors, mode, a.owner, a.codebook_owner)
        # a contiguous copy of a parameter would not follow its optimiser updates: only bind aliases
        b.prep = p if all(x is y for x, y in zip(p.tensors[:2] + p.tensors[8:], (means, chol, o_mu, o_rho))) else None
    b.plans = {}
    layer.__dict__["_sws_binding"] = b
    return b


def _sws_forward(b, pl, x, bias, seed, S, ps, c, checked=False):
    """y in the call shape's output shape ``c.shape``: [S, *lead, out], or [*lead, out] for a squeezed call.
    ``checked``: the binding was verified by this call (addresses unmoved, see native._Bundle.refresh)."""
    t = b.tensors
    mode, owner, cbo = b.meta[0], b.meta[1], b.meta[2]
    if pl.backend in _NATIVE and b.prep is not None:
        p = b.prep
        if c.lin is not None:  # CPU fused: the output allocated in its final shape, the launch arguments reused
            return native.sws_linear_cpu_bound(p, c.lin, x, bias, seed, S, c.shape, checked)
        if pl.fused:
            run = native.sws_linear_cuda_prepared if p.cuda else native.sws_linear_cpu_prepared
            y = run(p, x, bias, seed, S, ps)
        else:
            y = _ops._vendor_linear(x, native.reconstruct_prepared(p, seed, S), bias, ps)
    else:
        y = pl.kernel(x, *t, bias, seed, S, _checks.MODE_CODES[mode], owner, cbo, ps, fused=pl.fused)
    return y.reshape(c.shape)


def _sws_reconstruct(b, backend, kernel, seed, S, squeeze=False):
    """Sampled weights [S, *shape], or [*shape] with ``squeeze`` (S = 1; CPU: allocated so, no [0] view)."""
    if backend in _NATIVE and b.prep is not None:
        if not b.prep.cuda:
            return native.reconstruct_prepared(b.prep, seed, S, b.prep.shape if squeeze else None)
        w = native.reconstruct_prepared(b.prep, seed, S)
    else:
        mode, owner, cbo = b.meta
        w = kernel(*b.tensors, seed, S, _checks.MODE_CODES[mode], owner, cbo)
    return w[0] if squeeze else w


def _sws_reconstruct_backward(b, gw, seed, S):
    """(g_means, g_chol, g_mu, g_rho) of dW [S, *shape]."""
    if b.prep is not None and _backend.select("reconstruct_backward", b.prep.device, torch.float32)[0] in _NATIVE:
        return native.reconstruct_backward_prepared(b.prep, gw, seed, S, b.index)
    mode, owner, cbo = b.meta
    if not isinstance(seed, torch.Tensor):
        seed = philox.seed_tensor(seed, b.tensors[0].device)
    return _ops._reconstruct_backward_impl(gw, *b.tensors, seed, S, _checks.MODE_CODES[mode], owner, cbo)


class _SWSLinearFn(torch.autograd.Function):
    """One SWS linear call: forward and backward of ``_ops.sws_linear`` over a binding."""

    @staticmethod
    def forward(ctx, x, means, chol, o_mu, o_rho, bias, call):
        # call = (binding, plan, seed, S, per_sample, call shape, squeeze): one argument, as apply's per-argument
        # work is costly
        b, pl, seed, S, ps, c, squeeze = call
        y = _sws_forward(b, pl, x, bias, seed, S, ps, c, True)
        ctx.save_for_backward(x, means, chol, o_mu, o_rho, bias)
        ctx.call = call
        return y

    @staticmethod
    def backward(ctx, gy):
        x, means, chol, o_mu, o_rho, bias = ctx.saved_tensors
        b, pl, seed, S, ps, c, squeeze = ctx.call
        gy = gy.contiguous()
        if squeeze:
            gy = gy.unsqueeze(0)
        out_f, in_f = b.tensors[2].shape
        mode, owner, cbo = b.meta
        mcode = _checks.MODE_CODES[mode]
        gx = None
        if (c.rows == 1 and b.prep is not None and not b.prep.cuda and pl.backend == "native_cpu"
                and x.dtype is torch.float32 and gy.dtype is torch.float32
                and S * out_f * in_f <= _backend.LIMITS["cpu_rows_backward_max"].value
                and _backend.select("reconstruct_backward", b.prep.device, torch.float32)[0] == "native_cpu"):
            # one input row per sample: every parameter gradient in one native call (csrc/cpu/layer.cpp),
            # bit-identical to the three ops below; the input gradient as below
            n = ctx.needs_input_grad
            if n[0]:
                gx = _ops._dx_reference(gy, native.reconstruct_prepared(b.prep, seed, S), S, ps, in_f)
            g = native.sws_linear_backward_rows_cpu(b.prep, gy, x, seed, S, ps,
                                                    n[5] and bias.dim() == 1 and bias.dtype is torch.float32)
            g_bias = g[4]
            if g_bias is None and n[5]:
                g_bias = _ops._grad_bias(gy, bias, S, out_f)
            return (gx, g[0] if n[1] else None, g[1] if n[2] else None, g[2] if n[3] else None,
                    g[3] if n[4] else None, g_bias, None)
        if ctx.needs_input_grad[0]:
            if pl.backend in _NATIVE and b.prep is not None:
                w = native.reconstruct_prepared(b.prep, seed, S)
                gx = _ops._dx_reference(gy, w, S, ps, in_f)
            else:
                dx_plan = _backend.plan("sws_linear_dx", means.device, means.dtype, rows=_ops._rows(gy, S),
                                        act_dtype=gy.dtype, mode=mcode)
                sd = seed if isinstance(seed, torch.Tensor) else philox.seed_tensor(seed, means.device)
                if dx_plan.kernel is None:
                    gx = _ops._sws_linear_dx_impl(gy, *b.tensors, sd, S, mcode, owner, cbo, ps)
                else:
                    gx = dx_plan.kernel(gy, *b.tensors, sd, S, mcode, owner, cbo, ps, fused=dx_plan.fused)
        g_means = g_chol = g_mu = g_rho = None
        if any(ctx.needs_input_grad[1:5]):
            gw = _ops._grad_w(gy, x, S, ps, out_f, in_f, means.dtype, "reconstruct_backward").view(S, out_f, in_f)
            g_means, g_chol, g_mu, g_rho = _sws_reconstruct_backward(b, gw, seed, S)
        g_bias = _ops._grad_bias(gy, bias, S, out_f) if ctx.needs_input_grad[5] else None
        return gx, g_means, g_chol, g_mu, g_rho, g_bias, None


class _SWSReconstructFn(torch.autograd.Function):
    """The sampled weights of an SWS layer over a binding (the conv layers' path)."""

    @staticmethod
    def forward(ctx, means, chol, o_mu, o_rho, b, backend, kernel, seed, S, squeeze):
        w = _sws_reconstruct(b, backend, kernel, seed, S, squeeze)
        ctx.save_for_backward(means, chol, o_mu, o_rho)
        ctx.b, ctx.seed, ctx.S, ctx.squeeze = b, seed, S, squeeze
        return w

    @staticmethod
    def backward(ctx, gw):
        ctx.saved_tensors  # noqa: B018  (raises if a parameter was modified in place since forward)
        gw = gw.contiguous().to(torch.float32)
        g = _sws_reconstruct_backward(ctx.b, gw.unsqueeze(0) if ctx.squeeze else gw, ctx.seed, ctx.S)
        return (*g, None, None, None, None, None, None)


def _grad_needed(tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


class _CallShape:
    """What one call shape of a bound layer decided (cached in the binding, keyed by the input's shape, dtype and
    device, S, per_sample, squeeze and the backend choice): the plan, the histogram kernel for no-grad calls, the
    input's lead dims, the output shape, and for the native CPU fused kernel a reusable ``_C.LinearArgs``."""
    __slots__ = ("pl", "hk", "lead", "rows", "shape", "lin")


def _call_shape(b, x, S, ps, squeeze) -> Optional[_CallShape]:
    """The checks of one new call shape (None: the general path raises the precise error) and its decisions."""
    t = b.tensors
    dev = t[0].device
    out_f, in_f = t[2].shape
    if (not x.dtype.is_floating_point or x.device != dev or x.dim() < 1 or x.shape[-1] != in_f
            or (ps and (x.dim() < 2 or x.shape[0] != S)) or (squeeze and (S != 1 or ps))):
        return None
    if 4 * S * out_f * in_f > _checks._FIT_FLOOR:
        _checks.samples_fit(S, out_f * in_f, dev)
    c = _CallShape()
    c.lead = x.shape[1:-1] if ps else x.shape[:-1]
    # rows per sample; 0 for an empty weight or input, which takes reconstruct + GEMM (no fused kernel)
    c.rows = (x.numel() // (in_f * S) if ps else x.numel() // in_f) if out_f * in_f else 0
    c.pl, c.hk = _dispatch(b, dev, c.rows, S, ps, x.dtype)
    c.shape = (*c.lead, out_f) if squeeze else (S, *c.lead, out_f)
    c.lin = None
    if (c.pl.backend == "native_cpu" and c.pl.fused and b.prep is not None and x.dtype is torch.float32
            and 0 < c.rows <= native.LINEAR_CPU_MAX_M):
        c.lin = native.linear_args(out_f, in_f, c.rows, ps)
    return c


def sws_linear(layer, x, S: int, seed, ps: bool, squeeze: bool = False):
    """The SWS linear layer's call over its binding, or None: take the general path (module docstring).
    ``squeeze`` (S = 1, not per sample): return [*lead, out], the layer's output for ``samples=None``."""
    if not _usable() or not isinstance(x, torch.Tensor):
        return None
    b = _sws_binding(layer)
    if b is None:
        return None
    key = (x.shape, x.dtype, x.device, S, ps, squeeze, _backend.current(), _backend.interpret())
    c = b.plans.get(key)
    if c is None:
        c = _call_shape(b, x, S, ps, squeeze)
        if c is None:
            return None  # the general path raises the precise error
        if len(b.plans) > 64:
            b.plans.clear()
        b.plans[key] = c
    pl = c.pl
    if pl.kernel is None:
        return None
    t = b.tensors
    means = t[0]
    bias = layer._parameters["bias"]
    if bias is not None and bias.device != means.device:
        return None
    seed = _seed_for(seed, means.device, pl.backend)
    if torch.is_grad_enabled() and (x.requires_grad or means.requires_grad or t[1].requires_grad
                                    or t[8].requires_grad or t[9].requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _SWSLinearFn.apply(x, means, t[1], t[8], t[9], bias, (b, pl, seed, S, ps, c, squeeze))
    if c.hk is not None:  # inference: the label-histogram path where the dispatch table says it pays (issue 14)
        if pl.backend == "native_cpu" and b.prep is not None:
            y = native.sws_linear_histogram_cpu_prepared(b.prep, x, bias, seed, S)
        else:
            mode, owner, cbo = b.meta
            y = c.hk(x, *t, bias, _seed_for(seed, means.device, "triton"), S, _checks.MODE_CODES[mode], owner, cbo)
        return y.reshape(c.shape)
    return _sws_forward(b, pl, x, bias, seed, S, ps, c, True)


def _dispatch(b, dev, rows, S, ps, act_dtype):
    """(plan, label-histogram kernel for a no-grad call or None): ``_backend.plan`` and ``_backend.histogram``
    for one call shape (cached in the binding by the caller: the key holds everything they depend on)."""
    mode = _checks.MODE_CODES[b.meta[0]]
    pl = _backend.plan("sws_linear", dev, torch.float32, rows=rows, act_dtype=act_dtype, mode=mode)
    hk = None
    if pl.kernel is not None and not ps:
        hk = _backend.histogram(pl.backend, rows, S, mode, act_dtype, ps, False)[0]
    return pl, hk


def sws_weights(layer, S: int, seed, squeeze: bool = False):
    """Sampled weights [S, *shape] ([*shape] with ``squeeze``, S = 1) of an SWS layer over its binding, or None
    (general path)."""
    if not _usable():
        return None
    b = _sws_binding(layer)
    if b is None:
        return None
    t = b.tensors
    dev = t[0].device
    if 4 * S * t[2].numel() > _checks._FIT_FLOOR:
        _checks.samples_fit(S, t[2].numel(), dev)
    backend, kernel, _ = _backend.select("reconstruct", dev, t[0].dtype)
    if kernel is None:
        return None
    seed = _seed_for(seed, dev, backend)
    if _grad_needed((t[0], t[1], t[8], t[9])):
        return _SWSReconstructFn.apply(t[0], t[1], t[8], t[9], b, backend, kernel, seed, S, squeeze)
    return _sws_reconstruct(b, backend, kernel, seed, S, squeeze)


# ------------------------------------------------------------------------------------------------------
# Mean-field layers
# ------------------------------------------------------------------------------------------------------

class _MFBinding:
    __slots__ = ("ids", "ptrs", "owner", "prep_w", "prep_b", "kl_key", "kl_value", "__weakref__")


def _mf_current(layer):
    par = layer._parameters
    return (par[layer._w_mu], par[layer._w_rho], par["mu_bias"], par["rho_bias"])


def _mf_binding(layer) -> Optional[_MFBinding]:
    cur = _mf_current(layer)
    b = layer.__dict__.get("_mf_binding")
    ptrs = [t.data_ptr() if t is not None else 0 for t in cur]
    if b is not None and b.owner == layer._owner and list(map(id, cur)) == b.ids and ptrs == b.ptrs:
        return b
    mu, rho, bmu, brho = cur
    b = _MFBinding()
    b.ids, b.ptrs, b.owner = list(map(id, cur)), ptrs, layer._owner
    b.prep_w = b.prep_b = None
    b.kl_key = b.kl_value = None
    if mu.dtype is torch.float32 and native.AVAILABLE_CPU and (mu.is_cpu or native.AVAILABLE_CUDA):
        p = native.prepare_mean_field(mu, rho, layer._owner, 0)
        b.prep_w = p if p.aliases else None
        if bmu is not None and brho is not None and bmu.dtype is torch.float32:
            pb = native.prepare_mean_field(bmu, brho, layer._owner, 2)
            b.prep_b = pb if pb.aliases else None
    layer.__dict__["_mf_binding"] = b
    return b


def _mf_sample(b, bmu, seed, S, squeeze=False, checked=False):
    """(sampled weights [S, *shape], sampled bias [S, out] or the bias mean or None) from the native bundles;
    ``squeeze`` (S = 1): [*shape] and [out]. CPU: both in one call."""
    pw, pb = b.prep_w, b.prep_b
    if not pw.cuda:
        w, bias = native.mean_field_sample_cpu(pw, pb, seed, S, pw.shape if squeeze else (S, *pw.shape),
                                               None if pb is None else pb.shape if squeeze else (S, *pb.shape),
                                               checked)
        return w, (bmu if pb is None else bias)
    w = native.mean_field_reconstruct_prepared(pw, seed, S)
    bias = native.mean_field_reconstruct_prepared(pb, seed, S) if pb is not None else bmu
    if squeeze:
        return w[0], (bias[0] if pb is not None else bias)
    return w, bias


def _mf_ready(layer, S: int):
    """(binding, mu, rho, bias_mu, bias_rho) when the native bundles serve this layer's call, else None."""
    if not _usable():
        return None
    b = _mf_binding(layer)
    if b is None or b.prep_w is None:
        return None
    mu, rho, bmu, brho = _mf_current(layer)
    if brho is not None and b.prep_b is None:
        return None
    if 4 * S * mu.numel() > _checks._FIT_FLOOR:
        _checks.samples_fit(S, mu.numel(), mu.device)
    return b, mu, rho, bmu, brho


def _mf_linear(x, w, bias, ps, squeeze):
    """y = x w^T + bias: [*lead, out] from squeezed float32 weights [out, in] and bias (S = 1, float32 x: the
    F.linear ``_ops._vendor_linear`` calls then), else ``_ops._vendor_linear``."""
    if squeeze:
        return torch.nn.functional.linear(x, w, bias)
    return _ops._vendor_linear(x, w, bias, ps)


class _MFLinearFn(torch.autograd.Function):
    """One mean-field linear call (weights and sampled bias) over native bundles."""

    @staticmethod
    def forward(ctx, x, mu, rho, bmu, brho, call):
        b, seed, S, ps, squeeze = call
        w, bias = _mf_sample(b, bmu, seed, S, squeeze, True)
        y = _mf_linear(x, w, bias, ps, squeeze)
        ctx.save_for_backward(x, mu, rho, bmu, brho)
        ctx.call = call
        return y

    @staticmethod
    def backward(ctx, gy):
        x, mu, rho, bmu, brho = ctx.saved_tensors
        b, seed, S, ps, squeeze = ctx.call
        gy = gy.contiguous()
        if squeeze:
            gy = gy.unsqueeze(0)
        out_f, in_f = mu.shape
        n = ctx.needs_input_grad
        gx = g_mu = g_rho = g_bmu = g_brho = None
        if (not b.prep_w.cuda and x.dtype is torch.float32 and gy.dtype is torch.float32
                and x.numel() == (S if ps else 1) * in_f
                and S * out_f * in_f <= _backend.LIMITS["cpu_rows_backward_max"].value):
            # one input row per sample: every parameter gradient in one native call (csrc/cpu/layer.cpp),
            # bit-identical to the ops below; the input gradient as below
            if n[0]:
                gx = _ops._dx_reference(gy, native.mean_field_reconstruct_prepared(b.prep_w, seed, S), S, ps, in_f)
            g = native.mean_field_linear_backward_rows_cpu(b.prep_w, b.prep_b, gy, x, seed, S, ps)
            g_bmu = g[2]
            if bmu is not None and b.prep_b is None and n[3]:
                g_bmu = gy.reshape(S, out_f).sum(0, dtype=torch.float32).to(bmu.dtype)
            return (gx, g[0] if n[1] else None, g[1] if n[2] else None, g_bmu if n[3] else None,
                    g[3] if n[4] else None, None)
        if n[0]:
            w = native.mean_field_reconstruct_prepared(b.prep_w, seed, S)
            gx = _ops._dx_reference(gy, w, S, ps, in_f)
        if n[1] or n[2]:
            gw = _ops._grad_w(gy, x, S, ps, out_f, in_f, mu.dtype, "mean_field_reconstruct_backward")
            g_mu, g_rho = native.mean_field_reconstruct_backward_prepared(b.prep_w, gw.view(S, out_f, in_f), seed, S)
        if bmu is not None and (n[3] or n[4]):
            gb = gy.reshape(S, math.prod(gy.shape[1:-1]), out_f).sum(1, dtype=torch.float32)  # [S, out]
            if b.prep_b is not None:
                g_bmu, g_brho = native.mean_field_reconstruct_backward_prepared(b.prep_b, gb, seed, S)
            else:
                g_bmu = gb.sum(0).to(bmu.dtype)
        return gx, g_mu, g_rho, g_bmu, g_brho, None


class _MFLinearKLFn(torch.autograd.Function):
    """bayesian-torch's default call ``out, kl = layer(x)`` with grad as ONE autograd node: :class:`_MFLinearFn`
    and :class:`_MFKLFn` in one (each node costs ~6 us of Function.apply and engine work on a small layer). The
    gradients are theirs: the engine adds the two nodes' contributions to a parameter before accumulating it,
    and so does this backward (a sum of two terms, the same in either order)."""

    @staticmethod
    def forward(ctx, x, mu, rho, bmu, brho, call, priors):
        ctx.set_materialize_grads(False)
        y = _MFLinearFn.forward(ctx, x, mu, rho, bmu, brho, call)  # saves (x, mu, rho, bmu, brho) and call
        ctx.priors = priors
        kl = native.kl_gaussian_mean(mu, rho, priors[0], priors[1], bmu, brho, priors[2], priors[3])
        return y, torch.scalar_tensor(kl, dtype=torch.float32)

    @staticmethod
    def backward(ctx, gy, gkl):
        g = list(_MFLinearFn.backward(ctx, gy)[:5]) if gy is not None else [None] * 5
        if gkl is not None and any(ctx.needs_input_grad[1:5]):
            gk = _kl_grads(*ctx.saved_tensors[1:], ctx.priors, gkl)
            for i in range(1, 5):
                if ctx.needs_input_grad[i] and gk[i - 1] is not None:
                    g[i] = gk[i - 1] if g[i] is None else g[i] + gk[i - 1]
        return (*g, None, None)


def mean_field_linear(layer, x, S: int, seed, ps: bool, squeeze: bool = False, with_kl: bool = False):
    """The mean-field linear layer's call over native bundles, or None (general path). ``squeeze`` (S = 1, not
    per sample): return [*lead, out], the layer's output for ``samples=None``. ``with_kl``: return
    ``(out, layer.kl_loss())`` (one autograd node for both with grad), or None where that does not apply."""
    ready = _mf_ready(layer, S) if isinstance(x, torch.Tensor) else None
    if ready is None:
        return None
    b, mu, rho, bmu, brho = ready
    dev = mu.device
    out_f, in_f = mu.shape
    if (not x.dtype.is_floating_point or x.device != dev or x.dim() < 1 or x.shape[-1] != in_f
            or (ps and (x.dim() < 2 or x.shape[0] != S)) or (squeeze and (S != 1 or ps))):
        return None  # the general path raises the precise error
    backend = _backend.select("mean_field_linear", dev, mu.dtype)[0]
    if backend not in _NATIVE:
        return None
    seed = _seed_for(seed, dev, backend)
    # squeezed sampling where the general path's single F.linear applies (float32 x and bias), else [0] at the end
    sq = squeeze and x.dtype is torch.float32 and (bmu is None or bmu.dtype is torch.float32)
    if torch.is_grad_enabled() and (x.requires_grad or mu.requires_grad or rho.requires_grad
                                    or (bmu is not None and bmu.requires_grad)
                                    or (brho is not None and brho.requires_grad)):
        if with_kl:
            values = _kl_values(layer, mu, bmu, brho)
            if values is None:
                return None
            y, kl = _MFLinearKLFn.apply(x, mu, rho, bmu, brho, (b, seed, S, ps, sq), values)
            return (y[0] if squeeze and not sq else y), kl
        y = _MFLinearFn.apply(x, mu, rho, bmu, brho, (b, seed, S, ps, sq))
    else:
        w, bias = _mf_sample(b, bmu, seed, S, sq, True)
        y = _mf_linear(x, w, bias, ps, sq)
    y = y[0] if squeeze and not sq else y
    return (y, mean_field_kl(layer, layer._kl_loss)) if with_kl else y


class _MFReconstructFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, rho, p, seed, S):
        ctx.save_for_backward(mu, rho)
        ctx.p, ctx.seed, ctx.S = p, seed, S
        return native.mean_field_reconstruct_prepared(p, seed, S)

    @staticmethod
    def backward(ctx, gw):
        ctx.saved_tensors  # noqa: B018  (raises if mu/rho were modified in place since forward)
        g_mu, g_rho = native.mean_field_reconstruct_backward_prepared(ctx.p, gw.contiguous().to(torch.float32),
                                                                      ctx.seed, ctx.S)
        return g_mu, g_rho, None, None, None


class _MFWeightsFn(torch.autograd.Function):
    """A mean-field conv layer's sampled kernels and bias in one node (one native call forward, CPU)."""

    @staticmethod
    def forward(ctx, mu, rho, bmu, brho, call):
        b, seed, S, squeeze = call
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(mu, rho)
        ctx.call = call
        return _mf_sample(b, bmu, seed, S, squeeze, True)

    @staticmethod
    def backward(ctx, gw, gb):
        ctx.saved_tensors  # noqa: B018  (raises if mu/rho were modified in place since forward)
        b, seed, S, squeeze = ctx.call
        g = [None] * 5
        for grad, p, i in ((gw, b.prep_w, 0), (gb, b.prep_b, 2)):
            if grad is not None and (ctx.needs_input_grad[i] or ctx.needs_input_grad[i + 1]):
                grad = grad.contiguous().to(torch.float32)
                g[i], g[i + 1] = native.mean_field_reconstruct_backward_prepared(
                    p, grad.unsqueeze(0) if squeeze else grad, seed, S)
        return tuple(g)


def mean_field_weights(layer, S: int, seed, squeeze: bool = False):
    """(sampled weights [S, *shape], sampled bias [S, out] or the bias mean or None) over native bundles, or
    None (general path); ``squeeze`` (S = 1): [*shape] and [out]. The conv layers' path."""
    ready = _mf_ready(layer, S)
    if ready is None:
        return None
    b, mu, rho, bmu, brho = ready
    backend = _backend.select("mean_field_reconstruct", mu.device, mu.dtype)[0]
    if backend not in _NATIVE:
        return None
    seed = _seed_for(seed, mu.device, backend)
    if _grad_needed((mu, rho, bmu, brho)):
        if b.prep_b is not None and not b.prep_w.cuda:  # a sampled bias: kernels and bias from one node
            return _MFWeightsFn.apply(mu, rho, bmu, brho, (b, seed, S, squeeze))
        w = _MFReconstructFn.apply(mu, rho, b.prep_w, seed, S)
        bias = _MFReconstructFn.apply(bmu, brho, b.prep_b, seed, S) if b.prep_b is not None else bmu
        if squeeze:
            return w[0], (bias[0] if b.prep_b is not None else bias)
        return w, bias
    return _mf_sample(b, bmu, seed, S, squeeze, True)


def _scalar(t) -> Optional[float]:
    """The value of a one-element CPU float32 prior buffer, read from its memory (no aten op, no sync); None for
    anything else (a tensor prior, another device or dtype: the general path handles those)."""
    if t is None or not t.is_cpu or t.dtype is not torch.float32 or t.numel() != 1:
        return None
    return ctypes.c_float.from_address(t.data_ptr()).value


class _MFKLFn(torch.autograd.Function):
    """bayesian-torch's layer KL (each tensor's mean KL, weight + bias) with the native value and gradient
    (csrc/cpu/kl.cpp): two calls where the formula's PyTorch ops and autograd nodes cost ~40 us a call."""

    @staticmethod
    def forward(ctx, mu, rho, bmu, brho, priors):
        kl = native.kl_gaussian_mean(mu, rho, priors[0], priors[1], bmu, brho, priors[2], priors[3])
        ctx.save_for_backward(mu, rho, bmu, brho)
        ctx.priors = priors
        return torch.scalar_tensor(kl, dtype=torch.float32)  # torch.tensor(kl, dtype=...) costs ~2 us more

    @staticmethod
    def backward(ctx, g):
        mu, rho, bmu, brho = ctx.saved_tensors
        return (*_kl_grads(mu, rho, bmu, brho, ctx.priors, g), None)


def _kl_grads(mu, rho, bmu, brho, priors, g):
    """(g_mu, g_rho, g_bmu, g_brho) of g times the layer KL of :class:`_MFKLFn` (native, csrc/cpu/kl.cpp)."""
    wm, ws, bm, bs = priors
    g = g.to(torch.float32).contiguous()
    gv = ctypes.c_float.from_address(g.data_ptr()).value  # the CPU scalar, read without an aten op (no sync)
    g_mu, g_rho = native.kl_gaussian_backward(mu, rho, wm, ws, gv / mu.numel())
    g_bmu = g_brho = None
    if bmu is not None:
        g_bmu, g_brho = native.kl_gaussian_backward(bmu, brho, bm, bs, gv / bmu.numel())
    return g_mu, g_rho, g_bmu, g_brho


def mean_field_kl(layer, compute):
    """The mean-field layer's KL (bayesian-torch's convention): ``compute()`` (the general formula) where this
    path does not apply, else the native value and gradient (csrc/cpu/kl.cpp; float32 terms summed in double,
    so it agrees with ``compute()`` to float32 rounding, not bit for bit).

    Without grad, the value is kept with the binding and reused while the parameters and priors are unchanged
    (same objects, addresses and versions): evaluation loops call forward many times between updates, and
    bayesian-torch's default ``forward`` recomputes it on every call."""
    cur = _mf_current(layer)
    mu, rho, bmu, brho = cur
    if not _usable() or not _kl_native(mu, bmu, brho):
        return compute()
    priors = _priors(layer)
    grad = _grad_needed(cur)
    b = None if grad else _mf_binding(layer)
    if b is not None:
        # the kept value while the parameters and priors are the same tensors at the same versions (no prior is
        # read: the values follow from the versions); a fresh tensor per call, as every PyTorch op returns, so
        # an in-place edit by the caller reaches neither the cache nor other calls' results
        try:
            key = (tuple(map(id, cur + priors)), tuple(t._version if t is not None else -1 for t in cur + priors))
        except RuntimeError:  # inference tensors: no versions to key on
            key = None
        if key is not None and b.kl_key == key:
            return b.kl_value.clone()
    values = _prior_values(layer, priors, bmu is None)
    if values is None:
        return compute()
    if grad:
        return _MFKLFn.apply(mu, rho, bmu, brho, values)
    kl = _MFKLFn.forward(_NoCtx(), mu, rho, bmu, brho, values)
    if b is not None and key is not None:
        b.kl_key, b.kl_value = key, kl
        return kl.clone()
    return kl


def _priors(layer):
    buf = layer._buffers
    return buf["prior_weight_mu"], buf["prior_weight_sigma"], buf["prior_bias_mu"], buf["prior_bias_sigma"]


def _kl_native(mu, bmu, brho) -> bool:
    """Where the layer KL is computed natively (csrc/cpu/kl.cpp): float32 CPU parameters, the bias' mu and rho
    both present or both absent."""
    return (native.AVAILABLE_CPU and mu.is_cpu and mu.dtype is torch.float32 and (bmu is None) == (brho is None)
            and (bmu is None or bmu.dtype is torch.float32))


def _kl_values(layer, mu, bmu, brho):
    """The prior scalars where :func:`mean_field_kl` computes the KL natively, else None."""
    return _prior_values(layer, _priors(layer), bmu is None) if _kl_native(mu, bmu, brho) else None


def _prior_values(layer, priors, no_bias: bool):
    """The four prior scalars (weight mu, sigma, bias mu, sigma; (0, 1) for a layer without bias) read from the
    prior buffers, kept on the layer while the buffers are the same tensors at the same versions (four reads from
    memory cost ~1.5 us a call); None where a prior is not a one-element CPU float32 buffer."""
    try:
        key = (tuple(map(id, priors)), tuple(t._version if t is not None else -1 for t in priors), no_bias)
    except RuntimeError:  # inference tensors
        key = None
    hit = layer.__dict__.get("_prior_values")
    if hit is not None and key is not None and hit[0] == key:
        return hit[1]
    values = tuple(map(_scalar, priors[:2] if no_bias else priors))
    if None in values:
        return None
    values = values + (0.0, 1.0) if no_bias else values
    if key is not None:
        layer.__dict__["_prior_values"] = (key, values)
    return values


class _NoCtx:
    """A stand-in ctx for calling _MFKLFn.forward without autograd."""

    def save_for_backward(self, *tensors):
        pass


def clear(module) -> None:
    """Drop the bindings of ``module`` and its children (they rebuild on the next call)."""
    for m in module.modules():
        m.__dict__.pop("_sws_binding", None)
        m.__dict__.pop("_mf_binding", None)
