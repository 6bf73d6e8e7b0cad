"""Test setup: the Triton interpreter on machines without a GPU (set before any kernel is imported)."""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:  # Triton launchers allocate with torch.empty; in tests every output starts as NaN / -1 instead
    from sws_kernels.triton import _launch as _triton_launch

    _triton_launch.POISON = True
except ImportError:  # pragma: no cover - no triton: its tests skip
    pass


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from pytest's random order-independent node id hash."""
    import torch

    g = torch.Generator()
    g.seed()  # fresh random inputs every run; failures print the inputs' seed
    print(f"rng initial_seed={g.initial_seed()}")
    return g


def pytest_report_header(config):
    import sws_kernels

    lines = ["sws_kernels backends:"]
    for name, (ok, why) in sws_kernels.backends().items():
        lines.append(f"  {name:12s} {'yes' if ok else 'no '} {why}")
    return lines


# ------------------------------------------------------------------------------------------------------
# Backends: one parametrisation for every op file
#
#   @pytest.mark.backends("reference", "native_cpu", "native_cuda", "triton")
#   def test_x(backend): ...            # runs once per listed backend (ids: the names above)
#
# The names are the keys of sws_kernels.backends(); a backend it reports unavailable is skipped with its
# reason. A test (or a module's pytestmark) with the marker but without the `backend` argument is not
# parametrised: it skips unless every listed backend is available (e.g. tests of sws_kernels._C itself).
# ------------------------------------------------------------------------------------------------------

ALL_BACKENDS = ("reference", "native_cpu", "native_cuda", "triton")


class Backend:
    """One backend under test: `key` (sws_kernels.backends()), `name` (sws_kernels.backend() choice), `device`."""

    def __init__(self, key):
        import torch

        self.key = key
        self.name = "native" if key.startswith("native") else key
        # Triton runs compiled on a GPU, else under the interpreter on CPU tensors (TRITON_INTERPRET above)
        cuda = key == "native_cuda" or (key == "triton" and _HAS_CUDA)
        self.device = torch.device("cuda" if cuda else "cpu")

    def __call__(self):
        """`with backend():` forces this backend for the ops called inside."""
        import sws_kernels

        return sws_kernels.backend(self.name)

    def to(self, *ts):
        """Tensors (or tuples of tensors, or None) on this backend's device; one argument gives one result."""
        out = tuple(None if t is None else tuple(x.to(self.device) for x in t) if isinstance(t, tuple)
                    else t.to(self.device) for t in ts)
        return out[0] if len(ts) == 1 else out

    def __repr__(self):
        return self.key


def _unavailable(keys):
    import sws_kernels

    table = sws_kernels.backends()
    for key in keys:
        if key not in table:
            raise ValueError(f"@pytest.mark.backends: unknown backend {key!r}; expected one of {ALL_BACKENDS}")
        ok, why = table[key]
        if not ok:
            return f"{key} unavailable: {why}"
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): run on these sws_kernels.backends() (see conftest.py)")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", marker.args or ALL_BACKENDS, indirect=True, ids=str)


@pytest.fixture
def backend(request):
    """The Backend a @pytest.mark.backends test runs on (skipped, with the reason, where unavailable)."""
    why = _unavailable([request.param])
    if why:
        pytest.skip(why)
    return Backend(request.param)


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("backends")
    if marker is not None and "backend" not in getattr(item, "fixturenames", ()):
        why = _unavailable(marker.args or ALL_BACKENDS)
        if why:
            pytest.skip(why)


@pytest.fixture(params=["avx2", "scalar"])
def simd(request):
    """Run a native CPU test with the vector code on, then off (the switch is process-wide: always restored)."""
    why = _unavailable(["native_cpu"])
    if why:
        pytest.skip(why)
    from sws_kernels import native

    if request.param == "avx2" and native._C.simd_level() != "avx2":
        pytest.skip("this CPU has no AVX2+FMA: only the scalar version exists")
    native.set_simd(request.param == "avx2")
    try:
        assert native.simd_level() == request.param
        yield request.param
    finally:
        native.set_simd(True)


# ------------------------------------------------------------------------------------------------------
# Shared helpers of the op tests (`from conftest import make_layer, to64, DEV`)
# ------------------------------------------------------------------------------------------------------

# CUDA tensors where there is a GPU (compiled Triton kernels), else CPU tensors under the interpreter
DEV = "cuda" if _HAS_CUDA else "cpu"


def make_layer(rng, shape, K, E=0, O=0, label_dtype=None, device=DEV):
    """Fresh random float32 SWS parameters with E ellipse and O outlier positions (disjoint); None when E/O = 0."""
    import math

    import torch

    label_dtype = torch.int16 if label_dtype is None else label_dtype
    n = math.prod(shape)
    means = torch.randn(K, 2, generator=rng) * torch.tensor([0.1, 1.0])
    means[:, 1] -= 3
    chol = torch.randn(K, 3, generator=rng) * 0.5 - torch.tensor([2.0, 0.0, 2.0])
    labels = torch.randint(0, K, shape, generator=rng).to(label_dtype)
    pos = torch.randperm(n, generator=rng)[: E + O]
    ellipse = outliers = None
    if E:
        ellipse = (pos[:E], torch.randint(0, K, (E,), generator=rng), torch.randint(0, K, (E,), generator=rng),
                   torch.rand(E, generator=rng))
    if O:
        outliers = (pos[E:], torch.randn(O, generator=rng) * 0.3, torch.randn(O, generator=rng) - 3)
    mv = lambda t: t.to(device)  # noqa: E731
    tmap = lambda tup: None if tup is None else tuple(mv(t) for t in tup)  # noqa: E731
    return mv(means), mv(chol), mv(labels), tmap(ellipse), tmap(outliers)


def to64(t):
    """float64 copy of a tensor or of the floating tensors of a tuple (ints unchanged); None stays None."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(to64(x) for x in t)
    return t.double() if t.is_floating_point() else t
