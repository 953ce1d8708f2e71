"""`nspawn-runner toml --merge`: put the driver's `[[runners]]` block into an existing gitlab-runner
config.toml. Only the keys the driver owns (executor, builds_dir, cache_dir, the custom
executor's keys) are set; other runners, comments, url, token and every key an admin added stay
as they are, byte for byte. The file is replaced atomically, keeping its mode and owner."""

from __future__ import annotations

import difflib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Table
from tomlkit.toml_document import TOMLDocument

from nspawn_runner import log
from nspawn_runner.errors import SystemFailure

# The runner block's keys that identify a runner to GitLab: never touched in an existing block.
_IDENTITY = ("name", "url", "token")
# Also an nspawn-runner block when run through `python -m nspawn_runner`.
_MODULE = "nspawn_runner"


class MergeError(SystemFailure):
    pass


@dataclass(frozen=True)
class Merge:
    path: Path
    before: str
    after: str
    action: str  # "added", "updated" or "unchanged"
    runner: str  # the merged block's name

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def diff(self) -> str:
        return "".join(difflib.unified_diff(
            self.before.splitlines(keepends=True), self.after.splitlines(keepends=True),
            fromfile=str(self.path), tofile=f"{self.path} (merged)"))

    def summary(self, dry_run: bool = False) -> str:
        would = "would be " if dry_run else ""
        if self.action == "unchanged":
            return f"{self.path}: runner {self.runner!r} is already up to date"
        if self.action == "updated":
            return (f"{self.path}: runner {self.runner!r} {would}updated; its url, token and "
                    "the keys nspawn-runner does not set are kept")
        return (f"{self.path}: runner {self.runner!r} {would}added with a placeholder url and "
                "token: put in your GitLab's url and the runner's authentication token, or "
                "register it with `gitlab-runner register` (see docs/quickstart.md)")


def _parse(text: str, path: Path) -> TOMLDocument:
    try:
        return tomlkit.parse(text)
    except TOMLKitError as e:
        raise MergeError(f"{path} is not valid TOML ({e}); fix it first, nothing was "
                         "changed") from None


def _runners(doc: TOMLDocument, path: Path) -> AoT | None:
    runners = doc.get("runners")
    if runners is None:
        return None
    if not isinstance(runners, AoT):
        raise MergeError(f"{path}: `runners` is not an array of tables ([[runners]]) as "
                         "gitlab-runner writes it; fix the file first, nothing was changed")
    return runners


def _points_at_us(runner: Table, block: Table) -> bool:
    custom = runner.get("custom")
    if not isinstance(custom, dict):
        return False
    run_exec = custom.get("run_exec")
    run_args = custom.get("run_args")
    if not isinstance(run_exec, str) or not run_exec:
        return False
    if Path(run_exec).name == "nspawn-runner" or run_exec == block["custom"]["run_exec"]:
        return True
    return isinstance(run_args, list) and _MODULE in run_args


def _select(runners: AoT, block: Table, name: str, path: Path) -> Table | None:
    if name:
        found = [r for r in runners if r.get("name") == name]
        what = f"named {name!r}"
    else:
        found = [r for r in runners if _points_at_us(r, block)]
        what = "whose run_exec is nspawn-runner"
    if len(found) > 1:
        names = ", ".join(repr(r.get("name", "?")) for r in found)
        raise MergeError(f"{path} has {len(found)} runners {what} ({names}); pick one with "
                         "--name (and give the others distinct names), nothing was changed")
    return found[0] if found else None


def _key_indent(table: Table) -> str:
    """The indentation of the table's existing plain keys (gitlab-runner writes two spaces per
    level), so that added keys line up with them."""
    for key, item in table.value.body:
        if key is not None and not isinstance(item, Table | AoT):
            return str(item.trivia.indent)
    return ""


def _set(table: Table, key: str, value: Any) -> None:
    if key in table:
        if table[key] != value:
            table[key] = value  # keeps the key's indentation and trailing comment
        return
    item = tomlkit.item(value)
    item.trivia.indent = _key_indent(table)
    # tomlkit inserts a new key before the table's sub-tables and puts a blank line above the
    # first of them: keep that table's header as it was, for the smallest diff.
    first_sub = next((i for k, i in table.value.body if isinstance(i, Table)), None)
    header_indent = first_sub.trivia.indent if first_sub is not None else ""
    # raw_append: plain append would add the table header's indentation on top of ours.
    table.raw_append(key, item)
    if first_sub is not None:
        first_sub.trivia.indent = header_indent


def _update(runner: Table, block: Table, path: Path) -> None:
    old = runner.get("executor")
    if isinstance(old, str) and old != "custom":
        log.warn(f"{path}: runner {runner.get('name', '?')!r} used the {old!r} executor and now "
                 f"uses nspawn-runner; its [runners.{old}] section, if any, is left as it was")
    for key, value in block.items():
        if key in _IDENTITY:
            continue
        if isinstance(value, Table):
            existing = runner.get(key)
            if existing is None:
                runner.append(key, value)
                continue
            if not isinstance(existing, Table):
                raise MergeError(f"{path}: `{key}` of runner {runner.get('name', '?')!r} is not "
                                 f"a table ([runners.{key}]); fix it first, nothing was changed")
            for sub, sub_value in value.items():
                _set(existing, sub, sub_value.unwrap())
        else:
            _set(runner, key, value.unwrap())


def merge_text(text: str, block: Table, name: str = "",
               path: Path = Path("config.toml")) -> tuple[str, str, str]:
    """Return (new text, action, runner name) for `block` merged into `text`."""
    doc = _parse(text, path)
    runners = _runners(doc, path)
    runner = _select(runners, block, name, path) if runners is not None else None
    if runner is None:
        if runners is None:
            runners = tomlkit.aot()
            runners.append(block)
            doc.append("runners", runners)
        else:
            if text.strip() and not text.endswith("\n\n"):
                block.trivia.indent = "\n"  # a blank line between the runners
            runners.append(block)
        action = "added"
        runner_name = str(block["name"])
    else:
        _update(runner, block, path)
        runner_name = str(runner.get("name", ""))
        action = "updated"
    new = tomlkit.dumps(doc)
    if new == text:
        action = "unchanged"
    # Whatever tomlkit made of it, gitlab-runner must be able to read it back.
    _parse(new, path)
    return new, action, runner_name


def _read(path: Path, exe: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeError(
            f"{path} does not exist: register the runner first (`gitlab-runner register "
            f"--executor custom --custom-run-exec {exe} ...` creates it; see "
            f"docs/quickstart.md), or create it from the block with `nspawn-runner toml > "
            f"{path}`") from None
    except UnicodeDecodeError as e:
        raise MergeError(f"{path} is not UTF-8 text ({e}); nothing was changed") from None
    except OSError as e:
        raise MergeError(f"cannot read {path}: {e.strerror}; check its permissions (run as "
                         "root for /etc/gitlab-runner/config.toml)") from None


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old or the new file, never a part;
    keep its mode and owner (config.toml holds runner tokens: usually 0600 root)."""
    target = path.resolve()  # a symlinked config.toml stays a symlink
    st = os.stat(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MergeError(f"cannot write {target}: {e.strerror}; nothing was changed (run "
                             "as root, or as the file's owner)") from None
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def merge_file(path: Path, block: Table, name: str = "", dry_run: bool = False) -> Merge:
    before = _read(path, str(block["custom"]["run_exec"]))
    after, action, runner = merge_text(before, block, name, path)
    if after != before and not dry_run:
        write_atomic(path, after)
    return Merge(path=path, before=before, after=after, action=action, runner=runner)
