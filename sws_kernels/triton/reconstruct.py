"""SWS reconstruct in Triton: forward (all modes, ellipses, outliers, S samples per launch) and a
deterministic backward.

Forward, three launches, each covering every sample (grids are flattened to one axis, sample-major, so
neither S nor n hits the 65535 limit of grid axes 1-2):
  stage 0  ``_sample_kernel``   z[S, K, 2] = means + L xi (the sampled codebook; in ``mean`` mode z = means).
                                Tile: BLOCK components of one sample.
  stage 1  ``_dense_kernel``    W[s, i] = z_mu[s, lab_i] (+ softplus(z_rho[s, lab_i]) eps[s, i] hierarchical)
                                for every position, inliers or not. Tile: BLOCK weights of one sample.
  stage 2  ``_special_kernel``  overwrites the E ellipse and O outlier positions with their own values
                                (launched after stage 1 on the same stream, so it wins). With DELTA it
                                instead returns value - (what stage 1 would have written), the correction
                                the fused linear applies in its epilogue (see linear.py).

Backward (SPEC.md section 5: bit-identical run to run, so no float atomics anywhere):
  prep (torch)  a label-sorted list of (position, coefficient) entries: every inlier once with 1, every
                ellipse weight twice (comp_a with alpha, comp_b with 1 - alpha); each component's segment is
                cut into pieces of at most CHUNK entries so work is balanced whatever the label histogram.
  stage 1  ``_piece_kernel``    one program per (sample, PIECES pieces): sum of coef * dW (and of coef * dW * eps
                                in hierarchical mode), tl.sum over each piece's row of a [PIECES, CHUNK] tile
                                -> partials[S, P].
  stage 2  ``_component_kernel`` BLOCK_K components per program; loops samples then that component's pieces
                                in a fixed order, regenerates xi (and z_rho) from the seed and forms the
                                mean/Cholesky gradients. Tile: BLOCK_K components.
  stage 3  ``_outlier_kernel``  per outlier, loops the samples: d mu_o, d rho_o.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _segments
from ._launch import GPU_TILES, empty, empty_like, launch
from .philox import _counter_words, load_seed, normal4, normal_rows, seed_arg, stream_normal, u32_arg

# Interpreter cost grows with programs x iterations: small tiles keep tests fast; on a GPU, wide tiles.
# The interpreter costs ~20 ms per program whatever its tile width (numpy overhead per op), so it gets
# wide tiles too; tests shrink these module attributes to exercise multi-block and multi-piece paths.
BLOCK = 1024 if GPU_TILES else 256  # a multiple of 4: normal_rows' alignment
CHUNK = 256 if GPU_TILES else 64
BLOCK_K = 128 if GPU_TILES else 1024
PIECES = 4 if GPU_TILES else 16  # pieces per backward stage-1 program


def warps(block: int, per_thread: int = 4) -> int:
    """num_warps (1-8) for a 1-D tile of ``block`` elements, ``per_thread`` each: 4 for streaming kernels (one
    16-byte fp32 vector per thread), fewer for kernels that run a Philox call and a Box-Muller per element
    (at 4 per thread the outlier and codebook-sampling kernels spilled 8 B on sm_80, at 8 the hierarchical
    special-weight kernel 24 B: benchmarks/triton_aot.py)."""
    return max(1, min(8, block // (32 * per_thread)))


def sparse_block() -> int:
    """Tile of the per-outlier kernels (at most 256: scattered Philox calls, 2 per thread)."""
    return min(BLOCK, 256)

PAPER, HIER, MEAN = 0, 1, 2


@triton.jit
def _purpose(p: tl.constexpr):
    """A stream purpose as a uint32 scalar tensor (stream_normal calls ``.to`` on it)."""
    return tl.full([], p, tl.uint32)


@triton.jit
def component_xi(k, seed_lo, seed_hi, s, cb_owner):
    """xi[s, k] = elements 2k, 2k+1 of the component stream (purpose 1): both lie in counter k // 2
    (words 0-1 for even k, 2-3 for odd k), so one Philox call gives the pair."""
    w0, w1, w2, w3 = _counter_words(2 * k.to(tl.int64), seed_lo, seed_hi, s, cb_owner, _purpose(1))
    n0, n1, n2, n3 = normal4(w0, w1, w2, w3)
    odd = (k & 1) == 1
    return tl.where(odd, n2, n0), tl.where(odd, n3, n1)


@triton.jit
def normal_block(start, seed_lo, seed_hi, s, owner, purpose, BLOCK: tl.constexpr):
    """Normals of elements start .. start + BLOCK - 1 (start a multiple of 4) as a [BLOCK] tile: one Philox
    call per four elements (philox.normal_rows on one row)."""
    base = tl.zeros([1, 1], tl.int64) + start
    return tl.reshape(normal_rows(base, seed_lo, seed_hi, s, owner, purpose, BLOCK), [BLOCK])


# A shard's global element mapping (tensor parallelism, sws_kernels/reference.py element_map): local element i of
# rows of e_rowlen draws the noise of element e_off + (i // e_rowlen) * e_stride + i % e_rowlen. Kernels take
# (e_off, e_stride, e_rowlen) as their last runtime arguments and a MAPPED constexpr: 0 the identity (the
# unchanged code), 1 an aligned mapping (e_off, e_stride, e_rowlen multiples of 4: every aligned run of four
# local weights is one aligned Philox counter, so still one Philox call per four weights), 2 any other (one call
# per weight, as for scattered positions).

def elem_map(elem_offset: int = 0, row_stride: int = 0, row_len: int = 0):
    """((e_off, e_stride, e_rowlen), MAPPED) for a launch; the identity gives ((0, 0, 1), 0)."""
    rl = max(int(row_len), 1)
    stride = int(row_stride) or rl
    if elem_offset == 0 and stride == rl:
        return (0, 0, 1), 0
    aligned = elem_offset % 4 == 0 and stride % 4 == 0 and rl % 4 == 0
    return (int(elem_offset), stride, rl), 1 if aligned else 2


@triton.jit
def global_index(i, e_off, e_stride, e_rowlen):
    """Global element indices of the local int64 indices ``i`` under a shard's mapping."""
    r = i // e_rowlen
    return e_off + r * e_stride + (i - r * e_rowlen)


