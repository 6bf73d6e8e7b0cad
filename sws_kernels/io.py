"""Compact, safe model files: :func:`save`, :func:`load`, :func:`read_header`, :func:`size_report`.

Nothing is unpickled and no name from a file reaches ``getattr``/``setattr`` outside a fixed set, so loading
an untrusted file cannot run code or touch anything but the model's Bayesian modules and state_dict; a file
is either loaded exactly as it was saved or rejected with a ValueError that says what is wrong.

Format version 2 (``MAGIC = b"SWSKRNL2"``; little-endian)::

    offset 0       8 bytes   magic b"SWSKRNL2"
    offset 8       uint32    H, length of the JSON header (at most MAX_HEADER = 16 MiB)
    offset 12      uint64    D, length of the tensor data
    offset 20      H bytes   UTF-8 JSON header
    offset 20+H    D bytes   tensor data, the encoded tensors back to back in header order
    offset 20+H+D  uint32    CRC32 of every byte before it (magic, lengths, header and data)

The file size must be exactly 24 + H + D. The header is one JSON object with exactly the keys
``format`` ("sws_kernels"), ``version`` (2), ``torch`` (the writer's version, informative),
``tensors`` and ``modules``:

- ``tensors``: a list, in data order, of either ``{"key", "dtype", "shape", "offsets", "encoding"[, "bits"]
  [, "prior"]}`` or ``{"key", "alias"}`` (a tensor shared by several keys, e.g. a codebook used by several
  layers, is stored once; the alias names an earlier entry). ``offsets`` = [begin, end] in the data region:
  each entry begins where the previous one ended and the last ends at D. Encodings:

  * ``raw``: the tensor's elements, little-endian, ``numel * itemsize`` bytes.
  * ``bits``: non-negative integers (SWS labels and ellipse component ids) packed LSB-first, ``bits``
    bits each, ``ceil(numel * bits / 8)`` bytes, unused high bits of the last byte zero. ``bits`` =
    ``label_bits(K)`` = max(1, ceil(log2 K)) for the layer's codebook size K (9 bits for K = 300, 12 for
    K <= 4096), unpacked to ``label_dtype(K)`` (uint8 / int16 / int32).
  * ``delta`` / ``zdelta``: int64 positions (SWS ellipse and outlier positions) as LEB128 varints of the
    differences to the previous value (the first to 0); ``delta`` when the positions are non-decreasing
    (unsigned differences: 1 byte for gaps below 128, 2 below 16384), ``zdelta`` otherwise (zigzag-signed).
  * ``"prior": true`` marks a non-scalar mean-field prior (``<module path>.prior_weight_mu`` etc.; a
    non-persistent buffer, e.g. from bayesian-torch): it is restored on load, not part of the state_dict.

- ``modules``: ``{module path: {"class", "config"}}`` for every Codebook / SWS / mean-field module (exact
  classes of :mod:`sws_kernels.nn`; a shared codebook under its first path). ``config`` holds exactly the
  class's constructor hyper-parameters (``in_features``, ``kernel_size``, ``bias``, ``mode``, priors, ...),
  ``dnn_to_bnn_flag`` where the class has it, and for SWS layers ``codebook``, the path of their codebook.

What load checks, all before allocating anything larger than a small multiple of the file size: the
magic, lengths and CRC; the header schema (only known keys, known dtypes and encodings, byte sizes that
follow from dtype/shape/encoding, canonical offsets); module paths and tensor keys made only of
identifiers or indices, none starting with ``__``; every module's config values (types, ranges) and its
tensors (exactly the keys, dtypes and shapes the class has for that config: labels of the weight shape in
``label_dtype(K)``, ``E`` ellipse and ``O`` outlier entries alike, one floating dtype per module, the
codebook aliases of each SWS layer). Then the decoded values go through the modules' own entry checks
(labels in [0, K), positions unique and in [0, n), alpha in [0, 1], finite parameters, positive prior
standard deviations), the same as construction.

``load(path, model)`` puts the file's Bayesian modules into ``model``:

- a module of the same class and architecture at that path is loaded in place (its mode, priors and
  flags set from the file, its codebook sharing restored);
- a deterministic or Bayesian counterpart with the same architecture (``nn.Linear(6, 4)``, a
  ``MeanFieldLinear(6, 4)`` or ``SWSLinear(6, 4)`` where the file has an ``SWSLinear(6, 4)``; a conv of the
  same channels, kernel, stride, padding, dilation, groups, padding mode and bias) is replaced by the
  file's module: this is how a freshly built deterministic or mean-field architecture becomes the saved
  SWS model;
- a path the model lacks is created when its parent exists (and has no attribute of that name);
- anything else (another class or other sizes at that path) raises ValueError, unless ``rebuild=True``,
  which replaces whatever module is there.

The rest of the state_dict must then match the model's exactly (keys, dtypes, shapes; ``strict``).

Version-1 files (``b"SWSKRNL1"``, CRC over the tensor data only) still load, with a
:class:`FormatWarning`: their header is not covered by a checksum, so a corrupted header value that
still passes every schema check (a prior variance, a mode) can load unnoticed. Save again to upgrade.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import struct
import sys
import tempfile
import threading
import warnings
import zlib
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import _checks
from . import nn as _snn
from .distributed import plain_model as _plain_model
from .nn import Codebook, label_dtype

__all__ = ["save", "load", "read_header", "size_report", "label_bits", "FormatWarning"]

MAGIC = b"SWSKRNL2"
MAGIC_V1 = b"SWSKRNL1"
MAGICS = (MAGIC, MAGIC_V1)
VERSION = 2
MAX_HEADER = 16 << 20
_PRE = struct.Struct("<8sIQ")  # magic, header length, data length
_CRC = struct.Struct("<I")
_MAX_NDIM = 16
_MAX_KEY = 1024

_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_PART = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)\Z")

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("sws_kernels.io: expected a little-endian host")


class FormatWarning(UserWarning):
    """A file in an older format was loaded (with that format's weaker guarantees)."""


def label_bits(num_components: int) -> int:
    """Bits per label on disk: max(1, ceil(log2 K))."""
    return max(1, (int(num_components) - 1).bit_length())


# ------------------------------------------------------------------------------------------------------
# The module table: which classes io knows, their config and their tensors
# ------------------------------------------------------------------------------------------------------
# Driven by sws_kernels.nn's layer tuples: a class added to SWS_LAYERS / MEAN_FIELD_LAYERS is saved and
# loaded when its constructor's hyper-parameters are among _ARCH_KEYS / _STATE_KEYS (read back from the
# module's attributes of the same name) and its weight shape follows _weight_shape; anything else needs a
# rule here. Modules of other classes (or subclasses) are not Bayesian modules for io: their tensors are
# plain state_dict entries.

_ARCH_KEYS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding",
              "output_padding", "dilation", "groups", "padding_mode", "bias")
_STATE_KEYS = ("mode", "return_kl", "dnn_to_bnn_flag", "estimator", "prior_mean", "prior_variance",
               "posterior_mu_init", "posterior_rho_init")
