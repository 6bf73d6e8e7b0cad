"""The label-histogram SWS linear forward in Triton (issue 14): inference in paper/mean mode, x shared by the samples.

In paper and mean mode every inlier of component k takes one value per sample, z[s, k], so for input row m and
output row j
    y[s, m, j] = sum_k h[m, j, k] zt[k, s] + sum over the row's ellipse/outlier weights of x[m, r] delta[s, e]
with h[m, j, k] the sum of x[m, i] over the weights of row j labelled k (ellipse/outlier weights included at their
label; delta = true value - label value, the fused linear's correction, from reconstruct.special_values). h does
not depend on s: the label tile is read once for all S samples.

One program per (input row m, block of BJ output rows). Stages (tiles: labels [BJ, BI], one-hot [BJ, BI, BK],
histogram block h [BJ, BK] and accumulator [BJ, SP] in registers, float32):
  1. for each block of BK components: for each i tile, h += sum over i of x[m, i] [lab[j, i] == k]: private bins,
     a compare-select and a tree sum in a fixed order, no atomics (labels outside the block never match);
  2. acc += h @ zt[k block, :SP] (tl.dot: mma on the GPU, tf32x3 for fp32 accuracy; IEEE in the interpreter);
  3. the row block's ellipse/outlier corrections as a [BJ, BE] x [BE, SP] one-hot dot (CSR by row, fixed order);
  4. bias, cast to x's dtype, store y[s, m, j] for s < S.
Stage 1 costs BK compare-selects per weight per component block (K per weight in all): on a GPU that is compute,
not label bytes, so the label floor (benchmarks/gpu_bench.py) is reached only for small K; it is the scatter-free
form the interpreter and every backend can run deterministically.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reconstruct as _rc
from ._launch import GPU_TILES, INTERPRET_C, empty, launch
from .linear import _Specials

BE = 16  # specials per epilogue step (the smallest tl.dot inner size)


def _tiles():
    """(BJ, BI, BK, num_warps): output rows per program, label columns per step, components per block.
    GPU: [16, 16, 32] one-hot tiles (8192 elements, 64 per thread at 4 warps) next to h [16, 32] and the
    accumulator [16, SP <= 64]. Interpreter: the same (its cost is per program and loop iteration)."""
    if GPU_TILES:
        return 16, 16, 32, 4
    return 16, 32, 32, 4


@triton.jit
def _dot(acc, a, b):
    """acc += a @ b in float32 accuracy: IEEE under the interpreter, tf32x3 on tensor cores on a GPU."""
    if INTERPRET_C:
        return acc + tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit(do_not_specialize=["M", "N", "R", "K", "S", "J", "n_j"])
def _histogram_kernel(x_ptr, lab_ptr, zt_ptr, dt_ptr, sp_ptr_ptr, sp_r_ptr, sp_j_ptr, bias_ptr, out_ptr,
                      M, N, R, K, S, J, n_j, stride_xm, stride_bs,
                      SPECIALS: tl.constexpr, HAS_BIAS: tl.constexpr, BJ: tl.constexpr, BI: tl.constexpr,
                      BK: tl.constexpr, SP: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    m = pid // n_j
    pid_j = pid % n_j
    offs_j = pid_j.to(tl.int64) * BJ + tl.arange(0, BJ)
    mj = offs_j < N
    offs_s = tl.arange(0, SP)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros([BJ, SP], tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        # Stage 1: the rows' histograms over this block of components.
        h = tl.zeros([BJ, BK], tl.float32)
        for i0 in range(0, R, BI):
            offs_i = i0 + tl.arange(0, BI)
            mi = offs_i < R
            xv = tl.load(x_row + offs_i, mask=mi, other=0.0).to(tl.float32)
            lab = tl.load(lab_ptr + offs_j[:, None] * R + offs_i[None, :], mask=mj[:, None] & mi[None, :],
                          other=-1).to(tl.int32)
            hit = lab[:, :, None] == offs_k[None, None, :]
            h += tl.sum(tl.where(hit, xv[None, :, None], 0.0), axis=1)
        # Stage 2: the small GEMM.
        zt = tl.load(zt_ptr + offs_k[:, None] * SP + offs_s[None, :], mask=(offs_k < K)[:, None], other=0.0)
        acc = _dot(acc, h, zt)
    # Stage 3: ellipse/outlier corrections of the row block (CSR by row; sp_j packs (row << 32) | entry).
    if SPECIALS:
        e0 = tl.load(sp_ptr_ptr + pid_j * BJ)
        e1 = tl.load(sp_ptr_ptr + tl.minimum(pid_j * BJ + BJ, N))
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
            acc = _dot(acc, a, d)
    # Stage 4: bias, store y[s, m, j].
    ms = offs_s < S
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_s[None, :] * stride_bs + offs_j[:, None], mask=mj[:, None] & ms[None, :],
                    other=0.0).to(tl.float32)
        acc += b
    tl.store(out_ptr + offs_s[None, :].to(tl.int64) * M * N + m * N + offs_j[:, None],
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
    specials = _Specials(e_pos, o_pos, in_f, out_f, by_row=True)
    sp = specials.J > 0
    dt = None
    if sp:
        delta = _rc.special_values(z, lab, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, S, mode, owner)
        dt = torch.zeros((specials.J, SP), dtype=torch.float32, device=dev)
        dt[:, :S] = delta.t()
    b = None
    if bias is not None:
        b = bias.to(torch.float32).contiguous()
    y = empty((S, M, out_f), dtype=x.dtype, device=dev)
    BJ, BI, BK, warps = _tiles()
    n_j = triton.cdiv(out_f, BJ)
    dummy = zt
    launch(_histogram_kernel, (M * n_j,), x2, lab, zt, dt if sp else dummy, specials.ptr if sp else dummy,
           specials.r if sp else dummy, specials.j if sp else dummy, b if b is not None else dummy, y,
           M, out_f, in_f, K, S, specials.J, n_j, x2.stride(0), (out_f if b is not None and b.dim() == 2 else 0),
           SPECIALS=sp, HAS_BIAS=b is not None, BJ=BJ, BI=BI, BK=BK, SP=SP, BE=BE, num_warps=warps)
    return y
