"""The command line: each command runs end to end on a tiny configuration; bad arguments fail cleanly."""
import subprocess
import sys

import pytest

from sws_kernels import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "triton", "native_cpu", "native_cuda"):
        assert name in out


@pytest.mark.parametrize("mode", ["paper", "hierarchical", "mean"])
def test_quick_runs_and_backends_agree(capsys, mode):
    assert cli.main(["quick", "--weights", "5003", "--components", "17", "--samples", "3", "--mode", mode,
                     "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "ms" in out
    for line in out.splitlines():
        if "vs reference" in line:
            err = float(line.split("=")[1].split(",")[0])
            assert err < 1e-5, line


def test_bad_arguments_fail_cleanly():
    r = subprocess.run([sys.executable, "-m", "sws_kernels", "quick", "--samples", "0"], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "samples" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sws_kernels", "quick", "--mode", "bogus"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "mode" in r.stderr
