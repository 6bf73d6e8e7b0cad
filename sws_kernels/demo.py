"""``sws-kernels demo``: the whole idea on a small data set that ships with scikit-learn (no downloads).

Pipeline (SPEC.md section 8 end to end):

1. train a small CNN on scikit-learn's 8x8 digits as a plain deterministic network (the reference point);
2. train the same architecture as a mean-field BNN (``to_mean_field``, our fused layers, ELBO);
3. compress the mean-field BNN with ``to_sws`` (one shared codebook of K 2D Gaussians);
4. fine-tune the SWS BNN end to end (ELBO; gradients flow through the fused reconstruct kernels);
5. evaluate all three with S Monte Carlo samples on the test split and on uniform-noise inputs, print one
   table and save pictures (codebook in (mu, rho) space, reliability diagram).

A user's own data and model plug in through Python import paths (``--data pkg.mod:fn``, ``--model
pkg.mod:fn``, see :func:`load_callable`); ``run_demo`` is the programmatic entry point and returns every
number it prints, so the tests check the table's values rather than parse it.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["DemoConfig", "run_demo", "digits_loaders", "digits_cnn", "load_callable", "model_size", "format_table"]


class DemoError(RuntimeError):
    """A user-facing error (bad option, missing optional dependency, a plug-in that does not fit)."""


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DemoConfig:
    epochs: int = 30              # deterministic and mean-field training epochs
    sws_epochs: Optional[int] = None   # SWS fine-tuning epochs (default: a third of ``epochs``, at least 1)
    samples: int = 16             # Monte Carlo samples at evaluation
    train_samples: int = 1        # Monte Carlo samples per training step (the usual single-sample ELBO)
    components: int = 64          # codebook size K requested from to_sws (64: issue 13's >= 50x fewer parameters)
    batch_size: int = 64
    lr: float = 3e-3
    sws_lr: float = 1e-3
    kl_weight: float = 1.0        # beta of the ELBO (1 = the exact ELBO)
    prior_sigma: float = 1.0      # prior std of the mean-field weights, N(0, prior_sigma^2) (bayesian-torch's default)
    width: int = 16               # channels of the first conv of the built-in CNN
    seed: int = 0
    out: Optional[str] = "sws_demo"   # where pictures and results go (None: nowhere)
    device: Optional[str] = None  # default: cuda when available, else cpu
    threads: Optional[int] = None  # CPU intra-op threads during the demo (default 1, see run_demo)
    data: Optional[str] = None    # "pkg.mod:fn" -> (train_loader, test_loader)
    model: Optional[str] = None   # "pkg.mod:fn" -> a deterministic nn.Module
    progress: bool = True
    fast: bool = False

    @classmethod
    def fast_config(cls, **overrides) -> "DemoConfig":
        """Seconds, for CI: fewer epochs, fewer samples, a narrower CNN, a smaller codebook."""
        base = dict(epochs=8, sws_epochs=3, samples=4, components=32, width=8, lr=1e-2, sws_lr=3e-3, fast=True)
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        for name in ("epochs", "samples", "train_samples", "components", "batch_size", "width", "threads"):
            v = getattr(self, name)
            if name == "threads" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DemoError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v!r}")
        if self.sws_epochs is not None and (not isinstance(self.sws_epochs, int) or self.sws_epochs < 1):
            raise DemoError(f"--sws-epochs: expected an integer >= 1, got {self.sws_epochs!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            # scikit-learn's split takes seeds in [0, 2^32)
            raise DemoError(f"--seed: expected an integer in [0, 2**32), got {self.seed!r}")
        for name in ("lr", "sws_lr", "prior_sigma"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise DemoError(f"--{name.replace('_', '-')}: expected a positive number, got {v!r}")
        if not (isinstance(self.kl_weight, (int, float)) and math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise DemoError(f"--kl-weight: expected a non-negative number, got {self.kl_weight!r}")
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise DemoError(f"--device: expected a torch device such as 'cpu' or 'cuda', got {self.device!r}") from e
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise DemoError(f"--device: {self.device!r} requested but CUDA is not available on this machine")


# --------------------------------------------------------------------------------------------------
# data and model (built-in defaults and user plug-ins)
# --------------------------------------------------------------------------------------------------

def _require(module: str, extra: str = "demo"):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DemoError(f"the demo needs {module!r}: pip install 'sws_kernels[{extra}]' "
                        f"(scikit-learn, matplotlib, tqdm)") from e


def digits_loaders(batch_size: int = 64, seed: int = 0, test_fraction: float = 0.25):
    """scikit-learn's 8x8 digits (1797 images, 10 classes; shipped inside scikit-learn, no download).

    Pixels 0..16 are scaled to [0, 1]; a stratified split with ``seed``. Returns ``(train, test)``
    DataLoaders of ``(x [B, 1, 8, 8] float32, y [B] int64)``.
    """
    datasets = _require("sklearn.datasets")
    model_selection = _require("sklearn.model_selection")
    from torch.utils.data import DataLoader, TensorDataset

    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = model_selection.train_test_split(range(len(y)), test_size=test_fraction, random_state=seed,
                                              stratify=d.target)
    tr, te = torch.tensor(tr), torch.tensor(te)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=batch_size, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(x[te], y[te]), batch_size=512, shuffle=False)
    return train, test


def digits_cnn(input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10, width: int = 16) -> nn.Module:
    """conv3x3(width) - ReLU - conv3x3(2 width) - ReLU - maxpool2 - linear(64) - ReLU - linear(classes)."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * width * (h // 2) * (w // 2), 64), nn.ReLU(),
        nn.Linear(64, num_classes))


