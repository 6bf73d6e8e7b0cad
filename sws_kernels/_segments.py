"""The label-sorted index of the reconstruct backward: one builder, cached per version of its inputs.

Both GPU backwards reduce dW per component over the same entries: every inlier position with coefficient 1
under its label, and every ellipse weight twice, (pos, alpha) under comp_a and (pos, 1 - alpha) under comp_b,
in a stable order (inliers by position, then ellipse entries in entry order), so their sums are deterministic.
The native CUDA backward (csrc/cuda/reconstruct.cu) reads it as a CSR, one segment per component
(``LabelIndex.offsets/pos/coef``); the Triton backward (triton/reconstruct.py) cuts each segment into pieces of
at most ``chunk`` entries (``LabelIndex.pieces``). The native CPU backward needs none: it streams the weights
in fixed chunks with a bitmask of the special positions (csrc/cpu/reconstruct.cpp), which beats a gather
through a sorted list on a CPU.

No host sync, so a build may run inside a CUDA-graph capture or a steady-state step without stalling the
device. Three choices make that so: every position takes part in the sort and the ellipse/outlier positions
are keyed K (sorted past the last component) instead of compacting the inliers with ``nonzero``; segment
bounds come from ``searchsorted`` on the sorted keys instead of ``bincount`` (whose output size needs the
labels' max); the Triton piece list is sized by an upper bound of its length computed from shapes (trailing
pieces are empty). Integer work only, so the index is the same on every run. Out-of-range labels land
before offsets[0] or after offsets[K] and are never read (a wrong gradient, never a wild read).

Cache: :func:`label_index` keeps one index per labels tensor (a weak, identity-keyed dictionary, so it dies
with the layer's labels buffer), valid while the labels and the ellipse positions/components/alpha and
outlier positions are the same tensor objects with the same ``_version``, storage address and size. An
in-place edit of any of them (``labels[3] = 1``, ``copy_``, an optimizer step on alpha), a ``.data``
replacement or a new tensor rebuilds it. Empty tensors (no ellipses, no outliers) carry no values, so any
empty tensor matches. A tensor without a version counter (an inference tensor) is never cached.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["LabelIndex", "Pieces", "build", "label_index", "pieces", "clear", "stats"]


class Pieces:
    """The Triton backward's view of a LabelIndex: each component's segment cut into pieces of <= ``chunk``
    entries (in segment order), so work is balanced whatever the label histogram.

    pos, coef            the index's entries (shared tensors)
    piece_start int64[P], piece_len int32[P]   first entry and length of piece p (0 for the padding pieces)
    piece_off int64[K], npieces int32[K]       component k owns pieces piece_off[k] .. + npieces[k]
    block_max int32[ceil(K / block_k)]         most pieces of any component of a block of block_k components
    P                    the number of pieces launched: an upper bound of the real count, from shapes only
    """

    __slots__ = ("pos", "coef", "piece_start", "piece_len", "piece_off", "npieces", "block_max", "P", "chunk",
                 "block_k")

    def __init__(self, index: "LabelIndex", chunk: int, block_k: int):
        chunk, block_k, K = int(chunk), int(block_k), index.K
        if chunk < 1 or block_k < 1:
            raise ValueError(f"chunk and block_k must be >= 1, got {chunk} and {block_k}")
        dev = index.offsets.device
        counts = index.offsets[1:] - index.offsets[:-1]
        npieces = (counts + chunk - 1) // chunk
        piece_end = torch.cumsum(npieces, 0)
        piece_off = piece_end - npieces
        # sum_k ceil(c_k / chunk) <= (sum_k c_k + K (chunk - 1)) / chunk, and sum_k c_k <= the entry count.
        P = (index.pos.numel() + K * (chunk - 1)) // chunk
        p = torch.arange(P, dtype=torch.int64, device=dev)
        comp = torch.searchsorted(piece_end, p, right=True)  # owner of piece p; K past the last real piece
        real = comp < K
        comp = comp.clamp_(max=K - 1)
        rank = p - piece_off[comp]
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        self.piece_start = torch.where(real, index.offsets[comp] + rank * chunk, zero).contiguous()
        self.piece_len = torch.where(real, torch.clamp(counts[comp] - rank * chunk, max=chunk),
                                     zero).to(torch.int32).contiguous()
        self.piece_off = piece_off.contiguous()
        self.npieces = npieces.to(torch.int32).contiguous()
        pad = (-K) % block_k
        self.block_max = torch.nn.functional.pad(self.npieces, (0, pad)).view(-1, block_k).amax(1).contiguous()
        self.pos, self.coef = index.pos, index.coef
        self.P, self.chunk, self.block_k = P, chunk, block_k


class LabelIndex:
    """Label-sorted CSR of the backward's entries: component k owns entries offsets[k] .. offsets[k+1] - 1.

    offsets int64[K+1], pos int64[N], coef float32[N] (N = n + 2E: the entries past offsets[K] are the
    ellipse/outlier positions themselves, never read). ``pieces(chunk, block_k)`` derives (and keeps) the
    Triton piece list.
    """

    __slots__ = ("offsets", "pos", "coef", "K", "_pieces", "__weakref__")

    def __init__(self, offsets: torch.Tensor, pos: torch.Tensor, coef: torch.Tensor, K: int):
        self.offsets, self.pos, self.coef, self.K = offsets, pos, coef, int(K)
        self._pieces: Dict[Tuple[int, int], Pieces] = {}

    def pieces(self, chunk: int, block_k: int) -> Pieces:
        key = (int(chunk), int(block_k))
        got = self._pieces.get(key)
        if got is None:
            got = self._pieces[key] = Pieces(self, *key)
        return got


_builds = 0  # how many indices were built (tests and bench_overhead read it through stats())
_hits = 0


def build(labels, e_pos, e_a, e_b, e_alpha, o_pos, K: int) -> LabelIndex:
    """The index of these tensors, uncached. labels any integer dtype and shape (flattened); e_pos, e_a, e_b
    and o_pos integer [E]/[E]/[E]/[O]; e_alpha floating [E]. Torch ops on labels' device, no host sync."""
    global _builds
    _builds += 1
    K = int(K)
    if K < 1:
        raise ValueError(f"K: expected >= 1 components, got {K}")
    dev = labels.device
    lab = labels.reshape(-1)
    n, E = lab.numel(), e_pos.numel()
    e_pos = e_pos.reshape(-1).to(torch.int64)
    key = torch.empty(n + 2 * E, dtype=torch.int64, device=dev)
    key[:n].copy_(lab)
    # Special positions sort past every component (key K) instead of being compacted away (nonzero syncs).
    if E:
        if n:  # clamped: an (unvalidated) position outside the weight never indexes outside key
            key[:n].index_fill_(0, e_pos.clamp(0, n - 1), K)
        key[n:n + E].copy_(e_a.reshape(-1))
        key[n + E:].copy_(e_b.reshape(-1))
    if o_pos.numel() and n:
        key[:n].index_fill_(0, o_pos.reshape(-1).to(torch.int64).clamp(0, n - 1), K)
    pos = torch.cat([torch.arange(n, dtype=torch.int64, device=dev), e_pos, e_pos])
    alpha = e_alpha.reshape(-1).to(torch.float32)
    coef = torch.cat([torch.ones(n, dtype=torch.float32, device=dev), alpha, 1.0 - alpha])
    skey, order = torch.sort(key, stable=True)
    offsets = torch.searchsorted(skey, torch.arange(K + 1, dtype=torch.int64, device=dev))
    return LabelIndex(offsets.contiguous(), pos[order].contiguous(), coef[order].contiguous(), K)


