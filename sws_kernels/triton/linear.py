"""Fused SWS and mean-field linear in Triton: the weight is generated tile by tile inside the GEMM.

One kernel, ``_lookup_gemm_kernel``, computes for every sample s

    out[s, m, n] = sum_t sum_r A[s_t, m, r] * W_s(n, r)  (+ bias[s, n])

where W_s(n, r) is the weight at flat index n * lab_sr + r * lab_sc, generated on the fly:
  SWS         z_mu[s, label] (+ softplus(z_rho[s, label]) eps[s, idx] in hierarchical mode): the hot path reads
              one label per weight (uint8/int16/int32) and a per-sample codebook z[S, K, 2] that a tiny
              prologue samples (reconstruct.sample_codebook; 32 KiB per sample at K = 4096, L2-resident);
  mean field  mu[idx] + softplus(rho[idx]) eps[s, idx].
The same kernel gives
  forward  y = x W^T:  A = x [S or shared, M, in], n = output feature, r = input feature (lab_sr = in, lab_sc = 1);
  dx       dx = dy W:  A = dy [S, M, out],          n = input feature,  r = output feature (lab_sr = 1,
           lab_sc = in); for x shared by all samples the program loops the S samples (T = S) and sums them in
           a fixed order, so dx is deterministic without atomics.

Ellipse and outlier weights (SWS only): the tile loop uses their label like any inlier; an epilogue adds
the correction x[m, r] * delta[s, j] for the E + O special weights of the program's n range, with delta =
true value - label value computed by a sparse prologue (reconstruct.special_values). The specials are sorted
by n (a CSR built in torch), so each program walks one contiguous range of them, BE at a time, as a
[BM, BE] x [BE, BN] one-hot matmul: in the same launch, fixed order, no atomics; it costs about
(E + O) / (out * in) of the main loop (about 1% at the issue's 1% outliers + 0.1% ellipses).

Stages of the kernel (tile shapes: A [BM, BR], W [BN, BR], accumulator [BM, BN] float32):
  1. for each sample t of the program: for each r tile: load A, load labels (or mu/rho), build W, acc += A W^T;
  2. specials epilogue for that sample (SWS with E + O > 0);
  3. bias, cast, store.

Weights are cast to the activations' dtype before the dot (as PyTorch does with w.to(x.dtype)); fp32 dots
use IEEE precision (PyTorch's default has TF32 off). Under the interpreter tl.dot on bf16 is wrong, so tiles
are upcast to fp32 there (DOT_F32).

Dispatch: every entry point takes ``fused`` from the one dispatch table (``_backend.plan``, LIMITS
"triton_fused_max_m"): the fused kernel where the layer is memory-bound (few rows per sample), else
"reconstruct once, then the vendor GEMM" (torch.matmul).
"""
from __future__ import annotations

import logging
import math
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl

from . import mean_field as _mf
from . import reconstruct as _rc
from ._launch import GPU_TILES, INTERPRET_C, empty, launch
from .philox import load_seed, normal_rows, seed_arg, stream_normal, u32_arg
from .reconstruct import _purpose, softplus

log = logging.getLogger("sws_kernels")

BE = 16  # specials per epilogue step (the smallest tl.dot inner size)


