"""Checkpoints are atomic and load with weights_only=True."""

from __future__ import annotations

import pytest
import torch

from mtlkit.train import load_checkpoint, save_checkpoint


def test_round_trip(tmp_path):
    state = {"w": torch.arange(4.0), "epoch": 3, "history": "[]", "nested": {"a": [1, 2]}}
    save_checkpoint(state, tmp_path / "ck.pt")
    loaded = load_checkpoint(tmp_path / "ck.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["epoch"] == 3
    assert loaded["nested"] == {"a": [1, 2]}


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # a partial file on disk...
        raise KeyboardInterrupt  # ...and the process dies before the rename

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_code_in_a_checkpoint_is_refused(tmp_path):
    torch.save({"f": print}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(tmp_path / "evil.pt")


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
