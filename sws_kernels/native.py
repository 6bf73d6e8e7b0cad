"""Thin calls into the compiled module ``sws_kernels._C`` (csrc/ + python/module.cpp).

The extension links no libtorch: it takes addresses (``tensor.data_ptr()``), sizes and, for CUDA, the
stream as ints. This file owns everything torch-side: contiguity, output and workspace allocation, the
device guard and the current stream. Checks here are the cheap ones a kernel needs to be memory-safe
(dtypes, shapes, devices); range validation of labels and finiteness is done by ``_checks``/``functional``.

Every entry point takes one argument bundle, the C++ struct bound as a class: ``_C.ReconstructArgs``
(reconstruct, its backward, the fused linear), ``_C.MeanFieldArgs`` and ``_C.LinearArgs`` for the fused
linear's extras. :func:`prepare` / :func:`prepare_mean_field` check the tensors once and wrap the bundle in a
:class:`Prepared` / :class:`MFPrepared` that keeps the tensors it points into referenced; each entry point has
a ``*_prepared`` form that launches such a bundle with a per-call seed and sample count, which is how layers
skip the checks on their steady-state calls (sws_kernels/_bound.py).

CUDA backward workspace: the label-sorted CSR of "entries" comes from sws_kernels/_segments.py (the builder
the Triton backward shares; integer torch work on the device, no host sync, deterministic), cached per labels
version; the kernel then reduces one segment per (component, sample) in a fixed order (see
csrc/cuda/reconstruct.cu).
"""
from __future__ import annotations

import ctypes
import math
import os
import threading
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from . import _segments

_BUILD_HINT = "SWS_CUDA=ON PATH=$PATH:/usr/local/cuda/bin pip install --no-build-isolation --no-deps -e ."

try:
    from . import _C  # type: ignore[attr-defined]

    AVAILABLE_CPU, CPU_REASON = True, ""
except ImportError as _e:  # not built, or built for another Python
    _C = None
    AVAILABLE_CPU, CPU_REASON = False, (f"not built: sws_kernels._C is not importable ({_e}); build it from the "
                                        f"repository root with `{_BUILD_HINT}` (SWS_CUDA=ON adds the CUDA kernels)")

# ------------------------------------------------------------------------------------------------------
# CUDA status, lazily. Import must create no CUDA context and touch no driver: a context on device 0 in
# every DDP rank costs GPU 0 memory, and a driver initialised before a fork breaks CUDA in the children.
# So AVAILABLE_CUDA / CUDA_REASON are computed on first use (first CUDA launch, backends(), `sws-kernels
# info`) by _C.cuda_probe() (device queries: initialises the driver, creates no context), then cached.
# ------------------------------------------------------------------------------------------------------

# Minimum Linux driver for each CUDA major version under minor-version compatibility, from NVIDIA's "CUDA
# Compatibility" guide (docs.nvidia.com/deploy/cuda-compatibility, "Minor Version Compatibility", table 1) and
# the CUDA Toolkit release notes: 11.x >= 450.80.02, 12.x >= 525.60.13, 13.x >= 580. Windows numbers differ.
# The runtime is linked statically, so the driver must support the major version the module was built with.
_MIN_LINUX_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580"}

_ERR_INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: driver older than the runtime, or none at all
_ERR_NO_DEVICE = 100  # cudaErrorNoDevice
# Other cudaGetDeviceCount failures worth a hint.
_ERR_HINTS = {
    3: "cudaErrorInitializationError: often a process forked after CUDA was initialised in its parent",
    803: "the user-mode driver and the kernel module have different versions (reboot or reinstall the driver)",
    804: "the CUDA forward-compatibility package is not supported on this GPU",
}