def _tiles(M: int, dtype: torch.dtype, elem_noise: bool = False):
    """(BM, BN, BR, num_warps, num_stages) for M rows per sample and activations of ``dtype``; ``elem_noise``:
    noise drawn with a Philox call per weight (its row length is not a multiple of 4), the most live state.

    GPU: narrow N tiles at small M so a 4096-wide layer still fills ~130 SMs with S = 1. The weight tile
    [BN, BR] is generated in registers (labels -> z gather, or mu/rho + Philox) next to the accumulator, so
    every choice here is the largest tile benchmarks/triton_aot.py found spill-free on sm_80 and sm_90 for
    every mode (RESULTS.md has the table): e.g. bf16 hierarchical dx at 64x64x32 with 4 warps spilled 324 B
    on sm_80 (none with 8), at 128x128x32 20 B; fp32 (tf32x3: each product split in hi/lo) needs thinner
    tiles.
    Interpreter: small tiles (its cost grows with programs x loop iterations) unless SWS_TRITON_TILES=gpu."""
    if not GPU_TILES:
        return (16 if M <= 16 else 32), 32, 32, 4, 1
    if dtype == torch.float32:
        # tf32x3 at M <= 16 spills 12-44 B on some variants at every tile tried (16-32 x 16-64, 2-8 warps, 2-3
        # stages: spills at 128-170 registers, so not plain register pressure); this one spills least. fp32 is
        # not the production dtype (bf16/fp16 are, all spill-free), and the goal for fp32 is tensor-core precision.
        return (16, 32, 32, 4, 2) if M <= 16 else (32, 64, 16, 8, 3)
    if elem_noise:  # half the weights per tile: 16x32x64 spilled up to 52 B, 64x64x32 up to 296 B on sm_80
        return (16, 32, 32, 8, 3) if M <= 16 else (64, 32, 32, 8, 3)
    if M <= 16:
        # the only one of 15 small-M tiles swept that is spill-free for every mode and orientation on both archs
        # (16x32x128 with 4 warps spilled up to 832 B in the mean-field dx orientation on sm_80)
        return 16, 32, 64, 8, 3
    if M <= 64:
        return 64, 64, 32, 8, 3
    return 128, 64, 32, 8, 3


