"""Small file helpers both worlds share: whole-file atomic writes and one resumable CSV.

`write_text_atomic` writes a temporary file beside the target and renames it over, so a reader (or a
kill) never sees half a file. `ResumableCsv` is an append-only CSV that survives a kill: each append
is whole lines, flushed and fsynced before it returns, so a kill can only tear the last line, which
`complete_rows` cuts off in place before reading. The profile bundle's tables and a sweep's partial
results are both written through it.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResumableCsv:
    """An append-only CSV of whole rows: a header, then one line per row."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def cut_torn_line(self) -> None:
        """Drop a last line without its newline (a kill mid-append), in place: nothing whole is lost."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(self.path, data.rfind(b"\n") + 1)

    def header(self) -> list[str]:
        """The column names ([] when the file is missing or empty)."""
        if not self.path.exists():
            return []
        with self.path.open(newline="") as handle:
            return next(csv.reader(handle), [])

    def complete_rows(self) -> Iterator[dict[str, str]]:
        """Every whole row as strings, after cutting off a torn last line (none when there is no file)."""
        self.cut_torn_line()
        if not self.path.exists():
            return
        with self.path.open(newline="") as handle:
            yield from (row for row in csv.DictReader(handle) if None not in row.values())

    def append(self, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
        """Append whole rows (the header first when the file is new), on disk before returning."""
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="raise", lineterminator="\n")
            if handle.tell() == 0:
                writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())  # the rows are on disk before the caller counts them as done
