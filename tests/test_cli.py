"""The command line: each command runs end to end on a tiny configuration; bad arguments fail cleanly."""
import os
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
    assert all(int(r["rounds"]) >= 3 for r in rows if r["device"].startswith("CPU"))  # GPU: do_bench, no count
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


# -- issue 17: user mistakes exit 2 with one line, before any work ------------------------------------

def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("argv, needles", [
    (["bench", "--device", "mps"], ["--device", "'mps'", "--device cpu"]),
    (["bench", "--device", "gpu"], ["--device", "'cuda'"]),
    (["bench", "--device", "tpu:x"], ["--device", "'cpu', 'cuda' or 'cuda:N'"]),
    (["demo", "--device", "mps"], ["--device"]),
    (["quick", "--repeat", "0"], ["--repeat", "positive"]),
    (["bench", "--components", "0"], ["argument --components: expected"]),
    (["bench", "--min-time", "nan"], ["--min-time"]),
    (["convert", "a.sws", "b.sws", "--tau-w", "-1"], ["--tau-w"]),
])
def test_mistakes_exit_2_with_one_line(argv, needles, capsys):
    if "cuda" in " ".join(argv) or "gpu" in argv:
        pytest.importorskip("torch")
    assert _rc(argv) == 2
    line = _one_line_error(capsys, *needles)
    assert line.count("--components:") <= 1  # once, not "--components: --components:"


def test_cuda_device_without_a_gpu_says_so(capsys, monkeypatch):
    import warnings

    import torch

    # a CUDA build of torch on a machine without a driver warns "CUDA driver version is insufficient": say
    # "no GPU" instead, and never print torch's warning
    monkeypatch.setattr(torch.version, "cuda", "12.8")

    def unavailable():
        warnings.warn("CUDA initialization: CUDA driver version is insufficient for CUDA runtime version")
        return False
    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    monkeypatch.setattr(cli.os.path, "exists", lambda p: False if p == "/proc/driver/nvidia/version" else True)
    ok, why = cli.cuda_state()
    assert not ok and why.startswith("no GPU") and "insufficient" not in why
    assert _rc(["bench", "--device", "cuda"]) == 2
    assert "no GPU" in _one_line_error(capsys, "--device", "--device cpu")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr()
    assert "CUDA: none: no GPU" in out.out and "insufficient" not in out.out + out.err


def test_debug_shows_the_traceback_and_unexpected_errors_are_one_line(capsys, monkeypatch):
    with pytest.raises(cli.CLIError, match="--device"):
        cli.main(["--debug", "bench", "--device", "mps"])
    with pytest.raises(cli.CLIError):
        cli.main(["bench", "--device", "mps", "--debug"])

    def boom(args):
        raise RuntimeError("kaboom\nsecond line")
    monkeypatch.setattr(cli, "cmd_info", boom)
    assert cli.main(["info"]) == 1
    line = _one_line_error(capsys, "RuntimeError: kaboom", "--debug")
    assert "second line" not in line
    with pytest.raises(RuntimeError, match="kaboom"):
        cli.main(["info", "--debug"])


def test_outputs_checked_before_any_work(tmp_path, capsys, monkeypatch):
    from sws_kernels import bench

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    ran = []
    monkeypatch.setattr(bench, "run_bench", lambda **kw: ran.append(kw) or [])
    for argv, option in [
        (["bench", "--quick", "--csv", str(a_file / "b.csv")], "--csv"),     # parent is a file
        (["bench", "--quick", "--csv", str(tmp_path)], "--csv"),             # a directory
        (["plot", "--bench", str(a_file), "--out", str(a_file / "pics")], "--out"),
        (["plot", "--bench", str(a_file), "--out", str(a_file)], "--out"),
        (["demo", "--fast", "--out", str(a_file / "d")], "--out"),
    ]:
        assert _rc(argv) == 2, argv
        _one_line_error(capsys, option)
    assert not ran


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert _rc(["bench", "--quick", "--csv", str(ro / "b.csv")]) == 2
        _one_line_error(capsys, "--csv", "cannot write")
    finally:
        ro.chmod(0o700)


def test_convert_report_unwritable_before_conversion(mf_files, capsys):
    d, _ = mf_files
    (d / "f").write_text("x")
    assert cli.main(["convert", str(d / "mf.sws"), str(d / "o.sws"), "--report", str(d / "f" / "r.json")]) == 2
    _one_line_error(capsys, "--report")
    assert not (d / "o.sws").exists()


