"""The RNG contract (SPEC.md section 4) in plain PyTorch.

Philox4x32-10 exactly as Random123 defines it, on int64 tensors that hold uint32 words. Every backend
(this file, ``csrc/philox.h``, ``sws_kernels/triton/philox.py``) draws the same stream, so a fused kernel
and the reference see the same noise and their outputs compare element by element.

Stream layout: key = (seed & 0xffffffff, seed >> 32); counter = (j, sample, owner, purpose). Element ``i``
of a stream is output word ``i % 4`` of counter word ``j = i // 4``.

Why int64 and not torch.uint32: uint32 tensors have almost no arithmetic kernels in PyTorch; int64 holds
every uint32 exactly and its products are formed from 16-bit halves so nothing overflows.
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "philox4x32",
    "uniform",
    "normal",
    "uniform_at",
    "normal_at",
    "words_to_uniform",
    "words_to_normal",
    "check_seed",
    "split_seed",
    "seed_tensor",
    "encode_seed",
    "MAX_ELEMENT",
    "PURPOSE_WEIGHT",
    "PURPOSE_COMPONENT",
    "PURPOSE_BIAS",
]

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
ROUNDS = 10

#: element indices per stream are < 2**34 (counter word j < 2**32)
MAX_ELEMENT = 1 << 34
MAX_SEED = 1 << 64
MAX_WORD = 1 << 32

PURPOSE_WEIGHT = 0  # weight noise eps[s, i], owner = layer rng_id
PURPOSE_COMPONENT = 1  # component noise xi[s, k], owner = codebook rng_id
PURPOSE_BIAS = 2  # mean-field bias noise, owner = layer rng_id

# float32(2 pi): the value every backend multiplies by (6.2831855f in C).
TWO_PI_F32 = float(torch.tensor(2.0 * math.pi, dtype=torch.float32).item())
_U_SCALE = 2.0**-24


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product m * x, for a uint32 constant m and uint32 words x.

    m * x can reach 2**64, past int64: split m into 16-bit halves so each partial product is < 2**48.
    """
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_lo = x * m_lo  # < 2**48
    p_hi = x * m_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10. ``counter`` int64 [..., 4], ``key`` int64 [..., 2] (uint32 values) -> int64 [..., 4]."""
    if not isinstance(counter, torch.Tensor) or counter.dtype != torch.int64 or counter.shape[-1:] != (4,):
        raise TypeError(f"counter: expected an int64 tensor of shape [..., 4], got {_describe(counter)}")
    if not isinstance(key, torch.Tensor) or key.dtype != torch.int64 or key.shape[-1:] != (2,):
        raise TypeError(f"key: expected an int64 tensor of shape [..., 2], got {_describe(key)}")
    for name, t in (("counter", counter), ("key", key)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > MASK32):
            raise ValueError(f"{name}: expected uint32 words in [0, 2**32), got values in [{int(t.min())}, {int(t.max())}]")
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    out = _philox_words(c0, c1, c2, c3, k0, k1)
    return torch.stack(out, dim=-1)


def _philox_words(c0, c1, c2, c3, k0, k1):
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def words_to_uniform(w: torch.Tensor) -> torch.Tensor:
    """u(w) = float32(2 * (w >> 9) + 1) * 2**-24: exact in float32, never 0 or 1."""
    return (2 * (w >> 9) + 1).to(torch.float32) * _U_SCALE


def words_to_normal(words: torch.Tensor) -> torch.Tensor:
    """Box-Muller in float32 on the four words of one counter: int64 [..., 4] -> float32 [..., 4]."""
    u = words_to_uniform(words)
    u0, u1, u2, u3 = u.unbind(-1)
    r01 = torch.sqrt(-2.0 * torch.log(u0))
    r23 = torch.sqrt(-2.0 * torch.log(u2))
    th01 = TWO_PI_F32 * u1
    th23 = TWO_PI_F32 * u3
    return torch.stack([r01 * torch.cos(th01), r01 * torch.sin(th01), r23 * torch.cos(th23), r23 * torch.sin(th23)], -1)


def check_seed(seed, name: str = "seed"):
    """A seed: a Python int in [0, 2**64), returned as is, or a one-element int64 tensor holding the uint64
    seed's bits (two's complement), returned as a 0-dim tensor. A tensor is never read on the host: every
    int64 value is a valid seed, so there is nothing to check that needs a sync (SPEC.md section 4)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: expected a Python int or a one-element int64 tensor, got {_describe(seed)}")
        return seed.reshape(()).to(torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or type(seed).__name__ == "bool_":
        raise TypeError(f"{name}: expected a Python int in [0, 2**64) or an int64 tensor, got {type(seed).__name__}")
    seed = int(seed)  # a NumPy integer too
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"{name}: expected a value in [0, 2**64), got {seed}")
    return seed


def encode_seed(seed: int) -> int:
    """uint64 seed -> the int64 with the same bits."""
    return seed - MAX_SEED if seed >= (1 << 63) else seed


def seed_tensor(seed, device=None) -> torch.Tensor:
    """A checked seed (int or tensor) as a 0-dim int64 tensor on ``device`` (None: where it is, or the CPU)."""
    seed = check_seed(seed)
    if isinstance(seed, torch.Tensor):
        return seed if device is None else seed.to(device)
    return torch.tensor(encode_seed(seed), dtype=torch.int64, device=device)


def split_seed(seed):
    """Key words (seed & 0xffffffff, seed >> 32): ints for an int seed, int64 tensors for a tensor seed."""
    if isinstance(seed, torch.Tensor):
        return seed & MASK32, (seed >> 32) & MASK32
    return seed & MASK32, seed >> 32