@triton.jit
def _rne_bf16(x):
    """Round float32 to the nearest bfloat16 (ties to even), kept in float32. Only used under the interpreter,
    whose float32 -> bfloat16 conversion truncates; after this the truncation is exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mma(acc, a, b):
    """acc += a @ b with fp32 accumulation. bf16/fp16 tiles go to the tensor cores as they are; fp32 tiles use
    tf32x3 (three TF32 products, error near fp32 rounding; an IEEE FMA dot of a 64x64 tile spills). The
    interpreter's bf16 dot is wrong, so there everything is upcast to fp32 (INTERPRET_C is a constexpr:
    dead code in a GPU compile)."""
    if INTERPRET_C:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _mma_specials(acc, ag, onehot, X_F32: tl.constexpr):
    """The specials epilogue's acc += x[:, r] (fp32) @ one-hot(delta) (fp32). With fp32 activations it needs
    fp32 accuracy (tf32x3); with bf16/fp16 activations one TF32 product (10-bit mantissa: as fine as the fp16
    and finer than the bf16 weights the main loop rounds to) is enough, and tf32x3 there was what made the bf16
    tiles spill (the three products' hi/lo splits next to a live 64x64 accumulator). The interpreter runs this
    dot in IEEE fp32, so the TF32 rounding is first exercised on a card (the GPU validation issue)."""
    if INTERPRET_C:
        return acc + tl.dot(ag, onehot, input_precision="ieee")
    elif X_F32:
        return tl.dot(ag, onehot, acc, input_precision="tf32x3")
    else:
        return tl.dot(ag, onehot, acc, input_precision="tf32")


# Sizes and counts are not specialised (== 1 / divisible by 16 would only multiply the compiled variants:
# they feed masks and loop bounds); strides are, since a stride of 1 or a multiple of 16 is what lets the
# compiler vectorise the A and label loads.
# noise_off / noise_sr: the weight noise of element (row, col) is element noise_off + row * noise_sr + col of the
# stream: (0, in_features) for a whole layer; a tensor-parallel shard's place in the unsharded weight otherwise
# (sws_kernels/reference.py element_map).
@triton.jit(do_not_specialize=["M", "N", "R", "K", "J", "T", "n_m", "n_n", "seed_ptr", "owner", "noise_off",
                               "noise_sr"])
def _lookup_gemm_kernel(a_ptr, lab_ptr, z_ptr, mu_ptr, rho_ptr, delta_ptr, sp_ptr_ptr, sp_r_ptr, sp_j_ptr, bias_ptr,
                        out_ptr, M, N, R, K, J, T, n_m, n_n, stride_as, stride_am, stride_ar, lab_sr, lab_sc,
                        stride_bs, stride_os, stride_om, stride_on, seed_ptr, owner, noise_off, noise_sr,
                        MF: tl.constexpr, HIER: tl.constexpr, SPECIALS: tl.constexpr, HAS_BIAS: tl.constexpr,
                        NOISE4: tl.constexpr, CONTIG_R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                        BE: tl.constexpr, MAPPED: tl.constexpr):
    seed_lo, seed_hi = load_seed(seed_ptr)
    # program -> (output sample so, m tile, n tile); samples innermost so programs that share a label tile run
    # back to back (L2 reuse of the labels across samples).
    pid = tl.program_id(0)
    so = pid % (tl.num_programs(0) // (n_m * n_n))
    rest = pid // (tl.num_programs(0) // (n_m * n_n))
    pid_m = rest % n_m
    pid_n = rest // n_m
    # int64 offsets: S * M * out elements may pass 2**31
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    mm = offs_m < M
    mn = offs_n < N
    NOISE: tl.constexpr = MF or HIER
    acc = tl.zeros([BM, BN], tl.float32)
    for t_ in range(T):
        # T = 1: this program's sample is so; T = S (dx of a shared x): every sample in order.
        s = tl.zeros([], tl.int64) + so + t_
        a_base = a_ptr + s * stride_as
        zrow = z_ptr + s * K * 2
        # Stage 1: the tile loop over the reduction dimension.
        for r0 in range(0, R, BR):
            offs_r = r0 + tl.arange(0, BR)
            mr = offs_r < R
            a = tl.load(a_base + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
                        mask=mm[:, None] & mr[None, :], other=0.0)
            # The weight tile is built in the orientation whose contiguous axis is the weight's row (so label
            # loads and Philox quads run along it): [BN, BR] in the forward (CONTIG_R, lab_sc == 1), then
            # transposed for the dot; [BR, BN] in dx (lab_sr == 1), already the dot's operand.
            if CONTIG_R:
                idx = offs_n[:, None].to(tl.int64) * lab_sr + offs_r[None, :].to(tl.int64) * lab_sc
                mw = mn[:, None] & mr[None, :]
            else:
                idx = offs_r[:, None].to(tl.int64) * lab_sc + offs_n[None, :].to(tl.int64) * lab_sr
                mw = mr[:, None] & mn[None, :]
            if NOISE:
                # eps[s, idx] of the weight stream; a shard (MAPPED) draws element noise_off + row * noise_sr + col
                # of its place in the unsharded weight instead. NOISE4 (the row length, and for a shard noise_sr
                # and noise_off, multiples of 4, so every run of four consecutive elements starting at a multiple
                # of 4 is one Philox counter): one Philox call per four weights along the contiguous axis.
                # Otherwise one call per weight. (MAPPED is a constexpr: a whole layer compiles the code it had.)
                if NOISE4:
                    if CONTIG_R:
                        if MAPPED:
                            base = offs_n[:, None].to(tl.int64) * noise_sr + noise_off + r0
                        else:
                            base = offs_n[:, None].to(tl.int64) * lab_sr + r0
                        eps = normal_rows(base, seed_lo, seed_hi, s, owner, _purpose(0), BR)
                    else:
                        if MAPPED:
                            base = offs_r[:, None].to(tl.int64) * noise_sr + noise_off + pid_n.to(tl.int64) * BN
                        else:
                            base = offs_r[:, None].to(tl.int64) * lab_sc + pid_n.to(tl.int64) * BN
                        eps = normal_rows(base, seed_lo, seed_hi, s, owner, _purpose(0), BN)
                else:
                    if MAPPED:
                        if CONTIG_R:
                            gidx = offs_n[:, None].to(tl.int64) * noise_sr + offs_r[None, :].to(tl.int64) + noise_off
                        else:
                            gidx = offs_r[:, None].to(tl.int64) * noise_sr + offs_n[None, :].to(tl.int64) + noise_off
                        eps = stream_normal(gidx, seed_lo, seed_hi, s, owner, _purpose(0))
                    else:
                        eps = stream_normal(idx, seed_lo, seed_hi, s, owner, _purpose(0))
            if MF:
                w = tl.load(mu_ptr + idx, mask=mw, other=0.0).to(tl.float32)
                rho = tl.load(rho_ptr + idx, mask=mw, other=0.0).to(tl.float32)
                w = w + softplus(rho) * eps
            else:
                # labels are validated when they enter a layer; the clamp keeps a bad one inside z
                lab = tl.load(lab_ptr + idx, mask=mw, other=0).to(tl.int32)
                lab = tl.minimum(tl.maximum(lab, 0), K - 1)
                w = tl.load(zrow + 2 * lab, mask=mw, other=0.0)
                if HIER:
                    zr = tl.load(zrow + 2 * lab + 1, mask=mw, other=0.0)
                    w = w + softplus(zr) * eps
            w = tl.where(mw, w, 0.0)
            if INTERPRET_C:
                if a_ptr.dtype.element_ty == tl.bfloat16:
                    w = _rne_bf16(w)
            w = w.to(a_ptr.dtype.element_ty)
            if CONTIG_R:
                acc = _mma(acc, a, tl.trans(w))
            else:
                acc = _mma(acc, a, w)
        # Stage 2: corrections of the ellipse/outlier weights whose n lies in this tile (CSR by n).
        if SPECIALS:
            e0 = tl.load(sp_ptr_ptr + pid_n * BN)
            e1 = tl.load(sp_ptr_ptr + tl.minimum(pid_n * BN + BN, N))
            for e in range(e0, e1, BE):
                ee = e + tl.arange(0, BE)
                me = ee < e1
                jj = tl.load(sp_j_ptr + ee, mask=me, other=0)
                rr = tl.load(sp_r_ptr + ee, mask=me, other=0)
                nn = (jj >> 32) - pid_n * BN  # sp_j packs (n << 32) | j
                jj = jj & 0xFFFFFFFF
                d = tl.load(delta_ptr + s * J + jj, mask=me, other=0.0)
                onehot = tl.where((nn[:, None] == tl.arange(0, BN)[None, :]) & me[:, None], d[:, None], 0.0)
                ag = tl.load(a_base + offs_m[:, None] * stride_am + rr[None, :] * stride_ar,
                             mask=mm[:, None] & me[None, :], other=0.0).to(tl.float32)
                acc = _mma_specials(acc, ag, onehot, a_ptr.dtype.element_ty == tl.float32)
    # Stage 3: epilogue.
    if HAS_BIAS:
        b = tl.load(bias_ptr + so * stride_bs + offs_n, mask=mn, other=0.0).to(tl.float32)
        acc += b[None, :]
    if INTERPRET_C:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            acc = _rne_bf16(acc)
    tl.store(out_ptr + so.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


class _Specials:
    """Ellipse then outlier positions as a CSR by the program's n index (forward: output row; dx: input
    column). sp_j packs (n << 32) | j, j indexing delta's second axis."""

    def __init__(self, e_pos, o_pos, in_f: int, N: int, by_row: bool, numel: Optional[int] = None):
        if numel is None:
            if not by_row:
                raise ValueError("numel: required with by_row=False (the weight's element count)")
            numel = N * in_f  # forward: N = out_features rows of in_f
        self.J = e_pos.numel() + o_pos.numel()
        if self.J == 0:  # no special weights: nothing to index (and no device work per call)
            self.j = self.r = self.ptr = None
            return
        pos = torch.cat([e_pos, o_pos])
        # A position outside the weight's ``numel`` elements (unvalidated data) goes to n = N, past every
        # tile, so no program visits it and its r never indexes A: that correction is lost, nothing is read or
        # written outside a buffer (tensor ops, no host sync).
        inside = (pos >= 0) & (pos < numel)
        pos = torch.where(inside, pos, torch.zeros_like(pos))
        n = pos // in_f if by_row else pos % in_f
        r = pos % in_f if by_row else pos // in_f
        n = torch.where(inside, n, torch.full_like(n, N))
        order = torch.sort(n, stable=True).indices
        j = torch.arange(self.J, dtype=torch.int64, device=pos.device)
        self.j = ((n[order] << 32) | j[order]).contiguous()
        self.r = r[order].contiguous()
        # counts per n in [0, N]; bin N (outside) is dropped. index_add_, not bincount: bincount sizes its output
        # from max(n), a device-to-host sync on every call (integer sums: the same counts in any order)
        counts = torch.zeros(N + 1, dtype=torch.int64, device=pos.device).index_add_(0, n, torch.ones_like(n))[:N]
        self.ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).contiguous()


