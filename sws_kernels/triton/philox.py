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
from ._launch import INTERPRET, empty, launch

# Globals a kernel reads must be tl.constexpr objects: the annotation form `X: tl.constexpr = ...` runs under
# the interpreter but the JIT refuses it ("Cannot access global variable"), which is how 40 of 58
# specialisations failed to compile before benchmarks/triton_aot.py existed.
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_PI = tl.constexpr(6.2831854820251465)  # float32(2 pi), the value every backend uses
U_SCALE = tl.constexpr(5.9604644775390625e-08)  # 2**-24


def u32_arg(v: int) -> int:
    """A uint32 kernel argument (sample, owner id, purpose) as the int32 with the same bits.

    Triton types an int argument by its value: i32 below 2**31, i64 above. Passing the signed view keeps
    every such argument i32, so an owner id >= 2**31 does not compile a second variant of every kernel;
    in the kernel ``.to(tl.uint32)`` of an i32 is a bit cast."""
    return v - (1 << 32) if v >= (1 << 31) else v


def seed_arg(seed, device) -> torch.Tensor:
    """The seed as the kernels take it: a 0-dim int64 tensor on ``device`` (an int seed is encoded two's
    complement). Kernels load it (load_seed): nothing reads it on the host, so a seed drawn on the GPU costs
    no sync and a CUDA graph replays with the value the tensor holds at replay."""
    return _ref.seed_tensor(seed, device)


@triton.jit
def load_seed(seed_ptr):
    """(seed & 0xffffffff, seed >> 32) as uint32 scalars, from the int64 seed in memory."""
    seed = tl.load(seed_ptr)
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)


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
    """Normal of element ``idx`` (int64 tile, any positions) of stream (seed, sample, owner, purpose).

    For scattered positions (outliers, label-sorted backward entries): one Philox call per element, and only
    the Box-Muller pair the element needs (one log, one sqrt; the same float ops as normal4, so the same
    bits). Contiguous runs use normal_rows: one Philox call per four elements."""
    w0, w1, w2, w3 = _counter_words(idx, seed_lo, seed_hi, sample, owner, purpose)
    t = idx & 3
    hi_pair = t >= 2
    r = tl.sqrt_rn(-2.0 * tl.log(to_uniform(tl.where(hi_pair, w2, w0))))
    th = TWO_PI * to_uniform(tl.where(hi_pair, w3, w1))
    return tl.where((t & 1) == 0, r * tl.cos(th), r * tl.sin(th))