MODS = '''
from torch import nn
from sws_kernels.convert import to_mean_field

def det(input_shape, num_classes):          # the one factory form: FN(input_shape=, num_classes=)
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], 40), nn.ReLU(), nn.Linear(40, num_classes))

def mf(input_shape, num_classes):
    return to_mean_field(det(input_shape, num_classes))[0]

def digits(input_shape, num_classes):       # for the 8x8 digits
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 16), nn.ReLU(), nn.Linear(16, num_classes))

def fixed20(num_classes):                   # takes only what it needs
    return mf((20,), num_classes)

def needs_more(input_shape, num_classes, depth):
    return det(input_shape, num_classes)

def not_a_model(input_shape=None):
    return 3

def broken(input_shape, num_classes):
    raise KeyError("no such size")
'''


@pytest.fixture
def cwd_mods(tmp_path, monkeypatch):
    """A module in the current directory only (not on sys.path): `--arch mymods_17:fn` must import it."""
    import sys

    (tmp_path / "mymods_17.py").write_text(MODS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield tmp_path
    sys.modules.pop("mymods_17", None)


def test_factory_imports_from_the_current_directory(cwd_mods, capsys):
    fn = cli.load_callable("mymods_17:det", "--arch")
    m = cli.make_model(fn, "mymods_17:det", "--arch", input_shape=(20,), num_classes=5)
    assert m[-1].out_features == 5
    for spec, needles in [("nomod_17:f", ["no module 'nomod_17'", "PYTHONPATH"]),
                          ("mymods_17.py:det", ["mymods_17:det"]),
                          ("mymods_17:nope", ["no 'nope'", "det"]),
                          ("mymods_17", ["module:function"])]:
        with pytest.raises(cli.CLIError) as e:
            cli.load_callable(spec, "--arch")
        for n in needles:
            assert n in str(e.value), (spec, str(e.value))
    for name, kw, needle in [("needs_more", {}, "depth"), ("det", {"input_shape": (20,)}, "num_classes"),
                             ("not_a_model", {}, "torch.nn.Module"), ("broken", {"input_shape": (1,), "num_classes": 2},
                                                                      "KeyError")]:
        with pytest.raises(cli.CLIError, match=needle):
            cli.make_model(cli.load_callable(f"mymods_17:{name}", "--arch"), name, "--arch", **kw)


def test_convert_arch_takes_the_demo_factory_form(cwd_mods, capsys):
    import torch
    import sws_kernels as sws

    mymods_17 = __import__("sys").modules[cli.load_callable("mymods_17:mf", "--arch").__module__]
    torch.manual_seed(0)
    torch.save(mymods_17.mf((20,), 5).state_dict(), cwd_mods / "sd.pt")
    assert cli.main(["convert", "sd.pt", "o.sws", "--arch", "mymods_17:mf", "--components", "4"]) == 2
    _one_line_error(capsys, "--arch", "--input-shape", "--num-classes")
    assert cli.main(["convert", "sd.pt", "o.sws", "--arch", "mymods_17:mf", "--input-shape", "20", "--num-classes",
                     "5", "--components", "4"]) == 0
    model = sws.load(cwd_mods / "o.sws", mymods_17.det((20,), 5))
    assert sws.predict(model.eval(), torch.randn(3, 20), 2).shape == (2, 3, 5)


def test_plot_arch_model_that_does_not_fit_the_data(cwd_mods, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    import torch
    import sws_kernels as sws
    from sws_kernels.convert import to_sws

    mymods_17 = __import__("sys").modules[cli.load_callable("mymods_17:mf", "--arch").__module__]
    torch.manual_seed(0)
    m, _ = to_sws(mymods_17.mf((20,), 10), num_components=4, progress=False)
    sws.save(m, cwd_mods / "m.sws")
    # the default data are 8x8 digits: an --arch built from their shape does not match the file, and one that
    # matches the file (20 features) fails its forward on them; either way one line naming the options
    assert cli.main(["plot", "--model", "m.sws", "--arch", "mymods_17:det", "--out", "pics"]) == 2
    _one_line_error(capsys, "--arch", "--data", "does not match", "input_shape=(1, 8, 8)")
    assert cli.main(["plot", "--model", "m.sws", "--arch", "mymods_17:fixed20", "--out", "pics"]) == 2
    _one_line_error(capsys, "--arch", "--data", "forward failed", "(1, 8, 8)")


def test_demo_model_that_does_not_fit_the_data_fails_before_training(cwd_mods, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    from sws_kernels import demo

    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("training started"))
    assert cli.main(["demo", "--fast", "--no-out", "--model", "mymods_17:det"]) == 2
    _one_line_error(capsys, "--model", "(64, 1, 8, 8)", "input_shape=(1, 8, 8)")
    assert cli.main(["demo", "--fast", "--no-out", "--model", "nomod_17:f"]) == 2
    _one_line_error(capsys, "PYTHONPATH")
    with pytest.raises(pytest.fail.Exception, match="training started"):  # a fitting model passes the pre-flight
        cli.main(["demo", "--fast", "--no-out", "--model", "mymods_17:digits"])


def test_text_file_is_not_told_to_allow_pickle(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello\n")
    assert cli.main(["convert", str(tmp_path / "notes.txt"), str(tmp_path / "o.sws")]) == 2
    line = _one_line_error(capsys, "IN", "neither an sws_kernels file nor a torch checkpoint")
    assert "--allow-pickle" not in line


def test_convert_warns_when_not_smaller(mf_files, capsys):
    import json

    d, _ = mf_files
    # tau_w 0.01 makes most weights outliers (own mu and rho each): the SWS file is larger than the mean-field one
    assert cli.main(["convert", str(d / "mf.sws"), str(d / "o.sws"), "--components", "2", "--tau-w", "0.01",
                     "--report", str(d / "r.json")]) == 0
    err = capsys.readouterr().err
    warn = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warn and all("UserWarning" not in line for line in err.splitlines()), err
    assert any("--components" in w or "num_components" in w for w in warn), warn
    assert json.loads((d / "r.json").read_text())["warnings"]
    # no inlier left at all: an error naming the CLI option
    assert cli.main(["convert", str(d / "mf.sws"), str(d / "o.sws"), "--components", "2", "--tau-w", "0"]) == 2
    _one_line_error(capsys, "--tau-w")
    assert cli.main(["convert", str(d / "mf.sws"), str(d / "o.sws"), "--components", "500"]) == 2
    _one_line_error(capsys, "min_component_size", "try a smaller --components")


def test_help_texts(capsys):
    for cmd in ("quick", "bench", "convert"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "'hierarchical' adds each weight's own noise" in out, cmd
    with pytest.raises(SystemExit):
        cli.main(["plot", "--help"])
    out = capsys.readouterr().out
    assert "95%" in out and "95%%" not in out


def test_backend_accepts_the_names_backends_prints():
    import torch
    import sws_kernels as sws
    from sws_kernels import functional as F

    args = (torch.randn(3, 2), torch.zeros(3, 3), torch.zeros(4, 4, dtype=torch.uint8))
    for name, (ok, _) in sws.backends().items():
        with sws.backend(name):
            pass  # accepted
    if sws.backends()["native_cpu"][0]:
        with sws.backend("native_cpu"):
            w = F.reconstruct(*args, seed=1)
        with sws.backend("reference"):
            torch.testing.assert_close(w, F.reconstruct(*args, seed=1))
        with sws.backend("native_cuda"), pytest.raises(RuntimeError, match="'native'"):
            F.reconstruct(*args, seed=1)


def test_bench_csv_with_two_methods_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import csv

    path = tmp_path / "b.csv"
    assert cli.main(["bench", "--quick", "--methods", "sws,reference", "--passes", "forward", "--S", "1",
                     "--min-time", "0.001", "--csv", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    assert {r["method"] for r in rows} == {"sws", "reference"}
    assert {(r["components"], r["mode"]) for r in rows} == {("64", "paper")}
    assert cli.main(["plot", "--bench", str(path), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    from sws_kernels import plots

    assert plots._bench_title(plots.read_bench_csv(path)).startswith("sws-kernels bench: linear 128->128, K = 64, "
                                                                     "mode paper")
    only = tmp_path / "only.csv"
    only.write_text("".join(line for i, line in enumerate(path.open()) if i == 0 or ",sws," in line))
    capsys.readouterr()
    assert cli.main(["plot", "--bench", str(only), "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "--bench", "--methods")


def test_default_command_takes_quick_options(capsys):
    assert cli.main(["--weights", "3001", "--components", "5", "--samples", "2", "--repeat", "1"]) == 0
    assert "n = 3,001 weights, K = 5, S = 2" in capsys.readouterr().out
