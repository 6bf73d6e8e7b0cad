"""Every kernel on every backend stays inside its buffers whatever the data (issue 16 item 3).

The ops are called below the functional API's checks (torch.ops.sws_kernels.*, the Triton launchers, the native
functions) with out-of-range labels and ellipse components, positions of -1 and 1e9, a short chol and short
ellipse/outlier arrays. Each backend runs in its own subprocess (with glibc's heap checks on): a crash, an
abort or heap corruption fails the test; a result or a clean Python exception passes.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sws_kernels as sws

_SCRIPT = textwrap.dedent(r'''
    import sys, torch
    import sws_kernels as sws
    from sws_kernels import _ops  # noqa: F401  (registers torch.ops.sws_kernels)

    backend, dev = sys.argv[1], sys.argv[2]
    ops = torch.ops.sws_kernels
    K, out_f, in_f, S = 5, 6, 8, 2
    n = out_f * in_f
    i64 = dict(dtype=torch.int64, device=dev)
    f32 = dict(dtype=torch.float32, device=dev)
    g = torch.Generator().manual_seed(0)
    means = torch.randn(K, 2, generator=g).to(dev)
    chol = torch.randn(K, 3, generator=g).to(dev)
    seed = torch.tensor(123, **i64)

    def base():
        return dict(labels=torch.randint(0, K, (out_f, in_f), generator=g).to(device=dev, dtype=torch.uint8),
                    e_pos=torch.tensor([3, 20], **i64), e_a=torch.tensor([1, 4], **i64),
                    e_b=torch.tensor([0, 2], **i64), e_alpha=torch.tensor([0.3, 0.6], **f32),
                    o_pos=torch.tensor([7, 40, 11], **i64), o_mu=torch.randn(3, generator=g).to(dev),
                    o_rho=torch.randn(3, generator=g).to(dev), means=means, chol=chol)

    def case(**edit):
        d = base()
        d.update(edit)
        return d

    cases = {
        "labels 255": case(labels=torch.full((out_f, in_f), 255, dtype=torch.uint8, device=dev)),
        "labels -1 (int16)": case(labels=torch.full((out_f, in_f), -1, dtype=torch.int16, device=dev)),
        "labels 2**30 (int32)": case(labels=torch.full((out_f, in_f), 2**30, dtype=torch.int32, device=dev)),
        "ellipse pos -1": case(e_pos=torch.tensor([-1, 20], **i64)),
        "ellipse pos 1e9": case(e_pos=torch.tensor([3, 10**9], **i64)),
        "outlier pos -1": case(o_pos=torch.tensor([7, -1, 11], **i64)),
        "outlier pos 1e9": case(o_pos=torch.tensor([7, 10**9, 11], **i64)),
        "outlier pos -2**40": case(o_pos=torch.tensor([7, -2**40, 11], **i64)),
        "ellipse comps out of range": case(e_a=torch.tensor([-3, 4], **i64), e_b=torch.tensor([0, 10**6], **i64)),
        "short chol": case(chol=chol[:2].contiguous()),
        "short e_a": case(e_a=torch.tensor([1], **i64)),
        "short o_rho": case(o_rho=torch.randn(1, generator=g).to(dev)),
    }

    def args(d):
        return (d["means"], d["chol"], d["labels"], d["e_pos"], d["e_a"], d["e_b"], d["e_alpha"], d["o_pos"],
                d["o_mu"], d["o_rho"])

    calls = {}
    x = torch.randn(3, in_f, generator=g).to(dev)
    gy = torch.randn(S, 3, out_f, generator=g).to(dev)
    gw = torch.randn(S, out_f, in_f, generator=g).to(dev)
    calls["op reconstruct"] = lambda d: ops.reconstruct(*args(d), seed, S, 1, 3, 4)
    calls["op reconstruct_backward"] = lambda d: ops.reconstruct_backward(gw, *args(d), seed, S, 1, 3, 4)
    calls["op sws_linear"] = lambda d: ops.sws_linear(x, *args(d), None, seed, S, 1, 3, 4, False)
    calls["op sws_linear_dx"] = lambda d: ops.sws_linear_dx(gy, *args(d), seed, S, 1, 3, 4, False)
    if backend == "triton":
        from sws_kernels.triton import linear as tl_lin, reconstruct as tl_rc
        calls["triton reconstruct"] = lambda d: tl_rc.reconstruct(*args(d), seed, S, 1, 3, 4)
        calls["triton reconstruct_backward"] = lambda d: tl_rc.reconstruct_backward(gw, *args(d), seed, S, 1, 3, 4)
        for fused in (False, True):
            calls[f"triton sws_linear fused={fused}"] = lambda d, f=fused: tl_lin.sws_linear(
                x, *args(d), None, seed, S, 1, 3, 4, False, f)
            calls[f"triton sws_linear_dx fused={fused}"] = lambda d, f=fused: tl_lin.sws_linear_dx(
                gy, *args(d), seed, S, 1, 3, 4, False, f)
        calls["triton mean_field_linear short rho"] = lambda d: tl_lin.mean_field_linear(
            x, torch.randn(out_f, in_f, device=dev), torch.randn(2, in_f, device=dev), None, seed, S, 3, False, True)
    if backend == "native":
        from sws_kernels import native
        calls["native reconstruct"] = lambda d: native.reconstruct(*args(d), seed, S, 1, 3, 4)
        calls["native reconstruct_backward"] = lambda d: native.reconstruct_backward(gw, *args(d), seed, S, 1, 3, 4)
        calls["native mean_field_reconstruct short rho"] = lambda d: native.mean_field_reconstruct(
            torch.randn(out_f, in_f, device=dev), torch.randn(2, in_f, device=dev), seed, S, 3, 0)

    results = []
    with sws.backend(backend):
        for cname, fn in calls.items():
            for name, d in cases.items():
                try:
                    fn(d)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    results.append("ok")
                except Exception as e:  # a clean Python exception is fine
                    results.append(type(e).__name__)
                print(cname, "|", name, "|", results[-1], flush=True)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("RESULTS", len(results), sorted(set(results)))
''')


def _backends():
    out = []
    avail = sws.backends()
    out.append(("reference", "cpu"))
    if avail.get("triton", (False,))[0]:
        out.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    if avail.get("native_cpu", (False,))[0]:
        out.append(("native", "cpu"))
    if avail.get("native_cuda", (False,))[0]:
        out.append(("native", "cuda"))
    if torch.cuda.is_available():
        out.append(("reference", "cuda"))
    return out


@pytest.mark.parametrize("backend,dev", _backends())
def test_bad_data_never_crashes(backend, dev):
    env = dict(os.environ, MALLOC_CHECK_="3", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    if dev == "cpu":
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", _SCRIPT, backend, dev], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, f"returncode {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "RESULTS" in r.stdout, r.stdout + r.stderr
