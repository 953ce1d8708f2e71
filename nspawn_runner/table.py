"""The one renderer of aligned text tables (chroot-list, chroot-maintenance, check, settings)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nspawn_runner import log


def render(rows: Sequence[Sequence[str]]) -> str:
    """Rows of text as columns two spaces apart (the first row is the header); trailing blanks
    are cut."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows) + "\n"


def paint_column(text: str, column: int, kinds: Mapping[str, str]) -> str:
    """`text` from `render` with the cells of `column` that `kinds` names painted (log.paint):
    colour is added after the layout, so that escape codes never shift a column."""
    lines = text.splitlines(keepends=True)
    header = lines[0].split() if lines else []
    if column >= len(header):
        return text
    start = lines[0].index(header[column])
    out = [lines[0]]
    for line in lines[1:]:
        cell = line[start:].split(" ", 1)[0].rstrip("\n")
        if cell in kinds and line[start - 1:start] in (" ", ""):
            line = line[:start] + log.paint(cell, kinds[cell], True) + line[start + len(cell):]
        out.append(line)
    return "".join(out)
