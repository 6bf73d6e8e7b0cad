"""Distributed training and checkpoints with sws_kernels modules: DDP with any codebook size, the same noise
streams on every rank, plain and DCP checkpoints of wrapped models (issue 18).

DDP
---
Wrap with :func:`ddp` instead of ``torch.nn.parallel.DistributedDataParallel`` (same keyword arguments)::

    ddp_model = sws_kernels.distributed.ddp(model, device_ids=[rank])

It adds to torch's DDP:

* **Any codebook size.** An SWS layer's labels are stored in the narrowest integer dtype for its codebook's K
  (uint8, int16, int32: the labels are most of a compressed model's bytes). Gloo and NCCL have no int16, so
  plain DDP fails at construction for 256 < K <= 32768 (``_broadcast_coalesced: Invalid scalar type``).
  :func:`prepare_ddp` leaves the *constant* buffers of every codebook, SWS and mean-field module (everything
  they register as a buffer: labels, ellipse/outlier positions, components and alpha, priors, ``rng_id``) out
  of DDP's own broadcasts (``_ddp_params_and_buffers_to_ignore``) and broadcasts them once from the group's
  rank 0 as raw bytes (one flat uint8 view per device: no dtype change, no memory growth). Training never
  changes them, so nothing is lost by not re-sending them on every forward as DDP does with buffers
  (``broadcast_buffers=True``; other buffers, e.g. BatchNorm statistics, are still broadcast by DDP).
* **The same weight sample on every rank.** A layer's noise is Philox at (seed, its ``rng_id``). Default
  ``rng_id``\\s come from a per-process counter (a rank that built one more module first gets other ids), and
  ``seed=None`` draws the seed from PyTorch's default generator (a rank that drew one more random number
  draws other seeds): either way that rank trains on another weight sample, silently. :func:`check_consistency`
  all-gathers every rank's module ids (path, class, ``rng_id``), constant-buffer shapes and dtypes and a
  fingerprint of the default generators the modules draw seeds from (CPU, or the rank's CUDA device) and
  raises ``RuntimeError`` on every rank, naming the first differences. :func:`ddp` runs it when wrapping
  and once more on the first forward. ``independent=True`` skips the check: ranks seeded differently on
  purpose (``torch.manual_seed(base + rank)``) each use their own weight sample (more samples per step, a
  different estimator); ``rng_id``\\s are still rank 0's.

A module's ``rng_id`` buffer is the one source of truth for its noise stream (``sws_kernels.nn``): the Python
mirror the kernels use follows the buffer whenever it is written, so after plain DDP's broadcast, too, every
rank uses rank 0's ids.

Checkpoints
-----------
* ``sws_kernels.save(ddp_model, path)`` writes the plain model (keys without ``module.``), loadable into an
  unwrapped model; :func:`state_dict` gives that plain state dict.
* :func:`load_state_dict` loads a plain full state dict (a shared codebook listed under every layer using
  it, as ``state_dict()`` writes it) into a plain, DDP- or ``torch.compile``-wrapped model; a dict saved
  from the wrapper itself (``module.``/``_orig_mod.`` prefixes) is accepted too.
* DCP (``torch.distributed.checkpoint``): :func:`save_dcp` saves the plain state dict (every rank calls it;
  DCP writes replicated tensors once); :func:`load_dcp` loads it into a model built with *other* sizes too:
  :func:`resize_to_checkpoint` first gives every codebook and SWS layer the checkpoint's number of components,
  label dtype and ellipse/outlier counts (read from the checkpoint's metadata), then DCP loads in place and
  the modules' entry checks run on the loaded values. Resizing replaces parameters (codebook means/chol,
  outlier mu/rho): load before wrapping the model in DDP and before building its optimizer; a wrapped
  model that would need resizing raises.

FSDP2
-----
:func:`fully_shard` applies ``torch.distributed.fsdp.fully_shard`` with the wrap rule these modules need:

1. every codebook is its own unit (a codebook shared by several layers cannot belong to any one layer's
   unit), gathered by a forward pre-hook on each SWS layer using it (the layers read ``codebook.means``
   directly, so the codebook's own forward never runs) and kept gathered until the backward has reduced its
   gradient (it is tiny: K x 5 numbers);
2. every SWS and mean-field layer is its own unit with ``reshard_after_forward=False`` (an SWS layer's labels,
   most of its bytes, shard with it: ``shard_labels=True``, the default, makes them a frozen parameter, same
   state-dict key, which FSDP2 shards on rows and all-gathers for the forward as bytes); its parameters stay
   gathered from its forward until its backward has reduced their gradients, so :func:`sws_kernels.kl_loss` /
   :func:`sws_kernels.elbo_loss` after the forward read gathered parameters (the KL a layer returns from its
   forward with ``return_kl=True`` works too), and the layers' steady-state kernels, which keep the
   parameters' addresses from the forward for the backward (``sws_kernels._bound``), never see them freed
   and re-gathered elsewhere in between (with resharding after the forward they computed wrong gradients
   from freed memory). ZeRO-2 memory during a step; sharded between steps;
3. ``units`` (e.g. transformer blocks) next, then the root.

FSDP2 neither broadcasts buffers nor checks anything across ranks: :func:`fully_shard` runs the same
consistency check as :func:`ddp` (at wrap time and on the first forward; ``independent=True`` skips it) and
broadcasts the constant buffers from rank 0 as bytes. (Parameters are sharded from each rank's own values, as
FSDP2 does: build or load them identically on every rank.)

Between steps the parameters are sharded DTensors: read them (e.g. ``kl_loss`` for logging) inside
``with gathered(model):``. :func:`state_dict` gives full tensors (a collective: every rank calls it);
:func:`load_state_dict` loads a plain full state dict (shared codebook keys included) into the sharded model;
DCP checkpoints (:func:`save_dcp`) are saved sharded and load into sharded or plain models of any world
size; sizes can only change on a plain model (load, then shard). ``sws_kernels.save(model, path)`` of a sharded
model gathers the parameters (a collective: every rank calls it, and every rank writes the file); :func:`save`
gathers on every rank and writes on rank 0 only. Load into a sharded model through :func:`load_state_dict` /
:func:`load_dcp` (the layers' own ``load_state_dict`` would re-enable the per-buffer entry checks on sharded labels).
With ``shard_labels=False`` the labels stay replicated buffers.

Tensor parallelism
------------------
:func:`parallelize_linear` (one layer) and :func:`parallelize` (a plan of names) shard an SWSLinear or
MeanFieldLinear over a 1-D device mesh like PyTorch's ``ColwiseParallel`` (output rows; replicated input, output
sharded on the last dim) and ``RowwiseParallel`` (input columns; input sharded on the last dim, partial outputs
all-reduced to a replicated output, the bias added once after the sum), with DTensor inputs and outputs. Labels,
outliers and ellipses are split (positions re-indexed to the shard), the codebook stays whole on every rank (its
gradient summed over the mesh). The noise of every weight is the unsharded layer's: the ops take a global element
mapping (``elem_offset``, ``row_stride``: sws_kernels.reference.element_map), so with the same seed a TP layer
reproduces the unsharded layer's outputs and gradients.
"""
from __future__ import annotations

