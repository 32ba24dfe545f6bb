"""Checkpoints: written atomically, checksummed, loaded with ``weights_only=True``.

File layout: a header line ``MTLKIT-CHECKPOINT 1 <sha256 of the payload>`` then the payload,
the bytes of ``torch.save(state)``. Loading checks the header (a file of another program is
"not an mtlkit checkpoint"), then the checksum (one flipped byte anywhere is detected), then
reads the payload with ``torch.load(weights_only=True)``: tensors and plain containers only,
never pickled code. Every failure is a ``ValueError`` naming the file and the reason.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over the old one (``os.replace`` is atomic on POSIX), so a crash mid-write leaves the previous
checkpoint intact. A process killed outright (no ``except`` runs) can leave its temporary file
behind: the next save into that folder removes it (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

MAGIC = b"MTLKIT-CHECKPOINT 1 "
_DIGEST_HEX = 64


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files a killed write of ``path`` left in its folder; return them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.glob(f"{_tmp_prefix(path)}*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` to ``path`` atomically, with a checksum.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> p = Path(tempfile.mkdtemp()) / "ck.pt"
        >>> save_checkpoint({"w": torch.ones(2), "epoch": 3}, p)
        >>> load_checkpoint(p)["epoch"]
        3
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not an mtlkit checkpoint, fails its checksum (corrupt), or
            holds something other than tensors and containers (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    head, sep, payload = data.partition(b"\n")
    if not head.startswith(MAGIC) or not sep or len(head) != len(MAGIC) + _DIGEST_HEX:
        raise ValueError(f"checkpoint {path}: not an mtlkit checkpoint (no mtlkit header; "
                         f"written by another program or truncated)")
    if hashlib.sha256(payload).hexdigest().encode() != head[len(MAGIC):]:
        raise ValueError(f"checkpoint {path}: corrupt (checksum mismatch: the file changed "
                         f"after it was written)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the same user error
        text = str(err)
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)  # the refused code
        why = found.group(0) if found else (text.strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"checkpoint {path}: cannot be read safely with weights_only=True "
                         f"({why})") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: holds a {type(state).__name__}, not a state dict")  # noqa: TRY004
    return state
