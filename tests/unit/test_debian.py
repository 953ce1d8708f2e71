"""debian/ agrees with the project: version, license, dependencies (Debian's own, as in
docs/install.md), the units it installs and enables, and what its purge removes. The package
itself is built, installed, used and purged in tests/integration/test_package.py."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from nspawn_runner import __version__

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "debian"
UNITS = sorted(p.name for p in (ROOT / "examples" / "systemd").iterdir())


def test_version_and_license() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert re.match(rf"^nspawn-runner \({re.escape(__version__)}\) ", first), first
    assert (DEBIAN / "source" / "format").read_text().strip() == "3.0 (native)"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    assert "\nLicense: MIT\n" in (DEBIAN / "copyright").read_text()


def _field(name: str) -> set[str]:
    control = (DEBIAN / "control").read_text()
    match = re.search(rf"^{name}:(.*?)(?=^\S)", control + "\nEnd:", re.M | re.S)
    assert match, name
    return {re.sub(r"\s*\(.*\)", "", d).strip() for d in match[1].split(",") if d.strip()}


_DEBIAN_NAMES = {"pyyaml": "yaml"}


def test_depends_on_debians_own_packages() -> None:
    depends = _field("Depends")
    assert {"python3-typer", "python3-tomlkit", "python3-yaml", "nftables", "iproute2",
            "systemd-container", "mmdebstrap", "gpgv"} <= depends
    # Every Python dependency of pyproject is a Debian package here, none is vendored.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~ ]", requirement)[0].lower()
        # Debian names PyYAML's package after its module.
        assert f"python3-{_DEBIAN_NAMES.get(name, name)}" in depends, requirement
    assert "xz-utils" in _field("Recommends")


def test_units_installed_with_the_packages_paths_and_timers_enabled() -> None:
    rules = (DEBIAN / "rules").read_text()
    assert "examples/systemd/*.service examples/systemd/*.timer" in rules
    assert "s|/usr/local/bin/nspawn-runner|/usr/bin/nspawn-runner|g" in rules
    assert "dh_installsystemd nspawn-runner-gc.timer nspawn-runner-maintenance.timer" in rules
    assert "--no-enable --no-start nspawn-runner-sync.timer" in rules
    for unit in UNITS:
        text = (ROOT / "examples" / "systemd" / unit).read_text()
        if unit.endswith(".service"):
            assert "ExecStart=/usr/local/bin/nspawn-runner " in text, unit


def test_purge_removes_every_timers_state() -> None:
    postrm = (DEBIAN / "nspawn-runner.postrm").read_text()
    for unit in UNITS:
        if unit.endswith(".timer"):
            assert f"/var/lib/systemd/timers/stamp-{unit}" in postrm, unit
    assert "#DEBHELPER#" in postrm


def test_what_the_package_ships_exists() -> None:
    for name in ("nspawn-runner.docs", "nspawn-runner.examples"):
        for line in (DEBIAN / name).read_text().split():
            assert list(ROOT.glob(line)), f"{name}: {line}"
    assert (ROOT / "examples" / "nspawn-runner.toml").is_file()
