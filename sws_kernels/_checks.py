"""Argument validation shared by every entry point.

Every error names the argument, what was expected and what was given (ARCHITECTURE.md, "Errors"). The
checks run once per call at the functional/op boundary so kernels can trust their inputs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import philox

MODES = ("paper", "hierarchical", "mean")
MODE_CODES = {m: i for i, m in enumerate(MODES)}
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
MAX_SAMPLES = 1 << 32


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def tensor(x, name: str, *, ndim: Optional[int] = None, floating: bool = False, integer: bool = False,
           device=None, last: Optional[int] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {describe(x)}")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {describe(x)}")
    if integer and x.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor of dtype {', '.join(str(d) for d in LABEL_DTYPES)}, "
                        f"got {describe(x)}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimension(s), got {describe(x)}")
    if last is not None and (x.dim() == 0 or x.shape[-1] != last):
        raise ValueError(f"{name}: expected a last dimension of size {last}, got {describe(x)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the parameters), got {describe(x)}")
    return x


def _tracing() -> bool:
    """Under torch.compile the data-dependent checks (which read tensor values) are skipped: they would
    break the graph. Eager calls, which is where inputs are first built, always run them."""
    return torch.compiler.is_compiling()


def finite(x: torch.Tensor, name: str) -> None:
    if _tracing():
        return
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} non-finite value(s) in {describe(x)}")


def in_range(x: torch.Tensor, lo: int, hi: int, name: str, what: str) -> None:
    """Values of integer tensor x in [lo, hi)."""
    if x.numel() == 0 or _tracing():
        return
    mn, mx = int(x.min()), int(x.max())
    if mn < lo or mx >= hi:
        raise ValueError(f"{name}: expected {what} in [{lo}, {hi}), got values in [{mn}, {mx}]")


def word(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a Python int in [0, 2**32), got {describe(value)}")
    if not 0 <= value < (1 << 32):
        raise ValueError(f"{name}: expected a value in [0, 2**32), got {value}")
    return value


def samples(s) -> int:
    if isinstance(s, bool) or not isinstance(s, int):
        raise TypeError(f"samples: expected a Python int >= 1, got {describe(s)}")
    if not 1 <= s < MAX_SAMPLES:
        raise ValueError(f"samples: expected 1 <= samples < 2**32, got {s}")
    return s


def mode(m) -> str:
    if m not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {m!r}")
    return m


class SWSArgs(NamedTuple):
    """Validated reconstruct inputs with ellipse/outlier parts as (possibly empty) tensors."""
    means: torch.Tensor
    chol: torch.Tensor
    labels: torch.Tensor
    e_pos: torch.Tensor
    e_a: torch.Tensor
    e_b: torch.Tensor
    e_alpha: torch.Tensor
    o_pos: torch.Tensor
    o_mu: torch.Tensor
    o_rho: torch.Tensor
    seed: int
    samples: int
    mode: str
    owner: int
    codebook_owner: int


def codebook(means, chol) -> tuple[torch.Tensor, torch.Tensor]:
    tensor(means, "means", ndim=2, floating=True, last=2)
    tensor(chol, "chol", ndim=2, floating=True, last=3, device=means.device)
    if means.shape[0] < 1:
        raise ValueError(f"means: expected at least one component (K >= 1), got {describe(means)}")
    if chol.shape[0] != means.shape[0]:
        raise ValueError(f"chol: expected {means.shape[0]} rows (one per component of means), got {describe(chol)}")
    if chol.dtype != means.dtype:
        raise TypeError(f"chol: expected dtype {means.dtype} (the dtype of means), got {describe(chol)}")
    finite(means, "means")
    finite(chol, "chol")
    return means, chol


def sws(means, chol, labels, ellipse, outliers, seed, samples_, mode_, owner, codebook_owner) -> SWSArgs:
    means, chol = codebook(means, chol)
    dev, dt, K = means.device, means.dtype, means.shape[0]
    tensor(labels, "labels", integer=True, device=dev)
    in_range(labels, 0, K, "labels", f"component indices (K = {K})")
    n = labels.numel()
    if n >= philox.MAX_ELEMENT:
        raise ValueError(f"labels: expected fewer than 2**34 weights (the RNG stream limit), got {n}")
    i64 = dict(dtype=torch.int64, device=dev)
    if ellipse is None:
        e_pos = e_a = e_b = torch.zeros(0, **i64)
        e_alpha = torch.zeros(0, dtype=dt, device=dev)
    else:
        if not isinstance(ellipse, (tuple, list)) or len(ellipse) != 4:
            raise TypeError(f"ellipse: expected None or a tuple (positions, comp_a, comp_b, alpha), got {describe(ellipse)}")
        e_pos, e_a, e_b, e_alpha = ellipse
        tensor(e_pos, "ellipse positions", ndim=1, integer=True, device=dev)
        E = e_pos.shape[0]
        for nm, t in (("ellipse comp_a", e_a), ("ellipse comp_b", e_b)):
            tensor(t, nm, ndim=1, integer=True, device=dev)
            if t.shape[0] != E:
                raise ValueError(f"{nm}: expected {E} entries (one per ellipse position), got {describe(t)}")
            in_range(t, 0, K, nm, f"component indices (K = {K})")
        tensor(e_alpha, "ellipse alpha", ndim=1, floating=True, device=dev)
        if e_alpha.shape[0] != E:
            raise ValueError(f"ellipse alpha: expected {E} entries, got {describe(e_alpha)}")
        finite(e_alpha, "ellipse alpha")
        if E and not _tracing() and (float(e_alpha.min()) < 0 or float(e_alpha.max()) > 1):
            raise ValueError(f"ellipse alpha: expected values in [0, 1], got [{float(e_alpha.min())}, {float(e_alpha.max())}]")
        in_range(e_pos, 0, n, "ellipse positions", f"flat weight indices (n = {n})")
        e_pos, e_a, e_b = e_pos.to(torch.int64), e_a.to(torch.int64), e_b.to(torch.int64)
        e_alpha = e_alpha.to(dt)
    if outliers is None:
        o_pos = torch.zeros(0, **i64)
        o_mu = o_rho = torch.zeros(0, dtype=dt, device=dev)
    else:
        if not isinstance(outliers, (tuple, list)) or len(outliers) != 3:
            raise TypeError(f"outliers: expected None or a tuple (positions, mu, rho), got {describe(outliers)}")
        o_pos, o_mu, o_rho = outliers
        tensor(o_pos, "outlier positions", ndim=1, integer=True, device=dev)
        O = o_pos.shape[0]
        for nm, t in (("outlier mu", o_mu), ("outlier rho", o_rho)):
            tensor(t, nm, ndim=1, floating=True, device=dev)
            if t.shape[0] != O:
                raise ValueError(f"{nm}: expected {O} entries (one per outlier position), got {describe(t)}")
            if t.dtype != dt:
                raise TypeError(f"{nm}: expected dtype {dt} (the dtype of means), got {describe(t)}")
            finite(t, nm)
        in_range(o_pos, 0, n, "outlier positions", f"flat weight indices (n = {n})")
        o_pos = o_pos.to(torch.int64)
    special = torch.cat([e_pos, o_pos])
    if special.numel() and not _tracing() and torch.unique(special).numel() != special.numel():
        raise ValueError("ellipse/outlier positions: expected each weight position at most once across ellipse "
                         f"and outlier positions, got {special.numel() - torch.unique(special).numel()} repeat(s)")
    return SWSArgs(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho,
                   philox.check_seed(seed), samples(samples_), mode(mode_), word(owner, "owner"),
                   word(codebook_owner, "codebook_owner"))


def mean_field(mu, rho, seed, samples_, owner, mu_name="mu", rho_name="rho"):
    tensor(mu, mu_name, floating=True)
    tensor(rho, rho_name, floating=True, device=mu.device)
    if rho.shape != mu.shape:
        raise ValueError(f"{rho_name}: expected shape {tuple(mu.shape)} (the shape of {mu_name}), got {describe(rho)}")
    if rho.dtype != mu.dtype:
        raise TypeError(f"{rho_name}: expected dtype {mu.dtype} (the dtype of {mu_name}), got {describe(rho)}")
    if mu.numel() >= philox.MAX_ELEMENT:
        raise ValueError(f"{mu_name}: expected fewer than 2**34 weights (the RNG stream limit), got {mu.numel()}")
    finite(mu, mu_name)
    finite(rho, rho_name)
    return philox.check_seed(seed), samples(samples_), word(owner, "owner")


def activations(x, name: str, device, min_dim: int = 1) -> torch.Tensor:
    tensor(x, name, floating=True, device=device)
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got {describe(x)}")
    return x
