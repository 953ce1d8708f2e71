"""The one renderer of aligned text tables (chroot-list, chroot-maintenance, check, settings)."""

from __future__ import annotations

from collections.abc import Sequence


def render(rows: Sequence[Sequence[str]]) -> str:
    """Rows of text as columns two spaces apart (the first row is the header); trailing blanks
    are cut."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows) + "\n"
