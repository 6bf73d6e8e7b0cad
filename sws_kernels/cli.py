"""The ``sws-kernels`` command line.

``sws-kernels info``   backends, versions, and why a backend is unavailable.
``sws-kernels quick``  (the default) reconstructs S samples of a sampled ResNet-sized SWS layer on every
                       available backend, checks them against each other, and prints the timings.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch


def _backends_table() -> str:
    import sws_kernels as sws

    rows = [f"{'backend':12s} {'available':9s} reason"]
    for name, (ok, why) in sws.backends().items():
        rows.append(f"{name:12s} {'yes' if ok else 'no':9s} {why}")
    return "\n".join(rows)


def cmd_info(args) -> int:
    import sws_kernels as sws

    try:
        import triton
        tv = triton.__version__
    except Exception as e:  # noqa: BLE001 - reported, not raised
        tv = f"not importable ({type(e).__name__})"
    print(f"sws_kernels {sws.__version__}  torch {torch.__version__}  triton {tv}  python {platform.python_version()}")
    print(f"CPU threads: {torch.get_num_threads()}  CUDA: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print(_backends_table())
    return 0


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cmd_quick(args) -> int:
    import sws_kernels as sws
    from sws_kernels import functional as F

    if args.weights < 1 or args.components < 1 or args.samples < 1:
        print("error: --weights, --components and --samples must be >= 1", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    K, n, S = args.components, args.weights, args.samples
    # a codebook spread over typical (mu, rho), labels for every weight, 0.1% ellipse and 1% outlier weights
    means = torch.stack([torch.linspace(-0.2, 0.2, K), torch.full((K,), -4.0)], -1)
    chol = torch.tensor([-6.0, 0.0, -3.0]).repeat(K, 1)
    labels = torch.randint(0, K, (n,), generator=g).to(torch.int16 if K <= 32767 else torch.int32)
    pos = torch.randperm(n, generator=g)[: n // 1000 + n // 100]
    E = n // 1000
    ellipse = (pos[:E], torch.randint(0, K, (E,), generator=g), torch.randint(0, K, (E,), generator=g), torch.rand(E, generator=g))
    outliers = (pos[E:], torch.randn(pos.numel() - E, generator=g) * 0.3, torch.full((pos.numel() - E,), -4.0))
    to = lambda t: t.to(dev)  # noqa: E731
    means, chol, labels = to(means), to(chol), to(labels)
    ellipse, outliers = tuple(map(to, ellipse)), tuple(map(to, outliers))

    print(_backends_table())
    print(f"\nreconstruct: n = {n:,} weights, K = {K}, S = {S}, mode = {args.mode}, device = {dev}")
    byts = labels.element_size() * n + 4 * S * n
    results = {}
    for name in ("reference", "native", "triton"):
        avail = sws.backends()
        key = {"native": "native_cuda" if dev.type == "cuda" else "native_cpu"}.get(name, name)
        if not avail[key][0] or (name == "triton" and dev.type != "cuda"):
            continue
        try:
            with sws.backend(name):
                fn = lambda: F.reconstruct(means, chol, labels, ellipse, outliers, seed=1, samples=S,  # noqa: E731
                                           mode=args.mode)
                w = fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = _time(fn if dev.type == "cpu" else (lambda: (fn(), torch.cuda.synchronize())), args.repeat)
        except NotImplementedError as e:
            print(f"  {name:10s} skipped: {e}")
            continue
        results[name] = (w, t)
        print(f"  {name:10s} {t * 1e3:9.2f} ms   {byts / t / 1e9:6.2f} GB/s of labels read + weights written")
    if "reference" in results:
        ref, t_ref = results["reference"]
        for name, (w, t) in results.items():
            if name != "reference":
                err = (w - ref).abs().max().item()
                print(f"  {name} vs reference: max |diff| = {err:.2e}, speed-up {t_ref / t:.1f}x")
    return 0


def _add_demo(sub) -> None:
    d = sub.add_parser(
        "demo", help="digits: deterministic vs mean-field vs SWS BNN, one table and pictures",
        description="Train a small CNN on scikit-learn's digits as a deterministic net and as a mean-field BNN, "
                    "compress the BNN with to_sws, fine-tune the SWS BNN end to end, print accuracy / NLL / ECE / "
                    "Brier / predictive entropy (test vs noise) / parameters / bytes / times, save pictures.")
    d.add_argument("--fast", action="store_true", help="a seconds-long configuration (CI): fewer epochs and samples")
    d.add_argument("--epochs", type=int, help="deterministic and mean-field epochs (default 30; --fast 8)")
    d.add_argument("--sws-epochs", type=int, help="SWS fine-tuning epochs (default epochs // 3; --fast 3)")
    d.add_argument("--samples", type=int, help="Monte Carlo samples at evaluation (default 16; --fast 4)")
    d.add_argument("--train-samples", type=int, help="Monte Carlo samples per training step (default 1)")
    d.add_argument("--components", type=int, help="codebook size K requested from to_sws (default 128; --fast 32)")
    d.add_argument("--batch-size", type=int, help="training batch size (default 64)")
    d.add_argument("--lr", type=float, help="learning rate of the deterministic and mean-field training")
    d.add_argument("--sws-lr", type=float, help="learning rate of the SWS fine-tuning")
    d.add_argument("--kl-weight", type=float, help="beta of the ELBO (default 1: the exact ELBO)")
    d.add_argument("--prior-sigma", type=float, help="prior std of the mean-field weights (default 1, as bayesian-torch)")
    d.add_argument("--width", type=int, help="channels of the built-in CNN's first conv (default 16; --fast 8)")
    d.add_argument("--seed", type=int, help="seed of the split, inits and noise (default 0)")
    d.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    d.add_argument("--threads", type=int, help="CPU threads during the demo (default 1: the model is tiny)")
    d.add_argument("--out", help="directory for pictures, results and models (default ./sws_demo)")
    d.add_argument("--no-out", action="store_true", help="save nothing")
    d.add_argument("--data", metavar="PKG.MOD:FN",
                   help="your data: FN(batch_size=, seed=) -> (train_loader, test_loader) of (x, y) batches")
    d.add_argument("--model", metavar="PKG.MOD:FN",
                   help="your deterministic model: FN(input_shape=, num_classes=) -> nn.Module "
                        "(its Linear/Conv layers become Bayesian)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(fn=cmd_demo)


def cmd_demo(args) -> int:
    from . import demo

    return demo.main(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sws-kernels", description="Fused kernels for stochastic weight sharing BNNs.")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("info", help="backends, versions and why a backend is unavailable").set_defaults(fn=cmd_info)
    q = sub.add_parser("quick", help="reconstruct a sampled layer on every backend and time it (default)")
    q.add_argument("--weights", type=int, default=4 * 1024 * 1024, help="weights in the layer (default 4M)")
    q.add_argument("--components", type=int, default=4096, help="codebook components K (default 4096)")
    q.add_argument("--samples", type=int, default=4, help="Monte Carlo samples S (default 4)")
    q.add_argument("--mode", choices=("paper", "hierarchical", "mean"), default="paper")
    q.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is reported)")
    q.set_defaults(fn=cmd_quick)
    _add_demo(sub)
    args = p.parse_args(argv)
    if args.cmd is None:
        args = p.parse_args(["quick", *(argv or [])])
    return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
