"""The speed benchmark runs in quick mode and prints tables that parse."""

from __future__ import annotations

import importlib.util

from mtlkit.benchmarks import speed


def parse_tables(text: str) -> list[list[dict[str, str]]]:
    tables, current, header = [], [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            if current:
                tables.append(current)
            current, header = [], None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= {"-"}:
            current.append(dict(zip(header, cells, strict=True)))
    if current:
        tables.append(current)
    return tables


def number_or_dash(cell: str) -> float | None:
    return None if cell == "-" else float(cell)


def test_quick_benchmark_prints_parsable_tables(capsys):
    peers = importlib.util.find_spec("torchjd") is not None
    argv = ["--quick", "--methods", "uw,upgrad", "--repeats", "1", "--steps", "1"]
    assert speed.main(argv + (["--peers"] if peers else [])) == 0
    tables = parse_tables(capsys.readouterr().out)
    assert len(tables) == 2  # dense and many
    for table in tables:
        assert [row["method"] for row in table] == ["sum", "uw", "upgrad"]
        for row in table:
            assert number_or_dash(row["time/sum"]) > 0
            assert number_or_dash(row["peak MiB"]) >= 0
        assert number_or_dash(table[0]["time/sum"]) == 1.0
        upgrad = table[2]
        if peers:
            assert number_or_dash(upgrad["torchjd time/sum"]) > 0
            assert number_or_dash(upgrad["ours/torchjd mem"]) > 0
        assert table[1]["torchjd time/sum"] == "-"  # no peer for a loss method


def test_bad_arguments_are_named():
    import pytest

    with pytest.raises(SystemExit, match="unknown method"):
        speed.main(["--quick", "--methods", "nope"])
    with pytest.raises(SystemExit, match="unknown suite"):
        speed.main(["--quick", "--suites", "huge"])
