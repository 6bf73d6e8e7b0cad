"""The ``sws-kernels`` command line.

``sws-kernels info``     backends, versions, and why a backend is unavailable.
``sws-kernels quick``    (the default) reconstructs S samples of a sampled ResNet-sized SWS layer on every
                         available backend, checks them against each other, and prints the timings.
``sws-kernels demo``     digits: deterministic vs mean-field vs SWS BNN, one table, pictures (demo.py).
``sws-kernels bench``    linear-layer microbenchmark against dense / mean-field / reference (bench.py).
``sws-kernels convert``  mean-field or bayesian-torch checkpoint -> compact SWS file + report.
``sws-kernels plot``     codebook / reliability pictures from a saved model, speed-up chart from a bench CSV.

Every command exits 0 on success and 2 on a user error, printing one line ``error: <argument>: <what is wrong
and what to do>`` (no traceback; ``--debug`` shows it). Outputs (``--out``, ``--csv``, ``--report``, OUT) are
checked for writability before any work. ``--arch``/``--model``/``--data`` take ``module:function`` and import
from the current directory first, then the Python path; model factories have one form everywhere,
``FN(input_shape=, num_classes=) -> nn.Module`` (arguments FN does not declare are not passed).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import os
import platform
import sys
import time
from typing import Optional, Sequence

import torch


class CLIError(Exception):
    """A user error: printed as ``error: ...`` (naming the argument) with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: argument --x: ... (see `sws-kernels cmd --help`)``, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


MODE_HELP = ("how weights are sampled (SPEC.md section 3): 'paper' (default) draws one value per codebook component "
             "and MC sample, shared by all its weights; 'hierarchical' adds each weight's own noise around its "
             "component's draw; 'mean' is deterministic (component means, outlier means)")
FACTORY_FORM = "FN(input_shape=, num_classes=) -> torch.nn.Module (arguments FN does not declare are not passed)"


# -- devices ----------------------------------------------------------------------------------------

