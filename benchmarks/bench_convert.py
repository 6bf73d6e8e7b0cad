"""Time sws_kernels.convert.to_sws on a ResNet-18-sized mean-field model (11.7M conv/linear weights).

Run: python benchmarks/bench_convert.py [--components 4096] [--device cpu]
The layers have ResNet-18's (ImageNet) weight shapes; (mu, rho) are synthetic but shaped like a trained
mean-field net: mu a Laplace-like bulk with a scale per layer (fan-in dependent) and a few large weights,
rho around -4.5 with spread, correlated with |mu|. Prints the report and the wall time.

Measured 2026-11-26, torch 2.13.0 CPU, 2 cores shared with other jobs:
11,678,912 weights, K = 4096 -> 386 s wall at load average ~4 (222 s through EM), 579 s at load ~6;
3,910 Gaussians, 794,294 ellipses, 22,318 outliers, params 23.4M -> 65k (358x), bytes 2.5x smaller.
"""
import argparse
import json
import math
import time

import torch

from sws_kernels import convert
from sws_kernels import nn as snn


def resnet18_shapes():
    shapes = [(64, 3, 7, 7)]
    cin = 64
    for cout, blocks in ((64, 2), (128, 2), (256, 2), (512, 2)):
        for b in range(blocks):
            shapes.append((cout, cin if b == 0 else cout, 3, 3))
            shapes.append((cout, cout, 3, 3))
            if b == 0 and cin != cout:
                shapes.append((cout, cin, 1, 1))
            cin = cout
    return shapes


def build(g):
    layers = []
    for i, (o, c, kh, kw) in enumerate(resnet18_shapes()):
        m = snn.MeanFieldConv2d(c, o, (kh, kw), padding=kh // 2, bias=False)
        m.dnn_to_bnn_flag = True
        layers.append(m)
    layers.append(snn.MeanFieldLinear(512, 1000))
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for m in layers:
            w = m.weight_mu
            fan_in = w[0].numel()
            scale = math.sqrt(2.0 / fan_in) / math.sqrt(2)
            # Laplace bulk: difference of exponentials
            lap = torch.empty(w.shape).exponential_(generator=g) - torch.empty(w.shape).exponential_(generator=g)
            w.copy_(scale * lap)
            m.weight_rho.copy_(-4.5 + 0.4 * torch.randn(w.shape, generator=g) + 3.0 * w.abs())
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--components", type=int, default=4096)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    model = build(g)
    n = sum(m.weight_mu.numel() for m in model if hasattr(m, "weight_mu"))
    print(f"weights: {n:,}  threads: {torch.get_num_threads()}  torch {torch.__version__}")
    t0 = time.perf_counter()
    model, report = convert.to_sws(model, args.components, device=args.device, progress=True)
    dt = time.perf_counter() - t0
    print(json.dumps(report, indent=1, default=str))
    print(f"to_sws: {dt:.1f} s for {n:,} weights, K = {args.components}")


if __name__ == "__main__":
    main()
