"""Every Triton launch of the library goes through ``launch``; every output a launcher hands to a kernel
comes from ``empty``.

``launch``  - device guard: Triton launches on the *current* CUDA device and stream, so tensors on cuda:1
              with device 0 current would be an illegal address; the guard switches to the tensors' device
              (and refuses tensors on two devices) before the launch.
            - recording for ``benchmarks/triton_aot.py``: with ``SWS_TRITON_RECORD=<file>`` every launch
              whose specialisation class is new (kernel, argument types, the value classes Triton
              specialises ints on, constexprs, launch options) is appended to <file> as one JSON line. The
              AOT script runs the test suite that way and compiles each recorded specialisation for sm_80
              and sm_90, so the list of what to compile comes from the launches themselves.
``empty``   - torch.empty: no fill outside tests (a NaN fill doubles the bytes a write-bound kernel moves).
              Tests set ``POISON = True`` (tests/conftest.py) so outputs start as NaN / -1 and a position a
              kernel forgot to write cannot pass.

Tile sizes: under the interpreter launchers use small tiles (interpreter cost grows with programs x loop
iterations) unless ``SWS_TRITON_TILES=gpu``, which the AOT recording pass sets so the recorded
constexprs are the ones a GPU launch uses. ``GPU_TILES`` is that switch.
"""
from __future__ import annotations

import json
import os

import torch
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GPU_TILES = not INTERPRET or os.environ.get("SWS_TRITON_TILES") == "gpu"
# Inside kernels: interpreter-only workarounds (its bf16 tl.dot is wrong, its fp32 -> bf16 cast truncates)
# sit behind this constexpr, so they are dead code in a GPU compile and never part of a kernel signature.
INTERPRET_C = tl.constexpr(INTERPRET)

POISON = False
_RECORD = os.environ.get("SWS_TRITON_RECORD")
_seen: set = set()


def empty(shape, *, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, dtype=t.dtype, device=t.device)


def _int_class(v: int) -> str:
    # what Triton's specialisation looks at: == 1, divisibility by 16, and the i32/i64/u64 range
    rng = "i32" if -2**31 <= v < 2**31 else "i64" if -2**63 <= v < 2**63 else "u64"
    return f"{rng}{'=1' if v == 1 else ''}{'/16' if v % 16 == 0 else ''}"


def _describe(a):
    if isinstance(a, torch.Tensor):
        return {"t": "tensor", "dtype": str(a.dtype).removeprefix("torch."), "align16": a.data_ptr() % 16 == 0}
    if isinstance(a, bool):
        return {"t": "bool", "v": a}
    if isinstance(a, int):
        return {"t": "int", "v": a}
    if isinstance(a, float):
        return {"t": "float", "v": a}
    if a is None:
        return {"t": "none"}
    raise TypeError(f"launch: unsupported kernel argument type {type(a).__name__}")


def _class(d) -> str:
    if d["t"] == "int":
        return "int:" + _int_class(d["v"])
    if d["t"] == "tensor":
        return f"tensor:{d['dtype']}:{d['align16']}"
    if d["t"] == "bool":
        return f"bool:{d['v']}"
    return d["t"]


def _record(kernel, args, meta) -> None:
    fn = kernel.fn
    name = f"{fn.__module__}:{fn.__qualname__}"
    descr = [_describe(a) for a in args]
    key = (name, tuple(_class(d) for d in descr), tuple(sorted((k, repr(v)) for k, v in meta.items())))
    if key in _seen:
        return
    _seen.add(key)
    meta_json = {k: (v if isinstance(v, (bool, int, float, str)) or v is None else repr(v)) for k, v in meta.items()}
    with open(_RECORD, "a") as f:
        f.write(json.dumps({"kernel": name, "args": descr, "meta": meta_json}) + "\n")


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta) on the device of its tensor arguments."""
    dev = None
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            if dev is None:
                dev = a.device
            elif a.device != dev:
                raise ValueError(f"{kernel.fn.__name__}: argument {i}: expected a tensor on {dev} like the others, "
                                 f"got one on {a.device}")
    if _RECORD:
        _record(kernel, args, meta)
    if dev is not None and dev.type == "cuda" and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            return kernel[grid](*args, **meta)
    return kernel[grid](*args, **meta)
