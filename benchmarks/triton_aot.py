"""Compile every Triton kernel specialisation the library launches for real GPU targets, with no GPU.

    python benchmarks/triton_aot.py --arch 80 90 [--tests tests/] [--jobs 2] [--markdown table.md]

The Triton interpreter (what runs our kernels on a CPU) hides every compile error, so this script compiles
what a GPU would compile:

  1. record   the test suite runs under the interpreter with SWS_TRITON_RECORD=<file> and
              SWS_TRITON_TILES=gpu: every launch (sws_kernels/triton/_launch.py) appends its
              specialisation class (kernel, argument dtypes and alignment, the int value classes Triton
              specialises on, constexprs, num_warps/num_stages) once; tiles are the GPU's, not the
              interpreter's. So the list comes from the launches themselves, not from a table kept by hand.
  2. compile  each unique specialisation, through Triton's own binder (the same signature, constexprs and
              attributes a launch on the card derives), ``triton.compile(ASTSource(...),
              target=GPUTarget("cuda", cc, 32))`` per architecture: ptxas ships in the wheel, no driver.
  3. audit    registers, spill bytes and stack from ptxas -v on the PTX; shared memory against the target's
              per-block limit; whether every bf16/fp16 dot became tensor-core instructions (mma / wgmma).
              The native CUDA kernels' ptxas report (benchmarks/cuda_ptxas.py) joins the same report.

Exit status is non-zero on any compile failure, shared memory over the limit, a bf16/fp16 dot without
tensor cores, or a spill (every production configuration is meant to be spill-free). The last line is
exactly: ``aot: N kernel specializations compiled for sm_80 and sm_90, F failed, max spill B bytes``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Opt-in shared memory per block (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


# ----------------------------------------------------------------------------------------------------------
# 1. record
# ----------------------------------------------------------------------------------------------------------

def record(tests: list[str], out: Path) -> float:
    """Run pytest under the interpreter with GPU tiles, recording launches into ``out``; returns seconds."""
    env = dict(os.environ, TRITON_INTERPRET="1", SWS_TRITON_TILES="gpu", SWS_TRITON_RECORD=str(out))
    t0 = time.time()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    # A failing test is the test run's business (CI runs the suite on its own); here it only means its
    # launches after the failure point were not recorded, so say so and go on with what was recorded.
    tail = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    if r.returncode not in (0, 1) or not out.exists():
        sys.stdout.write(r.stdout[-6000:] + r.stderr[-3000:])
        raise SystemExit(f"aot: the recording run failed (exit {r.returncode}): {' '.join(cmd)}")
    print(f"aot: recording run: {tail}" + ("" if r.returncode == 0 else "  (failures above are the test run's; "
                                           "their later launches were not recorded)"), flush=True)
    if r.returncode:
        sys.stdout.write("\n".join(l for l in r.stdout.splitlines() if l.startswith("FAILED")) + "\n")
    return time.time() - t0


def load_records(path: Path) -> list[dict]:
    seen, recs = set(), []
    for line in path.read_text().splitlines():
        if line and line not in seen:
            seen.add(line)
            recs.append(json.loads(line))
    return recs


# ----------------------------------------------------------------------------------------------------------
# 2. compile (runs in worker processes: TRITON_INTERPRET must be unset there so @triton.jit gives JITFunctions)
# ----------------------------------------------------------------------------------------------------------

class _Ptr:
    """Stands in for a tensor argument: Triton's binder only reads dtype and data_ptr (for 16-byte alignment)."""

    def __init__(self, dtype, aligned: bool):
        self.dtype = dtype
        self._ptr = 0 if aligned else 8

    def data_ptr(self):
        return self._ptr


def _fake_args(rec):
    import torch

    out = []
    for d in rec["args"]:
        t = d["t"]
        out.append(_Ptr(getattr(torch, d["dtype"]), d["align16"]) if t == "tensor" else None if t == "none"
                   else d["v"])
    return out


