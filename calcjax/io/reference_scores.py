"""Scan-level reference scores (a physician's sheet: per-artery and total Agatston, no masks).

A sheet is a CSV or an ``.xlsx`` workbook (first worksheet; read with openpyxl) with a header row and one
row per scan:

- a key column (``key_column``; default the first of ``filename``, ``scan``, ``scan_id``, ``patient``,
  ``id``, else the first column). Headers are compared without surrounding spaces and case (the COCA
  sheet's ``"filename "`` has a trailing space);
- optional per-artery columns: ``LM`` (also ``LCA`` / ``left main``: COCA names the left main "LCA"),
  ``LAD``, ``LCX`` (``CX``), ``RCA``;
- the total (``total``, ``agatston``, ``total agatston``). The risk category is always taken from the
  total: a sheet's per-artery figures do not always add up to it (COCA chest scan 2: 132 + 1.91 + 128 +
  37.5 = 299.41 against a total of 300), and the total is what the reader reported. Without a total
  column, the sum of the arteries is the total (``total_from="arteries"``).

Matching a sheet row to a scan (:func:`match`): the key equals the scan id, or equals the first folder of
the scan's path below the *base* followed by ``key_suffix``; without a ``key_suffix``, the folder's name
itself, else the one key that is the folder's name followed by a single letter (COCA: folder ``2`` is row
``2A``; a folder with two such keys, ``2A`` and ``2B``, matches none). The base is the sheet's own
folder when the sheet lies inside the scanned tree (so a release's sheet only names the scans beside it;
COCA's gated patients ``0-2`` are not its chest rows ``1A``/``2A``), else the scanned folder itself.
No jax here.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import string

from calcjax.core import agatston

KEY_COLUMNS = ("filename", "scan", "scan_id", "patient", "id")
ARTERY_COLUMNS = {
    "LM": ("lm", "lca", "left main"),
    "LAD": ("lad",),
    "LCX": ("lcx", "cx"),
    "RCA": ("rca",),
}
TOTAL_COLUMNS = ("total", "agatston", "total agatston")


class ReferenceScoresError(ValueError):
    """A sheet that cannot be read, naming the file (and row / column) and the reason."""


@dataclasses.dataclass(frozen=True)
class ReferenceScore:
    """One sheet row: ``total`` Agatston, ``per_artery`` (only the columns the sheet has; blank cells
    left out), ``total_from`` (``total`` column or ``arteries`` sum) and the arteries' sum."""

    key: str
    total: float
    per_artery: dict[str, float]
    total_from: str
    artery_sum: float | None

    @property
    def risk_category(self) -> int:
        return agatston.risk_category(self.total)


def _rows(path: str) -> list[list]:
    if not os.path.isfile(path):
        raise ReferenceScoresError(f"{path}: no such file")
    if path.lower().endswith((".xlsx", ".xlsm")):
        try:
            import openpyxl
        except ImportError:  # pragma: no cover - openpyxl is a dependency
            raise ReferenceScoresError(
                f"{path}: reading .xlsx needs openpyxl (pip install openpyxl)"
            ) from None
        try:
            book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        except Exception as e:  # openpyxl raises zipfile / KeyError / InvalidFileException on bad files
            raise ReferenceScoresError(
                f"{path}: not a readable .xlsx workbook ({e.__class__.__name__})"
            ) from None
        try:
            return [list(r) for r in book.worksheets[0].iter_rows(values_only=True)]
        finally:
            book.close()
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [row for row in csv.reader(f)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ReferenceScoresError(f"{path}: not a readable CSV ({e})") from None


def _number(value, path: str, line: int, column: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ReferenceScoresError(
            f"{path}: row {line}, column {column!r}: {value!r} is not a number"
        ) from None
    if not math.isfinite(x) or x < 0:
        raise ReferenceScoresError(f"{path}: row {line}, column {column!r}: {value!r} is not a valid score")
    return x


def _key_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a spreadsheet's numeric key 2.0 is the folder "2"
    return "" if value is None else str(value).strip()


def read_reference_scores(path: str, key_column: str | None = None) -> dict[str, ReferenceScore]:
    """``{key: ReferenceScore}`` of a sheet (module docstring); raises :class:`ReferenceScoresError`."""
    rows = [r for r in _rows(path) if any(_key_text(v) for v in r)]
    if not rows:
        raise ReferenceScoresError(f"{path}: empty sheet")
    header = [_key_text(h).lower() for h in rows[0]]
    if key_column is not None:
        if key_column.strip().lower() not in header:
            raise ReferenceScoresError(
                f"{path}: no key column {key_column!r}; columns are {[_key_text(h) for h in rows[0]]}"
            )
        key_index = header.index(key_column.strip().lower())
    else:
        key_index = next((header.index(k) for k in KEY_COLUMNS if k in header), 0)
    arteries = {
        artery: next((header.index(n) for n in names if n in header), None)
        for artery, names in ARTERY_COLUMNS.items()
    }
    arteries = {a: i for a, i in arteries.items() if i is not None}
    total_index = next((header.index(n) for n in TOTAL_COLUMNS if n in header), None)
    if total_index is None and not arteries:
        raise ReferenceScoresError(
            f"{path}: neither a total ({', '.join(TOTAL_COLUMNS)}) nor per-artery columns "
            f"({', '.join(ARTERY_COLUMNS)}) in the header"
        )
    out: dict[str, ReferenceScore] = {}
    for line, row in enumerate(rows[1:], start=2):
        row = list(row) + [None] * (len(header) - len(row))
        key = _key_text(row[key_index])
        if not key:
            raise ReferenceScoresError(f"{path}: row {line} has no key")
        if key in out:
            raise ReferenceScoresError(f"{path}: row {line}: key {key!r} appears twice")
        per_artery = {}
        for artery, i in arteries.items():
            v = _number(row[i], path, line, _key_text(rows[0][i]))
            if v is not None:
                per_artery[artery] = v
        artery_sum = sum(per_artery.values()) if per_artery else None
        total = None if total_index is None else _number(row[total_index], path, line, "total")
        total_from = "total"
        if total is None:
            if artery_sum is None:
                raise ReferenceScoresError(f"{path}: row {line}: no total and no per-artery score")
            total, total_from = artery_sum, "arteries"
        out[key] = ReferenceScore(key, total, per_artery, total_from, artery_sum)
    return out


def _inside(path: str, folder: str) -> bool:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    return rel != ".." and not rel.startswith(".." + os.sep)


def match_base(sheet_path: str, input_root: str) -> str:
    """The folder below which scan folders are matched to keys (module docstring)."""
    sheet_folder = os.path.dirname(os.path.abspath(sheet_path))
    return sheet_folder if _inside(sheet_folder, input_root) else os.path.abspath(input_root)


def match(
    refs: dict[str, ReferenceScore],
    *,
    scan_id: str,
    scan_folder: str | None,
    base: str,
    key_suffix: str = "",
) -> ReferenceScore | None:
    """The sheet row of one scan, or None (module docstring)."""
    if scan_id in refs:
        return refs[scan_id]
    if scan_folder is None or not _inside(scan_folder, base):
        return None
    rel = os.path.relpath(os.path.abspath(scan_folder), os.path.abspath(base))
    if rel == ".":
        return None
    first = rel.split(os.sep)[0]
    if key_suffix or first in refs:
        return refs.get(first + key_suffix)
    lettered = [k for k in (first + c for c in string.ascii_letters) if k in refs]
    return refs[lettered[0]] if len(lettered) == 1 else None
