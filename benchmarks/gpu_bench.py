"""One-shot GPU benchmark of the Triton SWS / mean-field kernels against the baselines of issue 3.

Run on a GPU machine: ``python benchmarks/gpu_bench.py`` (writes $OUT/gpu_bench.csv and $OUT/gpu_bench_table.txt).
``--smoke`` runs every code path on tiny shapes (CPU + TRITON_INTERPRET=1 work too) to check the script itself.

Timing: triton.testing.do_bench (median ms) on CUDA; every baseline is rerun in this process on this card:
  dense     bf16 F.linear / F.conv2d on a materialised weight of the same shape (one sample);
  mf_bt     bayesian-torch-style mean-field sample: fp32 mu/rho, torch.randn, softplus, mul-add, F.linear (one sample);
  ref       the reference path (sws_kernels.reference, one call per sample).
Floors per row: memory = bytes that must move / measured device copy bandwidth; compute = FLOPs / measured bf16
matmul peak; floor = the larger. Ratios are per MC sample where the goal is stated per sample.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as Fnn

import sws_kernels
from sws_kernels import _backend
from sws_kernels import functional as F
from sws_kernels import reference as R

ROWS = []
LINES = []


def say(msg=""):
    print(msg, flush=True)
    LINES.append(msg)


def bench(fn, smoke):
    if smoke or not torch.cuda.is_available():
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def layer(out_f, in_f, K, dev, dtype_lab=torch.int16, seed=0):
    """An SWS layer with the issue's statistics: 1% outliers, 0.1% ellipse weights."""
    g = torch.Generator().manual_seed(seed)
    n = out_f * in_f
    means = torch.stack([torch.linspace(-0.2, 0.2, K), torch.full((K,), -4.0)], -1)
    chol = torch.tensor([-6.0, 0.0, -3.0]).repeat(K, 1)
    labels = torch.randint(0, K, (out_f, in_f), generator=g).to(dtype_lab)
    E, O = max(1, n // 1000), max(1, n // 100)
    pos = torch.randperm(n, generator=g)[: E + O]
    ell = (pos[:E], torch.randint(0, K, (E,), generator=g), torch.randint(0, K, (E,), generator=g),
           torch.rand(E, generator=g))
    outl = (pos[E:], torch.randn(O, generator=g) * 0.3, torch.full((O,), -4.0))
    mv = lambda t: t.to(dev)  # noqa: E731
    return mv(means), mv(chol), mv(labels), tuple(map(mv, ell)), tuple(map(mv, outl)), E, O


def measure_hw(dev, smoke):
    """(copy bandwidth bytes/s, bf16 matmul FLOP/s), measured here."""
    nbytes = (1 << 20) if smoke else (1 << 30)
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), smoke)
    bw = 2 * nbytes / (t * 1e-3)
    n = 64 if smoke else 8192
    dt = torch.float32 if dev.type == "cpu" else torch.bfloat16
    x = torch.randn(n, n, device=dev, dtype=dt)
    t = bench(lambda: x @ x, smoke)
    peak = 2 * n ** 3 / (t * 1e-3)
    del a, b, x
    return bw, peak


def add_row(**kw):
    ROWS.append(kw)


def fmt(v, p=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{p}g}"
    return str(v)


