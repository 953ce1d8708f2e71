"""proc.start (the run stage's posix_spawn) and record.Record (its NamedTuple without typing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nspawn_runner import proc
from nspawn_runner.errors import CommandError
from nspawn_runner.record import Record


def test_start_passes_stdin_and_the_exit_status(tmp_path: Path) -> None:
    script = tmp_path / "in"
    script.write_text("exit 7\n")
    with open(script, "rb") as f:
        child = proc.start(["sh"], stdin=f.fileno())
        assert child.wait(timeout=10) == 7
    assert child.poll() == 7  # waited once, remembered


def test_start_gives_the_child_only_the_kept_environment(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUSTOM_ENV_SECRET", "job value")
    monkeypatch.setenv("SYSTEMD_SECCOMP", "0")
    out = tmp_path / "env"
    with open(os.devnull, "rb") as f:
        assert proc.start(["sh", "-c", f"env > {out}"], stdin=f.fileno()).wait(10) == 0
    names = {line.split("=", 1)[0] for line in out.read_text().splitlines()}
    assert "CUSTOM_ENV_SECRET" not in names and "SYSTEMD_SECCOMP" not in names
    assert "PATH" in names


def test_start_restores_sigpipe(tmp_path: Path) -> None:
    """Python ignores SIGPIPE; a child must not inherit that (subprocess restores it too)."""
    out = tmp_path / "sig"
    with open(os.devnull, "rb") as f:
        proc.start(["sh", "-c", f"grep SigIgn /proc/self/status > {out}"],
                   stdin=f.fileno()).wait(10)
    ignored = int(out.read_text().split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))


def test_wait_times_out_and_kill_ends_the_child() -> None:
    with open(os.devnull, "rb") as f:
        child = proc.start(["sleep", "30"], stdin=f.fileno())
    started = time.monotonic()
    with pytest.raises(proc.Timeout):
        child.wait(timeout=0.2)
    child.kill()
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert time.monotonic() - started < 10
    child.kill()  # after the end: nothing to signal, no error


def test_start_of_a_missing_command_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="command not found"):
        proc.start(["/nonexistent/tool"], stdin=0)


class _Point(Record):
    """A point."""

    x: int
    y: int = 2
    tags: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.x + self.y


def test_record_behaves_as_a_named_tuple() -> None:
    p = _Point(1)
    assert (p.x, p.y, p.tags, p.total) == (1, 2, (), 3)
    assert p._replace(y=5).total == 6
    assert p._asdict() == {"x": 1, "y": 2, "tags": ()}
    assert _Point(**p._asdict()) == p
    assert _Point.__doc__ == "A point."
    assert _Point._fields == ("x", "y", "tags")
    with pytest.raises(AttributeError):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        _Point()  # type: ignore[call-arg]


def test_record_does_not_import_typing() -> None:
    code = "import sys, nspawn_runner.record; print('typing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
