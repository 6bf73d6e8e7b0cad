"""The ``sws-kernels`` command line.

``sws-kernels info``     backends, versions, and why a backend is unavailable.
``sws-kernels quick``    (the default) reconstructs S samples of a sampled ResNet-sized SWS layer on every
                         available backend, checks them against each other, and prints the timings.
``sws-kernels demo``     digits: deterministic vs mean-field vs SWS BNN, one table, pictures (demo.py).
``sws-kernels bench``    linear-layer microbenchmark against dense / mean-field / reference (bench.py).
``sws-kernels convert``  mean-field or bayesian-torch checkpoint -> compact SWS file + report.
``sws-kernels plot``     codebook / reliability pictures from a saved model, speed-up chart from a bench CSV.

Every command exits 0 on success and 2 on a user error, printing ``error: <argument>: <what is wrong>``.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Optional

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
    from . import native

    print(f"native build: {native.build_summary()}")
    # optional packages: what `demo` / `plot` need (the [demo] extra) and what `convert` can read
    import importlib.metadata as md

    opt = []
    for dist, used_by in (("scikit-learn", "demo"), ("matplotlib", "demo, plot"), ("tqdm", "demo"),
                          ("bayesian-torch", "convert of bayesian-torch models")):
        try:
            opt.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            opt.append(f"{dist} missing (needed by {used_by})")
    print("optional: " + "; ".join(opt))
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


class CLIError(Exception):
    """A user error: printed as ``error: ...`` (naming the argument) with exit status 2."""


def _int_list(name: str):
    def parse(text: str):
        try:
            vals = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated integers, got {text!r}") from None
        if not vals or min(vals) < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected integers >= 1, got {text!r}")
        return vals
    return parse


def _positive(name: str, kind=int):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive {kind.__name__}, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive {kind.__name__}, got {text!r}")
        return v
    return parse


# -- bench ------------------------------------------------------------------------------------------

def _add_bench(sub) -> None:
    from .bench import METHODS, PASSES

    b = sub.add_parser(
        "bench", help="microbenchmark: fused SWS linear vs dense, mean-field and the reference, table + CSV",
        description="Time an in->out linear layer for every batch size M and sample count S: dense matmul on "
                    "materialised weights, a bayesian-torch-style mean-field layer, sws_kernels' mean-field layer, "
                    "the SWS reference and the fused SWS layer, all in this process on the present device (CPU: "
                    "min/median/IQR over timed rounds; GPU: triton.testing.do_bench). Small default shapes on CPU.")
    b.add_argument("--quick", action="store_true", help="a seconds-long configuration (tests): 128x128, M=8, S=1,4")
    b.add_argument("--in-features", type=_positive("--in-features"), help="default 512 (CPU), 4096 (GPU)")
    b.add_argument("--out-features", type=_positive("--out-features"), help="default 512 (CPU), 4096 (GPU)")
    b.add_argument("--M", dest="Ms", type=_int_list("--M"), help="batch sizes, comma-separated (default 16,128)")
    b.add_argument("--S", dest="Ss", type=_int_list("--S"), help="MC samples per call, comma-separated (default 1,4,16)")
    b.add_argument("--components", type=_positive("--components"), help="codebook size K (default 256 CPU, 4096 GPU)")
    b.add_argument("--mode", choices=("paper", "hierarchical", "mean"), default="paper")
    b.add_argument("--methods", type=lambda t: t.split(","), default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    b.add_argument("--passes", type=lambda t: t.split(","), default=list(PASSES),
                   help=f"comma-separated subset of {','.join(PASSES)}")
    b.add_argument("--min-time", type=_positive("--min-time", float), help="CPU: seconds of timed rounds per "
                   "measurement (default 0.1; --quick 0.01)")
    b.add_argument("--threads", type=_positive("--threads"), help="CPU threads (default: torch's default)")
    b.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    b.add_argument("--csv", metavar="PATH", help="also write the rows to this CSV (input of `sws-kernels plot --bench`)")
    b.set_defaults(fn=cmd_bench)


def cmd_bench(args) -> int:
    from . import bench

    bad = [m for m in args.methods if m not in bench.METHODS]
    if bad:
        raise CLIError(f"--methods: unknown {bad}; expected a subset of {list(bench.METHODS)}")
    bad = [p for p in args.passes if p not in bench.PASSES]
    if bad:
        raise CLIError(f"--passes: unknown {bad}; expected a subset of {list(bench.PASSES)}")
    dev = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device: {args.device!r} requested but CUDA is not available")
    if args.csv:
        _check_writable(args.csv, "--csv")
    gpu = dev.type == "cuda"
    if args.quick:
        d = dict(f=128, Ms=[8], Ss=[1, 4], K=64, t=0.01)
    else:
        d = dict(f=4096 if gpu else 512, Ms=[32, 512] if gpu else [16, 128], Ss=[1, 4, 16], K=4096 if gpu else 256, t=0.1)
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(in_features=args.in_features or d["f"], out_features=args.out_features or d["f"],
              Ms=args.Ms or d["Ms"], Ss=args.Ss or d["Ss"], components=args.components or d["K"], mode=args.mode,
              methods=args.methods, passes=args.passes, device=str(dev),
              min_time=args.min_time or d["t"], min_rounds=3 if args.quick else 5)
    print(f"linear {kw['in_features']}->{kw['out_features']}, K = {kw['components']}, mode = {args.mode}, "
          f"M in {kw['Ms']}, S in {kw['Ss']} on {bench.device_name(dev)}; torch {torch.__version__}")
    rows = bench.run_bench(**kw, progress=lambda line: print(line, file=sys.stderr))
    print(bench.format_table(rows))
    if args.csv:
        bench.write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    return 0


def _check_writable(path: str, option: str) -> None:
    import os

    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent):
        raise CLIError(f"{option}: directory {parent!r} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"{option}: {path!r} is a directory, expected a file path")


def _check_readable(path: str, option: str) -> None:
    import os

    if not os.path.exists(path):
        raise CLIError(f"{option}: {path!r} does not exist")
    if not os.path.isfile(path):
        raise CLIError(f"{option}: {path!r} is not a file")


# -- model files ------------------------------------------------------------------------------------

def skeleton_from_file(path: str):
    """A model holding exactly what an sws_kernels file holds, without its architecture's code.

    The Bayesian modules (Codebook, SWS and mean-field layers) are rebuilt at their recorded paths by
    :func:`sws_kernels.load`; every other tensor (e.g. BatchNorm statistics, deterministic layers) becomes a
    buffer at its own path, so ``state_dict()`` keys equal the file's and a file saved from the skeleton
    loads into the real architecture (``sws.load(path, model)``). The skeleton has no ``forward``.
    """
    from torch import nn
    from . import io

    header = io.read_header(path)
    state = io.load(path)
    root = nn.Module()

    def ensure(mpath):
        m = root
        for part in [p for p in mpath.split(".") if p]:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        return m

    for name in header.get("modules", {}):
        if name == "":
            raise CLIError(f"{path}: holds a bare layer, not a model; nothing to rebuild around it")
        ensure(name.rpartition(".")[0])
    model = io.load(path, root, strict=False)
    have = model.state_dict()
    for key, t in state.items():
        if key not in have:
            mpath, _, leaf = key.rpartition(".")
            ensure(mpath).register_buffer(leaf, t)
    return model


def _load_model_file(path: str, option: str, arch: Optional[str] = None, allow_pickle: bool = False):
    """(model, how) from an sws_kernels file, a torch.save'd state_dict/checkpoint (needs ``arch``) or, with
    ``allow_pickle``, a torch.save'd whole module. ``arch`` is ``pkg.mod:fn`` returning the architecture."""
    from torch import nn
    from . import io

    _check_readable(path, option)
    with open(path, "rb") as f:
        magic = f.read(8)
    factory = None
    if arch:
        from .demo import DemoError, load_callable
        try:
            factory = load_callable(arch, "--arch")
        except DemoError as e:
            raise CLIError(str(e)) from None
    if magic in io.MAGICS:  # format version 2, or 1
        try:
            if factory is not None:
                return io.load(path, factory()), "sws_kernels file loaded into --arch"
            return skeleton_from_file(path), "sws_kernels file"
        except ValueError as e:
            raise CLIError(f"{option}: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling error: explain the choices
        if not allow_pickle:
            raise CLIError(f"{option}: {path!r} is neither an sws_kernels file nor a plain torch checkpoint "
                           f"(state_dict); if it is a torch.save'd whole module you trust, pass --allow-pickle "
                           f"(unpickling runs code from the file). Loader said: {type(e).__name__}") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001
            raise CLIError(f"{option}: cannot read {path!r} ({type(e2).__name__}: {e2})") from None
    if isinstance(obj, nn.Module):
        return obj, "torch.save'd module"
    if isinstance(obj, dict):
        sd = obj
        for k in ("state_dict", "model_state_dict", "model"):  # common training-script checkpoint layouts
            if isinstance(obj.get(k), dict):
                sd = obj[k]
                break
        if not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CLIError(f"{option}: {path!r} holds a dict that is not a state_dict")
        if factory is None:
            raise CLIError(f"{option}: {path!r} is a state_dict without the model's code: pass --arch "
                           f"pkg.mod:fn returning the (bayesian-torch or sws_kernels mean-field) architecture")
        model = factory()
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise CLIError(f"--arch: the model does not match the state_dict in {path!r}: {e}") from None
        return model, "state_dict loaded into --arch"
    raise CLIError(f"{option}: {path!r} holds a {type(obj).__name__}, expected a model or a state_dict")


# -- convert ----------------------------------------------------------------------------------------

def _add_convert(sub) -> None:
    c = sub.add_parser(
        "convert", help="mean-field or bayesian-torch checkpoint -> compact SWS file + compression report",
        description="Read a mean-field BNN (an sws_kernels file from sws.save, a torch state_dict/checkpoint "
                    "with --arch, or a torch.save'd module with --allow-pickle), convert bayesian-torch layers "
                    "to sws_kernels', compress with to_sws (SPEC section 8), write the SWS model with sws.save "
                    "(loads back with sws.load(OUT, architecture)) and print the compression report.")
    c.add_argument("input", metavar="IN", help="the mean-field / bayesian-torch checkpoint")
    c.add_argument("output", metavar="OUT", help="the SWS file to write")
    c.add_argument("--arch", metavar="PKG.MOD:FN", help="function returning the model architecture (needed for "
                   "a state_dict checkpoint; optional for an sws_kernels file)")
    c.add_argument("--allow-pickle", action="store_true", help="allow IN to be a pickled module (runs its code)")
    c.add_argument("--components", type=_positive("--components"), default=4096, help="codebook size K (default 4096)")
    c.add_argument("--tau-w", type=float, default=0.2, help="|mu| >= tau_w makes an outlier (default 0.2)")
    c.add_argument("--tau-d", type=float, default=1e-4, help="W2 merge threshold (default 1e-4)")
    c.add_argument("--mode", choices=("paper", "hierarchical", "mean"), default="paper")
    c.add_argument("--seed", type=int, default=0, help="seed of the GMM fit (default 0)")
    c.add_argument("--report", metavar="PATH", help="also write the report as JSON")
    c.set_defaults(fn=cmd_convert)


def cmd_convert(args) -> int:
    import json
    import os

    from . import io
    from .convert import from_bayesian_torch, to_sws
    from .demo import _jsonable

    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise CLIError("OUT: must differ from IN (the input would be overwritten)")
    _check_writable(args.output, "OUT")
    if args.report:
        _check_writable(args.report, "--report")
    if not args.tau_w >= 0:
        raise CLIError(f"--tau-w: expected a non-negative number, got {args.tau_w}")
    if not args.tau_d >= 0:
        raise CLIError(f"--tau-d: expected a non-negative number, got {args.tau_d}")
    model, how = _load_model_file(args.input, "IN", args.arch, args.allow_pickle)
    model, bt = from_bayesian_torch(model)
    if bt["converted"]:
        print(f"bayesian-torch layers converted: {', '.join(bt['converted'])}")
    try:
        model, rep = to_sws(model, num_components=args.components, tau_w=args.tau_w, tau_d=args.tau_d,
                            mode=args.mode, seed=args.seed, progress=sys.stderr.isatty())
    except (TypeError, ValueError) as e:
        raise CLIError(f"IN: cannot convert {args.input!r}: {e}") from None
    nbytes = io.save(model, args.output)
    in_bytes = os.path.getsize(args.input)
    print(f"{args.input} ({how}, {in_bytes:,} bytes) -> {args.output} ({nbytes:,} bytes, {in_bytes / nbytes:.1f}x)")
    print(f"layers: {', '.join(rep['layers'])}")
    print(f"weights {rep['num_weights']:,}: {rep['inliers']:,} inliers on {rep['gaussians']} Gaussians "
          f"(labels {rep['label_dtype']}), {rep['ellipses']:,} ellipse, {rep['outliers']:,} outlier "
          f"({', '.join(f'{k} {v}' for k, v in rep['outliers_by_reason'].items())})")
    print(f"trainable parameters {rep['params_before']:,} -> {rep['params_after']:,} ({rep['params_ratio']:.1f}x); "
          f"bytes of the converted layers {rep['bytes_before']:,} -> {rep['bytes_after']:,} ({rep['bytes_ratio']:.1f}x); "
          f"{rep['seconds']:.1f} s")
    for note in rep.get("notes", []):
        print(f"note: {note}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(_jsonable({**rep, "input": args.input, "output": args.output, "input_bytes": in_bytes,
                                 "output_bytes": nbytes}), f, indent=1)
        print(f"wrote {args.report}")
    return 0


