"""Backend discovery and selection.

Four backends: ``reference`` (pure PyTorch, always there), ``triton`` (GPU, or CPU tensors under
``TRITON_INTERPRET=1``), ``native_cpu`` and ``native_cuda`` (the compiled module ``sws_kernels._C``).
Users force one with ``sws_kernels.backend("reference" | "triton" | "native" | "auto")``; "native" means
native_cpu or native_cuda by the tensors' device. ``auto`` picks, per op, device and dtype, the first
available backend that has a kernel, else the reference; the reason for every skip is one call away.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from . import native  # importing it touches no CUDA runtime (its CUDA status is computed lazily)

log = logging.getLogger("sws_kernels")

BACKEND_NAMES = ("reference", "triton", "native_cpu", "native_cuda")
CHOICES = ("auto", "reference", "triton", "native", "native_cpu", "native_cuda")  # native_*: backends()' names

_current = contextvars.ContextVar("sws_kernels_backend", default="auto")

# (op, backend) -> (kernel, supported dtypes). backend is one of BACKEND_NAMES minus "reference".
_KERNELS: Dict[Tuple[str, str], Tuple[Callable, Tuple[torch.dtype, ...]]] = {}


def register_kernel(op: str, backend: str, dtypes=(torch.float32,)):
    if backend not in BACKEND_NAMES[1:]:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES[1:]}, got {backend!r}")

    def deco(fn):
        _KERNELS[(op, backend)] = (fn, tuple(dtypes))
        _SELECT_CACHE.clear()
        return fn

    return deco


def _triton_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "interpreter (TRITON_INTERPRET=1): CPU tensors"
    if torch.cuda.is_available():
        return True, ""
    return False, "no GPU and TRITON_INTERPRET unset"


_BACKENDS_CACHE: Dict[object, Dict[str, Tuple[bool, str]]] = {}  # keyed by interpret()


def backends() -> Dict[str, Tuple[bool, str]]:
    """{name: (available, reason)} for every backend; the reason says why one is unavailable.

    Cached (every op call asks): what is installed and which GPUs exist does not change within a process.
    The key is TRITON_INTERPRET, the one setting a process may flip (tests do)."""
    key = interpret()
    out = _BACKENDS_CACHE.get(key)
    if out is None:
        out = _BACKENDS_CACHE[key] = {
            "reference": (True, ""),
            "triton": _triton_status(),
            "native_cpu": (native.AVAILABLE_CPU, native.CPU_REASON),
            "native_cuda": (native.AVAILABLE_CUDA, native.CUDA_REASON),
        }
    return out  # shared: callers read it, never mutate it


@contextlib.contextmanager
def backend(name: str):
    """Force one backend inside the ``with`` block: "auto" (default), "reference", "triton" or "native"."""
    if name not in CHOICES:
        raise ValueError(f"backend: expected one of {CHOICES}, got {name!r}")
    token = _current.set(name)
    try:
        yield name
    finally:
        _current.reset(token)


def current() -> str:
    return _current.get()


# os.environ.get costs ~0.6 us (it encodes the key each time); the environment's own mapping of encoded keys is
# read directly where CPython has one (os._Environ._data), with the plain lookup as the fallback.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _INTERPRET_KEY = os.environ.encodekey("TRITON_INTERPRET")  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - another Python: the plain lookup
    _ENV_DATA = None


def interpret():
    """The TRITON_INTERPRET setting (raw), part of every dispatch cache key (tests flip it within a process)."""
    if _ENV_DATA is not None:
        return _ENV_DATA.get(_INTERPRET_KEY)
    return os.environ.get("TRITON_INTERPRET")


def _native_name(device: torch.device) -> str:
    return "native_cuda" if device.type == "cuda" else "native_cpu"


_SELECT_CACHE: Dict[tuple, Tuple[str, Callable | None, str]] = {}


def select(op: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, Callable | None, str]:
    """(backend name, kernel or None for the reference, why) for one call of ``op``.

    Memoised per (op, device, dtype, forced choice, TRITON_INTERPRET): the answer depends on nothing else, and
    every op call asks (several times per layer call)."""
    key = (op, device, dtype, _current.get(), interpret())
    hit = _SELECT_CACHE.get(key)
    if hit is None:
        hit = _SELECT_CACHE[key] = _select(op, device, dtype)
    return hit


def _select(op: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, Callable | None, str]:
    choice = _current.get()
    if choice == "reference":
        return "reference", None, "forced"
    avail = backends()
    if choice != "auto":
        name = _native_name(device) if choice == "native" else choice
        if name.startswith("native_") and name != _native_name(device):
            raise RuntimeError(f"backend {name!r} was forced for {op} on a {device.type} tensor: use 'native'")
        ok, reason = avail[name]
        if not ok:
            raise RuntimeError(f"backend {name!r} was forced for {op} but is unavailable: {reason}")
        if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"backend 'triton' was forced for {op} on {device}: set TRITON_INTERPRET=1 for CPU")
        entry = _KERNELS.get((op, name))
        if entry is None:
            raise NotImplementedError(f"{op}: backend {name!r} has no kernel for this op; available: "
                                      f"{sorted(b for (o, b) in _KERNELS if o == op) + ['reference']}")
        if dtype not in entry[1]:
            raise TypeError(f"{op}: backend {name!r} supports parameter dtypes {entry[1]}, got {dtype}")
        return name, entry[0], "forced"
    # auto: GPU prefers Triton then CUDA; the CPU prefers native C++ (the Triton interpreter is a test vehicle).
    order = ("triton", "native_cuda") if device.type == "cuda" else ("native_cpu",)
    skipped = []
    for name in order:
        ok, reason = avail[name]
        entry = _KERNELS.get((op, name))
        if not ok:
            skipped.append(f"{name}: {reason}")
        elif entry is None:
            skipped.append(f"{name}: no kernel for {op}")
        elif dtype not in entry[1]:
            skipped.append(f"{name}: dtype {dtype} not supported")
        else:
            return name, entry[0], "auto"
    return "reference", None, "; ".join(skipped) or "no other backend for this device"


# ------------------------------------------------------------------------------------------------------
# The dispatch table: every size threshold a call's path depends on, in one place, each with its reason.
# ------------------------------------------------------------------------------------------------------

class Limit(NamedTuple):
    value: int
    why: str


LIMITS: Dict[str, Limit] = {
    "triton_fused_max_m": Limit(
        int(os.environ.get("SWS_FUSED_MAX_M", "64")),
        "Triton linear: the fused lookup-in-GEMM up to this many rows per sample (memory-bound there: it reads "
        "1-2 label bytes per weight instead of writing W and reading it back); above, one reconstruction + the "
        "vendor GEMM (compute-bound). A default until benchmarks/gpu_bench.py measures the crossover on a card "
        "(env SWS_FUSED_MAX_M)"),
    "cuda_fused_max_m": Limit(
        native.LINEAR_MAX_M,
        "native CUDA fused linear: csrc/common.h kLinearMaxM, the rows per sample its accumulators hold"),
    "cpu_fused_max_m": Limit(
        native.LINEAR_CPU_MAX_M,
        "native CPU fused linear: csrc/common.h kLinearCpuMaxM (fp32 activations, paper/mean mode: a normal "
        "per weight in hierarchical mode makes reconstruct + GEMM cheaper)"),
    "cpu_rows_backward_max": Limit(
        1 << 18,
        "native CPU linear layers with one input row per sample: the parameter gradients in one call "
        "(csrc/cpu/layer.cpp; the weight gradient is an outer product, bit-identical to the GEMM's) up to this "
        "many weights x samples, where the three ops' Python and dispatch cost (~15 us a step) dominates; above, "
        "torch's multi-threaded outer product is as fast (1024x1024, S = 1, 2 threads: 0.356 vs 0.341 ms)"),
}

# (backend, op) pairs that have a fused path; every other pair reconstructs W then calls the vendor GEMM.
_FUSED = {("triton", "sws_linear"), ("triton", "sws_linear_dx"), ("triton", "mean_field_linear"),
          ("triton", "mean_field_linear_dx"), ("native_cuda", "sws_linear"), ("native_cpu", "sws_linear")}
_CUDA_ACT = (torch.float32, torch.float16, torch.bfloat16)


class Plan(NamedTuple):
    """One call's dispatch decision: backend, kernel (None: the reference), fused path or not, and why."""
    backend: str
    kernel: Optional[Callable]
    fused: bool
    why: str


