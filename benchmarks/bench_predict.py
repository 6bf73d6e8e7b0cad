"""S Monte Carlo samples for the price of one pass: the label-histogram inference path on the CPU (issue 14).

Run: ``python benchmarks/bench_predict.py`` (one process; ``--quick`` for fewer rounds, ``--json FILE``,
``--plot docs/predict_cpu.png``: the README chart, needs matplotlib).

Layer: in = out = 4096, paper mode, 1% outliers, 0.1% ellipse weights; K = 256 (uint8 labels) and K = 4096 (int16).
Rows, all in this process, min over interleaved rounds (the machine is shared: the min is the least-disturbed run):
  hist      sws_kernels.functional.sws_linear under torch.no_grad with the histogram path forced on
            (native.sws_linear_histogram_cpu): one pass over the labels per input row for all S samples;
  fused     the fused small-M kernel (native.sws_linear_cpu, M <= 32): S passes over the labels;
  recon     native reconstruct of the S weights + torch.matmul (the large-M path);
  dense     one fp32 F.linear on a materialised [4096, 4096] weight (one deterministic pass);
  bt16      bayesian-torch 0.5 LinearReparameterization, S = 16 forwards of one input row (its only way to draw 16
            samples: a fresh Gaussian weight per call).
Floor: label bytes / measured copy bandwidth (torch copy_ of 256 MB: 2 x bytes moved / time), the bytes the
histogram path cannot avoid reading.
Goals (M = 1, S = 16): K = 256: hist <= 2x dense and >= 100x faster than bt16; K = 4096: hist <= 4x dense.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as TF

import sws_kernels as sws
from sws_kernels import _backend, native
from sws_kernels import functional as F

IN = OUT = 4096


def layer(K: int, ldt, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = OUT * IN
    means = torch.stack([torch.linspace(-0.2, 0.2, K), torch.full((K,), -4.0)], -1)
    chol = torch.tensor([-6.0, 0.0, -3.0]).repeat(K, 1)
    labels = torch.randint(0, K, (OUT, IN), generator=g).to(ldt)
    E, O = n // 1000, n // 100
    pos = torch.randperm(n, generator=g)[: E + O]
    ell = (pos[:E], torch.randint(0, K, (E,), generator=g), torch.randint(0, K, (E,), generator=g),
           torch.rand(E, generator=g))
    outl = (pos[E:], torch.randn(O, generator=g) * 0.3, torch.full((O,), -4.0))
    return means, chol, labels, ell, outl


CLOCK = time.perf_counter  # --clock cpu: time.process_time (one thread: the CPU time, robust to a loaded machine)


def timeit(fns: dict, rounds: int, budget_s: float) -> dict:
    """min ms per name over interleaved rounds (each fn once per round after a warm-up call; stops a name after
    its own time budget)."""
    best = {k: float("inf") for k in fns}
    spent = {k: 0.0 for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            if spent[k] > budget_s and best[k] < float("inf"):
                continue
            t = CLOCK()
            f()
            dt = CLOCK() - t
            spent[k] += dt
            best[k] = min(best[k], dt * 1e3)
    return best


def copy_bandwidth(rounds: int) -> float:
    a = torch.empty(64 << 20, dtype=torch.float32)  # 256 MB
    b = torch.empty_like(a)
    a.fill_(1.0)
    b.fill_(0.0)
    t = timeit({"copy": lambda: b.copy_(a)}, rounds, 2.0)["copy"]
    return 2 * a.numel() * 4 / (t * 1e-3)


class forced_histogram:
    """Force the histogram path (or forbid it) for the duration, whatever LIMITS say."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = dict(_backend.LIMITS)
        big = 1 << 30
        for k in ("cpu_histogram_max_m", "histogram_rows_per_sample", "histogram_rows_per_sample_scalar"):
            _backend.LIMITS[k] = _backend.LIMITS[k]._replace(value=big if self.on else 0)

    def __exit__(self, *exc):
        _backend.LIMITS.update(self.saved)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and cases")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--plot", help="write the README chart here (PNG; needs matplotlib)")
    ap.add_argument("--threads", type=int, help="torch and native threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (use with --threads 1 on a shared, loaded machine)")
    ap.add_argument("--goals-only", action="store_true", help="only the M = 1, S = 16 goal rows and bayesian-torch")
    ap.add_argument("--simd", choices=("best", "avx2", "scalar"), default="best",
                    help="cap the native vector code (SWS_SIMD): avx2 = the AVX2 histogram and 8-lane Philox on an "
                         "AVX-512 machine")
    ap.add_argument("--replot", help="only redraw --plot from a --json file of an earlier run")
    args = ap.parse_args()
    if args.replot:
        with open(args.replot) as fh:
            saved = json.load(fh)
        plot(args.plot, saved["rows"], saved["bt16_ms"], saved.get("setup", ""))
        return
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
        native.set_num_threads(args.threads)
    if not native.AVAILABLE_CPU:
        sys.exit(f"bench_predict.py: the native CPU module is needed: {native.CPU_REASON}")
    if args.simd != "best":
        os.environ["SWS_SIMD"] = args.simd
    native.set_simd(args.simd != "scalar")  # (re)reads SWS_SIMD
    rounds = 3 if args.quick else 7
    torch.manual_seed(0)
    bw = copy_bandwidth(rounds)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            avx512 = " avx512f " in f.read().replace("\n", " ")
    except OSError:
        avx512 = False
    isa = native.simd_level()
    if isa == "avx2" and avx512 and os.environ.get("SWS_SIMD", "best") not in ("avx2", "scalar"):
        isa = "avx512"  # the native code runs its AVX-512 versions where the CPU has them (vecmath.h simd_isa)
    print(f"# {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), native "
          f"{native.max_threads()} OpenMP threads, simd {isa}; copy bandwidth {bw / 1e9:.1f} GB/s; "
          f"clock {args.clock}; load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = []
    Ms = (1, 2, 4, 16) if not args.quick else (1, 4)
    Ss = (1, 4, 16, 64) if not args.quick else (1, 16)
    if args.goals_only:
        Ms, Ss = (1,), (16,)
    for K, ldt in ((256, torch.uint8), (4096, torch.int16)):
        means, chol, labels, ell, outl = layer(K, ldt)
        esz = labels.element_size()
        floor = OUT * IN * esz / bw * 1e3
        w = torch.randn(OUT, IN) * 0.02
        e_t = (ell[0], ell[1], ell[2], ell[3])
        o_t = (outl[0], outl[1], outl[2])
        for M in Ms:
            x = torch.randn(M, IN)
            dense = timeit({"d": lambda: TF.linear(x, w)}, rounds, 1.0)["d"]
            for S in Ss:
                def hist():
                    with forced_histogram(True), torch.no_grad():
                        return F.sws_linear(x, means, chol, labels, ell, outl, seed=5, samples=S)

                def fused():
                    return native.sws_linear_cpu(x, means, chol, labels, *e_t, *o_t, None, 5, S, 0, 0, 0, False)

                def recon():
                    wr = native.reconstruct(means, chol, labels, *e_t, *o_t, 5, S, 0, 0, 0)
                    return torch.matmul(x, wr.transpose(1, 2))

                fns = {"hist": hist, "fused": fused, "recon": recon}
                if S * OUT * IN * 4 > (2 << 30):  # reconstruct would need > 2 GB
                    del fns["recon"]
                t = timeit(fns, rounds, 3.0)
                best_other = min(v for k, v in t.items() if k != "hist")
                r = dict(K=K, labels=str(ldt).removeprefix("torch."), M=M, S=S, hist_ms=t["hist"],
                         fused_ms=t.get("fused"), recon_ms=t.get("recon"), dense_ms=dense, floor_ms=floor,
                         x_dense=t["hist"] / dense, x_floor=t["hist"] / floor, pays=t["hist"] < best_other,
                         speedup_vs_best_other=best_other / t["hist"])
                rows.append(r)
                print(f"K={K:5d} {r['labels']:5s} M={M:2d} S={S:2d}: hist {t['hist']:8.2f} ms  fused "
                      f"{t.get('fused', float('nan')):8.2f}  recon {t.get('recon', float('nan')):8.2f}  dense "
                      f"{dense:6.2f}  floor {floor:5.2f}  hist/dense {r['x_dense']:5.2f}  "
                      f"{'pays' if r['pays'] else 'does not pay'} ({r['speedup_vs_best_other']:.2f}x)", flush=True)

    # bayesian-torch: 16 forwards of one row (S = 16 samples), the goal's baseline
    from bayesian_torch.layers import LinearReparameterization

    bt = LinearReparameterization(IN, OUT)
    x1 = torch.randn(1, IN)

    def bt16():
        with torch.no_grad():
            for _ in range(16):
                bt(x1, return_kl=False)

    t_bt = timeit({"bt": bt16}, max(2, rounds // 2), 5.0)["bt"]
    print(f"bayesian-torch LinearReparameterization, 16 forwards of M = 1: {t_bt:.1f} ms")

    def pick(K, M, S):
        return next(r for r in rows if r["K"] == K and r["M"] == M and r["S"] == S)

    print("\n## Goals (M = 1, S = 16)")
    g1, g2 = pick(256, 1, 16), pick(4096, 1, 16)
    goals = [
        ("K=256 uint8: hist <= 2x dense fp32 F.linear", g1["x_dense"], g1["x_dense"] <= 2),
        ("K=256 uint8: >= 100x faster than 16 bayesian-torch forwards", t_bt / g1["hist_ms"],
         t_bt / g1["hist_ms"] >= 100),
        ("K=4096 int16: hist <= 4x dense fp32 F.linear", g2["x_dense"], g2["x_dense"] <= 4),
    ]
    for name, v, ok in goals:
        print(f"- {name}: {v:.2f} -> {'MET' if ok else 'NOT MET'}")

    print("\n## Table (ms; min over rounds)")
    print("| K | labels | M | S | hist | fused | recon | dense | floor | hist/dense | hist/floor | best other/hist |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        print(f"| {r['K']} | {r['labels']} | {r['M']} | {r['S']} | {f(r['hist_ms'])} | {f(r['fused_ms'])} | "
              f"{f(r['recon_ms'])} | {f(r['dense_ms'])} | {f(r['floor_ms'])} | {r['x_dense']:.2f} | "
              f"{r['x_floor']:.1f} | {r['speedup_vs_best_other']:.2f} |")

    setup = (f"{cpu[:24]}, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"
             f"{', CPU time' if args.clock == 'cpu' else ''}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bandwidth_Bps": bw, "bt16_ms": t_bt, "setup": setup, "rows": rows}, fh, indent=1)
    if args.plot:
        plot(args.plot, rows, t_bt, setup)


def plot(path, rows, t_bt, setup):
    """The README chart: K = 256, M = 1, ms against S for the histogram path and what S samples cost otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    sel = [r for r in rows if r["K"] == 256 and r["M"] == 1]
    S_ = [r["S"] for r in sel]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(S_, [r["hist_ms"] for r in sel], "o-", label="SWS histogram path (all S samples)")
    ax.plot(S_, [r["fused_ms"] for r in sel], "s--", label="SWS fused kernel (S passes)")
    ax.plot(S_, [s * sel[0]["dense_ms"] for s in S_], "^:", label="S x dense fp32 F.linear")
    ax.plot(S_, [t_bt / 16 * s for s in S_], "v:", label="bayesian-torch, S forwards")
    ax.axhline(sel[0]["dense_ms"], color="gray", lw=1, label="one dense fp32 F.linear")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(S_, [str(s) for s in S_])
    ax.set_xlabel("Monte Carlo samples S")
    ax.set_ylabel("ms per prediction (M = 1)")
    ax.set_title(f"S samples for the price of one pass\n4096x4096 layer, K = 256, 1% outliers, {setup}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


if __name__ == "__main__":
    main()