def _ptxas_report(ptx: str, cc: int) -> dict:
    from triton import knobs

    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        # the flags Triton's make_cubin uses (-v adds the resource report)
        r = subprocess.run([knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                            str(src), "-o", str(Path(d) / "k.o")], capture_output=True, text=True)
    log = r.stderr + r.stdout
    num = lambda pat: max((int(x) for x in re.findall(pat, log)), default=0)  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def _bind(rec, cc):
    """Triton's own specialisation of a recorded launch: (fn, target, backend, signature, constexprs, attrs,
    options), exactly what JITFunction.run derives on a card of compute capability cc."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    mod_name, qual = rec["kernel"].split(":")
    fn = getattr(importlib.import_module(mod_name), qual)
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    meta = dict(rec["meta"])
    # the options JITFunction.run adds before binding, so a compile here has the JIT's cache key (gpu_check.sh
    # warms the card's cache this way)
    from triton import knobs
    meta.setdefault("debug", getattr(fn, "debug", None) or knobs.runtime.debug)
    if hasattr(knobs.compilation, "instrumentation_mode"):
        meta.setdefault("instrumentation_mode", knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*_fake_args(rec), **meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, spec, opts)
    return fn, target, signature, constexprs, attrs, options


def spec_key(rec, cc) -> str:
    _, _, signature, constexprs, attrs, options = _bind(rec, cc)
    return repr((rec["kernel"], sorted(signature.items()), sorted((str(k), repr(v)) for k, v in constexprs.items()),
                 sorted((str(k), repr(v)) for k, v in attrs.items()), options.num_warps, options.num_stages))


def compile_one(job):
    """(record, cc) -> a result row. Never raises: a failure is a row with ``error``."""
    rec, cc = job
    os.environ.pop("TRITON_INTERPRET", None)
    mod_name, qual = rec["kernel"].split(":")
    row = {"spec": rec["_id"], "kernel": qual, "act_dtype": rec["args"][0].get("dtype"), "module": mod_name.rsplit(".", 1)[-1], "arch": cc, "meta": rec["meta"],
           "dtypes": sorted({d["dtype"] for d in rec["args"] if d["t"] == "tensor" and d["dtype"] not in
                             ("int64", "int32")})}
    t0 = time.time()
    try:
        import triton
        from triton.compiler import ASTSource

        fn, target, signature, constexprs, attrs, options = _bind(rec, cc)
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        ptx = k.asm["ptx"]
        row.update(_ptxas_report(ptx, cc))
        row["smem"] = int(k.metadata.shared)
        row["num_warps"] = int(k.metadata.num_warps)
        has_dot = "tt.dot" in str(k.asm.get("ttir", "")) or "tt.dot" in str(k.asm.get("ttgir", ""))
        row["dot"] = has_dot
        row["tensor_cores"] = bool(re.search(r"\b(mma|wgmma)\.", ptx)) if has_dot else None
        row["constexprs"] = {str(k_[0]) if isinstance(k_, tuple) and len(k_) == 1 else str(k_): v
                             for k_, v in constexprs.items()}
        row["signature"] = {k_: v for k_, v in signature.items() if v != "constexpr"}
    except Exception as e:  # noqa: BLE001 - reported, and the script exits non-zero
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    row["seconds"] = round(time.time() - t0, 2)
    return row


# ----------------------------------------------------------------------------------------------------------
# 3. audit and report
# ----------------------------------------------------------------------------------------------------------

_SHORT = {"BLOCK", "BLOCK_K", "CHUNK", "PB", "BM", "BN", "BR", "BE", "ROWS", "COLS"}


def _config(row) -> str:
    m = row["meta"]
    tiles = "x".join(str(m[k]) for k in ("BM", "BN", "BR") if k in m) or ",".join(
        f"{k}={m[k]}" for k in m if k in _SHORT)
    flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in m.items()
                     if k not in _SHORT and k not in ("num_warps", "num_stages"))
    return f"{tiles} w{m.get('num_warps', 4)}s{m.get('num_stages', 3)} {flags}".strip()


def problems(row) -> list[str]:
    if "error" in row:
        return [row["error"]]
    out = []
    limit = SMEM_LIMIT.get(row["arch"])
    if limit is not None and row["smem"] > limit:
        out.append(f"shared memory {row['smem']} B > the sm_{row['arch']} limit {limit} B")
    if row["dot"] and not row["tensor_cores"] and set(row["dtypes"]) & {"bfloat16", "float16", "float32"}:
        out.append("a dot without tensor-core instructions (mma/wgmma)")
    if (row["spill_stores"] or row["spill_loads"]) and not tf32x3_gemm(row):
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    return out


def tf32x3_gemm(row) -> bool:
    """An fp32-activation fused GEMM: its dots run in tf32x3 (tensor cores, fp32 accuracy), which issue 10's goal
    accepts in place of a spill-free tile; its spills are reported, not failed."""
    return row["kernel"] == "_lookup_gemm_kernel" and row.get("act_dtype") == "float32"


def table(rows: list[dict]) -> str:
    lines = ["| kernel | dtypes | config | arch | regs | spill B (st/ld) | smem B | tensor cores | compile s |",
             "|---|---|---|---|---:|---:|---:|---|---:|"]
    for r in sorted(rows, key=lambda r: (r["module"], r["kernel"], _config(r), ",".join(r["dtypes"]), r["arch"])):
        if "error" in r:
            lines.append(f"| {r['kernel']} | {','.join(r['dtypes'])} | {_config(r)} | sm_{r['arch']} | FAILED: "
                         f"{r['error'][:80]} | | | | {r['seconds']} |")
            continue
        tc = "-" if r["tensor_cores"] is None else ("yes" if r["tensor_cores"] else "NO")
        lines.append(f"| {r['kernel']} | {','.join(r['dtypes'])} | {_config(r)} | sm_{r['arch']} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['smem']} | {tc} | {r['seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--tests", nargs="+", default=["tests/"], help="what the recording run executes (pytest args)")
    ap.add_argument("--record", type=Path, help="use this recorded launch file instead of running the tests")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--markdown", type=Path, help="also write the tables to this file")
    ap.add_argument("--json", type=Path, help="also write every result row as JSON")
    ap.add_argument("--save-record", type=Path, help="write the unique recorded launches here (the warm-up list "
                    "gpu_check.sh compiles on a card: benchmarks/triton_launches.jsonl)")
    ap.add_argument("--no-audit-cuda", action="store_true", help="skip the native CUDA ptxas report")
    args = ap.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)  # this process and its workers compile; they never interpret
    t0 = time.time()
    if args.record:
        rec_path, rec_s = args.record, 0.0
    else:
        rec_path = Path(tempfile.mkdtemp(prefix="sws_aot_")) / "launches.jsonl"
        rec_s = record(args.tests, rec_path)
    recs, keys = [], set()
    for r in load_records(rec_path):  # records that differ only in values Triton does not specialise on
        k = spec_key(r, args.arch[0])
        if k not in keys:
            keys.add(k)
            recs.append(r)
    print(f"aot: {len(recs)} specialisations recorded ({rec_s:.0f} s); compiling for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} with {args.jobs} jobs", flush=True)
    if args.save_record:
        args.save_record.write_text("".join(json.dumps(r) + "\n" for r in recs))
    for i, r in enumerate(recs):
        r["_id"] = i
    jobs = [(r, cc) for r in recs for cc in args.arch]
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        rows = list(ex.map(compile_one, jobs))
    compile_s = time.time() - t0 - rec_s

    report = ["## Triton kernels", "", table(rows), ""]
    try:
        if args.no_audit_cuda:
            raise ImportError("--no-audit-cuda")
        import cuda_ptxas

        if cuda_ptxas.nvcc_path() is None:
            report += ["## Native CUDA kernels", "", "nvcc not found: not audited", ""]
        else:
            cu_rows = cuda_ptxas.audit(tuple(args.arch))
            report += ["## Native CUDA kernels (nvcc -Xptxas -v)", "", cuda_ptxas.format_table(cu_rows), ""]
            for r in cu_rows:
                if r["spill_stores"] or r["spill_loads"]:
                    print(f"aot: note: CUDA kernel {r['kernel']} sm_{r['arch']} spills "
                          f"{r['spill_stores']}/{r['spill_loads']} B")
    except ImportError as e:
        report += ["## Native CUDA kernels", "", f"not audited: {e}", ""]
    text = "\n".join(report)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))

    failed = [(r, p) for r in rows for p in [problems(r)] if p]
    for r, p in failed:
        print(f"aot: FAIL {r['module']}.{r['kernel']} [{_config(r)}] {','.join(r['dtypes'])} sm_{r['arch']}: "
              f"{'; '.join(p)}")
    for r in rows:
        if "error" not in r and tf32x3_gemm(r) and (r["spill_stores"] or r["spill_loads"]):
            print(f"aot: note: fp32 (tf32x3) {r['kernel']} [{_config(r)}] sm_{r['arch']} spills "
                  f"{r['spill_stores']}/{r['spill_loads']} B")
    max_spill = max((r.get("spill_stores", 0) + r.get("spill_loads", 0) for r in rows), default=0)
    slowest = max(rows, key=lambda r: r["seconds"], default=None)
    if slowest:
        print(f"aot: record {rec_s:.0f} s, compile {compile_s:.0f} s for {len(jobs)} jobs (slowest "
              f"{slowest['kernel']} [{_config(slowest)}] {slowest['seconds']} s)")
    archs = " and ".join(f"sm_{a}" for a in args.arch)
    n_failed = len({r["spec"] for r, _ in failed})
    print(f"aot: {len(recs)} kernel specializations compiled for {archs}, {n_failed} failed, "
          f"max spill {max_spill} bytes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