def load_callable(spec: str, option: str) -> Callable:
    """``"pkg.mod:name"`` -> the callable ``name`` of module ``pkg.mod`` (``option`` names the CLI flag)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise DemoError(f"{option}: expected 'package.module:function', got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise DemoError(f"{option}: cannot import module {mod_name!r} ({e})") from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise DemoError(f"{option}: module {mod_name!r} has no callable {attr!r}")
    return fn


def _call_with_supported(fn: Callable, **kwargs):
    """Call ``fn`` with the keyword arguments it accepts (a plug-in may take none of them)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _first_batch(loader, option: str):
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise DemoError(f"{option}: the loader yields no batch") from None
    except TypeError as e:
        raise DemoError(f"{option}: expected an iterable of (x, y) batches, got {type(loader).__name__}") from e
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
            and isinstance(batch[1], torch.Tensor)):
        raise DemoError(f"{option}: expected batches (x: tensor, y: class-index tensor), got {type(batch).__name__}")
    return batch[0], batch[1]


# --------------------------------------------------------------------------------------------------
# sizes, training, evaluation
# --------------------------------------------------------------------------------------------------

def model_size(model: nn.Module) -> Tuple[int, int]:
    """(trainable parameters, bytes stored): every parameter and persistent buffer counted once.

    A shared codebook appears under every SWS layer's prefix in ``state_dict`` but is one tensor, so
    tensors are de-duplicated by identity; bytes are what a checkpoint of the model holds (for SWS: the
    codebook, the uint8/int16 labels, the ellipse and outlier buffers, the biases).
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return trainable, total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(model: nn.Module, x: torch.Tensor, samples: int, bayesian: bool) -> torch.Tensor:
    """Logits [B, C] (one sample) or [S, B, C] (S samples folded into the batch, sws.nn.sample_mode)."""
    from .nn import sample_mode

    if not bayesian or samples == 1:
        out = model(x)
        return out[0] if isinstance(out, tuple) else out
    with sample_mode(samples):
        out = model(x.repeat(samples, *([1] * (x.dim() - 1))))
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(samples, x.shape[0], *out.shape[1:])


def _train(model, train_loader, *, epochs, lr, device, bayesian, num_data, cfg, desc) -> List[float]:
    """Adam on cross-entropy (deterministic) or the negative ELBO; returns the seconds of each epoch."""
    from . import bayes

    tqdm = _require("tqdm").tqdm
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    ce = nn.CrossEntropyLoss()
    times = []
    model.train()
    bar = tqdm(range(epochs), desc=desc, disable=not cfg.progress, leave=True, file=sys.stderr, ncols=90)
    for _ in bar:
        _sync(device)
        t0 = time.perf_counter()
        tot, nb = 0.0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = _forward(model, x, cfg.train_samples, bayesian)
            loss = (bayes.elbo_loss(logits, y, model, num_data, beta=cfg.kl_weight) if bayesian
                    else ce(logits, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            nb += 1
        sched.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{tot / max(nb, 1):.3f}")
    return times


@torch.no_grad()
def _predict_probs(model, loader, *, samples, device, bayesian) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Per-sample probabilities [S, N, C] on CPU, targets [N] and the seconds the pass took."""
    from . import bayes

    model.eval()
    probs, targets = [], []
    _sync(device)
    t0 = time.perf_counter()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if bayesian:
            p = bayes.predict(model, x, samples)
        else:
            out = model(x)
            p = torch.softmax((out[0] if isinstance(out, tuple) else out).float(), -1).unsqueeze(0)
        probs.append(p.cpu())
        targets.append(y.cpu())
    _sync(device)
    dt = time.perf_counter() - t0
    return torch.cat(probs, 1), torch.cat(targets), dt


