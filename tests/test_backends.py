"""Backend discovery and selection: import never fails, reasons are explained, forcing works."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sws_kernels as sws


def test_backends_table_shape():
    table = sws.backends()
    assert set(table) == {"reference", "triton", "native_cpu", "native_cuda"}
    for name, (ok, why) in table.items():
        assert isinstance(ok, bool) and isinstance(why, str)
        if not ok:
            assert why, f"{name} unavailable without a reason"
    assert table["reference"] == (True, "")


def test_backend_context_manager_nests_and_resets():
    from sws_kernels import _backend
    assert _backend.current() == "auto"
    with sws.backend("reference"):
        assert _backend.current() == "reference"
        with sws.backend("native"):
            assert _backend.current() == "native"
        assert _backend.current() == "reference"
    assert _backend.current() == "auto"
    with pytest.raises(ValueError, match="backend.*bogus"):
        with sws.backend("bogus"):
            pass
    assert _backend.current() == "auto"


def test_forced_reference_is_used():
    from sws_kernels import _backend
    with sws.backend("reference"):
        name, kernel, why = _backend.select("reconstruct", torch.device("cpu"), torch.float32)
    assert (name, kernel, why) == ("reference", None, "forced")


def test_forced_native_cuda_without_gpu_explains():
    if sws.backends()["native_cuda"][0]:
        pytest.skip("a CUDA device is present")
    from sws_kernels import _backend
    with sws.backend("native"), pytest.raises(RuntimeError, match="native_cuda.*unavailable"):
        _backend.select("reconstruct", torch.device("cuda"), torch.float32)


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_import_without_compiled_module_falls_back_to_reference():
    r = _run("""
        import sys
        sys.modules["sws_kernels._C"] = None  # make `from . import _C` fail as if it were never built
        import torch, sws_kernels as sws
        ok, why = sws.backends()["native_cpu"]
        assert not ok and "_C" in why, why
        m, c = torch.randn(3, 2), torch.randn(3, 3)
        lab = torch.randint(0, 3, (4, 5), dtype=torch.int16)
        w = sws.functional.reconstruct(m, c, lab, seed=1, samples=2)
        assert torch.equal(w, sws.reference.reconstruct(m, c, lab, seed=1, samples=2))
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_import_without_triton_explains():
    r = _run("""
        import sys
        sys.modules["triton"] = None
        import sws_kernels as sws
        ok, why = sws.backends()["triton"]
        assert not ok and "triton" in why, why
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_triton_needs_gpu_or_interpreter():
    r = _run("""
        import torch, sws_kernels as sws
        ok, why = sws.backends()["triton"]
        if torch.cuda.is_available():
            assert ok
        else:
            assert not ok and "TRITON_INTERPRET" in why, why
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
