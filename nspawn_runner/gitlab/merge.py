"""`nspawn-runner toml --merge`: complete the driver's `[[runners]]` block in an existing
gitlab-runner config.toml, which gitlab-runner reloads by itself as soon as it changes.

What the merge owns, and nothing else (other runners, comments, url, token and every other key
stay byte for byte):

- `executor = "custom"`, and `builds_dir`/`cache_dir` (the config stage reports the settings'
  values, which gitlab-runner uses instead: a different value here is overwritten, with a note);
- `*_exec`: kept when it names an existing file (another installation, or an admin's wrapper),
  set when missing, empty or pointing at nothing, to the installation the block already uses;
- `*_args`: the stage name and, when `--default-image` is given, that option; whatever else an
  admin put there (`--verbose`, `--debug`) stays;
- the timeouts: set when missing, kept when at least what the driver needs, raised with the
  reason otherwise.

A block is found by `--name`, else as the one runner that calls nspawn-runner, else as the one
custom runner without a `run_exec` (what an interactive `gitlab-runner register` writes); a new
block is appended only with `--add`. Before every change a dated copy of the file is written
next to it; the file is replaced atomically, keeping its mode and owner."""

from __future__ import annotations

import difflib
import errno
import os
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Item, Key, Table
from tomlkit.toml_document import TOMLDocument

from nspawn_runner import log
from nspawn_runner.errors import SystemFailure
from nspawn_runner.gitlab import block as runner_block
from nspawn_runner.gitlab.block import MODULE, STAGES, Timeout, Wanted

Exists = Callable[[str], bool]


class MergeError(SystemFailure):
    pass


@dataclass(frozen=True)
class Merge:
    path: Path
    before: str
    after: str
    action: str  # "added", "updated" or "unchanged"
    runner: str  # the merged block's name
    changed_keys: tuple[str, ...] = ()  # an admin's value overwritten, and why
    kept_keys: tuple[str, ...] = ()  # an admin's value kept where the driver writes another
    backup: Path | None = None

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
            head = f"{self.path}: runner {self.runner!r} is already up to date"
        elif self.action == "updated":
            head = (f"{self.path}: runner {self.runner!r} {would}updated; its url, token and "
                    "the keys nspawn-runner does not own are kept")
        else:
            head = (f"{self.path}: runner {self.runner!r} {would}added with a placeholder url "
                    "and token: put in your GitLab's url and the runner's authentication token "
                    "(or register it with `gitlab-runner register`, see docs/quickstart.md)")
        lines = [head]
        lines += [f"  {would}overwritten: {note}" for note in self.changed_keys]
        lines += [f"  kept: {note}" for note in self.kept_keys]
        if self.backup is not None:
            lines.append(f"  the previous file is saved as {self.backup}")
        return "\n".join(lines)