def _metrics(probs, target, noise_probs) -> Dict[str, float]:
    from . import metrics as M

    return {
        "accuracy": float(M.accuracy(probs, target)),
        "nll": float(M.nll(probs, target)),
        "ece": float(M.ece(probs, target)),
        "brier": float(M.brier(probs, target)),
        "entropy_in": float(M.predictive_entropy(probs).mean()),
        "entropy_noise": float(M.predictive_entropy(noise_probs).mean()),
    }


def _noise_loader(test_loader, seed: int, limit: int = 512):
    """Uniform noise over the test inputs' value range, shaped like them (out-of-distribution inputs)."""
    xs = []
    n = 0
    for x, _ in test_loader:
        xs.append(x)
        n += x.shape[0]
        if n >= limit:
            break
    x = torch.cat(xs)[:limit]
    lo, hi = float(x.min()), float(x.max())
    g = torch.Generator().manual_seed(seed + 1)
    noise = lo + (hi - lo) * torch.rand(x.shape, generator=g)
    return [(noise[i:i + 512], torch.zeros(min(512, noise.shape[0] - i), dtype=torch.int64))
            for i in range(0, noise.shape[0], 512)]


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------

_COLUMNS = [("model", "{}"), ("acc", "{:.4f}"), ("NLL", "{:.4f}"), ("ECE", "{:.4f}"), ("Brier", "{:.4f}"),
            ("H(in)", "{:.3f}"), ("H(noise)", "{:.3f}"), ("params", "{:,}"), ("bytes", "{:,}"),
            ("train s/ep", "{:.3f}"), ("infer s/ep", "{:.3f}")]


def format_table(rows: Sequence[Dict]) -> str:
    """A GitHub-markdown table (readable in a terminal too) of the demo's rows."""
    keys = ["model", "accuracy", "nll", "ece", "brier", "entropy_in", "entropy_noise", "params", "bytes",
            "train_s_per_epoch", "infer_s_per_epoch"]
    # a row that did not train (the converted model before fine-tuning) shows "-" for the training time
    cells = [["-" if k == "train_s_per_epoch" and not r.get("epochs", 1) else fmt.format(r[k])
              for (_, fmt), k in zip(_COLUMNS, keys)] for r in rows]
    heads = [h for h, _ in _COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths))) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(heads), sep, *(line(c) for c in cells)])


# --------------------------------------------------------------------------------------------------
# compression: our numbers next to the paper's (issue 13)
# --------------------------------------------------------------------------------------------------

