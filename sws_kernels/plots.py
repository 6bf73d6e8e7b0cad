"""Pictures (matplotlib, Agg backend, PNG): the codebook in (mu, rho) space, reliability diagrams, and the
benchmark chart. Each function writes one file and returns its path; none opens a window.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["plot_codebook", "codebook_points", "plot_reliability", "plot_bench", "read_bench_csv"]

# chi^2 with 2 degrees of freedom at 95%: the same threshold to_sws uses for ellipse weights (SPEC.md 8.4)
CHI2_95 = 5.991
MAX_POINTS = 15000  # scatter at most this many weights: the picture is the same and the PNG stays small


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install 'sws_kernels[demo]'") from e
    matplotlib.use("Agg")  # files only: works on headless machines and in CI
    import matplotlib.pyplot as plt

    return plt


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(x)


def codebook_points(sws_model: nn.Module, mean_field: Optional[nn.Module] = None, seed: int = 0):
    """Per weight of every SWS layer: (mu, rho, class) with class 0 inlier, 1 ellipse, 2 outlier.

    With ``mean_field`` (the model before ``to_sws``, same layer names) the points are the weights' own
    mean-field (mu, rho), as in the paper's figure. Without it, inliers have no (mu, rho) of their own any
    more: each is drawn from its component's Gaussian N(means[k], Sigma_k) (ellipse weights from their
    alpha-blend of two components' draws), outliers are their own (mu_o, rho_o). Returns
    ``(mu, rho, cls, codebook)`` as CPU tensors and the codebook module.
    """
    from .nn import SWS_LAYERS

    layers = [(n, m) for n, m in sws_model.named_modules() if isinstance(m, SWS_LAYERS)]
    if not layers:
        raise ValueError("model: expected a model with sws_kernels SWS layers (convert it with to_sws first)")
    cb = layers[0][1].codebook
    mf_mods = dict(mean_field.named_modules()) if mean_field is not None else {}
    g = torch.Generator().manual_seed(seed)
    means = cb.means.detach().cpu().float()
    chol = cb.chol.detach().cpu().float()
    L11, L21, L22 = _softplus(chol[:, 0]), chol[:, 1], _softplus(chol[:, 2])
    mus, rhos, classes = [], [], []
    for name, m in layers:
        n = m.labels.numel()
        cls = torch.zeros(n, dtype=torch.int8)
        e_pos = m.ellipse_pos.cpu()
        o_pos = m.outlier_pos.cpu()
        cls[e_pos] = 1
        cls[o_pos] = 2
        src = mf_mods.get(name)
        if src is not None and hasattr(src, "weight_mu") and src.weight_mu.numel() == n:
            mu = src.weight_mu.detach().reshape(-1).cpu().float()
            rho = src.weight_rho.detach().reshape(-1).cpu().float()
        else:
            lab = m.labels.reshape(-1).cpu().long()
            xi = torch.randn(n, 2, generator=g)
            mu = means[lab, 0] + L11[lab] * xi[:, 0]
            rho = means[lab, 1] + L21[lab] * xi[:, 0] + L22[lab] * xi[:, 1]
            if e_pos.numel():
                a, b = m.ellipse_a.cpu().long(), m.ellipse_b.cpu().long()
                al = m.ellipse_alpha.cpu().float()
                xb = torch.randn(e_pos.numel(), 2, generator=g)
                mu_b = means[b, 0] + L11[b] * xb[:, 0]
                rho_b = means[b, 1] + L21[b] * xb[:, 0] + L22[b] * xb[:, 1]
                mu[e_pos] = al * mu[e_pos] + (1 - al) * mu_b
                rho[e_pos] = al * rho[e_pos] + (1 - al) * rho_b
            if o_pos.numel():
                mu[o_pos] = m.outlier_mu.detach().cpu().float()
                rho[o_pos] = m.outlier_rho.detach().cpu().float()
        mus.append(mu)
        rhos.append(rho)
        classes.append(cls)
    return torch.cat(mus), torch.cat(rhos), torch.cat(classes), cb


def _ellipse_curves(means: torch.Tensor, chol: torch.Tensor, n: int = 48) -> torch.Tensor:
    """[K, n, 2] boundary of each component's 95% region: m + sqrt(chi2) L (cos t, sin t)."""
    t = torch.linspace(0, 2 * math.pi, n)
    u = torch.stack([t.cos(), t.sin()], -1)  # [n, 2]
    L11, L21, L22 = _softplus(chol[:, 0]), chol[:, 1], _softplus(chol[:, 2])
    r = math.sqrt(CHI2_95)
    x = means[:, None, 0] + r * L11[:, None] * u[None, :, 0]
    y = means[:, None, 1] + r * (L21[:, None] * u[None, :, 0] + L22[:, None] * u[None, :, 1])
    return torch.stack([x, y], -1)


