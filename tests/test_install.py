"""Installed like a library: the core (torch, numpy, scipy) imports and trains without the
extras; what needs an extra says which one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
EXTRAS = ("yaml", "matplotlib", "sklearn", "PIL")

BLOCK = f"""
import sys
for name in {EXTRAS!r}:  # as if the extras were not installed: imports fail, find_spec is None
    sys.modules[name] = None
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"},
                          timeout=300, check=False)


def test_core_imports_and_trains_without_the_extras_and_names_the_extra_where_needed(tmp_path):
    proc = _run(f"""
import sys
import mtlkit, mtlkit.balancers, mtlkit.engine, mtlkit.nn, mtlkit.optim, mtlkit.tasks
print(sorted(m for m in sys.modules if m.split(".")[0] in {EXTRAS!r}))
""" + BLOCK + f"""
from mtlkit.experiment import Experiment
exp = Experiment.from_dict({{
    "dataset": "gradnorm_toy", "dataset_options": {{"sizes": [64, 16, 16], "input_dim": 8,
                                                      "output_dim": 4}},
    "methods": ["mgda"], "epochs": 1, "batch_size": 32, "out": {str(tmp_path / "o")!r}}})
result = mtlkit.train(exp)
print("trained", result.selected_epoch)
try:
    Experiment.from_file({str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")!r})
except ValueError as err:
    print(err)
from mtlkit import cli
raise SystemExit(cli.main(["train", "--method", "ew", "--out", {str(tmp_path / "c")!r}]))
""")
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["[]", "trained 1",
                         "reading a YAML config needs PyYAML: pip install 'mtlkit[cli]'"], \
        proc.stdout + proc.stderr
    # the CLI on the built-in data (scikit-learn's digits): one line naming the extra, exit 2
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtlkit: error: ") and "sklearn" in err[0]
    assert err[0].endswith("the command line tool needs the extras: pip install 'mtlkit[cli]'")


def test_pyproject_core_and_extras():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0] for d in meta["dependencies"]}
    assert core == {"torch", "numpy", "scipy"}
    extras = meta["optional-dependencies"]
    assert {"pyyaml", "matplotlib", "scikit-learn"} <= {d.split(">")[0] for d in extras["cli"]}
    assert any(d.startswith("sphinx") for d in extras["docs"])
    venv = (SRC.parent / "bin" / "_venv.sh").read_text()
    assert 'pip install -q "torch==2.13.0"' in venv
    assert venv.index("torch==2.13.0") < venv.index('-e "$ROOT[dev,cli,docs,torchjd,')


@pytest.mark.slow
def test_api_reference_builds_offline_from_the_docstrings():
    root = SRC.parent
    proc = subprocess.run([str(root / "bin" / "docs")], capture_output=True, text=True,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    page = (root / "docs" / "_build" / "html" / "experiment.html").read_text()
    assert "mtlkit.experiment.Experiment" in page and "keep_checkpoint" in page
