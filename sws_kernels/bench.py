"""``sws-kernels bench``: the linear-layer microbenchmark on whatever device is present.

For an ``in -> out`` linear layer, a batch of M inputs and S Monte Carlo weight samples per call, it times
(one process, same inputs, same device):

- ``dense``          S dense matmuls on already materialised weights ``W [S, out, in]`` (the floor: what the
                     layer costs when the weights are free; forward+backward also computes dW);
- ``bt_mean_field``  a bayesian-torch-style mean-field layer: fp32 mu/rho, per sample ``torch.randn_like`` +
                     softplus + mul-add, then F.linear (bayesian-torch's own forward, S times);
- ``mean_field``     sws_kernels' mean-field linear (seeded Philox noise, S samples per call, auto backend);
- ``reference``      the SWS layer on the pure-PyTorch reference backend (the SPEC's executable form);
- ``sws``            the SWS layer on the auto-selected backend (native C++ on CPU, Triton/CUDA on a GPU).

CPU statistics follow pytest-benchmark: after a warm-up call, rounds are timed one by one with
``time.perf_counter`` until ``min_time`` seconds have passed (at least ``min_rounds``), and min / median /
inter-quartile range are reported. On a GPU ``triton.testing.do_bench`` (CUDA events, L2 flushed between
runs) gives the same quantiles. Times are milliseconds per call.
"""
from __future__ import annotations

import csv
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as TF

