# Sourced by bin/mtlkit and bin/test: creates .venv once, with the CPU build of torch pinned
# (an unpinned torch would pull a multi-GB CUDA build), then installs mtlkit in editable mode.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.mtlkit-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    echo "mtlkit: setting up $VENV (first run only)..." >&2
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" >&2
    # torch repeated so that no extra can move it off the CPU build
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev,cli,docs,torchjd,lightning,qm9,parquet]" \
        "torch==2.13.0" >&2
    touch "$STAMP"
fi