# Settings added after files of this version were first written: a file without them gets the default.
_LATER_KEYS = ("estimator",)
_CODEBOOK_LEAVES = ("means", "chol", "means0", "chol0", "rng_id")
_PRIORS = ("prior_weight_mu", "prior_weight_sigma", "prior_bias_mu", "prior_bias_sigma")


def _classes() -> Dict[str, type]:
    table = {"Codebook": Codebook}
    for c in (*_snn.SWS_LAYERS, *_snn.MEAN_FIELD_LAYERS):
        table[c.__name__] = c
    return table


def _kind(cls) -> str:
    if cls is Codebook:
        return "codebook"
    return "sws" if cls in _snn.SWS_LAYERS else "mf"


def _config_keys(cls) -> Tuple[str, ...]:
    """The config keys a class records: its constructor's known hyper-parameters (+ flags, codebook)."""
    if cls is Codebook:
        return ("num_components",)
    params = inspect.signature(cls.__init__).parameters
    keys = [k for k in _ARCH_KEYS + _STATE_KEYS if k in params]
    if isinstance(getattr(cls, "dnn_to_bnn_flag", None), property) and "dnn_to_bnn_flag" not in keys:
        keys.append("dnn_to_bnn_flag")
    if _kind(cls) == "sws":
        keys.append("codebook")
    return tuple(keys)


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _module_config(m: nn.Module, codebook_paths: Dict[int, str]) -> dict:
    cls = type(m)
    if cls is Codebook:
        return {"num_components": m.num_components}
    params = inspect.signature(cls.__init__).parameters
    for name, p in params.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty and name not in _ARCH_KEYS + _STATE_KEYS + ("codebook",):
            raise TypeError(f"model: sws_kernels.save has no rule to record {cls.__name__}'s argument {name!r} "
                            "(add it to sws_kernels.io's _ARCH_KEYS/_STATE_KEYS)")
    cfg = {}
    for k in _config_keys(cls):
        if k == "codebook":
            cfg[k] = codebook_paths[id(m.codebook)]
        elif k == "bias":
            b = m.bias
            cfg[k] = b if isinstance(b, bool) else b is not None
        else:
            cfg[k] = _norm(getattr(m, k))
    return cfg


def _bayesian_modules(model: nn.Module):
    """(path, module) of every module of an io class; a shared codebook under its first path."""
    classes = set(_classes().values())
    out, seen = [], set()
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m) in classes:
            if id(m) in seen:
                if isinstance(m, Codebook):
                    continue
                raise ValueError(f"model: module {name!r} is also registered under another path; sws_kernels.save "
                                 "stores each Bayesian layer once")
            seen.add(id(m))
            out.append((name, m))
    return out


# -- config validation (load) --------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _cfg_error(where, key, expected, got):
    raise ValueError(f"{where}: config {key!r}: expected {expected}, got {got!r}")