def _fused(backend: str, op: str, rows: int, act_dtype, mode: int) -> Tuple[bool, str]:
    if (backend, op) not in _FUSED:
        return False, f"{backend} has no fused {op}: reconstruct + GEMM"
    if backend == "triton":
        lim = LIMITS["triton_fused_max_m"]
    elif backend == "native_cuda":
        lim = LIMITS["cuda_fused_max_m"]
        if act_dtype not in _CUDA_ACT:
            return False, f"native CUDA fused linear takes {_CUDA_ACT}, got {act_dtype}: reconstruct + GEMM"
    else:
        lim = LIMITS["cpu_fused_max_m"]
        if act_dtype != torch.float32 or mode == 1:
            return False, f"native CPU fused linear: fp32 paper/mean only (got {act_dtype}, mode {mode})"
    fused = 1 <= rows <= lim.value
    return fused, f"{'fused' if fused else 'reconstruct + GEMM'}: {rows} rows per sample vs {lim.value} ({lim.why})"


def plan(op: str, device: torch.device, dtype: torch.dtype, *, rows: Optional[int] = None, act_dtype=None,
         mode: int = 0) -> Plan:
    """The backend (``select``) and, for the linear ops (``rows`` given: rows per sample), fused or
    reconstruct + GEMM, decided once per call from LIMITS; logged at DEBUG with the reason."""
    name, kernel, why = select(op, device, dtype)
    fused = False
    if rows is not None and kernel is not None:
        fused, fwhy = _fused(name, op, rows, act_dtype, mode)
        why = f"{why}; {fwhy}"
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: backend %s (%s)", op, name, why)
    return Plan(name, kernel, fused, why)