def _key_like(j: torch.Tensor, seed):
    """The key words broadcast to j's shape and device (a tensor seed stays on the device: no host read)."""
    k0, k1 = split_seed(seed)
    if isinstance(seed, torch.Tensor):
        return k0.to(j.device).expand_as(j), k1.to(j.device).expand_as(j)
    return torch.full_like(j, k0), torch.full_like(j, k1)


def _check_word(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a Python int in [0, 2**32), got {type(value).__name__}")
    if not 0 <= value < MAX_WORD:
        raise ValueError(f"{name}: expected a value in [0, 2**32), got {value}")
    return value


def _check_range(offset: int, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset: expected a non-negative int, got {offset!r}")
    if offset + n > MAX_ELEMENT:
        raise ValueError(f"element index: expected offset + n <= 2**34 (the stream limit), got {offset} + {n} = {offset + n}")


def _stream_words(seed: int, first_j: int, count_j: int, sample, owner: int, purpose: int, device) -> torch.Tensor:
    """Words of counters j in [first_j, first_j + count_j) for each sample: int64 [*sample.shape, count_j, 4]."""
    j = torch.arange(first_j, first_j + count_j, dtype=torch.int64, device=device)
    s = torch.as_tensor(sample, dtype=torch.int64, device=device)[..., None]
    j, s = torch.broadcast_tensors(j, s)
    c2 = torch.full_like(j, owner)
    c3 = torch.full_like(j, purpose)
    kk0, kk1 = _key_like(j, seed)
    return torch.stack(_philox_words(j, s, c2, c3, kk0, kk1), dim=-1)


def _stream(kind: str, seed, n: int, sample, owner, purpose, offset: int, device, check: bool = True) -> torch.Tensor:
    seed = check_seed(seed)
    _check_range(offset, n)
    owner = _check_word(owner, "owner")
    purpose = _check_word(purpose, "purpose")
    samples = torch.as_tensor(sample, dtype=torch.int64)
    # check=False: the reference's own sample indices (an arange): reading them back would be a host sync
    if check and samples.numel() and (int(samples.min()) < 0 or int(samples.max()) >= MAX_WORD):
        raise ValueError(f"sample: expected values in [0, 2**32), got {sample}")
    first_j, last_j = offset // 4, (offset + n + 3) // 4
    words = _stream_words(seed, first_j, last_j - first_j, samples, owner, purpose, device)
    vals = words_to_uniform(words) if kind == "uniform" else words_to_normal(words)
    vals = vals.flatten(-2)
    start = offset - 4 * first_j
    return vals[..., start : start + n].contiguous()


def uniform(seed, n: int, *, sample=0, owner: int = 0, purpose: int = 0, offset: int = 0, device=None) -> torch.Tensor:
    """Uniforms of elements ``offset .. offset+n-1`` of stream (seed, sample, owner, purpose): float32 [n].

    ``sample`` may be an int or an int64 tensor of sample indices; the result then has its shape in front.
    """
    return _stream("uniform", seed, n, sample, owner, purpose, offset, device)


def normal(seed, n: int, *, sample=0, owner: int = 0, purpose: int = 0, offset: int = 0, device=None) -> torch.Tensor:
    """Standard normals of elements ``offset .. offset+n-1`` of stream (seed, sample, owner, purpose): float32 [n]."""
    return _stream("normal", seed, n, sample, owner, purpose, offset, device)


def _at(kind: str, seed, index: torch.Tensor, sample, owner: int, purpose: int, check: bool = True) -> torch.Tensor:
    seed = check_seed(seed)
    index = index.to(torch.int64)
    if check and index.numel() and (int(index.min()) < 0 or int(index.max()) >= MAX_ELEMENT):
        raise ValueError(f"index: expected element indices in [0, 2**34), got [{int(index.min())}, {int(index.max())}]")
    s = torch.as_tensor(sample, dtype=torch.int64, device=index.device)
    j, s = torch.broadcast_tensors(index >> 2, s)
    c2 = torch.full_like(j, owner)
    c3 = torch.full_like(j, purpose)
    words = torch.stack(_philox_words(j, s, c2, c3, *_key_like(j, seed)), -1)
    vals = words_to_uniform(words) if kind == "uniform" else words_to_normal(words)
    t = (index & 3).expand(j.shape)[..., None]
    return vals.gather(-1, t)[..., 0]


def uniform_at(seed, index: torch.Tensor, *, sample=0, owner: int = 0, purpose: int = 0) -> torch.Tensor:
    """Uniforms of arbitrary elements ``index`` (int64, any shape), broadcast against ``sample``."""
    return _at("uniform", seed, index, sample, owner, purpose)


def normal_at(seed, index: torch.Tensor, *, sample=0, owner: int = 0, purpose: int = 0) -> torch.Tensor:
    """Normals of arbitrary elements ``index`` (int64, any shape), broadcast against ``sample``."""
    return _at("normal", seed, index, sample, owner, purpose)


def normal_trusted(seed, n: int, *, sample, owner: int, purpose: int, device=None) -> torch.Tensor:
    """``normal`` without the data checks (no host read of ``sample``): for the reference's own arguments."""
    return _stream("normal", seed, n, sample, owner, purpose, 0, device, check=False)


def normal_at_trusted(seed, index: torch.Tensor, *, sample, owner: int, purpose: int) -> torch.Tensor:
    """``normal_at`` without the index range check (positions validated when they entered the layer)."""
    return _at("normal", seed, index, sample, owner, purpose, check=False)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__