def plot_codebook(sws_model: nn.Module, path, *, mean_field: Optional[nn.Module] = None, seed: int = 0,
                  title: Optional[str] = None) -> Path:
    """The codebook in (mu, rho) space: weights coloured inlier / ellipse / outlier, each component's 95% ellipse
    (solid: the current, trained codebook; dotted: its prior = the fit, when they differ)."""
    plt = _plt()
    from matplotlib.collections import LineCollection

    mu, rho, cls, cb = codebook_points(sws_model, mean_field, seed)
    g = torch.Generator().manual_seed(seed)
    if mu.numel() > MAX_POINTS:
        keep = torch.randperm(mu.numel(), generator=g)[:MAX_POINTS]
        # keep every outlier and ellipse weight: they are few and the point of the picture
        keep = torch.unique(torch.cat([keep, (cls > 0).nonzero().squeeze(1)]))
        mu, rho, cls = mu[keep], rho[keep], cls[keep]
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=100)
    # opaque colours: translucent overlapping points make every pixel a new colour and the PNG 3x larger
    styles = [(0, "inlier", "#a9bcdc", 3, 1.0), (1, "ellipse", "#dd8452", 7, 1.0), (2, "outlier", "#c44e52", 8, 1.0)]
    for c, label, color, size, alpha in styles:
        sel = cls == c
        if bool(sel.any()):
            ax.scatter(mu[sel].numpy(), rho[sel].numpy(), s=size, c=color, alpha=alpha, linewidths=0,
                       label=f"{label} ({int(sel.sum()):,})", rasterized=True)
    means = cb.means.detach().cpu().float()
    chol = cb.chol.detach().cpu().float()
    m0, c0 = cb.means0.detach().cpu().float(), cb.chol0.detach().cpu().float()
    if not (torch.equal(m0, means) and torch.equal(c0, chol)):
        ax.add_collection(LineCollection(_ellipse_curves(m0, c0).numpy(), colors="0.45", linewidths=0.6,
                                         linestyles=":", label="prior (the fit), 95%"))
    ax.add_collection(LineCollection(_ellipse_curves(means, chol).numpy(), colors="k", linewidths=0.7,
                                     label=f"{cb.num_components} components, 95%"))
    ax.scatter(means[:, 0].numpy(), means[:, 1].numpy(), s=6, c="k", marker="x", linewidths=0.6)
    # zoom on the bulk: far outliers would squash every ellipse into a dot
    lo_mu, hi_mu = torch.quantile(mu, 0.001).item(), torch.quantile(mu, 0.999).item()
    lo_r, hi_r = torch.quantile(rho, 0.001).item(), torch.quantile(rho, 0.999).item()
    pad_mu, pad_r = 0.08 * (hi_mu - lo_mu + 1e-6), 0.08 * (hi_r - lo_r + 1e-6)
    ax.set_xlim(lo_mu - pad_mu, hi_mu + pad_mu)
    ax.set_ylim(lo_r - pad_r, hi_r + pad_r)
    ax.set_xlabel("mu")
    ax.set_ylabel("rho  (sigma = softplus(rho))")
    src = "mean-field weights before conversion" if mean_field is not None else "weights drawn from their component"
    ax.set_title(title or f"SWS codebook: {cb.num_components} Gaussians over {cls.numel():,} shown weights ({src})",
                 fontsize=9)
    ax.legend(loc="best", fontsize=8, markerscale=2)
    fig.tight_layout()
    return _save(fig, plt, path)



def _save(fig, plt, path) -> Path:
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    try:  # a 256-colour palette: plots need no more, and the file is ~3x smaller (docs/ keeps PNGs < 200 KB)
        from PIL import Image

        buf.seek(0)
        Image.open(buf).convert("RGB").quantize(256).save(path, format="PNG", optimize=True)
    except ImportError:  # pillow ships with matplotlib; keep the full-colour PNG if it is somehow absent
        path.write_bytes(buf.getvalue())
    return path


