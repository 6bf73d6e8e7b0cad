"""Modules: the SWS codebook and layers, and bayesian-torch-compatible mean-field layers (SPEC.md sections 2-6).

Every layer calls :mod:`sws_kernels.functional`, so it runs on whatever backend is selected.

Sampling protocol
-----------------
``layer(x)`` draws one sample and returns the usual shape (a drop-in replacement).
``layer(x, samples=S)`` returns a leading sample dimension ``[S, ...]``; with ``per_sample=True`` the input
already has it (one input slice per sample). ``seed=None`` draws a 64-bit seed from PyTorch's default
generator, so ``torch.manual_seed`` makes a run reproducible; pass an int or an int64 tensor to fix it.

Whole-model S-sample passes (:func:`sws_kernels.predict`) use :func:`sample_mode`: inside it every
Bayesian layer receives the batch with the S samples *folded into the batch dimension* (``[S*N, ...]``),
unfolds it to ``[S, N, ...]``, applies sample s's weights to slice s (``per_sample=True``) and folds the
result back. Non-Bayesian modules in between (activations, pooling, flatten, BatchNorm in eval mode) then
see an ordinary, larger batch and need no change. All layers use the same seed inside one pass; their
noise streams differ through their ``rng_id`` (the Philox ``owner`` word), so they are independent.

Noise streams and ``rng_id``
----------------------------
Each codebook and layer owns a 32-bit ``rng_id`` (SPEC.md section 2), saved in its state_dict as an int64
buffer. By default ids come from a process-wide counter, so they are distinct within a process and equal
across processes that build the same model in the same order (e.g. DDP ranks); pass ``rng_id=`` to pin one.

Seeds across processes (DDP)
----------------------------
With ``seed=None`` every layer draws its seed from PyTorch's default generator. Ranks seeded alike
(``torch.manual_seed(same)``) therefore draw the same seeds and use the same weight sample on their
shards of the batch: DDP's averaged gradient then equals one process's gradient on the combined batch
(tests/test_integration.py). Seed ranks differently (e.g. ``torch.manual_seed(base + rank)``) to use one
independent weight sample per rank instead (more samples per step, a different estimator).
:func:`sws_kernels.distributed.ddp` and :func:`sws_kernels.distributed.fully_shard` (FSDP2) check at wrap time
and on the first forward that every rank has the same ``rng_id``\s and generator state (``independent=True``
for the per-rank samples) and work with any codebook size (int16 labels included).

Forward contract and KL (SPEC.md sections 6 and 8.7)
----------------------------------------------------
Mean-field layers follow bayesian-torch: ``forward(x, return_kl=True)`` returns ``(out, kl)`` (kl in its
per-tensor-mean convention), only ``out`` with ``return_kl=False`` or when ``dnn_to_bnn_flag`` is set.
SWS layers built directly return a bare tensor; ``return_kl=True`` (constructor attribute or forward
keyword) makes them return ``(out, kl)`` too, and ``to_sws`` sets it (and copies ``dnn_to_bnn_flag``) on
every layer it puts in place of a mean-field layer, so the model's code keeps working unchanged. The KL
an SWS layer returns is SPEC's summed KL of its outliers plus its share of its codebook's KL:
``KL_layer = KL(outliers) + KL(codebook) * n_layer / n_codebook`` with ``n_layer`` the layer's weight
count and ``n_codebook`` the weight count of every live SWS layer using that codebook. The shares sum to
one, so the KLs the layers of a model return add up to :func:`sws_kernels.kl_loss` and to bayesian-torch's
``get_kl_loss(model)`` (which sums ``kl_loss()``: each codebook once, each SWS layer's outliers), the
codebook counted exactly once. (This holds when every layer using a codebook is in the model.)

Codebook sharing and state_dict
-------------------------------
A layer registers its codebook as a submodule. When several layers share one codebook, PyTorch's
``parameters()`` and ``modules()`` yield it once (so optimisers and :func:`sws_kernels.kl_loss` see it
once), while ``state_dict()`` lists it under every layer's prefix (``fc1.codebook.means``,
``fc2.codebook.means``, ...) with identical values; loading writes the same tensor several times, which
is harmless. :func:`sws_kernels.save` stores each shared tensor only once.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import _bound, _checks, functional as SF, philox as _philox
from . import reference as _ref

__all__ = [
    "Codebook", "SWSLinear", "SWSConv1d", "SWSConv2d", "SWSConv3d", "SWSConvTranspose1d", "SWSConvTranspose2d",
    "SWSConvTranspose3d", "MeanFieldLinear", "MeanFieldConv1d", "MeanFieldConv2d", "MeanFieldConv3d",
    "MeanFieldConvTranspose1d", "MeanFieldConvTranspose2d", "MeanFieldConvTranspose3d",
    "sample_mode", "label_dtype", "softplus_inv", "SWS_LAYERS", "MEAN_FIELD_LAYERS",
]

_RNG_COUNTER = itertools.count(1)
# Philox stream purposes of the flipout estimator's random signs (SPEC.md section 3 uses 0-2), owner = layer id.
_PURPOSE_FLIP_IN = 3
_PURPOSE_FLIP_OUT = 4
# codebook -> the SWS layers that use it (weak on both sides: a discarded layer or codebook drops out).
# It gives each layer its share of the codebook's KL (see "Forward contract and KL" above).
_CODEBOOK_USERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _register_user(codebook, layer) -> None:
    users = _CODEBOOK_USERS.get(codebook)
    if users is None:
        users = _CODEBOOK_USERS[codebook] = weakref.WeakSet()
    users.add(layer)
# The active sample_mode as (samples, seed) or None. A plain module global rather than a ContextVar:
# torch.compile reads (and guards on) a global without a graph break, ContextVar.get breaks the graph.
_FOLD = None


def _next_rng_id() -> int:
    return next(_RNG_COUNTER) & 0xFFFFFFFF


def _check_rng_id(rng_id) -> int:
    if rng_id is None:
        return _next_rng_id()
    return _checks.word(rng_id, "rng_id")


def draw_seed(device=None) -> torch.Tensor:
    """A 64-bit seed as a 0-dim int64 tensor (the uint64 seed's bits, SPEC.md section 4) drawn with PyTorch's
    generator on ``device`` (the parameters' device): reproducible under ``torch.manual_seed``, never read on
    the host (no sync), traced by torch.compile as an op, and under CUDA-graph capture drawn from the graph-safe
    generator, so every replay gets a fresh seed."""
    # randint's upper bound is exclusive and must fit int64: every int64 but the largest is a seed.
    return torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64, device=device)


def softplus_inv(y: torch.Tensor) -> torch.Tensor:
    """rho with softplus(rho) = y (y > 0), stable for small and large y."""
    y = torch.as_tensor(y, dtype=torch.float32)
    return y + torch.log(-torch.expm1(-y))


def label_dtype(num_components: int) -> torch.dtype:
    """The narrowest integer dtype that holds every label in [0, K): uint8, int16 or int32."""
    if num_components <= 256:
        return torch.uint8
    if num_components <= 32768:
        return torch.int16
    return torch.int32


@contextlib.contextmanager
def sample_mode(samples: int, seed=None, *, batch: Optional[int] = None, shared=None):
    """Run a model with S weight samples in one pass: inputs to every Bayesian layer are ``[S*N, ...]``.

    The caller repeats the model input S times along the batch dimension (``x.repeat(S, 1, ...)``) and
    unfolds the output with ``y.view(S, N, ...)``; :func:`sws_kernels.predict` does both. The mode is a
    process-wide setting (not per thread): do not run predictions from several threads at once.

    ``batch`` (N, optional; :func:`sws_kernels.predict` passes it) lets sequence-first models work: a linear
    layer whose input's dim 0 is not S*N but whose dim 1 is (e.g. an FFN inside a ``batch_first=False``
    transformer, [L, S*N, E]) unfolds the samples from dim 1. Without it the samples are always on dim 0.

    ``shared`` (optional; :func:`sws_kernels.predict` passes it): ``(folded, x)``, the folded model input and the
    batch it repeats. A layer whose input *is* ``folded`` (the model's first Bayesian layer) then makes one call
    with x shared by the S samples instead of S identical slices: the same numbers up to float summation order,
    and the shared-input paths apply (the label-histogram path of an SWS linear layer, issue 14).
    """
    global _FOLD
    samples = _checks.samples(samples)
    if batch is not None:
        batch = samples * _positive_int(batch, "batch")
    if shared is not None:
        if (not isinstance(shared, tuple) or len(shared) != 2 or not all(isinstance(t, torch.Tensor) for t in shared)
                or shared[0].dim() < 1 or shared[1].dim() < 1 or shared[0].shape[0] != samples * shared[1].shape[0]
                or shared[0].shape[1:] != shared[1].shape[1:]):
            raise ValueError(f"shared: expected (folded, x) with folded = x repeated {samples} times along dim 0, "
                             f"got {_checks.describe(shared)}")
    seed = draw_seed() if seed is None else seed
    previous, _FOLD = _FOLD, (samples, seed, batch, shared)
    try:
        yield seed
    finally:
        _FOLD = previous


def _positive_int(v, name: str) -> int:
    if not _checks.is_int(v):
        raise TypeError(f"{name}: expected a positive int, got {_checks.describe(v)}")
    v = int(v)  # a NumPy integer too
    if v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v}")
    return v


def _tuple(v, n: int, name: str) -> Tuple[int, ...]:
    if _checks.is_int(v):  # a NumPy integer too
        return (int(v),) * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(_checks.is_int(t) for t in v):
        return tuple(int(t) for t in v)
    raise TypeError(f"{name}: expected an int or a tuple of {n} ints, got {_checks.describe(v)}")


def _check_padding_mode(padding_mode: str) -> str:
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise ValueError(f"padding_mode: expected 'zeros', 'reflect', 'replicate' or 'circular', got {padding_mode!r}")
    return padding_mode


def _set_conv_hparams(mod, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                      padding_mode) -> None:
    """Validate and store nn.ConvNd's hyper-parameters on an SWS or mean-field conv (``mod._spatial`` dims)."""
    n = mod._spatial
    mod.in_channels = _positive_int(in_channels, "in_channels")
    mod.out_channels = _positive_int(out_channels, "out_channels")
    mod.groups = _positive_int(groups, "groups")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups: expected a divisor of in_channels={in_channels} and "
                         f"out_channels={out_channels}, got {groups}")
    mod.kernel_size = _tuple(kernel_size, n, "kernel_size")
    mod.stride = _tuple(stride, n, "stride")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding: expected an int, a tuple, 'same' or 'valid', got {padding!r}")
        mod.padding = padding
    else:
        mod.padding = _tuple(padding, n, "padding")
    mod.dilation = _tuple(dilation, n, "dilation")
    mod.padding_mode = _check_padding_mode(padding_mode)


def _explicit_pad(x, padding_mode, padding, kernel_size, dilation):
    """nn.ConvNd's non-zero padding modes: pad the input explicitly, then convolve with padding 0."""
    n = len(kernel_size)
    if padding == "valid":
        return x, 0
    if padding == "same":
        pads = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in padding]
    flat = []
    for left, right in reversed(pads):  # F.pad wants the last dimension first
        flat += [left, right]
    lead = x.shape[:-(n + 1)]
    # F.pad's reflect/replicate/circular accept one or two leading dims: merge samples and batch.
    xx = x.reshape(-1, *x.shape[-(n + 1):])
    xx = torch.nn.functional.pad(xx, flat, mode=padding_mode)
    return xx.reshape(*lead, *xx.shape[1:]), 0


