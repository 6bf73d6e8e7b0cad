"""The RNG contract (SPEC.md section 4) as Triton device functions, used by every Triton kernel.

``philox4x32`` is Philox4x32-10 on uint32 tiles; ``normal4`` turns one counter's four words into four
float32 normals (Box-Muller exactly as ``sws_kernels.philox``); ``stream_normal``/``stream_uniform``
give element ``idx`` of stream (seed, sample, owner, purpose). The launchers at the bottom exist so tests
can compare this stream bit for bit with the PyTorch and C++ ones.

Why not ``tl.randn``: Triton's own Philox uses a counter layout of its own (offset in words 0-1); the
contract fixes counter = (j, sample, owner, purpose), so every backend must build its own counters.
``sqrt_rn`` (IEEE square root) keeps r exact; log/cos/sin are the platform's float32 versions, which
the contract allows to differ by a few ulps (normals agree to 1e-5).
"""
import torch
import triton
import triton.language as tl

from .. import philox as _ref

PHILOX_M0: tl.constexpr = 0xD2511F53
PHILOX_M1: tl.constexpr = 0xCD9E8D57
PHILOX_W0: tl.constexpr = 0x9E3779B9
PHILOX_W1: tl.constexpr = 0xBB67AE85
TWO_PI: tl.constexpr = 6.2831854820251465  # float32(2 pi), the value every backend uses
U_SCALE: tl.constexpr = 5.9604644775390625e-08  # 2**-24


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tiles (counter c0..c3, key k0, k1) -> four uint32 words."""
    for _ in tl.static_range(10):
        # round: products of the multipliers with words 0 and 2, then the Feistel-like shuffle with the key
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        # key bump (the one after the last round is unused)
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def to_uniform(w):
    """float32(2 * (w >> 9) + 1) * 2**-24: exact, never 0 or 1."""
    return ((w >> 9) * 2 + 1).to(tl.float32) * U_SCALE


@triton.jit
def normal4(w0, w1, w2, w3):
    """Box-Muller on one counter's words: (r01 cos th01, r01 sin th01, r23 cos th23, r23 sin th23)."""
    r01 = tl.sqrt_rn(-2.0 * tl.log(to_uniform(w0)))
    th01 = TWO_PI * to_uniform(w1)
    r23 = tl.sqrt_rn(-2.0 * tl.log(to_uniform(w2)))
    th23 = TWO_PI * to_uniform(w3)
    return r01 * tl.cos(th01), r01 * tl.sin(th01), r23 * tl.cos(th23), r23 * tl.sin(th23)


@triton.jit
def _counter_words(idx, seed_lo, seed_hi, sample, owner, purpose):
    """Words of counter (idx // 4, sample, owner, purpose) for int64 element indices ``idx``."""
    c0 = (idx >> 2).to(tl.uint32)
    zero = tl.zeros_like(c0)
    c1 = zero + sample.to(tl.uint32)
    c2 = zero + owner.to(tl.uint32)
    c3 = zero + purpose.to(tl.uint32)
    k0 = zero + seed_lo.to(tl.uint32)
    k1 = zero + seed_hi.to(tl.uint32)
    return philox4x32(c0, c1, c2, c3, k0, k1)


@triton.jit
def stream_normal(idx, seed_lo, seed_hi, sample, owner, purpose):
    """Normal of element ``idx`` (int64 tile) of stream (seed, sample, owner, purpose)."""
    w0, w1, w2, w3 = _counter_words(idx, seed_lo, seed_hi, sample, owner, purpose)
    n0, n1, n2, n3 = normal4(w0, w1, w2, w3)
    t = idx & 3
    return tl.where(t == 0, n0, tl.where(t == 1, n1, tl.where(t == 2, n2, n3)))


@triton.jit
def stream_uniform(idx, seed_lo, seed_hi, sample, owner, purpose):
    w0, w1, w2, w3 = _counter_words(idx, seed_lo, seed_hi, sample, owner, purpose)
    t = idx & 3
    w = tl.where(t == 0, w0, tl.where(t == 1, w1, tl.where(t == 2, w2, w3)))
    return to_uniform(w)


# ----------------------------------------------------------------------------------------------------
# Launchers (tests and cross-backend checks)
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _words_kernel(counter_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c0 = tl.load(counter_ptr + 4 * offs + 0, mask=m, other=0).to(tl.uint32)
    c1 = tl.load(counter_ptr + 4 * offs + 1, mask=m, other=0).to(tl.uint32)
    c2 = tl.load(counter_ptr + 4 * offs + 2, mask=m, other=0).to(tl.uint32)
    c3 = tl.load(counter_ptr + 4 * offs + 3, mask=m, other=0).to(tl.uint32)
    k0 = tl.load(key_ptr + 2 * offs + 0, mask=m, other=0).to(tl.uint32)
    k1 = tl.load(key_ptr + 2 * offs + 1, mask=m, other=0).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * offs + 0, w0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * offs + 1, w1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * offs + 2, w2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * offs + 3, w3.to(tl.int64), mask=m)


@triton.jit
def _stream_kernel(out_ptr, n, offset, seed_lo, seed_hi, sample, owner, purpose, NORMAL: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    idx = offs.to(tl.int64) + offset
    if NORMAL:
        v = stream_normal(idx, seed_lo, seed_hi, sample, owner, purpose)
    else:
        v = stream_uniform(idx, seed_lo, seed_hi, sample, owner, purpose)
    tl.store(out_ptr + offs, v, mask=m)


def philox_words(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 through the Triton helper: int64 [N, 4], [N, 2] -> int64 [N, 4]."""
    counter = counter.reshape(-1, 4).contiguous()
    key = key.reshape(-1, 2).contiguous()
    if key.shape[0] != counter.shape[0]:
        raise ValueError(f"key: expected {counter.shape[0]} rows (one per counter), got {tuple(key.shape)}")
    out = torch.full_like(counter, -1)
    n = counter.shape[0]
    BLOCK = 64
    _words_kernel[(triton.cdiv(n, BLOCK),)](counter, key, out, n, BLOCK=BLOCK)
    return out


def _stream(normal: bool, seed, n, sample, owner, purpose, offset, device):
    seed = _ref.check_seed(seed)
    _ref._check_range(offset, n)
    for nm, v in (("sample", sample), ("owner", owner), ("purpose", purpose)):
        _ref._check_word(v, nm)
    out = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    BLOCK = 256
    lo, hi = _ref.split_seed(seed)
    _stream_kernel[(max(1, triton.cdiv(n, BLOCK)),)](out, n, offset, lo, hi, sample, owner, purpose,
                                                      NORMAL=normal, BLOCK=BLOCK)
    return out


def uniform(seed, n, *, sample=0, owner=0, purpose=0, offset=0, device="cpu"):
    return _stream(False, seed, n, sample, owner, purpose, offset, device)


def normal(seed, n, *, sample=0, owner=0, purpose=0, offset=0, device="cpu"):
    return _stream(True, seed, n, sample, owner, purpose, offset, device)