# One _Specials per (ellipse positions, outlier positions, layout), valid while both tensors are the same objects
# with the same version, address and size (as sws_kernels/_segments.py keys its index): a layer's steady-state
# calls reuse it instead of a sort and a scatter on the device per call.
_SPECIALS_CACHE: "dict" = {}


def _specials(e_pos, o_pos, in_f: int, N: int, by_row: bool, numel: int) -> _Specials:
    if e_pos.numel() + o_pos.numel() == 0:
        return _Specials(e_pos, o_pos, in_f, N, by_row, numel)
    try:
        state = tuple((t._version, t.data_ptr(), t.numel()) for t in (e_pos, o_pos))
    except RuntimeError:  # inference tensors: no version counter to key on
        return _Specials(e_pos, o_pos, in_f, N, by_row, numel)
    key = (id(e_pos), id(o_pos), in_f, N, by_row, numel)
    hit = _SPECIALS_CACHE.get(key)
    if hit is not None and hit[0]() is e_pos and hit[1]() is o_pos and hit[2] == state:
        return hit[3]
    sp = _Specials(e_pos, o_pos, in_f, N, by_row, numel)

    def forget(_ref, key=key):
        _SPECIALS_CACHE.pop(key, None)

    _SPECIALS_CACHE[key] = (weakref.ref(e_pos, forget), weakref.ref(o_pos, forget), state, sp)
    return sp