import contextlib
import zlib
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import _checks
from . import nn as _snn

__all__ = ["ddp", "prepare_ddp", "check_consistency", "sync_buffers", "constant_buffers", "unwrap", "plain_model",
           "save", "state_dict", "load_state_dict", "save_dcp", "load_dcp", "resize_to_checkpoint", "fully_shard",
           "gathered", "parallelize_linear", "parallelize", "TensorParallelInfo", "TP_STYLES"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _dist():
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError("sws_kernels.distributed: this PyTorch build has no torch.distributed")
    return dist


def _require_group(group):
    dist = _dist()
    if not dist.is_initialized():
        raise RuntimeError("sws_kernels.distributed: expected an initialised default process group "
                           "(torch.distributed.init_process_group), got none")
    return dist


def unwrap(model):
    """The plain module inside DDP / DataParallel / ``torch.compile`` wrappers (any nesting); ``model`` itself
    when it is not wrapped."""
    seen = 0
    while isinstance(model, nn.Module) and seen < 16:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
        seen += 1
    return model


def _bayesian_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(first path, module) of every codebook / SWS / mean-field module, each once."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, _snn._RngIdMixin)]


def constant_buffers(model: nn.Module) -> List[Tuple[List[str], torch.Tensor]]:
    """Every buffer a codebook, SWS or mean-field module registers itself (labels, ellipse/outlier data,
    priors, ``rng_id``): ``[(all fully qualified names, tensor)]``, each tensor once (a shared codebook's under
    every layer's prefix). These never change in training."""
    model = unwrap(model)
    out: "OrderedDict[int, Tuple[List[str], torch.Tensor]]" = OrderedDict()
    for path, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, _snn._RngIdMixin):
            continue
        pre = f"{path}." if path else ""
        for name, t in m._buffers.items():
            if t is None:
                continue
            entry = out.setdefault(id(t), ([], t))
            entry[0].append(pre + name)
    return list(out.values())


# ------------------------------------------------------------------------------------------------------
# Consistency across ranks
# ------------------------------------------------------------------------------------------------------

def _signature(model: nn.Module):
    mods = [(p or "<root>", type(m).__name__, m.owner) for p, m in _bayesian_modules(model)]
    bufs = [(names[0], str(t.dtype).replace("torch.", ""), tuple(t.shape)) for names, t in constant_buffers(model)]
    return mods, bufs


def _generator_fingerprint(model: nn.Module):
    """CRC32s of the default generators the Bayesian modules draw their seeds from: the CPU one when some of them
    are on the CPU, the CUDA one of each CUDA device they are on (named "cuda", not by index: each rank has its
    own device)."""
    devs = set()
    for _, m in _bayesian_modules(model):
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            devs.add(t.device)
    fp = []
    if any(d.type == "cpu" for d in devs):
        fp.append(("cpu", zlib.crc32(torch.random.get_rng_state().numpy().tobytes())))
    for d in sorted({d.index or 0 for d in devs if d.type == "cuda"}):
        fp.append(("cuda", zlib.crc32(torch.cuda.get_rng_state(d).numpy().tobytes())))
    return fp


def _differences(items, what: str, describe, limit: int = 4) -> List[str]:
    """Messages for the first entries where some rank's list differs from rank 0's."""
    ref = items[0]
    msgs = []
    for r, lst in enumerate(items[1:], start=1):
        if lst == ref:
            continue
        if len(lst) != len(ref):
            msgs.append(f"rank 0 has {len(ref)} {what}, rank {r} has {len(lst)}")
        for a, b in zip(ref, lst):
            if a != b:
                msgs.append(describe(a, b, r))
                if len(msgs) >= limit:
                    return msgs
        if len(msgs) >= limit:
            break
    return msgs


def check_consistency(model: nn.Module, *, group=None, generators: bool = True, where: str = "") -> None:
    """Raise ``RuntimeError`` (on every rank) unless every rank of ``group`` has the same Bayesian modules
    (paths, classes, ``rng_id``), the same constant-buffer shapes and dtypes and, with ``generators``, the same
    default random generator states (same seeds drawn next). A collective: every rank must call it.
    One ``all_gather_object`` of a few numbers per module."""
    dist = _require_group(group)
    model = unwrap(model)
    mine = (_signature(model), _generator_fingerprint(model) if generators else None)
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    at = f" ({where})" if where else ""
    msgs = _differences([g[0][0] for g in gathered], "codebook/SWS/mean-field modules",
                        lambda a, b, r: (f"module {a[0]!r} ({a[1]}) has rng_id {a[2]} on rank 0, but rank {r} has "
                                         f"{b[0]!r} ({b[1]}) with rng_id {b[2]}"))
    if msgs:
        raise RuntimeError(
            f"sws_kernels.distributed: ranks disagree on the modules' noise streams{at}: " + "; ".join(msgs)
            + ". Each rank would train on another weight sample. Build the model identically on every rank "
              "(same modules in the same order, or explicit rng_id=), or pass independent=True for one "
              "independent weight sample per rank.")
    msgs = _differences([g[0][1] for g in gathered], "constant buffers",
                        lambda a, b, r: (f"{a[0]!r} is {a[1]}{list(a[2])} on rank 0, but rank {r} has "
                                         f"{b[0]!r} {b[1]}{list(b[2])}"))
    if msgs:
        raise RuntimeError(f"sws_kernels.distributed: ranks have differently sized models{at}: " + "; ".join(msgs)
                           + ". Build (or load) the same model on every rank before wrapping.")
    if generators:
        msgs = _differences([g[1] for g in gathered], "generators",
                            lambda a, b, r: (f"the {a[0]} generator's state differs between rank 0 and rank {r}"
                                             if a[0] == b[0] else f"rank 0 has a {a[0]} generator, rank {r} {b[0]}"))
        if msgs:
            raise RuntimeError(
                f"sws_kernels.distributed: ranks are at different positions of PyTorch's default random "
                f"generator{at}: " + "; ".join(msgs) + ". Layers called with seed=None would draw different "
                "seeds, i.e. other weight samples on each rank. Seed every rank alike (torch.manual_seed(s)) "
                "and draw the same random numbers on every rank (e.g. no rank-only torch.rand before the "
                "forward), or pass independent=True for one independent weight sample per rank.")


# ------------------------------------------------------------------------------------------------------
# DDP
# ------------------------------------------------------------------------------------------------------

def _refresh_owners(model: nn.Module) -> None:
    """Read every module's rng_id buffer into its owner mirror now (eagerly, before torch.compile traces)."""
    for m in unwrap(model).modules():
        if isinstance(m, _snn._RngIdMixin):
            m.owner


# sync_buffers: buffers of at least this many bytes (contiguous) are broadcast in place through their byte view;
# smaller ones are packed into flat uint8 buckets of at most _BUCKET_BYTES (bounded extra memory)
_SMALL_BYTES = 1 << 20
_BUCKET_BYTES = 64 << 20


