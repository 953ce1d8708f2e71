"""The pure parts of the benchmark (bench/run.py): statistics, the targets of issue 10, the
`python -X importtime` parser and the text tables. No I/O, so tests/unit can check them."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

Stats = dict[str, float]


def summary(samples: Sequence[float]) -> Stats:
    """Median, min, max and count of `samples` (seconds)."""
    if not samples:
        raise ValueError("no samples")
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": float(len(samples))}


def ratio(value: float, reference: float) -> float:
    """`value` as a multiple of `reference` (1.97 means 97 % slower)."""
    if reference <= 0:
        raise ValueError(f"reference must be positive, not {reference}")
    return value / reference


def seconds(value: float | None) -> str:
    """0.7412 -> '0.741 s'; values under 0.1 s in milliseconds: 0.0341 -> '34.1 ms'."""
    if value is None:
        return "-"
    if abs(value) < 0.1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.3f} s"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]],
          left: Sequence[int] = (0,)) -> str:
    """A plain-text table: the columns numbered in `left` left-aligned (the first one by
    default), the others (figures) right-aligned."""
    lines = [list(headers), *[list(r) for r in rows]]
    for row in lines:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells, the header {len(headers)}")
    widths = [max(len(row[i]) for row in lines) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        cells = [cell.ljust(width) if i in left else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(lines[0]), rule, *[fmt(r) for r in lines[1:]]])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Targets (issue 10): ratios and differences against the shell driver of the same run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    wanted: str  # as the issue states it
    measured: str  # the figure, formatted
    met: bool | None  # None: not measured in this run


def stage_targets(ours: Mapping[str, Stats], shell: Mapping[str, Stats]) -> list[Target]:
    """The per-job and per-call targets on one backend, from lifecycle medians keyed
    job/config/prepare/run/cleanup."""

    def med(stats: Mapping[str, Stats], key: str) -> float:
        return stats[key]["median"]

    out = []
    job_ratio = ratio(med(ours, "job"), med(shell, "job"))
    out.append(Target("whole job, cold", "<= 1.15x", times(job_ratio), job_ratio <= 1.15))
    for key, slack in (("config", 0.015), ("run", 0.020), ("prepare", 0.040), ("cleanup", 0.0)):
        delta = med(ours, key) - med(shell, key)
        wanted = f"<= shell + {slack * 1000:.0f} ms" if slack else "<= shell"
        name = "run (each)" if key == "run" else key
        out.append(Target(name, wanted, f"shell {delta * 1000:+.0f} ms", delta <= slack))
    return out


def pool_target(pooled_job: float | None, shell_job: float) -> Target:
    if pooled_job is None:
        return Target("whole job, warm pool", "<= 0.5x", "not measured (no pool_size yet)", None)
    r = ratio(pooled_job, shell_job)
    return Target("whole job, warm pool", "<= 0.5x", times(r), r <= 0.5)


def concurrency_target(ours_jpm: float, shell_jpm: float, all_ok: bool,
                       clean: bool, jobs: int = 8) -> Target:
    met = ours_jpm >= shell_jpm and all_ok and clean
    detail = f"{ours_jpm:.0f} vs {shell_jpm:.0f} jobs/min"
    detail += "" if all_ok else ", some failed"
    detail += "" if clean else ", leftovers"
    return Target(f"{jobs} concurrent jobs", ">= shell's jobs/min, all succeed, nothing left",
                  detail, met)


def image_target(warm: float | None) -> Target:
    if warm is None:
        return Target("image creation, warm cache", "<= 12 s", "not measured", None)
    return Target("image creation, warm cache", "<= 12 s", seconds(warm), warm <= 12.0)


# --------------------------------------------------------------------------------------------
# python -X importtime
# --------------------------------------------------------------------------------------------

PREFIX = "import time:"


@dataclass
class Import:
    name: str
    level: int
    self_us: int
    cumulative_us: int
    children: list[Import] = field(default_factory=list)
    parent: Import | None = field(default=None, repr=False)

    @property
    def package(self) -> str:
        return package_of(self.name)


def package_of(module: str) -> str:
    """The distribution-level name a module is counted under: its top-level package, with the
    standard library as one."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top.startswith("_"):
        return "stdlib"
    return top


def parse_importtime(text: str) -> list[Import]:
    """The import tree from `python -X importtime` output (other lines are ignored). The
    output is in post-order: a module's line follows those of the modules it imported, which
    are indented two spaces deeper."""
    stack: list[Import] = []
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        parts = line[len(PREFIX):].split("|", 2)
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        raw = parts[2]
        name = raw.strip()
        level = (len(raw) - len(raw.lstrip(" ")) - 1) // 2
        node = Import(name, level, int(parts[0]), int(parts[1]))
        while stack and stack[-1].level > level:
            child = stack.pop()
            child.parent = node
            node.children.insert(0, child)
        stack.append(node)
    return stack


def walk(nodes: Iterable[Import]) -> Iterable[Import]:
    """Pre-order: the order in which the imports started."""
    for node in nodes:
        yield node
        yield from walk(node.children)


@dataclass(frozen=True)
class PackageTime:
    package: str
    # Its modules' own times plus those of the standard-library modules it was the first to
    # import (they would not be loaded without it); not other packages'.
    ms: float
    imported_by: str  # the package that imported it first; "" for the entry point's code


@dataclass(frozen=True)
class ImportSummary:
    total_ms: float
    packages: list[PackageTime]  # largest first; they add up to total_ms


def _charged_to(node: Import) -> str:
    """A standard-library module's time goes to the nearest package that imported it; only
    what the interpreter or the entry point itself imports stays "stdlib"."""
    current: Import | None = node
    while current is not None and current.package == "stdlib":
        current = current.parent
    return current.package if current is not None else "stdlib"


def import_summary(roots: Sequence[Import]) -> ImportSummary:
    """Total import time, and per package the time its import cost (see PackageTime) and
    who imported it first."""
    total = sum(r.cumulative_us for r in roots)
    own: dict[str, int] = {}
    via: dict[str, str] = {}
    for node in walk(roots):
        charged = _charged_to(node)
        own[charged] = own.get(charged, 0) + node.self_us
        pkg = node.package
        if pkg not in via and pkg != "stdlib":
            parent = node.parent
            while parent is not None and parent.package in (pkg, "stdlib"):
                parent = parent.parent
            via[pkg] = parent.package if parent is not None else ""
    packages = sorted(own.items(), key=lambda kv: (-kv[1], kv[0]))
    return ImportSummary(total / 1000, [PackageTime(p, us / 1000, via.get(p, ""))
                                        for p, us in packages])
