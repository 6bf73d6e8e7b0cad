"""Two-dimensional Gaussian mixtures for the SWS pipeline (SPEC.md section 8): k-means++, EM, assignment,
Mahalanobis test, Wasserstein-2 merging. Plain torch, CPU or GPU.

Speed: every (point, component) log-density is one small GEMM. For x = (u, v) and a component with mean m
and precision P, -2 log N = [u^2, 2uv, v^2, u, v, 1] . c_k with c_k = (P11, P12, P22, -2(Pm)_1, -2(Pm)_2,
m^T P m + log det Sigma + 2 log 2pi), so [n, 6] @ [6, K] gives all n*K quadratic forms at memory speed.
The expansion cancels when points sit far from a tight component; in the standardised space (values O(1))
with covariance jitter ``reg`` the float32 GEMM's error stays ~1e-3 in log-density, harmless for EM and for
picking the top two components, whose exact log-densities are then recomputed in float64 per point.
Points are processed in chunks so memory stays at chunk*K. The M-step is one GEMM too: features^T @ r.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

LOG_2PI = math.log(2 * math.pi)
_STATS: dict = {}  # diagnostics of the last assign_top2_grid call (candidates per cell, points scored)


def progress_enabled(progress) -> bool:
    """``progress`` True/False as given; None: bars only when stderr is a terminal (never in logs or CI)."""
    if progress is None:
        import sys
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def _progress(iterable, total: int, desc: str, enabled):
    if not progress_enabled(enabled):
        return iterable
    try:
        from tqdm.auto import tqdm
    except Exception:  # tqdm is optional: no bar without it
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def cov_from_moments(s2: torch.Tensor, counts: torch.Tensor, means: torch.Tensor, reg: float) -> torch.Tensor:
    """[K, 3] (S11, S12, S22) from second moments s2 = sum r x x^T ([K, 3]) with jitter on the diagonal."""
    c = counts.clamp_min(1e-12)[:, None]
    S = s2 / c - torch.stack([means[:, 0] ** 2, means[:, 0] * means[:, 1], means[:, 1] ** 2], -1)
    S[:, 0] = S[:, 0].clamp_min(0) + reg
    S[:, 2] = S[:, 2].clamp_min(0) + reg
    # keep positive definite: |S12| < sqrt(S11 S22)
    lim = torch.sqrt(S[:, 0] * S[:, 2]) * (1 - 1e-6)
    S[:, 1] = torch.maximum(torch.minimum(S[:, 1], lim), -lim)
    return S


def precision(S: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P as [K, 3] (P11, P12, P22), log det Sigma [K]) for [K, 3] covariances."""
    det = S[:, 0] * S[:, 2] - S[:, 1] ** 2
    P = torch.stack([S[:, 2], -S[:, 1], S[:, 0]], -1) / det[:, None]
    return P, torch.log(det)


def _coefs(means, S, log_w) -> torch.Tensor:
    """[6, K] so that features(x) @ coefs = log w_k + log N(x | m_k, S_k)."""
    P, logdet = precision(S)
    pm1 = P[:, 0] * means[:, 0] + P[:, 1] * means[:, 1]
    pm2 = P[:, 1] * means[:, 0] + P[:, 2] * means[:, 1]
    mpm = means[:, 0] * pm1 + means[:, 1] * pm2
    c = torch.stack([P[:, 0], 2 * P[:, 1], P[:, 2], -2 * pm1, -2 * pm2, mpm + logdet + 2 * LOG_2PI], 0)
    c = -0.5 * c
    c[5] = c[5] + log_w
    return c


def _features(x: torch.Tensor) -> torch.Tensor:
    u, v = x[:, 0], x[:, 1]
    return torch.stack([u * u, u * v, v * v, u, v, torch.ones_like(u)], -1)


