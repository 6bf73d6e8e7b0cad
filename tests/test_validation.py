"""Validation runs when data enters, not on every call (issue 11; ARCHITECTURE.md, "The hot path").

- A steady-state forward + backward of SWSLinear, SWSConv2d and MeanFieldLinear runs no host-sync op, counted
  by a TorchDispatchMode (inside our opaque custom ops too), on the reference and the native backend.
- The functional API checks index data (labels, ellipse, outlier positions) once per tensor version.
- sws.validate() and SWS_VALIDATE=1 run every check on every call.
- Modules check data at construction, buffer assignment, load_state_dict and sws.load.
"""
import collections
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sws_kernels as sws
from sws_kernels import _checks, native
from sws_kernels import functional as F
from sws_kernels import nn as snn

K = 5
BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(
    not native.AVAILABLE_CPU, reason=f"native CPU module: {native.CPU_REASON}"))]
# ops that copy a device value to the host (a device sync on CUDA) or whose output size depends on data
_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "nonzero_static", "nonzero_numpy"}
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class SyncCounter(TorchDispatchMode):
    """Counts host-sync ops by overload name (``counts``), with the Python frames of the library that ran them
    (``where``), including the ops inside the implementations of our opaque ``sws_kernels::`` custom ops."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.where = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::", 1)[1]
        if name in _SYNC_OPS or name.startswith(("unique", "_unique")):
            self.counts[str(func)] += 1
            import traceback
            frames = [f"{os.path.basename(f.filename)}:{f.lineno}" for f in traceback.extract_stack()
                      if f"{os.sep}sws_kernels{os.sep}" in f.filename]
            self.where[(str(func), " <- ".join(reversed(frames[-4:])))] += 1
        if func.namespace == "sws_kernels":
            # A mode is popped while it handles an op: re-enter it and run the op's CPU kernel, so the ops our
            # custom ops run inside (launchers, native wrappers, reference fallbacks) are counted as well.
            with self:
                return func.redispatch(_CPU, *args, **kwargs)
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@pytest.fixture
def per_version(monkeypatch):
    """The default policy even when the suite runs with SWS_VALIDATE=1 (which re-checks on every call)."""
    monkeypatch.setattr(_checks, "_ENV", False)


def _special(rng, n, E=3, O=2):
    perm = torch.randperm(n, generator=rng)
    ell = (perm[:E], torch.randint(0, K, (E,), generator=rng), torch.randint(0, K, (E,), generator=rng),
           torch.rand(E, generator=rng))
    outl = (perm[E:E + O], 0.3 * torch.randn(O, generator=rng), -4 + 0.5 * torch.randn(O, generator=rng))
    return ell, outl


def _layer(kind, rng):
    if kind == "SWSLinear":
        ell, outl = _special(rng, 4 * 6)
        layer = snn.SWSLinear(6, 4, codebook=snn.Codebook(K), ellipse=ell, outliers=outl)
        x = torch.randn(3, 6, generator=rng)
    elif kind == "SWSConv2d":
        ell, outl = _special(rng, 3 * 2 * 3 * 3)
        layer = snn.SWSConv2d(2, 3, 3, padding=1, codebook=snn.Codebook(K), ellipse=ell, outliers=outl)
        x = torch.randn(2, 2, 5, 5, generator=rng)
    else:
        layer = snn.MeanFieldLinear(6, 4)
        x = torch.randn(3, 6, generator=rng)
    return layer, x.requires_grad_()


def _step(layer, x, seed):
    out = layer(x) if seed is None else layer(x, seed=seed)
    if isinstance(out, tuple):  # mean-field layers return (out, kl)
        out = out[0].sum() + out[1]
    out.sum().backward()


# ---------------------------------------------------------------------------------------------------------
# No host sync in a steady-state training step
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [123, None], ids=["explicit_seed", "default_seed"])
@pytest.mark.parametrize("kind", ["SWSLinear", "SWSConv2d", "MeanFieldLinear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_state_step_has_no_host_sync(rng, per_version, backend, kind, seed):
    layer, x = _layer(kind, rng)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    with sws.backend(backend):
        _step(layer, x, seed)  # warm-up
        opt.step()  # parameters change in place every step: that must not bring checks back
        opt.zero_grad()
        with SyncCounter() as c:
            _step(layer, x, seed)
    assert c.total == 0, f"host syncs in a steady-state step: {dict(c.where)}"
    assert x.grad is not None and all(p.grad is not None for p in opt.param_groups[0]["params"])


@torch.library.custom_op("sws_kernels::sync_probe_for_tests", mutates_args=())
def _sync_probe(t: torch.Tensor) -> torch.Tensor:
    """An opaque op in our namespace whose kernel reads a value on the host, as a careless kernel would."""
    return t * float(t.sum())


@_sync_probe.register_fake
def _(t):
    return torch.empty_like(t)


def test_sync_counter_sees_syncs_inside_custom_ops():
    """The counter is not blind inside our opaque ops (torch.compile calls them; so may the eager path)."""
    with SyncCounter() as c:
        torch.ops.sws_kernels.sync_probe_for_tests(torch.ones(3))
    assert c.total == 1, dict(c.counts)


# ---------------------------------------------------------------------------------------------------------
# Functional API: index data checked once per tensor version
# ---------------------------------------------------------------------------------------------------------

def _functional_args(rng, shape=(4, 6)):
    n = shape[0] * shape[1]
    means = torch.randn(K, 2, generator=rng) * torch.tensor([0.1, 1.0]) - torch.tensor([0.0, 3.0])
    chol = torch.randn(K, 3, generator=rng) * 0.5 - torch.tensor([2.0, 0.0, 2.0])
    labels = torch.randint(0, K, shape, generator=rng, dtype=torch.int16)
    ell, outl = _special(rng, n)
    return means, chol, labels, ell, outl


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_checks_index_data_once_per_version(rng, per_version, backend):
    means, chol, labels, ell, outl = _functional_args(rng)
    x = torch.randn(3, 6, generator=rng)

    def call(lab=labels, e=ell, o=outl):
        return F.sws_linear(x, means, chol, lab, e, o, seed=7, samples=2)

    with sws.backend(backend):
        with SyncCounter() as first:
            y = call()
        assert first.total > 0  # first use of these tensors: checked
        with SyncCounter() as second:
            y2 = call()
        assert torch.equal(y2, y)
        assert second.total == 0, dict(second.where)

        with torch.no_grad():
            means.add_(0.01)  # a trainable parameter changes every step: no re-check
            outl[1].add_(0.01)
        with SyncCounter() as c:
            call()
        assert c.total == 0, dict(c.where)

        copy = labels.clone()  # same values, a new tensor: checked once
        with SyncCounter() as c:
            call(lab=copy)
        assert c.total > 0

        labels[1, 2] = K  # in place: bumps labels._version, so the next call checks again
        with pytest.raises(ValueError, match=rf"labels: expected component indices \(K = {K}\) in \[0, {K}\), "
                                             rf"got values in \[\d+, {K}\]"):  # the minimum is the data's
            call()
        labels[1, 2] = 0
        call()  # fixed: checked again, passes, remembered
        with SyncCounter() as c:
            call()
        assert c.total == 0

        ell[3][0] = 1.5  # alpha out of [0, 1]
        with pytest.raises(ValueError, match=r"ellipse alpha: expected values in \[0, 1\], got \[.*, 1.5\]"):
            call()
        ell[3][0] = 0.5
        ell[1][1] = K  # ellipse comp_a
        with pytest.raises(ValueError, match=rf"ellipse comp_a: expected component indices .* got values in"):
            call()
        ell[1][1] = 0
        outl[0][0] = ell[0][0]  # an outlier at an ellipse position
        with pytest.raises(ValueError, match="at most once"):
            call()
        outl[0][0] = 24  # outside the 4 x 6 weight
        with pytest.raises(ValueError, match=r"outlier positions: expected flat weight indices \(n = 24\) in "
                                             r"\[0, 24\), got values in \[.*, 24\]"):
            call()


def test_functional_checks_again_for_another_codebook_size(rng, per_version):
    means, chol, labels, _, _ = _functional_args(rng)
    labels.fill_(K - 1)
    F.reconstruct(means, chol, labels, seed=1)
    with pytest.raises(ValueError, match=rf"labels: .*in \[0, {K - 1}\)"):  # same labels, fewer components
        F.reconstruct(means[:-1], chol[:-1], labels, seed=1)


def test_recycled_tensor_id_cannot_skip_a_check(rng, per_version):
    means, chol, labels, _, _ = _functional_args(rng)
    entries = len(_checks._SEEN)
    for _ in range(30):
        good = torch.randint(0, K, (4, 6), generator=rng, dtype=torch.int16)
        F.reconstruct(means, chol, good, seed=1)
        del good  # its record dies with it; a new tensor may get the same id and _version 0
        bad = torch.full((4, 6), K, dtype=torch.int16)
        with pytest.raises(ValueError, match="labels"):
            F.reconstruct(means, chol, bad, seed=1)
        del bad
    assert len(_checks._SEEN) == entries  # records of dead tensors are dropped


def test_inference_tensors_are_checked_on_every_call(rng, per_version):
    """Inference tensors have no version counter: nothing can be remembered, so every call checks."""
    means, chol, _, _, _ = _functional_args(rng)
    with torch.inference_mode():
        labels = torch.randint(0, K, (4, 6), generator=rng, dtype=torch.int16)
        F.reconstruct(means, chol, labels, seed=1)
        with SyncCounter() as c:
            F.reconstruct(means, chol, labels, seed=1)
        assert c.total > 0
        with pytest.raises(ValueError, match="labels"):
            F.reconstruct(means, chol, torch.full((4, 6), K, dtype=torch.int16), seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_finiteness_is_not_checked_per_call(rng, per_version, backend):
    """No per-call finiteness check (no sync), and a NaN parameter gives NaN in every weight it feeds."""
    means, chol, labels, _, outl = _functional_args(rng)
    x = torch.randn(2, 6, generator=rng)
    F.reconstruct(means, chol, labels, None, outl, seed=1)  # labels and outlier positions checked, remembered
    for name, poison in (("means", lambda m, c, r: m[:, 0].fill_(float("nan"))),
                         ("chol", lambda m, c, r: c[:, 0].fill_(float("nan"))),  # the mu Cholesky factor a
                         ("outlier rho", lambda m, c, r: r.fill_(float("nan")))):
        m, c, o = means.clone(), chol.clone(), (outl[0], outl[1], outl[2].clone())
        poison(m, c, o[2])
        with sws.backend(backend):
            with SyncCounter() as cnt:
                w = F.reconstruct(m, c, labels, None, o, seed=1)
                y = F.sws_linear(x, m, c, labels, None, o, seed=1)
        assert cnt.total == 0, (name, dict(cnt.where))
        flat = w.reshape(-1)
        if name == "outlier rho":  # only the outliers' own weights
            nan_at = torch.zeros_like(flat, dtype=torch.bool)
            nan_at[o[0]] = True
        else:  # every weight but the outliers (their own mu, rho) comes from a component
            nan_at = torch.ones_like(flat, dtype=torch.bool)
            nan_at[o[0]] = False
        assert torch.equal(torch.isnan(flat), nan_at), f"{backend}: NaN {name} must give NaN weights exactly there"
        assert torch.isnan(y).any(), f"{backend}: NaN {name} must reach the output"
    mu, rho = torch.randn(4, 6, generator=rng), torch.randn(4, 6, generator=rng) - 3
    rho[1] = float("nan")
    with sws.backend(backend):
        with SyncCounter() as cnt:
            w = F.mean_field_reconstruct(mu, rho, seed=1)
            y = F.mean_field_linear(x, mu, rho, seed=1)
    assert cnt.total == 0, dict(cnt.where)
    assert torch.equal(torch.isnan(w[0]), torch.isnan(rho)), f"{backend}: NaN rho must give NaN weights exactly there"
    assert torch.isnan(y[0][:, 1]).all() and not torch.isnan(y[0][:, 0]).any()


# ---------------------------------------------------------------------------------------------------------
# validate() and SWS_VALIDATE=1: every check on every call
# ---------------------------------------------------------------------------------------------------------

def test_validate_context_runs_every_check_on_every_call(rng, per_version):
    layer, x = _layer("SWSLinear", rng)
    layer(x, seed=1)
    with SyncCounter() as c:
        layer(x, seed=1)
    assert c.total == 0
    with sws.validate():
        assert _checks.always()
        with SyncCounter() as c:
            layer(x, seed=1)
        assert c.total > 0  # index data re-checked although unchanged, parameters checked for finiteness
        with torch.no_grad():
            layer.codebook.means[:, 0] = float("nan")
        with pytest.raises(ValueError, match="means: expected finite values, got 5 non-finite value"):
            layer(x, seed=1)
        mf, xm = _layer("MeanFieldLinear", rng)
        with torch.no_grad():
            mf.rho_weight[0, 0] = float("inf")
        with pytest.raises(ValueError, match="rho.*non-finite"):
            mf(xm, seed=1)
    assert not _checks.always()
    assert torch.isnan(layer(x, seed=1)).any()  # outside the block: NaN gives NaN
    assert not torch.isfinite(mf(xm, seed=1)[0]).all()


def test_validate_blocks_nest(per_version):
    with sws.validate():
        with sws.validate():
            assert _checks.always()
        assert _checks.always()
    assert not _checks.always()


def test_sws_validate_environment_variable():
    code = textwrap.dedent("""
        import torch, sws_kernels as sws
        from sws_kernels import _checks, functional as F
        assert _checks.always()
        means, chol = torch.zeros(3, 2), torch.zeros(3, 3)
        labels = torch.zeros(4, 5, dtype=torch.uint8)
        calls = []
        real = _checks._sws_data
        _checks._sws_data = lambda *a: (calls.append(1), real(*a))
        with sws.backend("reference"):
            F.reconstruct(means, chol, labels, seed=1)
            F.reconstruct(means, chol, labels, seed=1)
            assert len(calls) >= 2, calls  # the unchanged labels are checked on every call
            bad = means.clone()
            bad[0, 0] = float("nan")
            try:
                F.reconstruct(bad, chol, labels, seed=1)
            except ValueError as e:
                assert "means" in str(e) and "non-finite" in str(e), e
            else:
                raise AssertionError("non-finite means passed with SWS_VALIDATE=1")
        print("validated on every call")
    """)
    env = dict(os.environ, SWS_VALIDATE="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "validated on every call" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------------
# Modules: data checked when it enters
# ---------------------------------------------------------------------------------------------------------

def test_module_forward_runs_no_data_check_after_construction(rng, per_version):
    for kind in ("SWSLinear", "SWSConv2d", "MeanFieldLinear"):
        layer, x = _layer(kind, rng)
        with SyncCounter() as c, torch.no_grad():
            layer(x, seed=3)  # the very first call: the constructor already checked and recorded the buffers
        assert c.total == 0, (kind, dict(c.where))


@pytest.mark.parametrize("name,make,err,match", [
    ("labels", lambda lay: torch.full(lay.weight_shape, K, dtype=torch.uint8), ValueError,
     rf"labels: expected component indices \(the codebook has num_components={K}\) in \[0, {K}\), "
     rf"got values in \[{K}, {K}\]"),
    ("labels", lambda lay: torch.zeros(3, 3, dtype=torch.uint8), ValueError,
     r"labels: expected the weight shape \(4, 6\), got torch.uint8 tensor of shape \(3, 3\)"),
    ("labels", lambda lay: torch.zeros(lay.weight_shape), TypeError, "labels: expected an integer tensor"),
    ("labels", lambda lay: None, TypeError, "labels: expected a torch.Tensor, got NoneType"),
    ("labels", lambda lay: torch.zeros(lay.weight_shape, dtype=torch.uint8, device="meta"), ValueError,
     "labels: expected a tensor on cpu"),
    ("ellipse_pos", lambda lay: torch.tensor([0, 1, 24]), ValueError,
     r"ellipse_pos: expected flat weight indices \(n = 24\) in \[0, 24\), got values in \[0, 24\]"),
    ("ellipse_a", lambda lay: torch.tensor([0, K, 1], dtype=torch.uint8), ValueError,
     rf"ellipse_a: expected component indices \(K = {K}\) in \[0, {K}\), got values in \[0, {K}\]"),
    ("ellipse_b", lambda lay: torch.tensor([[0, 1, 2]]), ValueError, "ellipse_b: expected 1 dimension"),
    ("ellipse_alpha", lambda lay: torch.tensor([0.5, 1.5, 0.0]), ValueError,
     r"ellipse_alpha: expected values in \[0, 1\], got \[0.0, 1.5\]"),
    ("ellipse_alpha", lambda lay: torch.tensor([0.5, float("nan"), 0.0]), ValueError,
     "ellipse_alpha: expected finite values, got 1 non-finite"),
    ("outlier_pos", lambda lay: torch.tensor([-1, 3]), ValueError, r"outlier_pos: .*got values in \[-1, 3\]"),
    ("outlier_mu", lambda lay: torch.nn.Parameter(torch.tensor([0.1, float("inf")])), ValueError,
     "outlier_mu: expected finite values"),
    ("outlier_sigma0", lambda lay: torch.tensor([0.1, 0.0]), ValueError,
     r"outlier_sigma0: expected positive values .*got min 0.0"),
])
def test_bad_buffer_assignment_raises_at_entry(rng, name, make, err, match):
    layer, _ = _layer("SWSLinear", rng)
    old = getattr(layer, name)
    with pytest.raises(err, match=match):
        setattr(layer, name, make(layer))
    assert getattr(layer, name) is old  # rejected before it replaced anything


def test_buffer_assignment_checked_once_then_steady(rng, per_version):
    layer, x = _layer("SWSLinear", rng)
    layer.labels = torch.randint(0, K, layer.weight_shape, generator=rng, dtype=torch.uint8)
    with SyncCounter() as c:
        layer(x, seed=1)  # the relations between buffers are checked at the first call with the new tensor
    assert c.total > 0
    with SyncCounter() as c:
        layer(x, seed=1)
    assert c.total == 0
    # each tensor valid on its own, but an ellipse position now collides with an outlier position
    layer.ellipse_pos = torch.cat([layer.outlier_pos[:1], layer.ellipse_pos[1:]])
    with pytest.raises(ValueError, match="at most once"):
        layer(x, seed=1)


def test_in_place_buffer_edit_caught_at_next_call(rng, per_version):
    layer, x = _layer("SWSConv2d", rng)
    layer(x, seed=1)
    with torch.no_grad():
        layer.labels[0, 0, 0, 0] = K
    with pytest.raises(ValueError, match=rf"labels: .*got values in \[\d+, {K}\]"):
        layer(x, seed=1)


def test_construction_checks_finiteness():
    with pytest.raises(ValueError, match="means: expected finite values"):
        snn.Codebook(3, means=torch.tensor([[0.0, -3.0], [float("nan"), -3.0], [0.1, -3.0]]))
    with pytest.raises(ValueError, match="outlier mu: expected finite values"):
        snn.SWSLinear(3, 2, codebook=snn.Codebook(3),
                      outliers=(torch.tensor([1]), torch.tensor([float("nan")]), torch.tensor([-4.0])))
    with pytest.raises(ValueError, match="mu_weight: expected finite values"):
        snn.MeanFieldLinear(3, 2, posterior_mu_init=1e39)  # a finite float, inf in float32


def _model():
    cb = snn.Codebook(K, rng_id=11)
    ell = (torch.tensor([0, 5, 9]), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 0]), torch.tensor([0.2, 0.5, 0.9]))
    outl = (torch.tensor([2, 7]), torch.tensor([0.3, -0.2]), torch.tensor([-4.0, -3.5]))
    return torch.nn.Sequential(snn.SWSLinear(6, 4, codebook=cb, ellipse=ell, outliers=outl, rng_id=12),
                               torch.nn.ReLU(), snn.MeanFieldLinear(4, 3, rng_id=13))


def _run(model, x, seed):
    """The _model() network with one seed for every layer."""
    return model[2](model[1](model[0](x, seed=seed)), return_kl=False, seed=seed)


@pytest.mark.parametrize("key,edit,err,match", [
    ("0.labels", lambda t: t.fill_(K), ValueError, rf"^0: labels: expected component indices .*\[0, {K}\)"),
    ("0.ellipse_alpha", lambda t: t.__setitem__(0, -0.5), ValueError, r"^0: ellipse alpha: expected values in"),
    ("0.outlier_pos", lambda t: t.__setitem__(0, 5), ValueError, "^0: ellipse/outlier positions: .*at most once"),
    ("0.outlier_rho", lambda t: t.__setitem__(1, float("nan")), ValueError, "^0: outlier rho: expected finite"),
    ("0.outlier_sigma0", lambda t: t.__setitem__(0, -1.0), ValueError, "^0: outlier_sigma0: expected positive"),
    ("0.codebook.chol", lambda t: t.__setitem__((1, 2), float("inf")), ValueError,
     "^0.codebook: chol: expected finite values"),
    ("2.rho_weight", lambda t: t.__setitem__((0, 0), float("nan")), ValueError, "^2: rho_weight: expected finite"),
    ("2.mu_bias", lambda t: t.__setitem__(0, float("inf")), ValueError, "^2: mu_bias: expected finite"),
])
def test_bad_load_state_dict_raises_at_entry(key, edit, err, match):
    sd = _model().state_dict()
    edit(sd[key])
    with pytest.raises(err, match=match):
        _model().load_state_dict(sd)


def test_load_state_dict_records_checked_buffers(rng, per_version):
    src = _model()
    dst = torch.nn.Sequential(snn.SWSLinear(6, 4, codebook=snn.Codebook(2)), torch.nn.ReLU(),
                              snn.MeanFieldLinear(4, 3))
    dst.load_state_dict(src.state_dict())  # adopts K, ellipse/outlier counts; checked by the post-hooks
    x = torch.randn(2, 6, generator=rng)
    with SyncCounter() as c:
        y = _run(dst, x, seed=4)
    assert c.total == 0, dict(c.where)
    torch.testing.assert_close(y, _run(src, x, seed=4), rtol=0, atol=0)


def test_sws_load_rejects_invalid_values(tmp_path):
    model = _model()
    with torch.no_grad():
        model[0].labels[1, 1] = K  # in place (not an assignment): save() writes whatever the model holds
    path = tmp_path / "bad.sws"
    sws.save(model, path)
    with pytest.raises(ValueError, match=r"bad.sws' holds an invalid value in module '0': labels: expected component"):
        sws.load(path, _model())
    rebuilt = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="holds an invalid value in module '0': labels"):
        sws.load(path, rebuilt)  # layers rebuilt from the file's configuration, then loaded: same check
    good = _model()
    sws.save(good, tmp_path / "good.sws")
    loaded = sws.load(tmp_path / "good.sws", _model())
    with SyncCounter() as c, torch.no_grad():
        _run(loaded, torch.randn(2, 6), seed=1)
    assert c.total == 0, dict(c.where)


# ---------------------------------------------------------------------------------------------------------
# API edges (issue 16 item 5): NumPy integers wherever ints are, our errors instead of raw torch ones
# ---------------------------------------------------------------------------------------------------------

_EDGE_BACKENDS = ["auto", "reference"] + (["triton"] if sws.backends()["triton"][0] else [])


def test_numpy_integers_are_accepted_wherever_ints_are(rng):
    np = pytest.importorskip("numpy")
    cb = snn.Codebook(np.int64(4))
    layer = snn.SWSLinear(np.int32(5), np.int64(3), codebook=cb, rng_id=np.uint32(7))
    x = torch.randn(2, 5, generator=rng)
    y_np = layer(x, samples=np.int64(2), seed=np.uint64(9))
    assert torch.equal(y_np, layer(x, samples=2, seed=9)) and layer.owner == 7
    conv = snn.SWSConv2d(np.int64(3), 4, (np.int64(3), 3), stride=np.int16(1), codebook=cb)
    assert conv(torch.randn(1, 3, 5, 5, generator=rng), seed=np.int64(1)).shape == (1, 4, 3, 3)
    mf = snn.MeanFieldLinear(np.int64(5), 3)
    out, _ = mf(x, samples=np.int8(3), seed=np.int64(2))
    assert out.shape == (3, 2, 3)
    w = F.reconstruct(cb.means, cb.chol, torch.zeros(3, 5, dtype=torch.uint8), seed=np.uint64(5), samples=np.int64(2),
                      owner=np.int64(3))
    assert w.shape == (2, 3, 5)
    with torch.no_grad(), snn.sample_mode(np.int64(2)):
        pass
    with pytest.raises(TypeError, match="samples"):
        layer(x, samples=np.float64(2.0))
    with pytest.raises(TypeError, match="seed"):
        layer(x, seed=np.bool_(True))


@pytest.mark.parametrize("backend", _EDGE_BACKENDS)
def test_too_many_samples_is_our_error_before_any_allocation(backend):
    cb = snn.Codebook(4)
    layer = snn.SWSLinear(5, 3, codebook=cb)
    mf = snn.MeanFieldLinear(5, 3)
    x = torch.randn(2, 5)
    with sws.backend(backend):
        for call in (lambda: layer(x, samples=2 ** 31), lambda: mf(x, samples=2 ** 31),
                     lambda: F.reconstruct(cb.means, cb.chol, torch.zeros(64, 64, dtype=torch.uint8), seed=1,
                                           samples=2 ** 30),
                     lambda: F.mean_field_reconstruct(torch.zeros(64, 64), torch.zeros(64, 64), seed=1,
                                                      samples=2 ** 30)):
            with pytest.raises(ValueError, match=r"samples: \d+ samples of \d+ weights need .* GiB"):
                call()


@pytest.mark.parametrize("backend", _EDGE_BACKENDS)
def test_empty_weights_and_inputs_behave_like_f_linear(rng, backend):
    cb = snn.Codebook(4)
    with sws.backend(backend):
        for out_f, in_f, rows in ((0, 5, 2), (3, 0, 2), (3, 5, 0)):
            x = torch.randn(rows, in_f, generator=rng)
            labels = torch.zeros(out_f, in_f, dtype=torch.uint8)
            y = F.sws_linear(x, cb.means, cb.chol, labels, seed=1, samples=2)
            assert y.shape == (2, rows, out_f) and (y == 0).all()
            m = torch.zeros(out_f, in_f)
            y = F.mean_field_linear(x, m, m - 3, seed=1, samples=2)
            assert y.shape == (2, rows, out_f) and (y == 0).all()


@pytest.mark.parametrize("backend", _EDGE_BACKENDS)
def test_conv_input_mismatches_are_our_errors(rng, backend):
    cb = snn.Codebook(4)
    layers = [snn.SWSConv2d(3, 4, 3, codebook=cb), snn.MeanFieldConv2d(3, 4, 3), snn.SWSConv1d(2, 4, 3, groups=2,
                                                                                                 codebook=cb)]
    with sws.backend(backend):
        with pytest.raises(ValueError, match=r"x: expected 3 input channels"):
            layers[0](torch.randn(1, 2, 8, 8, generator=rng))
        with pytest.raises(ValueError, match=r"x: expected 3 input channels"):
            layers[1](torch.randn(1, 2, 8, 8, generator=rng))
        with pytest.raises(ValueError, match=r"x: expected 2 input channels .* groups = 2"):
            layers[2](torch.randn(1, 4, 8, generator=rng))
        with pytest.raises(ValueError, match=r"smaller than the kernel \(3, 3\)"):
            layers[0](torch.randn(1, 3, 2, 2, generator=rng))
        with pytest.raises(ValueError, match=r"x: expected 3 input channels"):
            F.sws_conv2d(torch.randn(1, 2, 8, 8, generator=rng), cb.means, cb.chol,
                         torch.zeros(4, 3, 3, 3, dtype=torch.uint8), seed=1)
