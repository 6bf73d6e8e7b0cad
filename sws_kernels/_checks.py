"""Argument validation shared by every entry point.

Every error names the argument, what was expected and what was given (ARCHITECTURE.md, "Errors").

Two kinds of checks (ARCHITECTURE.md, "The hot path"):

- Structural checks (type, dtype, shape, device, Python scalars) read only metadata: no host sync. They run
  on every call.
- Data checks read tensor values, so each costs a host sync (a device sync on CUDA). They run when data
  enters, not on every call:

  * index data (labels, ellipse positions / components / alpha, outlier positions) is checked once per
    tensor version: :func:`sws` remembers the tensors it has checked (by identity, through weak references,
    so a recycled ``id`` cannot alias) with their ``Tensor._version``; a later call with the same
    unmodified tensors skips the checks, an in-place edit bumps ``_version`` and the next call checks again.
    Modules check their buffers at construction, assignment and ``load_state_dict``, which also records
    them here, so their steady-state forward runs no data check at all.
  * finiteness of trainable parameters (codebook means/chol, outlier and mean-field mu/rho) is checked at
    entry only (``full=True``: module construction, ``load_state_dict``, :func:`sws_kernels.load`,
    ``to_sws``), never per step: they change every optimiser step, and a NaN gives NaN, never a crash
    (PyTorch does not check either).

``SWS_VALIDATE=1`` in the environment (read at import) or ``with sws_kernels.validate():`` runs every check
on every call, for debugging. Under torch.compile no data check runs (it would break the graph). Kernels stay
memory-safe whatever the data (they clamp indices or check them in C++).
"""
from __future__ import annotations

import contextlib
import numbers
import os
import weakref
from typing import Dict, NamedTuple, Optional, Tuple

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


# ---------------------------------------------------------------------------------------------------------
# When data checks run
# ---------------------------------------------------------------------------------------------------------

_ENV = os.environ.get("SWS_VALIDATE", "").strip().lower() not in ("", "0", "false", "no", "off")
# Depth of nested validate() blocks. A plain module global rather than a ContextVar (like nn._FOLD):
# torch.compile reads a global without a graph break. Process-wide, not per thread.
_DEPTH = 0


def always() -> bool:
    """True when every check runs on every call (``SWS_VALIDATE=1`` or inside :func:`validate`)."""
    return _ENV or _DEPTH > 0


@contextlib.contextmanager
def validate():
    """Run every check on every call inside the block, as ``SWS_VALIDATE=1`` does for a whole process.

    Normally data checks run once per tensor version and parameter finiteness only when data enters a module;
    use this to find where a bad value comes from (a process-wide switch, not per thread).
    """
    global _DEPTH
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1


# (check name, K, n, id of every checked tensor) -> ((weakref, _version) of each tensor) after a passing check.
_SEEN: Dict[tuple, Tuple[Tuple[weakref.ref, int], ...]] = {}


def _versions(ts) -> Optional[Tuple[int, ...]]:
    try:
        return tuple(t._version for t in ts)
    except RuntimeError:  # inference tensors have no version counter: nothing to remember, check every call
        return None


def _seen(key: tuple, ts) -> bool:
    """True when the check ``key`` passed for exactly these tensors, none modified in place since."""
    hit = _SEEN.get(key)
    if hit is None:
        return False
    for (ref, version), t in zip(hit, ts):
        if ref() is not t or t._version != version:  # `is`: a dead tensor's id reused by a new one is a miss
            return False
    return True


def _remember(key: tuple, ts) -> None:
    versions = _versions(ts)
    if versions is None:
        return

    def forget(_ref, key=key):  # a checked tensor died: drop its entry (memory; _seen is exact without this)
        _SEEN.pop(key, None)

    _SEEN[key] = tuple((weakref.ref(t, forget), v) for t, v in zip(ts, versions))


def _tracing() -> bool:
    """Under torch.compile the data-dependent checks (which read tensor values) are skipped: they would
    break the graph. Eager calls, which is where inputs are first built, run them (once per tensor version)."""
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