#: What the seed paper reports for ResNet-18 on CIFAR-10 (the authors' README; /work/shared/BACKGROUND.md):
#: counts after to_sws and the fine-tuned SWS model's test metrics; "~50x" parameters and "75% smaller"
#: (4x) are the abstract's compression claims against the mean-field BNN.
PAPER_CIFAR10 = {"model": "ResNet-18, CIFAR-10", "weights": 11_200_000, "gaussians": 1569, "ellipses": 57,
                 "outliers": 123_310, "accuracy": 0.918, "nll": 0.313, "ece": 0.034, "params_ratio": 50.0,
                 "bytes_ratio": 4.0}

#: issue 13's goals for the demo with its defaults (fine-tuned SWS model against the mean-field model)
GOALS = {"params_ratio": 50.0, "bytes_ratio": 4.0, "file_ratio": 5.0, "accuracy_drop": 0.01}


def _file_bytes(model: nn.Module) -> int:
    """Bytes of the model's sws_kernels.save file."""
    import os
    import tempfile

    from .io import save

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.sws")
        save(model, p)
        return os.path.getsize(p)


def compression_summary(rows: Sequence[Dict], report: Dict, mf_file: int, sws_file: int) -> Dict:
    """The fine-tuned SWS model against the mean-field model it came from: ratios, metric differences and
    issue 13's goals (each with its value, target and whether it is met)."""
    mf = next(r for r in rows if r["model"] == "mean-field")
    sw = next(r for r in rows if r["model"] == "SWS (fine-tuned)")
    n = report["num_weights"]
    summ = {
        "weights": n, "gaussians": report["gaussians"], "ellipses": report["ellipses"],
        "outliers": report["outliers"], "ellipse_fraction": report["ellipses"] / n,
        "outlier_fraction": report["outliers"] / n, "tau_w": report.get("thresholds", {}).get("tau_w"),
        "params_mean_field": mf["params"], "params_sws": sw["params"], "params_ratio": mf["params"] / sw["params"],
        "bytes_mean_field": mf["bytes"], "bytes_sws": sw["bytes"], "bytes_ratio": mf["bytes"] / sw["bytes"],
        "file_mean_field": mf_file, "file_sws": sws_file, "file_ratio": mf_file / sws_file,
        "accuracy_mean_field": mf["accuracy"], "accuracy_sws": sw["accuracy"],
        "ece_mean_field": mf["ece"], "ece_sws": sw["ece"], "nll_mean_field": mf["nll"], "nll_sws": sw["nll"],
    }
    summ["goals"] = {
        "params_ratio": {"value": summ["params_ratio"], "target": f">= {GOALS['params_ratio']:g}",
                         "met": summ["params_ratio"] >= GOALS["params_ratio"]},
        "bytes_ratio": {"value": summ["bytes_ratio"], "target": f">= {GOALS['bytes_ratio']:g}",
                        "met": summ["bytes_ratio"] >= GOALS["bytes_ratio"]},
        "file_ratio": {"value": summ["file_ratio"], "target": f">= {GOALS['file_ratio']:g}",
                       "met": summ["file_ratio"] >= GOALS["file_ratio"]},
        "accuracy": {"value": sw["accuracy"] - mf["accuracy"], "target": f">= -{GOALS['accuracy_drop']:g}",
                     "met": sw["accuracy"] >= mf["accuracy"] - GOALS["accuracy_drop"]},
        "ece": {"value": sw["ece"] - mf["ece"], "target": "<= 0", "met": sw["ece"] <= mf["ece"]},
    }
    return summ