def _launch(a3, stride_as, T, S_out, M, N, R, lab_sr, lab_sc, out, *, labels=None, z=None, mu=None, rho=None,
            delta=None, specials=None, bias=None, stride_bs=0, seed=0, owner=0, hier=False, elem_offset=0,
            row_stride=0):
    mf = mu is not None
    # the weight's row length (in) is lab_sr in the forward and lab_sc in dx
    row_len = lab_sr if lab_sc == 1 else lab_sc
    noise_sr = row_stride or row_len  # a shard's mapping (elem_offset, row_stride), else the layer's own rows
    noise4 = row_len % 4 == 0 and noise_sr % 4 == 0 and elem_offset % 4 == 0
    BM, BN, BR, warps, stages = _tiles(M, a3.dtype, elem_noise=(mf or hier) and not noise4)
    n_m, n_n = triton.cdiv(M, BM), triton.cdiv(N, BN)
    dummy = out
    sp = specials is not None and specials.J > 0
    launch(_lookup_gemm_kernel, (S_out * n_m * n_n,),
           a3, labels if labels is not None else dummy, z if z is not None else dummy, mu if mf else dummy,
           rho if mf else dummy, delta if sp else dummy, specials.ptr if sp else dummy, specials.r if sp else dummy,
           specials.j if sp else dummy, bias if bias is not None else dummy, out,
           M, N, R, 1 if z is None else z.shape[1], specials.J if sp else 0, T, n_m, n_n,
           stride_as, a3.stride(1), a3.stride(2), lab_sr, lab_sc, stride_bs, out.stride(0), out.stride(1),
           out.stride(2), seed_arg(seed, out.device), u32_arg(owner), int(elem_offset), int(noise_sr),
           MF=mf, HIER=hier, SPECIALS=sp, HAS_BIAS=bias is not None, NOISE4=noise4,
           CONTIG_R=lab_sc == 1, BM=BM, BN=BN, BR=BR, BE=BE, MAPPED=not (elem_offset == 0 and noise_sr == row_len),
           num_warps=warps, num_stages=stages)
    return out


