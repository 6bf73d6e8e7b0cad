"""The command line: each command runs end to end on a tiny configuration; bad arguments fail cleanly."""
import subprocess
import sys

import pytest

from sws_kernels import cli


def _rc(argv):
    """Exit status of `sws-kernels ARGV` in-process (argparse's own errors exit through SystemExit)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "triton", "native_cpu", "native_cuda"):
        assert name in out
    # the native CUDA line says why it is missing (or which devices it runs on), and the build is described
    from sws_kernels import native

    cuda_line = next(line for line in out.splitlines() if line.startswith("native_cuda"))
    assert native.CUDA_REASON and native.CUDA_REASON in cuda_line, cuda_line
    assert f"native build: {native.build_summary()}" in out


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


# -- bench ---------------------------------------------------------------------------------------------

def test_bench_quick_table_csv_and_chart(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import csv

    path = tmp_path / "bench.csv"
    assert cli.main(["bench", "--quick", "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sws speed-up" in out and "bt_mean_field" in out
    rows = list(csv.DictReader(path.open()))
    from sws_kernels.bench import METHODS, PASSES
    # every method x pass x S at M = 8, each a positive time from >= 3 timed rounds
    assert {(r["method"], r["pass"], r["S"]) for r in rows} == {(m, p, s) for m in METHODS for p in PASSES
                                                                  for s in ("1", "4")}
    assert all(float(r["median_ms"]) > 0 and float(r["min_ms"]) <= float(r["median_ms"]) for r in rows)
    assert all(int(r["rounds"]) >= 3 for r in rows)
    assert cli.main(["plot", "--bench", str(path), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, option", [
    (["--M", "0"], "--M"), (["--S", "1,x"], "--S"), (["--methods", "dense,bogus"], "--methods"),
    (["--passes", "backward"], "--passes"), (["--csv", "/no/such/dir/b.csv"], "--csv"),
])
def test_bench_bad_arguments_fail_cleanly(argv, option, capsys):
    with pytest.raises(SystemExit) as e:  # argparse type errors exit 2 themselves
        rc = cli.main(["bench", "--quick", *argv])
        raise SystemExit(rc)
    assert e.value.code == 2
    assert option in capsys.readouterr().err


# -- convert and plot ----------------------------------------------------------------------------------

ARCH = '''
from torch import nn
from sws_kernels.convert import to_mean_field

def det():
    return nn.Sequential(nn.Linear(20, 40), nn.BatchNorm1d(40), nn.ReLU(), nn.Linear(40, 5))

def mean_field():
    return to_mean_field(det())[0]
'''


@pytest.fixture
def mf_files(tmp_path, monkeypatch):
    """A small trained-looking mean-field model saved three ways, and its architecture as an import path."""
    import torch
    import sws_kernels as sws

    (tmp_path / "cli_arch.py").write_text(ARCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    import cli_arch

    torch.manual_seed(0)
    model = cli_arch.mean_field()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)  # non-Bayesian state that convert must carry over
    sws.save(model, tmp_path / "mf.sws")
    torch.save(model.state_dict(), tmp_path / "mf_sd.pt")
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "mf_ckpt.pt")
    torch.save(model, tmp_path / "mf_module.pt")
    return tmp_path, model


@pytest.mark.parametrize("src, extra", [("mf.sws", []), ("mf_sd.pt", ["--arch", "cli_arch:mean_field"]),
                                        ("mf_ckpt.pt", ["--arch", "cli_arch:mean_field"]),
                                        ("mf_module.pt", ["--allow-pickle"])])
def test_convert_then_load_into_the_architecture(mf_files, src, extra, capsys):
    import json

    import torch
    import sws_kernels as sws
    import cli_arch
    from sws_kernels.nn import SWS_LAYERS

    d, mf = mf_files
    out, rep_path = d / "out.sws", d / "rep.json"
    assert cli.main(["convert", str(d / src), str(out), "--components", "8", "--report", str(rep_path), *extra]) == 0
    text = capsys.readouterr().out
    assert "trainable parameters" in text and "->" in text
    rep = json.loads(rep_path.read_text())
    assert rep["params_ratio"] == pytest.approx(rep["params_before"] / rep["params_after"])
    assert rep["params_before"] == 2 * (20 * 40 + 40 + 40 * 5 + 5)
    assert rep["output_bytes"] == out.stat().st_size
    # the SWS file restores into the plain deterministic architecture: SWS layers rebuilt, BatchNorm carried
    model = sws.load(out, cli_arch.det())
    assert sum(isinstance(m, SWS_LAYERS) for m in model.modules()) == 2
    torch.testing.assert_close(model[1].running_mean, mf[1].running_mean)
    y = sws.predict(model.eval(), torch.randn(4, 20), 2)
    assert y.shape == (2, 4, 5)


def test_convert_bad_inputs_fail_cleanly(mf_files, capsys):
    d, _ = mf_files
    cases = [
        (["convert", str(d / "missing.sws"), str(d / "o.sws")], "IN"),
        (["convert", str(d / "mf_sd.pt"), str(d / "o.sws")], "--arch"),
        (["convert", str(d / "mf_module.pt"), str(d / "o.sws")], "--allow-pickle"),
        (["convert", str(d / "mf.sws"), str(d / "mf.sws")], "OUT"),
        (["convert", str(d / "mf.sws"), str(d / "nodir" / "o.sws")], "OUT"),
        (["convert", str(d / "mf_sd.pt"), str(d / "o.sws"), "--arch", "cli_arch:det"], "--arch"),
        (["convert", str(d / "mf.sws"), str(d / "o.sws"), "--tau-w", "-1"], "--tau-w"),
    ]
    for argv, option in cases:
        assert _rc(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and option in err, (argv, err)
    (d / "junk.sws").write_bytes(b"SWSKRNL1garbage")
    assert cli.main(["convert", str(d / "junk.sws"), str(d / "o.sws")]) == 2
    assert "IN" in capsys.readouterr().err


def test_plot_model_and_bad_arguments(mf_files, capsys):
    pytest.importorskip("matplotlib")
    d, _ = mf_files
    assert cli.main(["convert", str(d / "mf.sws"), str(d / "sws.sws"), "--components", "8"]) == 0
    capsys.readouterr()
    assert cli.main(["plot", "--model", str(d / "sws.sws"), "--mean-field", str(d / "mf.sws"), "--out",
                     str(d / "pics")]) == 0
    assert (d / "pics" / "codebook.png").stat().st_size > 1000
    assert "--arch" in capsys.readouterr().out  # no forward for an unknown architecture: says how to get one
    for argv, option in [([], "--model"), (["--model", str(d / "mf.sws")], "--model"),
                         (["--bench", str(d / "none.csv")], "--bench"), (["--bench", str(d / "mf_sd.pt")], "--bench"),
                         (["--mean-field", str(d / "mf.sws")], "--mean-field")]:
        assert cli.main(["plot", "--out", str(d / "pics"), *argv]) == 2, argv
        assert option in capsys.readouterr().err, argv


@pytest.mark.parametrize("cmd", ["info", "quick", "demo", "bench", "convert", "plot"])
def test_every_command_has_help(cmd, capsys):
    # in-process (a subprocess per command costs seconds of imports); test_bad_arguments_fail_cleanly covers
    # the `python -m sws_kernels` entry point and its exit status
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: sws-kernels " + cmd in capsys.readouterr().out


BT_ARCH = '''
from torch import nn
from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

def bt_model():
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    dnn_to_bnn(m, {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
                   "type": "Reparameterization", "moped_enable": False, "moped_delta": 0.5})
    return m
'''


def test_convert_bayesian_torch_checkpoint(tmp_path, monkeypatch, capsys):
    pytest.importorskip("bayesian_torch")
    import torch
    import sws_kernels as sws
    from sws_kernels.nn import SWSConv2d, SWSLinear

    (tmp_path / "bt_arch.py").write_text(BT_ARCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    import bt_arch

    torch.manual_seed(0)
    torch.save({"epoch": 1, "state_dict": bt_arch.bt_model().state_dict()}, tmp_path / "bt.pth")
    out = tmp_path / "bt.sws"
    assert cli.main(["convert", str(tmp_path / "bt.pth"), str(out), "--arch", "bt_arch:bt_model",
                     "--components", "8"]) == 0
    assert "bayesian-torch layers converted: 0, 3" in capsys.readouterr().out
    # the user's bayesian-torch architecture: its layers are not SWS layers, so they are swapped in on request
    model = sws.load(out, bt_arch.bt_model(), rebuild=True)
    assert isinstance(model[0], SWSConv2d) and isinstance(model[3], SWSLinear)
    assert sws.predict(model, torch.randn(3, 1, 6, 6), 2).shape == (2, 3, 5)
