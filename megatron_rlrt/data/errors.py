"""The one error type the data layer raises for bad input (a ValueError, never a bare KeyError)."""

from __future__ import annotations


class DatasetError(ValueError):
    """Bad dataset input; the message names the file, the row (1-based) and what was expected."""

    def __init__(self, path: str, row: int | None, message: str) -> None:
        self.path = str(path)
        self.row = row
        self.reason = message
        where = f"{self.path}, row {row}" if row is not None else self.path
        super().__init__(f"{where}: {message}")
