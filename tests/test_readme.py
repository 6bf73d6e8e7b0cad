"""The README's Python examples run as written."""
import pathlib
import re

import pytest

TEXT = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2, "README lost its usage and drop-in examples"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    if "bayesian_torch" in code:
        pytest.importorskip("bayesian_torch.layers", reason="bayesian-torch not installed (CI installs it)")
    exec(compile(code, "README.md", "exec"), {})