@triton.jit
def mapped_normal_block(start, seed_lo, seed_hi, s, owner, purpose, e_off, e_stride, e_rowlen, MAPPED: tl.constexpr,
                        BLOCK: tl.constexpr):
    """normal_block of local elements start .. start + BLOCK - 1 under the mapping (MAPPED 0: normal_block)."""
    if MAPPED == 0:
        eps = normal_block(start, seed_lo, seed_hi, s, owner, purpose, BLOCK)
    elif MAPPED == 1:
        # aligned: the global start of each local quad, one Philox call per quad
        quad = start + 4 * tl.arange(0, BLOCK // 4).to(tl.int64)
        base = tl.reshape(global_index(quad, e_off, e_stride, e_rowlen), [BLOCK // 4, 1])
        eps = tl.reshape(normal_rows(base, seed_lo, seed_hi, s, owner, purpose, 4), [BLOCK])
    else:
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        eps = stream_normal(global_index(offs, e_off, e_stride, e_rowlen), seed_lo, seed_hi, s, owner, purpose)
    return eps


@triton.jit
def softplus(x):
    """PyTorch's softplus in float32: x above 20, else log1p(exp(x)).

    Triton has no log1p; log(1 + u) loses all relative precision for the small u = exp(rho) that typical
    rho (-3 .. -10) give, so use the classic exact-correction form log(1+u) * u / ((1+u) - 1)."""
    u = tl.exp(tl.minimum(x, 20.0))
    v = 1.0 + u
    lp = tl.where(v == 1.0, u, tl.log(v) * (u / (v - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def softplus_grad(x):
    """d softplus / dx as PyTorch: sigmoid(x), exactly 1 above 20."""
    return tl.where(x > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-x)))


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["K", "nblk", "seed_ptr", "cb_owner"])
def _sample_kernel(means_ptr, chol_ptr, z_ptr, K, nblk, seed_ptr, cb_owner, MODE: tl.constexpr,
                   BLOCK: tl.constexpr):
    seed_lo, seed_hi = load_seed(seed_ptr)
    # Stage 0: one program = BLOCK components of one sample.
    pid = tl.program_id(0)
    s = pid // nblk
    k = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
    m = k < K
    m_mu = tl.load(means_ptr + 2 * k, mask=m, other=0.0).to(tl.float32)
    m_rho = tl.load(means_ptr + 2 * k + 1, mask=m, other=0.0).to(tl.float32)
    if MODE == 2:
        z_mu = m_mu
        z_rho = m_rho
    else:
        ca = tl.load(chol_ptr + 3 * k, mask=m, other=0.0).to(tl.float32)
        cb = tl.load(chol_ptr + 3 * k + 1, mask=m, other=0.0).to(tl.float32)
        cc = tl.load(chol_ptr + 3 * k + 2, mask=m, other=0.0).to(tl.float32)
        xi0, xi1 = component_xi(k, seed_lo, seed_hi, s, cb_owner)
        z_mu = m_mu + softplus(ca) * xi0
        z_rho = m_rho + cb * xi0 + softplus(cc) * xi1
    base = z_ptr + s.to(tl.int64) * K * 2
    tl.store(base + 2 * k, z_mu, mask=m)
    tl.store(base + 2 * k + 1, z_rho, mask=m)


# n stays specialised: n % 16 == 0 tells the compiler that every sample's row start s * n is aligned, so the
# stores vectorise (this kernel is bound by writing W). Counts that only feed masks are not specialised.
@triton.jit(do_not_specialize=["K", "nblk", "seed_ptr", "owner", "e_off", "e_stride", "e_rowlen"])
def _dense_kernel(labels_ptr, z_ptr, w_ptr, n, K, nblk, seed_ptr, owner, e_off, e_stride, e_rowlen,
                  HIER: tl.constexpr, BLOCK: tl.constexpr, MAPPED: tl.constexpr):
    seed_lo, seed_hi = load_seed(seed_ptr)
    # Stage 1: one program = BLOCK consecutive weights of one sample; reads one label per weight.
    # Labels are validated when they enter a layer; the clamp keeps a bad label from reading outside z
    # whatever the validation setting (a wrong weight, never a wild read).
    pid = tl.program_id(0)
    s = pid // nblk
    start = (pid % nblk).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    m = offs < n
    lab = tl.load(labels_ptr + offs, mask=m, other=0).to(tl.int32)
    lab = tl.minimum(tl.maximum(lab, 0), K - 1)
    zrow = z_ptr + s.to(tl.int64) * K * 2
    w = tl.load(zrow + 2 * lab, mask=m, other=0.0)
    if HIER:
        zr = tl.load(zrow + 2 * lab + 1, mask=m, other=0.0)
        w = w + softplus(zr) * mapped_normal_block(start, seed_lo, seed_hi, s, owner, _purpose(0), e_off, e_stride,
                                                   e_rowlen, MAPPED, BLOCK)
    tl.store(w_ptr + s.to(tl.int64) * n + offs, w.to(w_ptr.dtype.element_ty), mask=m)


# e_npos_ptr / o_npos_ptr (read only when MAPPED): the global element of each ellipse / outlier position of a
# shard, mapped on the host (a few entries; the in-kernel int64 division made this kernel spill).
@triton.jit(do_not_specialize=["E", "O", "K", "n", "nblk", "seed_ptr", "owner"])
def _special_kernel(z_ptr, labels_ptr, e_pos_ptr, e_a_ptr, e_b_ptr, e_alpha_ptr, o_pos_ptr, o_mu_ptr, o_rho_ptr,
                    out_ptr, E, O, K, n, nblk, seed_ptr, owner, e_npos_ptr, o_npos_ptr, MODE: tl.constexpr,
                    DELTA: tl.constexpr, BLOCK: tl.constexpr, MAPPED: tl.constexpr):
    seed_lo, seed_hi = load_seed(seed_ptr)
    # Stage 2: one program = BLOCK special weights (ellipses first, then outliers) of one sample.
    pid = tl.program_id(0)
    s = pid // nblk
    j = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
    m = j < E + O
    is_e = j < E
    me = m & is_e
    mo = m & (j >= E)
    jo = tl.where(mo, j - E, 0)
    pe = tl.load(e_pos_ptr + j, mask=me, other=0)
    po = tl.load(o_pos_ptr + jo, mask=mo, other=0)
    pos = tl.where(is_e, pe, po)
    # positions are validated when they enter a layer; here a position outside [0, n) writes nothing and
    # reads label 0's slot (its noise is still keyed by the raw position): a lost value, never a wild access
    inb = (pos >= 0) & (pos < n)
    pos_c = tl.where(inb, pos, 0)
    # component ids clamped into [0, K): a bad id gives a wrong value, never a read outside z
    ca = tl.minimum(tl.maximum(tl.load(e_a_ptr + j, mask=me, other=0), 0), K - 1)
    cb = tl.minimum(tl.maximum(tl.load(e_b_ptr + j, mask=me, other=0), 0), K - 1)
    al = tl.load(e_alpha_ptr + j, mask=me, other=0.0).to(tl.float32)
    mu = tl.load(o_mu_ptr + jo, mask=mo, other=0.0).to(tl.float32)
    zrow = z_ptr + s.to(tl.int64) * K * 2
    za = tl.load(zrow + 2 * ca, mask=me, other=0.0)
    zb = tl.load(zrow + 2 * cb, mask=me, other=0.0)
    e_val = al * za + (1.0 - al) * zb
    if MODE == 2:
        o_val = mu
    else:
        rho = tl.load(o_rho_ptr + jo, mask=mo, other=0.0).to(tl.float32)
        if MAPPED:  # a shard: the noise of the position's global element
            npos = tl.where(is_e, tl.load(e_npos_ptr + j, mask=me, other=0), tl.load(o_npos_ptr + jo, mask=mo, other=0))
            eps = stream_normal(npos, seed_lo, seed_hi, s, owner, _purpose(0))
        else:
            eps = stream_normal(pos, seed_lo, seed_hi, s, owner, _purpose(0))
        o_val = mu + softplus(rho) * eps
        if MODE == 1:
            zra = tl.load(zrow + 2 * ca + 1, mask=me, other=0.0)
            zrb = tl.load(zrow + 2 * cb + 1, mask=me, other=0.0)
            e_val = e_val + (al * softplus(zra) + (1.0 - al) * softplus(zrb)) * eps
    val = tl.where(is_e, e_val, o_val)
    if DELTA:
        # what stage 1 (or the fused GEMM's tile loop) produces at this position from its label
        lab = tl.load(labels_ptr + pos_c, mask=m, other=0).to(tl.int32)
        lab = tl.minimum(tl.maximum(lab, 0), K - 1)
        dense = tl.load(zrow + 2 * lab, mask=m, other=0.0)
        if MODE == 1:
            dense = dense + softplus(tl.load(zrow + 2 * lab + 1, mask=m, other=0.0)) * eps
        tl.store(out_ptr + s.to(tl.int64) * (E + O) + j, val - dense, mask=m)
    else:
        tl.store(out_ptr + s.to(tl.int64) * n + pos_c, val.to(out_ptr.dtype.element_ty), mask=m & inb)


def check_sizes(means, chol, e_pos=None, e_a=None, e_b=None, e_alpha=None, o_pos=None, o_mu=None, o_rho=None):
    """The size checks every launcher runs (metadata only: no host sync). With them, and the in-kernel clamps
    and masks of label / component / position values, no kernel reads or writes outside its buffers
    whatever the data: a short chol or ellipse/outlier array raises here instead of being read past its end."""
    if means is not None:
        if means.dim() != 2 or means.shape[1] != 2 or means.shape[0] < 1:
            raise ValueError(f"means: expected [K, 2] with K >= 1, got shape {tuple(means.shape)}")
        K = means.shape[0]
        if tuple(chol.shape) != (K, 3):
            raise ValueError(f"chol: expected shape ({K}, 3) (one row per component of means), got "
                             f"{tuple(chol.shape)}")
    if e_pos is not None:
        E = e_pos.numel()
        for name, t in (("e_a", e_a), ("e_b", e_b), ("e_alpha", e_alpha)):
            if t.numel() != E:
                raise ValueError(f"{name}: expected {E} entries (one per ellipse position), got {t.numel()}")
    if o_pos is not None:
        O = o_pos.numel()
        for name, t in (("o_mu", o_mu), ("o_rho", o_rho)):
            if t.numel() != O:
                raise ValueError(f"{name}: expected {O} entries (one per outlier position), got {t.numel()}")


def sample_codebook(means, chol, seed: int, samples: int, mode: int, codebook_owner: int) -> torch.Tensor:
    """Stage 0 alone: z [S, K, 2] float32 (in ``mean`` mode every sample is the means)."""
    check_sizes(means, chol)
    K = means.shape[0]
    z = empty((samples, K, 2), dtype=torch.float32, device=means.device)
    nblk = triton.cdiv(K, BLOCK_K)
    launch(_sample_kernel, (samples * nblk,), means.contiguous(), chol.contiguous(), z, K, nblk,
           seed_arg(seed, z.device),
           u32_arg(codebook_owner), MODE=mode, BLOCK=BLOCK_K, num_warps=warps(BLOCK_K, 1))
    return z


def special_values(z, labels_flat, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode, owner,
                   *, out=None, emap=((0, 0, 1), 0)) -> torch.Tensor:
    """Stage 2. ``out`` = W [S, n] to overwrite special positions in place; None: return the corrections
    delta [S, E + O] (ellipses then outliers) = true value - label value, float32. ``emap``: :func:`elem_map`."""
    E, O = e_pos.numel(), o_pos.numel()
    K, n = z.shape[1], labels_flat.numel()
    check_sizes(None, None, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho)
    delta = out is None
    if delta:
        out = empty((samples, E + O), dtype=torch.float32, device=z.device)
    if E + O == 0:
        return out
    nblk = triton.cdiv(E + O, BLOCK)
    e_pos, o_pos = e_pos.contiguous(), o_pos.contiguous()
    mapped = 0 if mode == 2 else int(emap[1] != 0)
    e_npos, o_npos = e_pos, o_pos
    if mapped:  # the shard's global elements of its special positions (torch ops on a few entries: no sync)
        off, stride, rl = emap[0]
        e_npos, o_npos = (off + torch.div(p, rl, rounding_mode="floor") * stride + p % rl for p in (e_pos, o_pos))
    launch(_special_kernel, (samples * nblk,), z, labels_flat, e_pos, e_a.contiguous(),
           e_b.contiguous(), e_alpha.contiguous(), o_pos, o_mu.contiguous(), o_rho.contiguous(), out, E,
           O, K, n, nblk, seed_arg(seed, z.device), u32_arg(owner), e_npos, o_npos, MODE=mode, DELTA=delta,
           BLOCK=BLOCK, MAPPED=mapped, num_warps=warps(BLOCK, 2))
    return out


def _row_len(t) -> int:
    return t.numel() // t.shape[0] if t.dim() and t.shape[0] else 0


def reconstruct(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed: int, samples: int,
                mode: int, owner: int, codebook_owner: int, *, elem_offset: int = 0,
                row_stride: int = 0) -> torch.Tensor:
    """The backend kernel of ``sws_kernels::reconstruct``: W [S, *labels.shape] in the dtype of means.
    ``elem_offset``/``row_stride``: a shard's global element mapping (:func:`elem_map`)."""
    emap = elem_map(elem_offset, row_stride, _row_len(labels))
    n = labels.numel()
    lab = labels.reshape(-1).contiguous()
    z = sample_codebook(means, chol, seed, samples, mode, codebook_owner)
    w = empty((samples, n), dtype=means.dtype, device=means.device)
    if n:
        nblk = triton.cdiv(n, BLOCK)
        launch(_dense_kernel, (samples * nblk,), lab, z, w, n, means.shape[0], nblk, seed_arg(seed, w.device),
               u32_arg(owner), *emap[0],
               HIER=(mode == HIER), BLOCK=BLOCK, MAPPED=emap[1] if mode == HIER else 0, num_warps=warps(BLOCK))
        special_values(z, lab, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode, owner, out=w,
                       emap=emap)
    return w.view(samples, *labels.shape)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

class Segments(_segments.Pieces):
    """Label-sorted entries cut into pieces of <= chunk entries: the Triton view of the one index builder
    (sws_kernels/_segments.py, shared with the native CUDA backward). Constructed explicitly it is built
    afresh (e.g. to pass as ``segments=``); reconstruct_backward itself takes the cached one, rebuilt only
    when the labels, ellipse or outlier tensors change."""

    __slots__ = ()

    def __init__(self, labels, e_pos, e_a, e_b, e_alpha, o_pos, K: int, chunk: int):
        super().__init__(_segments.build(labels, e_pos, e_a, e_b, e_alpha, o_pos, K), chunk, BLOCK_K)


@triton.jit(do_not_specialize=["n", "P", "nblk", "seed_ptr", "owner", "e_off", "e_stride", "e_rowlen"])
def _piece_kernel(g_ptr, pos_ptr, coef_ptr, start_ptr, len_ptr, pmu_ptr, prho_ptr, n, P, nblk, seed_ptr,
                  owner, e_off, e_stride, e_rowlen, HIER: tl.constexpr, PB: tl.constexpr, CHUNK: tl.constexpr,
                  MAPPED: tl.constexpr):
    seed_lo, seed_hi = load_seed(seed_ptr)
    # Backward stage 1: one program = PB pieces (each <= CHUNK entries of one component) of one sample, as a
    # [PB, CHUNK] tile; each piece's sum is a fixed-shape tl.sum, so partials are bit-identical run to run.
    pid = tl.program_id(0)
    s = pid // nblk
    p = (pid % nblk) * PB + tl.arange(0, PB)
    mp = p < P
    start = tl.load(start_ptr + p, mask=mp, other=0)
    length = tl.load(len_ptr + p, mask=mp, other=0)
    r = tl.arange(0, CHUNK)
    m = r[None, :] < length[:, None]
    e = start[:, None] + r[None, :]
    pos = tl.load(pos_ptr + e, mask=m, other=0)
    coef = tl.load(coef_ptr + e, mask=m, other=0.0)
    # an (unvalidated) ellipse position outside [0, n) contributes nothing: never a read outside dW
    g = tl.load(g_ptr + s.to(tl.int64) * n + pos, mask=m & (pos >= 0) & (pos < n), other=0.0).to(tl.float32)
    v = coef * g
    out = s.to(tl.int64) * P + p
    tl.store(pmu_ptr + out, tl.sum(v, axis=1), mask=mp)
    if HIER:
        if MAPPED:  # a shard: the noise of the position's global element
            eps = stream_normal(global_index(pos, e_off, e_stride, e_rowlen), seed_lo, seed_hi, s, owner, _purpose(0))
        else:
            eps = stream_normal(pos, seed_lo, seed_hi, s, owner, _purpose(0))
        tl.store(prho_ptr + out, tl.sum(tl.where(m, v * eps, 0.0), axis=1), mask=mp)


@triton.jit(do_not_specialize=["K", "P", "S", "seed_ptr", "cb_owner"])
def _component_kernel(pmu_ptr, prho_ptr, off_ptr, np_ptr, bmax_ptr, means_ptr, chol_ptr, gm_ptr, gc_ptr, K, P, S,
                      seed_ptr, cb_owner, MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    seed_lo, seed_hi = load_seed(seed_ptr)
    # Backward stage 2: BLOCK_K components; samples, then pieces, summed in a fixed order.
    pid = tl.program_id(0)
    k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = k < K
    off = tl.load(off_ptr + k, mask=mk, other=0)
    npc = tl.load(np_ptr + k, mask=mk, other=0)
    maxp = tl.load(bmax_ptr + pid)
    ca = tl.load(chol_ptr + 3 * k, mask=mk, other=0.0).to(tl.float32)
    cb = tl.load(chol_ptr + 3 * k + 1, mask=mk, other=0.0).to(tl.float32)
    cc = tl.load(chol_ptr + 3 * k + 2, mask=mk, other=0.0).to(tl.float32)
    m_rho = tl.load(means_ptr + 2 * k + 1, mask=mk, other=0.0).to(tl.float32)
    g_m0 = tl.zeros([BLOCK_K], tl.float32)
    g_m1 = tl.zeros([BLOCK_K], tl.float32)
    g_a = tl.zeros([BLOCK_K], tl.float32)
    g_b = tl.zeros([BLOCK_K], tl.float32)
    g_c = tl.zeros([BLOCK_K], tl.float32)
    for s_ in range(S):
        s = tl.zeros([], tl.int64) + s_  # a tensor on both the compiler and the interpreter
        dzm = tl.zeros([BLOCK_K], tl.float32)
        dzr = tl.zeros([BLOCK_K], tl.float32)
        row = s * P + off
        for j in range(maxp):
            mj = mk & (j < npc)
            dzm += tl.load(pmu_ptr + row + j, mask=mj, other=0.0)
            if MODE == 1:
                dzr += tl.load(prho_ptr + row + j, mask=mj, other=0.0)
        g_m0 += dzm
        if MODE != 2:
            xi0, xi1 = component_xi(k, seed_lo, seed_hi, s, cb_owner)
            g_a += dzm * xi0
            if MODE == 1:
                z_rho = m_rho + cb * xi0 + softplus(cc) * xi1
                dzr = softplus_grad(z_rho) * dzr
                g_m1 += dzr
                g_b += dzr * xi0
                g_c += dzr * xi1
    g_a = g_a * softplus_grad(ca)
    g_c = g_c * softplus_grad(cc)
    tl.store(gm_ptr + 2 * k, g_m0.to(gm_ptr.dtype.element_ty), mask=mk)
    tl.store(gm_ptr + 2 * k + 1, g_m1.to(gm_ptr.dtype.element_ty), mask=mk)
    tl.store(gc_ptr + 3 * k, g_a.to(gc_ptr.dtype.element_ty), mask=mk)
    tl.store(gc_ptr + 3 * k + 1, g_b.to(gc_ptr.dtype.element_ty), mask=mk)
    tl.store(gc_ptr + 3 * k + 2, g_c.to(gc_ptr.dtype.element_ty), mask=mk)


@triton.jit(do_not_specialize=["O", "n", "S", "seed_ptr", "owner", "e_off", "e_stride", "e_rowlen"])
def _outlier_kernel(g_ptr, pos_ptr, rho_ptr, gmu_ptr, grho_ptr, O, n, S, seed_ptr, owner, e_off, e_stride, e_rowlen,
                    MODE: tl.constexpr, BLOCK: tl.constexpr, MAPPED: tl.constexpr):
    seed_lo, seed_hi = load_seed(seed_ptr)
    # Backward stage 3: BLOCK outliers, samples looped in order.
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = j < O
    pos = tl.load(pos_ptr + j, mask=m, other=0)
    rho = tl.load(rho_ptr + j, mask=m, other=0.0).to(tl.float32)
    mg = m & (pos >= 0) & (pos < n)  # a position outside [0, n) gets a zero gradient, never a wild read
    if MAPPED:  # a shard: the noise of the positions' global elements
        gpos = global_index(pos, e_off, e_stride, e_rowlen)
    else:
        gpos = pos
    gmu = tl.zeros([BLOCK], tl.float32)
    grho = tl.zeros([BLOCK], tl.float32)
    for s_ in range(S):
        s = tl.zeros([], tl.int64) + s_
        g = tl.load(g_ptr + s.to(tl.int64) * n + pos, mask=mg, other=0.0).to(tl.float32)
        gmu += g
        if MODE != 2:
            grho += g * stream_normal(gpos, seed_lo, seed_hi, s, owner, _purpose(0))
    grho = grho * softplus_grad(rho)
    tl.store(gmu_ptr + j, gmu.to(gmu_ptr.dtype.element_ty), mask=m)
    tl.store(grho_ptr + j, grho.to(grho_ptr.dtype.element_ty), mask=m)


def reconstruct_backward(grad_w, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed: int,
                         samples: int, mode: int, owner: int, codebook_owner: int, *, segments=None,
                         elem_offset: int = 0, row_stride: int = 0):
    """The backend kernel of ``sws_kernels::reconstruct_backward``: dW [S, *shape] -> (g_means, g_chol,
    g_mu_o, g_rho_o), bit-identical run to run. ``elem_offset``/``row_stride``: a shard (:func:`elem_map`)."""
    emap = elem_map(elem_offset, row_stride, _row_len(labels))
    mapped = int(emap[1] != 0)
    K, n, S, dev = means.shape[0], labels.numel(), samples, means.device
    check_sizes(means, chol, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho)
    if grad_w.numel() != S * n:
        raise ValueError(f"grad_w: expected {S} x {n} elements (samples x weights), got shape {tuple(grad_w.shape)}")
    g = grad_w.reshape(S, n).contiguous()
    seg = segments if segments is not None else _segments.pieces(labels, e_pos, e_a, e_b, e_alpha, o_pos, K,
                                                                   CHUNK, BLOCK_K)
    words = (seed_arg(seed, dev),)
    pmu = empty((S * max(seg.P, 1),), dtype=torch.float32, device=dev)
    prho = empty_like(pmu) if mode == HIER else pmu
    if seg.P:
        nblk = triton.cdiv(seg.P, PIECES)
        launch(_piece_kernel, (S * nblk,), g, seg.pos, seg.coef, seg.piece_start, seg.piece_len, pmu, prho, n, seg.P,
               nblk, *words, u32_arg(owner), *emap[0], HIER=(mode == HIER), PB=PIECES, CHUNK=seg.chunk,
               MAPPED=mapped if mode == HIER else 0, num_warps=warps(PIECES * seg.chunk))
    g_means = empty_like(means)
    g_chol = empty_like(chol)
    launch(_component_kernel, (triton.cdiv(K, BLOCK_K),), pmu, prho, seg.piece_off, seg.npieces, seg.block_max,
           means.contiguous(), chol.contiguous(), g_means, g_chol, K, seg.P, S, *words, u32_arg(codebook_owner),
           MODE=mode, BLOCK_K=BLOCK_K, num_warps=warps(BLOCK_K))
    O = o_pos.numel()
    g_mu = empty_like(o_mu)
    g_rho = empty_like(o_rho)
    if O:
        ob = sparse_block()
        launch(_outlier_kernel, (triton.cdiv(O, ob),), g, o_pos.contiguous(), o_rho.contiguous(), g_mu, g_rho, O, n,
               S, *words, u32_arg(owner), *emap[0], MODE=mode, BLOCK=ob, MAPPED=mapped if mode != 2 else 0,
               num_warps=warps(ob, 2))
    return g_means, g_chol, g_mu, g_rho