def sync_buffers(model: nn.Module, *, group=None, src: int = 0) -> None:
    """Broadcast every constant buffer (:func:`constant_buffers`) from the group's rank ``src`` as raw bytes,
    whatever its dtype: large contiguous buffers in place through a uint8 view, small ones packed into flat
    uint8 buckets (at most 64 MiB of extra memory). Written buffers get a new ``_version`` (owner mirrors and
    the layers' bindings follow). A collective: every rank must call it."""
    dist = _require_group(group)
    model = unwrap(model)
    src_global = dist.get_global_rank(group, src) if group is not None else src
    receiving = dist.get_rank() != src_global
    by_device: Dict[torch.device, List[torch.Tensor]] = OrderedDict()
    for _, t in constant_buffers(model):
        if t.numel():
            by_device.setdefault(t.device, []).append(t)

    def flush(bucket):
        flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in bucket])
        dist.broadcast(flat, src_global, group=group)
        if not receiving:
            return
        off = 0
        for t in bucket:
            nb = t.numel() * t.element_size()
            part = flat[off:off + nb]
            if t.is_contiguous():  # written through its byte view (an in-place op: bumps _version)
                t.view(-1).view(torch.uint8).copy_(part)
            else:
                t.copy_(part.clone().view(t.dtype).view(t.shape))
            off += nb

    with torch.no_grad():
        for ts in by_device.values():
            bucket, size = [], 0
            for t in ts:
                nb = t.numel() * t.element_size()
                if t.is_contiguous() and nb >= _SMALL_BYTES:
                    dist.broadcast(t.view(-1).view(torch.uint8), src_global, group=group)
                    if receiving:
                        torch.autograd.graph.increment_version(t)
                    continue
                if bucket and size + nb > _BUCKET_BYTES:
                    flush(bucket)
                    bucket, size = [], 0
                bucket.append(t)
                size += nb
            if bucket:
                flush(bucket)
    _refresh_owners(model)


def prepare_ddp(model: nn.Module, *, independent: bool = False, group=None) -> nn.Module:
    """Make a plain model ready for ``DistributedDataParallel`` with any codebook size (see the module
    docstring): check the ranks agree (unless ``independent``), add the constant buffers to the model's
    ``_ddp_params_and_buffers_to_ignore`` and broadcast them once from rank 0 as bytes. Returns ``model``.
    A collective: every rank must call it, before wrapping."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
    if not isinstance(independent, bool):
        raise TypeError(f"independent: expected a bool, got {_checks.describe(independent)}")
    if unwrap(model) is not model:
        raise ValueError(f"model: expected the plain model (prepare before wrapping), got a {type(model).__name__}")
    _require_group(group)
    if not independent:
        check_consistency(model, group=group, where="when wrapping")
    else:  # sizes must still agree for the byte broadcast
        _check_sizes(model, group)
    names = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    for fqns, _ in constant_buffers(model):
        names.update(fqns)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(names))
    sync_buffers(model, group=group)
    return model


def _check_sizes(model, group) -> None:
    dist = _dist()
    mine = _signature(model)[1]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    msgs = _differences(gathered, "constant buffers",
                        lambda a, b, r: (f"{a[0]!r} is {a[1]}{list(a[2])} on rank 0, but rank {r} has "
                                         f"{b[0]!r} {b[1]}{list(b[2])}"))
    if msgs:
        raise RuntimeError("sws_kernels.distributed: ranks have differently sized models (when wrapping): "
                           + "; ".join(msgs) + ". Build (or load) the same model on every rank before wrapping.")


def ddp(model: nn.Module, *, independent: bool = False, **kwargs) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, **kwargs)`` after :func:`prepare_ddp`, with the ranks' consistency
    checked again on the first forward (unless ``independent``). ``process_group=`` is used for the checks
    and the byte broadcast too."""
    group = kwargs.get("process_group")
    prepare_ddp(model, independent=independent, group=group)
    wrapped = nn.parallel.DistributedDataParallel(model, **kwargs)
    if not independent:
        def first_forward_check(module, args, kw):
            handle.remove()
            check_consistency(model, group=group, where="on the first forward")

        handle = wrapped.register_forward_pre_hook(first_forward_check, with_kwargs=True)
    return wrapped


# ------------------------------------------------------------------------------------------------------
# State dicts and checkpoints
# ------------------------------------------------------------------------------------------------------

def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def _is_sharded(model: nn.Module) -> bool:
    fm = _fsdp_module_type()
    return fm is not None and any(isinstance(m, fm) for m in model.modules())


# Dtypes gloo and NCCL cannot all-gather (an int16 label shard): gathered as raw bytes.
_BYTE_GATHER = (torch.int16, torch.bool)


def _full(v):
    """``DTensor.full_tensor()``, for any dtype: an int16 tensor sharded on dim 0 (a layer's labels sharded with
    it by :func:`fully_shard`) is gathered as a uint8 view of its rows (the collectives have no int16)."""
    if v.dtype not in _BYTE_GATHER:
        return v.full_tensor()
    from torch.distributed.tensor import DTensor, Shard
    if any(not isinstance(pl, Shard) or pl.dim != 0 for pl in v.placements) or v.dim() < 1:
        raise ValueError(f"{v.dtype} DTensor: expected a dim-0 sharding to gather as bytes, got {v.placements}")
    local = v.to_local().contiguous()
    row = local[0].numel() * local.element_size() if local.dim() > 1 else local.element_size()
    b = local.reshape(local.shape[0], -1).view(torch.uint8) if local.dim() > 1 else local.view(torch.uint8).view(-1, row)
    shape = (v.shape[0], row)
    db = DTensor.from_local(b, v.device_mesh, v.placements, run_check=False, shape=torch.Size(shape),
                            stride=(row, 1))
    return db.full_tensor().view(v.dtype).view(v.shape)


def state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The plain model's state_dict: no wrapper prefixes, full tensors (FSDP2's sharded DTensors gathered: a
    collective, every rank calls it; a shared codebook's tensors stay one tensor under every key)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
    target = unwrap(model)
    dt = _dtensor_type()
    if dt is None or not _is_sharded(target):
        return target.state_dict()
    full = {}
    out = OrderedDict()
    for k, v in target.state_dict(keep_vars=True).items():
        if isinstance(v, torch.Tensor):
            if id(v) not in full:  # one gather (and one tensor) per shared tensor
                full[id(v)] = (_full(v) if isinstance(v, dt) else v).detach()
            v = full[id(v)]
        out[k] = v
    return out


def _strip_prefixes(sd):
    keys = list(sd.keys())
    changed = True
    while changed and keys:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(p) for k in keys):
                sd = OrderedDict((k[len(p):], v) for k, v in sd.items())
                keys = list(sd.keys())
                changed = True
    return sd


