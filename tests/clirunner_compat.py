"""A pytest plugin (pyproject: addopts -p clirunner_compat): the unit tests run against the
venv's typer and against Debian 12's (typer 0.7.0 with click 8.1: `debian/test-unit`). Click
8.1's CliRunner mixes stderr into stdout unless told not to, and its `output` is then stdout
only; newer ones always keep stderr apart and put both into `output`. This makes 8.1 behave as
the newer ones."""

from __future__ import annotations

import inspect
from typing import Any

from typer import testing

if "mix_stderr" in inspect.signature(testing.CliRunner.__init__).parameters:

    class _Result(testing.Result):
        @property
        def output(self) -> str:
            return self.stdout + self.stderr

    class _SeparateStderr(testing.CliRunner):
        def __init__(self, **kw: Any) -> None:
            kw.setdefault("mix_stderr", False)
            super().__init__(**kw)

        def invoke(self, *args: Any, **kw: Any) -> Any:
            result = super().invoke(*args, **kw)
            result.__class__ = _Result
            return result

    testing.CliRunner = _SeparateStderr  # type: ignore[assignment,misc]
