"""Register / spill / shared-memory audit of the CUDA kernels (csrc/cuda/*.cu), without a GPU.

Each .cu is compiled to a cubin per architecture with the flags CMakeLists.txt gives nvcc (read from that
file, so the audit cannot drift from the build), plus ``-Xptxas -v``; ptxas' report is parsed into one row
per kernel and architecture:

    kernel        demangled, short ("k_forward<long, false, true>")
    arch          80, 90, ...
    registers     per thread
    spill_stores  bytes per thread spilled to local memory; spill_loads likewise
    stack_bytes   local-memory stack frame (Box-Muller's sincos slow path and spills live here)
    smem_bytes    static shared memory only: the dynamic shared memory of k_forward / k_linear_small_m is set
                  at launch (at most 48 KB, the no-opt-in limit) and ptxas cannot see it
    cmem_bytes    constant memory, all banks (bank 0 holds the kernel parameters); ptxas 13 prints no cmem
                  for sm_90 entry functions, so 0 there means "not reported"

    python benchmarks/cuda_ptxas.py --arch 80 90

prints the table and the kernels that spill; it exits 1 when nvcc fails, 0 (with the reason) when there is
no nvcc. benchmarks/triton_aot.py imports this file and calls ``audit(archs)`` and ``format_table(rows)``.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CMAKELISTS = ROOT / "CMakeLists.txt"

KEYS = ("kernel", "arch", "registers", "spill_stores", "spill_loads", "smem_bytes", "cmem_bytes", "stack_bytes")


class AuditError(RuntimeError):
    """nvcc failed on a source, or CMakeLists.txt no longer has what the audit reads from it."""


def nvcc_path() -> Optional[str]:
    """The nvcc CMake's check_language(CUDA) would find (CUDACXX, then PATH, then /usr/local/cuda), or None."""
    env = os.environ.get("CUDACXX")
    if env and Path(env).is_file():
        return env
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def cmake_cuda_flags(cmakelists: Path = CMAKELISTS) -> List[str]:
    """nvcc flags of a Release build of the CUDA sources, read from CMakeLists.txt (minus -gencode)."""
    text = cmakelists.read_text()
    # $<$<COMPILE_LANGUAGE:CUDA>:...> in target_compile_options: the flags only CUDA sources get.
    opts = re.findall(r"\$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>", text)
    if not opts:
        raise AuditError(f"{cmakelists}: expected CUDA compile options ($<$<COMPILE_LANGUAGE:CUDA>:...>), found none")
    std = re.search(r"set\(CMAKE_CUDA_STANDARD\s+(\d+)\)", text)
    if not std:
        raise AuditError(f"{cmakelists}: expected set(CMAKE_CUDA_STANDARD N), found none")
    defines = []
    for body in re.findall(r"target_compile_definitions\(_C\s+PRIVATE\s+([^)]*)\)", text):
        # Definitions built from CMake variables (SWS_CUDA_ARCHS) only label the build; they change no kernel.
        defines += [f"-D{d}" for d in shlex.split(body) if "$" not in d]
    # -O3 -DNDEBUG: CMake's CMAKE_CUDA_FLAGS_RELEASE, the build type setup.py uses. Host-only flags (-fPIC,
    # -fvisibility) do not reach ptxas and are left out.
    flags = ["-O3", "-DNDEBUG", *defines, f"-I{ROOT / 'csrc'}", f"-std=c++{std.group(1)}"]
    for o in opts:
        flags += shlex.split(o)
    return flags


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM = re.compile(r"(\d+) bytes cmem\[\d+\]")


