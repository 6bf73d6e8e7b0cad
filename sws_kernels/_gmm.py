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