def format_comparison(result: Dict) -> str:
    """A markdown table: what the paper reports for ResNet-18 on CIFAR-10 next to what this run measured."""
    c, p = result["compression"], result.get("paper", PAPER_CIFAR10)
    pn = p["weights"]
    rows = [
        ("model", f"{p['model']} (paper)", "this run: " + ("digits CNN" if result["config"].get("model") is None
                                                           else str(result["config"]["model"]))),
        ("weights", f"~{pn / 1e6:.1f}M", f"{c['weights']:,}"),
        ("Gaussians", f"{p['gaussians']:,}", f"{c['gaussians']:,}"),
        ("ellipse weights", f"{p['ellipses']:,} ({p['ellipses'] / pn:.3%})",
         f"{c['ellipses']:,} ({c['ellipse_fraction']:.3%})"),
        ("outliers", f"{p['outliers']:,} ({p['outliers'] / pn:.2%})", f"{c['outliers']:,} ({c['outlier_fraction']:.2%})"),
        ("trainable params vs mean-field", f"~{p['params_ratio']:.0f}x fewer", f"{c['params_ratio']:.1f}x fewer"),
        ("bytes vs mean-field", f"~{p['bytes_ratio']:.0f}x smaller (\"75%\")", f"{c['bytes_ratio']:.1f}x smaller "
         f"(file {c['file_ratio']:.1f}x)"),
        ("SWS accuracy (mean-field)", f"{p['accuracy']:.3f}", f"{c['accuracy_sws']:.4f} ({c['accuracy_mean_field']:.4f})"),
        ("SWS NLL (mean-field)", f"{p['nll']:.3f}", f"{c['nll_sws']:.4f} ({c['nll_mean_field']:.4f})"),
        ("SWS ECE (mean-field)", f"{p['ece']:.3f}", f"{c['ece_sws']:.4f} ({c['ece_mean_field']:.4f})"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    line = lambda r: f"| {r[0].ljust(w0)} | {r[1].ljust(w1)} | {r[2].ljust(w2)} |"  # noqa: E731
    out = [line(rows[0]), f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|{'-' * (w2 + 2)}|", *(line(r) for r in rows[1:])]
    goals = ", ".join(f"{k} {v['value']:+.4f}" if k in ("accuracy", "ece") else f"{k} {v['value']:.1f}x"
                      for k, v in c["goals"].items())
    unmet = [k for k, v in c["goals"].items() if not v["met"]]
    out.append("")
    out.append(f"issue 13 goals (fine-tuned SWS vs mean-field): {goals}: "
               + ("all met" if not unmet else "NOT met: " + ", ".join(unmet)))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------------

def _build(cfg: DemoConfig, device: torch.device):
    """(train loader, test loader, deterministic-model factory, data description)."""
    if cfg.data is not None:
        fn = load_callable(cfg.data, "--data")
        try:
            loaders = _call_with_supported(fn, batch_size=cfg.batch_size, seed=cfg.seed)
        except DemoError:
            raise
        except Exception as e:  # a user's loader failing: say whose code failed
            raise DemoError(f"--data: {cfg.data} raised {type(e).__name__}: {e}") from e
        if not (isinstance(loaders, (tuple, list)) and len(loaders) == 2):
            raise DemoError(f"--data: {cfg.data} must return (train_loader, test_loader), got {type(loaders).__name__}")
        train, test = loaders
        data_desc = cfg.data
    else:
        train, test = digits_loaders(cfg.batch_size, cfg.seed)
        data_desc = "scikit-learn digits (8x8)"
    x0, _ = _first_batch(train, "--data")
    _first_batch(test, "--data")
    num_classes = 1 + max(int(y.max()) for _, y in train)
    input_shape = tuple(x0.shape[1:])

    if cfg.model is not None:
        fn = load_callable(cfg.model, "--model")

        def factory():
            try:
                m = _call_with_supported(fn, input_shape=input_shape, num_classes=num_classes)
            except Exception as e:
                raise DemoError(f"--model: {cfg.model} raised {type(e).__name__}: {e}") from e
            if not isinstance(m, nn.Module):
                raise DemoError(f"--model: {cfg.model} must return a torch.nn.Module, got {type(m).__name__}")
            return m
    else:
        def factory():
            return digits_cnn(input_shape, num_classes, cfg.width)
    return train, test, factory, data_desc, input_shape, num_classes


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> Dict:
    """Run the pipeline; returns {"rows", "table", "report", "config", "device", "files", "models"}."""
    from .convert import to_mean_field, to_sws

    cfg.validate()
    device = torch.device(cfg.device) if cfg.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The demo's tensors are tiny (batches of 64 8x8 images): intra-op threads only add synchronisation, and
    # on a shared machine they make it slower still (measured on 2 busy cores: 0.11 s/epoch with 1 thread,
    # 0.32-4.5 s with 2). Restored on exit.
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or 1)
    try:
        return _run(cfg, device, log)
    finally:
        torch.set_num_threads(old_threads)


def _run(cfg: DemoConfig, device: torch.device, log) -> Dict:
    from .convert import to_mean_field, to_sws

    if cfg.out:  # fail before minutes of training, not after
        try:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DemoError(f"--out: cannot create directory {cfg.out!r} ({e.strerror})") from e
    torch.manual_seed(cfg.seed)
    train, test, factory, data_desc, input_shape, num_classes = _build(cfg, device)
    num_data = sum(x.shape[0] for x, _ in train)
    noise = _noise_loader(test, cfg.seed)
    sws_epochs = cfg.sws_epochs if cfg.sws_epochs is not None else max(1, cfg.epochs // 3)
    log(f"data: {data_desc}, {num_data} training inputs of shape {input_shape}, {num_classes} classes; "
        f"device: {device}; evaluation with S = {cfg.samples} samples")

    rows, models = [], {}
    t_start = time.perf_counter()

    def evaluate(name, model, bayesian, train_times):
        probs, target, dt = _predict_probs(model, test, samples=cfg.samples, device=device, bayesian=bayesian)
        nprobs, _, _ = _predict_probs(model, noise, samples=cfg.samples, device=device, bayesian=bayesian)
        params, nbytes = model_size(model)
        row = {"model": name, **_metrics(probs, target, nprobs), "params": params, "bytes": nbytes,
               "train_s_per_epoch": sum(train_times) / max(len(train_times), 1), "infer_s_per_epoch": dt,
               "epochs": len(train_times)}
        rows.append(row)
        models[name] = (model, probs, target)
        return row

    # 1. deterministic
    torch.manual_seed(cfg.seed)
    det = factory().to(device)
    t = _train(det, train, epochs=cfg.epochs, lr=cfg.lr, device=device, bayesian=False, num_data=num_data, cfg=cfg,
               desc="deterministic")
    evaluate("deterministic", det, False, t)

    # 2. mean-field from scratch, same architecture and init stream
    torch.manual_seed(cfg.seed)
    mf, mf_report = to_mean_field(factory(), prior_mean=0.0, prior_variance=cfg.prior_sigma, moped=False)
    if not mf_report["converted"]:
        raise DemoError("--model: the model has no nn.Linear/nn.Conv1d/nn.Conv2d layer to make Bayesian")
    mf = mf.to(device)
    t = _train(mf, train, epochs=cfg.epochs, lr=cfg.lr, device=device, bayesian=True, num_data=num_data, cfg=cfg,
               desc="mean-field")
    evaluate("mean-field", mf, True, t)

    # 3. compress, 4. fine-tune
    sws_model = copy.deepcopy(mf)
    sws_model, report = to_sws(sws_model, num_components=cfg.components, seed=cfg.seed, progress=False)
    log(f"to_sws: {report['num_weights']:,} weights -> {report['gaussians']} Gaussians, {report['ellipses']} "
        f"ellipse and {report['outliers']} outlier weights; trainable parameters of the converted layers "
        f"{report['params_before']:,} -> {report['params_after']:,} ({report['params_ratio']:.1f}x), "
        f"bytes {report['bytes_before']:,} -> {report['bytes_after']:,} ({report['bytes_ratio']:.1f}x), "
        f"{report['seconds']:.2f} s")
    evaluate("SWS (converted)", sws_model, True, [])
    t = _train(sws_model, train, epochs=sws_epochs, lr=cfg.sws_lr, device=device, bayesian=True, num_data=num_data,
               cfg=cfg, desc="SWS fine-tune")
    evaluate("SWS (fine-tuned)", sws_model, True, t)

    table = format_table(rows)
    result = {"rows": rows, "table": table, "report": _jsonable(report), "device": _device_name(device),
              "config": dataclasses.asdict(cfg), "sws_epochs": sws_epochs, "files": [],
              "models": {"deterministic": det, "mean-field": mf, "sws": sws_model}}
    result["compression"] = compression_summary(rows, report, _file_bytes(mf), _file_bytes(sws_model))
    result["paper"] = PAPER_CIFAR10
    result["seconds_total"] = time.perf_counter() - t_start
    log("")
    log(table)
    log("")
    log(format_comparison(result))
    log(f"\n{len(test.dataset) if hasattr(test, 'dataset') else '?'} test inputs, {noise[0][0].shape[0]} noise "
        f"inputs; H = mean predictive entropy (nats, max ln {num_classes} = {math.log(num_classes):.3f}); "
        f"train s/ep over {cfg.epochs} (SWS: {sws_epochs}) epochs; infer s/ep = one pass over the test split "
        f"with S = {cfg.samples}; device: {result['device']}")

    if cfg.out:
        result["files"] = _save(cfg, result, mf, sws_model, models, log)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _save(cfg, result, mf, sws_model, models, log) -> List[str]:
    """Pictures, the table and numbers (results.md/.json), and the two Bayesian models (sws_kernels.save)."""
    from . import plots

    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"--out: cannot create directory {str(out)!r} ({e.strerror})") from e
    files = []
    p = plots.plot_codebook(sws_model, out / "codebook.png", mean_field=mf)
    files.append(str(p))
    p = plots.plot_reliability({k: (v[1], v[2]) for k, v in models.items() if k != "SWS (converted)"},
                               out / "reliability.png")
    files.append(str(p))
    (out / "results.md").write_text(result["table"] + "\n\n" + format_comparison(result) + "\n")
    files.append(str(out / "results.md"))
    js = {k: v for k, v in result.items() if k not in ("models", "files")}
    (out / "results.json").write_text(json.dumps(_jsonable(js), indent=1))
    files.append(str(out / "results.json"))
    # Compact, pickle-free model files (sws_kernels.save): `sws-kernels plot --model` redraws the pictures from
    # them, `sws-kernels convert` turns the mean-field one into an SWS file, sws.load(path, digits_cnn(...))
    # restores either into the architecture.
    from .io import save

    for name, m in (("mean_field.sws", mf), ("sws_model.sws", sws_model)):
        save(m, out / name)
        files.append(str(out / name))
    log("saved: " + ", ".join(files))
    return files


# --------------------------------------------------------------------------------------------------
# the README's demo section, regenerated from a run (python -m sws_kernels.demo --readme)
# --------------------------------------------------------------------------------------------------

README_BEGIN = "<!-- demo:begin (generated by `python -m sws_kernels.demo --readme` from docs/demo_results.json) -->"
README_END = "<!-- demo:end -->"


def readme_block(js: Dict) -> str:
    """The README's generated demo text (table, compression, paper comparison, pictures) from a run's
    results.json; tests/test_demo.py checks that README.md holds exactly this for docs/demo_results.json."""
    cfg, rep, c = js["config"], js["report"], js["compression"]
    lines = [
        f"Measured on {js['device']} (`python -m sws_kernels.demo --readme`: the defaults, seed {cfg['seed']}, "
        f"{js.get('seconds_total', 0):.0f} s in all, to_sws {rep['seconds']:.2f} s):",
        "",
        js["table"],
        "",
        "H = mean predictive entropy in nats: the Bayesian models are far less sure on noise than on digits. "
        "`params` counts trainable parameters; `bytes` is everything the model stores in memory (SWS: the "
        f"{rep['gaussians']}-Gaussian codebook, {rep['label_dtype']} labels, {rep['ellipses']:,} ellipse and "
        f"{rep['outliers']:,} outlier weights (|mu| >= {c['tau_w']:.3g}, the 99th percentile), biases). The "
        f"fine-tuned SWS model has {c['params_ratio']:.1f}x fewer trainable parameters than the mean-field BNN, "
        f"{c['bytes_ratio']:.1f}x fewer bytes in memory and a {c['file_ratio']:.1f}x smaller file "
        f"(`sws_kernels.save`: {c['file_mean_field']:,} -> {c['file_sws']:,} bytes). Times are per epoch "
        f"(`infer`: one pass over the test split with {cfg['samples']} samples); on a shared machine read "
        "them as rough.",
        "",
        "What the paper reports for ResNet-18 on CIFAR-10, next to this run (a 38k-weight CNN on 8x8 digits "
        "is not CIFAR-10: compare the compression and whether SWS keeps the mean-field model's accuracy and "
        "calibration, not the accuracies themselves):",
        "",
        format_comparison(js),
        "",
        "The codebook in (mu, rho) space (each component's 95% ellipse; the mean-field weights coloured by what "
        "`to_sws` made of them) and the reliability diagrams:",
        "",
        "![codebook](docs/demo_codebook.png)",
        "![reliability](docs/demo_reliability.png)",
    ]
    return "\n".join(lines)


def update_readme(readme: str, js: Dict) -> str:
    """``readme`` with the text between README_BEGIN and README_END replaced by :func:`readme_block`."""
    i, j = readme.find(README_BEGIN), readme.find(README_END)
    if i < 0 or j < i:
        raise ValueError(f"README: expected the markers {README_BEGIN!r} ... {README_END!r}")
    return readme[:i + len(README_BEGIN)] + "\n" + readme_block(js) + "\n" + readme[j:]


def readme_section(readme: str) -> str:
    """The generated text currently between the README's demo markers."""
    i, j = readme.find(README_BEGIN), readme.find(README_END)
    if i < 0 or j < i:
        raise ValueError(f"README: expected the markers {README_BEGIN!r} ... {README_END!r}")
    return readme[i + len(README_BEGIN):j].strip("\n")


def write_readme(out: str, root: str = ".") -> None:
    """Copy a finished run's pictures and results.json from ``out`` into ``root``/docs and regenerate the
    README's demo section from them."""
    import shutil

    out_p, root_p = Path(out), Path(root)
    js = json.loads((out_p / "results.json").read_text())
    (root_p / "docs").mkdir(exist_ok=True)
    for name in ("codebook", "reliability"):
        shutil.copyfile(out_p / f"{name}.png", root_p / "docs" / f"demo_{name}.png")
    (root_p / "docs" / "demo_results.json").write_text(json.dumps(js, indent=1) + "\n")
    readme = root_p / "README.md"
    readme.write_text(update_readme(readme.read_text(), js))


def _module_main(argv=None) -> int:
    """``python -m sws_kernels.demo [--readme] [--out DIR] [--fast]``: run the demo with its defaults;
    ``--readme`` then copies the pictures and results into docs/ and regenerates README.md's demo section."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sws_kernels.demo", description=_module_main.__doc__)
    ap.add_argument("--readme", action="store_true", help="update docs/demo_*.png, docs/demo_results.json, README.md")
    ap.add_argument("--out", default="sws_demo", help="where the run's files go (default ./sws_demo)")
    ap.add_argument("--root", default=".", help="the repository root holding README.md and docs/ (default .)")
    ap.add_argument("--fast", action="store_true", help="the seconds-long configuration (not for the README)")
    a = ap.parse_args(argv)
    if a.readme and a.fast:
        print("error: --readme records the defaults; drop --fast", file=sys.stderr)
        return 2
    if a.readme and not (Path(a.root) / "README.md").is_file():
        print(f"error: --root: no README.md in {a.root!r}", file=sys.stderr)
        return 2
    cfg = DemoConfig.fast_config(out=a.out) if a.fast else DemoConfig(out=a.out)
    try:
        run_demo(cfg)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.readme:
        write_readme(a.out, a.root)
        print(f"updated {Path(a.root) / 'README.md'} and docs/demo_*.png, docs/demo_results.json")
    return 0


def main(args) -> int:
    """``sws-kernels demo`` (argparse namespace from :mod:`sws_kernels.cli`)."""
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None and k != "fast"}
    given["progress"] = not args.no_progress
    if args.no_out:
        given["out"] = None
    cfg = DemoConfig.fast_config(**given) if args.fast else DemoConfig(**given)
    try:
        run_demo(cfg)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_module_main())