def kmeans_pp(x: torch.Tensor, K: int, generator: torch.Generator, chunk: int = 1 << 16) -> torch.Tensor:
    """k-means++ seeding, batched: K centres from x [n, 2], drawn with probability proportional to D^2
    (the squared distance to the nearest centre chosen so far) in about log2(K) rounds instead of K steps.

    Round r draws as many new centres as there are already (1, 1, 2, 4, ...), without replacement and
    proportional to the current D^2 (Gumbel top-k: log D^2 + Gumbel noise, the largest keys win), then
    updates D^2 against the whole batch at once. Within a round the draws do not see each other, the only
    difference from sequential k-means++; a Python loop over K (one O(n) pass per centre) cost minutes at
    K = 4096. The uniforms come from ``generator`` (CPU), so CPU and GPU draw the same centres. Points with
    D^2 = 0 (already chosen, or duplicates) are drawn only when every other point is used up.
    """
    n = x.shape[0]
    dev = x.device
    first = int(torch.randint(0, n, (1,), generator=generator))
    chosen = [torch.tensor([first], device=dev)]
    d2 = ((x - x[first]) ** 2).sum(-1)
    have = 1
    while have < K:
        b = min(have, K - have)
        u = torch.rand(n, generator=generator, dtype=torch.float64).clamp_(1e-300, 1 - 1e-16).to(dev)
        gumbel = -torch.log(-torch.log(u))
        keys = torch.where(d2 > 0, torch.log(d2.clamp_min(1e-300)) + gumbel, gumbel - 1e4)
        new = keys.topk(b).indices
        chosen.append(new)
        c = x[new]
        for i in range(0, n, chunk):  # D^2 update against the whole batch, [chunk, b] at a time
            d2[i:i + chunk] = torch.minimum(d2[i:i + chunk], torch.cdist(x[i:i + chunk], c, compute_mode="donot_use_mm_for_euclid_dist")
                                         .pow(2).amin(1))
        have += b
    return x[torch.cat(chosen)].clone()


def fit_em(x: torch.Tensor, K: int, *, generator: torch.Generator, max_iter: int = 30, tol: float = 1e-4,
           reg: float = 1e-5, chunk: int = 8192, progress: bool = False,
           log: Optional[Callable[[str], None]] = None):
    """Full-covariance GMM on x [n, 2] (float64 recommended). Returns (weights [K], means [K, 2], cov [K, 3],
    info dict). Components that lose all mass keep their previous parameters (and get weight ~0)."""
    n = x.shape[0]
    K = min(K, n)
    means = kmeans_pp(x, K, generator)
    # hard assignment to the seeds gives initial covariances and weights
    counts = torch.zeros(K, dtype=x.dtype, device=x.device)
    s1 = torch.zeros(K, 2, dtype=x.dtype, device=x.device)
    s2 = torch.zeros(K, 3, dtype=x.dtype, device=x.device)
    for i in range(0, n, chunk):
        xc = x[i:i + chunk]
        lab = torch.cdist(xc, means).argmin(1)
        counts.index_add_(0, lab, torch.ones_like(lab, dtype=x.dtype))
        s1.index_add_(0, lab, xc)
        s2.index_add_(0, lab, torch.stack([xc[:, 0] ** 2, xc[:, 0] * xc[:, 1], xc[:, 1] ** 2], -1))
    global_var = x.var(0).mean()
    floor = float(global_var) / (4 * K) + reg  # a cluster of one point gets a small isotropic blob
    ok = counts > 1
    S = torch.empty(K, 3, dtype=x.dtype, device=x.device)
    S[:, 0] = floor
    S[:, 1] = 0
    S[:, 2] = floor
    if bool(ok.any()):
        mu_ok = s1[ok] / counts[ok, None]
        S[ok] = cov_from_moments(s2[ok], counts[ok], mu_ok, reg + floor * 1e-3)
        means[ok] = mu_ok
    weights = (counts + 1e-3) / (counts.sum() + 1e-3 * K)

    prev = -math.inf
    ll = prev
    it = 0
    converged = False
    for it in _progress(range(1, max_iter + 1), max_iter, "SWS EM", progress):
        coefs = _coefs(means, S, torch.log(weights)).float()
        stats = torch.zeros(6, K, dtype=torch.float64, device=x.device)
        ll = 0.0
        for i in range(0, n, chunk):
            f = _features(x[i:i + chunk]).float()
            lp = f @ coefs
            r = torch.softmax(lp, 1)
            # log-likelihood without a second exp pass: log p(x) = lp_j - log r_j at j = argmax
            ll += float((lp.amax(1) - torch.log(r.amax(1))).double().sum())
            stats += (f.T @ r).double()  # rows: sum r u^2, r uv, r v^2, r u, r v, r
        Nk, M1, M2 = stats[5], stats[3:5].T.contiguous(), stats[0:3].T.contiguous()
        ll /= n
        alive = Nk > 1e-8
        new_means = means.clone()
        new_means[alive] = M1[alive] / Nk[alive, None]
        S_new = S.clone()
        S_new[alive] = cov_from_moments(M2[alive], Nk[alive], new_means[alive], reg)
        means, S = new_means, S_new
        weights = (Nk + 1e-10) / (Nk.sum() + 1e-10 * K)
        if log:
            log(f"EM iteration {it}: mean log-likelihood {ll:.6f}")
        if abs(ll - prev) < tol:
            converged = True
            break
        prev = ll
    return weights, means, S, {"iterations": it, "log_likelihood": ll, "converged": converged}


