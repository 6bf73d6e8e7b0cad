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
_STATS: dict = {}  # diagnostics of the last assign_top2_grid call (mean candidates per cell)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
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
    """k-means++ seeding: K centres from x [n, 2], each drawn with probability proportional to D^2."""
    n = x.shape[0]
    idx = torch.empty(K, dtype=torch.int64)
    first = int(torch.randint(0, n, (1,), generator=generator))
    idx[0] = first
    d2 = ((x - x[first]) ** 2).sum(-1)
    for k in range(1, K):
        cdf = torch.cumsum(d2, 0)
        total = float(cdf[-1])
        if total <= 0:  # fewer distinct points than K: repeat points (EM then splits or keeps them)
            j = int(torch.randint(0, n, (1,), generator=generator))
        else:  # inverse-CDF draw: O(n) per centre (torch.multinomial re-normalises and was 30x slower)
            u = float(torch.rand((), generator=generator, dtype=torch.float64)) * total
            j = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype, device=cdf.device))), n - 1)
        idx[k] = j
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(-1))
    return x[idx.to(x.device)].clone()


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
    (l1 - l2 >= 0) and the squared Mahalanobis distance to the first. Returns (c1, c2, gap, maha)."""
    n, K = x.shape[0], means.shape[0]
    coefs = _coefs(means, S, torch.log(weights))
    P, _ = precision(S)
    c1 = torch.empty(n, dtype=torch.int64, device=x.device)
    c2 = torch.empty(n, dtype=torch.int64, device=x.device)
    gap = torch.empty(n, dtype=x.dtype, device=x.device)
    maha = torch.empty(n, dtype=x.dtype, device=x.device)
    steps = range(0, n, chunk)
    coefs32 = coefs.float()
    logw = torch.log(weights)
    _, logdet = precision(S)
    for i in _progress(steps, len(steps), "SWS assign", progress):
        xc = x[i:i + chunk]
        if K > 1:
            arg = (_features(xc).float() @ coefs32).topk(2, dim=1).indices
            a1, a2 = arg[:, 0], arg[:, 1]
        else:
            a1 = a2 = torch.zeros(xc.shape[0], dtype=torch.int64, device=x.device)

        def exact(k):  # float64 log w_k + log N(x | k) and the squared Mahalanobis distance
            d = xc - means[k]
            Pk = P[k]
            q = Pk[:, 0] * d[:, 0] ** 2 + 2 * Pk[:, 1] * d[:, 0] * d[:, 1] + Pk[:, 2] * d[:, 1] ** 2
            return logw[k] - 0.5 * (q + logdet[k]) - LOG_2PI, q
        l1, q1 = exact(a1)
        l2, q2 = exact(a2)
        swap = l2 > l1  # float32 near-ties: order the two by their exact values
        c1[i:i + chunk] = torch.where(swap, a2, a1)
        c2[i:i + chunk] = torch.where(swap, a1, a2)
        gap[i:i + chunk] = (l1 - l2).abs() if K > 1 else torch.full_like(l1, math.inf)
        maha[i:i + chunk] = torch.where(swap, q2, q1)
    return c1, c2, gap, maha


def _eig_range(P: torch.Tensor):
    """(lambda_min, lambda_max) of the 2x2 SPD matrices [[P11, P12], [P12, P22]]."""
    half_tr = 0.5 * (P[:, 0] + P[:, 2])
    r = torch.sqrt((0.5 * (P[:, 0] - P[:, 2])) ** 2 + P[:, 1] ** 2)
    return (half_tr - r).clamp_min(0), half_tr + r


def assign_top2_grid(x: torch.Tensor, weights, means, S, *, grid: int = 96, cell_batch: int = 256,
                     chunk: int = 16384, max_width: int = 64, progress: bool = False):
    """:func:`assign_top2` with exact candidate pruning on a 2D grid (same result, much less work).

    Points are binned on a grid with quantile edges (cells hold similar numbers of points). For a cell C
    and component k, with c_k = log w_k - log det(Sigma_k)/2 - log 2pi, the log score of any x in C lies in
    [c_k - lmax_k dmax^2 / 2, c_k - lmin_k dmin^2 / 2] (lmin/lmax: precision eigenvalues, dmin/dmax: the
    nearest/farthest Euclidean distance from m_k to C). A component whose upper bound is below the
    second-largest lower bound cannot be in any point's top two, so each cell scores only its candidates.
    """
    n, K = x.shape[0], means.shape[0]
    if K < 3 or n < 4 * grid * grid:
        return assign_top2(x, weights, means, S, progress=progress)
    dev, dt = x.device, x.dtype
    P, logdet = precision(S)
    lmin, lmax = _eig_range(P)
    const = torch.log(weights) - 0.5 * logdet - LOG_2PI
    coefs32 = _coefs(means, S, torch.log(weights)).float()
    qs = torch.linspace(0, 1, grid + 1, dtype=dt, device=dev)[1:-1]
    sub = x[torch.randperm(n, device=dev)[:min(n, 1 << 20)]]
    eu = torch.quantile(sub[:, 0], qs)
    ev = torch.quantile(sub[:, 1], qs)
    iu = torch.searchsorted(eu, x[:, 0].contiguous())
    iv = torch.searchsorted(ev, x[:, 1].contiguous())
    cell = iu * grid + iv
    counts = torch.bincount(cell, minlength=grid * grid)
    # cell boxes from the actual points they hold (tighter than the quantile edges, exact for those points)
    lo = torch.full((grid * grid, 2), math.inf, dtype=dt, device=dev)
    hi = torch.full((grid * grid, 2), -math.inf, dtype=dt, device=dev)
    lo.scatter_reduce_(0, cell[:, None].expand(-1, 2), x, "amin")
    hi.scatter_reduce_(0, cell[:, None].expand(-1, 2), x, "amax")
    nonempty = (counts > 0).nonzero().squeeze(1)
    # Candidate table: one row of component indices per cell, padded with a dummy component K that
    # always scores -1e30, so all points are scored in vectorised chunks (a Python loop over cells was
    # dominated by per-op overhead). Cells with more candidates than the table width go to brute force.
    cand_lists = []
    n_cand = torch.zeros(grid * grid, dtype=torch.int64, device=dev)
    for b in range(0, nonempty.numel(), cell_batch):
        cells = nonempty[b:b + cell_batch]
        blo, bhi = lo[cells][:, None, :], hi[cells][:, None, :]  # [C, 1, 2]
        m = means[None]
        dmin2 = ((blo - m).clamp_min(0) + (m - bhi).clamp_min(0)).pow(2).sum(-1)  # [C, K]
        dmax2 = torch.maximum((m - blo).abs(), (m - bhi).abs()).pow(2).sum(-1)
        ub = const - 0.5 * lmin * dmin2
        lb = const - 0.5 * lmax * dmax2
        t2 = lb.topk(2, dim=1).values[:, 1:2]
        cand = ub >= t2 - 1e-9
        n_cand[cells] = cand.sum(1)
        cand_lists.append((cells, cand))
    width = int(torch.quantile(n_cand[nonempty].double(), 0.98).ceil())
    width = max(2, min(width, max_width, K))
    table = torch.full((grid * grid, width), K, dtype=torch.int64, device=dev)
    for cells, cand in cand_lists:
        # candidates first (stable sort of "not a candidate"), then cut to the table width
        idx = torch.sort((~cand).to(torch.int8), dim=1, stable=True).indices[:, :width]
        ok = torch.gather(cand, 1, idx)
        table[cells] = torch.where(ok, idx, torch.full_like(idx, K))
    del cand_lists
    coefsT = torch.cat([coefs32, torch.zeros(6, 1, dtype=coefs32.dtype, device=dev)], 1).T.contiguous()
    coefsT[K, 5] = -1e30
    overflow = n_cand[cell] > width
    c1 = torch.empty(n, dtype=torch.int64, device=dev)
    c2 = torch.empty(n, dtype=torch.int64, device=dev)
    gap = torch.empty(n, dtype=dt, device=dev)
    maha = torch.empty(n, dtype=dt, device=dev)
    steps = range(0, n, chunk)
    for i in _progress(steps, len(steps), "SWS assign", progress):
        xc = x[i:i + chunk]
        tab = table[cell[i:i + chunk]]  # [c, width]
        f = _features(xc).float()
        sc = (coefsT[tab] * f[:, None, :]).sum(-1)  # [c, width]
        arg = sc.topk(2, dim=1).indices
        a1, a2 = tab.gather(1, arg[:, :1])[:, 0], tab.gather(1, arg[:, 1:])[:, 0]
        a2 = torch.where(a2 == K, a1, a2)  # a cell with a single real candidate (cannot happen for K >= 2)
        r1, r2, g, q = _refine(xc, a1, a2, means, P, logdet, weights)
        c1[i:i + chunk], c2[i:i + chunk], gap[i:i + chunk], maha[i:i + chunk] = r1, r2, g, q
    if bool(overflow.any()):
        o = overflow.nonzero().squeeze(1)
        r = assign_top2(x[o], weights, means, S)
        c1[o], c2[o], gap[o], maha[o] = r
    _STATS.update(mean_candidates=float(n_cand[nonempty].double().mean()), width=width,
                  overflow_points=int(overflow.sum()))
    return c1, c2, gap, maha


def _small_scores(f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """f @ c for f [n, 6] and a few columns c [6, k] as five fused multiply-adds: CPU GEMM dispatch for
    such small shapes measured ~30 ms a call here, the loop ~0.05 ms."""
    out = f[:, 5:6] * c[5]
    for i in range(5):
        out.addcmul_(f[:, i:i + 1], c[i])
    return out


def _refine(xc, a1, a2, means, P, logdet, weights):
    """Exact float64 scores of the two chosen components: ordered (c1, c2), gap l1 - l2, Mahalanobis to c1."""
    logw = torch.log(weights)

    def exact(k):
        d = xc - means[k]
        Pk = P[k]
        q = Pk[:, 0] * d[:, 0] ** 2 + 2 * Pk[:, 1] * d[:, 0] * d[:, 1] + Pk[:, 2] * d[:, 1] ** 2
        return logw[k] - 0.5 * (q + logdet[k]) - LOG_2PI, q
    l1, q1 = exact(a1)
    l2, q2 = exact(a2)
    swap = l2 > l1  # float32 near-ties: order the two by their exact values
    return torch.where(swap, a2, a1), torch.where(swap, a1, a2), (l1 - l2).abs(), torch.where(swap, q2, q1)


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