_CONV_OPS = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
_CONV_T_OPS = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
               3: torch.nn.functional.conv_transpose3d}


def _conv1(layer, x, w, b):
    """One sample's conv of a conv layer with zero padding: ``w`` its kernel [out, in/g, *k] (no sample
    dimension), the checks and the vendor call of ``functional._conv_all_samples`` at S = 1 (whose grouped-conv
    reshapes are identities there: the same call, the same numbers) without its ~10 view ops."""
    spatial = layer._spatial
    _checks.conv_x(x, 1, False, spatial, w.device)
    _checks.conv_input(x, w.shape, layer.groups, layer.padding, layer.dilation, spatial)
    return _CONV_OPS[spatial](x, w.to(x.dtype), None if b is None else b.to(x.dtype), layer.stride, layer.padding,
                              layer.dilation, layer.groups)


def _vendor_conv_all_samples(transposed: bool, spatial: int, x, w, bias, stride, padding, dilation, groups,
                             output_padding, per_sample: bool):
    """S sampled kernels ``w`` [S, *weight_shape] applied by ONE vendor call (F.convNd / F.conv_transposeNd).

    The grouped-conv trick: with x shared, the samples are stacked along each group's output channels (the
    convolution's weight [S*out, in/g, ...] interleaved per group as [g, S, out/g]; the transposed one's
    [in, S*out/g, ...]); with per-sample x [S, N, C, ...] the samples go to the channel axis and S*groups
    groups pair every input slice with its own kernels. -> [S, N, out, *spatial_out].
    """
    S = w.shape[0]
    _checks.conv_x(x, S, per_sample, spatial, w.device)
    w = w.to(x.dtype)
    kshape = w.shape[3:]
    g = groups
    if transposed:
        in_c, out_g = w.shape[1], w.shape[2]
        out_c = out_g * g
        op = _CONV_T_OPS[spatial]

        def run(xx, ww, bb, groups_):
            return op(xx, ww, bb, stride, padding, output_padding, groups_, dilation)
    else:
        out_c, in_g = w.shape[1], w.shape[2]
        in_c, out_g = in_g * g, w.shape[1] // g
        op = _CONV_OPS[spatial]

        def run(xx, ww, bb, groups_):
            return op(xx, ww, bb, stride, padding, dilation, groups_)
    want_c = in_c
    if x.shape[-spatial - 1] != want_c:
        raise ValueError(f"x: expected {want_c} input channels, got {_checks.describe(x)}")
    if bias is not None:
        bias = bias.to(x.dtype)
        bias = bias if bias.dim() == 2 else bias.expand(S, -1)
    if per_sample:
        N = x.shape[1]
        xs = x.transpose(0, 1).reshape(N, S * in_c, *x.shape[3:])
        y = run(xs, w.reshape(S * w.shape[1], *w.shape[2:]), None if bias is None else bias.reshape(-1), S * g)
        return y.view(N, S, out_c, *y.shape[2:]).transpose(0, 1)
    if transposed:  # [S, in, out/g, k] -> [in, S * out/g, k]: group j's rows still see group j's inputs
        wg = w.transpose(0, 1).reshape(in_c, S * out_g, *kshape)
    else:           # [S, out, in/g, k] -> [g, S, out/g, in/g, k] -> [S*out, in/g, k]
        wg = w.reshape(S, g, out_g, *w.shape[2:]).transpose(0, 1).reshape(S * out_c, *w.shape[2:])
    bg = None if bias is None else bias.reshape(S, g, out_g).transpose(0, 1).reshape(-1)
    y = run(x, wg, bg, g)
    N = x.shape[0]
    return y.view(N, g, S, out_g, *y.shape[2:]).permute(2, 0, 1, 3, *range(4, 4 + spatial)).reshape(
        S, N, out_c, *y.shape[2:])


def _set_conv_t_hparams(mod, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                        output_padding) -> None:
    """nn.ConvTransposeNd's hyper-parameters (integer padding only, zeros padding mode, as PyTorch's)."""
    if isinstance(padding, str):
        raise ValueError(f"padding: expected an int or a tuple for a transposed convolution, got {padding!r}")
    _set_conv_hparams(mod, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, "zeros")
    mod.output_padding = _tuple(output_padding, mod._spatial, "output_padding")
    for op, st, dl in zip(mod.output_padding, mod.stride, mod.dilation):
        if not 0 <= op < max(st, dl):
            raise ValueError(f"output_padding: expected values in [0, max(stride, dilation)) per dimension, got "
                             f"{mod.output_padding} with stride={mod.stride}, dilation={mod.dilation}")


def _output_padding_for(mod, x, output_size, per_sample):
    """nn.ConvTransposeNd's ``output_size=`` argument: the output_padding that gives that spatial size."""
    if output_size is None:
        return mod.output_padding
    n = mod._spatial
    size = list(output_size)[-n:]
    if len(size) != n:
        raise ValueError(f"output_size: expected at least {n} sizes, got {output_size!r}")
    inp = x.shape[-n:]
    pads = []
    for d in range(n):
        base = ((inp[d] - 1) * mod.stride[d] - 2 * mod.padding[d] + mod.dilation[d] * (mod.kernel_size[d] - 1) + 1)
        op = int(size[d]) - base
        if not 0 <= op < max(mod.stride[d], mod.dilation[d]):
            raise ValueError(f"output_size: {tuple(size)} is not reachable from input size {tuple(inp)} "
                             f"(output_padding would be {op} in dimension {d})")
        pads.append(op)
    return tuple(pads)


