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
import os
from typing import Callable, Dict, Tuple

import torch

BACKEND_NAMES = ("reference", "triton", "native_cpu", "native_cuda")
CHOICES = ("auto", "reference", "triton", "native")

_current = contextvars.ContextVar("sws_kernels_backend", default="auto")

# (op, backend) -> (kernel, supported dtypes). backend is one of BACKEND_NAMES minus "reference".
_KERNELS: Dict[Tuple[str, str], Tuple[Callable, Tuple[torch.dtype, ...]]] = {}


def register_kernel(op: str, backend: str, dtypes=(torch.float32,)):
    if backend not in BACKEND_NAMES[1:]:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES[1:]}, got {backend!r}")

    def deco(fn):
        _KERNELS[(op, backend)] = (fn, tuple(dtypes))
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


def backends() -> Dict[str, Tuple[bool, str]]:
    """{name: (available, reason)} for every backend; the reason says why one is unavailable."""
    from . import native

    tri = _triton_status()
    return {
        "reference": (True, ""),
        "triton": tri,
        "native_cpu": (native.AVAILABLE_CPU, native.CPU_REASON),
        "native_cuda": (native.AVAILABLE_CUDA, native.CUDA_REASON),
    }


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


def _native_name(device: torch.device) -> str:
    return "native_cuda" if device.type == "cuda" else "native_cpu"


def select(op: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, Callable | None, str]:
    """(backend name, kernel or None for the reference, why) for one call of ``op``."""
    choice = _current.get()
    if choice == "reference":
        return "reference", None, "forced"
    avail = backends()
    if choice != "auto":
        name = _native_name(device) if choice == "native" else choice
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
