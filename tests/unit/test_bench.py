"""The pure parts of the benchmark (bench/): statistics, targets, tables, the importtime and
archive-index parsers, option parsing. The measuring itself runs in the test bed (bench/run)."""

from __future__ import annotations

import pytest
import report
import run as bench_run
import variants
from mirror import deb_key, parse_packages, release_sha256


def test_summary_is_median_min_max_count() -> None:
    assert report.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3.0}
    assert report.summary([1.0, 2.0, 3.0, 10.0])["median"] == 2.5
    with pytest.raises(ValueError, match="no samples"):
        report.summary([])


def test_ratio() -> None:
    assert report.ratio(1.46, 0.74) == pytest.approx(1.973, abs=1e-3)
    with pytest.raises(ValueError, match="positive"):
        report.ratio(1.0, 0.0)


def test_formatting() -> None:
    assert report.seconds(0.7412) == "0.741 s"
    assert report.seconds(0.0341) == "34.1 ms"
    assert report.seconds(None) == "-"
    assert report.times(1.973) == "1.97x"


def test_table_aligns_first_column_left_and_the_others_right() -> None:
    text = report.table(["call", "shell", "ours"], [["config", "4.0 ms", "0.170 s"],
                                                    ["run (each)", "34.1 ms", "68.0 ms"]])
    assert text.splitlines() == [
        "call          shell     ours",
        "----------  -------  -------",
        "config       4.0 ms  0.170 s",
        "run (each)  34.1 ms  68.0 ms",
    ]
    assert report.table(["a", "b"], [["x", "long"]], left=(0, 1)).splitlines()[2] == "x  long"
    assert report.table(["a", "b"], [["x", "long"]]).splitlines()[0] == "a     b"
    with pytest.raises(ValueError, match="2 cells"):
        report.table(["a", "b", "c"], [["1", "2"]])


def test_markdown_table() -> None:
    assert report.markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def stats(median: float) -> report.Stats:
    return {"median": median, "min": median, "max": median, "n": 9.0}


def test_stage_targets_against_the_shell_driver() -> None:
    shell = {"job": stats(0.74), "config": stats(0.004), "prepare": stats(0.269),
             "run": stats(0.034), "cleanup": stats(0.168)}
    ours = {"job": stats(0.80), "config": stats(0.030), "prepare": stats(0.300),
            "run": stats(0.050), "cleanup": stats(0.168)}
    got = {t.name: t for t in report.stage_targets(ours, shell)}
    assert got["whole job, cold"].measured == "1.08x" and got["whole job, cold"].met
    assert got["config"].measured == "shell +26 ms" and got["config"].met is False
    assert got["run (each)"].met and got["prepare"].met
    assert got["cleanup"].wanted == "<= shell" and got["cleanup"].met


def test_pool_image_and_concurrency_targets() -> None:
    assert report.pool_target(None, 0.74).met is None
    assert report.pool_target(0.3, 0.74).met
    assert report.image_target(11.9).met and not report.image_target(12.1).met
    assert report.concurrency_target(60, 50, True, True).met
    left = report.concurrency_target(60, 50, True, False)
    assert not left.met and "leftovers" in left.measured


IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   _io
import time:       200 |        300 | encodings
import time:        50 |         50 |       pydantic.fields
import time:      4000 |       4050 |     pydantic
import time:       400 |        400 |       textwrap
import time:      2600 |       3000 |     rich
import time:       950 |       8000 |   typer
import time:      1000 |       9000 | nspawn_runner.cli
noise from the program itself
"""


def test_parse_importtime_builds_the_tree() -> None:
    roots = report.parse_importtime(IMPORTTIME)
    assert [r.name for r in roots] == ["encodings", "nspawn_runner.cli"]
    typer = roots[1].children[0]
    assert typer.name == "typer" and typer.level == 1
    assert [c.name for c in typer.children] == ["pydantic", "rich"]
    assert typer.children[0].children[0].parent is typer.children[0]


def test_import_summary_charges_packages_and_the_stdlib_they_pull_in() -> None:
    s = report.import_summary(report.parse_importtime(IMPORTTIME))
    assert s.total_ms == 9.3
    by = {p.package: p for p in s.packages}
    assert by["pydantic"].ms == 4.05 and by["pydantic"].imported_by == "typer"
    assert by["rich"].ms == 3.0  # with the textwrap it imported
    assert by["typer"].imported_by == "nspawn_runner"
    assert by["nspawn_runner"].imported_by == ""
    assert by["stdlib"].ms == 0.3  # what the interpreter imported by itself
    assert sum(p.ms for p in s.packages) == pytest.approx(s.total_ms)
    assert s.packages[0].package == "pydantic"


def test_release_and_packages_index() -> None:
    release = ("Origin: Debian\nSHA256:\n abc 123 main/binary-amd64/Packages.xz\n"
               " def 45 main/binary-amd64/Release\nSHA512:\n zzz 1 other\n")
    assert release_sha256(release) == {"main/binary-amd64/Packages.xz": ("abc", 123),
                                       "main/binary-amd64/Release": ("def", 45)}
    index = parse_packages("Package: libc6\nVersion: 2.36-9\nArchitecture: amd64\n"
                           "Filename: pool/main/g/glibc/libc6_2.36-9_amd64.deb\nDescription: x\n"
                           " continued: not a field\n\nPackage: base-files\nVersion: 12.4\n"
                           "Architecture: amd64\n")
    assert index[("libc6", "2.36-9", "amd64")]["Filename"].endswith("libc6_2.36-9_amd64.deb")
    assert "continued" not in index[("libc6", "2.36-9", "amd64")]
    assert ("base-files", "12.4", "amd64") in index
    assert deb_key("perl-base_5.36.0-7+deb12u1_amd64.deb") == (
        "perl-base", "5.36.0-7+deb12u1", "amd64")
    assert deb_key("login_1%3a4.13+dfsg1-1+b1_amd64.deb")[1] == "1:4.13+dfsg1-1+b1"


def test_rotated_puts_each_variant_first_in_turn() -> None:
    vs = [variants.Variant(d, "btrfs") for d in ("shell", "nspawn-runner", "x")]
    assert [v.driver for v in variants.rotated(vs, 1)] == ["nspawn-runner", "x", "shell"]
    assert variants.rotated(vs, 3) == vs


def test_options() -> None:
    args = bench_run.parse_args(["--only", "lifecycle,images", "--no-images", "--rounds", "3"])
    assert args.parts == ["lifecycle"] and args.rounds == 3
    assert bench_run.parse_args([]).parts == list(bench_run.PARTS)
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--only", "speed"])
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--backends", "zfs"])