@dataclass(frozen=True)
class CudaProbe:
    """The facts explain_cuda words: build constants plus what _C.cuda_probe() saw (no context)."""

    built: bool  # _C was compiled with the CUDA kernels
    runtime_version: int = 0  # CUDART_VERSION the module was compiled with (13000 = 13.0)
    archs: str = ""  # CMAKE_CUDA_ARCHITECTURES of the build, ',' or ';' separated ("80,90")
    driver_version: int = 0  # cudaDriverGetVersion: highest CUDA version the driver supports; 0 = no driver
    count_error: int = 0  # cudaGetDeviceCount's cudaError_t
    count_error_name: str = ""
    count_error_string: str = ""
    devices: Tuple[Tuple[int, str, int, int], ...] = ()  # (index, name, major, minor)
    kernel_module: str = ""  # NVIDIA kernel module version (/proc/driver/nvidia/version), when readable
    visible_devices: Optional[str] = None  # CUDA_VISIBLE_DEVICES, when set


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _parse_archs(archs: str):
    """CMAKE_CUDA_ARCHITECTURES entries -> [(major, minor, suffix, sass, ptx)], None for all/all-major/native.

    "80" = SASS sm_80 + PTX compute_80, "80-real" = SASS only, "80-virtual" = PTX only; a/f suffixes
    (90a, 100f) are arch/family-specific code.
    """
    out = []
    for entry in archs.replace(";", ",").split(","):
        entry = entry.strip()
        if not entry:
            continue
        kind = "both"
        for tail in ("-real", "-virtual"):
            if entry.endswith(tail):
                entry, kind = entry[: -len(tail)], tail[1:]
        suffix = entry[-1] if entry[-1:] in ("a", "f") else ""
        digits = entry[: len(entry) - len(suffix)]
        if not digits.isdigit():
            return None  # "all", "all-major", "native": resolved by CMake/nvcc, unknown here
        cc = int(digits)
        out.append((cc // 10, cc % 10, suffix, kind in ("both", "real"), kind in ("both", "virtual")))
    return out


def arch_support(major: int, minor: int, archs: str) -> Optional[str]:
    """Which code of the build runs on a device of compute capability major.minor: "SASS sm_80", "PTX
    compute_90 (JIT-compiled by the driver)", "unknown (...)" when the list is symbolic, or None (no code)."""
    parsed = _parse_archs(archs)
    if parsed is None:
        return f"unknown (build architectures {archs!r})"
    # SASS runs on the same major version with an equal or higher minor; arch-specific ("a") SASS only on
    # exactly that version. PTX is JIT-compiled for any equal or newer device unless arch/family-specific.
    sass = [(M, m, s) for M, m, s, has_sass, _ in parsed
            if has_sass and M == major and (m == minor if s == "a" else m <= minor)]
    if sass:
        M, m, s = max(sass)
        return f"SASS sm_{M}{m}{s}"
    ptx = [(M, m) for M, m, s, _, has_ptx in parsed
           if has_ptx and not s and (M, m) <= (major, minor)]
    if ptx:
        M, m = max(ptx)
        return f"PTX compute_{M}{m} (JIT-compiled by the driver at first launch)"
    return None


def explain_cuda(p: CudaProbe) -> Tuple[bool, str, Dict[int, str]]:
    """(usable, reason, {device index: why unusable}) from the probe; a pure function, unit-tested per case."""
    if not p.built:
        return False, ("not built: sws_kernels._C was compiled without the CUDA kernels (SWS_CUDA=OFF, or "
                       f"SWS_CUDA=AUTO found no nvcc); rebuild with `{_BUILD_HINT}`"), {}
    rt = f"CUDA {_cuda_version(p.runtime_version)} (CUDART_VERSION {p.runtime_version}, linked statically)"
    major = p.runtime_version // 1000
    need = _MIN_LINUX_DRIVER.get(major)
    need_txt = (f"a driver for CUDA {major}.x (Linux driver >= {need})" if need
                else f"a driver supporting CUDA {_cuda_version(p.runtime_version)}")
    drv = (f"CUDA {_cuda_version(p.driver_version)} (cudaDriverGetVersion {p.driver_version}"
           + (f", kernel module {p.kernel_module})" if p.kernel_module else ")"))
    err = f"{p.count_error_name or 'error'} ({p.count_error})"
    if p.count_error == _ERR_INSUFFICIENT_DRIVER and p.driver_version == 0:
        return False, (f"no GPU driver: the CUDA runtime finds no NVIDIA driver library (libcuda): "
                       f"cudaGetDeviceCount returned {err} and cudaDriverGetVersion none. A GPU would need "
                       f"{need_txt} for this build's runtime, {rt}"), {}
    if p.count_error == _ERR_INSUFFICIENT_DRIVER and p.driver_version < p.runtime_version:
        return False, (f"driver too old: the NVIDIA driver supports {drv}; this build's runtime is {rt} and "
                       f"needs {need_txt}; cudaGetDeviceCount returned {err}. Upgrade the driver, or rebuild "
                       f"with a CUDA toolkit no newer than the driver (its nvcc first on PATH): `{_BUILD_HINT}`"), {}
    if p.count_error == _ERR_NO_DEVICE or (p.count_error == 0 and not p.devices):
        how = f"cudaGetDeviceCount returned {err}" if p.count_error else "cudaGetDeviceCount returned 0 devices"
        hidden = (f"; CUDA_VISIBLE_DEVICES={p.visible_devices!r} may hide them"
                  if p.visible_devices is not None else "")
        return False, f"no GPU: an NVIDIA driver is installed, it supports {drv}, but {how}{hidden}", {}
    if p.count_error != 0:
        hint = _ERR_HINTS.get(p.count_error, p.count_error_string)
        return False, (f"CUDA runtime error: cudaGetDeviceCount returned {err}: {hint}. The driver supports "
                       f"{drv}; this build's runtime is {rt}"), {}
    lines, unusable = [], {}
    jit_note = ""
    for index, name, dmaj, dmin in p.devices:
        code = arch_support(dmaj, dmin, p.archs)
        if code is None:
            why = (f"no kernel image for sm_{dmaj}{dmin}: the build has code for {p.archs} (SWS_CUDA_ARCHS); "
                   f"rebuild with SWS_CUDA_ARCHS=\"{dmaj}{dmin};{p.archs.replace(',', ';')}\"")
            unusable[index] = f"cuda:{index} {name}: {why}"
            lines.append(f"cuda:{index} {name} sm_{dmaj}{dmin}: {why}")
        else:
            lines.append(f"cuda:{index} {name} sm_{dmaj}{dmin}: {code}")
            if code.startswith("PTX") and p.driver_version < p.runtime_version:
                jit_note = (f"; PTX JIT needs a driver for CUDA >= {_cuda_version(p.runtime_version)}, this one "
                            f"supports {_cuda_version(p.driver_version)}")
    usable = len(unusable) < len(p.devices)
    head = f"runtime {rt}, driver supports {drv}, build archs {p.archs}: "
    return usable, head + "; ".join(lines) + jit_note, unusable


_cuda_lock = threading.Lock()
_cuda_cache: Optional[Tuple[bool, str, Dict[int, str]]] = None
cuda_status_runs = 0  # how many times the lazy CUDA status ran: tests assert 0 right after import


def _kernel_module_version() -> str:
    # Linux only, a file read: the driver branch users know (550.54.15), next to the CUDA version it supports.
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
    except OSError:
        return ""
    words = [w for w in first.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else ""


def cuda_probe() -> CudaProbe:
    """Asks the driver (no context) what explain_cuda needs. Called by cuda_status, once per process."""
    if _C is None or not _C.with_cuda:
        return CudaProbe(built=False)
    raw = _C.cuda_probe()
    return CudaProbe(
        built=True, runtime_version=int(_C.cuda_runtime_version), archs=str(_C.cuda_archs),
        driver_version=raw["driver_version"], count_error=raw["count_error"],
        count_error_name=raw["count_error_name"], count_error_string=raw["count_error_string"],
        devices=tuple((i, n, M, m) for i, n, M, m, _sms in raw["devices"]),
        kernel_module=_kernel_module_version(), visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))


def build_summary() -> str:
    """What the compiled module contains, from its compile-time constants only (touches no driver)."""
    if _C is None:
        return CPU_REASON
    cpu = f"CPU kernels (OpenMP {'yes' if _C.has_openmp else 'no'})"
    if not _C.with_cuda:
        return f"{cpu}; no CUDA kernels (built with SWS_CUDA=OFF or without nvcc)"
    return (f"{cpu}; CUDA kernels for archs {_C.cuda_archs}, runtime CUDA "
            f"{_cuda_version(_C.cuda_runtime_version)} linked statically")


def cuda_status() -> Tuple[bool, str]:
    """(usable, reason) of the native CUDA backend: why it is missing, or which devices it runs on."""
    return _cuda_state()[:2]


def _cuda_state() -> Tuple[bool, str, Dict[int, str]]:
    global _cuda_cache, cuda_status_runs
    if _cuda_cache is None:
        with _cuda_lock:
            if _cuda_cache is None:
                cuda_status_runs += 1
                if _C is None:
                    state = (False, CPU_REASON, {})
                else:
                    try:
                        state = explain_cuda(cuda_probe())
                    except Exception as e:  # a driver problem must never escape a status query
                        state = (False, f"CUDA status query failed: {type(e).__name__}: {e}", {})
                _cuda_cache = state
    return _cuda_cache


def __getattr__(name: str):
    # PEP 562: AVAILABLE_CUDA / CUDA_REASON stay module attributes for callers, computed on first access.
    if name == "AVAILABLE_CUDA":
        return _cuda_state()[0]
    if name == "CUDA_REASON":
        return _cuda_state()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AVAILABLE_CPU",
    "CPU_REASON",
    "AVAILABLE_CUDA",
    "CUDA_REASON",
    "CudaProbe",
    "arch_support",
    "cuda_probe",
    "cuda_status",
    "build_summary",
    "explain_cuda",
    "philox4x32",
    "uniform",
    "normal",
    "reconstruct",
    "reconstruct_backward",
    "set_num_threads",
    "max_threads",
    "mean_field_reconstruct",
    "mean_field_reconstruct_backward",
    "sws_linear_cuda",
    "sws_linear_cpu",
    "simd_level",
    "simd_isa",
    "set_simd",
]

# labels dtype -> the code csrc/common.h expects
_LABEL_CODES = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4}
_MASK64 = (1 << 64) - 1