# ------------------------------------------------------------------------------------------------------
# issue 14: the label-histogram inference path (csrc/cpu/histogram.cpp, sws_kernels/triton/histogram.py).
# In paper/mean mode with one x shared by all samples and no autograd, y[s] = sum_k z[s, k] h[k] + outlier terms:
# one pass over the labels per input row (S-independent) and a [out, K] x [K, S] product. It costs about M
# label passes where the fused kernel costs S passes of ceil(M / 8) vector FMAs and reconstruct + GEMM writes
# S weight matrices, so it pays for few rows and several samples. Measured: benchmarks/bench_predict.py.
# ------------------------------------------------------------------------------------------------------

LIMITS.update({
    "cpu_histogram_max_m": Limit(
        int(os.environ.get("SWS_HISTOGRAM_MAX_M", "64")),
        "native CPU histogram path up to this many rows per sample: each row costs its own pass over the labels "
        "(AVX-512 gather: ~2.4 ms of one core per row at 4096x4096, S <= 16); measured at M = 64, S = 16 it still "
        "beats reconstruct + GEMM (212 vs 556 ms CPU, K = 256), larger M unmeasured (benchmarks/RESULTS.md "
        "'Prediction') (env SWS_HISTOGRAM_MAX_M)"),
    "triton_histogram_max_m": Limit(
        int(os.environ.get("SWS_TRITON_HISTOGRAM_MAX_M", "16")),
        "Triton histogram path up to this many rows per sample (a row block's histograms live in registers); a "
        "default until benchmarks/gpu_bench.py measures it on a card (env SWS_TRITON_HISTOGRAM_MAX_M)"),
    "histogram_rows_per_sample_scalar": Limit(
        int(os.environ.get("SWS_HISTOGRAM_ROWS_PER_SAMPLE_SCALAR", "2")),
        "histogram path only when rows <= this x samples, where the CPU has no AVX-512 (the label pass is the "
        "scalar histogram, ~1.2 cycles per label into 4 interleaved bin copies: crossover rows <= 2 x samples, "
        "measured 2026-11-29 on the AVX2 path, benchmarks/RESULTS.md 'Prediction') and on Triton (unmeasured on "
        "a card) (env SWS_HISTOGRAM_ROWS_PER_SAMPLE_SCALAR)"),
    "histogram_rows_per_sample": Limit(
        int(os.environ.get("SWS_HISTOGRAM_ROWS_PER_SAMPLE", "8")),
        "native CPU with AVX-512 (the sample-vector gather, ~0.7 cycles per weight): "
        "histogram path only when rows <= this x samples: M label passes against the fused kernel's S passes "
        "and reconstruct's S weight matrices; measured crossover on the CPU (4096x4096, 1% outliers, one core, "
        "K = 256 / 4096): M = 4, S = 1 pays (12.4 vs 19.1 / 14.6 vs 23.0 ms), M = 8, S = 1 ties (22.1 vs 22.7 / "
        "24.3 vs 25.1), M = 16, S = 2 ties (41.3 vs 44.0 / 44.0 vs 45.7), M = 16, S = 1 loses (41.1 vs 26.4 / "
        "42.6 vs 27.2); the Triton path shares it, unmeasured on a card (env SWS_HISTOGRAM_ROWS_PER_SAMPLE)"),
})