def _check_config(where: str, cls, cfg, v1: bool) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a config object, got {cfg!r}")
    keys = _config_keys(cls)
    unknown = sorted(set(cfg) - set(keys))
    if unknown:
        raise ValueError(f"{where}: unknown config key(s) {unknown} for {cls.__name__} (expected {list(keys)})")
    missing = [k for k in keys if k not in cfg and k not in _LATER_KEYS]
    if v1:  # version 1 did not record flags added later: their defaults
        missing = [k for k in missing if k not in ("return_kl", "dnn_to_bnn_flag")]
    if missing:
        raise ValueError(f"{where}: missing config key(s) {missing} for {cls.__name__}")
    nd = None
    if "kernel_size" in cfg:
        nd = len(cfg["kernel_size"]) if isinstance(cfg["kernel_size"], list) else None
        spatial = getattr(cls, "_spatial", None)
        if nd is None or not 1 <= nd <= 3 or (spatial is not None and nd != spatial):
            _cfg_error(where, "kernel_size", f"a list of {spatial or '1-3'} ints", cfg["kernel_size"])
    for k, v in cfg.items():
        if k in ("in_features", "out_features", "in_channels", "out_channels", "groups", "num_components"):
            if not _is_int(v) or not 1 <= v < (1 << 31):
                _cfg_error(where, k, "an int in [1, 2**31)", v)
        elif k in ("kernel_size", "stride", "dilation", "output_padding", "padding"):
            if k == "padding" and v in ("same", "valid"):
                continue
            lo = 0 if k in ("output_padding", "padding") else 1
            if not (isinstance(v, list) and len(v) == nd and all(_is_int(t) and lo <= t < (1 << 31) for t in v)):
                _cfg_error(where, k, f"a list of {nd} ints >= {lo}", v)
        elif k == "padding_mode":
            if v not in ("zeros", "reflect", "replicate", "circular"):
                _cfg_error(where, k, "'zeros', 'reflect', 'replicate' or 'circular'", v)
        elif k in ("bias", "return_kl", "dnn_to_bnn_flag"):
            if not isinstance(v, bool):
                _cfg_error(where, k, "a bool", v)
        elif k == "estimator":
            if v not in ("reparameterization", "flipout"):
                _cfg_error(where, k, "'reparameterization' or 'flipout'", v)
        elif k == "mode":
            if v not in _checks.MODES:
                _cfg_error(where, k, f"one of {_checks.MODES}", v)
        elif k in ("prior_mean", "prior_variance", "posterior_mu_init", "posterior_rho_init"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _cfg_error(where, k, "a finite number", v)
            if k == "prior_variance" and v <= 0:
                _cfg_error(where, k, "a positive number (the prior standard deviation)", v)
        elif k == "codebook":
            if not isinstance(v, str):
                _cfg_error(where, k, "a module path", v)
    if "groups" in cfg:
        g = cfg["groups"]
        if cfg["in_channels"] % g or cfg["out_channels"] % g:
            _cfg_error(where, "groups", f"a divisor of in_channels={cfg['in_channels']} and "
                       f"out_channels={cfg['out_channels']}", g)
    return cfg


def _weight_shape(cfg) -> Tuple[int, ...]:
    if "in_features" in cfg:
        return (cfg["out_features"], cfg["in_features"])
    g, k = cfg["groups"], tuple(cfg["kernel_size"])
    if "output_padding" in cfg:  # transposed convolution: weight [in, out / groups, *k]
        return (cfg["in_channels"], cfg["out_channels"] // g, *k)
    return (cfg["out_channels"], cfg["in_channels"] // g, *k)


def _out_size(cfg) -> int:
    return cfg["out_features"] if "out_features" in cfg else cfg["out_channels"]


# ------------------------------------------------------------------------------------------------------
# Encodings
# ------------------------------------------------------------------------------------------------------
_CHUNK = 1 << 18  # values per step of the bit packer (a multiple of 8: each step ends on a byte boundary)


def _pack_bits(v: torch.Tensor, bits: int) -> bytes:
    v = v.reshape(-1).to(torch.int64)
    if bits == 8:
        return v.to(torch.uint8).numpy().tobytes()
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
    out = []
    for i in range(0, v.numel(), _CHUNK):
        bitmat = ((v[i:i + _CHUNK].unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
        pad = (-bitmat.numel()) % 8
        if pad:
            bitmat = torch.cat([bitmat, torch.zeros(pad, dtype=torch.uint8)])
        out.append((bitmat.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8).numpy().tobytes())
    return b"".join(out)


def _unpack_bits(raw: torch.Tensor, n: int, bits: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """raw: uint8 [ceil(n * bits / 8)] -> dtype [n]."""
    if bits == 8:
        return raw.clone().to(dtype)
    total = n * bits
    if total % 8 and int(raw[-1]) >> (total % 8):
        raise ValueError(f"{what}: nonzero padding bits after the last packed value")
    out = torch.empty(n, dtype=dtype)
    shifts8 = torch.arange(8, dtype=torch.int32)
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int64)
    step = _CHUNK  # values; _CHUNK * bits is a multiple of 8 bits
    for i in range(0, n, step):
        m = min(step, n - i)
        b0, b1 = i * bits // 8, (i * bits + m * bits + 7) // 8
        bitv = ((raw[b0:b1].to(torch.int32).unsqueeze(1) >> shifts8) & 1).reshape(-1)[: m * bits]
        out[i:i + m] = (bitv.view(m, bits).to(torch.int64) * weights).sum(1).to(dtype)
    return out


def _varint_encode(pos: torch.Tensor) -> Tuple[str, bytes]:
    p = pos.reshape(-1).to(torch.int64)
    if p.numel() == 0:
        return "delta", b""
    d = torch.diff(p, prepend=torch.zeros(1, dtype=torch.int64))
    if bool((d >= 0).all()):
        enc, u = "delta", d
    else:
        enc, u = "zdelta", (d << 1) ^ (d >> 63)  # zigzag (two's complement wrap is intended)
    nb = torch.ones_like(u)
    for k in range(1, 9):
        nb += (u >= (1 << (7 * k))).to(torch.int64)
    nb = torch.where(u < 0, torch.full_like(u, 10), nb)  # top bit set: 10 bytes
    k = torch.arange(10, dtype=torch.int64)
    groups = (u.unsqueeze(1) >> (7 * k)) & torch.tensor([0x7F] * 9 + [0x01], dtype=torch.int64)
    groups |= (k < nb.unsqueeze(1) - 1).to(torch.int64) << 7
    return enc, groups[k < nb.unsqueeze(1)].to(torch.uint8).numpy().tobytes()


def _varint_decode(raw: torch.Tensor, n: int, zigzag: bool, what: str) -> torch.Tensor:
    if n == 0:
        if raw.numel():
            raise ValueError(f"{what}: {raw.numel()} bytes of varints for 0 values")
        return torch.zeros(0, dtype=torch.int64)
    b = raw.to(torch.int64)
    term = (b & 0x80) == 0
    if not bool(term[-1]) or int(term.sum()) != n:
        raise ValueError(f"{what}: the varint data does not hold exactly {n} values")
    gid = torch.cumsum(term.to(torch.int64), 0) - term.to(torch.int64)
    ends = torch.nonzero(term).squeeze(1)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1] + 1])
    j = torch.arange(b.numel(), dtype=torch.int64) - starts[gid]
    if int(j.max()) >= 10 or bool(((j == 9) & ((b & 0x7F) > 1)).any()):
        raise ValueError(f"{what}: a varint longer than 64 bits")
    u = torch.zeros(n, dtype=torch.int64).index_add_(0, gid, (b & 0x7F) << (7 * j))
    if zigzag:
        u = ((u >> 1) & 0x7FFFFFFFFFFFFFFF) ^ -(u & 1)
    return torch.cumsum(u, 0)


# ------------------------------------------------------------------------------------------------------
# save
# ------------------------------------------------------------------------------------------------------

def _check_key(key: str, what: str = "model: state_dict key") -> None:
    if not isinstance(key, str) or len(key) > _MAX_KEY or not all(
            _PART.match(p) and not p.startswith("__") for p in key.split(".")):
        raise ValueError(f"{what} {key!r}: sws_kernels files hold only dotted paths of identifiers or indices, "
                         "none starting with '__'")


def _serialize(model: nn.Module):
    """(header bytes, [(key, part, encoded bytes)]) of ``model``: everything save writes but the framing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
    model = _plain_model(model)  # DDP/compile wrappers, FSDP2 (a gather): the plain model's keys (issue 18)
    sd = model.state_dict()
    mods = _bayesian_modules(model)
    cb_paths = {id(m): n for n, m in mods if isinstance(m, Codebook)}
    modules, role = OrderedDict(), {}  # role: key -> (part, encoding hint)
    priors = []
    for name, m in mods:
        if name:
            _check_key(name, "model: module path")
        modules[name] = {"class": type(m).__name__, "config": _module_config(m, cb_paths)}
        pre = f"{name}." if name else ""
        kind = _kind(type(m))
        if kind == "codebook":
            for leaf in _CODEBOOK_LEAVES:
                role[pre + leaf] = ("codebook", None)
        elif kind == "sws":
            bits = label_bits(m.codebook.num_components)
            for leaf, part, enc in (("labels", "labels", bits), ("ellipse_pos", "ellipses", "pos"),
                                    ("ellipse_a", "ellipses", bits), ("ellipse_b", "ellipses", bits),
                                    ("ellipse_alpha", "ellipses", None), ("outlier_pos", "outliers", "pos"),
                                    ("outlier_mu", "outliers", None), ("outlier_rho", "outliers", None),
                                    ("outlier_mu0", "outliers", None), ("outlier_sigma0", "outliers", None),
                                    ("bias", "biases", None), ("rng_id", "other", None)):
                role[pre + leaf] = (part, enc)
        else:
            for leaf in (type(m)._w_mu, type(m)._w_rho):
                role[pre + leaf] = ("mean_field", None)
            for leaf in ("mu_bias", "rho_bias"):
                role[pre + leaf] = ("biases", None)
            for b in _PRIORS:
                t = getattr(m, b)
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    priors.append((pre + b, t))
    entries, chunks, seen = [], [], {}
    offset = 0
    items = [(k, t, False) for k, t in sd.items()] + [(k, t, True) for k, t in priors]
    for key, t, is_prior in items:
        _check_key(key)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model: state_dict entry {key!r} is a {type(t).__name__}, expected a tensor")
        if t.dtype not in _NAMES:
            raise TypeError(f"model: state_dict entry {key!r} has unsupported dtype {t.dtype}")
        if t.dim() > _MAX_NDIM:
            raise ValueError(f"model: state_dict entry {key!r} has {t.dim()} dimensions (at most {_MAX_NDIM})")
        part, enc = role.get(key, ("mean_field" if is_prior else "other", None))
        if key not in role and ".codebook." in f".{key}":
            part = "codebook"
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device) if t.numel() else None
        if ident is not None and ident in seen and not is_prior:
            entries.append({"key": key, "alias": seen[ident]})
            continue
        data = t.detach().to("cpu").contiguous().reshape(-1)
        e = {"key": key, "dtype": _NAMES[t.dtype], "shape": list(t.shape)}
        if isinstance(enc, int):
            raw = _pack_bits(data, enc)
            e.update(encoding="bits", bits=enc)
        elif enc == "pos":
            e["encoding"], raw = _varint_encode(data)
        else:
            raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
            e["encoding"] = "raw"
        e["offsets"] = [offset, offset + len(raw)]
        if is_prior:
            e["prior"] = True
        entries.append(e)
        offset += len(raw)
        chunks.append((key, part, raw))
        if ident is not None and not is_prior:
            seen[ident] = key
    header = {"format": "sws_kernels", "version": VERSION, "torch": torch.__version__, "tensors": entries,
              "modules": modules}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if len(hb) > MAX_HEADER:
        raise ValueError(f"model: its file header would take {len(hb)} bytes, more than {MAX_HEADER}")
    return hb, chunks


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # no /proc: read it the only portable way (briefly set, then restored)
        u = os.umask(0o22)
        os.umask(u)
    return u


def save(model: nn.Module, path) -> int:
    """Write ``model``'s state_dict and its Bayesian modules' configuration to ``path`` (format version 2,
    see the module docstring). Returns the bytes written.

    Atomic and durable: the file is written to a unique temporary file in the same directory, flushed and
    fsync'ed, renamed over ``path`` and the directory fsync'ed; the temporary is removed on any error, so
    ``path`` always holds either the previous file or the complete new one, also when threads or processes
    save to the same path at once (the last rename wins). An existing file keeps its permission bits; a new
    one gets 0666 minus the umask, as ``open`` would give. A symbolic link at ``path`` is followed.
    """
    hb, chunks = _serialize(model)
    target = os.path.realpath(os.fspath(path))
    directory = os.path.dirname(target) or "."
    try:
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    data_len = sum(len(raw) for _, _, raw in chunks)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            pre = _PRE.pack(MAGIC, len(hb), data_len)
            crc = zlib.crc32(hb, zlib.crc32(pre))
            f.write(pre)
            f.write(hb)
            for _, _, raw in chunks:
                f.write(raw)
                crc = zlib.crc32(raw, crc)
            f.write(_CRC.pack(crc))
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory handles
        dfd = None
    if dfd is not None:
        try:
            os.fsync(dfd)
        except OSError:  # pragma: no cover - some file systems refuse fsync on a directory
            pass
        finally:
            os.close(dfd)
    return _PRE.size + len(hb) + data_len + _CRC.size


# ------------------------------------------------------------------------------------------------------
# Reading and checking a file (nothing large is allocated before every size is checked)
# ------------------------------------------------------------------------------------------------------

class _Entry:
    __slots__ = ("key", "dtype", "shape", "numel", "encoding", "bits", "begin", "end", "alias", "prior")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


def _bad(name, msg):
    return ValueError(f"path: {name!r}: {msg}")


def _read(path):
    """(header, version, data buffer, data offset) after the framing and checksum checks."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_PRE.size)
            if len(head) >= 8 and head[:8] == MAGIC_V1:
                f.seek(0)
                return _read_v1(name, f, size)
            if len(head) < 8 or head[:8] != MAGIC:
                raise ValueError(f"path: {name!r} is not an sws_kernels file (expected magic {MAGIC!r}, got "
                                 f"{head[:8]!r})")
            if len(head) < _PRE.size:
                raise _bad(name, f"truncated ({size} bytes, shorter than the {_PRE.size}-byte preamble)")
            _, hlen, dlen = _PRE.unpack(head)
            if hlen > MAX_HEADER:
                raise _bad(name, f"corrupted: header length {hlen} exceeds the limit {MAX_HEADER}")
            want = _PRE.size + hlen + dlen + _CRC.size
            if want != size:
                raise _bad(name, f"truncated or corrupted: header length {hlen} and data length {dlen} make "
                           f"{want} bytes, the file has {size}")
            blob = bytearray(size)
            view = memoryview(blob)
            view[:_PRE.size] = head
            got = _PRE.size + f.readinto(view[_PRE.size:])
            if got != size:
                raise _bad(name, f"truncated while reading ({got} of {size} bytes)")
    except OSError as e:
        raise ValueError(f"path: cannot read {name!r}: {e}") from None
    (crc,) = _CRC.unpack_from(blob, size - _CRC.size)
    actual = zlib.crc32(view[:size - _CRC.size])
    if crc != actual:
        raise _bad(name, f"corrupted: checksum {actual:#010x} of the file's content, the file says {crc:#010x}")
    header = _json(name, bytes(view[_PRE.size:_PRE.size + hlen]))
    return header, 2, blob, _PRE.size + hlen, dlen


def _read_v1(name, f, size):
    if size < 16:
        raise _bad(name, f"truncated ({size} bytes)")
    blob = bytearray(size)
    if f.readinto(blob) != size:
        raise _bad(name, "truncated while reading")
    (hlen,) = struct.unpack_from("<Q", blob, 8)
    if hlen > MAX_HEADER or 16 + hlen > size:
        raise _bad(name, f"truncated or corrupted (header length {hlen}, file size {size})")
    header = _json(name, bytes(blob[16:16 + hlen]))
    if not isinstance(header, dict) or header.get("format") != "sws_kernels" or header.get("version") != 1:
        raise _bad(name, "header is not an sws_kernels version-1 header")
    dlen = size - 16 - hlen
    if header.get("data_size") != dlen or header.get("data_crc32") != zlib.crc32(memoryview(blob)[16 + hlen:]):
        raise _bad(name, f"corrupted: tensor data has {dlen} bytes / checksum "
                   f"{zlib.crc32(memoryview(blob)[16 + hlen:])}, header says {header.get('data_size')!r} / "
                   f"{header.get('data_crc32')!r}")
    return header, 1, blob, 16 + hlen, dlen


def _reject_constant(c):
    raise ValueError(f"the JSON constant {c} is not allowed")


def _json(name, hb: bytes):
    try:
        header = json.loads(hb.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(name, f"corrupted header ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise _bad(name, "corrupted header (not a JSON object)")
    return header


def _entries(name, header, version, dlen) -> List[_Entry]:
    """The tensor table, every size and offset checked (metadata only, nothing allocated)."""
    if version == 2:
        keys = {"format", "version", "torch", "tensors", "modules"}
        if set(header) != keys:
            raise _bad(name, f"header keys {sorted(header)}, expected {sorted(keys)}")
        if header["format"] != "sws_kernels" or header["version"] != 2 or not isinstance(header["torch"], str):
            raise _bad(name, "header is not an sws_kernels version-2 header")
        raw_list = header["tensors"]
        if not isinstance(raw_list, list):
            raise _bad(name, "header 'tensors': expected a list")
    else:
        extra = set(header) - {"format", "version", "torch", "tensors", "modules", "data_size", "data_crc32"}
        if extra:
            raise _bad(name, f"unknown header key(s) {sorted(extra)}")
        if not isinstance(header.get("tensors"), dict):
            raise _bad(name, "header 'tensors': expected an object")
        raw_list = []
        for k, e in header["tensors"].items():
            if not isinstance(e, dict):
                raise _bad(name, f"tensor {k!r}: expected an object")
            e = dict(e, key=k)
            if k.startswith("__prior__."):
                e["key"], e["prior"] = k[len("__prior__."):], True
            if "alias" not in e:
                e.setdefault("encoding", "raw")
            raw_list.append(e)
    out, seen, pos = [], {}, 0
    for e in raw_list:
        if not isinstance(e, dict) or not isinstance(e.get("key"), str):
            raise _bad(name, f"tensor table entry {str(e)[:100]!r}: expected an object with a 'key'")
        key = e["key"]
        try:
            _check_key(key, "tensor key")
        except ValueError as err:
            raise _bad(name, str(err)) from None
        if key in seen:
            raise _bad(name, f"tensor {key!r} listed twice")
        if "alias" in e:
            if set(e) != {"key", "alias"}:
                raise _bad(name, f"tensor {key!r}: alias entries hold only 'key' and 'alias', got {sorted(e)}")
            tgt = seen.get(e["alias"]) if isinstance(e["alias"], str) else None
            if tgt is None or tgt.alias is not None or tgt.prior:
                raise _bad(name, f"tensor {key!r} aliases {e['alias']!r}, not an earlier stored tensor")
            ent = _Entry(key=key, alias=tgt.key, dtype=tgt.dtype, shape=tgt.shape, numel=tgt.numel)
            seen[key] = ent
            out.append(ent)
            continue
        allowed = {"key", "dtype", "shape", "offsets", "encoding", "bits", "prior"}
        if set(e) - allowed or not {"dtype", "shape", "offsets", "encoding"} <= set(e):
            raise _bad(name, f"tensor {key!r}: entry keys {sorted(e)}, expected dtype, shape, offsets, encoding "
                       "(and bits / prior)")
        dt = _DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dt is None:
            raise _bad(name, f"tensor {key!r} has unknown dtype {e['dtype']!r}")
        shape = e["shape"]
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_int(s) and 0 <= s < (1 << 48)
                                                                            for s in shape):
            raise _bad(name, f"tensor {key!r} has an invalid shape {str(shape)[:100]}")
        n = math.prod(shape)
        off = e["offsets"]
        if not (isinstance(off, list) and len(off) == 2 and all(_is_int(v) for v in off)):
            raise _bad(name, f"tensor {key!r} has invalid offsets {str(off)[:100]}")
        b, end = off
        enc, bits = e["encoding"], e.get("bits")
        if e.get("prior", False) is not True and "prior" in e:
            raise _bad(name, f"tensor {key!r}: 'prior' must be true when present")
        if enc == "raw":
            want = n * dt.itemsize
            ok = bits is None and want == end - b
        elif enc == "bits" and version == 2:
            ok = (_is_int(bits) and 1 <= bits <= 31 and dt in (torch.uint8, torch.int16, torch.int32)
                  and bits <= 8 * dt.itemsize - (dt != torch.uint8) and (n * bits + 7) // 8 == end - b)
            want = (n * bits + 7) // 8 if _is_int(bits) else "?"
        elif enc in ("delta", "zdelta") and version == 2:
            ok = bits is None and dt == torch.int64 and len(shape) == 1 and n <= end - b <= 10 * n
            want = f"{n} to {10 * n}"
        else:
            raise _bad(name, f"tensor {key!r} has unknown encoding {enc!r}")
        if not ok:
            raise _bad(name, f"tensor {key!r}: offsets {off} ({end - b} bytes) inconsistent with dtype "
                       f"{e['dtype']}, shape {shape} and encoding {enc!r} ({want} bytes)")
        if b != pos or end > dlen:
            raise _bad(name, f"tensor {key!r}: offsets {off} out of order (expected to begin at {pos}, "
                       f"data size {dlen})")
        pos = end
        ent = _Entry(key=key, dtype=dt, shape=tuple(shape), numel=n, encoding=enc, bits=bits, begin=b, end=end,
                     prior=bool(e.get("prior", False)))
        seen[key] = ent
        out.append(ent)
    if pos != dlen:
        raise _bad(name, f"the tensor table covers {pos} bytes of the {dlen}-byte data region")
    return out


def _modules_table(name, header, version):
    mods = header.get("modules", {})
    if not isinstance(mods, dict):
        raise _bad(name, "header 'modules': expected an object")
    classes = _classes()
    out = OrderedDict()
    for path, spec in mods.items():
        if path:
            try:
                _check_key(path, "module path")
            except ValueError as err:
                raise _bad(name, str(err)) from None
        if not isinstance(spec, dict) or set(spec) != {"class", "config"}:
            raise _bad(name, f"module {path!r}: expected {{'class', 'config'}}, got {str(spec)[:100]}")
        cls = classes.get(spec["class"]) if isinstance(spec["class"], str) else None
        if cls is None:
            raise _bad(name, f"module {path!r} has unknown class {str(spec['class'])[:100]!r} "
                       f"(known: {sorted(classes)})")
        cfg = _check_config(f"path: {name!r}: module {path!r}", cls, spec["config"], version == 1)
        out[path] = (cls, dict(cfg))
    for path, (cls, cfg) in out.items():
        if _kind(cls) == "sws":
            cb = out.get(cfg["codebook"])
            if cb is None or cb[0] is not Codebook:
                raise _bad(name, f"module {path!r}: config 'codebook' {cfg['codebook']!r} is not a codebook of the file")
        parent = path.rpartition(".")[0]
        if path and parent in out:
            pcls, pcfg = out[parent]
            if not (cls is Codebook and _kind(pcls) == "sws" and path == (f"{parent}.codebook" if parent else "codebook")
                    and pcfg["codebook"] == path):
                raise _bad(name, f"module {path!r} is nested in the file's module {parent!r}, which has no such child")
    return out


def _owner(path_set, key):
    """The longest module path of the table that is a prefix of key (None: no module)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        p = ".".join(parts[:i])
        if p in path_set:
            return p
    return None


def _check_schema(name, table, entries: List[_Entry], version: int) -> None:
    """Every module's tensors: exactly the keys, dtypes, shapes and encodings its class has for its config."""
    by_key = {e.key: e for e in entries}
    owned: Dict[str, Dict[str, _Entry]] = {p: {} for p in table}
    for e in entries:
        p = _owner(table, e.key)
        if p is not None:
            owned[p][e.key[len(p) + 1:] if p else e.key] = e
        elif e.prior:
            raise _bad(name, f"prior {e.key!r} does not belong to a mean-field module of the file")

    def need(p, leaves: Dict[str, _Entry], leaf, shape, dtypes, what, encoding=None, bits=None):
        e = leaves.get(leaf)
        full = f"{p}.{leaf}" if p else leaf
        if e is None or e.prior:
            raise _bad(name, f"module {p!r} ({what}): missing tensor {full!r}")
        if e.dtype not in dtypes:
            raise _bad(name, f"tensor {full!r}: expected dtype {' or '.join(_NAMES[d] for d in dtypes)}, got "
                       f"{_NAMES[e.dtype]}")
        if shape is not None and tuple(e.shape) != tuple(shape):
            raise _bad(name, f"tensor {full!r}: expected shape {list(shape)} ({what}), got {list(e.shape)}")
        if version == 2 and encoding is not None and e.alias is None:
            ok = e.encoding == encoding if encoding != "delta" else e.encoding in ("delta", "zdelta")
            if not ok or (bits is not None and e.bits != bits):
                raise _bad(name, f"tensor {full!r}: expected encoding {encoding!r}"
                           + (f" with {bits} bits" if bits else "") + f", got {e.encoding!r}"
                           + (f" with {e.bits} bits" if e.bits else ""))
        elif version == 2 and encoding is None and e.alias is None and e.encoding != "raw":
            raise _bad(name, f"tensor {full!r}: expected encoding 'raw', got {e.encoding!r}")
        return e

    def one_float(p, es):
        dts = {e.dtype for e in es if e is not None}
        if len(dts) > 1:
            raise _bad(name, f"module {p!r}: its floating tensors mix dtypes {sorted(_NAMES[d] for d in dts)}")

    i64 = (torch.int64,)
    for p, (cls, cfg) in table.items():
        leaves = owned[p]
        kind = _kind(cls)
        allowed = set()
        if kind == "codebook":
            K = cfg["num_components"]
            es = [need(p, leaves, "means", (K, 2), _FLOATS, f"{K} components"),
                  need(p, leaves, "chol", (K, 3), _FLOATS, f"{K} components"),
                  need(p, leaves, "means0", (K, 2), _FLOATS, f"{K} components"),
                  need(p, leaves, "chol0", (K, 3), _FLOATS, f"{K} components")]
            need(p, leaves, "rng_id", (), i64, "a 0-dim id")
            one_float(p, es)
            allowed = set(_CODEBOOK_LEAVES)
        elif kind == "sws":
            K = table[cfg["codebook"]][1]["num_components"]
            ldt, bits = (label_dtype(K),), label_bits(K)
            ws = _weight_shape(cfg)
            need(p, leaves, "labels", ws, ldt, f"the weight shape, labels for K = {K}", "bits", bits)
            ep = need(p, leaves, "ellipse_pos", None, i64, "ellipse positions", "delta")
            if len(ep.shape) != 1:
                raise _bad(name, f"tensor {p}.ellipse_pos: expected one dimension, got shape {list(ep.shape)}")
            E = ep.shape[0]
            es = [need(p, leaves, "ellipse_alpha", (E,), _FLOATS, f"{E} ellipse entries")]
            need(p, leaves, "ellipse_a", (E,), ldt, f"{E} ellipse entries", "bits", bits)
            need(p, leaves, "ellipse_b", (E,), ldt, f"{E} ellipse entries", "bits", bits)
            op = need(p, leaves, "outlier_pos", None, i64, "outlier positions", "delta")
            if len(op.shape) != 1:
                raise _bad(name, f"tensor {p}.outlier_pos: expected one dimension, got shape {list(op.shape)}")
            O = op.shape[0]
            for leaf in ("outlier_mu", "outlier_rho", "outlier_mu0", "outlier_sigma0"):
                es.append(need(p, leaves, leaf, (O,), _FLOATS, f"{O} outlier entries"))
            if cfg["bias"]:
                es.append(need(p, leaves, "bias", (_out_size(cfg),), _FLOATS, "one per output"))
            need(p, leaves, "rng_id", (), i64, "a 0-dim id")
            one_float(p, es)
            allowed = {"labels", "ellipse_pos", "ellipse_a", "ellipse_b", "ellipse_alpha", "outlier_pos",
                       "outlier_mu", "outlier_rho", "outlier_mu0", "outlier_sigma0", "rng_id"} | (
                {"bias"} if cfg["bias"] else set())
            cbp = cfg["codebook"]
            for leaf in _CODEBOOK_LEAVES:  # this layer's codebook keys: the codebook's own or aliases of them
                mine, theirs = f"{p}.codebook.{leaf}" if p else f"codebook.{leaf}", f"{cbp}.{leaf}"
                e = by_key.get(mine)
                if e is None or (mine != theirs and e.alias != theirs):
                    raise _bad(name, f"tensor {mine!r}: expected an alias of {theirs!r} (the layer's codebook "
                               f"{cbp!r})")
                allowed.add(f"codebook.{leaf}")
        else:
            ws = _weight_shape(cfg)
            es = [need(p, leaves, cls._w_mu, ws, _FLOATS, "the weight shape"),
                  need(p, leaves, cls._w_rho, ws, _FLOATS, "the weight shape")]
            if cfg["bias"]:
                es += [need(p, leaves, "mu_bias", (_out_size(cfg),), _FLOATS, "one per output"),
                       need(p, leaves, "rho_bias", (_out_size(cfg),), _FLOATS, "one per output")]
            need(p, leaves, "rng_id", (), i64, "a 0-dim id")
            one_float(p, es)
            allowed = {cls._w_mu, cls._w_rho, "rng_id"} | ({"mu_bias", "rho_bias"} if cfg["bias"] else set())
            for leaf, e in leaves.items():
                if not e.prior:
                    continue
                if leaf not in _PRIORS or (not cfg["bias"] and "bias" in leaf):
                    raise _bad(name, f"prior {e.key!r}: not a prior of module {p!r}")
                target = ws if "weight" in leaf else (_out_size(cfg),)
                if e.dtype not in _FLOATS or len(e.shape) > len(target) or any(
                        a not in (1, b) for a, b in zip(reversed(e.shape), reversed(target))):
                    raise _bad(name, f"prior {e.key!r}: expected a floating tensor broadcastable to {list(target)}, "
                               f"got {_NAMES[e.dtype]} of shape {list(e.shape)}")
                allowed.add(leaf)
        for leaf, e in leaves.items():
            if leaf not in allowed:
                raise _bad(name, f"tensor {e.key!r}: module {p!r} ({cls.__name__}) has no such tensor")


def _decode(name, entries: List[_Entry], blob, base: int, map_location):
    """The tensors (state entries and priors), every size already checked: at most a few bytes per file byte."""
    state, priors, store = OrderedDict(), OrderedDict(), {}
    for e in entries:
        if e.alias is not None:
            t = store[e.alias]
        else:
            n = e.end - e.begin
            raw = (torch.frombuffer(blob, dtype=torch.uint8, count=n, offset=base + e.begin) if n
                   else torch.zeros(0, dtype=torch.uint8))
            what = f"path: {name!r}: tensor {e.key!r}"
            if e.encoding == "raw":
                t = raw.clone().view(e.dtype).reshape(e.shape)
            elif e.encoding == "bits":
                t = _unpack_bits(raw, e.numel, e.bits, e.dtype, what).reshape(e.shape)
            else:
                t = _varint_decode(raw, e.numel, e.encoding == "zdelta", what)
            if map_location is not None:
                t = t.to(map_location)
            store[e.key] = t
        (priors if e.prior else state)[e.key] = t
    return state, priors


def read_header(path) -> dict:
    """The JSON header of a file (tensor table, module table), after the integrity and schema checks."""
    header, version, blob, base, dlen = _read(path)
    name = os.fspath(path)
    entries = _entries(name, header, version, dlen)
    _check_schema(name, _modules_table(name, header, version), entries, version)
    return header


# ------------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------------

def _resolve(model: nn.Module, path: str):
    """The submodule at ``path`` through registered submodules only (never getattr), or None."""
    m = model
    for part in path.split(".") if path else []:
        m = m._modules.get(part) if isinstance(m, nn.Module) else None
        if m is None:
            return None
    return m


def _arch_of(m) -> Optional[dict]:
    """The architecture keys of a Linear/Conv-like module (ours or torch's), None for anything else."""
    if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, *_snn.SWS_LAYERS, *_snn.MEAN_FIELD_LAYERS)):
        return None
    ours = type(m) in _classes().values()
    out = {}
    for k in _ARCH_KEYS:
        if k == "bias":
            b = getattr(m, "bias", None)
            out[k] = b if isinstance(b, bool) else b is not None
        elif k == "output_padding":  # torch's convs all have it; it is architecture only when transposed
            if getattr(m, "transposed", False) is True or (ours and k in _config_keys(type(m))):
                out[k] = _norm(getattr(m, k))
        elif hasattr(m, k):
            out[k] = _norm(getattr(m, k))
    return out


def _same_arch(m, cfg) -> bool:
    a = _arch_of(m)
    want = {k: v for k, v in cfg.items() if k in _ARCH_KEYS}
    if a is None or ("output_padding" in a) != ("output_padding" in want):  # transposed or not
        return False
    extra = {k: v for k, v in a.items() if k not in want}  # e.g. torch's ConvTranspose has padding_mode "zeros"
    return all(a.get(k) == v for k, v in want.items()) and all(
        k == "padding_mode" and v == "zeros" for k, v in extra.items())


def _describe_module(m) -> str:
    a = _arch_of(m)
    if a is None:
        return type(m).__name__
    return f"{type(m).__name__}({', '.join(f'{k}={v}' for k, v in a.items())})"


def _plan(name, model, table, rebuild: bool):
    """Per table path: ("keep", module) or ("new", existing module or None). Raises before any change."""
    plan = OrderedDict()
    for p, (cls, cfg) in table.items():
        cur = _resolve(model, p)
        if cur is not None and type(cur) is cls and (cls is Codebook or _same_arch(cur, cfg)):
            plan[p] = ("keep", cur)
            continue
        if p == "":
            raise ValueError(f"model: the file {name!r} holds a bare {cls.__name__}; pass one of the same "
                             f"architecture as model (got {_describe_module(model)})")
        parent_path, _, leaf = p.rpartition(".")
        if cur is None:
            if parent_path in table:
                pass  # a codebook inside a layer the file puts in place (checked by _modules_table)
            else:
                parent = _resolve(model, parent_path)
                if parent is None:
                    raise ValueError(f"model: the file {name!r} has a {cls.__name__} at {p!r}, but the model has no "
                                     f"module {parent_path!r} to hold it")
                if hasattr(parent, leaf):
                    raise ValueError(f"model: the file {name!r} has a {cls.__name__} at {p!r}, but {parent_path or 'the model'!r} "
                                     f"already has an attribute {leaf!r} that is not a submodule")
            plan[p] = ("new", None)
        elif rebuild or (cls is not Codebook and _same_arch(cur, cfg)):
            plan[p] = ("new", cur)
        else:
            arch = {k: v for k, v in cfg.items() if k in _ARCH_KEYS}
            raise ValueError(f"model: module {p!r} is {_describe_module(cur)}, the file {name!r} has "
                             f"{cls.__name__}({', '.join(f'{k}={v}' for k, v in arch.items())}); pass rebuild=True "
                             "to replace it with the file's")
    return plan


def _sub(state, p, leaf):
    return state[f"{p}.{leaf}" if p else leaf]


def _check_data(name, table, state, priors):
    """The modules' own entry checks on the decoded values (as construction runs them)."""
    for p, (cls, cfg) in table.items():
        kind = _kind(cls)
        try:
            if kind == "codebook":
                _checks.codebook(_sub(state, p, "means"), _sub(state, p, "chol"), full=True)
                _checks.codebook(_sub(state, p, "means0"), _sub(state, p, "chol0"), full=True)
            elif kind == "sws":
                cbp = cfg["codebook"]
                ell = tuple(_sub(state, p, k) for k in ("ellipse_pos", "ellipse_a", "ellipse_b", "ellipse_alpha"))
                outl = tuple(_sub(state, p, k) for k in ("outlier_pos", "outlier_mu", "outlier_rho"))
                means, chol = _sub(state, cbp, "means"), _sub(state, cbp, "chol")
                _checks.sws(means, chol, _sub(state, p, "labels"), ell if ell[0].numel() else None,
                            outl if outl[0].numel() else None, 0, 1, cfg["mode"], 0, 0, full=True)
                _checks.finite(_sub(state, p, "outlier_mu0"), "outlier_mu0")
                s0 = _sub(state, p, "outlier_sigma0")
                _checks.finite(s0, "outlier_sigma0")
                if s0.numel() and float(s0.min()) <= 0:
                    raise ValueError(f"outlier_sigma0: expected positive values, got min {float(s0.min())}")
                if cfg["bias"]:
                    _checks.finite(_sub(state, p, "bias"), "bias")
            else:
                _checks.mean_field(_sub(state, p, cls._w_mu), _sub(state, p, cls._w_rho), 0, 1, 0, full=True)
                if cfg["bias"]:
                    _checks.mean_field(_sub(state, p, "mu_bias"), _sub(state, p, "rho_bias"), 0, 1, 0, full=True)
                for b in _PRIORS:
                    t = priors.get(f"{p}.{b}" if p else b)
                    if t is not None:
                        _checks.finite(t, b)
                        if b.endswith("sigma") and t.numel() and float(t.min()) <= 0:
                            raise ValueError(f"{b}: expected positive standard deviations, got min {float(t.min())}")
            _checks.word(int(_sub(state, p, "rng_id")), "rng_id")
        except (ValueError, TypeError) as e:
            raise ValueError(f"path: {name!r} holds an invalid value in module {p!r}: {e}") from None


def _build(p, cls, cfg, state, codebooks):
    kind = _kind(cls)
    rng_id = int(_sub(state, p, "rng_id"))
    params = inspect.signature(cls.__init__).parameters
    if kind == "codebook":
        return Codebook(cfg["num_components"], means=_sub(state, p, "means"), chol=_sub(state, p, "chol"),
                        means0=_sub(state, p, "means0"), chol0=_sub(state, p, "chol0"), rng_id=rng_id)
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in params and k != "codebook"}
    if kind == "sws":
        ell = tuple(_sub(state, p, k) for k in ("ellipse_pos", "ellipse_a", "ellipse_b", "ellipse_alpha"))
        outl = tuple(_sub(state, p, k) for k in ("outlier_pos", "outlier_mu", "outlier_rho", "outlier_mu0",
                                                 "outlier_sigma0"))
        m = cls(**kw, codebook=codebooks[cfg["codebook"]], labels=_sub(state, p, "labels"),
                ellipse=ell if ell[0].numel() else None, outliers=outl if outl[0].numel() else None, rng_id=rng_id)
    else:
        m = cls(**kw, rng_id=rng_id)
    if "dnn_to_bnn_flag" in cfg:
        m.dnn_to_bnn_flag = cfg["dnn_to_bnn_flag"]
    return m


def _apply_state_config(m, cls, cfg, p, priors):
    """File-held settings of a module loaded in place (or built): mode, flags, priors."""
    kind = _kind(cls)
    if kind == "sws":
        m.mode = cfg["mode"]
    if "return_kl" in cfg:
        m.return_kl = cfg["return_kl"]
    if "dnn_to_bnn_flag" in cfg:
        m.dnn_to_bnn_flag = cfg["dnn_to_bnn_flag"]
    if "estimator" in cfg:
        m.estimator = cfg["estimator"]
    if kind == "mf":
        for k in ("prior_mean", "prior_variance", "posterior_mu_init", "posterior_rho_init"):
            setattr(m, k, float(cfg[k]))
        dev = m.weight_mu.device
        for b in _PRIORS:
            if getattr(m, b) is None:
                continue  # no bias
            t = priors.get(f"{p}.{b}" if p else b)
            if t is None:
                t = torch.tensor(m.prior_mean if b.endswith("mu") else m.prior_variance)
            setattr(m, b, t.to(dev))


def load(path, model: Optional[nn.Module] = None, *, map_location="cpu", strict: bool = True,
         rebuild: bool = False):
    """Read a file written by :func:`save` (format versions 2 and 1).

    Without ``model``: returns the state_dict (an OrderedDict of tensors). With ``model``: the file's Bayesian
    modules are put into ``model`` as the module docstring says (loaded in place where the model has the same
    module, replacing a same-architecture deterministic / mean-field / SWS counterpart, created where the
    model lacks the path; any other disagreement raises ValueError unless ``rebuild=True``), then the
    state_dict is loaded (``strict`` as in ``load_state_dict``: every other key must match the model's in
    dtype and shape) and the model is returned, moved to ``map_location`` (None: left where it is).

    Every malformed, corrupted, truncated or mismatched file raises ValueError naming the problem, before the
    model is changed. A version-1 file gives a :class:`FormatWarning`.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module or None, got {_checks.describe(model)}")
    if not isinstance(rebuild, bool):
        raise TypeError(f"rebuild: expected a bool, got {_checks.describe(rebuild)}")
    name = os.fspath(path)
    header, version, blob, base, dlen = _read(path)
    if version == 1:
        warnings.warn(f"{name!r} is a version-1 sws_kernels file: only its tensor data is checksummed (a corrupted "
                      "header value that passes the schema checks loads unnoticed); save it again to upgrade",
                      FormatWarning, stacklevel=2)
    entries = _entries(name, header, version, dlen)
    table = _modules_table(name, header, version)
    _check_schema(name, table, entries, version)
    state, priors = _decode(name, entries, blob, base, None)
    del blob
    _check_data(name, table, state, priors)
    if model is None:
        return OrderedDict((k, t.to(map_location)) for k, t in state.items()) if map_location is not None else state

    plan = _plan(name, model, table, rebuild)
    # the rest of the state must match the model's exactly (modules the file puts in place excepted)
    new_paths = [p for p, (act, _) in plan.items() if act == "new"]
    have = {}
    for p_key, t in model.state_dict(keep_vars=True).items():
        owner = _owner(set(new_paths), p_key) if new_paths else None
        if owner is None:
            have[p_key] = t
    for key, t in state.items():
        if _owner(table, key) is not None:
            continue  # checked by the schema
        cur = have.get(key)
        if cur is not None and (cur.dtype != t.dtype or cur.shape != t.shape):
            raise ValueError(f"model: state_dict entry {key!r} is {_checks.describe(cur)}, the file {name!r} holds "
                             f"{_checks.describe(t)}")

    codebooks: Dict[str, Codebook] = {}
    built = {}
    try:
        for p, (cls, cfg) in table.items():
            if cls is Codebook:
                act, cur = plan[p]
                codebooks[p] = cur if act == "keep" else _build(p, cls, cfg, state, codebooks)
        for p, (cls, cfg) in table.items():
            if cls is not Codebook and plan[p][0] == "new":
                built[p] = _build(p, cls, cfg, state, codebooks)
    except (ValueError, TypeError) as e:
        raise ValueError(f"path: {name!r}: cannot build its modules: {e}") from None

    # -- from here on the model changes
    for p, (cls, cfg) in table.items():  # preorder: parents before children
        if cls is Codebook:
            continue
        act, cur = plan[p]
        if act == "new":
            parent_path, _, leaf = p.rpartition(".")
            parent = _resolve(model, parent_path)
            if cur is not None:
                parent._modules[leaf] = built[p]
            else:
                parent.add_module(leaf, built[p])
        else:
            cb = codebooks[cfg["codebook"]] if _kind(cls) == "sws" else None
            if cb is not None and cur.codebook is not cb:
                cur.codebook = cb  # restore the saved sharing
    for p, cb in codebooks.items():
        cur = _resolve(model, p)
        if cur is not cb:
            parent_path, _, leaf = p.rpartition(".")
            parent = _resolve(model, parent_path)
            if leaf == "codebook" and isinstance(parent, _snn.SWS_LAYERS):
                parent.codebook = cb  # through the layer's __setattr__ (it tracks its codebook's users)
            elif leaf in parent._modules:
                parent._modules[leaf] = cb
            else:
                parent.add_module(leaf, cb)
    for p, (cls, cfg) in table.items():
        if cls is not Codebook:
            _apply_state_config(_resolve(model, p), cls, cfg, p, priors)
    try:
        # Every Bayesian module checks the loaded values again in its load_state_dict post-hook (sws_kernels.nn).
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"model: does not match the file {name!r}: {e}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"path: {name!r} holds an invalid value: {e}") from None
    return model.to(map_location) if map_location is not None else model


# ------------------------------------------------------------------------------------------------------
# size_report
# ------------------------------------------------------------------------------------------------------
PARTS = ("labels", "codebook", "ellipses", "outliers", "biases", "mean_field", "other")


def size_report(model: nn.Module) -> dict:
    """Bytes of ``model``'s state by part, in memory and in a :func:`save` file.

    Returns ``{"memory": {part: bytes}, "disk": {part: bytes}}`` with parts ``labels`` (SWS labels),
    ``codebook``, ``ellipses`` (positions, component ids, alpha), ``outliers`` (positions, mu, rho and their
    prior), ``biases`` (SWS biases, mean-field bias mu/rho), ``mean_field`` (mean-field weight mu/rho and
    non-scalar priors), ``other`` (everything else: deterministic layers, BatchNorm statistics, rng ids), and
    ``total``. Shared tensors count once. ``disk`` has ``format`` too (magic, lengths, JSON header, checksum),
    and its ``total`` is exactly the size :func:`save` writes.
    """
    hb, chunks = _serialize(model)
    disk = dict.fromkeys(PARTS, 0)
    for _, part, raw in chunks:
        disk[part] += len(raw)
    disk["format"] = _PRE.size + len(hb) + _CRC.size
    disk["total"] = sum(disk.values())
    mem = dict.fromkeys(PARTS, 0)
    parts_by_key = {k: part for k, part, _ in chunks}
    seen = set()
    sd = model.state_dict(keep_vars=True)
    prior_ts = {}
    for name, m in _bayesian_modules(model):
        if _kind(type(m)) == "mf":
            for b in _PRIORS:
                t = getattr(m, b)
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    prior_ts[f"{name}.{b}" if name else b] = t
    for key, t in list(sd.items()) + list(prior_ts.items()):
        if not isinstance(t, torch.Tensor):
            continue
        ident = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else ("empty", key)
        if ident in seen:
            continue
        seen.add(ident)
        mem[parts_by_key.get(key, "other")] += t.numel() * t.element_size()
    mem["total"] = sum(mem.values())
    return {"memory": mem, "disk": disk}