@triton.jit
def normal_rows(base, seed_lo, seed_hi, sample, owner, purpose, COLS: tl.constexpr):
    """Normals of elements base[r] + c, c in [0, COLS), of one stream, as a [R, COLS] tile.

    ``base`` is an int64 [R, 1] tile of row starts, each a multiple of 4, and COLS a multiple of 4: then the
    four elements 4j..4j+3 are exactly the four outputs of counter j, so the tile costs one Philox call and
    two Box-Muller pairs per four elements (stream_normal pays one Philox per element). Stage: counters
    [R, COLS/4] -> four normal tiles -> interleaved to [R, COLS/4, 2, 2] -> [R, COLS] (row-major order n0,
    n1, n2, n3 of each counter)."""
    j = (base >> 2) + tl.arange(0, COLS // 4)[None, :].to(tl.int64)
    c0 = j.to(tl.uint32)
    zero = tl.zeros_like(c0)
    w0, w1, w2, w3 = philox4x32(c0, zero + sample.to(tl.uint32), zero + owner.to(tl.uint32),
                                zero + purpose.to(tl.uint32), zero + seed_lo.to(tl.uint32),
                                zero + seed_hi.to(tl.uint32))
    n0, n1, n2, n3 = normal4(w0, w1, w2, w3)
    q = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(q, [base.shape[0], COLS])


@triton.jit
def stream_uniform(idx, seed_lo, seed_hi, sample, owner, purpose):
    w0, w1, w2, w3 = _counter_words(idx, seed_lo, seed_hi, sample, owner, purpose)
    t = idx & 3
    w = tl.where(t == 0, w0, tl.where(t == 1, w1, tl.where(t == 2, w2, w3)))
    return to_uniform(w)


# ----------------------------------------------------------------------------------------------------
# Launchers (tests and cross-backend checks)
# ----------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["n"])
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


@triton.jit(do_not_specialize=["n", "offset", "seed_ptr", "sample", "owner", "purpose"])
def _stream_kernel(out_ptr, n, offset, seed_ptr, sample, owner, purpose, NORMAL: tl.constexpr,
                   BLOCK: tl.constexpr):
    seed_lo, seed_hi = load_seed(seed_ptr)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    idx = offs.to(tl.int64) + offset
    if NORMAL:
        v = stream_normal(idx, seed_lo, seed_hi, sample, owner, purpose)
    else:
        v = stream_uniform(idx, seed_lo, seed_hi, sample, owner, purpose)
    tl.store(out_ptr + offs, v, mask=m)


@triton.jit(do_not_specialize=["n", "offset", "seed_ptr", "sample", "owner", "purpose"])
def _rows_kernel(out_ptr, n, offset, seed_ptr, sample, owner, purpose, ROWS: tl.constexpr,
                 COLS: tl.constexpr):
    seed_lo, seed_hi = load_seed(seed_ptr)
    # normal_rows on [ROWS, COLS] tiles of a contiguous stream (offset a multiple of 4): its test launcher
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    base = offset + r[:, None] * COLS
    v = normal_rows(base, seed_lo, seed_hi, sample, owner, purpose, COLS)
    offs = r[:, None] * COLS + tl.arange(0, COLS)[None, :]
    tl.store(out_ptr + offs, v, mask=offs < n)


def _device(device):
    # The compiled launcher only takes device memory; the interpreter only host memory.
    if device is not None:
        return torch.device(device)
    return torch.device("cpu") if INTERPRET else torch.device("cuda", torch.cuda.current_device())


def philox_words(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 through the Triton helper: int64 [N, 4], [N, 2] -> int64 [N, 4] (on counter's device)."""
    counter = counter.reshape(-1, 4).contiguous()
    key = key.reshape(-1, 2).to(counter.device).contiguous()
    if key.shape[0] != counter.shape[0]:
        raise ValueError(f"key: expected {counter.shape[0]} rows (one per counter), got {tuple(key.shape)}")
    out = torch.empty_like(counter)
    n = counter.shape[0]
    BLOCK = 64
    launch(_words_kernel, (triton.cdiv(n, BLOCK),), counter, key, out, n, BLOCK=BLOCK)
    return out


def _stream_args(seed, n, sample, owner, purpose, offset, device):
    _ref._check_range(offset, n)
    for nm, v in (("sample", sample), ("owner", owner), ("purpose", purpose)):
        _ref._check_word(v, nm)
    return (seed_arg(seed, device), u32_arg(sample), u32_arg(owner), u32_arg(purpose))


def _stream(normal: bool, seed, n, sample, owner, purpose, offset, device):
    device = _device(device)
    words = _stream_args(seed, n, sample, owner, purpose, offset, device)
    out = empty((n,), dtype=torch.float32, device=device)
    BLOCK = 256
    launch(_stream_kernel, (max(1, triton.cdiv(n, BLOCK)),), out, n, offset, *words, NORMAL=normal, BLOCK=BLOCK)
    return out


def uniform(seed, n, *, sample=0, owner=0, purpose=0, offset=0, device=None):
    """Element offset..offset+n-1 of a uniform stream; device None: the CPU under the interpreter, else the
    current CUDA device."""
    return _stream(False, seed, n, sample, owner, purpose, offset, device)


def normal(seed, n, *, sample=0, owner=0, purpose=0, offset=0, device=None):
    return _stream(True, seed, n, sample, owner, purpose, offset, device)


def normal_rows_stream(seed, n, *, sample=0, owner=0, purpose=0, offset=0, device=None, rows=4, cols=32):
    """The same stream as ``normal`` through normal_rows ([rows, cols] tiles, offset a multiple of 4)."""
    if offset % 4 or cols % 4:
        raise ValueError(f"offset, cols: expected multiples of 4 (normal_rows' alignment), got {offset}, {cols}")
    device = _device(device)
    words = _stream_args(seed, n, sample, owner, purpose, offset, device)
    out = empty((n,), dtype=torch.float32, device=device)
    launch(_rows_kernel, (max(1, triton.cdiv(n, rows * cols)),), out, n, offset, *words, ROWS=rows, COLS=cols)
    return out
