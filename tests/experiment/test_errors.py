"""User errors end in one line and exit 2, naming the field or file; the previous checkpoint
stays intact (item 6 of the experiment issue)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from mtlkit import cli
from mtlkit.train import load_checkpoint

TINY = ["--set", "dataset_options.size=160", "--epochs", "2", "--batch-size", "32",
        "--set", "cosine_every=0", "--method", "uw"]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mtlkit: error: "), err
    return err


@pytest.fixture
def run(tmp_path, capsys) -> Path:
    """A finished 2-epoch run that keeps its last checkpoint."""
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def _intact(out: Path, before: bytes) -> None:
    assert (out / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "cuda"], r"device: 'cuda' is not available: this machine has no CUDA"),
        (["--device", "cuda:7"], r"device: 'cuda:7' is not available"),
        (["--lr", "0.01", "--batch-size", "16", "--method", "dwa"],
         (r"cannot resume .*checkpoint\.pt: it was saved by a run with other settings \("
         r"batch_size: 32 \(saved\) != 16 \(now\); lr: 0\.003 \(saved\) != 0\.01 \(now\); "
         r"method: .*Uncertainty.* != .*DynamicWeight.*method_name: 'uw' \(saved\) != 'dwa'")),
        (["--model", "hard_sharing"], (r"other settings \(model: 'default' \(saved\) != "
                                      r"'hard_sharing' \(now\)\)")),
        (["--set", "dataset_options.size=200"],
         r"other settings \(dataset_options: \{'size': 160\} \(saved\) != \{'size': 200\}"),
        (["--set", "optimizer.name=sgd", "--set", "scheduler.name=step"],
         r"optimizer: 'adam' \(saved\) != 'sgd' \(now\); scheduler: "),
    ],
)
def test_resume_errors_name_the_cause_and_keep_the_checkpoint(run, capsys, extra, message):
    if "cuda" in " ".join(extra) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = (run / "checkpoint.pt").read_bytes()
    code = cli.main(["train", *TINY, "--out", str(run), "--resume", *extra])
    assert code == cli.EXIT_USAGE
    assert re.search(message, _error(capsys))
    _intact(run, before)


def test_a_longer_budget_resumes_with_the_same_settings(run, capsys):
    assert cli.main(["train", *TINY, "--out", str(run), "--resume", "--epochs", "3"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 3


@pytest.mark.parametrize("kind", ["flipped byte", "foreign", "truncated"])
def test_corrupt_or_foreign_checkpoint_is_named_with_the_reason(run, capsys, kind):
    path = run / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    if kind == "flipped byte":
        data[len(data) // 2] ^= 0x10
        why = r"corrupt \(checksum mismatch"
    elif kind == "foreign":
        buf = __import__("io").BytesIO()
        torch.save({"model": {}}, buf)
        data = bytearray(buf.getvalue())
        why = r"not an mtlkit checkpoint"
    else:
        data = data[: len(data) // 3]
        why = r"corrupt \(checksum mismatch"
    path.write_bytes(bytes(data))
    code = cli.main(["train", *TINY, "--out", str(run), "--resume"])
    assert code == cli.EXIT_USAGE
    assert re.search(rf"checkpoint {re.escape(str(path))}: {why}", _error(capsys))
    assert path.read_bytes() == bytes(data)  # left as it was, for the user to look at


def test_out_that_is_a_file_or_not_writable(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    assert cli.main(["train", *TINY, "--out", str(target)]) == cli.EXIT_USAGE
    assert f"out: {target} is a file, not a folder" in _error(capsys)
    assert cli.main(["train", *TINY, "--out", str(target / "sub")]) == cli.EXIT_USAGE
    assert f"out: cannot write into {target / 'sub'}" in _error(capsys)
    # /proc refuses new files even to root, where a chmod-ed folder would not
    assert cli.main(["compare", *TINY[:-2], "--out", "/proc"]) == cli.EXIT_USAGE
    assert "out: cannot write into /proc" in _error(capsys)


def test_non_finite_loss_names_task_and_step_and_keeps_the_last_good_checkpoint(
        tmp_path, capsys, monkeypatch):
    from mtlkit.train import trainer as trainer_module

    out = tmp_path / "nan"
    real = trainer_module.Trainer._train_epoch

    def nan_in_epoch_2(self, loader):  # the 'sum' loss turns NaN at the first step of epoch 2
        if self.epoch == 1:
            i = self.names.index("sum")
            task = self.tasks[i]
            self.tasks[i] = dataclasses.replace(
                task, loss=lambda *a, **k: task.loss(*a, **k) * float("nan"))
        real(self, loader)

    monkeypatch.setattr(trainer_module.Trainer, "_train_epoch", nan_in_epoch_2)
    code = cli.main(["train", *TINY[:-2], "--method", "ew", "--out", str(out),
                     "--set", "keep_checkpoint=last"])
    assert code == cli.EXIT_USAGE
    err = _error(capsys)
    assert re.search(r"non-finite loss for task\(s\) \['sum'\].* at step 4 \(epoch 2\); the last "
                     rf"good checkpoint \(epoch 1\) is kept at {re.escape(str(out))}/checkpoint\.pt",
                     err), err
    assert load_checkpoint(out / "checkpoint.pt")["global_step"] == 3  # 3 steps an epoch
    assert not (out / "result.json").exists()


def test_truncated_log_lines(run, capsys):
    log = run / "epochs.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) == 2
    # a line cut short inside the log: an error naming the file and the line
    log.write_text("".join([lines[0][:15] + "\n", lines[1]]))
    before = (run / "checkpoint.pt").read_bytes()
    assert cli.main(["train", *TINY, "--out", str(run), "--resume"]) == cli.EXIT_USAGE
    assert re.search(rf"{re.escape(str(log))} line 1: truncated or invalid log record",
                     _error(capsys))
    _intact(run, before)
    # an unfinished last line (the process was killed while writing it) is dropped on resume
    log.write_text("".join(lines) + lines[0][:20])
    assert cli.main(["train", *TINY, "--out", str(run), "--resume", "--epochs", "3"]) == 0
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [1, 2, 3]


def test_a_killed_checkpoint_write_leaves_no_temp_file_after_the_next_run(run, capsys):
    stale = run / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert cli.main(["train", *TINY, "--out", str(run), "--resume", "--epochs", "3"]) == 0
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


@pytest.mark.parametrize(("keep", "files"), [("last", ["checkpoint.pt"]), ("best", ["best.pt"]),
                                             ("none", [])])
def test_keep_checkpoint_policy(tmp_path, capsys, keep, files):
    out = tmp_path / keep
    assert cli.main(["train", *TINY, "--out", str(out), "--set", f"keep_checkpoint={keep}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.glob("*.pt")) == files
    record = json.loads((out / "result.json").read_text())
    assert record["result"]["selected_epoch"] == printed["selected_epoch"]
    if keep == "best":  # the checkpoint of the epoch selected on validation
        assert load_checkpoint(out / "best.pt")["epoch"] == printed["selected_epoch"]
