"""The label-histogram SWS linear forward in Triton (issue 14): inference in paper/mean mode, x shared by the samples.

In paper and mean mode every inlier of component k takes one value per sample, z[s, k], so for input row m and
output row j
    y[s, m, j] = sum_k h[m, j, k] zt[k, s] + sum over the row's ellipse/outlier weights of x[m, r] delta[s, e]
with h[m, j, k] the sum of x[m, i] over the weights of row j labelled k (ellipse/outlier weights included at their
label; delta = true value - label value, the fused linear's correction, from reconstruct.special_values). h does
not depend on s: the label tile is read once for all S samples.

One program per (input row m, block of BJ output rows). Stages (label tile [BJ, BI], one-hot factors [BJ, 16, BI]
and [BJ, BI, 16], histogram block H [BJ, 16, 16] and accumulator [BJ, SP] in registers, float32 accumulation):
  1. for each block of 256 components k0..k0+255 and each label tile: with label = k0 + 16 a + b,
     H[j, a, b] += sum_i (x[m, i] [a_ji == a]) [b_ji == b]: a batched [16, BI] x [BI, 16] product per row on the
     tensor cores (32 compares per weight instead of 256; private bins, no atomics, a fixed summation order; labels
     outside the block give a or b outside [0, 16) and add nothing); fp32 x as three exact bf16 pieces;
  2. acc += H (as [BJ, 256]) @ zt[k0:k0 + 256, :SP], once per component block (IEEE fp32);
  3. the row block's ellipse/outlier corrections as a [BJ, BE] x [BE, SP] one-hot dot (CSR by row, fixed order);
  4. bias, cast to x's dtype, store y[s, m, j] for s < S.
The first version (a compare-select and tl.sum over a [16, 16, 32] tile, K operations per weight) took 11.5 ms
on an H200 at S = 16, M = 1, 4096x4096, K = 256, 600x a dense bf16 F.linear.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reconstruct as _rc
from ._launch import GPU_TILES, INTERPRET_C, empty, launch
from .linear import _mma, _specials  # _mma: acc += a @ b, fp32 accumulation (tf32x3 for fp32)

BE = 16  # specials per epilogue step (the smallest tl.dot inner size)
_MIN_PROGRAMS = 1024 if GPU_TILES else 1  # split the columns until this many programs (1: no split, interpreter)


def _tiles():
    """(BJ, BI, num_warps): output rows per program, label columns per step. GPU: one-hot factors [16, 16, 32]
    (8192 elements each) next to H [16, 16, 16] and the accumulator [16, SP <= 64]. Interpreter: the same."""
    return 16, 16, 8


@triton.jit
def _dot_ieee(acc, a, b):
    """acc += a @ b for the once-per-program [BJ, 256] x [256, SP] product: IEEE fp32 (FMA) everywhere. It runs
    once per 256 components, not per label tile, so it needs no tensor cores; tf32x3 there spilled."""
    return acc + tl.dot(a, b, input_precision="ieee")


@triton.jit
def _onehot_dot(h, a, lo, offs_a):
    """h += a @ B with B[j, i, b] = [lo[j, i] == b], exact 0/1 in any float type. fp32 a on a GPU: three bf16
    pieces (a = a1 + a2 + a3 to 24 bits; each product with 0/1 exact, fp32 accumulation) on the tensor cores;
    tf32x3 here spilled 440-670 B on sm_80/sm_90 (benchmarks/triton_aot.py)."""
    if INTERPRET_C:
        b = tl.where(lo[:, :, None] == offs_a[None, None, :], 1.0, 0.0)
        return h + tl.dot(a.to(tl.float32), b, input_precision="ieee")
    elif a.dtype == tl.float32:
        b = tl.where(lo[:, :, None] == offs_a[None, None, :], 1.0, 0.0).to(tl.bfloat16)
        a1 = a.to(tl.bfloat16)
        r1 = a - a1.to(tl.float32)
        a2 = r1.to(tl.bfloat16)
        a3 = (r1 - a2.to(tl.float32)).to(tl.bfloat16)
        h = tl.dot(a1, b, h)
        h = tl.dot(a2, b, h)
        return tl.dot(a3, b, h)
    else:
        b = tl.where(lo[:, :, None] == offs_a[None, None, :], 1.0, 0.0).to(a.dtype)
        return tl.dot(a, b, h)


@triton.jit(do_not_specialize=["M", "N", "R", "K", "S", "J", "n_j", "chunk"])
def _histogram_kernel(x_ptr, lab_ptr, zt_ptr, dt_ptr, sp_ptr_ptr, sp_r_ptr, sp_j_ptr, bias_ptr, out_ptr,
                      M, N, R, K, S, J, n_j, chunk, stride_xm, stride_bs,
                      SPECIALS: tl.constexpr, HAS_BIAS: tl.constexpr, BJ: tl.constexpr, BI: tl.constexpr,
                      SP: tl.constexpr, BE: tl.constexpr):
    # program -> (input row m, row block pid_j, column split c): split c covers columns [c chunk, (c+1) chunk) and
    # writes its own partial y (summed over splits by the launcher in a fixed order): enough programs for a GPU
    # at M = 1 without atomics.
    pid = tl.program_id(0)
    c = tl.program_id(1)
    m = pid // n_j
    pid_j = pid % n_j
    i_lo = c * chunk
    i_hi = tl.minimum(R, i_lo + chunk)
    offs_j = pid_j.to(tl.int64) * BJ + tl.arange(0, BJ)
    mj = offs_j < N
    offs_s = tl.arange(0, SP)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros([BJ, SP], tl.float32)
    offs_a = tl.arange(0, 16)
    for k0 in range(0, K, 256):
        # Stage 1: the rows' histograms over components k0 .. k0 + 255, as a batched one-hot product on the
        # tensor cores: with label = k0 + 16 a + b, H[j, a, b] = sum_i (x[i] [a_ji == a]) [b_ji == b], i.e.
        # A [BJ, 16, BI] @ B [BJ, BI, 16]: 32 compares per weight instead of 256, the sums in a fixed order.
        h = tl.zeros([BJ, 16, 16], tl.float32)
        for i0 in range(i_lo, i_hi, BI):
            offs_i = i0 + tl.arange(0, BI)
            mi = offs_i < i_hi
            xv = tl.load(x_row + offs_i, mask=mi, other=0.0)
            lab = tl.load(lab_ptr + offs_j[:, None] * R + offs_i[None, :], mask=mj[:, None] & mi[None, :],
                          other=-1).to(tl.int32) - k0
            hi = lab >> 4  # outside [0, 16) for labels outside this block and for masked weights (-1)
            lo = lab & 15
            a = tl.where(hi[:, None, :] == offs_a[None, :, None], xv[None, None, :], 0.0).to(xv.dtype)
            h = _onehot_dot(h, a, lo, offs_a)
        # Stage 2: the small GEMM with the codebook table rows k0 .. k0 + 255.
        offs_k = k0 + tl.arange(0, 256)
        zt = tl.load(zt_ptr + offs_k[:, None] * SP + offs_s[None, :], mask=(offs_k < K)[:, None], other=0.0)
        acc = _dot_ieee(acc, tl.reshape(h, [BJ, 256]), zt)
    # Stage 3: ellipse/outlier corrections of the row block (CSR by row; sp_j packs (row << 32) | entry), split 0.
    if SPECIALS:
        e0 = tl.load(sp_ptr_ptr + pid_j * BJ)
        e1 = tl.load(sp_ptr_ptr + tl.minimum(pid_j * BJ + BJ, N))
        e1 = tl.where(c == 0, e1, e0)
        for e in range(e0, e1, BE):
            ee = e + tl.arange(0, BE)
            me = ee < e1
            jj = tl.load(sp_j_ptr + ee, mask=me, other=0)
            rr = tl.load(sp_r_ptr + ee, mask=me, other=0)
            nn = (jj >> 32) - pid_j * BJ
            jj = jj & 0xFFFFFFFF
            xr = tl.load(x_row + rr, mask=me, other=0.0).to(tl.float32)
            a = tl.where((nn[None, :] == tl.arange(0, BJ)[:, None]) & me[None, :], xr[None, :], 0.0)
            d = tl.load(dt_ptr + jj[:, None] * SP + offs_s[None, :], mask=me[:, None], other=0.0)
            acc = _mma(acc, a, d)
    # Stage 4: bias, store y[s, m, j].
    ms = offs_s < S
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_s[None, :] * stride_bs + offs_j[:, None],
                    mask=mj[:, None] & ms[None, :] & (c == 0), other=0.0).to(tl.float32)
        acc += b
    tl.store(out_ptr + (c * S + offs_s[None, :]).to(tl.int64) * M * N + m * N + offs_j[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=mj[:, None] & ms[None, :])


def sws_linear_histogram(x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed,
                         samples: int, mode: int, owner: int, codebook_owner: int) -> torch.Tensor:
    """y [S, M, out] in x's dtype (x [..., in] shared by the samples); paper (0) or mean (2) mode, no autograd."""
    if mode not in (_rc.PAPER, _rc.MEAN):
        raise ValueError(f"sws_linear_histogram: mode must be 0 (paper) or 2 (mean), got {mode}")
    S = int(samples)
    out_f, in_f = labels.shape
    x2 = x.reshape(-1, in_f)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, K, dev = x2.shape[0], means.shape[0], x.device
    lab = labels.reshape(-1).contiguous()
    z = _rc.sample_codebook(means, chol, seed, S, mode, codebook_owner)  # [S, K, 2]
    SP = max(16, triton.next_power_of_2(S))
    zt = torch.zeros((K, SP), dtype=torch.float32, device=dev)
    zt[:, :S] = z[:, :, 0].t()
    specials = _specials(e_pos, o_pos, in_f, out_f, True, out_f * in_f)
    sp = specials.J > 0
    dt = None
    if sp:
        delta = _rc.special_values(z, lab, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, S, mode, owner)
        dt = torch.zeros((specials.J, SP), dtype=torch.float32, device=dev)
        dt[:, :S] = delta.t()
    b = None
    if bias is not None:
        b = bias.to(torch.float32).contiguous()
    BJ, BI, warps = _tiles()
    n_j = triton.cdiv(out_f, BJ)
    # column splits: ~4 programs per SM-sized wave at M = 1 on a GPU (132 SMs), whole label tiles per split
    splits = max(1, min(triton.cdiv(in_f, BI), triton.cdiv(_MIN_PROGRAMS, M * n_j)))
    chunk = triton.cdiv(triton.cdiv(in_f, splits), BI) * BI
    splits = triton.cdiv(in_f, chunk)
    part = empty((splits, S, M, out_f), dtype=torch.float32 if splits > 1 else x.dtype, device=dev)
    dummy = zt
    launch(_histogram_kernel, (M * n_j, splits), x2, lab, zt, dt if sp else dummy, specials.ptr if sp else dummy,
           specials.r if sp else dummy, specials.j if sp else dummy, b if b is not None else dummy, part,
           M, out_f, in_f, K, S, specials.J, n_j, chunk, x2.stride(0),
           (out_f if b is not None and b.dim() == 2 else 0),
           SPECIALS=sp, HAS_BIAS=b is not None, BJ=BJ, BI=BI, SP=SP, BE=BE, num_warps=warps)
    if splits == 1:
        return part[0]
    return part.sum(0).to(x.dtype)  # a fixed-order reduction over the splits (no atomics)