def load_state_dict(model: nn.Module, state_dict, *, strict: bool = True):
    """Load a full state dict into the plain model inside ``model`` (DDP / compile wrappers unwrapped). Keys
    may carry the wrappers' ``module.`` / ``_orig_mod.`` prefixes; a shared codebook may be listed under every
    layer's prefix (as ``state_dict()`` lists it): each copy is written to the one shared tensor. Sizes
    (K, label dtype, ellipse/outlier counts) follow the state dict, as ``load_state_dict`` does for these
    modules: on a DDP-wrapped model they must not change (DDP holds the parameters; load before wrapping)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got {_checks.describe(state_dict)}")
    target = unwrap(model)
    sd = _strip_prefixes(OrderedDict(state_dict.items()))
    sharded = _is_sharded(target)
    if target is not model or sharded:
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in sd.items() if isinstance(v, torch.Tensor)}
        need = _resize_plan(target, shapes, "")
        if need:
            what = "an FSDP2-sharded model" if sharded else f"a {type(model).__name__}"
            raise ValueError(f"state_dict: changes the sizes of {', '.join(need[:4])} inside {what}; "
                             f"load it into the plain model before wrapping")
    if sharded:
        return _load_sharded(target, sd, strict)
    return target.load_state_dict(sd, strict=strict)


def _load_sharded(model: nn.Module, sd, strict: bool):
    """A full state dict into an FSDP2-sharded model of the same sizes: each rank keeps its shards of the full
    tensors (every rank holds the full dict, as after ``torch.load``; no communication), a shared codebook is
    written once per key. (torch's ``set_model_state_dict`` distributes a shared tensor under its first name
    only and then fails on the second.) Then the modules' entry checks."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    cur = model.state_dict(keep_vars=True)
    missing = [k for k in cur if k not in sd]
    unexpected = [k for k in sd if k not in cur]
    if strict and (missing or unexpected):
        raise RuntimeError(f"state_dict: missing keys {missing[:6]}, unexpected keys {unexpected[:6]} for "
                           f"{type(model).__name__}")
    with torch.no_grad():
        for k, t in cur.items():
            if k not in sd:
                continue
            v = sd[k]
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"state_dict: {k!r} is a {type(v).__name__}, expected a tensor")
            if isinstance(v, DTensor):
                v = _full(v)
            if tuple(v.shape) != tuple(t.shape):
                raise ValueError(f"state_dict: {k!r} has shape {tuple(v.shape)}, the model {tuple(t.shape)}")
            v = v.to(device=t.device, dtype=t.dtype)
            if isinstance(t, DTensor):
                v = distribute_tensor(v, t.device_mesh, t.placements, src_data_rank=None)
            t.copy_(v)  # in place: parameters stay FSDP's, buffers bump their version (rng ids, bindings)
    _refresh_owners(model)
    _validate_sharded(model)
    return nn.modules.module._IncompatibleKeys(missing, unexpected)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def plain_model(model: nn.Module) -> nn.Module:
    """The plain model to save: ``model`` without DDP / compile wrappers and, when FSDP2-sharded, a replica made
    of the original classes with full parameters (gathered: a collective, every rank calls it) sharing the
    buffers, without hooks. Use the replica for saving only (``sws_kernels.save`` calls this)."""
    target = unwrap(model)
    if not isinstance(target, nn.Module) or not _is_sharded(target):
        return target
    fm, dt = _fsdp_module_type(), _dtensor_type()
    full: Dict[int, torch.Tensor] = {}
    memo: Dict[int, nn.Module] = {}

    def gather(p):
        if id(p) not in full:  # one gather per (shared) parameter, in module order on every rank
            t = _full(p) if isinstance(p, dt) else p
            full[id(p)] = nn.Parameter(t.detach(), requires_grad=p.requires_grad)
        return full[id(p)]

    def replica(m):
        if id(m) in memo:
            return memo[id(m)]
        cls = type(m)
        if isinstance(m, fm):  # fully_shard swapped the class to FSDP<Class>(FSDPModule, Class)
            cls = next(c for c in cls.__mro__[1:] if not issubclass(c, fm))
        c = object.__new__(cls)
        memo[id(m)] = c
        d = dict(m.__dict__)
        for h in _HOOK_DICTS:
            if h in d:
                d[h] = OrderedDict()
        d.pop("_sws_binding", None)
        d.pop("_mf_binding", None)
        d["_parameters"] = {k: None if p is None else gather(p) for k, p in m._parameters.items()}
        d["_buffers"] = dict(m._buffers)
        if isinstance(m, _snn._SWSLayer) and "labels" in d["_parameters"]:  # sharded with the layer: a buffer again
            d["_buffers"]["labels"] = d["_parameters"].pop("labels").detach()
            d["_entry_checks"] = True
        d["_modules"] = {k: None if s is None else replica(s) for k, s in m._modules.items()}
        c.__dict__.update(d)
        return c

    return replica(target)


def save(model: nn.Module, path, *, group=None):
    """``sws_kernels.save`` of a DDP-wrapped, compiled or FSDP2-sharded model, written by the group's rank 0
    only (the FSDP2 gather is a collective: every rank calls this). Returns the bytes written on rank 0,
    None elsewhere (and without a process group it is ``sws_kernels.save``)."""
    from . import io
    plain = plain_model(model)
    dist = _dist()
    if dist.is_initialized() and dist.get_rank(group) != 0:
        return None
    return io.save(plain, path)


def _validate_sharded(model: nn.Module) -> None:
    """The modules' entry checks on a sharded model's loaded values (parameters gathered meanwhile)."""
    with gathered(model):
        for path, m in model.named_modules():
            if isinstance(m, _snn._RngIdMixin):
                try:
                    m._validate()
                except (ValueError, TypeError) as e:
                    raise type(e)(f"{path or type(m).__name__}: {e}") from None


def _dcp():
    _dist()
    import torch.distributed.checkpoint as dcp
    return dcp


def save_dcp(model: nn.Module, checkpoint_id, **kwargs):
    """``torch.distributed.checkpoint.save`` of the plain model's state dict (no wrapper prefixes; FSDP2's
    DTensors saved sharded). Every rank calls it (or one process without a process group)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
    return _dcp().save(unwrap(model).state_dict(), checkpoint_id=checkpoint_id, **kwargs)


def _checkpoint_shapes(checkpoint_id=None, metadata=None, storage_reader=None):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    if metadata is None:
        if storage_reader is None:
            if checkpoint_id is None:
                raise ValueError("checkpoint_id: expected a checkpoint path (or metadata= / storage_reader=), got None")
            storage_reader = _dcp().FileSystemReader(checkpoint_id)
        metadata = storage_reader.read_metadata()
    return {k: (tuple(md.size), md.properties.dtype) for k, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}


_SWS_RESIZABLE = ("labels", "ellipse_pos", "ellipse_a", "ellipse_b", "ellipse_alpha", "outlier_pos", "outlier_mu0",
                  "outlier_sigma0")


def _resize_plan(model, shapes, prefix) -> List[str]:
    """Names of the tensors whose saved shape/dtype differs from the model's (the resizable ones only)."""
    out = []
    for path, m in model.named_modules():
        pre = prefix + (f"{path}." if path else "")
        if isinstance(m, _snn.Codebook):
            names = ("means", "chol", "means0", "chol0")
        elif isinstance(m, _snn._SWSLayer):
            names = _SWS_RESIZABLE + ("outlier_mu", "outlier_rho")
        else:
            continue
        for n in names:
            s = shapes.get(pre + n)
            t = getattr(m, n)
            if s is not None and (s[0] != tuple(t.shape) or s[1] != t.dtype):
                out.append(pre + n)
    return out