def run_linear_rows(dev, smoke, bw, peak, xdt):
    in_f = out_f = 64 if smoke else 4096
    K = 64 if smoke else 4096
    means, chol, labels, ell, outl, E, O = layer(out_f, in_f, K, dev)
    n = out_f * in_f
    esz = torch.tensor([], dtype=xdt).element_size()
    w_dense = R.reconstruct(means, chol, labels, ell, outl, seed=1).to(xdt)[0]
    mu = torch.randn(out_f, in_f, device=dev) * 0.1
    rho = torch.full((out_f, in_f), -4.0, device=dev)
    cases = [(1, 1), (16, 1), (128, 1), (4096, 1), (1, 8), (16, 8), (128, 8), (1, 32), (16, 32)]
    if smoke:
        cases = [(1, 1), (16, 3), (40, 2)]
    say(f"\n== linear forward, paper mode, in = out = {in_f}, K = {K}, {O} outliers, {E} ellipse, x {xdt} ==")
    for M, S in cases:
        x = torch.randn(M, in_f, device=dev, dtype=xdt)
        try:
            with sws_kernels.backend("triton"):
                auto = bench(lambda: F.sws_linear(x, means, chol, labels, ell, outl, seed=3, samples=S), smoke)
                old = _backend.LIMITS["triton_fused_max_m"]
                try:  # both paths at every M: the crossover that should become LIMITS["triton_fused_max_m"]
                    _backend.LIMITS["triton_fused_max_m"] = old._replace(value=1 << 30)
                    fused = bench(lambda: F.sws_linear(x, means, chol, labels, ell, outl, seed=3, samples=S), smoke)
                    _backend.LIMITS["triton_fused_max_m"] = old._replace(value=0)
                    recon = bench(lambda: F.sws_linear(x, means, chol, labels, ell, outl, seed=3, samples=S), smoke)
                finally:
                    _backend.LIMITS["triton_fused_max_m"] = old
            dense = bench(lambda: Fnn.linear(x, w_dense), smoke)

            def mf_bt():
                w = mu + Fnn.softplus(rho) * torch.randn_like(mu)
                return Fnn.linear(x.float(), w)

            mf = bench(mf_bt, smoke)
            ref = bench(lambda: R.sws_linear(x, means, chol, labels, ell, outl, seed=3, samples=1), smoke)
            # floor: labels (2 B) + specials (pos/comp/value ~16 B) + x + y for all S
            nbytes = 2 * n + 16 * (E + O) + M * in_f * esz + S * M * out_f * esz
            f_mem = nbytes / bw * 1e3
            f_fl = 2 * M * n * S / peak * 1e3
            floor = max(f_mem, f_fl)
            per = auto / S
            goal = None
            if S == 1 and M in (1, 16):
                goal = per <= 1.2 * dense and mf / per >= 10
            elif S == 1 and M == 4096:
                goal = per <= 1.25 * dense
            elif S == 32 and M == 16:
                goal = S * ref / auto >= 8
            add_row(bench="linear_fwd", mode="paper", M=M, S=S, ours_ms=auto, fused_ms=fused, recon_ms=recon,
                    per_sample_ms=per, dense_ms=dense, ratio_dense=per / dense, mf_bt_ms=mf, speedup_mf=mf / per,
                    ref_ms=ref, speedup_ref=S * ref / auto, floor_ms=floor,
                    floor_kind="mem" if f_mem >= f_fl else "flops", vs_floor=auto / floor, goal=goal)
        except Exception as e:  # keep benchmarking the other rows
            say(f"linear M={M} S={S}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()


def run_other_modes(dev, smoke, bw, peak, xdt):
    in_f = out_f = 64 if smoke else 4096
    K = 64 if smoke else 4096
    means, chol, labels, ell, outl, E, O = layer(out_f, in_f, K, dev)
    n = out_f * in_f
    w_dense = R.reconstruct(means, chol, labels, ell, outl, seed=1).to(xdt)[0]
    mu = torch.randn(out_f, in_f, device=dev) * 0.1
    rho = torch.full((out_f, in_f), -4.0, device=dev)
    esz = torch.tensor([], dtype=xdt).element_size()
    say("\n== hierarchical SWS and fused mean-field linear (per-weight Philox in the GEMM) ==")
    for M, S in ([(16, 1), (16, 8)] if not smoke else [(16, 2)]):
        x = torch.randn(M, in_f, device=dev, dtype=xdt)
        dense = bench(lambda: Fnn.linear(x, w_dense), smoke)

        def mf_bt():
            w = mu + Fnn.softplus(rho) * torch.randn_like(mu)
            return Fnn.linear(x.float(), w)

        mf = bench(mf_bt, smoke)
        for name, fn, nbytes in (
            ("hierarchical", lambda: F.sws_linear(x, means, chol, labels, ell, outl, seed=3, samples=S,
                                                  mode="hierarchical"), 2 * n),
            ("mean_field", lambda: F.mean_field_linear(x, mu, rho, seed=3, samples=S), 8 * n),
        ):
            try:
                with sws_kernels.backend("triton"):
                    t = bench(fn, smoke)
                nbytes += M * in_f * esz + S * M * out_f * esz
                floor = max(nbytes / bw, 2 * M * n * S / peak) * 1e3
                add_row(bench="linear_fwd", mode=name, M=M, S=S, ours_ms=t, per_sample_ms=t / S, dense_ms=dense,
                        ratio_dense=t / S / dense, mf_bt_ms=mf, speedup_mf=mf / (t / S), floor_ms=floor,
                        vs_floor=t / floor, normals_per_s=n * S / (t * 1e-3))
            except Exception as e:
                say(f"{name} M={M} S={S}: FAILED {type(e).__name__}: {e}")
                traceback.print_exc()
    # Philox throughput alone: mean-field reconstruct writes S x n floats and reads mu, rho.
    try:
        S = 1 if smoke else 4
        with sws_kernels.backend("triton"):
            t = bench(lambda: F.mean_field_reconstruct(mu, rho, seed=3, samples=S), smoke)
        floor = (8 * n + 4 * S * n) / bw * 1e3
        props = torch.cuda.get_device_properties(0) if dev.type == "cuda" else None
        sms = props.multi_processor_count if props else 1
        # Philox4x32-10 ~ 10 rounds x (2 mulhi + 2 mul + 4 xor + 2 key adds) ~ 100 int ops per 4 normals, + the
        # counter setup and Box-Muller's float work: ~30 int32 ops per normal. Assumed 64 int32 lanes/SM/clock.
        clock = 1.755e9
        int_ops = sms * 64 * clock
        add_row(bench="philox_mf_reconstruct", mode="mean_field", M=0, S=S, ours_ms=t, floor_ms=floor,
                vs_floor=t / floor, normals_per_s=n * S / (t * 1e-3),
                note=f"int32 bound ~{int_ops / 30:.3g} normals/s ({sms} SMs x 64 lanes x {clock / 1e9} GHz / 30 ops)")
    except Exception as e:
        say(f"philox throughput: FAILED {type(e).__name__}: {e}")
        traceback.print_exc()


def run_training(dev, smoke, bw, peak, xdt):
    in_f = out_f = 64 if smoke else 4096
    K = 64 if smoke else 4096
    M = 40 if smoke else 4096
    means, chol, labels, ell, outl, E, O = layer(out_f, in_f, K, dev)
    say(f"\n== training step (forward + backward), M = {M}, in = out = {in_f}, S = 1 ==")
    x = torch.randn(M, in_f, device=dev, dtype=xdt, requires_grad=True)
    g = torch.randn(1, M, out_f, device=dev, dtype=xdt)
    pm, pc = means.clone().requires_grad_(), chol.clone().requires_grad_()
    po = (outl[0], outl[1].clone().requires_grad_(), outl[2].clone().requires_grad_())

    def ours():
        y = F.sws_linear(x, pm, pc, labels, ell, po, seed=3, samples=1)
        y.backward(g)

    wd = R.reconstruct(means, chol, labels, ell, outl, seed=1)[0].to(xdt).requires_grad_()

    def dense():
        Fnn.linear(x, wd).backward(g[0])

    mu = (torch.randn(out_f, in_f, device=dev) * 0.1).requires_grad_()
    rho = torch.full((out_f, in_f), -4.0, device=dev, requires_grad=True)
    xf = x.detach().float().requires_grad_()

    def mf_bt():
        w = mu + Fnn.softplus(rho) * torch.randn_like(mu)
        Fnn.linear(xf, w).backward(g[0].float())

    try:
        with sws_kernels.backend("triton"):
            t = bench(ours, smoke)
        td, tm = bench(dense, smoke), bench(mf_bt, smoke)
        floor = 3 * 2 * M * in_f * out_f / peak * 1e3
        add_row(bench="train_step", mode="paper", M=M, S=1, ours_ms=t, per_sample_ms=t, dense_ms=td,
                ratio_dense=t / td, mf_bt_ms=tm, speedup_mf=tm / t, floor_ms=floor, floor_kind="flops",
                vs_floor=t / floor, goal=(t <= 1.5 * td and tm / t >= 3))
    except Exception as e:
        say(f"training step: FAILED {type(e).__name__}: {e}")
        traceback.print_exc()


def run_reconstruct(dev, smoke, bw):
    n_side = 64 if smoke else 4096
    means, chol, labels, ell, outl, E, O = layer(n_side, n_side, 64 if smoke else 4096, dev)
    n = n_side * n_side
    say("\n== reconstruct (Triton) forward and backward ==")
    for S in (1, 8):
        try:
            with sws_kernels.backend("triton"):
                t = bench(lambda: F.reconstruct(means, chol, labels, ell, outl, seed=3, samples=S), smoke)
                pm = means.clone().requires_grad_()
                gw = torch.randn(S, n_side, n_side, device=dev)

                def fb():
                    w = F.reconstruct(pm, chol, labels, ell, outl, seed=3, samples=S, mode="hierarchical")
                    w.backward(gw)

                tb = bench(fb, smoke)
            floor = (2 * n + 4 * S * n) / bw * 1e3
            add_row(bench="reconstruct_fwd", mode="paper", M=0, S=S, ours_ms=t, floor_ms=floor, floor_kind="mem",
                    vs_floor=t / floor)
            floor_b = (2 * n + 8 * S * n + 4 * S * n) / bw * 1e3  # fwd writes W, bwd reads dW and labels (+perm)
            add_row(bench="reconstruct_fwd_bwd", mode="hierarchical", M=0, S=S, ours_ms=tb, floor_ms=floor_b,
                    floor_kind="mem", vs_floor=tb / floor_b)
        except Exception as e:
            say(f"reconstruct S={S}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()


def run_conv(dev, smoke, bw, peak, xdt):
    say("\n== conv2d (Triton reconstruct + one vendor conv for all samples), ResNet-18 shapes ==")
    shapes = [(32, 64, 56, 64), (32, 256, 14, 256)] if not smoke else [(2, 8, 6, 8)]
    for N, C, HW, out_c in shapes:
        means, chol, labels, ell, outl, E, O = layer(out_c, C * 9, 64 if smoke else 4096, dev)
        labels = labels.view(out_c, C, 3, 3)
        x = torch.randn(N, C, HW, HW, device=dev, dtype=xdt)
        wd = R.reconstruct(means, chol, labels, ell, outl, seed=1)[0].to(xdt)
        for S in (1, 8):
            try:
                with sws_kernels.backend("triton"):
                    t = bench(lambda: F.sws_conv2d(x, means, chol, labels, ell, outl, None, 1, 1, seed=3,
                                                   samples=S), smoke)
                td = bench(lambda: Fnn.conv2d(x, wd, None, 1, 1), smoke)
                flops = 2 * N * out_c * HW * HW * C * 9 * S
                add_row(bench=f"conv2d_{C}x{HW}", mode="paper", M=N, S=S, ours_ms=t, per_sample_ms=t / S,
                        dense_ms=td, ratio_dense=t / S / td, floor_ms=flops / peak * 1e3, floor_kind="flops",
                        vs_floor=t / (flops / peak * 1e3))
            except Exception as e:
                say(f"conv {C}x{HW} S={S}: FAILED {type(e).__name__}: {e}")
                traceback.print_exc()


# ---- issue 14: the label-histogram inference path (sws_kernels/triton/histogram.py) ----
def run_histogram(dev, smoke, bw, peak, xdt):
    """S = 16 samples of one input row through the histogram path (torch.no_grad, paper mode, K = 256 uint8 labels)
    against one dense bf16 F.linear on a materialised weight; goal <= 0.6x. Floor: label bytes / copy bandwidth."""
    in_f = out_f = 64 if smoke else 4096
    K, S, M = 256, 16, 1
    means, chol, labels, ell, outl, E, O = layer(out_f, in_f, K, dev, dtype_lab=torch.uint8)
    w_dense = R.reconstruct(means, chol, labels, ell, outl, seed=1).to(xdt)[0]
    x = torch.randn(M, in_f, device=dev, dtype=xdt)
    say(f"\n== histogram inference path, paper mode, in = out = {in_f}, K = {K} uint8, M = {M}, S = {S} ==")
    try:
        with sws_kernels.backend("triton"), torch.no_grad():
            ours = bench(lambda: F.sws_linear(x, means, chol, labels, ell, outl, seed=3, samples=S), smoke)
        dense = bench(lambda: Fnn.linear(x, w_dense), smoke)
        floor = out_f * in_f / bw * 1e3  # the labels, 1 byte per weight
        add_row(bench="histogram_fwd", mode="paper", M=M, S=S, ours_ms=ours, per_sample_ms=ours / S, dense_ms=dense,
                ratio_dense=ours / dense, floor_ms=floor, floor_kind="mem", vs_floor=ours / floor,
                goal=ours <= 0.6 * dense, note="issue 14: all S samples <= 0.6x one dense bf16 F.linear")
    except Exception as e:
        say(f"histogram M={M} S={S}: FAILED {type(e).__name__}: {e}")
        traceback.print_exc()
# ---- end issue 14 ----


def check_correctness(dev, smoke):
    """The fused kernel against the float64 reference on this card (a quick guard before any timing)."""
    means, chol, labels, ell, outl, E, O = layer(96, 80, 37, dev)
    x = torch.randn(5, 80, device=dev)
    with sws_kernels.backend("triton"):
        y = F.sws_linear(x, means, chol, labels, ell, outl, seed=9, samples=3, mode="hierarchical")
    d = lambda t: tuple(u.double() if u.is_floating_point() else u for u in t)  # noqa: E731
    yr = R.sws_linear(x.double(), means.double(), chol.double(), labels, d(ell), d(outl), seed=9, samples=3,
                      mode="hierarchical")
    err = (y.double() - yr).abs().max().item()
    say(f"correctness: fused hierarchical linear vs float64 reference: max abs error {err:.3g}")
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, every path once (CPU interpreter OK)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.smoke:
        sys.exit("gpu_bench.py: no CUDA device (use --smoke with TRITON_INTERPRET=1 to check the script on a CPU)")
    import triton

    name = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu"
    say(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; python {platform.python_version()}; "
        f"cuda {torch.version.cuda}; {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    xdt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    err = check_correctness(dev, args.smoke)
    bw, peak = measure_hw(dev, args.smoke)
    say(f"measured copy bandwidth {bw / 1e12:.3g} TB/s, {xdt} matmul {peak / 1e12:.3g} TFLOP/s")
    t0 = time.time()
    for fn in (run_linear_rows, run_other_modes, run_training, run_histogram):  # run_histogram: issue 14
        fn(dev, args.smoke, bw, peak, xdt)
        say(f"  [{time.time() - t0:.0f} s]")
    run_reconstruct(dev, args.smoke, bw)
    run_conv(dev, args.smoke, bw, peak, xdt)
    say(f"  [{time.time() - t0:.0f} s]")

    keys = ["bench", "mode", "M", "S", "ours_ms", "per_sample_ms", "fused_ms", "recon_ms", "dense_ms", "ratio_dense",
            "mf_bt_ms", "speedup_mf", "ref_ms", "speedup_ref", "floor_ms", "floor_kind", "vs_floor", "normals_per_s",
            "goal", "note"]
    with open(os.path.join(args.out, "gpu_bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in ROWS:
            w.writerow({k: r.get(k) for k in keys})
    # dispatcher calibration: the smallest M where reconstruct+matmul beats the fused kernel
    cal = [(r["M"], r["S"], r["fused_ms"], r["recon_ms"]) for r in ROWS if r.get("fused_ms") is not None]
    table = ["", f"SUMMARY ({name}; copy {bw / 1e12:.3g} TB/s; matmul {peak / 1e12:.3g} TFLOP/s; "
                 f"correctness max err {err:.2g})",
             f"{'bench':22s} {'mode':12s} {'M':>5s} {'S':>3s} {'ours ms':>9s} {'/sample':>9s} {'floor ms':>9s} "
             f"{'x floor':>7s} {'x dense':>7s} {'mf_bt/us':>8s} {'ref/us':>7s} goal"]
    for r in ROWS:
        g = r.get("goal")
        table.append(f"{r['bench']:22s} {r['mode']:12s} {r['M']:5d} {r['S']:3d} {fmt(r.get('ours_ms')):>9s} "
                     f"{fmt(r.get('per_sample_ms')):>9s} {fmt(r.get('floor_ms')):>9s} {fmt(r.get('vs_floor')):>7s} "
                     f"{fmt(r.get('ratio_dense')):>7s} {fmt(r.get('speedup_mf')):>8s} {fmt(r.get('speedup_ref')):>7s} "
                     f"{'-' if g is None else ('PASS' if g else 'MISS')}")
    for r in ROWS:
        if r.get("normals_per_s"):
            table.append(f"philox {r['bench']}/{r['mode']} M={r['M']} S={r['S']}: {r['normals_per_s']:.3g} normals/s "
                         f"{r.get('note') or ''}")
    if cal:
        table.append("dispatcher (fused ms / reconstruct+matmul ms): " +
                     ", ".join(f"M={m},S={s}: {a:.3g}/{b:.3g}" for m, s, a, b in cal))
        table.append("goals: fwd M=1,16 <= 1.2x dense per sample and >= 10x mf_bt; M=4096 <= 1.25x; train <= 1.5x "
                     "dense and >= 3x mf_bt; S=32 M=16 >= 8x 32 reference calls; memory-bound <= 1.5x floor")
    for line in table:
        say(line)
    with open(os.path.join(args.out, "gpu_bench_table.txt"), "w") as f:
        f.write("\n".join(table) + "\n")
    with open(os.path.join(args.out, "gpu_bench.log"), "w") as f:
        f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
