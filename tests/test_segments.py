"""sws_kernels/_segments.py: the one label-sorted index builder of the GPU backwards, and its per-layer cache."""
from __future__ import annotations

import math

import torch
import pytest
from torch.utils._python_dispatch import TorchDispatchMode

import sws_kernels
from sws_kernels import _segments, functional as F, reference
from sws_kernels.triton import reconstruct as T


def _layer(g, K, n, E, O, label_dtype=torch.int16):
    labels = torch.randint(0, K, (n,), generator=g).to(label_dtype)
    perm = torch.randperm(n, generator=g)
    e_pos, o_pos = perm[:E].clone(), perm[E:E + O].clone()
    e_a = torch.randint(0, K, (E,), generator=g)
    e_b = torch.randint(0, K, (E,), generator=g)
    e_alpha = torch.rand(E, generator=g)
    return labels, e_pos, e_a, e_b, e_alpha, o_pos


def _old_csr(labels, e_pos, e_a, e_b, e_alpha, o_pos, K):
    """The index as the three former builders made it (nonzero + bincount: host syncs), for comparison."""
    n = labels.numel()
    keep = torch.ones(n, dtype=torch.bool)
    keep[e_pos] = False
    keep[o_pos] = False
    inl = keep.nonzero().reshape(-1)
    comp = torch.cat([labels.reshape(-1)[inl].long(), e_a, e_b])
    pos = torch.cat([inl, e_pos, e_pos])
    coef = torch.cat([torch.ones(inl.numel()), e_alpha, 1.0 - e_alpha])
    order = torch.sort(comp, stable=True).indices
    offsets = torch.zeros(K + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(comp, minlength=K), 0)
    return offsets, pos[order], coef[order]


@pytest.mark.parametrize("K,n,E,O", [(1, 1, 0, 0), (7, 50, 5, 3), (40, 333, 0, 9), (300, 2000, 60, 0), (5, 9, 4, 5)])
def test_index_matches_the_former_builders(rng, K, n, E, O):
    t = _layer(rng, K, n, E, O)
    idx = _segments.build(*t, K)
    off, pos, coef = _old_csr(*t, K)
    assert torch.equal(idx.offsets, off)
    N = int(off[-1])
    assert torch.equal(idx.pos[:N], pos) and torch.equal(idx.coef[:N], coef)
    assert idx.pos.dtype == torch.int64 and idx.coef.dtype == torch.float32 and idx.offsets.dtype == torch.int64


@pytest.mark.parametrize("chunk,block_k", [(4, 16), (64, 1024), (1, 3)])
def test_pieces_match_the_former_triton_segments(rng, chunk, block_k):
    K = 37
    t = _layer(rng, K, 500, 20, 7)
    p = _segments.build(*t, K).pieces(chunk, block_k)
    off, _, _ = _old_csr(*t, K)
    counts = off[1:] - off[:-1]
    npieces = (counts + chunk - 1) // chunk
    real = int(npieces.sum())
    piece_comp = torch.repeat_interleave(torch.arange(K), npieces)
    piece_off = torch.cumsum(npieces, 0) - npieces
    rank = torch.arange(real) - piece_off[piece_comp]
    assert p.P >= real
    assert torch.equal(p.piece_start[:real], off[:-1][piece_comp] + rank * chunk)
    assert torch.equal(p.piece_len[:real], torch.minimum(counts[piece_comp] - rank * chunk,
                                                         torch.full_like(rank, chunk)).to(torch.int32))
    assert not p.piece_len[real:].any()  # padding pieces are empty
    assert torch.equal(p.piece_off, piece_off) and torch.equal(p.npieces, npieces.to(torch.int32))
    pad = (-K) % block_k
    want_max = torch.nn.functional.pad(npieces.to(torch.int32), (0, pad)).view(-1, block_k).amax(1)
    assert torch.equal(p.block_max, want_max)
    assert p.piece_len.dtype == torch.int32 and p.block_max.dtype == torch.int32


def test_cache_hit_and_invalidation(rng):
    K = 9
    labels, e_pos, e_a, e_b, e_alpha, o_pos = t = _layer(rng, K, 120, 6, 4)
    _segments.clear()
    first = _segments.label_index(*t, K)
    assert _segments.label_index(*t, K) is first  # unchanged tensors: the cached object
    assert first.pieces(4, 16) is _segments.pieces(*t, K, 4, 16)
    assert _segments.stats()["cached"] >= 1

    labels[3] = (int(labels[3]) + 1) % K  # an in-place label edit bumps _version: rebuilt
    second = _segments.label_index(*t, K)
    assert second is not first
    fresh = _segments.build(*t, K)
    for a, b in ((second.offsets, fresh.offsets), (second.pos, fresh.pos), (second.coef, fresh.coef)):
        assert torch.equal(a, b)
    assert _segments.label_index(*t, K) is second

    # every other input invalidates it too: in-place edits, and a different tensor with equal values
    for i, edit in enumerate([lambda: e_pos.copy_(e_pos.flip(0)), lambda: e_a.add_(0), lambda: e_b.mul_(1),
                              lambda: e_alpha.mul_(0.5), lambda: o_pos.copy_(o_pos.flip(0))]):
        before = _segments.label_index(*t, K)
        edit()
        after = _segments.label_index(*t, K)
        assert after is not before, i
        assert torch.equal(after.pos, _segments.build(*t, K).pos), i
    before = _segments.label_index(*t, K)
    assert _segments.label_index(labels, e_pos.clone(), e_a, e_b, e_alpha, o_pos, K) is not before
    assert _segments.label_index(*t, K + 1) is not _segments.label_index(*t, K)