class _RngIdMixin:
    """An int64 buffer ``rng_id`` (saved): the one source of truth for the module's Philox owner word.

    ``_owner``/``owner`` mirror it as a Python int so forward never reads the tensor; the mirror is refreshed
    whenever the buffer is replaced or written in place (its ``_version`` moves: load_state_dict, DDP's buffer
    broadcast, ``sws_kernels.distributed``'s sync, a user's ``fill_``), so the kernels always use the value
    the buffer holds (issue 18: ranks whose counters differed follow rank 0's broadcast ids). A torch.compile
    graph uses the mirror as it was when traced (and recompiles when it changes): load_state_dict and
    ``sws_kernels.distributed`` refresh it eagerly; after writing the buffer by hand, read ``.owner`` once."""

    def _init_rng_id(self, rng_id) -> None:
        owner = _check_rng_id(rng_id)
        self.register_buffer("rng_id", torch.tensor(owner, dtype=torch.int64))
        t = self._buffers["rng_id"]
        self.__dict__["_owner_cache"] = (t, t._version, owner)

    @property
    def _owner(self) -> int:
        c = self._owner_cache
        if torch.compiler.is_compiling():
            # traced code cannot branch on a tensor's _version: the compiled graph keeps the mirror (a constant
            # it guards on); the next eager call refreshes it if the buffer changed
            return c[2]
        t = self._buffers["rng_id"]
        if c[0] is t and c[1] == t._version:
            return c[2]
        owner = _checks.word(int(t), "rng_id")  # one host read each time the buffer changes
        self.__dict__["_owner_cache"] = (t, t._version, owner)
        return owner

    @_owner.setter
    def _owner(self, value) -> None:
        value = _checks.word(value, "rng_id")
        with torch.no_grad():
            self._buffers["rng_id"].fill_(value)

    @property
    def owner(self) -> int:
        return self._owner

    def __getstate__(self):
        # copy.deepcopy / pickle: leave out the per-layer steady-state bindings of sws_kernels._bound (native
        # argument bundles that cannot be pickled and point at the original's tensors); the copy rebinds.
        state = dict(super().__getstate__())
        state.pop("_sws_binding", None)
        state.pop("_mf_binding", None)
        state.pop("_kl_cache", None)  # a codebook's kept KL (_codebook_kl_share) and weight count
        state.pop("_nw_cache", None)
        state.pop("_prior_values", None)  # _bound's prior scalars, keyed by the original's tensor ids
        return state

    def _load_rng_id(self, state_dict, prefix) -> None:
        key = prefix + "rng_id"
        if key in state_dict:  # checked before loading; the mirror follows the loaded buffer
            _checks.word(int(state_dict[key]), key)


def _validate_after_load(module, incompatible_keys) -> None:
    """load_state_dict post-hook: the module's entry checks on the loaded values (its children, e.g. an SWS
    layer's codebook, are loaded by then). Errors name the module by its state_dict prefix."""
    try:
        module.owner  # refresh the rng_id mirror now, before any torch.compile trace reads it
        module._validate()
    except (ValueError, TypeError) as e:
        where = getattr(module, "_load_prefix", "").rstrip(".") or type(module).__name__
        raise type(e)(f"{where}: {e}") from None