# labels tensor -> (refs of the other inputs, their state, K, index); one entry per labels tensor (per layer).
_cache = WeakIdKeyDictionary()


def _state(t: torch.Tensor):
    """What identifies a tensor's values without reading them; None for an empty tensor (no values)."""
    n = t.numel()
    return (t._version, t.data_ptr(), n) if n else None


def label_index(labels, e_pos, e_a, e_b, e_alpha, o_pos, K: int) -> LabelIndex:
    """:func:`build`, cached per labels tensor and invalidated when any input changes (see the module doc)."""
    global _hits
    others = (e_pos, e_a, e_b, e_alpha, o_pos)
    try:
        state = (_state(labels), *map(_state, others))
    except RuntimeError:  # inference tensors have no version counter: nothing to key a cache on
        return build(labels, e_pos, e_a, e_b, e_alpha, o_pos, K)
    entry = _cache.get(labels)
    if entry is not None:
        refs, old_state, old_K, index = entry
        if old_K == K and old_state == state and all(
                r is None or r() is t for r, t in zip(refs, others)):
            _hits += 1
            return index
    index = build(labels, e_pos, e_a, e_b, e_alpha, o_pos, K)
    refs = tuple(weakref.ref(t) if t.numel() else None for t in others)
    _cache[labels] = (refs, state, int(K), index)
    return index


def pieces(labels, e_pos, e_a, e_b, e_alpha, o_pos, K: int, chunk: int, block_k: int) -> Pieces:
    """The cached index's Triton piece list for (chunk, block_k)."""
    return label_index(labels, e_pos, e_a, e_b, e_alpha, o_pos, K).pieces(chunk, block_k)


def clear() -> None:
    """Drop every cached index (tests; or to free the memory: 12 bytes per weight per layer)."""
    _cache.clear()


def stats() -> Dict[str, int]:
    """{"builds": indices built, "hits": cache hits, "cached": layers holding one} since import."""
    return {"builds": _builds, "hits": _hits, "cached": len(_cache)}