def test_empty_specials_match_any_empty_tensor(rng):
    # No ellipses/outliers: the functional API makes fresh empty tensors per call; they carry no values.
    K = 5
    labels = torch.randint(0, K, (64,), generator=rng).to(torch.uint8)

    def empties():
        z = torch.zeros(0, dtype=torch.int64)
        return z, z.clone(), z.clone(), torch.zeros(0), z.clone()

    a = _segments.label_index(labels, *empties(), K)
    assert _segments.label_index(labels, *empties(), K) is a


def test_cache_does_not_keep_tensors_alive(rng):
    import gc
    import weakref

    t = _layer(rng, 4, 30, 2, 1)
    _segments.clear()
    _segments.label_index(*t, 4)
    ref = weakref.ref(t[0])
    assert _segments.stats()["cached"] == 1
    del t
    gc.collect()
    assert ref() is None and _segments.stats()["cached"] == 0


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_build_has_no_host_sync_ops(rng):
    t = _layer(rng, 11, 200, 7, 3)
    with _CountOps() as ops:
        _segments.build(*t, 11).pieces(4, 16)
    syncs = [n for n in ops.names if any(s in n for s in ("nonzero", "_local_scalar_dense", "unique", "bincount",
                                                          "repeat_interleave", "masked_select", "item"))]
    assert not syncs, syncs


def test_inference_tensors_are_built_uncached(rng):
    with torch.inference_mode():
        t = _layer(rng, 4, 30, 2, 1)
    a = _segments.label_index(*t, 4)
    assert _segments.label_index(*t, 4) is not a
    assert torch.equal(a.pos, _segments.build(*t, 4).pos)


@pytest.mark.parametrize("mode", ["paper", "hierarchical"])
def test_triton_backward_steady_state_builds_once(rng, monkeypatch, mode):
    # A training loop on the Triton backend: the index is built on the first backward only, and the gradients
    # equal those of an explicitly built (uncached) Segments and of the reference.
    monkeypatch.setattr(T, "BLOCK_K", 16)
    monkeypatch.setattr(T, "CHUNK", 4)
    K = 6
    labels, e_pos, e_a, e_b, e_alpha, o_pos = _layer(rng, K, 60, 4, 3)
    labels = labels.view(6, 10)
    means = torch.stack([torch.randn(K, generator=rng) * 0.1, torch.randn(K, generator=rng) - 3], -1)
    chol = torch.randn(K, 3, generator=rng)
    o_mu, o_rho = torch.randn(3, generator=rng), torch.randn(3, generator=rng) - 2
    means.requires_grad_(True)
    chol.requires_grad_(True)
    ell, out = (e_pos, e_a, e_b, e_alpha), (o_pos, o_mu, o_rho)
    _segments.clear()
    builds = _segments.stats()["builds"]
    grads = []
    with sws_kernels.backend("triton"):
        for step in range(3):
            w = F.reconstruct(means, chol, labels, ell, out, seed=5, samples=2, mode=mode, owner=1, codebook_owner=2)
            grads.append(torch.autograd.grad((w * w).sum(), (means, chol)))
    assert _segments.stats()["builds"] - builds == 1
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0]))
    # the uncached path gives the same bits
    gw = 2 * w.detach()
    m = {"paper": T.PAPER, "hierarchical": T.HIER}[mode]
    args = (gw, means.detach(), chol.detach(), labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho,
            5, 2, m, 1, 2)
    explicit = T.reconstruct_backward(*args, segments=T.Segments(labels, e_pos, e_a, e_b, e_alpha, o_pos, K, 4))
    assert torch.equal(explicit[0], grads[0][0]) and torch.equal(explicit[1], grads[0][1])
    ref = reference.reconstruct_backward(gw.double(), means.detach().double(), chol.detach().double(), labels,
                                         (e_pos, e_a, e_b, e_alpha.double()), (o_pos, o_mu.double(), o_rho.double()),
                                         seed=5, samples=2, mode=mode, owner=1, codebook_owner=2)
    atol = 2e-5 * math.sqrt(2 * labels.numel() / K + 2)  # test_triton_reconstruct's bound for these sums
    torch.testing.assert_close(grads[0][0].double(), ref[0], rtol=1e-5, atol=atol)
    torch.testing.assert_close(grads[0][1].double(), ref[1], rtol=1e-5, atol=atol)