def cuda_state():
    """(usable, why not) without torch's 'CUDA driver version is insufficient' warning on GPU-less machines."""
    import warnings

    if torch.version.cuda is None:
        return False, (f"this torch ({torch.__version__}) is a CPU-only build; GPU users install the CUDA build "
                       f"of torch (see the README)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    if ok:
        return True, ""
    if not os.path.exists("/proc/driver/nvidia/version") and sys.platform.startswith("linux"):
        return False, "no GPU (no NVIDIA driver is installed)"
    text = " ".join(str(w.message) for w in caught)
    if "insufficient" in text:
        return False, f"the NVIDIA driver is too old for this torch's CUDA {torch.version.cuda}"
    return False, "no GPU (torch.cuda.is_available() is False)"


def parse_device(text: Optional[str], option: str = "--device") -> torch.device:
    """A cpu/cuda device that exists here, or a CLIError saying what to pass instead."""
    if text is None:
        return torch.device("cuda" if cuda_state()[0] else "cpu")
    low = text.strip().lower()
    if low in ("gpu", "nvidia") or low.startswith("gpu:"):
        ok, why = cuda_state()
        raise CLIError(f"{option}: {text!r} is not a torch device name: an NVIDIA GPU is 'cuda' (or 'cuda:N')"
                       + ("" if ok else f"; but here: {why}; use --device cpu"))
    try:
        dev = torch.device(low)
    except (RuntimeError, ValueError, TypeError):
        raise CLIError(f"{option}: expected 'cpu', 'cuda' or 'cuda:N', got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        extra = " (Apple GPUs are not supported)" if dev.type == "mps" else ""
        raise CLIError(f"{option}: sws_kernels runs on 'cpu' and 'cuda' (NVIDIA) devices, not {dev.type!r}{extra}; "
                       f"use --device cpu")
    if dev.type == "cuda":
        ok, why = cuda_state()
        if not ok:
            raise CLIError(f"{option}: {text!r} requested but {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"{option}: {text!r} requested but there are {torch.cuda.device_count()} CUDA devices "
                           f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev


# -- outputs ----------------------------------------------------------------------------------------

def _probe_dir(d: str, option: str, what: str) -> None:
    """Create and delete a temporary file in ``d`` (permissions, read-only file systems, quotas of 0)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".sws-write-test-"):
            pass
    except OSError as e:
        raise CLIError(f"{option}: cannot write {what} in {d!r} ({e.strerror or e}); choose a writable "
                       f"location") from None


def _check_writable(path: str, option: str) -> None:
    """``path`` can be written as a file: its directory exists and is writable, it is not a directory."""
    if os.path.isdir(path):
        raise CLIError(f"{option}: {path!r} is a directory, expected a file path")
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.exists(parent):
        raise CLIError(f"{option}: directory {parent!r} does not exist; create it first or choose another path")
    if not os.path.isdir(parent):
        raise CLIError(f"{option}: {parent!r} is not a directory")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CLIError(f"{option}: {path!r} exists and is not writable")
    _probe_dir(parent, option, os.path.basename(path))


def _check_out_dir(path: str, option: str) -> None:
    """``path`` is (or can be created as) a writable directory; nothing is created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{option}: {path!r} exists and is not a directory")
    d = os.path.abspath(path)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise CLIError(f"{option}: cannot create directory {path!r}: {d!r} is not a directory")
    _probe_dir(d, option, "files")


def _check_readable(path: str, option: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"{option}: {path!r} does not exist")
    if not os.path.isfile(path):
        raise CLIError(f"{option}: {path!r} is not a file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{option}: {path!r} is not readable")


# -- plug-ins: module:function ----------------------------------------------------------------------

def _cwd_on_path() -> None:
    """`python -m` puts the current directory on sys.path, the `sws-kernels` script does not: plug-ins in the
    current directory import either way."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def load_callable(spec: str, option: str):
    """``"module:function"`` (module importable from the current directory or the Python path) -> the callable."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(part.strip() for part in spec.split(":")):
        raise CLIError(f"{option}: expected 'module:function' (e.g. mymodels:build for build() in ./mymodels.py), "
                       f"got {spec!r}")
    mod_name, attr = (part.strip() for part in spec.split(":"))
    if mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name:
        guess = mod_name[:-3] if mod_name.endswith(".py") else mod_name
        raise CLIError(f"{option}: expected a module name, not a file path: {guess.replace(os.sep, '.').replace('/', '.')}"
                       f":{attr} (run from the directory above it, or add that directory to PYTHONPATH)")
    _cwd_on_path()
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise CLIError(f"{option}: no module {e.name!r} in the current directory ({os.getcwd()}) or on the Python "
                           f"path: run from the directory holding {e.name.replace('.', '/')}.py, or add its directory "
                           f"to PYTHONPATH (PYTHONPATH=/path/to/dir sws-kernels ...)") from None
        raise CLIError(f"{option}: importing {mod_name!r} failed: it imports {e.name!r}, which is not installed") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: say so, in one line
        raise CLIError(f"{option}: importing {mod_name!r} raised {type(e).__name__}: {e}") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        have = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                      and getattr(v, "__module__", None) == mod.__name__)
        raise CLIError(f"{option}: module {mod_name!r} has no {'callable ' if fn is not None else ''}{attr!r}"
                       + (f"; it defines {', '.join(have[:8])}" if have else ""))
    return fn


def make_model(fn, spec: str, option: str, *, input_shape: Optional[Sequence[int]] = None,
               num_classes: Optional[int] = None, how_to_give: str = ""):
    """Call a model factory in the one form every option takes: ``FN(input_shape=, num_classes=)``, passing the
    known values FN declares (all of them when it takes ``**kwargs``)."""
    from torch import nn

    known = {k: v for k, v in (("input_shape", tuple(input_shape) if input_shape is not None else None),
                               ("num_classes", num_classes)) if v is not None}
    kwargs = known
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None:
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in known.items() if k in params}
        required = [n for n, p in params.items() if p.default is p.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs]
        other = [n for n in required if n not in ("input_shape", "num_classes")]
        if other:
            raise CLIError(f"{option}: {spec} requires {', '.join(other)}; expected the form {FACTORY_FORM}")
        if required:
            raise CLIError(f"{option}: {spec} requires {' and '.join(required)}, unknown here"
                           + (f": {how_to_give}" if how_to_give else ""))
    try:
        model = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's factory failed: name it and the arguments it got
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise CLIError(f"{option}: {spec}({args}) raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise CLIError(f"{option}: {spec} returned a {type(model).__name__}, expected a torch.nn.Module "
                       f"({FACTORY_FORM})")
    return model


def _shape_list(text: str):
    try:
        vals = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,8,8, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,8,8, got {text!r}")
    return vals


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
    ok, why = cuda_state()
    print(f"CPU threads: {torch.get_num_threads()}  CUDA: {torch.cuda.get_device_name(0) if ok else 'none: ' + why}")
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

    dev = parse_device(None)
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
    d.add_argument("--components", type=int, help="codebook size K requested from to_sws (default 64; --fast 32)")
    d.add_argument("--batch-size", type=int, help="training batch size (default 64)")
    d.add_argument("--lr", type=float, help="learning rate of the deterministic and mean-field training")
    d.add_argument("--sws-lr", type=float, help="learning rate of the SWS fine-tuning")
    d.add_argument("--kl-weight", type=float, help="beta of the ELBO (default 1: the exact ELBO)")
    d.add_argument("--prior-sigma", type=float, help="prior std of the mean-field weights (default 1, as bayesian-torch)")
    d.add_argument("--width", type=int, help="channels of the built-in CNN's first conv (default 16; --fast 8)")
    d.add_argument("--seed", type=int, help="seed of the split, inits and noise (default 0)")
    d.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    d.add_argument("--threads", type=int, help="CPU threads during the demo (default 1: the model is tiny)")
    d.add_argument("--out", help="directory for pictures, results and models (default ./sws_demo)")
    d.add_argument("--no-out", action="store_true", help="save nothing")
    d.add_argument("--data", metavar="MODULE:FN",
                   help="your data: FN(batch_size=, seed=) -> (train_loader, test_loader) of (x, y) batches "
                        "(MODULE is imported from the current directory or PYTHONPATH)")
    d.add_argument("--model", metavar="MODULE:FN",
                   help=f"your deterministic model: {FACTORY_FORM}; its Linear/Conv layers become Bayesian. The same "
                        "FN works as --arch of convert and plot")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(fn=cmd_demo)


def cmd_demo(args) -> int:
    from . import demo

    dev = parse_device(args.device)
    args.device = str(dev)  # resolved here: the demo never asks torch.cuda (no driver warning without a GPU)
    if args.out and not args.no_out:
        _check_out_dir(args.out, "--out")
    elif not args.no_out:
        _check_out_dir("sws_demo", "--out")
    for opt in ("data", "model"):
        if getattr(args, opt):
            load_callable(getattr(args, opt), f"--{opt}")  # import errors with the PYTHONPATH hint, first
    if args.data or args.model:
        _demo_preflight(args, demo)
    return demo.main(args)


def _demo_preflight(args, demo) -> None:
    """Before minutes of training: the plug-ins' model runs forward on one batch of the plug-ins' data."""
    fields = {f for f in demo.DemoConfig.__dataclass_fields__}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None and k != "fast"}
    given.update(progress=False, out=None, device="cpu")
    cfg = demo.DemoConfig.fast_config(**given) if args.fast else demo.DemoConfig(**given)
    cfg.validate()
    train, _, factory, data_desc, input_shape, num_classes = demo._build(cfg, torch.device("cpu"))
    x, y = demo._first_batch(train, "--data")
    if y.is_floating_point() or y.is_complex() or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise CLIError(f"--data: {args.data} yields targets of dtype {y.dtype} and shape {tuple(y.shape)} for inputs of "
                       f"shape {tuple(x.shape)}; expected class indices, an integer tensor [batch]")
    who = f"--model {args.model}" if args.model else "the demo's digits CNN (no --model)"
    try:
        model = factory().eval()
    except demo.DemoError:
        raise
    except Exception as e:  # noqa: BLE001 - the built-in CNN cannot take these inputs
        raise CLIError(f"--data: {who} cannot be built for inputs of shape {input_shape} from {data_desc} "
                       f"({type(e).__name__}: {e}); it takes images [C, H, W]: pass --model module:FN for "
                       f"these inputs") from None
    try:
        with torch.no_grad():
            out = model(x[:2])
    except Exception as e:  # noqa: BLE001 - the model does not take these inputs: say which option to change
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        fix = (f"make FN build a model for input_shape={input_shape} (it is passed when FN declares it)"
               if args.model else "pass --model module:FN for these inputs")
        raise CLIError(f"{'--model' if args.model else '--data'}: the forward of {who} failed on a batch of "
                       f"{data_desc} (x of shape {tuple(x.shape)}): {type(e).__name__}: {first}; {fix}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape != (x[:2].shape[0], num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CLIError(f"{'--model' if args.model else '--data'}: {who} returned {got} for a batch of "
                       f"{x[:2].shape[0]} inputs; expected logits [batch, {num_classes}] ({num_classes} classes in "
                       f"{data_desc}; num_classes= is passed when FN declares it)")


