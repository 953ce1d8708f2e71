"""nspawn-runner(1): the man page, made from the command line itself (`nspawn-runner manpage`),
so that it lists every command and option the installed version has. The Debian package
builds it at package build time."""

from __future__ import annotations

import datetime
import os
from typing import Any

from nspawn_runner import __version__

PROG = "nspawn-runner"
DESCRIPTION = (
    "nspawn-runner is a driver for GitLab Runner's custom executor. gitlab-runner calls its "
    "stages (config, prepare, run, cleanup) for every CI job; prepare boots a fresh, "
    "ephemeral systemd-nspawn machine from a base image under the state root, run pipes each "
    "step's script into it, cleanup removes it. The other commands set up and operate a "
    "runner host: they check it, merge the driver's block into gitlab-runner's config.toml, "
    "and build, update, share and remove images.")
ENVIRONMENT = (
    ("NSPAWN_RUNNER_CONFIG", "The settings file (default /etc/nspawn-runner/config.toml)."),
    ("NSPAWN_RUNNER_ROOT", "The state root, overriding the root setting."),
    ("NSPAWN_RUNNER_VERBOSE", "Any value but empty, 0, no, false or off: as --verbose."),
    ("NO_COLOR", "Set: no colour, also on a terminal."),
)
FILES = (
    ("/etc/nspawn-runner/config.toml", "The settings (see nspawn-runner settings)."),
    ("/etc/nspawn-runner/images/NAME.toml", "Image files: how image NAME is made."),
    ("/var/lib/nspawn-runner/images/NAME", "The images; also cache/, overlays/, builds/."),
    ("/etc/nspawn-runner/import-pubring.gpg", "Keys that chroot-import and chroot-sync trust."),
    ("/run/nspawn-runner", "What prepare leaves for run and cleanup, per machine."),
    ("/etc/gitlab-runner/config.toml", "gitlab-runner's configuration (toml --merge)."),
)
EXIT_STATUS = (
    ("0", "Success."),
    ("1", "A job's script failed (the run stage; BUILD_FAILURE_EXIT_CODE)."),
    ("2", "Anything else failed: the host, the settings, an image (SYSTEM_FAILURE_EXIT_CODE); "
          "gitlab-runner retries config and prepare."),
)
SEE_ALSO = ("gitlab-runner(1)", "systemd-nspawn(1)", "machinectl(1)", "systemd.exec(5)")


def escape(text: str) -> str:
    """Text as roff: backslashes and hyphens escaped, no line starting with a control
    character."""
    text = " ".join(text.split()).replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _option(param: Any) -> tuple[str, str]:
    names = ", ".join([*param.opts, *getattr(param, "secondary_opts", [])])
    flag = getattr(param, "is_flag", False)
    metavar = "" if flag else f" \\fI{escape(param.metavar or param.name.upper())}\\fR"
    return f"\\fB{escape(names)}\\fR{metavar}", escape(param.help or "")


def _argument(param: Any) -> str:
    return escape(param.metavar or param.name.upper())


def _section(title: str) -> list[str]:
    return [f".SH {title}"]


def _entries(rows: Any) -> list[str]:
    lines = []
    for term, text in rows:
        lines += [".TP", term, text]
    return lines


def render(group: Any) -> str:
    """The man page of the click group `group` (typer.main.get_command(app))."""
    stamp = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds
    when = datetime.datetime.fromtimestamp(int(stamp), datetime.UTC) if stamp else \
        datetime.datetime.now(datetime.UTC)
    lines = [f'.TH NSPAWN\\-RUNNER 1 "{when:%Y-%m-%d}" "{escape(PROG)} {__version__}" '
             '"User Commands"',
             *_section("NAME"), f"{escape(PROG)} \\- {escape(group.help or '')}",
             *_section("SYNOPSIS"),
             f"\\fB{escape(PROG)}\\fR [\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR "
             "[\\fIOPTIONS\\fR] [\\fIARGUMENTS\\fR]",
             *_section("DESCRIPTION"), escape(DESCRIPTION)]
    lines += [*_section("GLOBAL OPTIONS"),
              escape("-v, --verbose and --debug may also follow the command."),
              *_entries(_option(p) for p in group.params if not getattr(p, "hidden", False))]
    lines += _section("COMMANDS")
    for name, command in group.commands.items():
        if command.hidden:
            continue
        args = " ".join(_argument(p) for p in command.params if p.param_type_name == "argument")
        lines += [".SS " + escape(f"{PROG} {name}") + (f" \\fR[OPTIONS] {args}" if args
                                                       else " \\fR[OPTIONS]"),
                  escape(command.help or command.short_help or "")]
        options = [p for p in command.params
                   if p.param_type_name == "option" and not getattr(p, "hidden", False)]
        lines += _entries(_option(p) for p in options)
        arguments = [p for p in command.params
                     if p.param_type_name == "argument" and getattr(p, "help", None)]
        lines += _entries((f"\\fI{_argument(p)}\\fR", escape(p.help)) for p in arguments)
    lines += _section("ENVIRONMENT") + _entries(
        (f"\\fB{escape(k)}\\fR", escape(v)) for k, v in ENVIRONMENT)
    lines += _section("FILES") + _entries(
        (f"\\fI{escape(k)}\\fR", escape(v)) for k, v in FILES)
    lines += _section("EXIT STATUS") + _entries(
        (f"\\fB{k}\\fR", escape(v)) for k, v in EXIT_STATUS)
    lines += [*_section("SEE ALSO"), escape(", ".join(SEE_ALSO)),
              escape("/usr/share/doc/nspawn-runner/ (the docs/ of the source: quickstart, "
                     "configuration, images, multi-host, troubleshooting).")]
    return "\n".join(lines) + "\n"
