"""benchmarks/cuda_ptxas.py: the ptxas report parser always; the audit itself where nvcc exists."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cuda_ptxas  # noqa: E402

# ptxas 13 -v output, trimmed: two kernels, a non-inlined device function between them (no row), static
# shared memory and two constant banks on the second kernel.
SAMPLE = """\
ptxas info    : 24 bytes gmem, 8 bytes cmem[4]
ptxas info    : Compiling entry function '_ZN3sws12_GLOBAL__N_19k_forwardIlLb0ELb1EEEvPKT_' for 'sm_80'
ptxas info    : Function properties for _ZN3sws12_GLOBAL__N_19k_forwardIlLb0ELb1EEEvPKT_
    56 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 56 bytes cumulative stack size, 416 bytes cmem[0]
ptxas info    : Compile time = 5.1 ms
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
    40 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_ZN3sws12_GLOBAL__N_114k_bwd_segmentsILb1EEEvPKf' for 'sm_80'
ptxas info    : Function properties for _ZN3sws12_GLOBAL__N_114k_bwd_segmentsILb1EEEvPKf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 38 registers, used 1 barriers, 4096 bytes smem, 480 bytes cmem[0], 8 bytes cmem[2]
"""


def test_parse_ptxas_sample():
    rows = cuda_ptxas.parse_ptxas(SAMPLE)
    assert [r["kernel"] for r in rows] == ["_ZN3sws12_GLOBAL__N_19k_forwardIlLb0ELb1EEEvPKT_",
                                           "_ZN3sws12_GLOBAL__N_114k_bwd_segmentsILb1EEEvPKf"]
    a, b = rows
    assert (a["arch"], a["registers"], a["spill_stores"], a["spill_loads"], a["stack_bytes"], a["smem_bytes"],
            a["cmem_bytes"]) == (80, 40, 24, 20, 56, 0, 416), a
    # the device function's 40-byte frame must not leak into the next kernel
    assert (b["registers"], b["stack_bytes"], b["smem_bytes"], b["cmem_bytes"]) == (38, 0, 4096, 488), b
    assert set(cuda_ptxas.KEYS) <= set(a)


def test_short_names():
    d = ("void sws::(anonymous namespace)::k_forward<long, false, true>(long const*, long, long, long, "
         "float const*, sws::Key, unsigned int, float*)")
    assert cuda_ptxas._short(d) == "k_forward<long, false, true>"
    assert cuda_ptxas._short("sws::(anonymous namespace)::k_sample(float const*, long)") == "k_sample"
    mangled = "_ZN3sws47_GLOBAL__N__cf53da9e_14_reconstruct_cu_452b1acc9k_forwardIlLb0ELb0EEEvPKT_lllPKfNS_3KeyEjPf"
    assert cuda_ptxas._shorten_mangled(mangled).startswith("k_forward[IlLb0ELb0E")
    assert cuda_ptxas._shorten_mangled("_ZN3sws12_GLOBAL__N_18k_sampleEPKf") == "k_sample"


def test_flags_come_from_cmakelists():
    flags = cuda_ptxas.cmake_cuda_flags()
    for f in ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DSWS_WITH_CUDA=1"):
        assert f in flags, (f, flags)
    assert not any("fast_math" in f or "fast-math" in f for f in flags), flags  # the build has none


def test_without_nvcc_reports_instead_of_failing(monkeypatch, capsys):
    monkeypatch.setattr(cuda_ptxas, "nvcc_path", lambda: None)
    assert cuda_ptxas.audit((80,)) == []
    assert cuda_ptxas.main(["--arch", "80"]) == 0
    assert "nvcc not found" in capsys.readouterr().out


def test_nvcc_failure_exits_nonzero(monkeypatch, tmp_path, capsys):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'error: fake nvcc' >&2\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setattr(cuda_ptxas, "nvcc_path", lambda: str(fake))
    assert cuda_ptxas.main(["--arch", "80"]) == 1
    err = capsys.readouterr().err
    assert "nvcc failed on csrc/cuda/" in err and "sm_80" in err and "fake nvcc" in err, err


@pytest.mark.skipif(cuda_ptxas.nvcc_path() is None, reason="no nvcc (CUDACXX, PATH, /usr/local/cuda/bin): the "
                    "CUDA audit needs the CUDA toolkit's compiler")
def test_audit_reports_every_kernel():
    rows = cuda_ptxas.audit((90,))
    assert rows and all(r["arch"] == 90 for r in rows)
    names = {r["kernel"].split("<")[0].split("[")[0] for r in rows}
    declared = set(cuda_ptxas.kernel_names())
    assert declared and declared <= names, f"kernels without a row: {sorted(declared - names)}"
    for r in rows:
        assert set(cuda_ptxas.KEYS) <= set(r), r
        assert r["registers"] > 0, r
    table = cuda_ptxas.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| sm_90 |" in table