@dataclass
class _Notes:
    changed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def executable_file(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _parse(text: str, path: Path) -> TOMLDocument:
    try:
        return tomlkit.parse(text)
    except TOMLKitError as e:
        raise MergeError(f"{path} is not valid TOML ({e}); fix it first, nothing was "
                         "changed") from None


def runners_of(doc: TOMLDocument, path: Path) -> AoT | None:
    runners = doc.get("runners")
    if runners is None:
        return None
    if not isinstance(runners, AoT):
        raise MergeError(f"{path}: `runners` is not an array of tables ([[runners]]) as "
                         "gitlab-runner writes it; fix the file first, nothing was changed")
    return runners


def _label(runner: Table) -> str:
    return str(runner.get("name", "?"))


def calls_us(runner: Table) -> bool:
    custom = runner.get("custom")
    return isinstance(custom, dict) and any(
        runner_block.is_ours(custom.get(f"{s}_exec"), custom.get(f"{s}_args")) for s in STAGES)


def unfinished_custom(runner: Table) -> bool:
    """A custom runner as an interactive `gitlab-runner register` leaves it: no run_exec, or
    `run_exec = ""`."""
    if runner.get("executor") != "custom":
        return False
    custom = runner.get("custom")
    return custom is None or (isinstance(custom, dict) and not custom.get("run_exec"))


def _names(runners: AoT | None) -> str:
    found = [repr(_label(r)) for r in runners or ()]
    return f"its runners: {', '.join(found)}" if found else "it has no runners yet"


def _select(runners: AoT | None, name: str, add: bool, path: Path) -> Table | None:
    """The block to update; None: append a new one (only with `add`)."""
    listed: list[Table] = list(runners or ())
    if add:
        wanted_name = name or runner_block.default_name()
        if any(r.get("name") == wanted_name for r in listed):
            raise MergeError(f"{path} already has a runner named {wanted_name!r}: drop --add to "
                             "update it, or give the new one another --name; nothing was "
                             "changed")
        return None
    if name:
        found = [r for r in listed if r.get("name") == name]
        if not found:
            raise MergeError(f"{path} has no runner named {name!r} ({_names(runners)}): pick "
                             "one of those with --name, or append a new block with --add; "
                             "nothing was changed")
        what = f"named {name!r}"
    else:
        found = [r for r in listed if calls_us(r)]
        what = "that call nspawn-runner"
        if not found:
            found = [r for r in listed if unfinished_custom(r)]
            what = "with the custom executor and no run_exec"
        if not found:
            raise MergeError(f"{path} has no runner that calls nspawn-runner and no custom "
                             f"runner without run_exec ({_names(runners)}): pick one with "
                             "--name, or append a new block with --add (after `gitlab-runner "
                             "register`, see docs/quickstart.md); nothing was changed")
    if len(found) > 1:
        names = ", ".join(repr(_label(r)) for r in found)
        raise MergeError(f"{path} has {len(found)} runners {what} ({names}); pick one with "
                         "--name (and give the others distinct names), nothing was changed")
    return found[0]


# Layout: gitlab-runner indents two spaces per level; tomlkit does not know where a block ends.

def _key_indent(table: Table) -> str:
    """The indentation of the table's existing plain keys, so that added keys line up."""
    for key, item in table.value.body:
        if key is not None and not isinstance(item, Table | AoT):
            return str(item.trivia.indent)
    return ""


def _pop_trailing(table: Table, deep: bool = True) -> list[tuple[Key | None, Item]]:
    """Remove and return the blank lines and comments that end `table` (and, if `deep`, its
    last sub-tables): in a file they sit above the next block's header and belong to it."""
    body = table.value.body
    tail: list[tuple[Key | None, Item]] = []
    while body and body[-1][0] is None:
        tail.insert(0, body.pop())
    if tail:
        # tomlkit 0.11 (Debian 12's) records the indices of key-less items under the key None
        # and trips over an index past the end on the next append; nothing else reads it.
        table.value._map.pop(None, None)  # type: ignore[call-overload]
    if deep and body and isinstance(body[-1][1], Table):
        tail = _pop_trailing(body[-1][1]) + tail
    return tail


def _push_trailing(table: Table, tail: list[tuple[Key | None, Item]]) -> None:
    for _, item in tail:
        table.value.append(None, item)


def _add_key(table: Table, key: str, value: object, indent: str) -> None:
    item = tomlkit.item(value)
    item.trivia.indent = indent
    subs = [i for k, i in table.value.body if isinstance(i, Table | AoT)]
    if subs:
        # tomlkit puts a new key before the table's sub-tables and a blank line above the
        # first of them: keep that header as it was, for the smallest diff.
        first = subs[0]
        header_indent = first.trivia.indent if isinstance(first, Table) else ""
        table.raw_append(key, item)  # append() would add the header's indentation to ours
        if isinstance(first, Table):
            first.trivia.indent = header_indent
        return
    tail = _pop_trailing(table, deep=False)
    table.raw_append(key, item)
    _push_trailing(table, tail)


def _set(table: Table, key: str, value: object, indent: str | None = None) -> None:
    """Set `key`; a new key gets the indentation of the table's keys (`indent` if it has
    none)."""
    if key in table:
        if table[key] != value:
            table[key] = value  # keeps the key's indentation and trailing comment
        return
    _add_key(table, key, value, _key_indent(table) or indent or "")


def _sub_indent(runner: Table) -> str:
    """The indentation of keys in the runner's sub-tables ([runners.cache])."""
    return next((_key_indent(i) for k, i in runner.value.body
                 if isinstance(i, Table) and _key_indent(i)), _key_indent(runner) * 2)


def _new_sub_table(runner: Table, key: str) -> Table:
    """An empty `[runners.KEY]` at the end of `runner`, indented as gitlab-runner does."""
    tail = _pop_trailing(runner)
    table = tomlkit.table()
    table.trivia.indent = _key_indent(runner)
    runner.raw_append(key, table)
    _push_trailing(table, tail)
    return table


# What the merge owns.

def _python(program: str) -> bool:
    return Path(program).name.startswith("python")


def _installation(custom: Table, wanted: Wanted, exists: Exists) -> str:
    """The program for `*_exec` keys that have none: the nspawn-runner this block already
    calls, if it exists, else this command's own."""
    for stage in ("run", "prepare", "config", "cleanup"):
        program = custom.get(f"{stage}_exec")
        if (runner_block.is_ours(program, custom.get(f"{stage}_args"))
                and isinstance(program, str) and exists(program)):
            return program
    return wanted.program


def _without_module(args: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(args):
        if args[i] == "-m" and args[i + 1:i + 2] == [MODULE]:
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def _with_option(args: list[str], option: str, value: str) -> list[str]:
    """`args` with `option VALUE` (or `option=VALUE`) replaced by `option value` in place, or
    appended."""
    out: list[str] = []
    i, done = 0, False
    while i < len(args):
        arg = args[i]
        if arg == option or arg.startswith(option + "="):
            if not done:
                out += [option, value]
                done = True
            i += 2 if arg == option else 1
            continue
        out.append(arg)
        i += 1
    return out if done else [*out, option, value]


def _args(current: object, key: str, stage: str, program: str, wanted: Wanted,
          notes: _Notes) -> list[str]:
    prefix = ["-m", MODULE] if _python(program) else []
    ours = [*prefix, stage, *wanted.options(stage)]
    if current is None:
        return ours
    if not isinstance(current, list) or not all(isinstance(a, str) for a in current):
        notes.changed.append(f"{key} = {current!r} -> {ours!r}: expected a list of strings")
        return ours
    current = [str(a) for a in current]  # plain strings: tomlkit 0.11's arrays cannot slice
    if stage not in current:
        notes.changed.append(f"{key} = {current!r} -> {ours!r}: it must name the stage "
                             f"{stage!r}; add other options (--verbose) around it")
        return ours
    at = current.index(stage)
    before, after = _without_module(list(current[:at])), list(current[at + 1:])
    if stage == "prepare" and wanted.default_image:
        after = _with_option(after, "--default-image", wanted.default_image)
    return [*prefix, *before, stage, *after]


def _timeout(custom: Table, timeout: Timeout, indent: str, notes: _Notes) -> None:
    current = custom.get(timeout.key)
    if isinstance(current, int) and not isinstance(current, bool) and current >= timeout.floor:
        if current != timeout.value:
            notes.kept.append(f"{timeout.key} = {current} (nspawn-runner writes "
                              f"{timeout.value} and needs at least {timeout.floor})")
        return
    if current is not None:
        notes.changed.append(f"{timeout.key} = {current!r} -> {timeout.value}: {timeout.why}")
    _set(custom, timeout.key, timeout.value, indent)


def _update(runner: Table, wanted: Wanted, path: Path, exists: Exists) -> _Notes:
    notes = _Notes()
    label = _label(runner)
    old = runner.get("executor")
    if isinstance(old, str) and old != "custom":
        log.warn(f"{path}: runner {label!r} used the {old!r} executor and now uses "
                 f"nspawn-runner; its [runners.{old}] section, if any, is left as it was")
    _set(runner, "executor", "custom")
    for key, value in (("builds_dir", wanted.builds_dir), ("cache_dir", wanted.cache_dir)):
        current = runner.get(key)
        if current is not None and current != value:
            notes.changed.append(
                f"{key} = {current!r} -> {value!r}: the config stage reports {value!r} from "
                "nspawn-runner's settings and gitlab-runner uses that; change it there")
        _set(runner, key, value)
    custom = runner.get("custom")
    if custom is None:
        custom = _new_sub_table(runner, "custom")
    elif not isinstance(custom, Table):
        raise MergeError(f"{path}: `custom` of runner {label!r} is not a table "
                         "([runners.custom]); fix it first, nothing was changed")
    indent = _sub_indent(runner)
    program = _installation(custom, wanted, exists)
    timeouts = {t.key: t for t in wanted.timeouts()}
    other_programs: dict[str, list[str]] = {}
    for stage in STAGES:
        key = f"{stage}_exec"
        current = custom.get(key)
        if isinstance(current, str) and current and exists(current):
            if current != wanted.program:
                other_programs.setdefault(current, []).append(key)
            stage_program = current
        else:
            if current not in (None, ""):
                notes.changed.append(f"{key} = {current!r} -> {program!r}: "
                                     f"{current!r} is no executable file on this host")
            stage_program = program
            _set(custom, key, program, indent)
        _set(custom, f"{stage}_args", _args(custom.get(f"{stage}_args"), f"{stage}_args",
                                            stage, stage_program, wanted, notes), indent)
        if f"{stage}_exec_timeout" in timeouts:
            _timeout(custom, timeouts.pop(f"{stage}_exec_timeout"), indent, notes)
    for timeout in timeouts.values():  # those no stage took above
        _timeout(custom, timeout, indent, notes)
    for other, keys in other_programs.items():
        notes.kept.insert(0, f"{', '.join(keys)} = {other!r} (this command is "
                          f"{wanted.program}; edit {'them' if len(keys) > 1 else 'it'} to "
                          "switch installations)")
    return notes


@dataclass(frozen=True)
class Merged:
    text: str
    action: str
    runner: str
    notes: _Notes


def merge_text(text: str, wanted: Wanted, name: str = "", add: bool = False,
               path: Path = Path("config.toml"), exists: Exists | None = None) -> Merged:
    """`wanted` merged into the config.toml `text`. `exists` says whether a `*_exec` path is
    an executable file (the tests pass their own)."""
    doc = _parse(text, path)
    runners = runners_of(doc, path)
    runner = _select(runners, name, add, path)
    notes = _Notes()
    if runner is None:
        block = runner_block.runner_table(wanted, name)
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
        notes = _update(runner, wanted, path, exists or executable_file)
        runner_name = _label(runner)
        action = "updated"
    new = tomlkit.dumps(doc)
    if new == text:
        action = "unchanged"
    # Whatever tomlkit made of it, gitlab-runner must be able to read it back.
    _parse(new, path)
    return Merged(new, action, runner_name, notes)


# The file.

def _fix(e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        return ("run as root (gitlab-runner's /etc/gitlab-runner/config.toml is root's, mode "
                "0600) or as the file's owner")
    if e.errno == errno.EROFS:
        return ("the file system is read-only: remount it read-write, or merge into a copy "
                "(cp FILE /tmp/config.toml; nspawn-runner toml --merge /tmp/config.toml) and "
                "put that in place yourself")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the file system is full: free some space and merge again"
    if e.errno == errno.EISDIR:
        return "give the path of gitlab-runner's config.toml file"
    return "check the path and its permissions"


def _os_error(action: str, path: Path, e: OSError) -> MergeError:
    return MergeError(f"cannot {action} {path}: {e.strerror or e}; nothing was changed "
                      f"({_fix(e)})")


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MergeError(
            f"{path} does not exist: register the runner first (`gitlab-runner register "
            "--executor custom ...` creates it; see docs/quickstart.md), or create it from "
            f"the block with `nspawn-runner toml > {path}`") from None
    except OSError as e:
        raise _os_error("read", path, e) from None
    try:
        # Bytes, not read_text(): that would turn CRLF line ends into LF.
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeError(f"{path} is not UTF-8 text ({e}); nothing was changed") from None


def _write_like(directory: Path, final: Path, text: str, st: os.stat_result) -> None:
    """Write `text` to `final` (in `directory`) through a temporary file renamed into place,
    with the mode and owner of `st`."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{final.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _backup_path(target: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = target.with_name(f"{target.name}.{stamp}.bak")
    n = 1
    while os.path.lexists(path):
        path = target.with_name(f"{target.name}.{stamp}-{n}.bak")
        n += 1
    return path


def write_with_backup(path: Path, before: str, after: str) -> Path:
    """Save `before` as a dated copy next to `path`, then replace `path` with `after` so that
    a reader (gitlab-runner reloads the file when it changes) sees the old or the new file,
    never a part. Both keep the file's mode and owner: config.toml holds runner tokens.
    Returns the copy's path."""
    target = path.resolve()  # a symlinked config.toml stays a symlink
    backup = _backup_path(target)
    try:
        st = os.stat(target)
        _write_like(target.parent, backup, before, st)
    except OSError as e:
        raise _os_error("write a backup copy of", path, e) from None
    try:
        _write_like(target.parent, target, after, st)
    except OSError as e:
        backup.unlink(missing_ok=True)
        raise _os_error("write", target, e) from None
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:  # the new file is in place; only its durability is in doubt
        log.warn(f"{target.parent}: cannot sync the directory ({e.strerror})")
    return backup


def read_config(path: Path) -> TOMLDocument:
    """gitlab-runner's config.toml at `path`, parsed; MergeError naming the problem."""
    return _parse(_read(path), path)


def merge_file(path: Path, wanted: Wanted, name: str = "", add: bool = False,
               dry_run: bool = False, exists: Exists | None = None) -> Merge:
    before = _read(path)
    merged = merge_text(before, wanted, name, add, path, exists)
    backup = None
    if merged.text != before and not dry_run:
        backup = write_with_backup(path, before, merged.text)
    return Merge(path=path, before=before, after=merged.text, action=merged.action,
                 runner=merged.runner, changed_keys=tuple(merged.notes.changed),
                 kept_keys=tuple(merged.notes.kept), backup=backup)
