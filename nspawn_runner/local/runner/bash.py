"""The script writer: the bash that gitlab-runner generates for each stage
(shells/bash.go)."""

from __future__ import annotations

from nspawn_runner.local.runner.gocompat import go_path_join, go_quote, shell_escape
from nspawn_runner.local.runner.model import ANSI_BOLD_GREEN, ANSI_RESET, ANSI_YELLOW, JobVariable


class _BashWriter:
    def __init__(self, temporary_path: str, shell: str, set_permissions_before_cleanup: bool
                 ) -> None:
        self.temporary_path = temporary_path
        self.shell = shell
        self.set_permissions = set_permissions_before_cleanup
        self._lines: list[str] = []
        self._indent = 0

    def line(self, text: str) -> None:
        self._lines.append("  " * self._indent + text + "\n")

    def command(self, cmd: str, *args: str) -> None:
        self.line(" ".join([shell_escape(cmd), *(shell_escape(a) for a in args)]))

    def command_arg_expand(self, cmd: str, *args: str) -> None:
        self.line(" ".join([shell_escape(cmd), *(f'"{a}"' for a in args)]))

    def tmp_file(self, name: str) -> str:
        return go_path_join(self.temporary_path, name)

    def variable(self, var: JobVariable) -> None:
        if var.file:
            path = self.tmp_file(var.key)
            self.line(f"mkdir -p {go_quote(self.temporary_path)}")
            self.line(f"printf '%s' {shell_escape(var.value)} > {go_quote(path)}")
            self.line(f"export {shell_escape(var.key)}={go_quote(path)}")
        else:
            self.line(f"export {shell_escape(var.key)}={shell_escape(var.value)}")

    def source_env(self, path: str) -> None:
        self.line(f"mkdir -p {go_quote(self.temporary_path)}")
        self.line(f"touch {go_quote(path)}")
        self.line(f'while read -r line; do export "$line"; done < {go_quote(path)}')

    def if_directory(self, path: str) -> None:
        self.line(f"if [ -d {go_quote(path)} ]; then")
        self._indent += 1

    def if_file(self, path: str) -> None:
        self.line(f"if [ -e {go_quote(path)} ]; then")
        self._indent += 1

    def if_cmd(self, cmd: str, *args: str) -> None:
        cmdline = " ".join([shell_escape(cmd), *(shell_escape(a) for a in args)])
        self.line(f"if {cmdline} >/dev/null 2>&1; then")
        self._indent += 1

    def if_cmd_with_output(self, cmd: str, *args: str) -> None:
        cmdline = " ".join([shell_escape(cmd), *(shell_escape(a) for a in args)])
        self.line(f"if {cmdline}; then")
        self._indent += 1

    def else_(self) -> None:
        self._indent -= 1
        self.line("else")
        self._indent += 1

    def end_if(self) -> None:
        self._indent -= 1
        self.line("fi")

    def cd(self, path: str) -> None:
        self.command("cd", path)

    def mkdir(self, path: str) -> None:
        self.command("mkdir", "-p", path)

    def mk_tmp_dir(self, name: str) -> str:
        path = go_path_join(self.temporary_path, name)
        self.mkdir(path)
        return path

    def rm_dir(self, path: str) -> None:
        if self.set_permissions:
            self.if_directory(path)
            self.command("chmod", "-R", "u+rwX", path)
            self.end_if()
        self.command("rm", "-r", "-f", path)

    def rm_file(self, path: str) -> None:
        self.command("rm", "-f", path)

    def rm_files_recursive(self, path: str, name: str) -> None:
        self.if_directory(path)
        self.line(f"find {go_quote(path)} -name {go_quote(name)} -type f -exec rm -f {{}} +")
        self.end_if()

    def notice(self, text: str) -> None:
        self.line("echo " + shell_escape(ANSI_BOLD_GREEN + text + ANSI_RESET))

    def warning(self, text: str) -> None:
        self.line("echo " + shell_escape(ANSI_YELLOW + text + ANSI_RESET))

    def empty_line(self) -> None:
        self.line("echo")

    def body(self) -> str:
        return "".join(self._lines)

    def finish(self, trace: bool) -> str:
        """The 19.1+ bash script format (protocol §4)."""
        out = []
        if self.shell:
            out.append(f"#!/usr/bin/env {self.shell}\n\n")
        out.append("trap 'exit 1' TERM\n\n")
        if trace:
            out.append("set -o xtrace\n")
        out.append('case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit\n')
        out.append("set +o noclobber\n")
        out.append(f"(trap 'exit 1' TERM; eval {shell_escape(self.body())}) < /dev/null\n")
        out.append("exit 0\n")
        return "".join(out)
