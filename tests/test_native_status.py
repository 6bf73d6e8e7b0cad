"""The native CUDA backend's status: lazy (import creates no CUDA context) and explained case by case.

This machine can only show "no driver" or "not built", so explain_cuda (probe facts -> message) is a pure
function driven here with each case a real machine can produce.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from sws_kernels import native
from sws_kernels.native import CudaProbe, arch_support, explain_cuda


def _run(code: str, **env_extra) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_import_queries_no_cuda_state():
    # A fresh interpreter: importing the package (and using CPU ops) must not run the CUDA status, which is
    # the only code that reaches the driver; torch must not have initialised CUDA either.
    r = _run("""
        import torch
        import sws_kernels as sws
        from sws_kernels import native
        assert native.cuda_status_runs == 0, native.cuda_status_runs
        assert "AVAILABLE_CUDA" not in vars(native) and "CUDA_REASON" not in vars(native)
        assert not torch.cuda.is_initialized()
        # first use computes it once and caches it
        ok, why = sws.backends()["native_cuda"]
        assert why and native.cuda_status_runs == 1, (why, native.cuda_status_runs)
        assert (native.AVAILABLE_CUDA, native.CUDA_REASON) == (ok, why)
        sws.backends()
        assert native.cuda_status_runs == 1, native.cuda_status_runs
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_import_without_compiled_module_explains_cuda():
    r = _run("""
        import sys
        sys.modules["sws_kernels._C"] = None
        import sws_kernels as sws
        ok, why = sws.backends()["native_cuda"]
        assert not ok and why.startswith("not built") and "SWS_CUDA=ON" in why, why
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_status_on_this_machine_is_one_of_the_explained_cases():
    ok, why = native.cuda_status()
    if not ok:
        assert why.split(":")[0] in ("not built", "no GPU driver", "driver too old", "no GPU",
                                     "CUDA runtime error", "CUDA status query failed"), why
    else:
        assert "cuda:0" in why, why


def test_unknown_attribute_still_raises():
    with pytest.raises(AttributeError, match="NOT_THERE"):
        native.NOT_THERE  # noqa: B018


# --- explain_cuda, one case each ------------------------------------------------------------------------

BUILD = dict(built=True, runtime_version=13000, archs="80,90")


def test_not_built_says_how_to_build():
    ok, why, bad = explain_cuda(CudaProbe(built=False))
    assert not ok and not bad
    assert why.startswith("not built") and "SWS_CUDA=ON" in why and "pip install" in why, why


def test_no_driver():
    ok, why, _ = explain_cuda(CudaProbe(**BUILD, driver_version=0, count_error=35,
                                        count_error_name="cudaErrorInsufficientDriver"))
    assert not ok and why.startswith("no GPU driver"), why
    assert "cudaErrorInsufficientDriver (35)" in why and ">= 580" in why and "CUDA 13.0" in why, why


def test_driver_too_old_names_both_versions():
    ok, why, _ = explain_cuda(CudaProbe(**BUILD, driver_version=12040, count_error=35,
                                        count_error_name="cudaErrorInsufficientDriver",
                                        kernel_module="550.54.15"))
    assert not ok and why.startswith("driver too old"), why
    # found: the CUDA version the driver supports (and its kernel module); needed: the build's runtime + driver
    for part in ("CUDA 12.4", "cudaDriverGetVersion 12040", "550.54.15", "CUDA 13.0", "CUDART_VERSION 13000",
                 "CUDA 13.x", "Linux driver >= 580"):
        assert part in why, (part, why)


def test_driver_too_old_for_a_cuda12_build():
    ok, why, _ = explain_cuda(CudaProbe(built=True, runtime_version=12080, archs="80", driver_version=11080,
                                        count_error=35, count_error_name="cudaErrorInsufficientDriver"))
    assert not ok and why.startswith("driver too old") and ">= 525.60.13" in why and "CUDA 11.8" in why, why


def test_no_device():
    ok, why, _ = explain_cuda(CudaProbe(**BUILD, driver_version=13000, count_error=100,
                                        count_error_name="cudaErrorNoDevice", visible_devices=""))
    assert not ok and why.startswith("no GPU:"), why
    assert "cudaErrorNoDevice (100)" in why and "CUDA_VISIBLE_DEVICES=''" in why, why
    ok, why, _ = explain_cuda(CudaProbe(**BUILD, driver_version=13000, count_error=0))
    assert not ok and why.startswith("no GPU:") and "returned 0 devices" in why, why


def test_other_runtime_errors_are_named():
    ok, why, _ = explain_cuda(CudaProbe(**BUILD, driver_version=13000, count_error=3,
                                        count_error_name="cudaErrorInitializationError"))
    assert not ok and why.startswith("CUDA runtime error") and "(3)" in why and "fork" in why, why
    ok, why, _ = explain_cuda(CudaProbe(**BUILD, driver_version=13000, count_error=999,
                                        count_error_name="cudaErrorUnknown", count_error_string="unknown error"))
    assert not ok and "cudaErrorUnknown (999): unknown error" in why, why


def test_usable_lists_devices_and_their_code():
    ok, why, bad = explain_cuda(CudaProbe(**BUILD, driver_version=13000,
                                          devices=((0, "NVIDIA H200", 9, 0), (1, "NVIDIA A10", 8, 6))))
    assert ok and not bad, (why, bad)
    assert "cuda:0 NVIDIA H200 sm_90: SASS sm_90" in why and "cuda:1 NVIDIA A10 sm_86: SASS sm_80" in why, why
    assert "CUDA 13.0" in why and "build archs 80,90" in why, why


def test_device_without_code_is_named_with_the_rebuild():
    ok, why, bad = explain_cuda(CudaProbe(**BUILD, driver_version=13000,
                                          devices=((0, "NVIDIA H200", 9, 0), (1, "Tesla T4", 7, 5))))
    assert ok and set(bad) == {1}, (why, bad)  # cuda:0 still runs; cuda:1 is refused by name
    assert "no kernel image for sm_75" in bad[1] and 'SWS_CUDA_ARCHS="75;80;90"' in bad[1], bad
    ok, why, bad = explain_cuda(CudaProbe(**BUILD, driver_version=13000, devices=((0, "Tesla T4", 7, 5),)))
    assert not ok and set(bad) == {0} and "no kernel image for sm_75" in why, why


def test_native_refuses_a_device_without_code(monkeypatch):
    import torch

    state = explain_cuda(CudaProbe(**BUILD, driver_version=13000,
                                   devices=((0, "NVIDIA H200", 9, 0), (1, "Tesla T4", 7, 5))))
    monkeypatch.setattr(native, "_cuda_cache", state)
    with pytest.raises(RuntimeError, match="cuda:1 Tesla T4: no kernel image for sm_75"):
        native._need(torch.device("cuda", 1))
    native._need(torch.device("cuda", 0))  # the H200 has code


@pytest.mark.parametrize("cc, archs, expected", [
    ((8, 0), "80,90", "SASS sm_80"),
    ((8, 9), "80;90", "SASS sm_80"),  # same major, higher minor: binary compatible
    ((9, 0), "80,90", "SASS sm_90"),
    ((12, 0), "80,90", "PTX compute_90"),  # newer major: the PTX of the highest arch, JIT-compiled
    ((12, 0), "80-real,90-real", None),  # no PTX shipped
    ((9, 0), "90a", "SASS sm_90a"),
    ((10, 0), "90a", None),  # arch-specific code runs on that arch only, PTX included
    ((7, 5), "80,90", None),
    ((8, 6), "80-virtual", "PTX compute_80"),
    ((9, 0), "all-major", "unknown"),
])
def test_arch_support(cc, archs, expected):
    got = arch_support(*cc, archs)
    if expected is None:
        assert got is None, got
    else:
        assert got is not None and got.startswith(expected), got