def _need_for(t: torch.Tensor) -> bool:
    """_need for the device of tensor t; True when it is a CUDA tensor. (Tensor.is_cpu / is_cuda cost ~60 ns,
    torch.device.type ~270 ns: this runs on every native call.)"""
    if t.is_cpu:
        if not AVAILABLE_CPU:
            raise RuntimeError(f"sws_kernels native CPU backend unavailable: {CPU_REASON}")
        return False
    _need(t.device)
    return True


def _need(device: torch.device) -> None:
    if device.type == "cuda":
        usable, reason, unusable = _cuda_state()
        if not usable:
            raise RuntimeError(f"sws_kernels native CUDA backend unavailable: {reason}")
        if device.index in unusable:  # some GPUs of a mixed machine may lack code in this build
            raise RuntimeError(f"sws_kernels native CUDA backend: {unusable[device.index]}")
    elif device.type == "cpu":
        if not AVAILABLE_CPU:
            raise RuntimeError(f"sws_kernels native CPU backend unavailable: {CPU_REASON}")
    else:
        raise RuntimeError(f"sws_kernels native backend: unsupported device {device}")


def _seed(seed) -> int:
    """The seed's value for the CPU kernels. A CPU seed tensor is read straight from its memory (no aten op: a
    0-dim CPU tensor needs no device sync, and `.item()` would count as one); a CUDA seed tensor is read by the
    CUDA kernels themselves from device memory (_seed_dev), so its host value is unused."""
    if isinstance(seed, torch.Tensor):
        if not seed.is_cpu:
            return 0
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed: expected a one-element int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        return ctypes.c_uint64.from_address(seed.data_ptr()).value
    seed = int(seed)
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed: expected a value in [0, 2**64), got {seed}")
    return seed & _MASK64  # an int64 carrying the uint64 seed's bits decodes to the same seed


def _seed_dev(seed, device: torch.device) -> int:
    """Device address of the seed for the CUDA kernels (philox.h SeedRef); 0: use the host value."""
    if isinstance(seed, torch.Tensor):
        if seed.device != device:
            raise ValueError(f"seed: expected a tensor on {device} (the device of the parameters), got {seed.device}")
        return seed.data_ptr()
    return 0


def _check(t: torch.Tensor, name: str, dtype, device, ndim_shape=None) -> torch.Tensor:
    # The common case in one expression (this runs ~10 times per native call: ~0.1 us each saved here).
    if (isinstance(t, torch.Tensor) and t.dtype is dtype and t.device == device
            and (ndim_shape is None or t.shape == ndim_shape)):
        return t.contiguous()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if ndim_shape is not None and tuple(t.shape) != tuple(ndim_shape):
        raise ValueError(f"{name}: expected shape {tuple(ndim_shape)}, got {tuple(t.shape)}")
    return t.contiguous()


def set_num_threads(n: int) -> None:
    """OpenMP threads of the native CPU kernels (the extension's own OpenMP runtime)."""
    _need(torch.device("cpu"))
    _C.set_num_threads(int(n))


def max_threads() -> int:
    _need(torch.device("cpu"))
    return int(_C.omp_max_threads())


# ------------------------------------------------------------------------------------------------------
# RNG (CPU): the test surface of csrc/philox.h
# ------------------------------------------------------------------------------------------------------