# -- plot -------------------------------------------------------------------------------------------

def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot", help="pictures from a saved SWS model (codebook, reliability) or a bench CSV (speed-up chart)",
        description="--model FILE: the codebook in (mu, rho) space with 95%% ellipses and weights coloured "
                    "inlier/ellipse/outlier (--mean-field FILE: the weights' own mean-field (mu, rho)); with an "
                    "architecture (--arch, or the demo's digits CNN when the file matches it) also a reliability "
                    "diagram on the test split of --data (default: digits). --bench CSV: speed-up chart.")
    p.add_argument("--model", metavar="FILE", help="an SWS model saved by sws.save (e.g. sws_demo/sws_model.sws)")
    p.add_argument("--mean-field", metavar="FILE", help="the mean-field model it was converted from (sws.save)")
    p.add_argument("--arch", metavar="PKG.MOD:FN", help="architecture for the reliability diagram")
    p.add_argument("--data", metavar="PKG.MOD:FN", help="FN(batch_size=, seed=) -> (train, test) loaders "
                   "(default: the demo's digits split)")
    p.add_argument("--samples", type=_positive("--samples"), default=16, help="MC samples for the reliability diagram")
    p.add_argument("--seed", type=int, default=0, help="seed of the digits split (must match the demo's)")
    p.add_argument("--bench", metavar="CSV", help="a CSV from `sws-kernels bench --csv`")
    p.add_argument("--out", default=".", help="directory for the PNGs (default: current directory)")
    p.set_defaults(fn=cmd_plot)


