"""Compact, safe model files: :func:`save`, :func:`load`, :func:`size_report`.

File layout (little-endian; nothing is unpickled, so loading an untrusted file cannot run code)::

    8 bytes   magic b"SWSKRNL1"
    8 bytes   uint64 length H of the JSON header
    H bytes   UTF-8 JSON header
    ...       raw tensor bytes, back to back

The header holds ``tensors`` ({state_dict key: {"dtype", "shape", "offsets": [begin, end]} or
{"alias": other key}}: a codebook shared by several layers is stored once), ``modules`` ({module path:
{"class", "config"}} for every Codebook / SWS / mean-field module, enough to rebuild them), ``data_crc32``
and ``data_size``. Labels keep their narrow integer dtype (uint8/int16), so an SWS file is about the size
of its labels plus the codebook and outliers.

``load(path, model)`` rebuilds the Bayesian layers recorded in the file inside ``model`` (e.g. a freshly
constructed deterministic or mean-field architecture) where they are missing, then loads the state_dict
strictly; ``load(path)`` returns the state_dict itself.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from collections import OrderedDict
from typing import Dict, Optional

import torch
from torch import nn

from . import _checks
from .nn import (MEAN_FIELD_LAYERS, SWS_LAYERS, Codebook, MeanFieldConv1d, MeanFieldConv2d, MeanFieldLinear,
                 SWSConv1d, SWSConv2d, SWSLinear)

__all__ = ["save", "load", "read_header", "size_report"]

MAGIC = b"SWSKRNL1"
VERSION = 1
_MAX_HEADER = 1 << 28

_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_CLASSES = {c.__name__: c for c in (Codebook, SWSLinear, SWSConv1d, SWSConv2d, MeanFieldLinear, MeanFieldConv1d,
                                    MeanFieldConv2d)}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("sws_kernels.io: expected a little-endian host")


def _module_config(name: str, m: nn.Module, codebook_paths: Dict[int, str]) -> dict:
    if isinstance(m, Codebook):
        return {"num_components": m.num_components}
    cfg = {}
    if isinstance(m, (SWSLinear, MeanFieldLinear)):
        cfg.update(in_features=m.in_features, out_features=m.out_features)
    else:
        cfg.update(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                   stride=list(m.stride), padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                   dilation=list(m.dilation), groups=m.groups, padding_mode=m.padding_mode)
    if isinstance(m, SWS_LAYERS):
        cfg.update(bias=m.bias is not None, mode=m.mode, codebook=codebook_paths[id(m.codebook)])
    else:
        cfg.update(bias=m.bias, prior_mean=m.prior_mean, prior_variance=m.prior_variance,
                   posterior_mu_init=m.posterior_mu_init, posterior_rho_init=m.posterior_rho_init,
                   dnn_to_bnn_flag=m.dnn_to_bnn_flag)
    return cfg


def _bayesian_modules(model: nn.Module):
    """(path, module) of every Codebook / SWS / mean-field module; a shared codebook under its first path."""
    out, seen = [], set()
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (Codebook, *SWS_LAYERS, *MEAN_FIELD_LAYERS)):
            if isinstance(m, Codebook) and id(m) in seen:
                continue
            seen.add(id(m))
            out.append((name, m))
    return out


def save(model: nn.Module, path) -> int:
    """Write ``model``'s state_dict and its Bayesian modules' configuration to ``path``. Returns bytes written.

    Non-scalar mean-field priors (non-persistent buffers, e.g. from bayesian-torch) are stored as extra
    tensors so the KL survives the round trip.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
    sd = model.state_dict()
    mods = _bayesian_modules(model)
    cb_paths = {id(m): n for n, m in mods if isinstance(m, Codebook)}
    modules = {}
    for name, m in mods:
        modules[name] = {"class": type(m).__name__, "config": _module_config(name, m, cb_paths)}
        if isinstance(m, MEAN_FIELD_LAYERS):
            for b in ("prior_weight_mu", "prior_weight_sigma", "prior_bias_mu", "prior_bias_sigma"):
                t = getattr(m, b)
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    sd[f"__prior__.{name}.{b}" if name else f"__prior__.{b}"] = t
    entries, chunks, seen = OrderedDict(), [], {}
    offset = 0
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model: state_dict entry {key!r} is a {type(t).__name__}, expected a tensor")
        if t.dtype not in _NAMES:
            raise TypeError(f"model: state_dict entry {key!r} has unsupported dtype {t.dtype}")
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device) if t.numel() else None
        if ident is not None and ident in seen:
            entries[key] = {"alias": seen[ident]}
            continue
        data = t.detach().to("cpu").contiguous().reshape(-1)
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        entries[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
        if ident is not None:
            seen[ident] = key
    data = b"".join(chunks)
    header = {"format": "sws_kernels", "version": VERSION, "torch": torch.__version__, "tensors": entries,
              "modules": modules, "data_size": len(data), "data_crc32": zlib.crc32(data)}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # write then rename: a crash never leaves a half-written file at `path`
        f.write(MAGIC)
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        f.write(data)
    os.replace(tmp, path)
    return len(MAGIC) + 8 + len(hb) + len(data)


def _read(path):
    with open(path, "rb") as f:
        blob = f.read()
    name = os.fspath(path)
    if len(blob) < 16 or blob[:8] != MAGIC:
        raise ValueError(f"path: {name!r} is not an sws_kernels file (expected magic {MAGIC!r}, got {blob[:8]!r})")
    (hlen,) = struct.unpack("<Q", blob[8:16])
    if hlen > _MAX_HEADER or 16 + hlen > len(blob):
        raise ValueError(f"path: {name!r} is truncated or corrupted (header length {hlen}, file size {len(blob)})")
    try:
        header = json.loads(blob[16:16 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"path: {name!r} has a corrupted header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != "sws_kernels":
        raise ValueError(f"path: {name!r} header is not an sws_kernels header")
    if header.get("version") != VERSION:
        raise ValueError(f"path: {name!r} has format version {header.get('version')!r}, expected {VERSION}")
    data = blob[16 + hlen:]
    if len(data) != header.get("data_size") or zlib.crc32(data) != header.get("data_crc32"):
        raise ValueError(f"path: {name!r} is corrupted: tensor data has {len(data)} bytes / checksum "
                         f"{zlib.crc32(data)}, header says {header.get('data_size')} / {header.get('data_crc32')}")
    return header, data


def read_header(path) -> dict:
    """The JSON header of a file (tensor table, module configs), after the integrity checks."""
    return _read(path)[0]


def _tensors(header, data, map_location) -> "OrderedDict[str, torch.Tensor]":
    out = OrderedDict()
    buf = bytearray(data)
    for key, e in header["tensors"].items():
        if "alias" in e:
            if e["alias"] not in out:
                raise ValueError(f"path: corrupted tensor table: {key!r} aliases unknown {e['alias']!r}")
            out[key] = out[e["alias"]]
            continue
        dt = _DTYPES.get(e.get("dtype"))
        if dt is None:
            raise ValueError(f"path: tensor {key!r} has unknown dtype {e.get('dtype')!r}")
        shape = [int(s) for s in e["shape"]]
        b, end = (int(v) for v in e["offsets"])
        n = 1
        for s in shape:
            n *= s
        itemsize = torch.empty((), dtype=dt).element_size()
        if not (0 <= b <= end <= len(buf)) or end - b != n * itemsize:
            raise ValueError(f"path: tensor {key!r} has offsets {[b, end]} inconsistent with shape {shape} and "
                             f"dtype {e['dtype']} (data size {len(buf)})")
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=end - b, offset=b) if end > b else torch.empty(0, dtype=torch.uint8)
        t = raw.clone().view(dt).reshape(shape)
        out[key] = t.to(map_location) if map_location is not None else t
    return out


def _build(cls_name: str, cfg: dict, codebooks: Dict[str, Codebook]):
    cls = _CLASSES.get(cls_name)
    if cls is None:
        raise ValueError(f"path: unknown module class {cls_name!r} in file")
    if cls is Codebook:
        return Codebook(int(cfg["num_components"]))
    if cls in SWS_LAYERS:
        cb = codebooks.get(cfg["codebook"])
        if cb is None:
            raise ValueError(f"path: layer refers to codebook {cfg['codebook']!r}, not in the file")
        kw = dict(codebook=cb, mode=cfg["mode"])
        if cls is SWSLinear:
            return cls(cfg["in_features"], cfg["out_features"], cfg["bias"], **kw)
        return cls(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                   cfg["padding"] if isinstance(cfg["padding"], str) else tuple(cfg["padding"]),
                   tuple(cfg["dilation"]), cfg["groups"], cfg["bias"], padding_mode=cfg["padding_mode"], **kw)
    pri = (cfg["prior_mean"], cfg["prior_variance"], cfg["posterior_mu_init"], cfg["posterior_rho_init"], cfg["bias"])
    if cls is MeanFieldLinear:
        m = cls(cfg["in_features"], cfg["out_features"], *pri)
    else:
        m = cls(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                cfg["padding"] if isinstance(cfg["padding"], str) else tuple(cfg["padding"]), tuple(cfg["dilation"]),
                cfg["groups"], *pri, padding_mode=cfg["padding_mode"])
    m.dnn_to_bnn_flag = cfg["dnn_to_bnn_flag"]
    return m


def _get(model, path):
    m = model
    for p in path.split(".") if path else []:
        m = getattr(m, p, None)
        if m is None:
            return None
    return m


def load(path, model: Optional[nn.Module] = None, *, map_location="cpu", strict: bool = True):
    """Read a file written by :func:`save`.

    Without ``model``: returns the state_dict (an OrderedDict of tensors). With ``model``: every Bayesian
    module recorded in the file that ``model`` lacks at that path (e.g. a deterministic ``nn.Linear`` where
    the file has an ``SWSLinear``) is rebuilt from the recorded configuration, codebooks shared as saved;
    then the state_dict is loaded (``strict`` as in ``load_state_dict``) and the model is returned on the
    device of ``map_location``. A corrupted, truncated or mismatched file raises ValueError.
    """
    header, data = _read(path)
    sd = _tensors(header, data, map_location)
    priors = {k: sd.pop(k) for k in [k for k in sd if k.startswith("__prior__.")]}
    if model is None:
        return sd
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module or None, got {_checks.describe(model)}")
    modules = header.get("modules", {})
    codebooks: Dict[str, Codebook] = {}
    for name, spec in modules.items():  # codebooks first: layers refer to them
        if spec["class"] == "Codebook":
            cur = _get(model, name)
            codebooks[name] = cur if isinstance(cur, Codebook) else _build("Codebook", spec["config"], codebooks)
    for name, spec in modules.items():
        if spec["class"] == "Codebook":
            cur = _get(model, name)
            if not isinstance(cur, Codebook):
                _set(model, name, codebooks[name])
            continue
        cur = _get(model, name)
        if type(cur).__name__ != spec["class"]:
            if name == "":
                raise ValueError(f"model: the file holds a bare {spec['class']}; pass one as model")
            _set(model, name, _build(spec["class"], spec["config"], codebooks))
        elif spec["class"] in ("SWSLinear", "SWSConv1d", "SWSConv2d"):
            cb_path = spec["config"]["codebook"]
            if cur.codebook is not codebooks.get(cb_path, cur.codebook):
                cur.codebook = codebooks[cb_path]  # restore the saved sharing
    for key, t in priors.items():
        mpath, _, buf = key[len("__prior__."):].rpartition(".")
        name = key[len("__prior__."):]
        if not t.dtype.is_floating_point:
            raise ValueError(f"path: {os.fspath(path)!r}: prior {name!r} expected a floating-point tensor, "
                             f"got {_checks.describe(t)}")
        _checks.finite(t, f"path: {os.fspath(path)!r}: prior {name!r}")
        if buf.endswith("sigma") and t.numel() and float(t.min()) <= 0:
            raise ValueError(f"path: {os.fspath(path)!r}: prior {name!r} expected positive standard deviations, "
                             f"got min {float(t.min())}")
        setattr(_get(model, mpath), buf, t)
    try:
        # Every Bayesian module checks the loaded values in a load_state_dict post-hook (sws_kernels.nn):
        # label/position ranges, alpha in [0, 1], unique positions, finite parameters.
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"model: does not match the file {os.fspath(path)!r}: {e}") from None
    except (ValueError, TypeError) as e:
        raise type(e)(f"path: {os.fspath(path)!r} holds an invalid value: {e}") from None
    return model.to(map_location) if map_location is not None else model


def _set(model, path, new):
    parent = model
    *head, last = path.split(".")
    for p in head:
        parent = getattr(parent, p)
    setattr(parent, last, new)


def size_report(model: nn.Module) -> dict:
    """Bytes the model's state takes, by part: SWS labels / ellipses / outliers / codebooks / biases,
    mean-field parameters, everything else; shared tensors counted once. ``total`` is their sum."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
    parts = {"labels": 0, "ellipses": 0, "outliers": 0, "codebooks": 0, "sws_bias": 0, "mean_field": 0, "other": 0}
    seen = set()

    def add(part, t):
        if t is None or id(t) in seen:
            return
        seen.add(id(t))
        parts[part] += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, Codebook):
            for t in (m.means, m.chol, m.means0, m.chol0, m.rng_id):
                add("codebooks", t)
        elif isinstance(m, SWS_LAYERS):
            add("labels", m.labels)
            for t in (m.ellipse_pos, m.ellipse_a, m.ellipse_b, m.ellipse_alpha):
                add("ellipses", t)
            for t in (m.outlier_pos, m.outlier_mu, m.outlier_rho, m.outlier_mu0, m.outlier_sigma0):
                add("outliers", t)
            add("sws_bias", m.bias)
            add("other", m.rng_id)
        elif isinstance(m, MEAN_FIELD_LAYERS):
            for t in m.state_dict(keep_vars=True).values():
                add("mean_field", t)
    for t in model.state_dict(keep_vars=True).values():
        add("other", t)
    parts["total"] = sum(parts.values())
    return parts