def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10: int64 [..., 4] counters, int64 [..., 2] keys (uint32 values) -> int64 [..., 4]."""
    _need(torch.device("cpu"))
    if counter.dtype != torch.int64 or counter.shape[-1:] != (4,):
        raise TypeError(f"counter: expected an int64 tensor [..., 4], got {counter.dtype} {tuple(counter.shape)}")
    if key.dtype != torch.int64 or key.shape[-1:] != (2,):
        raise TypeError(f"key: expected an int64 tensor [..., 2], got {key.dtype} {tuple(key.shape)}")
    if counter.device.type != "cpu" or key.device.type != "cpu":
        raise ValueError("philox4x32: the native version takes CPU tensors")
    batch = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    c = counter.expand(*batch, 4).contiguous()
    k = key.expand(*batch, 2).contiguous()
    out = torch.empty(*batch, 4, dtype=torch.int64)
    _C.philox4x32(c.data_ptr(), k.data_ptr(), out.data_ptr(), c.numel() // 4)
    return out


def uniform(seed, n: int, sample: int = 0, owner: int = 0, purpose: int = 0, offset: int = 0) -> torch.Tensor:
    """float32 [n]: uniforms of elements offset..offset+n-1 of stream (seed, sample, owner, purpose)."""
    _need(torch.device("cpu"))
    out = torch.empty(int(n), dtype=torch.float32)
    _C.uniform(out.data_ptr(), int(n), _seed(seed), int(sample), int(owner), int(purpose), int(offset))
    return out


def normal(seed, n: int, sample: int = 0, owner: int = 0, purpose: int = 0, offset: int = 0) -> torch.Tensor:
    """float32 [n]: normals of elements offset..offset+n-1 of stream (seed, sample, owner, purpose)."""
    _need(torch.device("cpu"))
    out = torch.empty(int(n), dtype=torch.float32)
    _C.normal(out.data_ptr(), int(n), _seed(seed), int(sample), int(owner), int(purpose), int(offset))
    return out


# ------------------------------------------------------------------------------------------------------
# reconstruct
# ------------------------------------------------------------------------------------------------------

_PTR = torch.Tensor.data_ptr


def _rebind(args, fields, tensors, ptrs) -> None:
    """Point a bundle's address fields at its tensors' current storage (checked like a fresh bundle's)."""
    for name, t, ptr in zip(fields, tensors, ptrs):
        if ptr == 0 and t.numel() > 0:
            raise RuntimeError(f"{name}: its storage is not allocated (a sharded parameter outside its gathered "
                               f"window?): cannot launch a kernel on it")
        setattr(args, name, ptr)


class _Bundle:
    """A checked argument bundle launched many times (:class:`Prepared`, :class:`MFPrepared`): ``args`` the C++
    struct, ``tensors`` the contiguous tensors it points into (kept referenced), ``aliases`` True when every one is
    the caller's own tensor (no contiguous copy: only then does the bundle follow in-place parameter updates).

    The per-call fields (seed, samples) are written by :meth:`call` right before each launch, under ``lock`` (two
    threads calling one layer must not launch with each other's seed). Addresses are re-read on every launch: a
    tensor whose storage moved since the bundle was built (FSDP2 frees a layer's parameters after its forward and
    gathers them into new memory before its backward; ``.data`` replacement) is launched at its current address,
    never at the old one. A layer keeps one bundle for as long as its tensors are the same objects
    (sws_kernels/_bound.py) and skips the ~15 checks of :func:`prepare` per call."""

    __slots__ = ("args", "tensors", "cuda", "device", "shape", "aliases", "lock", "ptrs", "moved")
    _FIELDS: Tuple[str, ...] = ()  # the address fields of ``args``, in the order of ``tensors``

    def __init__(self, args, tensors, cuda, device, shape, aliases):
        self.args, self.tensors, self.cuda, self.device = args, tensors, cuda, device
        self.shape, self.aliases = shape, aliases
        self.lock = threading.Lock()
        self.ptrs = list(map(_PTR, tensors))
        self.moved = False

    def call(self, seed, samples: int):
        """The bundle with this call's seed and sample count written in (CPU: the seed read from its memory) and
        every tensor's current address (:meth:`refresh`; the caller holds ``lock``)."""
        a = self.args
        self._repoint()
        a.seed = _seed(seed)
        if self.cuda:
            a.seed_dev = _seed_dev(seed, self.device)
        a.S = samples
        return a

    def refresh(self, checked: bool = False):
        """The C++ struct pointed at its tensors' current storage. ``checked``: the caller has just verified that
        no address moved since the bundle was built (sws_kernels/_bound.py's binding check of a forward call),
        so they are not re-read (~1 us) -- unless a launch has ever re-pointed the bundle (``moved``): storage
        that moved away and back would pass the caller's check while the bundle still points at the intermediate
        address. Callers hold ``lock`` when they then write per-call fields (:meth:`call`); the ``*_run`` entries
        copy the struct and take the seed and S as arguments."""
        if not checked or self.moved:
            if list(map(_PTR, self.tensors)) != self.ptrs:
                with self.lock:
                    self._repoint()
        return self.args

    def _repoint(self) -> None:
        ptrs = list(map(_PTR, self.tensors))
        if ptrs != self.ptrs:
            _rebind(self.args, self._FIELDS, self.tensors, ptrs)
            self.ptrs = ptrs
            self.moved = True


class Prepared(_Bundle):
    """The reconstruct family's bundle: ``_C.ReconstructArgs`` over (means, chol, labels, e_pos, e_a, e_b, e_alpha,
    o_pos, o_mu, o_rho); ``K`` components, ``shape`` the labels' shape."""

    __slots__ = ("K",)
    _FIELDS = ("means", "chol", "labels", "e_pos", "e_a", "e_b", "e_alpha", "o_pos", "o_mu", "o_rho")

    def __init__(self, args, tensors, cuda, device, K, shape, aliases):
        super().__init__(args, tensors, cuda, device, shape, aliases)
        self.K = K


def prepare(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, mode, owner,
            codebook_owner) -> Prepared:
    """The checks every launch needs (dtypes, shapes, devices, contiguity) done once: a :class:`Prepared`."""
    dev = means.device
    cuda = _need_for(means)
    if means.dim() != 2 or means.shape[1] != 2:
        raise ValueError(f"means: expected shape [K, 2], got {tuple(means.shape)}")
    K = means.shape[0]
    given = (means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho)
    means = _check(means, "means", torch.float32, dev)
    chol = _check(chol, "chol", torch.float32, dev, (K, 3))
    if labels.dtype not in _LABEL_CODES:
        raise TypeError(f"labels: expected one of {list(_LABEL_CODES)}, got {labels.dtype}")
    labels = _check(labels, "labels", labels.dtype, dev)
    E = e_pos.numel()
    e_pos = _check(e_pos, "e_pos", torch.int64, dev, (E,))
    e_a = _check(e_a, "e_a", torch.int64, dev, (E,))
    e_b = _check(e_b, "e_b", torch.int64, dev, (E,))
    e_alpha = _check(e_alpha, "e_alpha", torch.float32, dev, (E,))
    O = o_pos.numel()
    o_pos = _check(o_pos, "o_pos", torch.int64, dev, (O,))
    o_mu = _check(o_mu, "o_mu", torch.float32, dev, (O,))
    o_rho = _check(o_rho, "o_rho", torch.float32, dev, (O,))
    tensors = (means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho)
    args = _C.ReconstructArgs(
        means.data_ptr(), chol.data_ptr(), K, labels.data_ptr(), _LABEL_CODES[labels.dtype], labels.numel(),
        e_pos.data_ptr(), e_a.data_ptr(), e_b.data_ptr(), e_alpha.data_ptr(), E,
        o_pos.data_ptr(), o_mu.data_ptr(), o_rho.data_ptr(), O, 0, 0, 1, int(mode), int(owner), int(codebook_owner))
    return Prepared(args, tensors, cuda, dev, K, tuple(labels.shape),
                    all(a is b for a, b in zip(given, tensors)))


def _stream(dev: torch.device) -> int:
    return torch.cuda.current_stream(dev).cuda_stream


def reconstruct(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples, mode, owner,
                codebook_owner) -> torch.Tensor:
    """float32 [samples, *labels.shape]; mode is the int code (0 paper, 1 hierarchical, 2 mean)."""
    p = prepare(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, mode, owner, codebook_owner)
    return reconstruct_prepared(p, seed, int(samples))


def reconstruct_prepared(p: Prepared, seed, S: int, shape=None) -> torch.Tensor:
    """:func:`reconstruct` on a :class:`Prepared` bundle; ``shape`` (CPU): the output's, of S * n elements
    (default [S, *labels.shape])."""
    dev = p.device
    if shape is not None:
        if p.cuda or math.prod(shape) != S * math.prod(p.shape):
            raise ValueError(f"shape: expected a CPU output of {S} x {math.prod(p.shape)} elements, got "
                             f"{tuple(shape)} on {dev}")
        out = _empty32(shape)
    else:
        out = torch.empty((S, *p.shape), dtype=torch.float32, device=dev)
    if not p.cuda:
        with p.lock:  # per-call fields of a shared bundle: one launch at a time
            _C.reconstruct_cpu(p.call(seed, S), out.data_ptr())
        return out
    with torch.cuda.device(dev):
        zbuf = torch.empty(max(1, S * p.K * 2), dtype=torch.float32, device=dev)
        with p.lock:  # per-call fields of a shared bundle: one launch at a time
            _C.reconstruct_cuda(p.call(seed, S), out.data_ptr(), zbuf.data_ptr(), _stream(dev))
    return out


def _segments_csr(labels, e_pos, e_a, e_b, e_alpha, o_pos, K):
    """(offsets int64 [K+1], pos int64 [N], coef float32 [N]): the label-sorted CSR of the backward's entries,
    from the one builder the Triton backward shares (sws_kernels/_segments.py), cached per labels version."""
    index = _segments.label_index(labels, e_pos, e_a, e_b, e_alpha, o_pos, K)
    return index.offsets, index.pos, index.coef


def reconstruct_backward(grad_w, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, seed, samples,
                         mode, owner, codebook_owner) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad means [K,2], grad chol [K,3], grad o_mu [O], grad o_rho [O]) from grad_w [samples, *labels.shape]."""
    p = prepare(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, mode, owner, codebook_owner)
    return reconstruct_backward_prepared(p, grad_w, seed, int(samples), (labels, e_pos, e_a, e_b, e_alpha, o_pos))


def reconstruct_backward_prepared(p: Prepared, grad_w, seed, S: int, index=None):
    """:func:`reconstruct_backward` on a :class:`Prepared` bundle. ``index``: the caller's (labels, e_pos, e_a,
    e_b, e_alpha, o_pos), which key the CUDA backward's cached label index (default: the bundle's own)."""
    dev, K = p.device, p.K
    O = p.tensors[7].numel()
    grad_w = _check(grad_w, "grad_w", torch.float32, dev, (S, *p.shape))
    g_means = torch.empty((K, 2), dtype=torch.float32, device=dev)
    g_chol = torch.empty((K, 3), dtype=torch.float32, device=dev)
    g_mu = torch.empty((O,), dtype=torch.float32, device=dev)
    g_rho = torch.empty((O,), dtype=torch.float32, device=dev)
    outs = (g_means.data_ptr(), g_chol.data_ptr(), g_mu.data_ptr(), g_rho.data_ptr())
    if not p.cuda:
        with p.lock:  # per-call fields of a shared bundle: one launch at a time
            _C.reconstruct_backward_cpu(p.call(seed, S), grad_w.data_ptr(), *outs)
        return g_means, g_chol, g_mu, g_rho
    with torch.cuda.device(dev):
        # keyed by the caller's tensors (their identity and version), not by prepare's contiguous copies
        labels, e_pos, e_a, e_b, e_alpha, o_pos = index if index is not None else p.tensors[2:8]
        offsets, pos, coef = _segments_csr(labels, e_pos, e_a, e_b, e_alpha, o_pos, K)
        dzbuf = torch.empty(max(1, S * K * 2), dtype=torch.float64, device=dev)
        with p.lock:  # per-call fields of a shared bundle: one launch at a time
            _C.reconstruct_backward_cuda(p.call(seed, S), grad_w.data_ptr(), *outs, offsets.data_ptr(),
                                         pos.data_ptr(), coef.data_ptr(), pos.numel(), dzbuf.data_ptr(), _stream(dev))
    return g_means, g_chol, g_mu, g_rho


# ------------------------------------------------------------------------------------------------------
# mean-field reconstruct: w[s] = mu + softplus(rho) eps[s] (CPU: csrc/cpu/mean_field.cpp)
# ------------------------------------------------------------------------------------------------------

class MFPrepared(_Bundle):
    """The mean-field bundle: ``_C.MeanFieldArgs`` over contiguous (mu, rho); ``shape`` mu's shape."""

    __slots__ = ()
    _FIELDS = ("mu", "rho")