def _run_sampled(x, samples, seed, per_sample, call, call1=None):
    """The sampling protocol shared by every layer (see the module docstring). ``call1(x, seed)``, where a layer
    has one: the one-sample call (``samples=None``) returning the output without its sample dimension, or None
    (then ``call(x, 1, seed, False)[0]``)."""
    fold = _FOLD
    if fold is not None and samples is None:
        S, fseed, folded, shared = fold
        if shared is not None and x is shared[0]:  # the folded model input itself: one shared-x call
            y = call(shared[1], S, fseed, False)
            return y.reshape(S * y.shape[1], *y.shape[2:])
        seq_first = folded is not None and x.dim() >= 3 and x.shape[0] != folded and x.shape[1] == folded
        if seq_first:  # [L, S*N, ...]: a sequence-first model (see sample_mode)
            x = x.transpose(0, 1)
        if x.dim() < 1 or x.shape[0] % S:
            raise ValueError(f"x: inside sample_mode({S}) expected a batch dimension divisible by {S} "
                             f"(samples folded into the batch), got {_checks.describe(x)}")
        xs = x.reshape(S, x.shape[0] // S, *x.shape[1:])
        y = call(xs, S, fseed, True)
        y = y.reshape(S * y.shape[1], *y.shape[2:])
        return y.transpose(0, 1) if seq_first else y
    if samples is None:
        if per_sample:
            raise ValueError("per_sample: expected False when samples is None (one sample, no sample dimension)")
        if seed is None:
            seed = draw_seed(x.device)
        if call1 is not None:
            y = call1(x, seed)
            if y is not None:
                return y
        return call(x, 1, seed, False)[0]
    samples = _checks.samples(samples)
    return call(x, samples, draw_seed(x.device) if seed is None else seed, bool(per_sample))


# --------------------------------------------------------------------------------------------------
# Codebook
# --------------------------------------------------------------------------------------------------

class Codebook(_RngIdMixin, nn.Module):
    """K two-dimensional Gaussian components over (mu, rho), shareable by any number of SWS layers.

    Parameters ``means`` [K, 2] (m_mu, m_rho) and ``chol`` [K, 3] (a, b, c) with
    L = [[softplus(a), 0], [b, softplus(c)]] are trainable; the prior ``means0``/``chol0`` are buffers
    (default: the initial values, as in the paper's "posterior = prior = the fit").

    Default init (no ``means`` given): m_mu evenly spaced over [-mu_range, mu_range] (the bulk of a
    Kaiming-uniform weight init for fan-in >= 25), m_rho spread over [-5, -3] by a low-discrepancy
    sequence (sigma 0.007-0.05, the usual mean-field range), and a small diagonal Cholesky whose mu
    standard deviation is half the grid spacing, so components start distinguishable.
    """

    def __init__(self, num_components: int, *, means: Optional[torch.Tensor] = None,
                 chol: Optional[torch.Tensor] = None, means0: Optional[torch.Tensor] = None,
                 chol0: Optional[torch.Tensor] = None, rng_id: Optional[int] = None, mu_range: float = 0.2):
        super().__init__()
        K = _positive_int(num_components, "num_components")
        if means is None:
            if chol is not None:
                raise ValueError("chol: expected None when means is None (the default init sets both)")
            means, chol = self._default_init(K, float(mu_range))
        else:
            _checks.tensor(means, "means", ndim=2, floating=True, last=2)
            if means.shape[0] != K:
                raise ValueError(f"means: expected {K} rows (num_components), got {_checks.describe(means)}")
            if chol is None:
                spacing = float(means[:, 0].std()) / max(K, 1) if K > 1 else 0.01
                chol = torch.stack([softplus_inv(torch.full((K,), max(spacing, 1e-3))), torch.zeros(K),
                                    softplus_inv(torch.full((K,), 0.1))], -1)
        means = means.detach().to(torch.float32).clone()
        chol = chol.detach().to(device=means.device, dtype=torch.float32).clone()
        _checks.codebook(means, chol, full=True)
        self.num_components = K
        self.means = nn.Parameter(means)
        self.chol = nn.Parameter(chol)
        m0 = means.clone() if means0 is None else means0.detach().to(torch.float32).clone()
        c0 = chol.clone() if chol0 is None else chol0.detach().to(torch.float32).clone()
        _checks.codebook(m0, c0, full=True)
        if m0.shape != means.shape:
            raise ValueError(f"means0: expected shape {tuple(means.shape)}, got {_checks.describe(m0)}")
        self.register_buffer("means0", m0)
        self.register_buffer("chol0", c0)
        self._init_rng_id(rng_id)
        self.register_load_state_dict_post_hook(_validate_after_load)

    def _validate(self) -> None:
        """Entry checks of loaded values (construction checks the same): finite posterior and prior."""
        _checks.codebook(self.means.detach(), self.chol.detach(), full=True)
        _checks.codebook(self.means0, self.chol0, full=True)
        if self.means0.shape != self.means.shape:
            raise ValueError(f"means0: expected shape {tuple(self.means.shape)}, got {_checks.describe(self.means0)}")

    @staticmethod
    def _default_init(K: int, mu_range: float):
        mu = torch.linspace(-mu_range, mu_range, K) if K > 1 else torch.zeros(1)
        golden = (torch.arange(K, dtype=torch.float64) * 0.6180339887498949) % 1.0
        rho = (-5.0 + 2.0 * golden).to(torch.float32)
        spacing = 2 * mu_range / max(K - 1, 1)
        s_mu = max(spacing / 2, 1e-4)
        chol = torch.stack([softplus_inv(torch.full((K,), s_mu)), torch.zeros(K),
                            softplus_inv(torch.full((K,), 0.1))], -1)
        return torch.stack([mu, rho], -1), chol

    def sample(self, *, seed, samples: int = 1) -> torch.Tensor:
        """z[s, k] = means[k] + L_k xi[s, k] -> [samples, K, 2]."""
        return SF.sample_components(self.means, self.chol, seed=seed, samples=samples, codebook_owner=self.owner)

    def users(self) -> list:
        """The live SWS layers whose ``codebook`` is this one (each once)."""
        users = _CODEBOOK_USERS.get(self)
        return [] if users is None else [m for m in list(users) if m.codebook is self]

    def num_weights(self) -> int:
        """Total weight count of :meth:`users`: the denominator of each layer's share of this KL. Kept while the
        set of users has the same size (a layer joining or collected changes it; a layer's codebook reassigned
        clears it)."""
        users = _CODEBOOK_USERS.get(self)
        if users is None:
            return 0
        n = len(users)
        kept = self.__dict__.get("_nw_cache")
        if kept is not None and kept[0] == n:
            return kept[1]
        total = sum(m.num_weights for m in self.users())
        self.__dict__["_nw_cache"] = (n, total)
        return total

    def kl_loss(self) -> torch.Tensor:
        """sum_k KL(q_k || p_k) (SPEC.md section 6). Also picked up once by bayesian-torch's get_kl_loss."""
        return SF.kl_components(self.means, self.chol, self.means0, self.chol0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # K may differ from the constructed one (e.g. a placeholder codebook filled by sws.load): resize.
        key = prefix + "means"
        if key in state_dict and state_dict[key].shape != self.means.shape:
            K = state_dict[key].shape[0]
            dev = self.means.device
            with torch.no_grad():
                self.means = nn.Parameter(torch.empty(K, 2, device=dev))
                self.chol = nn.Parameter(torch.empty(K, 3, device=dev))
                self.means0 = torch.empty(K, 2, device=dev)
                self.chol0 = torch.empty(K, 3, device=dev)
            self.num_components = K
        self._load_rng_id(state_dict, prefix)
        self._load_prefix = prefix  # names the module in the post-load check's errors
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_components={self.num_components}, rng_id={self.owner}"


class _SharedKL(torch.autograd.Function):
    """``share * KL(codebook)`` from a value and gradient computed once per codebook state: every call is its own
    graph node (so separate forwards and backwards stay independent), its backward scales the kept gradient."""

    @staticmethod
    def forward(ctx, means, chol, share, value, g_means, g_chol):
        ctx.share, ctx.g_means, ctx.g_chol = share, g_means, g_chol
        return value * share

    @staticmethod
    def backward(ctx, g):
        s = g * ctx.share
        return s * ctx.g_means, s * ctx.g_chol, None, None, None, None


def _codebook_kl_share(cb, share: float) -> torch.Tensor:
    """``cb.kl_loss() * share``, with the codebook KL (and, when a gradient is needed, its gradient with respect
    to means and chol) kept on the codebook and reused while means, chol and the prior are the same tensors
    with the same versions and addresses (an optimizer step or load_state_dict changes them; an edit through
    ``.data`` does not bump a version: call ``cb.__dict__.pop("_kl_cache", None)`` after one). A trainable
    prior, torch.compile and inference tensors take the plain path."""
    m, c, m0, c0 = cb.means, cb.chol, cb.means0, cb.chol0
    if m0.requires_grad or c0.requires_grad or torch.compiler.is_compiling():
        return cb.kl_loss() * share
    need_grad = torch.is_grad_enabled() and (m.requires_grad or c.requires_grad)
    try:
        key = (id(m), id(c), id(m0), id(c0), m._version, c._version, m0._version, c0._version,
               m.data_ptr(), c.data_ptr(), m0.data_ptr(), c0.data_ptr())
    except RuntimeError:  # inference tensors have no version counter
        return cb.kl_loss() * share
    cache = cb.__dict__.get("_kl_cache")
    if cache is None or cache[0] != key or (need_grad and cache[2] is None):
        with torch.enable_grad():
            mm, cc = m.detach().requires_grad_(need_grad), c.detach().requires_grad_(need_grad)
            value = SF.kl_components(mm, cc, m0, c0)
            grads = torch.autograd.grad(value, (mm, cc)) if need_grad else (None, None)
        cache = (key, value.detach(), *grads)
        cb.__dict__["_kl_cache"] = cache
    if need_grad:
        return _SharedKL.apply(m, c, share, cache[1], cache[2], cache[3])
    return cache[1] * share


# --------------------------------------------------------------------------------------------------
# SWS layers
# --------------------------------------------------------------------------------------------------

class _SWSLayer(_RngIdMixin, nn.Module):
    """Shared state and logic of SWSLinear / SWSConv1d / SWSConv2d (SPEC.md section 2).

    Buffers: ``labels`` (weight shape, narrowest integer dtype for K), ``ellipse_pos`` (int64 flat
    indices), ``ellipse_a``/``ellipse_b`` (component indices), ``ellipse_alpha`` (float32),
    ``outlier_pos`` (int64), ``outlier_mu0``/``outlier_sigma0`` (outlier prior), ``rng_id``.
    Parameters: ``outlier_mu``, ``outlier_rho``, ``bias`` (deterministic, optional), plus the codebook's.
    """

    MODES = _checks.MODES

    def _init_sws(self, weight_shape, bias: bool, codebook, mode, labels, ellipse, outliers, rng_id, fan_in,
                  return_kl: bool = False, bias_size: Optional[int] = None):
        if not isinstance(return_kl, bool):
            raise TypeError(f"return_kl: expected a bool, got {_checks.describe(return_kl)}")
        self.return_kl = return_kl
        self._dnn_to_bnn_flag = False
        if not isinstance(codebook, Codebook):
            raise TypeError(f"codebook: expected a sws_kernels.nn.Codebook, got {_checks.describe(codebook)}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {_checks.describe(bias)}")
        self.codebook = codebook
        self.mode = mode
        self.weight_shape = tuple(weight_shape)
        K = codebook.num_components
        dev = codebook.means.device
        n = math.prod(self.weight_shape)
        if labels is None:
            w = torch.empty(self.weight_shape)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear / nn.ConvNd's own default init
            labels = nearest_component(w, codebook.means.detach()[:, 0].cpu())
        else:
            _checks.tensor(labels, "labels", integer=True)
            if tuple(labels.shape) != self.weight_shape:
                raise ValueError(f"labels: expected the weight shape {self.weight_shape}, got {_checks.describe(labels)}")
            if labels.numel():
                mn, mx = int(labels.min()), int(labels.max())
                if mn < 0 or mx >= K:
                    raise ValueError(f"labels: expected component indices in [0, {K}) (the codebook has "
                                     f"num_components={K}), got values in [{mn}, {mx}]")
        ldt = label_dtype(K)
        self.register_buffer("labels", labels.detach().to(device=dev, dtype=ldt).clone())

        if ellipse is None:
            e_pos = torch.zeros(0, dtype=torch.int64)
            e_a = e_b = torch.zeros(0, dtype=ldt)
            e_alpha = torch.zeros(0)
        else:
            if not isinstance(ellipse, (tuple, list)) or len(ellipse) != 4:
                raise TypeError(f"ellipse: expected None or (positions, comp_a, comp_b, alpha), got {_checks.describe(ellipse)}")
            e_pos, e_a, e_b, e_alpha = ellipse
        self.register_buffer("ellipse_pos", torch.as_tensor(e_pos).detach().to(dev, torch.int64).clone())
        self.register_buffer("ellipse_a", torch.as_tensor(e_a).detach().to(dev, ldt).clone())
        self.register_buffer("ellipse_b", torch.as_tensor(e_b).detach().to(dev, ldt).clone())
        self.register_buffer("ellipse_alpha", torch.as_tensor(e_alpha).detach().to(dev, torch.float32).clone())

        if outliers is None:
            o_pos = torch.zeros(0, dtype=torch.int64)
            o_mu = o_rho = torch.zeros(0)
            o_mu0 = o_sigma0 = None
        else:
            if not isinstance(outliers, (tuple, list)) or len(outliers) not in (3, 5):
                raise TypeError("outliers: expected None, (positions, mu, rho) or (positions, mu, rho, mu0, sigma0), "
                                f"got {_checks.describe(outliers)}")
            o_pos, o_mu, o_rho = outliers[:3]
            o_mu0, o_sigma0 = (outliers[3], outliers[4]) if len(outliers) == 5 else (None, None)
        o_mu = torch.as_tensor(o_mu).detach().to(dev, torch.float32).clone()
        o_rho = torch.as_tensor(o_rho).detach().to(dev, torch.float32).clone()
        self.register_buffer("outlier_pos", torch.as_tensor(o_pos).detach().to(dev, torch.int64).clone())
        # An empty outlier set gets frozen (requires_grad=False) empty parameters: they keep state_dict keys
        # stable, and DDP / optimisers ignore them instead of waiting for a gradient that never comes.
        self.outlier_mu = nn.Parameter(o_mu, requires_grad=o_mu.numel() > 0)
        self.outlier_rho = nn.Parameter(o_rho, requires_grad=o_rho.numel() > 0)
        # Prior = the initial fit (SPEC.md section 8, step 6) unless given.
        mu0 = o_mu.clone() if o_mu0 is None else torch.as_tensor(o_mu0).detach().to(dev, torch.float32).clone()
        s0 = _ref.softplus(o_rho) if o_sigma0 is None else torch.as_tensor(o_sigma0).detach().to(dev, torch.float32).clone()
        self.register_buffer("outlier_mu0", mu0)
        self.register_buffer("outlier_sigma0", s0)
        if bias:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            n_bias = self.weight_shape[0] if bias_size is None else bias_size
            self.bias = nn.Parameter(torch.empty(n_bias, device=dev).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self._init_rng_id(rng_id)
        self._validate()
        self.register_load_state_dict_post_hook(_validate_after_load)
        self._entry_checks = True  # from now on an assigned buffer is checked when it is assigned
        _register_user(codebook, self)

    # -- forward contract (module docstring, "Forward contract and KL") ----------------------------
    @property
    def dnn_to_bnn_flag(self) -> bool:
        """bayesian-torch's flag: when set, forward returns only ``out`` whatever ``return_kl`` says."""
        return self._dnn_to_bnn_flag

    @dnn_to_bnn_flag.setter
    def dnn_to_bnn_flag(self, value: bool) -> None:
        self._dnn_to_bnn_flag = bool(value)

    def __setstate__(self, state):
        # copy.deepcopy and pickle rebuild a layer without __init__: register it with its (copied) codebook.
        super().__setstate__(state)
        cb = self._modules.get("codebook")
        if isinstance(cb, Codebook):
            _register_user(cb, self)

    def layer_kl(self) -> torch.Tensor:
        """The KL this layer returns from forward (SPEC.md section 8, step 7), summed as in section 6:
        KL(outliers) + KL(codebook) * num_weights / codebook.num_weights(), the codebook's KL attributed to
        the layers sharing it in proportion to their weight counts (counted exactly once over all of them).

        The codebook's KL and its gradient are computed once per codebook state and reused by every layer
        sharing it (:func:`_codebook_kl_share`): 20 layers sharing K = 4096 components cost one KL, not 20."""
        cb = self.codebook
        users = _CODEBOOK_USERS.get(cb)
        if users is None or self not in users:  # a codebook assigned by hand or a copied layer
            _register_user(cb, self)
        return self.kl_loss() + _codebook_kl_share(cb, self.num_weights / cb.num_weights())

    def _contract(self, out, return_kl):
        """``(out, layer_kl())`` or ``out`` per ``return_kl`` (None: the layer's ``return_kl`` attribute) and
        ``dnn_to_bnn_flag``."""
        if return_kl is None:
            return_kl = self.return_kl
        if return_kl and not self._dnn_to_bnn_flag:
            return out, self.layer_kl()
        return out

    @staticmethod
    def _split_samples(samples, return_kl):
        """bayesian-torch calls ``layer(x, False)``: a bool in the second position is its ``return_kl``."""
        if isinstance(samples, bool):
            if return_kl is not None:
                raise TypeError("return_kl: given twice (positionally as a bool and as a keyword)")
            return None, samples
        return samples, return_kl

    # -- validation -------------------------------------------------------------------------------
    # Data is checked when it enters: here at construction and after load_state_dict (a post-hook), and in
    # __setattr__ when a buffer is assigned. _validate also records the index buffers as checked at their
    # current version (_checks.sws), so forward runs no data check until a buffer is replaced or edited in
    # place; then the next call checks it once (ARCHITECTURE.md, "The hot path").
    def _validate(self) -> None:
        """Every check of the whole layer, parameter finiteness included."""
        _checks.sws(self.codebook.means.detach(), self.codebook.chol.detach(), self.labels, self._ellipse(),
                    self._outliers(), 0, 1, self.mode, self.owner, self.codebook.owner, full=True)
        if self.outlier_mu0.shape != self.outlier_mu.shape or self.outlier_sigma0.shape != self.outlier_mu.shape:
            raise ValueError(f"outlier prior: expected mu0/sigma0 of shape {tuple(self.outlier_mu.shape)}, got "
                             f"{_checks.describe(self.outlier_mu0)} and {_checks.describe(self.outlier_sigma0)}")
        kw = dict(K=self.codebook.num_components, weight_shape=self.weight_shape, device=self.codebook.means.device)
        _checks.sws_buffer("outlier_mu0", self.outlier_mu0, **kw)
        _checks.sws_buffer("outlier_sigma0", self.outlier_sigma0, **kw)

    def __setattr__(self, name, value):
        if name == "codebook" and isinstance(value, Codebook) and self.__dict__.get("_entry_checks", False):
            old = self._modules.get("codebook")
            if old is not None:
                old.__dict__.pop("_nw_cache", None)
            value.__dict__.pop("_nw_cache", None)
            _register_user(value, self)
        if name in _checks.SWS_BUFFERS and self.__dict__.get("_entry_checks", False):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {_checks.describe(value)}")
            cb = self.codebook
            _checks.sws_buffer(name, value, K=cb.num_components, weight_shape=self.weight_shape,
                               device=cb.means.device)
        super().__setattr__(name, value)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = _checks.mode(value)

    def _ellipse(self):
        return None if self.ellipse_pos.numel() == 0 else (
            self.ellipse_pos, self.ellipse_a, self.ellipse_b, self.ellipse_alpha)

    def _outliers(self):
        return None if self.outlier_pos.numel() == 0 else (self.outlier_pos, self.outlier_mu, self.outlier_rho)

    @property
    def num_weights(self) -> int:
        return self.labels.numel()

    def sample_weights(self, *, samples: int = 1, seed=None, mode: Optional[str] = None) -> torch.Tensor:
        """Sampled weights [samples, *weight_shape] (what forward uses with the same seed)."""
        if mode is None or mode == self.mode:  # the steady-state path (sws_kernels/_bound.py)
            w = _bound.sws_weights(self, _checks.samples(samples),
                                   draw_seed(self.codebook.means.device) if seed is None else seed)
            if w is not None:
                return w
        cb = self.codebook
        return SF.reconstruct(cb.means, cb.chol, self.labels, self._ellipse(), self._outliers(),
                              seed=draw_seed(self.codebook.means.device) if seed is None else seed, samples=samples,
                              mode=self.mode if mode is None else mode, owner=self.owner, codebook_owner=cb.owner)

    def mean_weight(self) -> torch.Tensor:
        """The deterministic ("mean" mode) weight of the layer's shape."""
        return self.sample_weights(samples=1, seed=0, mode="mean")[0]

    def kl_loss(self) -> torch.Tensor:
        """Summed KL of this layer's outliers (the codebook's KL is the Codebook's own ``kl_loss``, counted once
        by bayesian-torch's ``get_kl_loss`` and :func:`sws_kernels.kl_loss`; forward returns
        :meth:`layer_kl`, which adds this layer's share of it)."""
        if self.outlier_mu.numel() == 0:
            return self.outlier_mu.sum()
        return _ref.kl_gaussian(self.outlier_mu, self.outlier_rho, self.outlier_mu0, self.outlier_sigma0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Ellipse/outlier counts and the label dtype depend on the fit: adopt the saved sizes and dtype.
        # __setattr__'s per-buffer checks are off meanwhile (placeholders, and with assign=True a codebook not
        # yet resized): the post-load hook checks the whole layer once everything is loaded.
        self._entry_checks = False
        try:
            dev = self.labels.device
            for name in ("labels", "ellipse_pos", "ellipse_a", "ellipse_b", "ellipse_alpha", "outlier_pos",
                         "outlier_mu0", "outlier_sigma0"):
                t = state_dict.get(prefix + name)
                if isinstance(t, torch.Tensor):
                    cur = getattr(self, name)
                    if t.shape != cur.shape or t.dtype != cur.dtype:
                        setattr(self, name, torch.empty(t.shape, dtype=t.dtype, device=dev))
            for name in ("outlier_mu", "outlier_rho"):
                t = state_dict.get(prefix + name)
                if isinstance(t, torch.Tensor) and t.shape != getattr(self, name).shape:
                    setattr(self, name, nn.Parameter(torch.empty(t.shape, device=dev), requires_grad=t.numel() > 0))
            self._load_rng_id(state_dict, prefix)
            self._load_prefix = prefix  # names the layer in the post-load check's errors
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            self._entry_checks = True

    def _sws_extra_repr(self) -> str:
        return (f"mode={self.mode!r}, K={self.codebook.num_components}, labels={self.labels.dtype}, "
                f"ellipses={self.ellipse_pos.numel()}, outliers={self.outlier_pos.numel()}, rng_id={self.owner}")


def nearest_component(w: torch.Tensor, comp_mu: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """Index of the component whose mean mu is nearest to each weight (int64, the shape of w)."""
    order = torch.argsort(comp_mu)
    sorted_mu = comp_mu[order].contiguous()
    K = sorted_mu.numel()
    flat = w.reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.int64)
    for i in range(0, flat.numel(), chunk):  # chunks keep memory flat for 10M-weight layers
        v = flat[i:i + chunk].contiguous()
        j = torch.searchsorted(sorted_mu, v).clamp(1, max(K - 1, 1)) if K > 1 else torch.zeros_like(v, dtype=torch.int64)
        if K > 1:
            left, right = sorted_mu[j - 1], sorted_mu[j]
            j = torch.where((v - left).abs() <= (right - v).abs(), j - 1, j)
        out[i:i + chunk] = order[j]
    return out.view(w.shape)


class SWSLinear(_SWSLayer):
    """Linear layer with stochastic weight sharing: y = x W_s^T + b, W_s reconstructed from the codebook."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, codebook: Codebook,
                 mode: str = "paper", labels=None, ellipse=None, outliers=None, rng_id: Optional[int] = None,
                 return_kl: bool = False):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        self._init_sws((self.out_features, self.in_features), bias, codebook, mode, labels, ellipse, outliers,
                       rng_id, self.in_features, return_kl)

    def forward(self, x: torch.Tensor, samples: Optional[int] = None, seed=None, *, per_sample: bool = False,
                return_kl: Optional[bool] = None):
        """``out`` [..., out] ([S, ..., out] with ``samples``), or ``(out, layer_kl())`` when ``return_kl``
        (default: the layer's attribute) is true and ``dnn_to_bnn_flag`` is not set."""
        samples, return_kl = self._split_samples(samples, return_kl)

        def call(xx, S, sd, ps):
            y = _bound.sws_linear(self, xx, S, sd, ps)  # the steady-state path (sws_kernels/_bound.py)
            if y is not None:
                return y
            cb = self.codebook
            return SF.sws_linear(xx, cb.means, cb.chol, self.labels, self._ellipse(), self._outliers(), self.bias,
                                 seed=sd, samples=S, mode=self.mode, owner=self.owner, codebook_owner=cb.owner,
                                 per_sample=ps)

        def call1(xx, sd):
            return _bound.sws_linear(self, xx, 1, sd, False, True)
        return self._contract(_run_sampled(x, samples, seed, per_sample, call, call1), return_kl)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self._sws_extra_repr())


class _SWSConvNd(_SWSLayer):
    _spatial = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias: bool = True, *, codebook: Codebook, mode: str = "paper", labels=None, ellipse=None,
                 outliers=None, rng_id: Optional[int] = None, padding_mode: str = "zeros", return_kl: bool = False):
        super().__init__()
        _set_conv_hparams(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                          padding_mode)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        fan_in = (in_channels // groups) * math.prod(self.kernel_size)
        self._init_sws(shape, bias, codebook, mode, labels, ellipse, outliers, rng_id, fan_in, return_kl)

    def forward(self, x: torch.Tensor, samples: Optional[int] = None, seed=None, *, per_sample: bool = False,
                return_kl: Optional[bool] = None):
        """``out`` ([S, ...] with ``samples``), or ``(out, layer_kl())`` when ``return_kl`` (default: the
        layer's attribute) is true and ``dnn_to_bnn_flag`` is not set."""
        samples, return_kl = self._split_samples(samples, return_kl)

        def call(xx, S, sd, ps):
            cb = self.codebook
            fn = SF.sws_conv2d if self._spatial == 2 else SF.sws_conv1d
            pad = self.padding
            if self.padding_mode != "zeros":
                xx, pad = _explicit_pad(xx, self.padding_mode, self.padding, self.kernel_size, self.dilation)
            w = _bound.sws_weights(self, S, sd)  # the steady-state path (sws_kernels/_bound.py)
            if w is not None:
                return SF._conv_all_samples(SF._F.conv2d if self._spatial == 2 else SF._F.conv1d, xx, w, self.bias,
                                            self.stride, pad, self.dilation, self.groups, ps, self._spatial)
            return fn(xx, cb.means, cb.chol, self.labels, self._ellipse(), self._outliers(), self.bias,
                      self.stride, pad, self.dilation, self.groups, seed=sd, samples=S, mode=self.mode,
                      owner=self.owner, codebook_owner=cb.owner, per_sample=ps)

        def call1(xx, sd):  # samples=None: the kernel sampled without a sample dimension, one vendor conv
            if self.padding_mode != "zeros":
                return None
            w = _bound.sws_weights(self, 1, sd, True)
            return None if w is None else _conv1(self, xx, w, self.bias)
        return self._contract(_run_sampled(x, samples, seed, per_sample, call, call1), return_kl)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"padding_mode={self.padding_mode!r}, bias={self.bias is not None}, " + self._sws_extra_repr())


class SWSConv1d(_SWSConvNd):
    """Conv1d with stochastic weight sharing (F.conv1d semantics per sample)."""
    _spatial = 1


class SWSConv2d(_SWSConvNd):
    """Conv2d with stochastic weight sharing (F.conv2d semantics per sample)."""
    _spatial = 2


class SWSConv3d(_SWSConvNd):
    """Conv3d with stochastic weight sharing: the S sampled kernels are reconstructed by our kernels
    (:func:`sws_kernels.functional.reconstruct`), then one F.conv3d call applies all of them."""
    _spatial = 3

    def forward(self, x: torch.Tensor, samples: Optional[int] = None, seed=None, *, per_sample: bool = False,
                return_kl: Optional[bool] = None):
        samples, return_kl = self._split_samples(samples, return_kl)

        def call(xx, S, sd, ps):
            pad = self.padding
            if self.padding_mode != "zeros":
                xx, pad = _explicit_pad(xx, self.padding_mode, self.padding, self.kernel_size, self.dilation)
            w = self.sample_weights(samples=S, seed=sd)
            return _vendor_conv_all_samples(False, 3, xx, w, self.bias, self.stride, pad, self.dilation, self.groups,
                                            None, ps)
        return self._contract(_run_sampled(x, samples, seed, per_sample, call), return_kl)


class _SWSConvTransposeNd(_SWSLayer):
    """Transposed convolution with stochastic weight sharing: nn.ConvTransposeNd's arguments (weight
    [in, out/groups, *k], output_padding, ``output_size=`` in forward); S kernels reconstructed by our kernels,
    then one F.conv_transposeNd call for all samples."""
    _spatial = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias: bool = True, dilation=1, *, codebook: Codebook, mode: str = "paper", labels=None, ellipse=None,
                 outliers=None, rng_id: Optional[int] = None, padding_mode: str = "zeros", return_kl: bool = False):
        super().__init__()
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode: expected 'zeros' for a transposed convolution (as PyTorch), got "
                             f"{padding_mode!r}")
        _set_conv_t_hparams(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                            output_padding)
        shape = (in_channels, out_channels // groups, *self.kernel_size)
        fan_in = (out_channels // groups) * math.prod(self.kernel_size)  # nn.ConvTransposeNd's bias bound
        self._init_sws(shape, bias, codebook, mode, labels, ellipse, outliers, rng_id, fan_in, return_kl,
                       bias_size=out_channels)

    def forward(self, x: torch.Tensor, samples: Optional[int] = None, seed=None, *, per_sample: bool = False,
                return_kl: Optional[bool] = None, output_size=None):
        if isinstance(samples, (list, tuple, torch.Size)):  # nn.ConvTransposeNd's positional output_size
            samples, output_size = None, samples
        samples, return_kl = self._split_samples(samples, return_kl)
        opad = _output_padding_for(self, x, output_size, per_sample)

        def call(xx, S, sd, ps):
            w = self.sample_weights(samples=S, seed=sd)
            return _vendor_conv_all_samples(True, self._spatial, xx, w, self.bias, self.stride, self.padding,
                                            self.dilation, self.groups, opad, ps)
        return self._contract(_run_sampled(x, samples, seed, per_sample, call), return_kl)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}, " + self._sws_extra_repr())


class SWSConvTranspose1d(_SWSConvTransposeNd):
    """ConvTranspose1d with stochastic weight sharing (F.conv_transpose1d semantics per sample)."""
    _spatial = 1


class SWSConvTranspose2d(_SWSConvTransposeNd):
    """ConvTranspose2d with stochastic weight sharing (F.conv_transpose2d semantics per sample)."""
    _spatial = 2


class SWSConvTranspose3d(_SWSConvTransposeNd):
    """ConvTranspose3d with stochastic weight sharing (F.conv_transpose3d semantics per sample)."""
    _spatial = 3


# --------------------------------------------------------------------------------------------------
# Mean-field layers (bayesian-torch compatible)
# --------------------------------------------------------------------------------------------------

class _MeanFieldLayer(_RngIdMixin, nn.Module):
    """Shared logic of the mean-field layers.

    Mirrors bayesian-torch 0.5.0's Reparameterization layers: constructor arguments and their order,
    parameter names, init (mu ~ N(posterior_mu_init, 0.1), rho ~ N(posterior_rho_init, 0.1)),
    ``prior_variance`` used as the prior *standard deviation*, non-persistent prior buffers,
    ``self.bias`` a bool, ``forward(x, return_kl=True) -> (out, kl)`` with ``kl`` averaged per tensor,
    ``kl_loss()`` in the same convention and ``dnn_to_bnn_flag`` (when set, forward returns only ``out``).
    Differences: noise comes from the Philox streams (seeded, regenerated in backward), so several sampled
    forwards before one backward each get their own noise's gradient; ``samples=``/``seed=`` keywords.
    """

    _w_mu = "mu_weight"
    _w_rho = "rho_weight"

    _call1 = None  # a one-sample call without the sample dimension (``_run_sampled``'s call1), where a layer has one

    def _init_mf(self, weight_shape, out: int, prior_mean, prior_variance, posterior_mu_init, posterior_rho_init,
                 bias: bool, rng_id, estimator: str = "reparameterization"):
        self.estimator = estimator
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool (bayesian-torch's order is ..., posterior_rho_init, bias), "
                            f"got {_checks.describe(bias)}")
        for name, v in (("prior_mean", prior_mean), ("prior_variance", prior_variance),
                        ("posterior_mu_init", posterior_mu_init), ("posterior_rho_init", posterior_rho_init)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{name}: expected a finite float, got {_checks.describe(v)}")
        if prior_variance <= 0:
            raise ValueError(f"prior_variance: expected > 0 (used as the prior standard deviation), got {prior_variance}")
        self.prior_mean = float(prior_mean)
        self.prior_variance = float(prior_variance)
        self.posterior_mu_init = float(posterior_mu_init)
        self.posterior_rho_init = float(posterior_rho_init)
        self.bias = bias  # a bool, as in bayesian-torch
        self._dnn_to_bnn_flag = False
        setattr(self, self._w_mu, nn.Parameter(torch.empty(weight_shape).normal_(posterior_mu_init, 0.1)))
        setattr(self, self._w_rho, nn.Parameter(torch.empty(weight_shape).normal_(posterior_rho_init, 0.1)))
        # Priors as in bayesian-torch: non-persistent buffers (not in state_dict); 0-d tensors broadcast.
        self.register_buffer("prior_weight_mu", torch.tensor(self.prior_mean), persistent=False)
        self.register_buffer("prior_weight_sigma", torch.tensor(self.prior_variance), persistent=False)
        if bias:
            self.mu_bias = nn.Parameter(torch.empty(out).normal_(posterior_mu_init, 0.1))
            self.rho_bias = nn.Parameter(torch.empty(out).normal_(posterior_rho_init, 0.1))
            self.register_buffer("prior_bias_mu", torch.tensor(self.prior_mean), persistent=False)
            self.register_buffer("prior_bias_sigma", torch.tensor(self.prior_variance), persistent=False)
        else:
            self.register_parameter("mu_bias", None)
            self.register_parameter("rho_bias", None)
            self.register_buffer("prior_bias_mu", None, persistent=False)
            self.register_buffer("prior_bias_sigma", None, persistent=False)
        self._init_rng_id(rng_id)
        self._validate()
        self.register_load_state_dict_post_hook(_validate_after_load)

    def _validate(self) -> None:
        """Entry checks (construction, load_state_dict): finite mu/rho. Never per step (a NaN gives NaN)."""
        _checks.mean_field(self.weight_mu.detach(), self.weight_rho.detach(), 0, 1, self.owner, self._w_mu,
                           self._w_rho, full=True)
        if self.mu_bias is not None:
            _checks.mean_field(self.mu_bias.detach(), self.rho_bias.detach(), 0, 1, self.owner, "mu_bias", "rho_bias",
                               full=True)

    @property
    def dnn_to_bnn_flag(self) -> bool:
        return self._dnn_to_bnn_flag

    @dnn_to_bnn_flag.setter
    def dnn_to_bnn_flag(self, value: bool) -> None:
        self._dnn_to_bnn_flag = bool(value)

    @property
    def weight_mu(self) -> torch.Tensor:
        return getattr(self, self._w_mu)

    @property
    def weight_rho(self) -> torch.Tensor:
        return getattr(self, self._w_rho)

    def kl_loss(self) -> torch.Tensor:
        """bayesian-torch's convention: KL averaged over each tensor's elements, weight + bias. Without grad the
        value is reused while parameters and priors are unchanged (sws_kernels/_bound.py, mean_field_kl)."""
        return _bound.mean_field_kl(self, self._kl_loss)

    def _kl_loss(self) -> torch.Tensor:
        kl = _ref.kl_gaussian_mean(self.weight_mu, self.weight_rho, self.prior_weight_mu, self.prior_weight_sigma)
        if self.mu_bias is not None:
            kl = kl + _ref.kl_gaussian_mean(self.mu_bias, self.rho_bias, self.prior_bias_mu, self.prior_bias_sigma)
        return kl

    def kl_sum(self) -> torch.Tensor:
        """SPEC.md section 6: KL summed over every weight and bias element (used by sws_kernels.kl_loss)."""
        kl = _ref.kl_gaussian(self.weight_mu, self.weight_rho, self.prior_weight_mu, self.prior_weight_sigma)
        if self.mu_bias is not None:
            kl = kl + _ref.kl_gaussian(self.mu_bias, self.rho_bias, self.prior_bias_mu, self.prior_bias_sigma)
        return kl

    def sample_weights(self, *, samples: int = 1, seed=None) -> torch.Tensor:
        seed = draw_seed(self.weight_mu.device) if seed is None else seed
        return SF.mean_field_reconstruct(self.weight_mu, self.weight_rho, seed=seed, samples=samples, owner=self.owner)

    def _call(self, xx, S, sd, ps):
        raise NotImplementedError  # defined by each concrete layer

    # -- the flipout estimator (bayesian-torch's *Flipout layers) ----------------------------------------------
    ESTIMATORS = ("reparameterization", "flipout")

    @property
    def estimator(self) -> str:
        """``"reparameterization"`` (default: one weight sample per call and per MC sample) or ``"flipout"``
        (bayesian-torch's Flipout layers; see :meth:`_flipout_call`). Same posterior, same KL, same output
        distribution for each example; flipout decorrelates the examples of a batch."""
        return self.__dict__.get("_estimator", "reparameterization")

    @estimator.setter
    def estimator(self, value: str) -> None:
        if value not in self.ESTIMATORS:
            raise ValueError(f"estimator: expected one of {self.ESTIMATORS}, got {value!r}")
        self.__dict__["_estimator"] = value

    def _det(self, x, w, b, opad=None):
        """The layer's deterministic op on x [B, ...] with weight w and bias b (PyTorch's own kernel)."""
        raise NotImplementedError  # defined by each concrete layer

    def _delta(self, xin, S, sd, opad=None):
        """Per-sample op with the zero-mean perturbations sigma * eps[s] (our mean-field reconstruct kernel, weight
        stream purpose 0, bias purpose 2) on xin [S, N, ...] -> [S, N, ...]."""
        mu, rho = self.weight_mu, self.weight_rho
        w = SF.mean_field_reconstruct(torch.zeros_like(mu), rho, seed=sd, samples=S, owner=self.owner)
        b = None
        if self.mu_bias is not None:
            b = _ref.mean_field_bias(torch.zeros_like(self.mu_bias), self.rho_bias, seed=sd, samples=S,
                                     owner=self.owner)
        if isinstance(self, MeanFieldLinear):
            return _ref._linear(xin, w, b, True)
        pad = self.padding
        if getattr(self, "padding_mode", "zeros") != "zeros":
            xin, pad = _explicit_pad(xin, self.padding_mode, self.padding, self.kernel_size, self.dilation)
        transposed = isinstance(self, _MeanFieldConvTransposeNd)
        return _vendor_conv_all_samples(transposed, self._spatial, xin, w, b, self.stride, pad, self.dilation,
                                        self.groups, opad, True)

    def _flipout_call(self, xx, S, sd, ps, opad=None):
        """Flipout (Wen et al. 2018), as bayesian-torch's Flipout layers compute it, per MC sample s:
        out[s] = op(x, mu_w, mu_b) + op(x * r[s], sigma_w * eps[s], sigma_b * eps_b[s]) * t[s], with random
        signs r[s] (the input's shape) and t[s] (the output's shape) per example and element. The signs come
        from the layer's Philox streams (purposes 3 and 4, element = flat index within sample s), the noise
        from our mean-field kernel (purposes 0 and 2), so a seed reproduces a call and backward regenerates."""
        lead = 1 if ps else 0
        mean = self._det(xx.flatten(0, 1) if ps else xx, self.weight_mu, self.mu_bias, opad)
        mean = mean.unflatten(0, (S, xx.shape[1])) if ps else mean.unsqueeze(0)
        samples = torch.arange(S, dtype=torch.int64)  # CPU indices: the stream's range check reads no device data
        n_in = math.prod(xx.shape[lead:])
        r = _philox.uniform(sd, n_in, sample=samples, owner=self.owner, purpose=_PURPOSE_FLIP_IN, device=xx.device)
        r = torch.where(r < 0.5, -1.0, 1.0).to(xx.dtype).view(S, *xx.shape[lead:])
        delta = self._delta((xx if ps else xx.unsqueeze(0)) * r, S, sd, opad)
        t = _philox.uniform(sd, math.prod(delta.shape[1:]), sample=samples, owner=self.owner,
                            purpose=_PURPOSE_FLIP_OUT, device=xx.device)
        t = torch.where(t < 0.5, -1.0, 1.0).to(delta.dtype).view(delta.shape)
        return mean + delta * t

    def forward(self, x: torch.Tensor, return_kl: bool = True, *, samples: Optional[int] = None, seed=None,
                per_sample: bool = False):
        reparam = self.estimator == "reparameterization"
        want_kl = return_kl and not self._dnn_to_bnn_flag
        if want_kl and reparam and samples is None and not per_sample and _FOLD is None and self._call1 is not None:
            # bayesian-torch's default call: output and KL from one steady-state call (sws_kernels/_bound.py)
            if seed is None:
                seed = draw_seed(x.device)  # one draw per call: the path below reuses it
            r = self._call1(x, seed, True)
            if r is not None:
                return r
        call = self._call if reparam else self._flipout_call
        out = _run_sampled(x, samples, seed, per_sample, call, self._call1 if reparam else None)
        if want_kl:
            return out, self.kl_loss()
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._load_rng_id(state_dict, prefix)
        self._load_prefix = prefix  # names the layer in the post-load check's errors
        if prefix + "rng_id" not in state_dict:
            # A bayesian-torch state_dict has no rng_id: keep ours rather than fail a strict load.
            state_dict = dict(state_dict)
            state_dict[prefix + "rng_id"] = self.rng_id
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MeanFieldLinear(_MeanFieldLayer):
    """bayesian-torch's LinearReparameterization, on sws_kernels' seeded kernels."""

    def __init__(self, in_features: int, out_features: int, prior_mean: float = 0, prior_variance: float = 1,
                 posterior_mu_init: float = 0, posterior_rho_init: float = -3.0, bias: bool = True, *,
                 rng_id: Optional[int] = None, estimator: str = "reparameterization"):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        self._init_mf((out_features, in_features), out_features, prior_mean, prior_variance, posterior_mu_init,
                      posterior_rho_init, bias, rng_id, estimator)

    def _call1(self, xx, sd, with_kl: bool = False):
        return _bound.mean_field_linear(self, xx, 1, sd, False, True, with_kl)

    def _call(self, xx, S, sd, ps):
        y = _bound.mean_field_linear(self, xx, S, sd, ps)  # the steady-state path (sws_kernels/_bound.py)
        if y is not None:
            return y
        return SF.mean_field_linear(xx, self.mu_weight, self.rho_weight, self.mu_bias, self.rho_bias, seed=sd,
                                    samples=S, owner=self.owner, per_sample=ps)

    def _det(self, x, w, b, opad=None):
        return torch.nn.functional.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias}, "
                f"prior=N({self.prior_mean}, {self.prior_variance}^2), rng_id={self.owner}")


class _MeanFieldConvNd(_MeanFieldLayer):
    _spatial = 2
    _w_mu = "mu_kernel"
    _w_rho = "rho_kernel"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, prior_mean: float = 0, prior_variance: float = 1, posterior_mu_init: float = 0,
                 posterior_rho_init: float = -3.0, bias: bool = True, *, rng_id: Optional[int] = None,
                 padding_mode: str = "zeros", estimator: str = "reparameterization"):
        super().__init__()
        _set_conv_hparams(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                          padding_mode)
        self._init_mf((out_channels, in_channels // groups, *self.kernel_size), out_channels, prior_mean,
                      prior_variance, posterior_mu_init, posterior_rho_init, bias, rng_id, estimator)

    def _call1(self, xx, sd, with_kl: bool = False):
        """samples=None: the kernel and bias sampled without a sample dimension, one vendor conv (zero padding,
        1-d/2-d); None elsewhere (the general call)."""
        if with_kl or self.padding_mode != "zeros" or self._spatial not in (1, 2):
            return None
        wb = _bound.mean_field_weights(self, 1, sd, True)
        return None if wb is None else _conv1(self, xx, wb[0], wb[1])

    def _call(self, xx, S, sd, ps):
        fn = SF.mean_field_conv2d if self._spatial == 2 else SF.mean_field_conv1d
        pad = self.padding
        if self.padding_mode != "zeros":
            xx, pad = _explicit_pad(xx, self.padding_mode, self.padding, self.kernel_size, self.dilation)
        wb = _bound.mean_field_weights(self, S, sd)  # the steady-state path (sws_kernels/_bound.py)
        if wb is not None:
            return SF._conv_all_samples(SF._F.conv2d if self._spatial == 2 else SF._F.conv1d, xx, wb[0], wb[1],
                                        self.stride, pad, self.dilation, self.groups, ps, self._spatial)
        return fn(xx, self.mu_kernel, self.rho_kernel, self.mu_bias, self.rho_bias, self.stride, pad,
                  self.dilation, self.groups, seed=sd, samples=S, owner=self.owner, per_sample=ps)

    def _det(self, x, w, b, opad=None):
        pad = self.padding
        if self.padding_mode != "zeros":
            x, pad = _explicit_pad(x, self.padding_mode, self.padding, self.kernel_size, self.dilation)
        return _CONV_OPS[self._spatial](x, w.to(x.dtype), None if b is None else b.to(x.dtype), self.stride, pad,
                                        self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"padding_mode={self.padding_mode!r}, bias={self.bias}, "
                f"prior=N({self.prior_mean}, {self.prior_variance}^2), rng_id={self.owner}")


class MeanFieldConv1d(_MeanFieldConvNd):
    """bayesian-torch's Conv1dReparameterization, on sws_kernels' seeded kernels."""
    _spatial = 1


class MeanFieldConv2d(_MeanFieldConvNd):
    """bayesian-torch's Conv2dReparameterization, on sws_kernels' seeded kernels."""
    _spatial = 2


def _mf_weights(layer, S, sd):
    """Sampled kernels (our mean-field reconstruct kernel) and biases (stream purpose 2) of a mean-field conv."""
    wb = _bound.mean_field_weights(layer, S, sd)  # the steady-state path (sws_kernels/_bound.py)
    if wb is not None:
        return wb
    w = SF.mean_field_reconstruct(layer.mu_kernel, layer.rho_kernel, seed=sd, samples=S, owner=layer.owner)
    b = _ref.mean_field_bias(layer.mu_bias, layer.rho_bias, seed=sd, samples=S, owner=layer.owner)
    return w, b


class MeanFieldConv3d(_MeanFieldConvNd):
    """bayesian-torch's Conv3dReparameterization: kernels sampled by our mean-field reconstruct kernel, then one
    F.conv3d call for all S samples."""
    _spatial = 3

    def _call(self, xx, S, sd, ps):
        pad = self.padding
        if self.padding_mode != "zeros":
            xx, pad = _explicit_pad(xx, self.padding_mode, self.padding, self.kernel_size, self.dilation)
        w, b = _mf_weights(self, S, sd)
        return _vendor_conv_all_samples(False, 3, xx, w, b, self.stride, pad, self.dilation, self.groups, None, ps)


class _MeanFieldConvTransposeNd(_MeanFieldLayer):
    """bayesian-torch's ConvTransposeNdReparameterization (its argument order: ..., dilation, groups,
    output_padding, prior_mean, ...; kernel [in, out/groups, *k]): kernels sampled by our mean-field
    reconstruct kernel, then one F.conv_transposeNd call for all S samples. ``output_size=`` as in
    nn.ConvTransposeNd."""
    _spatial = 2
    _w_mu = "mu_kernel"
    _w_rho = "rho_kernel"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, output_padding=0, prior_mean: float = 0, prior_variance: float = 1,
                 posterior_mu_init: float = 0, posterior_rho_init: float = -3.0, bias: bool = True, *,
                 rng_id: Optional[int] = None, estimator: str = "reparameterization"):
        super().__init__()
        _set_conv_t_hparams(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                            output_padding)
        self._init_mf((in_channels, out_channels // groups, *self.kernel_size), out_channels, prior_mean,
                      prior_variance, posterior_mu_init, posterior_rho_init, bias, rng_id, estimator)

    def _conv(self, xx, S, sd, ps, opad):
        w, b = _mf_weights(self, S, sd)
        return _vendor_conv_all_samples(True, self._spatial, xx, w, b, self.stride, self.padding, self.dilation,
                                        self.groups, opad, ps)

    def _call(self, xx, S, sd, ps):
        return self._conv(xx, S, sd, ps, self.output_padding)

    def _det(self, x, w, b, opad=None):
        return _CONV_T_OPS[self._spatial](x, w.to(x.dtype), None if b is None else b.to(x.dtype), self.stride,
                                          self.padding, self.output_padding if opad is None else opad, self.groups,
                                          self.dilation)

    def forward(self, x: torch.Tensor, return_kl: bool = True, *, samples: Optional[int] = None, seed=None,
                per_sample: bool = False, output_size=None):
        opad = _output_padding_for(self, x, output_size, per_sample)
        if self.estimator == "flipout":
            def call(xx, S, sd, ps):
                return self._flipout_call(xx, S, sd, ps, opad)
        else:
            def call(xx, S, sd, ps):
                return self._conv(xx, S, sd, ps, opad)
        out = _run_sampled(x, samples, seed, per_sample, call)
        if return_kl and not self._dnn_to_bnn_flag:
            return out, self.kl_loss()
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias}, prior=N({self.prior_mean}, {self.prior_variance}^2), "
                f"rng_id={self.owner}")


class MeanFieldConvTranspose1d(_MeanFieldConvTransposeNd):
    """bayesian-torch's ConvTranspose1dReparameterization, on sws_kernels' seeded kernels."""
    _spatial = 1


class MeanFieldConvTranspose2d(_MeanFieldConvTransposeNd):
    """bayesian-torch's ConvTranspose2dReparameterization, on sws_kernels' seeded kernels."""
    _spatial = 2


class MeanFieldConvTranspose3d(_MeanFieldConvTransposeNd):
    """bayesian-torch's ConvTranspose3dReparameterization, on sws_kernels' seeded kernels."""
    _spatial = 3


SWS_LAYERS = (SWSLinear, SWSConv1d, SWSConv2d, SWSConv3d, SWSConvTranspose1d, SWSConvTranspose2d,
              SWSConvTranspose3d)
MEAN_FIELD_LAYERS = (MeanFieldLinear, MeanFieldConv1d, MeanFieldConv2d, MeanFieldConv3d, MeanFieldConvTranspose1d,
                     MeanFieldConvTranspose2d, MeanFieldConvTranspose3d)
# mean-field class -> the SWS class to_sws puts in its place
SWS_COUNTERPART = dict(zip(MEAN_FIELD_LAYERS, SWS_LAYERS))