def resize_to_checkpoint(model: nn.Module, checkpoint_id=None, *, metadata=None, storage_reader=None,
                         prefix: str = "") -> List[str]:
    """The pre-resize step of a DCP load: give every codebook and SWS layer of ``model`` the checkpoint's
    sizes (K of each codebook, label dtype, ellipse and outlier counts), read from the checkpoint's metadata
    (``checkpoint_id`` a DCP directory, or ``metadata``/``storage_reader``). ``prefix`` is the key prefix of the
    model's entries in the checkpoint (``"model."`` when it was saved as ``{"model": state_dict, ...}``).
    The resized tensors are uninitialised until loaded. Returns the names of the resized tensors."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix: expected a str, got {_checks.describe(prefix)}")
    shapes = _checkpoint_shapes(checkpoint_id, metadata, storage_reader)
    target = unwrap(model)
    need = _resize_plan(target, shapes, prefix)
    if need and (target is not model or _is_sharded(target)):
        what = "FSDP2" if target is model else type(model).__name__
        raise ValueError(f"model: the checkpoint changes the sizes of {', '.join(need[:4])}: load it into the "
                         f"plain model before wrapping it in {what} (the wrapper holds the parameters)")
    if not need:
        return []
    for path, m in target.named_modules():  # codebooks first: their K sets the label dtype the layers check
        pre = prefix + (f"{path}." if path else "")
        if isinstance(m, _snn.Codebook) and (pre + "means") in shapes:
            (shape, dtype) = shapes[pre + "means"]
            if shape != tuple(m.means.shape) or dtype != m.means.dtype:
                K, dev = shape[0], m.means.device
                m._parameters["means"] = nn.Parameter(torch.empty(K, 2, device=dev, dtype=dtype),
                                                      requires_grad=m.means.requires_grad)
                c = shapes.get(pre + "chol", ((K, 3), dtype))
                m._parameters["chol"] = nn.Parameter(torch.empty(c[0], device=dev, dtype=c[1]),
                                                     requires_grad=m.chol.requires_grad)
                for n in ("means0", "chol0"):
                    s = shapes.get(pre + n, ((K, 2 if n == "means0" else 3), m._buffers[n].dtype))
                    m._buffers[n] = torch.empty(s[0], device=dev, dtype=s[1])
                m.num_components = K
    for path, m in target.named_modules():
        if not isinstance(m, _snn._SWSLayer):
            continue
        pre = prefix + (f"{path}." if path else "")
        dev = m.labels.device
        for n in _SWS_RESIZABLE:  # straight into the module dicts: the entry checks run after the load
            s = shapes.get(pre + n)
            if s is not None and (s[0] != tuple(m._buffers[n].shape) or s[1] != m._buffers[n].dtype):
                m._buffers[n] = torch.empty(s[0], device=dev, dtype=s[1])
        for n in ("outlier_mu", "outlier_rho"):
            s = shapes.get(pre + n)
            p = m._parameters[n]
            if s is not None and (s[0] != tuple(p.shape) or s[1] != p.dtype):
                numel = 1
                for d in s[0]:
                    numel *= d
                m._parameters[n] = nn.Parameter(torch.empty(s[0], device=dev, dtype=s[1]), requires_grad=numel > 0)
    return need


def load_dcp(model: nn.Module, checkpoint_id, *, prefix: str = "", **kwargs) -> nn.Module:
    """Load a DCP checkpoint written by :func:`save_dcp` (or ``dcp.save(model.state_dict())``) into ``model``,
    resizing its codebooks and SWS layers to the checkpoint first (:func:`resize_to_checkpoint`), then running
    the modules' entry checks on the loaded values. ``kwargs`` go to ``torch.distributed.checkpoint.load``.
    Returns the plain model."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix: expected a str, got {_checks.describe(prefix)}")
    dcp = _dcp()
    reader = kwargs.pop("storage_reader", None)
    resize_to_checkpoint(model, checkpoint_id, storage_reader=reader, prefix=prefix)
    target = unwrap(model)
    sd = target.state_dict()
    if prefix:
        wrapped = {}
        node = wrapped
        parts = prefix.rstrip(".").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = sd
        dcp.load(wrapped, checkpoint_id=checkpoint_id, storage_reader=reader, **kwargs)
    else:
        dcp.load(sd, checkpoint_id=checkpoint_id, storage_reader=reader, **kwargs)
    if _is_sharded(target):
        _refresh_owners(target)  # loaded in place (bindings follow their buffers' versions)
        _validate_sharded(target)
    else:
        target.load_state_dict(sd)  # the loaded tensors onto themselves: entry checks, rng ids, bindings
    return target


# ------------------------------------------------------------------------------------------------------
# FSDP2
# ------------------------------------------------------------------------------------------------------

def _gather_codebook(layer, args) -> None:
    """Forward pre-hook of an SWS layer under FSDP2: gather its codebook's unit (a no-op when gathered)."""
    cb = layer._modules.get("codebook")
    fm = _fsdp_module_type()
    if fm is not None and isinstance(cb, fm):
        cb.unshard()


def _labels_to_parameter(layer) -> None:
    """Make an SWS layer's labels a frozen parameter (``requires_grad=False``, same key in the state dict), so that
    FSDP2 shards them with the layer's unit and all-gathers them for its forward (FSDP2 gathers parameters of
    several dtypes as bytes). FSDP2 writes the sharded / gathered labels through ``setattr``: the layer's per-buffer
    entry checks are off from now on (they would read a sharded DTensor); the data checks still run when the layer
    is called (sws_kernels._checks, once per labels version) and the kernels stay memory-safe whatever the data."""
    if "labels" not in layer._buffers:
        return
    lab = layer._buffers.pop("labels")
    layer.__dict__["_entry_checks"] = False
    layer._parameters["labels"] = nn.Parameter(lab, requires_grad=False)