def _demo_arch_for(path: str):
    """The demo's digits CNN when the file's layers are exactly its layers (so --arch can be omitted)."""
    from . import io
    from .demo import digits_cnn

    mods = io.read_header(path).get("modules", {})
    first = mods.get("0", {}).get("config", {})
    width = first.get("out_channels")
    if not isinstance(width, int) or first.get("in_channels") != 1:
        return None
    want = {n for n, m in digits_cnn((1, 8, 8), 10, width).named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    have = {n for n, s in mods.items() if s["class"] != "Codebook"}
    return (lambda: digits_cnn((1, 8, 8), 10, width)) if want == have else None


def cmd_plot(args) -> int:
    import os

    from . import plots

    if args.mean_field and not args.model:
        raise CLIError("--mean-field: needs --model (the SWS model converted from it)")
    if not args.model and not args.bench:
        raise CLIError("nothing to plot: pass --model FILE and/or --bench CSV")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out: cannot create directory {args.out!r} ({e.strerror})") from None
    written = []
    if args.bench:
        _check_readable(args.bench, "--bench")
        try:
            written.append(plots.plot_bench(args.bench, os.path.join(args.out, "bench.png")))
        except (ValueError, KeyError) as e:
            raise CLIError(f"--bench: {e}") from None
    if args.model:
        from .nn import SWS_LAYERS

        sws_model, _ = _load_model_file(args.model, "--model")
        if not any(isinstance(m, SWS_LAYERS) for m in sws_model.modules()):
            raise CLIError(f"--model: {args.model!r} has no SWS layer (convert it first: sws-kernels convert)")
        mf = _load_model_file(args.mean_field, "--mean-field")[0] if args.mean_field else None
        written.append(plots.plot_codebook(sws_model, os.path.join(args.out, "codebook.png"), mean_field=mf))
        factory = None
        if args.arch:
            from .demo import DemoError, load_callable
            try:
                factory = load_callable(args.arch, "--arch")
            except DemoError as e:
                raise CLIError(str(e)) from None
        elif args.data is None:
            factory = _demo_arch_for(args.model)
        if factory is not None:
            written.append(_reliability_from_file(args, factory))
        else:
            print("reliability diagram skipped: pass --arch pkg.mod:fn (the model's architecture) to evaluate it")
    for w in written:
        print(f"wrote {w}")
    return 0


def _reliability_from_file(args, factory):
    import os

    from . import io, plots
    from .bayes import predict
    from .demo import DemoError, _call_with_supported, digits_loaders, load_callable

    try:
        model = io.load(args.model, factory())
    except ValueError as e:
        raise CLIError(f"--arch: {e}") from None
    if args.data:
        try:
            _, test = _call_with_supported(load_callable(args.data, "--data"), batch_size=256, seed=args.seed)
        except DemoError as e:
            raise CLIError(str(e)) from None
    else:
        _, test = digits_loaders(256, args.seed)
    model.eval()
    probs, ys = [], []
    for x, y in test:
        probs.append(predict(model, x, args.samples))
        ys.append(y)
    name = os.path.basename(args.model)
    return plots.plot_reliability({name: (torch.cat(probs, 1), torch.cat(ys))}, os.path.join(args.out, "reliability.png"))


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
    _add_bench(sub)
    _add_convert(sub)
    _add_plot(sub)
    args = p.parse_args(argv)
    if args.cmd is None:
        args = p.parse_args(["quick", *(argv or [])])
    try:
        return args.fn(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
