"""The README is true as written: every Python snippet runs, every `sws-kernels` command line parses with the
current CLI, and the cheap ones run end to end (issue 17, item 3).

Snippets run in a temporary directory holding what `sws-kernels demo` leaves in ./sws_demo (a mean-field and an
SWS model of the demo's CNN, built here in a second instead of trained) so the ones that read those files run.
Commands that take tens of seconds (`bench` at its default shapes, `convert` of the demo model with K = 256,
`demo` itself, installs) are parse-checked only; their behaviour is covered by tests/test_cli.py and
tests/test_demo.py on small configurations.
"""
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
BASH = re.findall(r"```bash\n(.*?)```", TEXT, re.S)


def _cli_lines():
    """Every `sws-kernels ...` invocation in the README's bash blocks (split at &&, comments dropped)."""
    out = []
    for block in BASH:
        for line in block.splitlines():
            for part in line.split("#")[0].split("&&"):
                words = shlex.split(part)
                if words and words[0].endswith("sws-kernels"):
                    out.append(words[1:])
    return out


CLI = _cli_lines()
RUN = {"info", "plot"}  # run end to end; the rest are parse-checked (see the module docstring)


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """sws_demo/{mean_field,sws_model}.sws of the demo's CNN (width 16, as `demo` saves), made once."""
    import torch
    import sws_kernels as sws
    from sws_kernels import nn as snn
    from sws_kernels.convert import to_mean_field
    from sws_kernels.demo import digits_cnn

    tmp_path = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    (tmp_path / "sws_demo").mkdir()
    sws.save(to_mean_field(digits_cnn())[0], tmp_path / "sws_demo" / "mean_field.sws")
    model, cb = digits_cnn(), snn.Codebook(16)
    for i, m in enumerate(model):
        if isinstance(m, torch.nn.Conv2d):
            model[i] = snn.SWSConv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding, codebook=cb)
        elif isinstance(m, torch.nn.Linear):
            model[i] = snn.SWSLinear(m.in_features, m.out_features, codebook=cb)
    sws.save(model, tmp_path / "sws_demo" / "sws_model.sws")
    return tmp_path / "sws_demo"


@pytest.fixture
def demo_dir(demo_files, tmp_path, monkeypatch):
    """cwd = a fresh tmp_path holding sws_demo/ (the snippets may write next to it)."""
    (tmp_path / "sws_demo").symlink_to(demo_files, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_examples():
    assert len(BLOCKS) >= 2, "README lost its usage and drop-in examples"
    assert {c[0] for c in CLI} >= {"demo", "plot", "convert", "bench", "info"}, CLI


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, demo_dir):
    if "bayesian_torch" in code:
        pytest.importorskip("bayesian_torch.layers", reason="bayesian-torch not installed (CI installs it)")
    exec(compile(code, "README.md", "exec"), {})


def test_submodules_are_reachable_from_the_package():
    # `import sws_kernels; sws_kernels.demo.digits_cnn()` (the README once said this and it raised AttributeError)
    import sws_kernels

    assert sws_kernels.demo.digits_cnn().__class__.__name__ == "Sequential"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sws_kernels.nope  # noqa: B018


@pytest.mark.parametrize("argv", CLI, ids=[" ".join(a) for a in CLI])
def test_readme_command_lines(argv, demo_dir, capsys):
    from sws_kernels import cli

    args = cli.build_parser().parse_args(argv)  # a README option the CLI lost exits 2 here
    assert args.cmd == argv[0]
    if argv[0] in RUN:
        if argv[0] == "plot":
            pytest.importorskip("matplotlib")
            pytest.importorskip("sklearn")
            if "--bench" in argv:  # the bench CSV comes from the (slow) bench command before it
                return
        assert cli.main(argv) == 0, capsys.readouterr().err
        if argv[0] == "plot":
            out = capsys.readouterr().out
            assert "codebook.png" in out and "reliability.png" in out, out