def _int_list(name: str):
    def parse(text: str):
        try:
            vals = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not vals or min(vals) < 1:
            raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
        return vals
    return parse


def _positive(name: str, kind=int):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not v > 0 or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
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
    b.add_argument("--mode", choices=("paper", "hierarchical", "mean"), default="paper", help=MODE_HELP)
    b.add_argument("--methods", type=lambda t: t.split(","), default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    b.add_argument("--passes", type=lambda t: t.split(","), default=list(PASSES),
                   help=f"comma-separated subset of {','.join(PASSES)}")
    b.add_argument("--min-time", type=_positive("--min-time", float), help="CPU: seconds of timed rounds per "
                   "measurement (default 0.1; --quick 0.01)")
    b.add_argument("--threads", type=_positive("--threads"), help="CPU threads (default: torch's default, "
                   "torch.get_num_threads())")
    b.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
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
    dev = parse_device(args.device)
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
    if dev.type == "cpu" and torch.get_num_threads() > 1 and hasattr(os, "getloadavg"):
        load, ncpu = os.getloadavg()[0], os.cpu_count() or 1
        if load >= 0.75 * ncpu:
            # measured on a 2-core machine under load: any 2-thread matmul (torch's own, the baselines') lost whole
            # time slices, 10-1000x slower than with 1 thread, and the ratios meant nothing either way
            print(f"note: load average {load:.1f} on {ncpu} CPUs: with {torch.get_num_threads()} threads every "
                  f"multi-threaded op (torch's matmuls in every column) waits for time slices here; --threads 1 "
                  f"gives stable numbers", file=sys.stderr)
    if args.csv and "sws" in args.methods and len(args.methods) == 1:
        print("note: --methods sws alone has no baseline: `sws-kernels plot --bench` needs one more method",
              file=sys.stderr)
    rows = bench.run_bench(**kw, progress=lambda line: print(line, file=sys.stderr))
    print(bench.format_table(rows))
    if args.csv:
        bench.write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    return 0


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
    model = io.load(path, root, strict=False, rebuild=True)  # the skeleton has no layers of its own to keep
    have = model.state_dict()
    for key, t in state.items():
        if key not in have:
            mpath, _, leaf = key.rpartition(".")
            ensure(mpath).register_buffer(leaf, t)
    return model


def _load_model_file(path: str, option: str, arch: Optional[str] = None, allow_pickle: bool = False, *,
                     arch_kwargs: Optional[dict] = None, how_to_give: str = ""):
    """(model, how) from an sws_kernels file, a torch.save'd state_dict/checkpoint (needs ``arch``) or, with
    ``allow_pickle``, a torch.save'd whole module. ``arch`` is ``module:FN`` in the factory form (FACTORY_FORM),
    called with ``arch_kwargs`` (input_shape=, num_classes=) as far as they are known."""
    from torch import nn
    from . import io

    _check_readable(path, option)
    with open(path, "rb") as f:
        magic = f.read(8)
    factory = None
    if arch:
        fn = load_callable(arch, "--arch")

        def factory():
            return make_model(fn, arch, "--arch", **(arch_kwargs or {}), how_to_give=how_to_give)
    if magic == io.MAGIC:
        try:
            if factory is not None:
                return io.load(path, factory()), "sws_kernels file loaded into --arch"
            return skeleton_from_file(path), "sws_kernels file"
        except ValueError as e:
            raise CLIError(f"{option}: {e}") from None
    # torch.save writes a zip archive (torch >= 1.6) or, legacy, a pickle stream (first byte 0x80): anything
    # else is not a checkpoint at all, and --allow-pickle would not help.
    looks_torch = magic[:4] == b"PK\x03\x04" or magic[:1] == b"\x80"
    if not looks_torch:
        raise CLIError(f"{option}: {path!r} is neither an sws_kernels file nor a torch checkpoint (it starts with "
                       f"{magic!r}); expected a file written by sws.save or torch.save")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling error: explain the choices
        if not allow_pickle:
            raise CLIError(f"{option}: {path!r} is a torch.save'd file that is not a plain checkpoint (state_dict): "
                           f"if it is a whole module you trust, pass --allow-pickle (unpickling runs code from the "
                           f"file). Loader said: {type(e).__name__}") from None
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
        if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CLIError(f"{option}: {path!r} holds a dict that is not a state_dict (keys: {list(obj)[:6]})")
        if factory is None:
            raise CLIError(f"{option}: {path!r} is a state_dict without the model's code: pass --arch "
                           f"module:FN, {FACTORY_FORM}, returning the (bayesian-torch or sws_kernels mean-field) "
                           f"architecture")
        model = factory()
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise CLIError(f"--arch: {arch} does not match the state_dict in {path!r}: {detail}") from None
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
    c.add_argument("--arch", metavar="MODULE:FN", help=f"the model architecture, {FACTORY_FORM}; needed for a "
                   "state_dict checkpoint, optional for an sws_kernels file")
    c.add_argument("--input-shape", type=_shape_list, metavar="C,H,W",
                   help="input_shape passed to --arch's FN when it takes one (e.g. 1,8,8 for the demo's digits)")
    c.add_argument("--num-classes", type=_positive("--num-classes"), help="num_classes passed to --arch's FN")
    c.add_argument("--allow-pickle", action="store_true", help="allow IN to be a pickled module (runs its code)")
    c.add_argument("--components", type=_auto_or(_positive("--components")), default=None,
                   help="codebook size K, or 'auto' (default: to_sws's default)")
    c.add_argument("--tau-w", type=_auto_or(_non_negative), default=None,
                   help="|mu| >= tau_w makes an outlier, or 'auto' (default: to_sws's default)")
    c.add_argument("--tau-d", type=_non_negative, default=1e-4, help="W2 merge threshold (default 1e-4)")
    c.add_argument("--mode", choices=("paper", "hierarchical", "mean"), default="paper", help=MODE_HELP)
    c.add_argument("--seed", type=int, default=0, help="seed of the GMM fit (default 0)")
    c.add_argument("--report", metavar="PATH", help="also write the report as JSON")
    c.set_defaults(fn=cmd_convert)


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return v


def _auto_or(parse):
    def p(text: str):
        return "auto" if text.strip().lower() == "auto" else parse(text)
    return p


# to_sws errors name its keyword arguments; the CLI user needs the option that sets them (or that helps)
_CONVERT_HINTS = (
    ("min_component_size", "fewer components give each one more members: try a smaller --components (e.g. {k4})"),
    ("num_components", "set it with --components"),
    ("tau_w", "set it with --tau-w"),
    ("tau_d", "set it with --tau-d"),
)


def cmd_convert(args) -> int:
    import json

    from . import io
    from .convert import from_bayesian_torch, to_sws
    from .demo import _jsonable

    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise CLIError("OUT: must differ from IN (the input would be overwritten)")
    _check_readable(args.input, "IN")
    _check_writable(args.output, "OUT")
    if args.report:
        _check_writable(args.report, "--report")
        if os.path.abspath(args.report) in (os.path.abspath(args.output), os.path.abspath(args.input)):
            raise CLIError("--report: must differ from IN and OUT")
    model, how = _load_model_file(
        args.input, "IN", args.arch, args.allow_pickle,
        arch_kwargs=dict(input_shape=args.input_shape, num_classes=args.num_classes),
        how_to_give="pass --input-shape C,H,W and/or --num-classes N (what the model was built with), or leave "
                    "out --arch for an sws_kernels file (it carries its layers)")
    model, bt = from_bayesian_torch(model)
    if bt["converted"]:
        print(f"bayesian-torch layers converted: {', '.join(bt['converted'])}")
    kw = {k: v for k, v in (("num_components", args.components), ("tau_w", args.tau_w)) if v is not None}
    import warnings as _w

    try:
        with _w.catch_warnings(record=True) as caught:  # printed below as `warning:` lines, not Python's format
            _w.simplefilter("always")
            model, rep = to_sws(model, tau_d=args.tau_d, mode=args.mode, seed=args.seed,
                                progress=sys.stderr.isatty(), **kw)
    except (TypeError, ValueError) as e:
        msg = str(e)
        k = args.components if isinstance(args.components, int) else None
        for key, hint in _CONVERT_HINTS:
            if msg.startswith(key) or f"{key}:" in msg or f"{key} " in msg:
                msg += "; " + hint.format(k4=f"--components {max(1, k // 4)}" if k else "--components 64")
                break
        raise CLIError(f"IN: cannot convert {args.input!r}: {msg}") from None
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
    warnings = list(dict.fromkeys(str(w.message) for w in caught))
    for note in rep.get("notes", []):
        if note not in warnings:
            print(f"note: {note}")
    if nbytes >= in_bytes and not any("not fewer" in w for w in warnings):
        warnings.append(
            f"the SWS file ({nbytes:,} bytes) is not smaller than IN ({in_bytes:,} bytes): {rep['outliers']:,} of "
            f"{rep['num_weights']:,} weights are outliers (stored with their own mu and rho) and the codebook has "
            f"{rep['gaussians']} Gaussians; try a smaller --components"
            + (f" (K = {args.components} asked)" if isinstance(args.components, int) else "")
            + " or a larger --tau-w")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(_jsonable({**rep, "input": args.input, "output": args.output, "input_bytes": in_bytes,
                                 "output_bytes": nbytes, "warnings": warnings}), f, indent=1)
        print(f"wrote {args.report}")
    return 0


# -- plot -------------------------------------------------------------------------------------------

def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot", help="pictures from a saved SWS model (codebook, reliability) or a bench CSV (speed-up chart)",
        description="--model FILE: the codebook in (mu, rho) space with 95% ellipses and weights coloured "
                    "inlier/ellipse/outlier (--mean-field FILE: the weights' own mean-field (mu, rho)); with an "
                    "architecture (--arch, or the demo's digits CNN when the file matches it) also a reliability "
                    "diagram on the test split of --data (default: digits). --bench CSV: speed-up chart.")
    p.add_argument("--model", metavar="FILE", help="an SWS model saved by sws.save (e.g. sws_demo/sws_model.sws)")
    p.add_argument("--mean-field", metavar="FILE", help="the mean-field model it was converted from (sws.save)")
    p.add_argument("--arch", metavar="MODULE:FN", help=f"architecture for the reliability diagram, {FACTORY_FORM}; "
                   "input_shape and num_classes come from --data")
    p.add_argument("--data", metavar="MODULE:FN", help="FN(batch_size=, seed=) -> (train, test) loaders "
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
    from . import plots

    if args.mean_field and not args.model:
        raise CLIError("--mean-field: needs --model (the SWS model converted from it)")
    if not args.model and not args.bench:
        raise CLIError("nothing to plot: pass --model FILE and/or --bench CSV")
    _check_out_dir(args.out, "--out")
    for path, opt in ((args.bench, "--bench"), (args.model, "--model"), (args.mean_field, "--mean-field")):
        if path:
            _check_readable(path, opt)
    arch_fn = load_callable(args.arch, "--arch") if args.arch else None
    data_fn = load_callable(args.data, "--data") if args.data else None
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out: cannot create directory {args.out!r} ({e.strerror})") from None
    written = []
    if args.bench:
        try:
            written.append(plots.plot_bench(args.bench, os.path.join(args.out, "bench.png")))
        except (ValueError, KeyError) as e:
            raise CLIError(f"--bench: {str(e).removeprefix('csv: ')}") from None
        except (UnicodeDecodeError, csv.Error) as e:
            raise CLIError(f"--bench: {args.bench!r} is not a `sws-kernels bench --csv` file ({e})") from None
    if args.model:
        from .nn import SWS_LAYERS

        sws_model, _ = _load_model_file(args.model, "--model")
        if not any(isinstance(m, SWS_LAYERS) for m in sws_model.modules()):
            raise CLIError(f"--model: {args.model!r} has no SWS layer (convert it first: sws-kernels convert)")
        mf = _load_model_file(args.mean_field, "--mean-field")[0] if args.mean_field else None
        written.append(plots.plot_codebook(sws_model, os.path.join(args.out, "codebook.png"), mean_field=mf))
        if arch_fn is not None or args.data is None:
            factory = None if arch_fn is not None else _demo_arch_for(args.model)
            if arch_fn is not None or factory is not None:
                written.append(_reliability_from_file(args, arch_fn, factory, data_fn))
            else:
                print("reliability diagram skipped: pass --arch module:FN (the model's architecture) to evaluate it")
        else:
            print("reliability diagram skipped: --data needs --arch module:FN (the model's architecture)")
    for w in written:
        print(f"wrote {w}")
    return 0


def _reliability_from_file(args, arch_fn, factory, data_fn):
    from . import io, plots
    from .bayes import predict
    from .demo import DemoError, _call_with_supported, _first_batch, digits_loaders

    data_desc = args.data or "the demo's digits split"
    if data_fn is not None:
        try:
            loaders = _call_with_supported(data_fn, batch_size=256, seed=args.seed)
        except Exception as e:  # noqa: BLE001 - the user's loader failed: name it
            raise CLIError(f"--data: {args.data} raised {type(e).__name__}: {e}") from None
        if not (isinstance(loaders, (tuple, list)) and len(loaders) == 2):
            raise CLIError(f"--data: {args.data} must return (train_loader, test_loader), got {type(loaders).__name__}")
        test = loaders[1]
    else:
        _, test = digits_loaders(256, args.seed)
    try:
        x0, _ = _first_batch(test, "--data")
    except DemoError as e:
        raise CLIError(str(e)) from None
    num_classes = 1 + max(int(y.max()) for _, y in test)
    if arch_fn is not None:
        model = make_model(arch_fn, args.arch, "--arch", input_shape=tuple(x0.shape[1:]), num_classes=num_classes)
    else:
        model = factory()
    try:
        model = io.load(args.model, model)
    except ValueError as e:
        why = str(e).split("; pass rebuild=True")[0]  # the Python API's remedy; the CLI's is the option below
        built = (f"{args.arch} built for input_shape={tuple(x0.shape[1:])}, num_classes={num_classes} (from "
                 f"{data_desc})" if arch_fn is not None else "the demo's CNN")
        raise CLIError(f"--arch: {built} does not match {args.model!r}: {why}; pass the --arch (and --data) the "
                       f"model was made with") from None
    model.eval()
    probs, ys = [], []
    try:
        for x, y in test:
            probs.append(predict(model, x, args.samples))
            ys.append(y)
    except Exception as e:  # noqa: BLE001 - a model whose inputs are not these: say which option to change
        raise CLIError(f"--arch: the model's forward failed on {data_desc} (inputs of shape {tuple(x0.shape[1:])}): "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; pass --data module:FN giving "
                       f"the inputs the model was trained on") from None
    p = torch.cat(probs, 1)
    if p.dim() != 3 or p.shape[-1] < 2:
        raise CLIError(f"--arch: expected the model to return class logits [batch, classes], got predictions of "
                       f"shape {tuple(p.shape[1:])} per sample")
    name = os.path.basename(args.model)
    return plots.plot_reliability({name: (p, torch.cat(ys))}, os.path.join(args.out, "reliability.png"))


COMMANDS = ("info", "quick", "demo", "bench", "convert", "plot")


def build_parser() -> argparse.ArgumentParser:
    """The `sws-kernels` argument parser (tests check the README's command lines against it)."""
    p = _Parser(prog="sws-kernels", description="Fused kernels for stochastic weight sharing BNNs.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("info", help="backends, versions and why a backend is unavailable").set_defaults(fn=cmd_info)
    q = sub.add_parser("quick", help="reconstruct a sampled layer on every backend and time it (default)")
    q.add_argument("--weights", type=_positive("--weights"), default=4 * 1024 * 1024,
                   help="weights in the layer (default 4M)")
    q.add_argument("--components", type=_positive("--components"), default=4096,
                   help="codebook components K (default 4096)")
    q.add_argument("--samples", type=_positive("--samples"), default=4, help="Monte Carlo samples S (default 4)")
    q.add_argument("--mode", choices=("paper", "hierarchical", "mean"), default="paper", help=MODE_HELP)
    q.add_argument("--repeat", type=_positive("--repeat"), default=3,
                   help="timed repetitions after one warm-up (the best is reported; default 3)")
    q.set_defaults(fn=cmd_quick)
    _add_demo(sub)
    _add_bench(sub)
    _add_convert(sub)
    _add_plot(sub)
    for sp in sub.choices.values():  # `sws-kernels CMD ... --debug` works too
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    # A CUDA build of torch on a machine without a GPU warns "CUDA initialization: CUDA driver version is
    # insufficient ..." wherever torch.cuda is asked; the CLI says "no GPU" itself (cuda_state, `info`).
    warnings.filterwarnings("ignore", message=r"CUDA initialization:", category=UserWarning)
    p = build_parser()
    if not any(a in COMMANDS or a in ("-h", "--help") for a in argv):
        argv = ["quick", *argv]  # the default command, with its options: `sws-kernels --weights 100000`
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except CLIError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - not a known user mistake: one line, the traceback on request
        from .demo import DemoError

        if args.debug:
            raise
        if isinstance(e, DemoError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {msg} (unexpected; rerun with --debug for the traceback and report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
