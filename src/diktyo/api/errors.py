"""ConfigError: one problem in user config, located by file, line, column and field path."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class ConfigError:
    """A problem in user config. ``line``/``col`` are 1-based (0 = unknown).

    ``str()`` gives ``FILE:LINE:COL: error: FIELD: MESSAGE (hint: HINT)``, the format of
    compilers and ``istioctl analyze`` that editors can jump to.
    """

    file: str
    line: int
    col: int
    field: str
    message: str
    hint: str = ""
    severity: Literal["error", "warning", "info"] = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        text = f"{where}: {self.severity}: "
        if self.field:
            text += f"{self.field}: "
        text += self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return text

    def to_json(self) -> dict[str, object]:
        """``{file, line, column, severity, field, message, hint}`` for ``-o json`` and the dashboard."""
        d = asdict(self)
        return {
            "file": d["file"],
            "line": d["line"],
            "column": d["col"],
            "severity": d["severity"],
            "field": d["field"],
            "message": d["message"],
            "hint": d["hint"],
        }
