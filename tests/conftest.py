"""Shared test settings: fixed seeds; device and dtype from MTLKIT_TEST_DEVICE / MTLKIT_TEST_DTYPE."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("MTLKIT_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("MTLKIT_TEST_DTYPE", "float32"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_core(monkeypatch) -> None:
    """Comparisons run as on a one-core machine (one run at a time, in this process, where
    the tests' monkeypatches reach it) unless a test sets ``jobs``."""
    monkeypatch.setattr("mtlkit.experiment._cores", lambda: 1)