def assign_top2(x: torch.Tensor, weights, means, S, *, chunk: int = 8192, progress: bool = False):
    """For every point: most and second-most responsible components, their log-responsibility gap
    (l1 - l2 >= 0) and the squared Mahalanobis distance to the first, scoring every component
    (:class:`Top2` without a grid). Returns (c1, c2, gap, maha)."""
    n = x.shape[0]
    t2 = Top2(weights, means, S)
    c1 = torch.empty(n, dtype=torch.int64, device=x.device)
    c2 = torch.empty(n, dtype=torch.int64, device=x.device)
    gap = torch.empty(n, dtype=x.dtype, device=x.device)
    maha = torch.empty(n, dtype=x.dtype, device=x.device)
    steps = range(0, n, chunk)
    for i in _progress(steps, len(steps), "SWS assign", progress):
        c1[i:i + chunk], c2[i:i + chunk], gap[i:i + chunk], maha[i:i + chunk] = t2(x[i:i + chunk])
    return c1, c2, gap, maha


def _eig_range(P: torch.Tensor):
    """(lambda_min, lambda_max) of the 2x2 SPD matrices [[P11, P12], [P12, P22]]."""
    half_tr = 0.5 * (P[:, 0] + P[:, 2])
    r = torch.sqrt((0.5 * (P[:, 0] - P[:, 2])) ** 2 + P[:, 1] ** 2)
    return (half_tr - r).clamp_min(0), half_tr + r


class GridIndex:
    """Cell index of 2-D points on a grid x grid layout whose edges are the quantiles of a sample (cells of
    similar occupancy), computed with a lookup table over ``grid * oversample`` uniform bins per coordinate
    (one multiply and one small gather per point instead of a binary search). A uniform bin that straddles a
    quantile edge sends all its points to one side: the cells are what this function says they are, and the
    pruning bounds use the boxes of the points each cell actually holds, so exactness does not depend on it."""

    def __init__(self, sample: torch.Tensor, grid: int, oversample: int = 64):
        self.grid = grid
        qs = torch.linspace(0, 1, grid + 1, dtype=sample.dtype, device=sample.device)[1:-1]
        B = grid * oversample
        self.lo, self.inv, self.luts = [], [], []
        for d in range(2):
            col = sample[:, d].contiguous()
            edges = torch.quantile(col, qs)
            a, b = float(col.min()), float(col.max())
            w = (b - a) / B if b > a else 1.0
            centers = a + (torch.arange(B, dtype=sample.dtype, device=sample.device) + 0.5) * w
            self.lo.append(a)
            self.inv.append(1.0 / w)
            self.luts.append(torch.searchsorted(edges, centers))
        self.B = B

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        iu = ((x[:, 0] - self.lo[0]) * self.inv[0]).clamp_(0, self.B - 1).long()
        iv = ((x[:, 1] - self.lo[1]) * self.inv[1]).clamp_(0, self.B - 1).long()
        return self.luts[0][iu] * self.grid + self.luts[1][iv]


def grid_boxes_update(lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor, cell: torch.Tensor) -> None:
    """Grow the per-cell bounding boxes lo/hi [cells, 2] by the points x [n, 2] in ``cell`` [n] (in place)."""
    idx = cell[:, None].expand(-1, 2)
    lo.scatter_reduce_(0, idx, x.to(lo.dtype), "amin")
    hi.scatter_reduce_(0, idx, x.to(hi.dtype), "amax")