def _reliability_bins(probs: torch.Tensor, target: torch.Tensor, n_bins: int):
    p = probs.mean(0) if probs.dim() == 3 else probs
    conf, pred = p.max(-1)
    correct = (pred == target).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = (torch.bucketize(conf, edges[1:-1], right=False)).clamp(0, n_bins - 1)  # bin b: (b/n, (b+1)/n]
    cnt = torch.bincount(idx, minlength=n_bins).float()
    acc = torch.bincount(idx, weights=correct, minlength=n_bins) / cnt.clamp_min(1)
    cf = torch.bincount(idx, weights=conf, minlength=n_bins) / cnt.clamp_min(1)
    return edges, cnt, acc, cf


def plot_reliability(results: Dict[str, Tuple[torch.Tensor, torch.Tensor]], path, n_bins: int = 15) -> Path:
    """One reliability diagram per model: accuracy vs confidence of the Bayesian model average.

    ``results``: {name: (probs [S, N, C] or [N, C], target [N])}. ECE (15 bins, as sws_kernels.metrics.ece)
    in each panel's title; grey bars along the bottom: how many inputs fall in each bin.
    """
    from . import metrics

    if not results:
        raise ValueError("results: expected at least one (probs, target) pair")
    plt = _plt()
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.6), dpi=110, squeeze=False)
    for ax, (name, (probs, target)) in zip(axes[0], results.items()):
        edges, cnt, acc, cf = _reliability_bins(probs, target, n_bins)
        w = 1.0 / n_bins
        nz = cnt > 0
        ax.bar(edges[:-1][nz].numpy(), acc[nz].numpy(), width=w, align="edge", color="#4c72b0",
               edgecolor="k", linewidth=0.4, alpha=0.8, label="accuracy")
        # how many inputs each bin holds (most sit in the top bin): a thin bar along the bottom
        ax.bar(edges[:-1].numpy(), (0.12 * cnt / cnt.max()).numpy(), width=w, align="edge", color="0.3",
               alpha=0.5, label="share of inputs")
        # the gap between accuracy and mean confidence, either way round (hatched, unfilled: it may lie inside
        # the accuracy bar when the model is under-confident)
        ax.bar(edges[:-1][nz].numpy(), (cf - acc).abs()[nz].numpy(), bottom=torch.minimum(cf, acc)[nz].numpy(),
               width=w, align="edge", fill=False, hatch="///", edgecolor="#c44e52", linewidth=0.6,
               label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        e = float(metrics.ece(probs, target, n_bins))
        ax.set_title(f"{name}\nECE = {e:.4f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max p)")
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)



# --------------------------------------------------------------------------------------------------
# benchmark chart
# --------------------------------------------------------------------------------------------------

BENCH_FIELDS = ["device", "op", "in_features", "out_features", "M", "S", "pass", "method", "backend",
                "median_ms", "min_ms", "iqr_ms", "rounds"]


