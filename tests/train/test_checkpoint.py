"""Checkpoints are atomic, checksummed, and load with weights_only=True."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch

from mtlkit.train import load_checkpoint, save_checkpoint
from mtlkit.train.checkpoint import MAGIC


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


def _with_header(payload: bytes) -> bytes:
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def test_code_in_a_checkpoint_is_refused_even_with_a_valid_header(tmp_path):
    buf = io.BytesIO()
    torch.save({"f": print}, buf)  # pickled code: weights_only refuses it
    (tmp_path / "evil.pt").write_bytes(_with_header(buf.getvalue()))
    with pytest.raises(ValueError, match=r"evil\.pt: cannot be read safely .*GLOBAL .*print"):
        load_checkpoint(tmp_path / "evil.pt")


def test_a_file_of_another_program_is_named_foreign(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")  # a plain torch file: no header
    with pytest.raises(ValueError, match=r"plain\.pt: not an mtlkit checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


@pytest.mark.parametrize("where", [0, 30, 100, -1])
def test_one_flipped_byte_anywhere_is_detected(tmp_path, where):
    path = tmp_path / "ck.pt"
    save_checkpoint({"w": torch.arange(50.0), "epoch": 2}, path)
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"ck\.pt: (corrupt \(checksum mismatch|not an mtlkit)"):
        load_checkpoint(path)


def test_the_next_save_removes_a_killed_writes_temporary_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1}, path)
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"  # what SIGKILL mid-write leaves
    stale.write_bytes(b"half a checkpo")
    other = tmp_path / ".other.pt.abc.tmp"  # another file's temporary is not ours to delete
    other.write_bytes(b"x")
    save_checkpoint({"epoch": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc.tmp", "checkpoint.pt"]
    assert load_checkpoint(path)["epoch"] == 2


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