def is_int(v) -> bool:
    """A Python or NumPy integer (numbers.Integral), not a bool and not a tensor (a tensor would be read on the
    host: seeds take tensors through their own path)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, torch.Tensor)) and type(v).__name__ != "bool_"


def word(value, name: str) -> int:
    if not is_int(value):
        raise TypeError(f"{name}: expected a Python int in [0, 2**32), got {describe(value)}")
    value = int(value)
    if not 0 <= value < (1 << 32):
        raise ValueError(f"{name}: expected a value in [0, 2**32), got {value}")
    return value


def samples(s) -> int:
    if not is_int(s):
        raise TypeError(f"samples: expected a Python int >= 1, got {describe(s)}")
    s = int(s)
    if not 1 <= s < MAX_SAMPLES:
        raise ValueError(f"samples: expected 1 <= samples < 2**32, got {s}")
    return s


_MEMORY: Dict[tuple, int] = {}
_FIT_FLOOR = 1 << 30  # below 1 GiB of sampled weights the check costs one multiplication


def _device_memory(device: torch.device) -> int:
    key = (device.type, device.index)
    hit = _MEMORY.get(key)
    if hit is None:
        if device.type == "cuda":
            hit = torch.cuda.get_device_properties(device).total_memory
        else:
            try:
                hit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError, AttributeError):  # pragma: no cover - no sysconf: no limit known
                hit = 1 << 62
        _MEMORY[key] = hit
    return hit


def samples_fit(S: int, n: int, device, what: str = "weights") -> None:
    """ValueError when S samples of n float32 weights cannot fit in the device's memory (the sampled weights, or
    what a kernel keeps per sample, would fail to allocate): a clear error instead of the allocator's."""
    need = 4 * S * n
    if need <= _FIT_FLOOR:
        return
    have = _device_memory(torch.device(device))
    if need > have:
        raise ValueError(f"samples: {S} samples of {n} {what} need {need / 2**30:.1f} GiB of float32, more than the "
                         f"{have / 2**30:.1f} GiB of {device}; draw fewer samples per call (several calls with "
                         f"different seeds give more)")


def conv_x(x, S: int, per_sample: bool, spatial: int, device) -> None:
    """The input checks every conv path shares: a float tensor on ``device`` with [N, C, *spatial] dimensions, or
    [S, N, C, *spatial] with per_sample."""
    activations(x, "x", device)
    want = spatial + 2 + (1 if per_sample else 0)
    if x.dim() != want:
        what = "[samples, N, C, *spatial]" if per_sample else "[N, C, *spatial]"
        raise ValueError(f"x: expected {want} dimensions {what}, got {describe(x)}")
    if per_sample and x.shape[0] != S:
        raise ValueError(f"x: expected a leading sample dimension of size {S} with per_sample=True, "
                         f"got {describe(x)}")


def conv_input(x, w_shape, groups: int, padding, dilation, spatial: int) -> None:
    """PyTorch's conv input checks as our errors: x's channel count against the kernel [out, in/groups, *k], and
    each padded spatial size against the dilated kernel. x is [N, C, *spatial] (any leading dims before N)."""
    C = x.shape[-(spatial + 1)]
    want = w_shape[1] * groups
    if C != want:
        raise ValueError(f"x: expected {want} input channels (in_channels = {w_shape[1]} per group x groups = "
                         f"{groups}) at dim {x.dim() - spatial - 1}, got {describe(x)}")
    if isinstance(padding, str):
        if padding == "same":
            return
        pads = (0,) * spatial
    else:
        pads = (padding,) * spatial if isinstance(padding, int) else tuple(padding)
    dil = (dilation,) * spatial if isinstance(dilation, int) else tuple(dilation)
    size = tuple(x.shape[-spatial:])
    ksize = tuple(w_shape[2:])
    for d in range(spatial):
        if size[d] + 2 * pads[d] < dil[d] * (ksize[d] - 1) + 1:
            raise ValueError(f"x: spatial size {size} (padding {pads}) is smaller than the kernel {ksize} "
                             f"(dilation {dil}), got {describe(x)}")


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


