"""Mean-field reconstruct in Triton: w[s, i] = mu_i + softplus(rho_i) eps[s, i], S samples per launch,
and its backward with the noise regenerated from the seed (never stored).

  forward   ``_mf_kernel``      one program = BLOCK weights of one sample (grid flattened sample-major).
  backward  ``_mf_bwd_kernel``  one program = BLOCK weights; loops the S samples in order, so the sums
                                over samples are bit-identical run to run (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import empty, launch
from .philox import load_seed, seed_arg, u32_arg
from . import reconstruct as _rc
from .reconstruct import BLOCK, elem_map, mapped_normal_block, softplus, softplus_grad


@triton.jit(do_not_specialize=["nblk", "seed_ptr", "owner", "purpose", "e_off", "e_stride", "e_rowlen"])
def _mf_kernel(mu_ptr, rho_ptr, w_ptr, n, nblk, seed_ptr, owner, purpose, e_off, e_stride, e_rowlen,
               BLOCK: tl.constexpr, MAPPED: tl.constexpr):
    seed_lo, seed_hi = load_seed(seed_ptr)
    pid = tl.program_id(0)
    s = pid // nblk
    start = (pid % nblk).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    m = offs < n
    mu = tl.load(mu_ptr + offs, mask=m, other=0.0).to(tl.float32)
    rho = tl.load(rho_ptr + offs, mask=m, other=0.0).to(tl.float32)
    eps = mapped_normal_block(start, seed_lo, seed_hi, s, owner, purpose, e_off, e_stride, e_rowlen, MAPPED, BLOCK)
    tl.store(w_ptr + s.to(tl.int64) * n + offs, (mu + softplus(rho) * eps).to(w_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["S", "seed_ptr", "owner", "purpose", "e_off", "e_stride", "e_rowlen"])
def _mf_bwd_kernel(g_ptr, rho_ptr, gmu_ptr, grho_ptr, n, S, seed_ptr, owner, purpose, e_off, e_stride, e_rowlen,
                   BLOCK: tl.constexpr, MAPPED: tl.constexpr):
    seed_lo, seed_hi = load_seed(seed_ptr)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    m = offs < n
    rho = tl.load(rho_ptr + offs, mask=m, other=0.0).to(tl.float32)
    gmu = tl.zeros([BLOCK], tl.float32)
    grho = tl.zeros([BLOCK], tl.float32)
    for s_ in range(S):
        s = tl.zeros([], tl.int64) + s_  # a tensor on both the compiler and the interpreter
        g = tl.load(g_ptr + s * n + offs, mask=m, other=0.0).to(tl.float32)
        gmu += g
        grho += g * mapped_normal_block(start, seed_lo, seed_hi, s, owner, purpose, e_off, e_stride, e_rowlen, MAPPED,
                                        BLOCK)
    tl.store(gmu_ptr + offs, gmu.to(gmu_ptr.dtype.element_ty), mask=m)
    tl.store(grho_ptr + offs, (grho * softplus_grad(rho)).to(grho_ptr.dtype.element_ty), mask=m)


def _emap(mu, elem_offset, row_stride):
    return elem_map(elem_offset, row_stride, mu.numel() // mu.shape[0] if mu.dim() and mu.shape[0] else 0)


def mean_field_reconstruct(mu, rho, seed: int, samples: int, owner: int, purpose: int, *, elem_offset: int = 0,
                           row_stride: int = 0) -> torch.Tensor:
    """Backend kernel of ``sws_kernels::mean_field_reconstruct``: [S, *mu.shape] in mu's dtype. No index data;
    rho must have mu's shape (checked: ValueError), so the kernel stays inside its buffers.
    ``elem_offset``/``row_stride``: a shard's global element mapping (reconstruct.elem_map)."""
    emap = _emap(mu, elem_offset, row_stride)
    if rho.shape != mu.shape:
        raise ValueError(f"rho: expected the shape of mu {tuple(mu.shape)}, got {tuple(rho.shape)}")
    n = mu.numel()
    w = empty((samples, n), dtype=mu.dtype, device=mu.device)
    if n:
        nblk = triton.cdiv(n, BLOCK)
        launch(_mf_kernel, (samples * nblk,), mu.contiguous(), rho.contiguous(), w, n, nblk, seed_arg(seed, w.device),
               u32_arg(owner), u32_arg(purpose), *emap[0], BLOCK=BLOCK, MAPPED=emap[1], num_warps=_rc.warps(BLOCK))
    return w.view(samples, *mu.shape)


def mean_field_reconstruct_backward(grad_w, mu, rho, seed: int, samples: int, owner: int, purpose: int, *,
                                    elem_offset: int = 0, row_stride: int = 0):
    """Backend kernel of ``sws_kernels::mean_field_reconstruct_backward`` -> (g_mu, g_rho). Sizes checked
    (ValueError), so the kernel stays inside its buffers."""
    emap = _emap(mu, elem_offset, row_stride)
    n = mu.numel()
    if rho.shape != mu.shape or grad_w.numel() != samples * n:
        raise ValueError(f"rho / grad_w: expected rho of shape {tuple(mu.shape)} and grad_w of {samples} x {n} "
                         f"elements, got {tuple(rho.shape)} and {tuple(grad_w.shape)}")
    g_mu = empty(mu.shape, dtype=mu.dtype, device=mu.device)
    g_rho = empty(rho.shape, dtype=rho.dtype, device=rho.device)
    if n:
        # an unaligned shard (MAPPED 2: a Philox call per weight) keeps two accumulators and a Box-Muller per
        # element live across the sample loop: the 1024-weight tile (8 warps) spilled 16 B on sm_90, a 512 one
        # (4 warps) compiles spill-free, 72 / 69 registers on sm_80 / sm_90 (benchmarks/triton_aot.py)
        block = BLOCK if emap[1] != 2 else BLOCK // 2
        launch(_mf_bwd_kernel, (triton.cdiv(n, block),), grad_w.reshape(samples, n).contiguous(), rho.contiguous(),
               g_mu, g_rho, n, samples, seed_arg(seed, g_mu.device), u32_arg(owner), u32_arg(purpose), *emap[0],
               BLOCK=block, MAPPED=emap[1], num_warps=_rc.warps(block))
    return g_mu, g_rho