def prepare_mean_field(mu, rho, owner, purpose) -> MFPrepared:
    dev = mu.device
    cuda = _need_for(mu)
    mu_c = _check(mu, "mu", torch.float32, dev)
    rho_c = _check(rho, "rho", torch.float32, dev, mu.shape)
    args = _C.MeanFieldArgs(mu_c.data_ptr(), rho_c.data_ptr(), mu_c.numel(), 0, 0, 1, int(owner), int(purpose))
    return MFPrepared(args, (mu_c, rho_c), cuda, dev, tuple(mu.shape), mu_c is mu and rho_c is rho)


def mean_field_reconstruct(mu, rho, seed, samples, owner, purpose) -> torch.Tensor:
    """float32 [samples, *mu.shape] = mu + softplus(rho) * eps[s], eps of stream (seed, s, owner, purpose)."""
    return mean_field_reconstruct_prepared(prepare_mean_field(mu, rho, owner, purpose), seed, int(samples))


def mean_field_reconstruct_prepared(p: MFPrepared, seed, S: int) -> torch.Tensor:
    dev = p.device
    out = torch.empty((S, *p.shape), dtype=torch.float32, device=dev)
    if not p.cuda:
        with p.lock:  # per-call fields of a shared bundle: one launch at a time
            _C.mean_field_reconstruct_cpu(p.call(seed, S), out.data_ptr())
        return out
    with torch.cuda.device(dev):
        with p.lock:  # per-call fields of a shared bundle: one launch at a time
            _C.mean_field_reconstruct_cuda(p.call(seed, S), out.data_ptr(), _stream(dev))
    return out