def fully_shard(model: nn.Module, *, units=(), reshard_after_forward=None, independent: bool = False, group=None,
                shard_labels: bool = True, **kwargs) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over ``model`` with the wrap rule of the module docstring:
    each codebook, then each SWS / mean-field layer, then each of ``units`` (modules containing layers, e.g.
    transformer blocks; ``reshard_after_forward`` applies to them and the root), then the root. ``kwargs``
    (``mesh``, ``mp_policy``, ``offload_policy``, ...) go to every ``fully_shard`` call. Before sharding, the
    ranks of ``group`` (default: all) are checked for the same noise streams unless ``independent`` (see
    :func:`check_consistency`; again on the first forward) and the constant buffers are broadcast from its rank
    0. A collective. Returns ``model`` (sharded in place, as ``fully_shard`` does)."""
    _dist()
    from torch.distributed.fsdp import fully_shard as _fs
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_checks.describe(model)}")
    if not isinstance(independent, bool):
        raise TypeError(f"independent: expected a bool, got {_checks.describe(independent)}")
    if not isinstance(shard_labels, bool):
        raise TypeError(f"shard_labels: expected a bool, got {_checks.describe(shard_labels)}")
    if unwrap(model) is not model:
        raise ValueError(f"model: expected the plain model, got a {type(model).__name__}")
    if _is_sharded(model):
        raise ValueError("model: already sharded with FSDP2 (fully_shard it once, from the plain model)")
    units = list(units)
    mods = set(map(id, model.modules()))
    for u in units:
        if not isinstance(u, nn.Module) or id(u) not in mods:
            raise ValueError(f"units: expected submodules of model, got {_checks.describe(u)}")
    _require_group(group)
    if independent:
        _check_sizes(model, group)
    else:
        check_consistency(model, group=group, where="when sharding")
    sync_buffers(model, group=group)
    seen = set()
    for m in model.modules():
        if isinstance(m, _snn.Codebook) and id(m) not in seen:
            seen.add(id(m))
            _fs(m, reshard_after_forward=False, **kwargs)
    for m in list(model.modules()):
        if isinstance(m, _snn._RngIdMixin) and not isinstance(m, _snn.Codebook) and id(m) not in seen:
            seen.add(id(m))
            if shard_labels and isinstance(m, _snn._SWSLayer):
                _labels_to_parameter(m)  # sharded with the layer (module docstring, rule 2)
            _fs(m, reshard_after_forward=False, **kwargs)  # see the module docstring, rule 2
            if isinstance(m, _snn._SWSLayer):
                m.register_forward_pre_hook(_gather_codebook)
    for u in units:
        if id(u) not in seen:
            seen.add(id(u))
            _fs(u, reshard_after_forward=reshard_after_forward, **kwargs)
    if id(model) not in seen:
        _fs(model, reshard_after_forward=reshard_after_forward, **kwargs)
    if not independent:
        def first_forward_check(module, args):
            handle.remove()
            check_consistency(model, group=group, where="on the first forward")

        handle = model.register_forward_pre_hook(first_forward_check, prepend=True)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Inside: every FSDP2 unit of ``model`` gathered (its parameters plain full tensors, e.g. for
    ``sws_kernels.kl_loss`` between steps); resharded on exit. A collective: every rank enters it. A model
    without FSDP2 units passes through unchanged."""
    fm = _fsdp_module_type()
    mods = [m for m in unwrap(model).modules() if fm is not None and isinstance(m, fm)]
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()


# ------------------------------------------------------------------------------------------------------
# Tensor parallelism (issue 18 item 5)
# ------------------------------------------------------------------------------------------------------

TP_STYLES = ("colwise", "rowwise")


