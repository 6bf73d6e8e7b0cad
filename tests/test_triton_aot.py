"""The launch layer every Triton kernel goes through (sws_kernels/triton/_launch.py) and the ahead-of-time
compile that checks GPU readiness without a GPU (benchmarks/triton_aot.py)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from sws_kernels.triton import _launch  # noqa: E402
from sws_kernels.triton import philox as TP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_outputs_are_poisoned_in_tests_and_not_filled_otherwise(monkeypatch):
    """Launchers allocate with torch.empty (no fill: a write-bound kernel would pay twice); the test suite
    turns poisoning on, so an output position a kernel forgets to write cannot pass as a plausible value."""
    assert _launch.POISON  # tests/conftest.py
    assert torch.isnan(_launch.empty((5,), dtype=torch.float32, device="cpu")).all()
    assert (_launch.empty((5,), dtype=torch.int64, device="cpu") == -1).all()
    monkeypatch.setattr(_launch, "POISON", False)
    calls = []
    monkeypatch.setattr(torch.Tensor, "fill_", lambda self, v: calls.append(v) or self)
    _launch.empty((5,), dtype=torch.float32, device="cpu")
    assert calls == []


def test_launch_refuses_tensors_on_two_devices():
    """The device guard launches on the tensors' device; tensors on two devices would be an illegal address."""
    out = torch.empty(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="_words_kernel: argument 1: expected a tensor on cpu like the others, got one on meta"):
        _launch.launch(TP._words_kernel, (1,), torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64,
                       device="meta"), out, 2, BLOCK=64)


def test_recorder_writes_each_specialisation_class_once(tmp_path, monkeypatch):
    rec = tmp_path / "launches.jsonl"
    monkeypatch.setattr(_launch, "_RECORD", str(rec))
    monkeypatch.setattr(_launch, "_seen", set())
    for seed in (1, 2, 2**64 - 1):  # the same classes (seeds are tensors): recorded once
        TP.uniform(seed, 10, sample=5)
    TP.normal(1, 10)  # NORMAL=True: a new constexpr
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    assert [x["kernel"] for x in lines] == ["sws_kernels.triton.philox:_stream_kernel"] * 2
    assert [x["meta"]["NORMAL"] for x in lines] == [False, True]
    assert lines[0]["args"][0] == {"t": "tensor", "dtype": "float32", "align16": True}
    assert lines[0]["args"][3] == {"t": "tensor", "dtype": "int64", "align16": lines[0]["args"][3]["align16"]}


def test_aot_compiles_a_recorded_launch_for_sm90(tmp_path):
    """End to end on one small kernel: a recorded launch compiles for sm_90 through Triton's own binder and
    the wheel's ptxas, with no GPU, and the report ends with the promised summary line."""
    rec = tmp_path / "launches.jsonl"
    env = dict(os.environ, SWS_TRITON_RECORD=str(rec), SWS_TRITON_TILES="gpu", TRITON_INTERPRET="1")
    code = ("import torch; from sws_kernels.triton import philox as T; "
            "T.philox_words(torch.zeros(8, 4, dtype=torch.int64), torch.zeros(8, 2, dtype=torch.int64))")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "benchmarks/triton_aot.py", "--arch", "90", "--record", str(rec), "--jobs",
                        "1", "--no-audit-cuda"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last == "aot: 1 kernel specializations compiled for sm_90, 0 failed, max spill 0 bytes", last
    assert re.search(r"\| _words_kernel \| [^|]* \| BLOCK=64 w4s3 \| sm_90 \| [1-9]\d* \| 0/0 \|", r.stdout), r.stdout