def _quad_range(P: torch.Tensor, m: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Exact (min, max) over the box [lo, hi] of q(x) = (x - m)^T P (x - m), P SPD given as (P11, P12, P22).

    Broadcasts: P [..., 3], m [..., 2], lo/hi [..., 2]. q is convex: its maximum is at a corner; its minimum
    is 0 when m is in the box, else on an edge, where q is a 1-D quadratic minimised at a clamped point."""
    P11, P12, P22 = P[..., 0], P[..., 1], P[..., 2]
    ulo, uhi = lo[..., 0] - m[..., 0], hi[..., 0] - m[..., 0]
    vlo, vhi = lo[..., 1] - m[..., 1], hi[..., 1] - m[..., 1]

    def q(u, v):
        return P11 * u * u + 2 * P12 * u * v + P22 * v * v
    qmax = torch.maximum(torch.maximum(q(ulo, vlo), q(ulo, vhi)), torch.maximum(q(uhi, vlo), q(uhi, vhi)))
    qmin = None
    for u0 in (ulo, uhi):  # edges u = u0: v* = -P12 u0 / P22, clamped
        v = torch.minimum(torch.maximum(-P12 * u0 / P22, vlo), vhi)
        e = q(u0, v)
        qmin = e if qmin is None else torch.minimum(qmin, e)
    for v0 in (vlo, vhi):
        u = torch.minimum(torch.maximum(-P12 * v0 / P11, ulo), uhi)
        qmin = torch.minimum(qmin, q(u, v0))
    inside = (ulo <= 0) & (uhi >= 0) & (vlo <= 0) & (vhi >= 0)
    return torch.where(inside, torch.zeros_like(qmin), qmin), qmax


class Top2:
    """The two most responsible components of points, exactly, in chunks of bounded memory.

    ``Top2(weights, means, S)`` scores every component (one [c, 6] @ [6, K] float32 GEMM per chunk). With
    ``set_grid(index, lo, hi, coarse=4)`` (a :class:`GridIndex` and the bounding box of the points of every
    fine cell) it prunes instead. For a box B and component k, with c_k = log w_k - log det(Sigma_k)/2
    - log 2pi, every x in B scores within [c_k - qmax_k / 2, c_k - qmin_k / 2], qmin/qmax the exact extremes
    of the Mahalanobis form over B (:func:`_quad_range`); a component whose upper bound is below the
    second-largest lower bound cannot be in any point's top two there. Coarse cells (``coarse`` x ``coarse``
    fine cells) are pruned against every component, fine cells against their coarse cell's candidates. A
    point whose fine cell has exactly two candidates needs no scoring at all; the others score their cell's
    candidates (a row of the table, padded with a dummy component K scoring -1e30); cells with more
    candidates than the row width score every component. The two winners' log-densities are then computed
    exactly in float64 (which also orders float32 near-ties).

    ``__call__(x, cell=None)`` -> (c1, c2, gap = l1 - l2 >= 0, squared Mahalanobis distance to c1).
    """

    def __init__(self, weights, means, S):
        self.K = means.shape[0]
        self.means = means
        self.P, logdet = precision(S)
        self.const = torch.log(weights) - 0.5 * logdet - LOG_2PI
        # packed per-component parameters for the exact float64 refinement: m_u, m_v, P11, P12, P22, const
        self.packed = torch.cat([means, self.P, self.const[:, None]], 1).contiguous()
        self.coefs32 = _coefs(means, S, torch.log(weights)).float()
        self.table = None
        self.stats = {}

    def _bounds(self, cand, lo, hi):
        """(upper, lower) score bounds of components ``cand`` [C, W] (index K = padding) over boxes [C, 2]."""
        K = self.K
        safe = cand.clamp_max(K - 1)
        ub_q, lb_q = _quad_range(self.P[safe], self.means[safe], lo[:, None, :], hi[:, None, :])
        c = self.const[safe]
        pad = cand >= K
        ub = torch.where(pad, -math.inf, c - 0.5 * ub_q)
        lb = torch.where(pad, -math.inf, c - 0.5 * lb_q)
        return ub, lb

    def _prune(self, cand, lo, hi, width, chi2=None):
        """Candidates among ``cand`` [C, W] for boxes [C, 2]: (table [C, width] padded with K, counts [C],
        sure [C]): ``sure`` is the component that is every point's top one in the box and whose Mahalanobis
        form stays <= ``chi2`` over the box (so no point there is an ellipse weight), else -1."""
        ub, lb = self._bounds(cand, lo, hi)
        t2 = lb.topk(min(2, lb.shape[1]), dim=1).values[:, -1:]
        keep = (ub >= t2 - 1e-9) & (cand < self.K)
        n = keep.sum(1)
        sure = None
        if chi2 is not None:
            best_lb, kb = lb.max(1)
            others = ub.scatter(1, kb[:, None], -math.inf).amax(1)
            kk = torch.gather(cand, 1, kb[:, None])[:, 0]
            safe = kk.clamp_max(self.K - 1)
            _, qmax = _quad_range(self.P[safe], self.means[safe], lo, hi)
            ok = (best_lb > others + 1e-9) & (qmax <= chi2) & (kk < self.K)
            sure = torch.where(ok, kk, torch.full_like(kk, -1))
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        tab = torch.where(torch.gather(keep, 1, order), torch.gather(cand, 1, order), torch.full_like(order, self.K))
        if tab.shape[1] < width:
            tab = torch.cat([tab, torch.full((tab.shape[0], width - tab.shape[1]), self.K, dtype=tab.dtype,
                                             device=tab.device)], 1)
        return tab, n, sure

    def set_grid(self, index: "GridIndex", lo, hi, *, coarse: int = 4, cell_batch: int = 4096,
                 max_width: int = 32, chi2: Optional[float] = None) -> None:
        K, dev = self.K, self.means.device
        G = index.grid
        Gc = -(-G // coarse)
        lo, hi = lo.to(self.means.dtype), hi.to(self.means.dtype)
        nonempty = lo[:, 0] <= hi[:, 0]
        # coarse boxes: the union of their fine boxes
        fi = torch.arange(G * G, device=dev)
        parent = (fi // G // coarse) * Gc + (fi % G) // coarse
        clo = torch.full((Gc * Gc, 2), math.inf, dtype=lo.dtype, device=dev)
        chi = torch.full((Gc * Gc, 2), -math.inf, dtype=lo.dtype, device=dev)
        ne = nonempty.nonzero().squeeze(1)
        grid_boxes_update(clo, chi, lo[ne], parent[ne])
        grid_boxes_update(clo, chi, hi[ne], parent[ne])
        cne = (clo[:, 0] <= chi[:, 0]).nonzero().squeeze(1)
        all_k = torch.arange(K, device=dev)
        ctab_rows, cn = [], torch.zeros(Gc * Gc, dtype=torch.int64, device=dev)
        cb = max(1, (1 << 22) // max(K, 1))
        for b in range(0, cne.numel(), cb):
            cells = cne[b:b + cb]
            tab, n, _ = self._prune(all_k.expand(cells.numel(), K), clo[cells], chi[cells], K)
            cn[cells] = n
            ctab_rows.append((cells, tab))
        wc = max(2, int(cn.max()) if cne.numel() else 2)
        ctab = torch.full((Gc * Gc, wc), K, dtype=torch.int64, device=dev)
        for cells, tab in ctab_rows:
            ctab[cells] = tab[:, :wc]
        del ctab_rows
        # fine cells: prune their coarse cell's candidates
        n_cand = torch.zeros(G * G, dtype=torch.int64, device=dev)
        sure = torch.full((G * G,), -1, dtype=torch.int64, device=dev)
        rows = []
        fb = max(1, min(cell_batch, (1 << 22) // wc))
        for b in range(0, ne.numel(), fb):
            cells = ne[b:b + fb]
            tab, n, sr = self._prune(ctab[parent[cells]], lo[cells], hi[cells], min(wc, max_width), chi2)
            n_cand[cells] = n
            if sr is not None:
                sure[cells] = sr
            rows.append((cells, tab))
        width = max(2, min(max_width, K, int(n_cand.max()) if ne.numel() else 2))
        table = torch.full((G * G, width), K, dtype=torch.int64, device=dev)
        for cells, tab in rows:
            table[cells] = tab[:, :width]
        coefsT = torch.cat([self.coefs32, torch.zeros(6, 1, dtype=torch.float32, device=dev)], 1).T.contiguous()
        coefsT[K, 5] = -1e30
        self.table, self.coefsT, self.n_cand, self.width, self.sure = table, coefsT, n_cand, width, sure
        self.index = index
        self.stats = {"mean_candidates": float(n_cand[ne].double().mean()) if ne.numel() else 0.0,
                      "coarse_width": wc, "width": width, "fine_cells": G * G, "overflow_points": 0,
                      "scored_points": 0}

    def _brute(self, xc):
        if self.K == 1:
            z = torch.zeros(xc.shape[0], dtype=torch.int64, device=xc.device)
            return z, z
        arg = (_features(xc).float() @ self.coefs32).topk(2, dim=1).indices
        return arg[:, 0], arg[:, 1]

    def __call__(self, xc: torch.Tensor, cell: Optional[torch.Tensor] = None):
        if self.table is None or self.K < 3:
            a1, a2 = self._brute(xc)
        else:
            if cell is None:
                cell = self.index(xc)
            nc = self.n_cand[cell]
            a12 = self.table[cell, :2]
            a1, a2 = a12[:, 0], torch.where(a12[:, 1] == self.K, a12[:, 0], a12[:, 1])  # one candidate: a2 = a1
            lo_w = 2
            for w in (4, 8, self.width):  # score the points of cells with (lo_w, w] candidates, w columns
                if w <= lo_w:
                    continue
                sc_idx = ((nc > lo_w) & (nc <= w)).nonzero().squeeze(1)
                lo_w = w
                if not sc_idx.numel():
                    continue
                tab = self.table[cell[sc_idx], :w]  # [s, w]
                f = _features(xc[sc_idx]).float()
                sc = (self.coefsT[tab] * f[:, None, :]).sum(-1)
                arg = sc.topk(2, dim=1).indices
                a1[sc_idx] = tab.gather(1, arg[:, :1])[:, 0]
                a2[sc_idx] = tab.gather(1, arg[:, 1:])[:, 0]
                self.stats["scored_points"] += int(sc_idx.numel())
            over = (nc > self.width).nonzero().squeeze(1)
            if over.numel():
                b1, b2 = self._brute(xc[over])
                a1[over], a2[over] = b1, b2
                self.stats["overflow_points"] += int(over.numel())
        return self._refine(xc, a1, a2)

    def _refine(self, xc, a1, a2):
        """Exact float64 scores of the two chosen components: ordered (c1, c2), gap l1 - l2, Mahalanobis to c1."""
        def exact(k):
            p = self.packed[k]  # [c, 6]
            du, dv = xc[:, 0] - p[:, 0], xc[:, 1] - p[:, 1]
            q = p[:, 2] * du * du + 2 * p[:, 3] * du * dv + p[:, 4] * dv * dv
            return p[:, 5] - 0.5 * q, q
        l1, q1 = exact(a1)
        l2, q2 = exact(a2)
        swap = l2 > l1  # float32 near-ties: order the two by their exact values
        gap = (l1 - l2).abs()
        if self.K == 1:
            gap = torch.full_like(gap, math.inf)
        return torch.where(swap, a2, a1), torch.where(swap, a1, a2), gap, torch.where(swap, q2, q1)


def assign_top2_grid(x: torch.Tensor, weights, means, S, *, grid: int = 256, chunk: int = 1 << 15,
                     max_width: int = 32, progress: bool = False):
    """:func:`assign_top2` with exact candidate pruning on a 2D grid (same result, much less work): quantile
    edges from (a subsample of) x, cell boxes from the points themselves, then :class:`Top2`."""
    n, K = x.shape[0], means.shape[0]
    if K < 3 or n < 4 * grid * grid:
        return assign_top2(x, weights, means, S, progress=progress)
    dev, dt = x.device, x.dtype
    sub = x[torch.randperm(n, device=dev)[:min(n, 1 << 20)]]
    index = GridIndex(sub, grid)
    lo = torch.full((grid * grid, 2), math.inf, dtype=dt, device=dev)
    hi = torch.full((grid * grid, 2), -math.inf, dtype=dt, device=dev)
    cell = index(x)
    grid_boxes_update(lo, hi, x, cell)
    t2 = Top2(weights, means, S)
    t2.set_grid(index, lo, hi, max_width=max_width)
    c1 = torch.empty(n, dtype=torch.int64, device=dev)
    c2 = torch.empty(n, dtype=torch.int64, device=dev)
    gap = torch.empty(n, dtype=dt, device=dev)
    maha = torch.empty(n, dtype=dt, device=dev)
    steps = range(0, n, chunk)
    for i in _progress(steps, len(steps), "SWS assign", progress):
        c1[i:i + chunk], c2[i:i + chunk], gap[i:i + chunk], maha[i:i + chunk] = t2(x[i:i + chunk], cell[i:i + chunk])
    _STATS.clear()
    _STATS.update(t2.stats)
    return c1, c2, gap, maha


def w2_squared(means: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """[K, K] squared 2-Wasserstein distances between 2D Gaussians, closed form:
    |m1-m2|^2 + tr S1 + tr S2 - 2 sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)) (for 2x2 SPD A,
    tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)), with A = S2^1/2 S1 S2^1/2)."""
    dm = torch.cdist(means, means) ** 2
    tr = S[:, 0] + S[:, 2]
    det = (S[:, 0] * S[:, 2] - S[:, 1] ** 2).clamp_min(0)
    tr12 = S[:, None, 0] * S[None, :, 0] + 2 * S[:, None, 1] * S[None, :, 1] + S[:, None, 2] * S[None, :, 2]
    cross = torch.sqrt((tr12 + 2 * torch.sqrt(det[:, None] * det[None, :])).clamp_min(0))
    return (dm + tr[:, None] + tr[None, :] - 2 * cross).clamp_min(0)


def merge_w2(mass: torch.Tensor, means: torch.Tensor, S: torch.Tensor, tau_d: float, max_rounds: int = 10000):
    """Merge components whose squared W2 distance is below tau_d, to a fixed point.

    Each round merges every mutual-nearest pair under the threshold by moment matching (mass-weighted
    mean; covariance = weighted within + between spread), then recomputes distances. Returns
    (mass, means, S, mapping) with mapping[k_old] = k_new."""
    K = means.shape[0]
    mapping = torch.arange(K, device=means.device)
    rounds = 0
    while means.shape[0] > 1 and rounds < max_rounds:
        rounds += 1
        D = w2_squared(means, S)
        D.fill_diagonal_(math.inf)
        dmin, nn_ = D.min(1)
        k = torch.arange(means.shape[0], device=means.device)
        pair = (dmin < tau_d) & (nn_[nn_] == k) & (k < nn_)
        if not bool(pair.any()):
            break
        i, j = k[pair], nn_[pair]
        wi, wj = mass[i], mass[j]
        w = (wi + wj).clamp_min(1e-300)
        ai, aj = (wi / w)[:, None], (wj / w)[:, None]
        # zero-mass pairs: plain average
        zero = (wi + wj) <= 0
        ai[zero], aj[zero] = 0.5, 0.5
        m = ai * means[i] + aj * means[j]

        def outer(mm):
            return torch.stack([mm[:, 0] ** 2, mm[:, 0] * mm[:, 1], mm[:, 1] ** 2], -1)
        Snew = ai * (S[i] + outer(means[i])) + aj * (S[j] + outer(means[j])) - outer(m)
        means = means.clone()
        S = S.clone()
        mass = mass.clone()
        means[i], S[i], mass[i] = m, Snew, wi + wj
        keep = torch.ones(means.shape[0], dtype=torch.bool, device=means.device)
        keep[j] = False
        # old index -> index after this round
        remap = torch.arange(means.shape[0], device=means.device)
        remap[j] = i
        new_pos = torch.cumsum(keep.long(), 0) - 1
        mapping = new_pos[remap[mapping]]
        means, S, mass = means[keep], S[keep], mass[keep]
    return mass, means, S, mapping