def _histogram_native_cpu(*args):
    return native.sws_linear_histogram_cpu(*args)


def _histogram_triton(*args):
    from .triton import histogram as _th  # lazy: `import sws_kernels` works without triton

    return _th.sws_linear_histogram(*args)


# backend -> kernel(x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed, samples, mode,
# owner, codebook_owner) -> y [S, M, out] in x's dtype
HISTOGRAM_KERNELS: Dict[str, Callable] = {"native_cpu": _histogram_native_cpu, "triton": _histogram_triton}


def histogram(backend: str, rows: int, samples: int, mode: int, act_dtype, per_sample: bool,
              grad: bool) -> Tuple[Optional[Callable], str]:
    """(kernel or None, why) for the label-histogram path of one sws_linear call on ``backend`` (what ``select``
    chose): no autograd (``grad`` False), paper/mean mode (0/2), x shared by the samples, few rows per sample."""
    kernel = HISTOGRAM_KERNELS.get(backend)
    if kernel is None:
        return None, f"histogram: no {backend} kernel"
    if grad:
        return None, "histogram: grad enabled (training keeps the paths with a backward; use torch.no_grad())"
    if mode == 1:
        return None, "histogram: hierarchical mode draws a normal per weight"
    if per_sample:
        return None, "histogram: a per-sample x needs one histogram per (sample, row): the fused kernel's cost"
    if backend == "native_cpu":
        if act_dtype != torch.float32:
            return None, f"histogram: native CPU takes float32 x, got {act_dtype}"
        lim = LIMITS["cpu_histogram_max_m"]
    else:
        lim = LIMITS["triton_histogram_max_m"]
    gather = backend == "native_cpu" and native.simd_isa() == "avx512"
    ratio = LIMITS["histogram_rows_per_sample" if gather else "histogram_rows_per_sample_scalar"]
    if not 1 <= rows <= lim.value:
        return None, f"histogram: {rows} rows per sample > {lim.value} ({lim.why})"
    if rows > ratio.value * samples:
        return None, f"histogram: {rows} rows > {ratio.value} x {samples} samples ({ratio.why})"
    return kernel, f"histogram: {rows} rows, {samples} samples ({lim.why}; {ratio.why})"
# ---- end issue 14 ----
