"""A profile batch file as the SM-DP+ vendor delivers it: one ICCID a line, or a CSV with an ICCID column.

Operators load batches into the inventory (``provisioning esim load FILE``); this
module only reads the file: every malformed or duplicated line is collected and
reported at once, and nothing of a bad file is loaded.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path

from provisioning.core.iccid import normalize_iccid
from provisioning.esim.errors import BatchProblem, InventoryFileError

CSV_DELIMITERS = ",;\t"
CSV_COLUMN = "iccid"
# Longest value quoted back in a file error (a wrong file could hold anything).
MAX_QUOTED_VALUE = 40


def parse_batch(source: str | os.PathLike[str]) -> list[str]:
    """The canonical ICCIDs of a batch: ``source`` is a path (``Path``/``PathLike``) or the text itself.

    One ICCID a line, or a vendor CSV with an ``ICCID`` column (any case; delimiter
    ``,`` ``;`` or tab). Blank lines and lines starting with ``#`` are skipped.
    Every malformed or duplicated ICCID is collected; any raise one
    :class:`InventoryFileError` naming each line, and nothing is returned.
    """
    if isinstance(source, str):
        text, name = source, None
    else:
        path = Path(source)
        text, name = _read_text(path), str(path)
    text = text.removeprefix("\ufeff")
    problems: list[BatchProblem] = []
    csv_mode = _is_csv(text)
    rows = _csv_rows(text, problems) if csv_mode else _plain_rows(text)
    iccids: list[str] = []
    first_line: dict[str, int] = {}
    for line, value in rows:
        try:
            iccid = normalize_iccid(value)
        except ValueError as exc:
            reason = str(exc)
            if not csv_mode and any(d in value for d in CSV_DELIMITERS):
                reason = f"{reason}; a CSV batch needs a header line with an ICCID column"
            problems.append(BatchProblem(line, _quote(value), reason))
            continue
        if iccid in first_line:
            problems.append(BatchProblem(line, iccid, f"duplicate of line {first_line[iccid]}"))
            continue
        first_line[iccid] = line
        iccids.append(iccid)
    if problems:
        raise InventoryFileError(sorted(problems, key=lambda p: p.line), source=name)
    return iccids


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InventoryFileError([BatchProblem(line, "", "not UTF-8 text")], source=str(path)) from None


def _meaningful(text: str) -> Iterable[tuple[int, str]]:
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


def _is_csv(text: str) -> bool:
    first = next(iter(_meaningful(text)), None)
    if first is None:
        return False
    return any(cell.strip().strip('"').lower() == CSV_COLUMN for cell in _split_any(first[1]))


def _split_any(line: str) -> list[str]:
    for delimiter in CSV_DELIMITERS:
        if delimiter in line:
            return line.split(delimiter)
    return [line]


def _plain_rows(text: str) -> list[tuple[int, str]]:
    return list(_meaningful(text))


def _csv_rows(text: str, problems: list[BatchProblem]) -> list[tuple[int, str]]:
    meaningful = list(_meaningful(text))
    header_line, header = meaningful[0]
    delimiter = next((d for d in CSV_DELIMITERS if d in header), ",")
    columns = [c.strip().lower() for c in next(csv.reader([header], delimiter=delimiter))]
    index = columns.index(CSV_COLUMN)
    rows: list[tuple[int, str]] = []
    for number, line in meaningful[1:]:
        cells = next(csv.reader(io.StringIO(line), delimiter=delimiter))
        if index >= len(cells) or not cells[index].strip():
            problems.append(
                BatchProblem(number, "", f"no value in the ICCID column (header on line {header_line})")
            )
            continue
        rows.append((number, cells[index].strip()))
    return rows


def _quote(value: str) -> str:
    return value if len(value) <= MAX_QUOTED_VALUE else value[:MAX_QUOTED_VALUE] + "..."