METHODS = ("dense", "bt_mean_field", "mean_field", "reference", "sws")
PASSES = ("forward", "forward+backward")
FIELDS = ["device", "op", "in_features", "out_features", "components", "mode", "threads", "M", "S", "pass", "method",
          "backend", "median_ms", "min_ms", "iqr_ms", "rounds"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU {platform.machine()} ({n} thread{'s' if n > 1 else ''})"


def _layer(in_f: int, out_f: int, K: int, device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A trained-looking SWS layer and its mean-field counterpart: K components spread over typical (mu, rho),
    0.1% ellipse and 1% outlier weights (the proportions to_sws produces on ResNets), fp32 mean-field mu/rho."""
    from .nn import label_dtype

    g = torch.Generator().manual_seed(seed)
    n = in_f * out_f
    bound = 1 / math.sqrt(in_f)
    means = torch.stack([torch.linspace(-bound, bound, K), -5 + 2 * torch.rand(K, generator=g)], -1)
    chol = torch.tensor([-6.0, 0.0, -3.0]).repeat(K, 1)
    labels = torch.randint(0, K, (out_f, in_f), generator=g).to(label_dtype(K))
    pos = torch.randperm(n, generator=g)[: n // 1000 + n // 100]
    E = n // 1000
    ellipse = (pos[:E], torch.randint(0, K, (E,), generator=g), torch.randint(0, K, (E,), generator=g),
               torch.rand(E, generator=g))
    O = pos.numel() - E
    outliers = (pos[E:], torch.randn(O, generator=g) * 3 * bound, torch.full((O,), -4.0))
    mu = (torch.rand(out_f, in_f, generator=g) * 2 - 1) * bound
    rho = torch.full((out_f, in_f), -4.0) + 0.1 * torch.randn(out_f, in_f, generator=g)
    b = torch.zeros(out_f)
    t = dict(means=means, chol=chol, labels=labels, e_pos=ellipse[0], e_a=ellipse[1].to(labels.dtype),
             e_b=ellipse[2].to(labels.dtype), e_alpha=ellipse[3], o_pos=outliers[0], o_mu=outliers[1],
             o_rho=outliers[2], mu=mu, rho=rho, bias=b, bias_rho=torch.full((out_f,), -4.0))
    return {k: v.to(device) for k, v in t.items()}


def _make(method: str, L: Dict[str, torch.Tensor], x: torch.Tensor, S: int, mode: str, backward: bool) -> Callable:
    """A zero-argument callable running one call of ``method`` (and its backward when ``backward``)."""
    import sws_kernels as sws
    from . import functional as F

    def leaf(t):
        return t.detach().clone().requires_grad_(backward)

    if method == "dense":
        g = torch.Generator(device=x.device).manual_seed(1)
        Wt = leaf(torch.randn(S, L["mu"].shape[1], L["mu"].shape[0], device=x.device, generator=g) * 0.05)
        b = leaf(L["bias"])

        def run():
            return torch.matmul(x, Wt) + b  # [S, M, out]: S dense F.linear calls, batched
    elif method == "bt_mean_field":
        mu, rho, bmu, brho = leaf(L["mu"]), leaf(L["rho"]), leaf(L["bias"]), leaf(L["bias_rho"])

        def run():
            # bayesian-torch LinearReparameterization.forward, once per Monte Carlo sample
            outs = []
            for _ in range(S):
                w = mu + TF.softplus(rho) * torch.randn_like(mu)
                bb = bmu + TF.softplus(brho) * torch.randn_like(bmu)
                outs.append(TF.linear(x, w, bb))
            return torch.stack(outs)
    elif method == "mean_field":
        mu, rho, bmu, brho = leaf(L["mu"]), leaf(L["rho"]), leaf(L["bias"]), leaf(L["bias_rho"])

        def run():
            return F.mean_field_linear(x, mu, rho, bmu, brho, seed=7, samples=S)
    elif method in ("reference", "sws"):
        means, chol, o_mu, o_rho, b = leaf(L["means"]), leaf(L["chol"]), leaf(L["o_mu"]), leaf(L["o_rho"]), leaf(L["bias"])
        ellipse = (L["e_pos"], L["e_a"], L["e_b"], L["e_alpha"])
        be = "reference" if method == "reference" else "auto"

        def run():
            with sws.backend(be):
                return F.sws_linear(x, means, chol, L["labels"], ellipse, (L["o_pos"], o_mu, o_rho), b, seed=7,
                                    samples=S, mode=mode)
    else:
        raise ValueError(f"methods: expected names among {METHODS}, got {method!r}")

    if not backward:
        def fwd():
            with torch.no_grad():
                return run()
        return fwd

    def fwd_bwd():
        y = run()
        y.backward(torch.ones_like(y))
        return y
    return fwd_bwd


def _cpu_stats(fn: Callable, min_time: float, min_rounds: int, max_rounds: int):
    fn()  # warm-up (allocator, lazy init, kernel selection)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_rounds or (time.perf_counter() - start < min_time and len(times) < max_rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * times[0],
            "iqr_ms": 1e3 * (q[2] - q[0]), "rounds": len(times)}


def _gpu_stats(fn: Callable):
    from triton.testing import do_bench

    q0, q25, q50, q75 = do_bench(fn, warmup=25, rep=100, quantiles=[0.0, 0.25, 0.5, 0.75])
    return {"median_ms": q50, "min_ms": q0, "iqr_ms": q75 - q25, "rounds": ""}


def _backend_used(method: str, device: torch.device) -> str:
    """What ``auto`` resolves to on this device: the fused op's backend, or the reconstruct kernel's backend
    followed by a PyTorch matmul when no fused linear kernel exists there (as sws_kernels.functional does)."""
    from . import _backend

    if method in ("dense", "bt_mean_field"):
        return "torch"
    if method == "reference":
        return "reference"
    fused, unfused = (("sws_linear", "reconstruct") if method == "sws"
                      else ("mean_field_linear", "mean_field_reconstruct"))
    name = _backend.select(fused, device, torch.float32)[0]
    if name != "reference":
        return name
    name = _backend.select(unfused, device, torch.float32)[0]
    return name if name == "reference" else f"{name}+matmul"


def run_bench(*, in_features: int, out_features: int, Ms: Sequence[int], Ss: Sequence[int], components: int,
              mode: str = "paper", methods: Sequence[str] = METHODS, passes: Sequence[str] = PASSES,
              device: Optional[str] = None, min_time: float = 0.2, min_rounds: int = 5, max_rounds: int = 1000,
              progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Time every (M, S, pass, method); returns CSV-ready rows (see :data:`FIELDS`)."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    L = _layer(in_features, out_features, components, dev)
    rows = []
    dname = device_name(dev)
    for M in Ms:
        g = torch.Generator(device=dev).manual_seed(M)
        x = torch.randn(M, in_features, device=dev, generator=g)
        for S in Ss:
            for ps in passes:
                for method in methods:
                    fn = _make(method, L, x, S, mode, ps == "forward+backward")
                    try:
                        st = _gpu_stats(fn) if dev.type == "cuda" else _cpu_stats(fn, min_time, min_rounds, max_rounds)
                    except NotImplementedError as e:  # a backend without this op on this device: say so, go on
                        if progress:
                            progress(f"  {method} M={M} S={S} {ps}: skipped ({e})")
                        continue
                    row = {"device": dname, "op": "linear", "in_features": in_features, "out_features": out_features,
                           "components": components, "mode": mode,
                           "threads": torch.get_num_threads() if dev.type == "cpu" else "", "M": M, "S": S, "pass": ps, "method": method, "backend": _backend_used(method, dev), **st}
                    rows.append(row)
                    if progress:
                        progress(f"  M={M:<5d} S={S:<3d} {ps:17s} {method:14s} {st['median_ms']:9.3f} ms")
    return rows


def format_table(rows: Sequence[Dict], method: str = "sws") -> str:
    """Markdown table: one line per (M, S, pass, method) with ``method``'s speed-up against it (> 1: faster)."""
    ref = {(r["M"], r["S"], r["pass"]): r["median_ms"] for r in rows if r["method"] == method}
    head = ["M", "S", "pass", "method", "backend", "median ms", "min ms", "IQR ms", "rounds", f"{method} speed-up"]
    lines = []
    for r in rows:
        t = ref.get((r["M"], r["S"], r["pass"]))
        su = f"{r['median_ms'] / t:.2f}x" if t else "-"
        lines.append([str(r["M"]), str(r["S"]), r["pass"], r["method"], r["backend"], f"{r['median_ms']:.3f}",
                      f"{r['min_ms']:.3f}", f"{r['iqr_ms']:.3f}", str(r["rounds"]), su])
    w = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda v: "| " + " | ".join(c.ljust(w[i]) if i in (2, 3, 4) else c.rjust(w[i]) for i, c in enumerate(v)) + " |"  # noqa: E731
    sep = "|" + "|".join(("-" * (w[i] + 2)) if i in (2, 3, 4) else ("-" * (w[i] + 1) + ":") for i in range(len(head))) + "|"
    return "\n".join([fmt(head), sep, *(fmt(l) for l in lines)])


def write_csv(rows: Iterable[Dict], path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in FIELDS})
    return path