def mean_field_reconstruct_backward(grad_w, mu, rho, seed, samples, owner,
                                    purpose) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d mu, d rho) from grad_w [samples, *mu.shape]; the noise regenerated from the seed. Deterministic."""
    return mean_field_reconstruct_backward_prepared(prepare_mean_field(mu, rho, owner, purpose), grad_w, seed,
                                                    int(samples))


def mean_field_reconstruct_backward_prepared(p: MFPrepared, grad_w, seed, S: int):
    dev = p.device
    grad_w = _check(grad_w, "grad_w", torch.float32, dev, (S, *p.shape))
    g_mu = torch.empty(p.shape, dtype=torch.float32, device=dev)
    g_rho = torch.empty(p.shape, dtype=torch.float32, device=dev)
    outs = (grad_w.data_ptr(), g_mu.data_ptr(), g_rho.data_ptr())
    if not p.cuda:
        with p.lock:  # per-call fields of a shared bundle: one launch at a time
            _C.mean_field_reconstruct_backward_cpu(p.call(seed, S), *outs)
        return g_mu, g_rho
    with torch.cuda.device(dev):
        with p.lock:  # per-call fields of a shared bundle: one launch at a time
            _C.mean_field_reconstruct_backward_cuda(p.call(seed, S), *outs, _stream(dev))
    return g_mu, g_rho


# ------------------------------------------------------------------------------------------------------
# mean-field KL against a scalar prior (csrc/cpu/kl.cpp)
# ------------------------------------------------------------------------------------------------------

def kl_gaussian_sum(mu, rho, mu0: float, sigma0: float) -> float:
    """sum_i KL(N(mu_i, softplus(rho_i)^2) || N(mu0, sigma0^2)) of CPU float32 contiguous mu, rho (a float)."""
    _need_for(mu)
    mu = _check(mu, "mu", torch.float32, torch.device("cpu"))
    rho = _check(rho, "rho", torch.float32, torch.device("cpu"), mu.shape)
    return _C.kl_gaussian_cpu(mu.data_ptr(), rho.data_ptr(), mu.numel(), float(mu0), float(sigma0))


def kl_gaussian_mean(mu, rho, mu0: float, sigma0: float, bmu=None, brho=None, bmu0: float = 0.0,
                     bsigma0: float = 1.0) -> float:
    """kl_gaussian_sum(mu, rho) / mu.numel() (+ the same of bmu, brho): bayesian-torch's layer KL of a weight and
    bias in one or two calls with the checks done once (the layers' per-call KL, sws_kernels/_bound.py). The
    ``Tensor.is_cpu`` / ``is_contiguous`` checks of the common case cost ~0.3 us where two :func:`kl_gaussian_sum`
    calls cost ~2."""
    pairs = ((mu, rho, mu0, sigma0),) if bmu is None else ((mu, rho, mu0, sigma0), (bmu, brho, bmu0, bsigma0))
    kl = 0.0
    for m, r, m0, s0 in pairs:
        if not (m.dtype is torch.float32 and r.dtype is torch.float32 and m.is_cpu and r.is_cpu
                and m.is_contiguous() and r.is_contiguous() and m.shape == r.shape and AVAILABLE_CPU):
            kl += kl_gaussian_sum(m, r, m0, s0) / m.numel()
            continue
        kl += _C.kl_gaussian_cpu(m.data_ptr(), r.data_ptr(), m.numel(), m0, s0) / m.numel()
    return kl


def kl_components(means, chol, means0, chol0, grad: bool):
    """(codebook KL as a float, g_means [K, 2], g_chol [K, 3]) of CPU float32 contiguous tensors (csrc/cpu/kl.cpp);
    the gradients are None unless ``grad``."""
    _need_for(means)
    cpu = torch.device("cpu")
    means = _check(means, "means", torch.float32, cpu)
    K = means.shape[0] if means.dim() == 2 and means.shape[1] == 2 else -1
    if K < 0:
        raise ValueError(f"means: expected shape [K, 2], got {tuple(means.shape)}")
    chol = _check(chol, "chol", torch.float32, cpu, (K, 3))
    means0 = _check(means0, "means0", torch.float32, cpu, (K, 2))
    chol0 = _check(chol0, "chol0", torch.float32, cpu, (K, 3))
    g_means = _empty32((K, 2)) if grad else None
    g_chol = _empty32((K, 3)) if grad else None
    value = _C.kl_components_cpu(means.data_ptr(), chol.data_ptr(), means0.data_ptr(), chol0.data_ptr(), K,
                                 0 if g_means is None else g_means.data_ptr(), 0 if g_chol is None else g_chol.data_ptr())
    return value, g_means, g_chol


def kl_gaussian_backward(mu, rho, mu0: float, sigma0: float, scale: float):
    """(d mu, d rho) of scale * kl_gaussian_sum(mu, rho, mu0, sigma0)."""
    _need_for(mu)
    mu = _check(mu, "mu", torch.float32, torch.device("cpu"))
    rho = _check(rho, "rho", torch.float32, torch.device("cpu"), mu.shape)
    g_mu, g_rho = torch.empty_like(mu), torch.empty_like(rho)
    _C.kl_gaussian_backward_cpu(mu.data_ptr(), rho.data_ptr(), mu.numel(), float(mu0), float(sigma0), float(scale),
                                g_mu.data_ptr(), g_rho.data_ptr())
    return g_mu, g_rho


def simd_level() -> str:
    """'avx2' or 'scalar': the vector code the CPU normals/softplus use now (see csrc/cpu/vecmath.h)."""
    _need(torch.device("cpu"))
    return str(_C.simd_level())


def simd_isa() -> str:
    """'avx512', 'avx2' or 'scalar': the widest vector code the CPU kernels use now (csrc/cpu/vecmath.h); the
    dispatch table's histogram limits depend on it."""
    _need(torch.device("cpu"))
    return str(_C.simd_isa())


def set_simd(enabled: bool) -> None:
    """Enable (default) or disable the AVX2 normals/softplus, process-wide (tests and benchmarks)."""
    _need(torch.device("cpu"))
    _C.set_simd(bool(enabled))


# ------------------------------------------------------------------------------------------------------
# fused small-M SWS linear forward (CUDA: csrc/cuda/linear.cu)
# ------------------------------------------------------------------------------------------------------

_ACT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
LINEAR_MAX_M = 16  # csrc/common.h kLinearMaxM: rows per sample the fused kernel accumulates


def _overrides(n, in_f, out_f, e_pos, o_pos):
    """(bitmask int32 [(n+31)//32], row offsets int64 [out+1], positions int64 [E+O] ascending, entry ids).

    Entry id < E is ellipse entry id, else outlier entry id - E. Integer torch work on the device and no host
    sync: stable sort, then the row offsets by searchsorted on the sorted rows (bincount would sync: its output
    size needs the max). Deterministic.
    """
    dev = e_pos.device
    pos = torch.cat([e_pos, o_pos])
    idx = torch.arange(pos.numel(), dtype=torch.int64, device=dev)
    order = torch.sort(pos, stable=True).indices
    pos, idx = pos[order].contiguous(), idx[order].contiguous()
    rows = torch.searchsorted(pos // in_f, torch.arange(out_f + 1, dtype=torch.int64, device=dev))
    words = torch.zeros((n + 31) // 32, dtype=torch.int64, device=dev)
    # one bit per position; positions are unique, so a scatter-add of distinct powers of two is an OR
    # a position outside [0, n) (unvalidated data) sets no bit and lies in no row's range: never an index outside
    inside = (pos >= 0) & (pos < n)
    pos_in = torch.where(inside, pos, torch.zeros_like(pos))
    words.index_add_(0, pos_in >> 5, torch.where(inside, torch.ones_like(pos) << (pos_in & 31), 0))
    mask = torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32).contiguous()
    return mask, rows, pos, idx


def _linear_x(x, bias, out_f, in_f, S, per_sample, dtype, dev, cpu: bool = False):
    """(x contiguous, M, bias float32 or None): the fused linear's input checks, shared by CPU and CUDA. ``cpu``:
    the caller's bundle is a CPU one (``Tensor.is_cpu`` then replaces a ~0.3 us torch.device comparison)."""
    if cpu and x.dtype is dtype and x.is_cpu:
        x = x.contiguous()
    else:
        x = _check(x, "x", dtype, dev)
    per = in_f * (S if per_sample else 1)
    M = x.numel() // per if x.dim() >= 1 and x.shape[-1] == in_f and per > 0 else 0
    if M == 0 or x.numel() != M * per or (per_sample and x.shape[0] != S):
        what = f"[{S}, ..., {in_f}]" if per_sample else f"[..., {in_f}]"
        raise ValueError(f"x: expected {what}, got {tuple(x.shape)}")
    b = None
    if bias is not None:
        if cpu and bias.dtype is torch.float32 and bias.is_cpu:
            b = bias.contiguous()
        else:
            b = _check(bias.to(torch.float32), "bias", torch.float32, dev)
        bs = b.shape
        if not (bs == (out_f,) or bs == (S, out_f)):
            raise ValueError(f"bias: expected [{out_f}] or [{S}, {out_f}], got {tuple(bs)}")
    return x, M, b


def sws_linear_cuda(x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed, samples, mode,
                    owner, codebook_owner, per_sample) -> torch.Tensor:
    """Fused forward for M <= 16 rows per sample: y [S, M, out] in x's dtype (x [M, in] or [S, M, in])."""
    if not means.is_cuda:
        raise ValueError(f"sws_linear_cuda: expected CUDA tensors, got {means.device}")
    p = prepare(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, mode, owner, codebook_owner)
    return sws_linear_cuda_prepared(p, x, bias, seed, int(samples), per_sample)


def sws_linear_cuda_prepared(p: Prepared, x, bias, seed, S: int, per_sample: bool) -> torch.Tensor:
    """:func:`sws_linear_cuda` on a :class:`Prepared` bundle."""
    dev, K = p.device, p.K
    if x.dtype not in _ACT_CODES:
        raise TypeError(f"x: expected one of {list(_ACT_CODES)}, got {x.dtype}")
    out_f, in_f = p.shape
    x, M, b = _linear_x(x, bias, out_f, in_f, S, per_sample, x.dtype, dev)
    y = torch.empty((S, M, out_f), dtype=x.dtype, device=dev)
    lin = _C.LinearArgs(out_f, in_f, x.data_ptr(), _ACT_CODES[x.dtype], M, bool(per_sample),
                        0 if b is None else b.data_ptr(), b is not None and b.dim() == 2, y.data_ptr())
    with torch.cuda.device(dev):
        e_pos_c, o_pos_c = p.tensors[3], p.tensors[7]
        if e_pos_c.numel() + o_pos_c.numel():
            mask, rows, pos, idx = _overrides(out_f * in_f, in_f, out_f, e_pos_c, o_pos_c)
            lin.ov_mask, lin.ov_rows, lin.ov_pos, lin.ov_idx = (mask.data_ptr(), rows.data_ptr(), pos.data_ptr(),
                                                                idx.data_ptr())
        zbuf = torch.empty(max(1, S * K * 2), dtype=torch.float32, device=dev)
        with p.lock:  # per-call fields of a shared bundle: one launch at a time
            _C.sws_linear_cuda(p.call(seed, S), lin, zbuf.data_ptr(), _stream(dev))
    return y


# ------------------------------------------------------------------------------------------------------
# fused small-M SWS linear forward (CPU: csrc/cpu/linear.cpp), paper and mean modes, float32 activations
# ------------------------------------------------------------------------------------------------------

LINEAR_CPU_MAX_M = 32  # csrc/common.h kLinearCpuMaxM


def sws_linear_cpu(x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed, samples, mode,
                   owner, codebook_owner, per_sample) -> torch.Tensor:
    """Fused forward, W never materialised: y float32 [S, M, out] (x float32 [M, in] or [S, M, in], M <= 32)."""
    if not means.is_cpu:
        raise ValueError(f"sws_linear_cpu: expected CPU tensors, got {means.device}")
    if int(mode) not in (0, 2):
        raise ValueError(f"sws_linear_cpu: mode must be 0 (paper) or 2 (mean), got {mode}")
    if labels.dim() != 2:
        raise ValueError(f"labels: expected [out, in], got {tuple(labels.shape)}")
    p = prepare(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, mode, owner, codebook_owner)
    return sws_linear_cpu_prepared(p, x, bias, seed, int(samples), per_sample)


def _empty32(shape) -> torch.Tensor:
    """``torch.empty(shape, dtype=torch.float32)`` on the CPU. Measured (bench_overhead's machine): passing the
    shape as varargs and no dtype keyword costs ~0.6 us where the tuple + dtype form costs ~1.05 us; that form is
    only float32 while the default dtype is."""
    if torch.get_default_dtype() is torch.float32:
        return torch.empty(*shape)
    return torch.empty(shape, dtype=torch.float32)


def linear_args(out_f: int, in_f: int, M: int, per_sample: bool):
    """A ``_C.LinearArgs`` of one call shape, for :func:`sws_linear_cpu_bound` to reuse (its addresses are written
    per call): building one costs ~1 us of pybind argument conversion."""
    if not 1 <= M <= LINEAR_CPU_MAX_M:
        raise ValueError(f"M: expected 1 <= M <= {LINEAR_CPU_MAX_M} rows per sample, got {M}")
    return _C.LinearArgs(int(out_f), int(in_f), 0, 0, int(M), bool(per_sample))


def sws_linear_cpu_bound(p: Prepared, lin, x, bias, seed, S: int, shape, checked: bool) -> torch.Tensor:
    """:func:`sws_linear_cpu_prepared` for a caller that has checked the call shape once (sws_kernels/_bound.py:
    ``lin`` from :func:`linear_args` for x's shape, float32 x on the CPU, ``shape`` the output's shape). What can
    change between calls of one shape is re-checked here: x's layout and size, the bias' dtype, device and size.
    ``lin`` and the bundle are not written: this call's addresses, seed and S go to C++ as arguments."""
    out_f, in_f = p.shape
    x = x.contiguous()
    if x.numel() != (S if lin.per_sample else 1) * lin.M * in_f or x.dtype is not torch.float32 or not x.is_cpu:
        raise ValueError(f"x: expected float32 CPU [{'S, ' if lin.per_sample else ''}..., {in_f}] with "
                         f"{lin.M} rows per sample, got {x.dtype} {tuple(x.shape)} on {x.device}")
    y = _empty32(shape)
    if y.numel() != S * lin.M * out_f:
        raise ValueError(f"shape: expected {S * lin.M * out_f} elements, got {tuple(shape)}")
    bptr, b2 = 0, False
    if bias is not None:
        if bias.dtype is not torch.float32 or not bias.is_cpu or bias.numel() != out_f or bias.dim() != 1:
            _, _, bias = _linear_x(x, bias, out_f, in_f, S, lin.per_sample, torch.float32, p.device, cpu=True)
        bias = bias.contiguous()
        bptr, b2 = bias.data_ptr(), bias.dim() == 2
    _C.sws_linear_cpu_run(p.refresh(checked), lin, x.data_ptr(), y.data_ptr(), bptr, b2, *_seed_arg(seed), S)
    return y


def _seed_arg(seed) -> Tuple[int, int]:
    """(value, address) of a seed for the ``*_run`` entries: a CPU int64 seed tensor by its address (C++ reads
    it: no aten op, no sync), anything else by its value (:func:`_seed`)."""
    if type(seed) is torch.Tensor:
        if not seed.is_cpu or seed.dtype is not torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed: expected a one-element int64 CPU tensor, got {seed.dtype} of shape "
                            f"{tuple(seed.shape)} on {seed.device}")
        return 0, seed.data_ptr()
    return _seed(seed), 0


def _rows_inputs(gy, x, out_f: int, in_f: int, S: int, per_sample: bool):
    """(gy, x) contiguous float32 CPU for the one-row backward entries, checked against [S, 1, out] and [1, in]
    ([S, 1, in] per sample): what the C++ reads."""
    gy = gy.contiguous()
    x = x.contiguous()
    nx = (S if per_sample else 1) * in_f
    if (gy.dtype is not torch.float32 or x.dtype is not torch.float32 or not gy.is_cpu or not x.is_cpu
            or gy.numel() != S * out_f or x.numel() != nx):
        raise ValueError(f"gy, x: expected float32 CPU tensors of {S * out_f} and {nx} elements (one row per "
                         f"sample), got {gy.dtype} {tuple(gy.shape)} and {x.dtype} {tuple(x.shape)}")
    return gy, x


def sws_linear_backward_rows_cpu(p: Prepared, gy, x, seed, S: int, per_sample: bool, bias: bool):
    """(g_means, g_chol, g_o_mu, g_o_rho, g_bias or None) of an SWS linear layer with ONE input row per sample,
    from gy [S, 1, out] and x [1, in] ([S, 1, in] per sample), in one call (csrc/cpu/layer.cpp): bit-identical
    to the GEMM + reconstruct backward path (the weight gradient is an outer product). ``bias``: also the bias
    gradient (S == 1 only; else None: the caller sums gy itself). Addresses are re-read (a backward runs after
    FSDP2 may have moved the parameters)."""
    out_f, in_f = p.shape
    gy, x = _rows_inputs(gy, x, out_f, in_f, S, per_sample)
    K, O = p.K, p.tensors[7].numel()
    g_means, g_chol = _empty32((K, 2)), _empty32((K, 3))
    g_mu, g_rho = _empty32((O,)), _empty32((O,))
    g_bias = _empty32((out_f,)) if bias and S == 1 else None
    _C.sws_linear_backward_rows_cpu(p.refresh(), out_f, in_f, gy.data_ptr(), x.data_ptr(), per_sample,
                                    *_seed_arg(seed), S, g_means.data_ptr(), g_chol.data_ptr(), g_mu.data_ptr(),
                                    g_rho.data_ptr(), 0 if g_bias is None else g_bias.data_ptr())
    return g_means, g_chol, g_mu, g_rho, g_bias


def mean_field_sample_cpu(pw: MFPrepared, pb: Optional[MFPrepared], seed, S: int, w_shape, b_shape,
                          checked: bool = False):
    """(weights in ``w_shape``, bias in ``b_shape`` or None) of one seed from the weight and bias bundles, in one
    call; shapes of S * n elements each (e.g. [out, in] and [out] for one sample: no [0] views per call).
    ``checked``: see :meth:`_Bundle.call`."""
    w = _empty32(w_shape)
    b = _empty32(b_shape) if pb is not None else None
    if w.numel() != S * pw.args.n or (b is not None and b.numel() != S * pb.args.n):
        raise ValueError(f"w_shape, b_shape: expected {S} x {pw.args.n} and {S} x "
                         f"{None if pb is None else pb.args.n} elements, got {tuple(w_shape)}, {tuple(b_shape)}")
    _C.mean_field_sample_cpu(pw.refresh(checked), None if pb is None else pb.refresh(checked), *_seed_arg(seed), S,
                             w.data_ptr(), 0 if b is None else b.data_ptr())
    return w, b


def mean_field_linear_backward_rows_cpu(pw: MFPrepared, pb: Optional[MFPrepared], gy, x, seed, S: int,
                                        per_sample: bool):
    """(g_mu, g_rho, g_bias_mu or None, g_bias_rho or None) of a mean-field linear layer with ONE input row per
    sample (sampled bias: ``pb``), in one call (csrc/cpu/layer.cpp); bit-identical to the GEMM + reconstruct
    backward path. Addresses are re-read."""
    out_f, in_f = pw.shape
    gy, x = _rows_inputs(gy, x, out_f, in_f, S, per_sample)
    g_mu, g_rho = _empty32(pw.shape), _empty32(pw.shape)
    g_bmu = g_brho = None
    if pb is not None:
        g_bmu, g_brho = _empty32(pb.shape), _empty32(pb.shape)
    _C.mean_field_linear_backward_rows_cpu(
        pw.refresh(), None if pb is None else pb.refresh(), out_f, in_f, gy.data_ptr(), x.data_ptr(), per_sample,
        *_seed_arg(seed), S, g_mu.data_ptr(), g_rho.data_ptr(), 0 if pb is None else g_bmu.data_ptr(),
        0 if pb is None else g_brho.data_ptr())
    return g_mu, g_rho, g_bmu, g_brho


def sws_linear_cpu_prepared(p: Prepared, x, bias, seed, S: int, per_sample: bool) -> torch.Tensor:
    """:func:`sws_linear_cpu` on a :class:`Prepared` bundle (of a 2-d labels tensor, paper or mean mode)."""
    out_f, in_f = p.shape
    x, M, b = _linear_x(x, bias, out_f, in_f, S, per_sample, torch.float32, p.device, cpu=True)
    if M > LINEAR_CPU_MAX_M:
        raise ValueError(f"sws_linear_cpu: at most {LINEAR_CPU_MAX_M} rows per sample, got {M}")
    y = _empty32((S, M, out_f))
    lin = _C.LinearArgs(out_f, in_f, x.data_ptr(), 0, M, bool(per_sample), 0 if b is None else b.data_ptr(),
                        b is not None and b.dim() == 2, y.data_ptr())
    with p.lock:  # per-call fields of a shared bundle: one launch at a time
        _C.sws_linear_cpu(p.call(seed, S), lin)
    return y


# ------------------------------------------------------------------------------------------------------
# issue 14: label-histogram SWS linear forward (CPU: csrc/cpu/histogram.cpp), inference in paper/mean mode,
# float32 x shared by all samples. Chosen by _backend.histogram_plan (LIMITS "cpu_histogram_*").
# ------------------------------------------------------------------------------------------------------

def sws_linear_histogram_cpu(x, means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, bias, seed,
                             samples, mode, owner, codebook_owner) -> torch.Tensor:
    """y float32 [S, M, out] = sum_k z[s, k] h[m, j, k] + outlier terms (+ bias): one pass over the labels for all
    S samples (x float32 [..., in], shared by the samples; no autograd)."""
    if not means.is_cpu:
        raise ValueError(f"sws_linear_histogram_cpu: expected CPU tensors, got {means.device}")
    if int(mode) not in (0, 2):
        raise ValueError(f"sws_linear_histogram_cpu: mode must be 0 (paper) or 2 (mean), got {mode}")
    if labels.dim() != 2:
        raise ValueError(f"labels: expected [out, in], got {tuple(labels.shape)}")
    p = prepare(means, chol, labels, e_pos, e_a, e_b, e_alpha, o_pos, o_mu, o_rho, mode, owner, codebook_owner)
    return sws_linear_histogram_cpu_prepared(p, x, bias, seed, int(samples))


def sws_linear_histogram_cpu_prepared(p: Prepared, x, bias, seed, S: int) -> torch.Tensor:
    """:func:`sws_linear_histogram_cpu` on a :class:`Prepared` bundle (2-d labels, paper or mean mode)."""
    out_f, in_f = p.shape
    x, M, b = _linear_x(x, bias, out_f, in_f, S, False, torch.float32, p.device, cpu=True)
    y = torch.empty((S, M, out_f), dtype=torch.float32)
    lin = _C.LinearArgs(out_f, in_f, x.data_ptr(), 0, M, False, 0 if b is None else b.data_ptr(),
                        b is not None and b.dim() == 2, y.data_ptr())
    with p.lock:  # per-call fields of a shared bundle: one launch at a time
        _C.sws_linear_histogram_cpu(p.call(seed, S), lin)
    return y
