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