def parse_ptxas(text: str) -> List[dict]:
    """ptxas -v output -> one dict per entry function (mangled kernel name, arch as an int).

    The report comes in blocks: "Compiling entry function 'K' for 'sm_90'", then "Function properties for K"
    followed by "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers, ...
    N bytes smem, N bytes cmem[0], ...". Device functions that are not inlined get their own "Function
    properties" block without "Compiling entry function": those are not kernels and make no row.
    """
    rows: List[dict] = []
    entry: Optional[dict] = None
    props_for: Optional[str] = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            arch = m.group(2)
            entry = {"kernel": m.group(1), "arch": int(arch) if arch.isdigit() else arch, "registers": 0,
                     "spill_stores": 0, "spill_loads": 0, "smem_bytes": 0, "cmem_bytes": 0, "stack_bytes": 0}
            rows.append(entry)
            props_for = None
            continue
        m = _PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and entry is not None and props_for == entry["kernel"]:
            entry["stack_bytes"], entry["spill_stores"], entry["spill_loads"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m and entry is not None:
            entry["registers"] = int(m.group(1))
            entry["smem_bytes"] = sum(int(x) for x in _SMEM.findall(line))
            entry["cmem_bytes"] = sum(int(x) for x in _CMEM.findall(line))
    return rows


def _shorten_mangled(name: str) -> str:
    # _ZN 3sws 47_GLOBAL__N__..._cu_452b1acc 9k_forward IlLb0ELb1EE...: the last length-prefixed source name of
    # the nested name, then its mangled template arguments, enough to tell instantiations apart.
    if not name.startswith("_ZN"):
        return name[:60]
    pos, last = 3, name
    while pos < len(name) and name[pos].isdigit():
        digits = re.match(r"\d+", name[pos:]).group(0)
        start = pos + len(digits)
        last, pos = name[start:start + int(digits)], start + int(digits)
    tail = name[pos:]
    return f"{last}[{tail[:40]}]" if tail.startswith("I") else last


def _short(demangled: str) -> str:
    s = demangled.replace("(anonymous namespace)::", "").replace("sws::", "")
    if s.startswith("void "):  # template kernels demangle with their return type
        s = s[5:]
    # drop the parameter list: the last balanced (...) group
    if s.endswith(")"):
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    return s.strip()


def demangle(names: Iterable[str]) -> Dict[str, str]:
    """{mangled: short demangled}: cu++filt when present, else binutils' c++filt, else a shortened mangled name."""
    names = list(dict.fromkeys(names))
    tool = shutil.which("cu++filt")
    if tool is None:
        nvcc = nvcc_path()
        cand = Path(nvcc).resolve().parent / "cu++filt" if nvcc else None
        tool = str(cand) if cand is not None and cand.is_file() else shutil.which("c++filt")
    if tool and names:
        r = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
        out = r.stdout.splitlines()
        if r.returncode == 0 and len(out) == len(names):
            return {n: _short(d) if d != n else _shorten_mangled(n) for n, d in zip(names, out)}
    return {n: _shorten_mangled(n) for n in names}


def sources() -> List[Path]:
    return sorted(CUDA_DIR.glob("*.cu"))


def kernel_names(paths: Sequence[Path] = ()) -> List[str]:
    """The __global__ function names declared in the sources (what the audit must report a row for)."""
    names = []
    for p in paths or sources():
        names += re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", p.read_text())
    return names


def _compile(nvcc: str, flags: List[str], src: Path, arch: int, tmp: str) -> List[dict]:
    out = Path(tmp) / f"{src.stem}_sm{arch}.cubin"
    cmd = [nvcc, *flags, "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", str(src),
           "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-20:])
        raise AuditError(f"nvcc failed on {src.relative_to(ROOT)} for sm_{arch} (exit {r.returncode}):\n"
                         f"{shlex.join(cmd)}\n{tail}")
    rows = parse_ptxas(r.stderr + r.stdout)
    for row in rows:
        row["source"] = src.name
    return rows


def audit(archs: Sequence[int] = (80, 90), jobs: Optional[int] = None) -> List[dict]:
    """One row per (kernel, arch) of csrc/cuda/*.cu; [] when there is no nvcc (nvcc_path() is None).

    Raises AuditError when nvcc fails. Rows carry the KEYS plus "source" (the .cu file name).
    """
    nvcc = nvcc_path()
    if nvcc is None:
        return []
    flags = cmake_cuda_flags()
    work = [(src, int(a)) for src in sources() for a in archs]
    with tempfile.TemporaryDirectory(prefix="sws_ptxas_") as tmp, \
            ThreadPoolExecutor(max_workers=jobs or min(len(work), os.cpu_count() or 2) or 1) as pool:
        results = list(pool.map(lambda w: _compile(nvcc, flags, w[0], w[1], tmp), work))
    rows = [row for part in results for row in part]
    names = demangle(r["kernel"] for r in rows)
    for r in rows:
        r["kernel"] = names[r["kernel"]]
    order = {src.name: i for i, src in enumerate(sources())}
    rows.sort(key=lambda r: (order[r["source"]], r["kernel"], str(r["arch"])))
    return rows


def spills(rows: Iterable[dict]) -> List[dict]:
    return [r for r in rows if r["spill_stores"] or r["spill_loads"]]


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table: kernel, arch, registers, spills, stack, shared and constant memory (bytes)."""
    head = ("| kernel | arch | registers | spill stores B | spill loads B | stack B | smem B | cmem B |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|")
    body = [f"| `{r['kernel']}` | sm_{r['arch']} | {r['registers']} | {r['spill_stores']} | {r['spill_loads']} | "
            f"{r['stack_bytes']} | {r['smem_bytes']} | {r['cmem_bytes']} |" for r in rows]
    return "\n".join([head, *body])


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    ap.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes (default: CPUs)")
    args = ap.parse_args(argv)
    nvcc = nvcc_path()
    if nvcc is None:
        print("cuda ptxas: nvcc not found (CUDACXX, PATH, /usr/local/cuda/bin): CUDA audit skipped")
        return 0
    try:
        rows = audit(args.arch, jobs=args.jobs)
    except AuditError as e:
        print(f"cuda ptxas: {e}", file=sys.stderr)
        return 1
    print(format_table(rows))
    bad = spills(rows)
    for r in bad:
        print(f"spill: {r['kernel']} sm_{r['arch']} ({r['source']}): {r['spill_stores']} B stores, "
              f"{r['spill_loads']} B loads, {r['registers']} registers")
    archs = " and ".join(f"sm_{a}" for a in args.arch)
    print(f"cuda ptxas: {len(rows)} kernel x arch rows for {archs} ({nvcc}), {len(bad)} spill, "
          f"max spill {max((r['spill_stores'] for r in rows), default=0)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