def codebook(means, chol, *, full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Structural checks of a codebook; finiteness too with ``full`` (data entering a module) or :func:`always`."""
    tensor(means, "means", ndim=2, floating=True, last=2)
    tensor(chol, "chol", ndim=2, floating=True, last=3, device=means.device)
    if means.shape[0] < 1:
        raise ValueError(f"means: expected at least one component (K >= 1), got {describe(means)}")
    if chol.shape[0] != means.shape[0]:
        raise ValueError(f"chol: expected {means.shape[0]} rows (one per component of means), got {describe(chol)}")
    if chol.dtype != means.dtype:
        raise TypeError(f"chol: expected dtype {means.dtype} (the dtype of means), got {describe(chol)}")
    if full or always():
        finite(means, "means")
        finite(chol, "chol")
    return means, chol


def _alpha_range(e_alpha: torch.Tensor, name: str = "ellipse alpha") -> None:
    finite(e_alpha, name)
    if e_alpha.numel() and not _tracing():
        lo, hi = float(e_alpha.min()), float(e_alpha.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name}: expected values in [0, 1], got [{lo}, {hi}]")


def _sws_data(K: int, n: int, labels, ellipse, o_pos) -> None:
    """The data checks of :func:`sws` (each a host sync); the structure is already checked."""
    in_range(labels, 0, K, "labels", f"component indices (K = {K})")
    e_pos = None
    if ellipse is not None:
        e_pos, e_a, e_b, e_alpha = ellipse
        in_range(e_a, 0, K, "ellipse comp_a", f"component indices (K = {K})")
        in_range(e_b, 0, K, "ellipse comp_b", f"component indices (K = {K})")
        _alpha_range(e_alpha)
        in_range(e_pos, 0, n, "ellipse positions", f"flat weight indices (n = {n})")
    if o_pos is not None:
        in_range(o_pos, 0, n, "outlier positions", f"flat weight indices (n = {n})")
    parts = [t.reshape(-1).to(torch.int64) for t in (e_pos, o_pos) if t is not None]
    special = torch.cat(parts) if parts else None
    if special is not None and special.numel() > 1:
        repeats = special.numel() - torch.unique(special).numel()
        if repeats:
            raise ValueError("ellipse/outlier positions: expected each weight position at most once across ellipse "
                             f"and outlier positions, got {repeats} repeat(s)")


# What each SWS layer buffer (or outlier parameter) holds, for the checks when one is assigned on its own.
SWS_BUFFERS = {
    "labels": "labels", "ellipse_pos": "position", "outlier_pos": "position", "ellipse_a": "component",
    "ellipse_b": "component", "ellipse_alpha": "alpha", "outlier_mu": "finite", "outlier_rho": "finite",
    "outlier_mu0": "finite", "outlier_sigma0": "positive",
}


def sws_buffer(name: str, value, *, K: int, weight_shape, device) -> None:
    """Entry checks of one SWS layer buffer or outlier parameter assigned on its own (``layer.labels = t``).

    Everything one tensor can show (type, shape, device, value range, finiteness) is checked here; the checks
    that relate several (equal lengths, positions unique across ellipses and outliers) run at the layer's
    next call, once (the new tensor is not yet in the once-per-version record).
    """
    kind = SWS_BUFFERS[name]
    n = 1
    for d in weight_shape:
        n *= int(d)
    if kind == "labels":
        tensor(value, name, integer=True, device=device)
        if tuple(value.shape) != tuple(weight_shape):
            raise ValueError(f"{name}: expected the weight shape {tuple(weight_shape)}, got {describe(value)}")
        in_range(value, 0, K, name, f"component indices (the codebook has num_components={K})")
    elif kind in ("position", "component"):
        tensor(value, name, ndim=1, integer=True, device=device)
        if kind == "position":
            in_range(value, 0, n, name, f"flat weight indices (n = {n})")
        else:
            in_range(value, 0, K, name, f"component indices (K = {K})")
    elif kind == "alpha":
        tensor(value, name, ndim=1, floating=True, device=device)
        _alpha_range(value, name)
    else:
        tensor(value, name, ndim=1, floating=True, device=device)
        finite(value, name)
        if kind == "positive" and value.numel() and not _tracing() and float(value.min()) <= 0:
            raise ValueError(f"{name}: expected positive values (prior standard deviations), "
                             f"got min {float(value.min())}")


def sws(means, chol, labels, ellipse, outliers, seed, samples_, mode_, owner, codebook_owner, *,
        full: bool = False) -> SWSArgs:
    """Validated reconstruct arguments.

    Structural checks run on every call. The data checks (label and position ranges, alpha in [0, 1], unique
    positions) run once per version of the index tensors (see the module docstring), or always with ``full``
    or :func:`always`; finiteness of means/chol/outlier mu/rho only with ``full`` or :func:`always`.
    """
    check_all = full or always()
    means, chol = codebook(means, chol, full=full)
    dev, dt, K = means.device, means.dtype, means.shape[0]
    tensor(labels, "labels", integer=True, device=dev)
    n = labels.numel()
    if n >= philox.MAX_ELEMENT:
        raise ValueError(f"labels: expected fewer than 2**34 weights (the RNG stream limit), got {n}")
    i64 = dict(dtype=torch.int64, device=dev)
    data = [labels]  # the index tensors whose values the data checks read
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
        tensor(e_alpha, "ellipse alpha", ndim=1, floating=True, device=dev)
        if e_alpha.shape[0] != E:
            raise ValueError(f"ellipse alpha: expected {E} entries, got {describe(e_alpha)}")
        data += [e_pos, e_a, e_b, e_alpha]
    if outliers is None:
        o_pos = None
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
            if check_all:
                finite(t, nm)
        data.append(o_pos)
    if not _tracing():
        key = ("sws", K, n, *map(id, data))
        if check_all or not _seen(key, data):
            _sws_data(K, n, labels, ellipse, o_pos)
            _remember(key, data)
    if ellipse is not None:
        e_pos, e_a, e_b = e_pos.to(torch.int64), e_a.to(torch.int64), e_b.to(torch.int64)
        e_alpha = e_alpha.to(dt)
    if o_pos is None:
        o_pos = torch.zeros(0, **i64)
    else:
        o_pos = o_pos.to(torch.int64)
    S = samples(samples_)
    samples_fit(S, n, dev)
    return SWSArgs(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho,
                   philox.check_seed(seed), S, mode(mode_), word(owner, "owner"),
                   word(codebook_owner, "codebook_owner"))


def mean_field(mu, rho, seed, samples_, owner, mu_name="mu", rho_name="rho", *, full: bool = False):
    """Validated mean-field arguments; finiteness of mu/rho only with ``full`` (entry) or :func:`always`."""
    tensor(mu, mu_name, floating=True)
    tensor(rho, rho_name, floating=True, device=mu.device)
    if rho.shape != mu.shape:
        raise ValueError(f"{rho_name}: expected shape {tuple(mu.shape)} (the shape of {mu_name}), got {describe(rho)}")
    if rho.dtype != mu.dtype:
        raise TypeError(f"{rho_name}: expected dtype {mu.dtype} (the dtype of {mu_name}), got {describe(rho)}")
    if mu.numel() >= philox.MAX_ELEMENT:
        raise ValueError(f"{mu_name}: expected fewer than 2**34 weights (the RNG stream limit), got {mu.numel()}")
    if full or always():
        finite(mu, mu_name)
        finite(rho, rho_name)
    S = samples(samples_)
    samples_fit(S, mu.numel(), mu.device)
    return philox.check_seed(seed), S, word(owner, "owner")


def activations(x, name: str, device, min_dim: int = 1) -> torch.Tensor:
    tensor(x, name, floating=True, device=device)
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got {describe(x)}")
    return x
