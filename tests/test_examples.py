"""examples/ddp_train.py gives the same result alone and under torchrun with two processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"


def _alone(argv: list[str]) -> dict:
    spec = importlib.util.spec_from_file_location("ddp_train", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("method", ["uw", "upgrad"])  # one ordinary backward; per-task passes
def test_torchrun_with_two_processes_matches_one(method: str) -> None:
    argv = ["--method", method, "--steps", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLE), *argv],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    together = json.loads(run.stdout.strip().splitlines()[-1])
    alone = _alone(argv)
    assert together["processes"] == 2 and alone["processes"] == 1
    assert together["weights"] == pytest.approx(alone["weights"], rel=1e-4, abs=1e-6)
    assert together["loss"] == pytest.approx(alone["loss"], rel=1e-4)
