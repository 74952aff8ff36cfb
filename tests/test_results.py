"""The results folders: each README's epoch table, written by hand as the run goes, says what its
metrics.csv says (the run's own file, copied), row for row."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from s11lib.run import read_metrics

ROOT = Path(__file__).parents[1]
FOLDERS = sorted(p.parent for p in (ROOT / "results").rglob("metrics.csv") if (p.parent / "README.md").is_file())
# The table's columns, in order: metrics.csv's column and the decimals the table rounds it to.
COLUMNS = (("epoch", 0), ("lr", None), ("train_loss", 4), ("train_acc", 2), ("val_acc", 2), ("test_loss", 4),
           ("test_acc", 2), ("seconds", 0))
ROW = re.compile(r"^\| (\d+) \|(.*)\|$")


def epoch_table(readme: str) -> list[list[str]]:
    """The rows of the README's epoch table (the one headed `| epoch | lr | ...`), as cell strings."""
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| epoch | lr |"))
    rows = []
    for line in lines[start + 2:]:
        if not ROW.match(line):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_there_are_results_to_check():
    assert {ROOT / "results" / "cpu-reference-v1", ROOT / "results" / "cpu-reference"} <= set(FOLDERS)


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.relative_to(ROOT / "results").as_posix())
def test_the_readmes_epoch_table_is_metrics_csv(folder):
    metrics = read_metrics(folder / "metrics.csv")
    table = epoch_table((folder / "README.md").read_text())
    assert [int(row[0]) for row in table] == [row["epoch"] for row in metrics], "a row per epoch, in order"
    for cells, row in zip(table, metrics):
        for cell, (column, decimals) in zip(cells, COLUMNS):
            number = cell.split(" ", 1)[0]  # the seconds may carry a note: "1504 (paused in it)"
            if decimals is None:  # the rate, as short as it is exact: 0.4, 0.08
                assert float(number) == pytest.approx(row[column], rel=1e-9), (row["epoch"], column)
            else:  # rounded either way at a tie: metrics.csv's 1.92445 may read 1.9244 or 1.9245
                assert len(number.partition(".")[2]) == decimals, (row["epoch"], column, number)
                assert abs(float(number) - row[column]) <= 0.5 * 10 ** -decimals + 1e-9, (row["epoch"], column)
