"""Settings for the architecture tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run the tiny models of these tests on one intra-op thread.

    Their convolutions are so small that threading costs more than it saves, and on a shared,
    loaded machine OpenMP threads spinning on two cores made the same steps about 20 times
    slower (measured: one SegNet-MTAN training step 0.14 s on one thread, 3.2 s on two).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