def _chunk_bounds(size: int, world: int, rank: int) -> Tuple[int, int]:
    """[lo, hi) of ``rank``'s part of a dimension of ``size`` split over ``world`` ranks as ``torch.chunk`` (and
    DTensor's ``Shard``) split it: chunks of ceil(size / world), the last ones shorter."""
    c = -(-size // world)
    lo = min(size, rank * c)
    return lo, min(size, lo + c)


class TensorParallelInfo:
    """What a tensor-parallel shard of a Linear layer holds: ``style`` ("colwise": output rows [r0, r1) of every
    input column; "rowwise": input columns [c0, c1) of every output row), the ``mesh`` and its process ``group``,
    the unsharded sizes ``in_global`` x ``out_global``, and the shard's global element mapping (``elem_offset``,
    ``row_stride``; sws_kernels.reference.element_map)."""

    __slots__ = ("style", "mesh", "group", "rank", "world", "in_global", "out_global", "r0", "r1", "c0", "c1",
                 "use_local_output")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw[k])

    @property
    def elem_offset(self) -> int:
        return self.r0 * self.in_global + self.c0

    @property
    def row_stride(self) -> int:
        return self.in_global

    def __repr__(self) -> str:
        return (f"TensorParallelInfo({self.style}, rank {self.rank}/{self.world}, rows [{self.r0}, {self.r1}) x "
                f"columns [{self.c0}, {self.c1}) of {self.out_global} x {self.in_global})")


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; the gradient summed over the group in backward (a replicated tensor read by every rank's
    shard: the codebook, a colwise layer's input)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        _dist().all_reduce(g, group=ctx.group)
        return g, None


class _AllReduceSum(torch.autograd.Function):
    """The rowwise partial outputs summed over the group; the (replicated) gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, t, group):
        t = t.contiguous().clone()
        _dist().all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, g):
        return g, None


def _tp_grad_sum(t, group):
    return _AllReduceGrad.apply(t, group) if torch.is_grad_enabled() and t.requires_grad else t


def _tp_input(tp: TensorParallelInfo, x, local_in: int):
    """The layer's local input: a DTensor is redistributed to the style's layout (colwise: Replicate, rowwise:
    Shard(-1)) and its local tensor taken; a plain tensor is taken as that local tensor already (as PyTorch's
    ColwiseParallel / RowwiseParallel take plain inputs)."""
    dt = _dtensor_type()
    if dt is not None and isinstance(x, dt):
        from torch.distributed.tensor import Replicate, Shard
        want = (Replicate(),) if tp.style == "colwise" else (Shard(x.dim() - 1),)
        if tuple(x.placements) != want:
            x = x.redistribute(tp.mesh, want)
        x = x.to_local()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor or DTensor, got {_checks.describe(x)}")
    if x.dim() < 1 or x.shape[-1] != local_in:
        what = "the full in_features" if tp.style == "colwise" else f"this rank's columns [{tp.c0}, {tp.c1})"
        raise ValueError(f"x: expected a last dimension of {local_in} ({what}), got {_checks.describe(x)}")
    if tp.style == "colwise":  # every rank reads all of x: its gradient is the sum of the ranks' parts
        x = _tp_grad_sum(x, tp.group)
    return x


def _tp_output(tp: TensorParallelInfo, y):
    if tp.use_local_output:
        return y
    from torch.distributed.tensor import DTensor, Replicate, Shard
    y = y.contiguous()
    if tp.style == "rowwise":
        return DTensor.from_local(y, tp.mesh, (Replicate(),), run_check=False)
    shape = (*y.shape[:-1], tp.out_global)
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= d
    return DTensor.from_local(y, tp.mesh, (Shard(y.dim() - 1),), run_check=False, shape=torch.Size(shape),
                              stride=tuple(reversed(stride)))


def _bias_view(b, y):
    return b.reshape(b.shape[0] if b.dim() == 2 else 1, *([1] * (y.dim() - 2)), b.shape[-1]).to(y.dtype)


class _TPSWSLinear:
    """Forward of a tensor-parallel SWSLinear shard (mixed in front of the layer's class by :func:`parallelize_linear`):
    the general functional path (not the layers' steady-state bindings) with the shard's element mapping."""

    def forward(self, x, samples=None, seed=None, *, per_sample: bool = False, return_kl=None):
        samples, return_kl = self._split_samples(samples, return_kl)
        tp = self._tp
        xl = _tp_input(tp, x, self.in_features)
        cb = self.codebook
        means, chol = _tp_grad_sum(cb.means, tp.group), _tp_grad_sum(cb.chol, tp.group)
        rowwise = tp.style == "rowwise"

        def call(xx, S, sd, ps):
            y = _SF().sws_linear(xx, means, chol, self.labels, self._ellipse(), self._outliers(),
                                 None if rowwise else self.bias, seed=sd, samples=S, mode=self.mode, owner=self.owner,
                                 codebook_owner=cb.owner, per_sample=ps, elem_offset=tp.elem_offset,
                                 row_stride=tp.row_stride)
            if rowwise:  # partial sums over this rank's columns; the (replicated) bias once, after the sum
                y = _AllReduceSum.apply(y, tp.group)
                if self.bias is not None:
                    y = y + _bias_view(self.bias, y)
            return y

        return self._contract(_tp_output(tp, _snn._run_sampled(xl, samples, seed, per_sample, call)), return_kl)

    def sample_weights(self, *, samples: int = 1, seed=None, mode=None):
        """This shard's sampled weights [samples, rows, columns]: its block of the unsharded layer's."""
        cb = self.codebook
        seed = _snn.draw_seed(cb.means.device) if seed is None else seed
        return _SF().reconstruct(cb.means, cb.chol, self.labels, self._ellipse(), self._outliers(), seed=seed,
                                 samples=samples, mode=self.mode if mode is None else mode, owner=self.owner,
                                 codebook_owner=cb.owner, elem_offset=self._tp.elem_offset,
                                 row_stride=self._tp.row_stride)

    def kl_loss(self):
        """The outlier KL of the whole (unsharded) layer: this shard's summed over the mesh. A collective."""
        return _AllReduceSum.apply(super().kl_loss(), self._tp.group)


class _TPMeanFieldLinear:
    """Forward of a tensor-parallel MeanFieldLinear shard (see :class:`_TPSWSLinear`). The sampled bias draws the
    bias stream (purpose 2) at its global output rows: a colwise shard samples its rows in its op, a rowwise shard
    (bias replicated) adds the whole sampled bias once, after the all-reduce."""

    def forward(self, x, return_kl: bool = True, *, samples=None, seed=None, per_sample: bool = False):
        if self.estimator != "reparameterization":
            raise ValueError(f"estimator: a tensor-parallel shard supports 'reparameterization' only, got "
                             f"{self.estimator!r}")
        tp = self._tp
        xl = _tp_input(tp, x, self.in_features)
        rowwise = tp.style == "rowwise"

        def call(xx, S, sd, ps):
            y = _SF().mean_field_linear(xx, self.mu_weight, self.rho_weight, None if rowwise else self.mu_bias,
                                        None if rowwise else self.rho_bias, seed=sd, samples=S, owner=self.owner,
                                        per_sample=ps, elem_offset=tp.elem_offset, row_stride=tp.row_stride)
            if rowwise:
                y = _AllReduceSum.apply(y, tp.group)
                if self.mu_bias is not None:
                    from . import reference as _ref
                    y = y + _bias_view(_ref.mean_field_bias(self.mu_bias, self.rho_bias, seed=sd, samples=S,
                                                            owner=self.owner), y)
            return y

        out = _tp_output(tp, _snn._run_sampled(xl, samples, seed, per_sample, call))
        if return_kl and not self._dnn_to_bnn_flag:
            return out, self.kl_loss()
        return out

    def sample_weights(self, *, samples: int = 1, seed=None):
        """This shard's sampled weights [samples, rows, columns]: its block of the unsharded layer's."""
        seed = _snn.draw_seed(self.weight_mu.device) if seed is None else seed
        return _SF().mean_field_reconstruct(self.weight_mu, self.weight_rho, seed=seed, samples=samples,
                                            owner=self.owner, elem_offset=self._tp.elem_offset,
                                            row_stride=self._tp.row_stride)

    # The KLs of the whole (unsharded) layer, from the shards' sums over the mesh (collectives: every rank calls
    # them). A rowwise layer's bias is whole on every rank: counted once, not summed.
    def _tp_kl_parts(self, fn):
        from . import reference as _ref
        tp = self._tp
        w = fn(_ref, self.weight_mu, self.weight_rho, self.prior_weight_mu, self.prior_weight_sigma)
        b = None
        if self.mu_bias is not None:
            b = fn(_ref, self.mu_bias, self.rho_bias, self.prior_bias_mu, self.prior_bias_sigma)
        if tp.style == "colwise" and b is not None:
            return _AllReduceSum.apply(w + b, tp.group), None
        return _AllReduceSum.apply(w, tp.group), b

    def kl_sum(self):
        w, b = self._tp_kl_parts(lambda r, *a: r.kl_gaussian(*a))
        return w if b is None else w + b

    def kl_loss(self):
        """bayesian-torch's per-tensor means over the unsharded weight (and bias), as the unsharded layer's."""
        tp = self._tp
        if tp.style == "colwise" or self.mu_bias is None:
            w = _AllReduceSum.apply(_kl_terms_sum(self.weight_mu, self.weight_rho, self.prior_weight_mu,
                                                  self.prior_weight_sigma), tp.group) / (tp.in_global * tp.out_global)
            if self.mu_bias is None:
                return w
            b = _AllReduceSum.apply(_kl_terms_sum(self.mu_bias, self.rho_bias, self.prior_bias_mu,
                                                  self.prior_bias_sigma), tp.group) / tp.out_global
            return w + b
        from . import reference as _ref
        w = _AllReduceSum.apply(_kl_terms_sum(self.weight_mu, self.weight_rho, self.prior_weight_mu,
                                              self.prior_weight_sigma), tp.group) / (tp.in_global * tp.out_global)
        return w + _ref.kl_gaussian_mean(self.mu_bias, self.rho_bias, self.prior_bias_mu, self.prior_bias_sigma)


def _kl_terms_sum(mu, rho, mu0, sigma0):
    from . import reference as _ref
    return _ref.kl_gaussian(mu, rho, mu0, sigma0)


def _SF():
    from . import functional
    return functional


_TP_CLASSES: Dict[type, type] = {}


def _tp_class(cls: type) -> type:
    """``TP<Class>(mixin, Class)``, as fully_shard makes ``FSDP<Class>``: isinstance checks keep working."""
    if cls not in _TP_CLASSES:
        mixin = _TPSWSLinear if issubclass(cls, _snn.SWSLinear) else _TPMeanFieldLinear
        _TP_CLASSES[cls] = type(f"TP{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    return _TP_CLASSES[cls]


def _cut(pos, IN, r0, r1, c0, c1):
    r, c = torch.div(pos, IN, rounding_mode="floor"), pos % IN
    m = (r >= r0) & (r < r1) & (c >= c0) & (c < c1)
    return m, (r[m] - r0) * (c1 - c0) + (c[m] - c0)


def _shard_sws(layer, r0, r1, c0, c1, colwise: bool) -> None:
    IN = layer.in_features
    me, e_pos = _cut(layer.ellipse_pos, IN, r0, r1, c0, c1)
    mo, o_pos = _cut(layer.outlier_pos, IN, r0, r1, c0, c1)
    keep = int(mo.sum())
    layer._entry_checks = False  # the buffers change shape together: checked once, at the end
    try:
        layer.weight_shape = (r1 - r0, c1 - c0)
        layer.labels = layer.labels[r0:r1, c0:c1].contiguous()
        layer.ellipse_pos = e_pos
        for n in ("ellipse_a", "ellipse_b", "ellipse_alpha"):
            setattr(layer, n, getattr(layer, n)[me].clone())
        layer.outlier_pos = o_pos
        for n in ("outlier_mu", "outlier_rho"):
            p = getattr(layer, n)
            setattr(layer, n, nn.Parameter(p.detach()[mo].clone(), requires_grad=keep > 0))
        for n in ("outlier_mu0", "outlier_sigma0"):
            setattr(layer, n, getattr(layer, n)[mo].clone())
        if colwise and layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach()[r0:r1].clone(), requires_grad=layer.bias.requires_grad)
    finally:
        layer._entry_checks = True
    layer.in_features, layer.out_features = c1 - c0, r1 - r0
    layer.codebook.__dict__.pop("_nw_cache", None)  # its users' weight counts changed


def _shard_mean_field(layer, r0, r1, c0, c1, colwise: bool) -> None:
    for n in (layer._w_mu, layer._w_rho):
        p = getattr(layer, n)
        setattr(layer, n, nn.Parameter(p.detach()[r0:r1, c0:c1].clone(), requires_grad=p.requires_grad))
    if colwise and layer.mu_bias is not None:
        for n in ("mu_bias", "rho_bias"):
            p = getattr(layer, n)
            setattr(layer, n, nn.Parameter(p.detach()[r0:r1].clone(), requires_grad=p.requires_grad))
    layer.in_features, layer.out_features = c1 - c0, r1 - r0


def parallelize_linear(layer: nn.Module, mesh, style: str = "colwise", *, use_local_output: bool = False,
                       check: bool = True) -> nn.Module:
    """Shard an :class:`~sws_kernels.nn.SWSLinear` or :class:`~sws_kernels.nn.MeanFieldLinear` over a 1-D device
    mesh, in place, the way PyTorch's ``ColwiseParallel`` / ``RowwiseParallel`` shard ``nn.Linear``:

    * ``"colwise"``: this rank keeps output rows [r0, r1) (``torch.chunk`` of out_features over the mesh) of the
      labels / mean-field mu and rho, the bias entries of those rows, and the ellipse and outlier weights among
      them (positions re-indexed to the shard). Input: a replicated DTensor (or a plain tensor, taken as this
      rank's replica); output: a DTensor sharded on its last dimension.
    * ``"rowwise"``: input columns [c0, c1) of every row; the bias stays whole (replicated) and is added once,
      after the partial outputs are summed over the mesh (an all-reduce). Input: a DTensor sharded on its last
      dimension (or a plain tensor: this rank's columns); output: a replicated DTensor.

    ``use_local_output=True`` returns the local tensor instead of the DTensor. Every shard draws exactly the noise
    of its weights in the unsharded layer (the global element mapping of the RNG contract, SPEC.md section 4;
    the mean-field bias stream at its global output rows), so with the same seed the sharded layer gives the
    unsharded layer's output and gradients. The codebook stays whole on every rank; its gradient (and a colwise
    layer's input gradient) is summed over the mesh in backward, so replicated parameters stay identical.

    Build the layer identically on every rank (as for FSDP2); ``check`` runs :func:`check_consistency` on it (same
    ``rng_id``, same default generators: the same seeds drawn) and broadcasts its constant buffers from the
    mesh's rank 0. A collective. The layer then takes the functional path (the steady-state bindings of
    ``sws_kernels._bound`` are for unsharded layers). Its ``kl_loss()`` (and a mean-field layer's ``kl_sum()``) is
    the unsharded layer's, summed over the shards (a collective: every rank calls it, as ``sws_kernels.kl_loss`` /
    ``elbo_loss`` do); the codebook's KL is whole on every rank. Returns ``layer``."""
    dist = _dist()
    if not isinstance(layer, (_snn.SWSLinear, _snn.MeanFieldLinear)):
        raise TypeError(f"layer: expected a sws_kernels.nn.SWSLinear or MeanFieldLinear, got {_checks.describe(layer)}")
    if getattr(layer, "_tp", None) is not None:
        raise ValueError(f"layer: already tensor-parallel ({layer._tp})")
    if style not in TP_STYLES:
        raise ValueError(f"style: expected one of {TP_STYLES}, got {style!r}")
    if not isinstance(use_local_output, bool):
        raise TypeError(f"use_local_output: expected a bool, got {_checks.describe(use_local_output)}")
    from torch.distributed.device_mesh import DeviceMesh
    if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
        raise TypeError(f"mesh: expected a 1-D torch.distributed.device_mesh.DeviceMesh, got {_checks.describe(mesh)}")
    if isinstance(layer, _snn.MeanFieldLinear) and layer.estimator != "reparameterization":
        raise ValueError(f"layer: a tensor-parallel MeanFieldLinear needs estimator='reparameterization', got "
                         f"{layer.estimator!r}")
    _require_group(None)
    group = mesh.get_group()
    rank, world = mesh.get_local_rank(), mesh.size()
    OUT, IN = layer.out_features, layer.in_features
    colwise = style == "colwise"
    split = OUT if colwise else IN
    if split < world:
        what = "out_features" if colwise else "in_features"
        raise ValueError(f"layer: {style} sharding splits {what} = {split} over {world} ranks: every rank needs at "
                         f"least one (expected {what} >= {world})")
    if check:
        check_consistency(layer, group=group, where="when parallelizing")
        sync_buffers(layer, group=group)
    r0, r1 = _chunk_bounds(OUT, world, rank) if colwise else (0, OUT)
    c0, c1 = (0, IN) if colwise else _chunk_bounds(IN, world, rank)
    info = TensorParallelInfo(style=style, mesh=mesh, group=group, rank=rank, world=world, in_global=IN,
                              out_global=OUT, r0=r0, r1=r1, c0=c0, c1=c1, use_local_output=use_local_output)
    with torch.no_grad():
        if isinstance(layer, _snn.SWSLinear):
            _shard_sws(layer, r0, r1, c0, c1, colwise)
        else:
            _shard_mean_field(layer, r0, r1, c0, c1, colwise)
    for k in ("_sws_binding", "_mf_binding"):
        layer.__dict__.pop(k, None)
    layer._tp = info
    layer.__class__ = _tp_class(type(layer))
    layer._validate()
    return layer


def parallelize(model: nn.Module, mesh, plan: Dict[str, str], **kwargs) -> nn.Module:
    """:func:`parallelize_linear` on the submodules of ``model`` named in ``plan`` (``{"fc1": "colwise", "fc2":
    "rowwise"}``, the usual Megatron pairing: the colwise layer's sharded output is the rowwise layer's sharded
    input, with elementwise ops in between). ``kwargs`` go to every call. Returns ``model``."""
    if not isinstance(plan, dict):
        raise TypeError(f"plan: expected a dict of submodule name -> style, got {_checks.describe(plan)}")
    for name, style in plan.items():
        try:
            sub = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"plan: {name!r} is not a submodule of the model") from None
        parallelize_linear(sub, mesh, style, **kwargs)
    return model
