"""Time sws_kernels.convert.to_sws on a ResNet-18-sized mean-field model (11.7M conv/linear weights).

Run: python benchmarks/bench_convert.py [--components auto|K] [--rho correlated|cloud] [--device cpu|cuda]
                                        [--scale 1.0] [--json out.json]
The layers have ResNet-18's (ImageNet) weight shapes; (mu, rho) are synthetic, shaped like a trained
mean-field net: mu a Laplace bulk (heavier tails than the Gaussian init, as trained conv weights are) with
He-scale std sqrt(2 / fan_in) per layer; rho either "correlated" (around -4.5 with spread, growing with |mu|)
or "cloud" (rho ~ N(-5, 0.5), issue 13's ResNet-18-sized cloud). ``--scale`` shrinks every layer's output
channels (a quick, smaller cloud of the same shape statistics). Prints the report, the wall time, the peak
resident memory of the process, and the bytes of the saved files (mean-field and SWS, sws_kernels.save).
Results: benchmarks/RESULTS.md (compression section).
"""
import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time

import torch

from sws_kernels import convert
from sws_kernels import nn as snn


def resnet18_shapes(scale: float = 1.0):
    c = lambda n: max(1, int(round(n * scale)))  # noqa: E731
    shapes = [(c(64), 3, 7, 7)]
    cin = c(64)
    for cout, blocks in ((64, 2), (128, 2), (256, 2), (512, 2)):
        cout = c(cout)
        for b in range(blocks):
            shapes.append((cout, cin if b == 0 else cout, 3, 3))
            shapes.append((cout, cout, 3, 3))
            if b == 0 and cin != cout:
                shapes.append((cout, cin, 1, 1))
            cin = cout
    return shapes, cin


def build(g, rho: str = "correlated", scale: float = 1.0, device="cpu"):
    shapes, feat = resnet18_shapes(scale)
    layers = []
    for (o, c, kh, kw) in shapes:
        m = snn.MeanFieldConv2d(c, o, (kh, kw), padding=kh // 2, bias=False)
        m.dnn_to_bnn_flag = True
        layers.append(m)
    layers.append(snn.MeanFieldLinear(feat, 1000))
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for m in layers:
            w = m.weight_mu
            fan_in = w[0].numel()
            b = math.sqrt(2.0 / fan_in) / math.sqrt(2)  # Laplace(b) has std b sqrt(2) = sqrt(2 / fan_in)
            lap = torch.empty(w.shape).exponential_(generator=g) - torch.empty(w.shape).exponential_(generator=g)
            w.copy_(b * lap)
            if rho == "cloud":
                m.weight_rho.copy_(-5.0 + 0.5 * torch.randn(w.shape, generator=g))
            else:
                m.weight_rho.copy_(-4.5 + 0.4 * torch.randn(w.shape, generator=g) + 3.0 * w.abs())
    return model.to(device)


def file_bytes(model) -> int:
    from sws_kernels import io

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.sws")
        io.save(model, p)
        return os.path.getsize(p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--components", default="auto")
    ap.add_argument("--rho", choices=["correlated", "cloud"], default="correlated")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-files", action="store_true", help="skip saving the models to measure file sizes")
    ap.add_argument("--json", default=None, help="write the report and timings here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    K = args.components if args.components == "auto" else int(args.components)
    g = torch.Generator().manual_seed(0)
    model = build(g, args.rho, args.scale, args.device)
    n = sum(m.weight_mu.numel() for m in model if hasattr(m, "weight_mu"))
    print(f"weights: {n:,}  rho: {args.rho}  device: {args.device}  threads: {torch.get_num_threads()}  "
          f"torch {torch.__version__}  load average {os.getloadavg()[0]:.2f}", flush=True)
    mf_file = None if args.no_files else file_bytes(model)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
    t0, c0 = time.perf_counter(), time.process_time()
    model, report = convert.to_sws(model, K, progress=sys.stderr.isatty())
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = {"seconds_wall": dt, "seconds_cpu_all_threads": cpu, "weights": n, "load_average_after": os.getloadavg()[0],
             "peak_rss_bytes_before": rss0, "peak_rss_bytes_after": rss1}
    if args.device.startswith("cuda"):
        extra["cuda_peak_bytes_over_start"] = torch.cuda.max_memory_allocated() - mem0
        extra["gpu"] = torch.cuda.get_device_name()
    if mf_file is not None:
        sws_file = file_bytes(model)
        extra.update(file_bytes_before=mf_file, file_bytes_after=sws_file, file_ratio=mf_file / sws_file)
    report["bench"] = extra
    print(json.dumps(report, indent=1, default=str))
    print(f"to_sws: {dt:.1f} s wall ({cpu:.1f} s CPU over all threads) for {n:,} weights, K = {args.components} -> {report['gaussians']} Gaussians, "
          f"{report['ellipses']:,} ellipses ({report['ellipses'] / n:.3%}), {report['outliers']:,} outliers "
          f"({report['outliers'] / n:.3%}); params {report['params_ratio']:.1f}x, bytes {report['bytes_ratio']:.2f}x"
          + (f", file {extra['file_ratio']:.2f}x" if mf_file is not None else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
