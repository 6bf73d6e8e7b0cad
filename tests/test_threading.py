"""Native CPU threading (issue 17, item 2): one OpenMP runtime, threads = torch.get_num_threads(), no parallel
region below the grain (csrc/cpu/parallel.h), and results that do not depend on the thread count."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sws_kernels as sws
from sws_kernels import functional as F
from sws_kernels import native

pytestmark = pytest.mark.skipif(not native.AVAILABLE_CPU, reason="native CPU backend not built")
LINUX = sys.platform.startswith("linux")


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _runtime_of(lib_path: str) -> str:
    """The file that the OpenMP entry point omp_get_max_threads resolves to for the loaded library lib_path."""
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                    ("dli_saddr", ctypes.c_void_p)]

    handle = ctypes.CDLL(lib_path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # already loaded: its own lookup scope
    addr = ctypes.cast(handle.omp_get_max_threads, ctypes.c_void_p).value
    info = DlInfo()
    assert ctypes.CDLL(None).dladdr(ctypes.c_void_p(addr), ctypes.byref(info))
    return os.path.realpath(info.dli_fname.decode())


@pytest.mark.skipif(not LINUX, reason="dlopen/dladdr, /proc/self/maps")
def test_one_openmp_runtime_shared_with_torch():
    # The kernels' OpenMP calls resolve into the same runtime as torch's (so torch.set_num_threads reaches them
    # and there is one pool). Other packages may bring their own (scikit-learn does): not counted here.
    import sws_kernels._C as C

    torch.ones(4).sum()
    libtorch = next(line.split()[-1] for line in open("/proc/self/maps") if "libtorch_cpu" in line)
    try:
        torch_rt = _runtime_of(libtorch)
    except AttributeError:
        pytest.skip("this torch is not built with OpenMP")
    assert _runtime_of(C.__file__) == torch_rt


def test_threads_follow_torch(threads):
    for n in (1, 2, 3):
        threads(n)
        assert native.max_threads() == torch.get_num_threads() == n


@pytest.mark.skipif(not LINUX, reason="counts /proc/self/task")
def test_no_thread_started_below_the_grain_and_started_above():
    # a fresh process (no OpenMP pool yet): a 128x128, M = 8 sws_linear at 2 threads wakes no other thread;
    # a reconstruct of 2 x 512 x 512 weights (~0.5 ms of work) does open a 2-thread region
    code = textwrap.dedent("""
        import os, torch, sws_kernels as sws
        from sws_kernels import bench, functional as F
        tasks = lambda: len(os.listdir("/proc/self/task"))
        L = bench._layer(128, 128, 64, "cpu")
        e, o = (L["e_pos"], L["e_a"], L["e_b"], L["e_alpha"]), (L["o_pos"], L["o_mu"], L["o_rho"])
        x = torch.randn(8, 128)

        def small_calls():
            with sws.backend("native"), torch.no_grad():
                for S in (1, 4):
                    F.sws_linear(x, L["means"], L["chol"], L["labels"], e, o, L["bias"], seed=7, samples=S)
        torch.set_num_threads(1)
        small_calls()  # first calls at 1 thread: whatever else starts threads (a CUDA driver probe) starts here
        torch.set_num_threads(2)
        before = tasks()
        small_calls()
        small = tasks()
        B = bench._layer(512, 512, 64, "cpu")
        with sws.backend("native"), torch.no_grad():
            F.reconstruct(B["means"], B["chol"], B["labels"], seed=7, samples=2)
        print(before, small, tasks())
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("SWS_CPU_GRAIN_US", "OMP_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    before, small, big = map(int, r.stdout.split())
    assert small == before, "a parallel region opened below the grain"
    assert big > before, "no parallel region above the grain: the kernels never use a second thread"


def _ops(size, S):
    from sws_kernels import bench

    L = bench._layer(size, size, 64, "cpu", seed=size)
    e, o = (L["e_pos"], L["e_a"], L["e_b"], L["e_alpha"]), (L["o_pos"], L["o_mu"], L["o_rho"])
    x = torch.randn(8, size, generator=torch.Generator().manual_seed(3))
    out = {}
    with sws.backend("native"):
        for mode in ("paper", "hierarchical", "mean"):
            means = L["means"].clone().requires_grad_(True)
            o_mu = L["o_mu"].clone().requires_grad_(True)
            w = F.reconstruct(means, L["chol"], L["labels"], e, (o[0], o_mu, o[2]), seed=5, samples=S, mode=mode)
            w.backward(torch.cos(w.detach()))
            out[f"reconstruct {mode}"] = (w.detach(), means.grad, o_mu.grad)
        with torch.no_grad():
            out["sws_linear"] = F.sws_linear(x, L["means"], L["chol"], L["labels"], e, o, L["bias"], seed=7, samples=S)
        mu = L["mu"].clone().requires_grad_(True)
        w = F.mean_field_reconstruct(mu, L["rho"], seed=9, samples=S)
        w.backward(torch.sin(w.detach()))
        out["mean_field"] = (w.detach(), mu.grad)
    return out


@pytest.mark.parametrize("size, S", [(96, 2), (512, 2)])  # below the grain, and above it (2-thread regions)
def test_bit_identical_run_to_run_and_across_thread_counts(threads, size, S):
    threads(1)
    one = _ops(size, S)
    threads(2)
    two, again = _ops(size, S), _ops(size, S)
    for k in one:
        for a, b, c in zip(*(v[k] if isinstance(v[k], tuple) else (v[k],) for v in (one, two, again))):
            assert torch.equal(b, c), f"{k}: 2 threads, run to run"
            assert torch.equal(a, b), f"{k}: 1 vs 2 threads"