def _check_bias(bias, S: int, out_f: int) -> None:
    """Size check (metadata only) so the epilogue never reads past the bias."""
    if bias is not None and tuple(bias.shape) not in ((out_f,), (S, out_f)):
        raise ValueError(f"bias: expected shape ({out_f},) or ({S}, {out_f}), got {tuple(bias.shape)}")


def _check_mf(mu, rho) -> None:
    if mu.dim() != 2 or rho.shape != mu.shape:
        raise ValueError(f"rho: expected the shape of mu {tuple(mu.shape)} (a 2-d weight), got {tuple(rho.shape)}")


def _as3(x, S: int, per_sample: bool, in_f: int):
    """x -> ([S or 1, M, in] view, sample stride, M)."""
    lead = S if per_sample else 1
    x3 = x.reshape(lead, math.prod(x.shape[:-1]) // lead, in_f)  # explicit M: reshape(.., -1, 0) is ambiguous
    return x3, (x3.stride(0) if per_sample else 0), x3.shape[1]


# --------------------------------------------------------------------------------------------------
# SWS linear
# --------------------------------------------------------------------------------------------------

def sws_linear(x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed: int,
               samples: int, mode: int, owner: int, codebook_owner: int, per_sample: bool,
               fused: bool, elem_offset: int = 0, row_stride: int = 0):
    """Backend kernel of ``sws_kernels::sws_linear``: y [S, ..., out] in x's dtype.

    Memory safety whatever the data (the functional API validates it on entry; called directly it may not
    be): labels and ellipse components are clamped into [0, K) in the kernels (a wrong weight), positions
    outside the weight are dropped (triton/reconstruct.py, _Specials), sizes are checked here (ValueError)."""
    S, (out_f, in_f) = samples, labels.shape
    _rc.check_sizes(means, chol, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho)
    _check_bias(bias, S, out_f)
    lead = x.shape[1:-1] if per_sample else x.shape[:-1]
    x3, sas, M = _as3(x, S, per_sample, in_f)
    mk = dict(elem_offset=elem_offset, row_stride=row_stride)  # a shard's mapping (reconstruct.elem_map)
    if not fused:
        w = _rc.reconstruct(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, S, mode, owner,
                            codebook_owner, **mk).to(x.dtype)
        y = torch.matmul(x3, w.transpose(1, 2))
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(S, *lead, out_f)
    lab = labels.reshape(-1).contiguous()
    z = _rc.sample_codebook(means, chol, seed, S, mode, codebook_owner)
    delta = _rc.special_values(z, lab, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, S, mode, owner,
                               emap=_rc.elem_map(elem_offset, row_stride, in_f))
    specials = _specials(e_pos, o_pos, in_f, out_f, True, out_f * in_f)
    y = empty((S, M, out_f), dtype=x.dtype, device=x.device)
    _launch(x3, sas, 1, S, M, out_f, in_f, in_f, 1, y, labels=lab, z=z, delta=delta, specials=specials,
            bias=bias, seed=seed, owner=owner, hier=(mode == _rc.HIER), **mk)
    return y.reshape(S, *lead, out_f)


def sws_linear_dx(grad_y, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed: int,
                  samples: int, mode: int, owner: int, codebook_owner: int, per_sample: bool,
                  fused: bool, elem_offset: int = 0, row_stride: int = 0):
    """Backend kernel of ``sws_kernels::sws_linear_dx``: grad_y [S, ..., out] -> dx in the shape of x
    ([S, ..., in] with per_sample, else [..., in] summed over samples in a fixed order). Memory-safe whatever
    the data, as :func:`sws_linear`."""
    S, (out_f, in_f) = samples, labels.shape
    _rc.check_sizes(means, chol, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho)
    lead = grad_y.shape[1:-1]
    g3 = grad_y.reshape(S, math.prod(grad_y.shape[1:-1]), out_f)
    M = g3.shape[1]
    mk = dict(elem_offset=elem_offset, row_stride=row_stride)  # a shard's mapping (reconstruct.elem_map)
    if not fused:
        w = _rc.reconstruct(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, S, mode, owner,
                            codebook_owner, **mk).to(grad_y.dtype)
        dx = torch.matmul(g3, w)
        dx = dx if per_sample else dx.sum(0)  # torch's sum over a dim is deterministic
        return dx.reshape(*((S,) if per_sample else ()), *lead, in_f)
    lab = labels.reshape(-1).contiguous()
    z = _rc.sample_codebook(means, chol, seed, S, mode, codebook_owner)
    delta = _rc.special_values(z, lab, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, S, mode, owner,
                               emap=_rc.elem_map(elem_offset, row_stride, in_f))
    specials = _specials(e_pos, o_pos, in_f, in_f, False, out_f * in_f)
    S_out = S if per_sample else 1
    dx = empty((S_out, M, in_f), dtype=grad_y.dtype, device=grad_y.device)
    _launch(g3, g3.stride(0), 1 if per_sample else S, S_out, M, in_f, out_f, 1, in_f, dx, labels=lab, z=z,
            delta=delta, specials=specials, seed=seed, owner=owner, hier=(mode == _rc.HIER), **mk)
    return dx.reshape(*((S,) if per_sample else ()), *lead, in_f)


# --------------------------------------------------------------------------------------------------
# Mean-field linear
# --------------------------------------------------------------------------------------------------

def mean_field_linear(x, mu, rho, bias, seed: int, samples: int, owner: int, per_sample: bool,
                      fused: bool, elem_offset: int = 0, row_stride: int = 0):
    """Backend kernel of ``sws_kernels::mean_field_linear``; ``bias`` None, [out] or per-sample [S, out].
    Sizes are checked here (ValueError), so the kernel never reads past mu, rho or the bias."""
    S, (out_f, in_f) = samples, mu.shape
    _check_mf(mu, rho)
    _check_bias(bias, S, out_f)
    lead = x.shape[1:-1] if per_sample else x.shape[:-1]
    x3, sas, M = _as3(x, S, per_sample, in_f)
    if not fused:
        w = _mf.mean_field_reconstruct(mu, rho, seed, S, owner, 0, elem_offset=elem_offset,
                                       row_stride=row_stride).to(x.dtype)
        y = torch.matmul(x3, w.transpose(1, 2))
        if bias is not None:
            b = bias.to(x.dtype)
            y = y + (b[:, None, :] if b.dim() == 2 else b)
        return y.reshape(S, *lead, out_f)
    y = empty((S, M, out_f), dtype=x.dtype, device=x.device)
    b = None if bias is None else bias.contiguous()
    _launch(x3, sas, 1, S, M, out_f, in_f, in_f, 1, y, mu=mu.contiguous(), rho=rho.contiguous(), bias=b,
            stride_bs=(out_f if b is not None and b.dim() == 2 else 0), seed=seed, owner=owner, elem_offset=elem_offset,
            row_stride=row_stride)
    return y.reshape(S, *lead, out_f)


def mean_field_linear_dx(grad_y, mu, rho, seed: int, samples: int, owner: int, per_sample: bool,
                         fused: bool, elem_offset: int = 0, row_stride: int = 0):
    S, (out_f, in_f) = samples, mu.shape
    _check_mf(mu, rho)
    lead = grad_y.shape[1:-1]
    g3 = grad_y.reshape(S, math.prod(grad_y.shape[1:-1]), out_f)
    M = g3.shape[1]
    if not fused:
        w = _mf.mean_field_reconstruct(mu, rho, seed, S, owner, 0, elem_offset=elem_offset,
                                       row_stride=row_stride).to(grad_y.dtype)
        dx = torch.matmul(g3, w)
        dx = dx if per_sample else dx.sum(0)
        return dx.reshape(*((S,) if per_sample else ()), *lead, in_f)
    S_out = S if per_sample else 1
    dx = empty((S_out, M, in_f), dtype=grad_y.dtype, device=grad_y.device)
    _launch(g3, g3.stride(0), 1 if per_sample else S, S_out, M, in_f, out_f, 1, in_f, dx, mu=mu.contiguous(),
            rho=rho.contiguous(), seed=seed, owner=owner, elem_offset=elem_offset, row_stride=row_stride)
    return dx.reshape(*((S,) if per_sample else ()), *lead, in_f)
