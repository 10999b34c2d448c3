"""Rich tables on a terminal; plain, full-width text in a file or pipe (rich would squeeze them to 80 columns)."""
from __future__ import annotations

import sys

from rich.table import Table
from rich.text import Text

GAP = "  "


def _plain(cell) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def table_text(table: Table) -> str:
    """A table as aligned plain text: title, header, a rule, rows, then the caption; no cell is cut."""
    columns = [[_plain(col.header)] + [_plain(c) for c in col.cells] for col in table.columns]
    widths = [max(len(line) for cell in cells for line in cell.splitlines() or [""]) for cells in columns]
    right = [col.justify == "right" for col in table.columns]

    def row(cells: list[str]) -> str:
        return GAP.join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    lines = [_plain(table.title)] if table.title else []
    lines.append(row([cells[0] for cells in columns]))
    lines.append(GAP.join("-" * w for w in widths))
    lines += [row([cells[i] for cells in columns]) for i in range(1, table.row_count + 1)]
    if table.caption:
        lines += _plain(table.caption).splitlines()
    return "\n".join(lines)


def print_tables(*tables: Table | None, stderr: bool = False) -> None:
    """Print tables (None skipped): rich when the stream is a terminal, else table_text separated by blank lines."""
    stream = sys.stderr if stderr else sys.stdout
    shown = [t for t in tables if t is not None]
    if stream.isatty():
        from rich.console import Console  # a terminal only

        console = Console(stderr=stderr)
        for t in shown:
            console.print(t)
        return
    stream.write("\n\n".join(table_text(t) for t in shown) + "\n")
    stream.flush()