def read_bench_csv(path) -> list:
    """Rows of a CSV written by ``sws-kernels bench --csv`` (numbers converted), validated."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in ("M", "S", "pass", "method", "median_ms") if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"csv: {str(path)!r} is not a `sws-kernels bench` CSV (missing columns {missing})")
        rows = []
        for r in reader:
            r = dict(r)
            for k in ("in_features", "out_features", "M", "S", "rounds"):
                if r.get(k) not in (None, ""):
                    r[k] = int(r[k])
            for k in ("median_ms", "min_ms", "iqr_ms"):
                if r.get(k) not in (None, ""):
                    r[k] = float(r[k])
            rows.append(r)
    if not rows:
        raise ValueError(f"csv: {str(path)!r} has no rows")
    return rows


BENCH_BASELINES = ("dense", "bt_mean_field", "mean_field", "reference")


def plot_bench(csv_path, path, *, method: str = "sws", baselines: Optional[Sequence[str]] = None) -> Path:
    """Speed-up of ``method`` against each baseline (median time ratio), by M (one line each) and S (x axis);
    one row of panels per pass (forward, forward+backward). > 1 means the fused SWS layer is faster.
    ``baselines`` default: every other method the CSV holds (``bench --methods sws,reference`` plots one panel)."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = read_bench_csv(csv_path)
    passes = sorted({r["pass"] for r in rows}, key=lambda p: (p != "forward", p))
    present = {r["method"] for r in rows}
    if method not in present:
        raise ValueError(f"csv: no rows for method {method!r} (found {sorted(present)}); run bench with "
                         f"--methods including {method}")
    if baselines is None:
        baselines = [b for b in BENCH_BASELINES if b in present] + sorted(present - set(BENCH_BASELINES) - {method})
    bases = [b for b in baselines if b in present and b != method]
    if not bases:
        raise ValueError(f"csv: nothing to compare {method!r} with: the CSV holds only {sorted(present)}; run bench "
                         f"with --methods {method} and at least one of {','.join(BENCH_BASELINES)}")
    labels = {"dense": "dense (materialised W)", "bt_mean_field": "mean-field (bayesian-torch)",
              "mean_field": "mean-field (sws_kernels)", "reference": "SWS reference (PyTorch)"}
    fig, axes = plt.subplots(len(passes), len(bases), figsize=(4.2 * len(bases), 3.3 * len(passes) + 0.4), dpi=110,
                             squeeze=False)
    key = lambda r: (r.get("op"), r.get("in_features"), r.get("out_features"), r["M"], r["S"], r["pass"])  # noqa: E731
    t = {(key(r), r["method"]): r["median_ms"] for r in rows}
    for i, ps in enumerate(passes):
        for j, b in enumerate(bases):
            ax = axes[i][j]
            shapes = sorted({(k[0], k[1], k[2], k[3]) for (k, m) in t if m == method and k[5] == ps},
                            key=lambda s: (str(s[0]), s[1] or 0, s[2] or 0, s[3]))
            ratios = []
            for op, fi, fo, M in shapes:
                pts = sorted((k[4], t[(k, b)] / t[(k, method)]) for (k, m) in t
                             if m == method and k[:4] == (op, fi, fo, M) and k[5] == ps and (k, b) in t)
                ratios += [p[1] for p in pts]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"M={M}" + (
                        f" ({fi}->{fo})" if len({s[1:3] for s in shapes}) > 1 else ""))
            ax.axhline(1.0, color="k", linewidth=0.7, linestyle="--")
            ax.set_xscale("log", base=2)
            s_vals = sorted({k[4] for (k, m) in t if m == method and k[5] == ps})
            ax.set_xticks(s_vals, [str(v) for v in s_vals])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yscale("log")
            # Labels on 1-2-5 steps only, never on every minor tick (they piled up over wide ranges); a range
            # within two decades keeps the 2 and 5 labels so the data never sit between unlabelled ticks.
            fmt = FuncFormatter(lambda v, _: f"{v:g}x")  # "0.5x", "2x": not 5 x 10^-1
            ax.yaxis.set_major_locator(LogLocator(base=10, numticks=6))
            ax.yaxis.set_major_formatter(fmt)
            lo, hi = (min(ratios + [1.0]), max(ratios + [1.0]))
            if hi / lo <= 100:
                ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0), numticks=6))
                ax.yaxis.set_minor_formatter(fmt)
                ax.tick_params(axis="y", which="minor", labelsize=7)
            else:
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("S (Monte Carlo samples per call)")
            ax.set_ylabel(f"speed-up of {method}")
            ax.set_title(f"{ps}: vs {labels.get(b, b)}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(_bench_title(rows), fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def _bench_title(rows) -> str:
    """"sws-kernels bench: linear 128->128, K = 64, mode paper on <device>" (what was measured, from the CSV)."""
    def one(k):
        vals = sorted({str(r.get(k)) for r in rows if r.get(k) not in (None, "")})
        return ",".join(vals) if vals else None
    parts = []
    fi, fo = one("in_features"), one("out_features")
    if fi and fo:
        parts.append(f"{one('op') or 'linear'} {fi}->{fo}")
    if one("components"):
        parts.append(f"K = {one('components')}")
    if one("mode"):
        parts.append(f"mode {one('mode')}")
    dev = one("device")
    return "sws-kernels bench" + (": " + ", ".join(parts) if parts else "") + (f" on {dev}" if dev else "")
