"""Validation when a file is read, not when a job fails: the settings file and image files
refuse what would break every job (or isolation), naming the file, the key, the value and the
rule; durations and sizes read the same everywhere; image commands check names before they
take a lock or make a directory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from nspawn_runner import schema, settings
from nspawn_runner.errors import SystemFailure
from nspawn_runner.host import limits
from nspawn_runner.host.backends import Backend
from nspawn_runner.host.limits import LimitError
from nspawn_runner.images import commands, names, store
from nspawn_runner.images import spec as image_file
from nspawn_runner.images.spec import ImageFileError
from nspawn_runner.settings import Settings, SettingsError

ROOT = Path("/var/lib/nspawn-runner")


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return settings.load(path, environ={})


# One syntax for durations and sizes.

@pytest.mark.parametrize(("value", "seconds"), [
    (90, 90), ("90", 90), ("90s", 90), ("2m", 120), ("1h", 3600), ("7d", 604800),
    ("2w", 1209600), (" 3h ", 10800), (0, 0), ("", 0), ("never", 0)])
def test_durations(value: object, seconds: int) -> None:
    assert schema.duration(value) == seconds


@pytest.mark.parametrize("value", ["1.5h", "1 hour", "h", "-1", -1, True, 1.5, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(schema.BadValue, match="a whole number of seconds, or a number with s, m, "
                       "h, d or w such as '90s' or '1h'"):
        schema.duration(value)


def test_the_same_duration_syntax_in_settings_and_image_files(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'boot_timeout = "2m"\nstop_timeout = 45\nmax_job_duration = "3h"\n')
    assert (cfg.boot_timeout, cfg.stop_timeout, cfg.max_job_duration) == (120, 45, 10800)
    assert cfg.limits().unit_properties() == ["--property=RuntimeMaxSec=10800"]
    spec = image_file.parse("x", {"suite": "sid", "recreate_after": "2w",
                                  "limits": {"max_job_duration": "1h"}}, None)
    assert spec.recreate_after == 1209600 and spec.limit_overrides() == {"max_job_duration": 3600}


@pytest.mark.parametrize("text", ['boot_timeout = "0"', "boot_timeout = 0", 'boot_timeout = ""',
                                  'stop_timeout = "never"'])
def test_timeouts_must_be_positive(tmp_path: Path, text: str) -> None:
    with pytest.raises(SettingsError, match="expected a duration greater than 0"):
        load(tmp_path, text + "\n")


def test_sizes_as_strings_or_bytes(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'memory_max = "8G"\nmemory_high = 6442450944\n')
    assert cfg.limits().unit_properties() == ["--property=MemoryHigh=6442450944",
                                              "--property=MemoryMax=8G"]
    spec = image_file.parse("x", {"suite": "sid", "limits": {"memory_max": 1024}}, None)
    assert spec.limit_overrides() == {"memory_max": "1024"}


@pytest.mark.parametrize("text", ['memory_max = "8GB"', 'memory_max = "8 G"', "memory_max = -1",
                                  "memory_max = true", 'memory_high = "lots"'])
def test_bad_sizes_name_the_syntax(tmp_path: Path, text: str) -> None:
    with pytest.raises(SettingsError, match=r"(a whole number of bytes, or a number with K, M, G "
                       r"or T such as '8G'|size of 0 or more|expected a size)"):
        load(tmp_path, text + "\n")


# The settings file.

@pytest.mark.parametrize("root", ["/", "/etc", "/usr", "/var", "/var/lib", "/etc/nspawn-runner",
                                  "/usr/local/images", "/proc/x", "//", "/var/lib/"])
def test_system_directories_are_no_state_root(tmp_path: Path, root: str) -> None:
    with pytest.raises(SettingsError, match=r"invalid value .* for 'root': .* is a system "
                       r"directory; .* use a directory of its own"):
        load(tmp_path, f'root = "{root}"\n')


@pytest.mark.parametrize("root", ["/var/lib/../../etc", "/srv/a/../b"])
def test_dotdot_in_the_state_root(tmp_path: Path, root: str) -> None:
    with pytest.raises(SettingsError, match="absolute path without '..'"):
        load(tmp_path, f'root = "{root}"\n')


def test_a_state_root_of_its_own(tmp_path: Path) -> None:
    assert load(tmp_path, 'root = "/srv/nspawn-runner/"\n').root == Path("/srv/nspawn-runner")
    assert load(tmp_path, f'root = "{tmp_path}/r"\n').root == tmp_path / "r"


def test_state_root_from_the_environment_is_checked_too(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    with pytest.raises(SettingsError, match="NSPAWN_RUNNER_ROOT='/etc'.*system directory"):
        settings.load(path, environ={"NSPAWN_RUNNER_ROOT": "/etc"})


@pytest.mark.parametrize("name", ["../etc", ".hidden", "-x", "a b", "a..b", "x" * 70])
def test_default_image_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(SettingsError, match=f"invalid value '{name}' for 'default_image': "
                       "expected an image name: letters, digits"):
        load(tmp_path, f'default_image = "{name}"\n')


def test_limits_table_in_the_settings_file_says_where_limits_go(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, 'boot_timeout = 60\n\n[limits]\nmemory_max = "8G"\n')
    assert str(caught.value) == (
        f"{tmp_path}/config.toml: unknown table [limits]: in the settings file, limits are "
        'top-level keys (memory_max = "8G" above any [table] header); [limits] belongs in '
        "image files (images_config_dir/NAME.toml, docs/images.md)")


def test_any_other_table_in_the_settings_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"unknown table \[settings\]: its keys belong at "
                       "the top of the file"):
        load(tmp_path, '[settings]\nroot = "/srv/x"\n')


# Binds: what is refused, and the rule named.

@pytest.mark.parametrize(("spec", "rule"), [
    ("/proc:/p", "it exposes /proc (the host's processes"),
    ("/proc/sys:/p", "it exposes /proc"),
    ("/sys/fs/cgroup:/c", "it exposes /sys"),
    ("/dev:/dev2", "it exposes /dev (the host's devices"),
    ("/dev/sda:/disk", "it exposes /dev"),
    ("/etc/gitlab-runner:/g", "gitlab-runner's config.toml with every runner's token"),
    ("/etc:/hostetc", "it exposes /etc/gitlab-runner"),
    ("/root:/r", "root's home"),
    ("/root/.ssh:/s:ro", "it exposes /root"),
    ("/run/nspawn-runner:/s", "the driver's state of every running job"),
    ("/run/docker.sock:/d", "gives jobs control of the host"),
    ("/srv/data:/proc", "inside the machine it covers /proc"),
    ("/srv/data:/sys/x", "inside the machine it covers /sys"),
    ("/srv/data:/dev/shm", "inside the machine it covers /dev"),
    ("/srv/data:/run/nspawn-runner", "where the driver reads each step's exit status"),
    ("/srv/data:/run", "it covers /run/nspawn-runner"),
    ("/srv/data:/usr/local/bin", "where the driver binds the gitlab-runner helper"),
    ("/srv/data:/builds", "a path the driver binds into every machine"),
    ("/srv/data:/cache/x", "it covers /cache"),
])
def test_refused_binds_name_the_rule(spec: str, rule: str) -> None:
    with pytest.raises(LimitError, match=f"^bind {spec!r}: .*") as caught:
        limits.parse_bind(spec, ROOT, ("/builds", "/cache"))
    assert rule in str(caught.value)


def test_device_nodes_anywhere_are_refused(tmp_path: Path) -> None:
    # /dev/null through another path is still a device node.
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    with pytest.raises(LimitError, match="is a device node; devices are not bound into jobs"):
        limits.parse_bind(f"{link}:/n", ROOT)


def test_good_binds_still_work() -> None:
    bind = limits.parse_bind("/srv/data:/data:ro", ROOT, ("/builds", "/cache"))
    assert (bind.host, bind.inside, bind.read_only) == (Path("/srv/data"), "/data", True)
    assert limits.parse_bind("/etc/ssl/certs:/certs:ro", ROOT).inside == "/certs"


def test_settings_binds_know_builds_dir_and_cache_dir(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="binds: bind '/srv/x:/ci/b': inside the machine it "
                       "covers /ci/b"):
        load(tmp_path, 'builds_dir = "/ci/b"\nbinds = ["/srv/x:/ci/b"]\n')


# Image files.

def test_image_file_binds_are_checked_when_the_file_is_read(tmp_path: Path) -> None:
    files = tmp_path / "images.d"
    files.mkdir()
    (files / "x.toml").write_text('suite = "sid"\n[limits]\nbinds = ["/etc:/e"]\n')
    cfg = Settings(root=tmp_path / "root", images_config_dir=files)
    with pytest.raises(ImageFileError) as caught:
        image_file.load(cfg, "x")
    assert str(caught.value).startswith(
        f"{files}/x.toml: invalid value ['/etc:/e'] for 'limits.binds': bind '/etc:/e': it "
        "exposes /etc/gitlab-runner")


def test_image_file_binds_are_checked_against_this_hosts_state_root(tmp_path: Path) -> None:
    cfg = Settings(root=tmp_path / "root")
    with pytest.raises(ImageFileError, match="it exposes the state root"):
        image_file.parse("x", {"suite": "sid", "limits": {"binds": [f"{tmp_path}:/t"]}}, None,
                         settings=cfg)


def test_private_users_in_an_image_file_needs_btrfs(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    files = tmp_path / "images.d"
    files.mkdir()
    (files / "x.toml").write_text('suite = "sid"\n[limits]\nprivate_users = true\n')
    cfg = Settings(root=tmp_path / "root", images_config_dir=files)
    (tmp_path / "root").mkdir()
    monkeypatch.setattr("nspawn_runner.host.backends.choose", lambda s, r: Backend.OVERLAY)
    with pytest.raises(ImageFileError) as caught:
        image_file.load(cfg, "x")
    assert str(caught.value).startswith(
        f"{files}/x.toml: invalid value True for 'limits.private_users': private users need the "
        f"btrfs backend, and jobs here get the overlay backend ({tmp_path}/root)")
    monkeypatch.setattr("nspawn_runner.host.backends.choose", lambda s, r: Backend.BTRFS)
    spec = image_file.load(cfg, "x")
    assert spec is not None and spec.limit_overrides() == {"private_users": True}


def test_unknown_table_in_an_image_file(tmp_path: Path) -> None:
    with pytest.raises(ImageFileError, match=r"unknown table \[limit\]"):
        image_file.parse("x", {"suite": "sid", "limit": {"memory_max": "1G"}}, None)


# Names before locks and directories.

def _image_dir_entries(cfg: Settings) -> list[str]:
    return sorted(os.listdir(cfg.images_dir)) if cfg.images_dir.exists() else []


def no_uses() -> list[store.Use]:
    return []


@pytest.mark.parametrize("name", ["../evil", ".lock-x", "a/b", ""])
def test_invalid_names_never_become_lock_files(tmp_path: Path, name: str) -> None:
    cfg = Settings(root=tmp_path / "root")
    (tmp_path / "root").mkdir()
    actions: list[Callable[[], object]] = [
        lambda: commands.remove(cfg, name, no_uses),
        lambda: commands.login(cfg, name, ["true"], no_uses),
        lambda: commands.export(cfg, name, tmp_path / "x.tar"),
        lambda: commands.import_(cfg, name, str(tmp_path / "x.tar"), no_uses),
        lambda: commands.create(cfg, name, no_uses),
        lambda: store.lock(cfg, name, "test").__enter__(),
    ]
    for action in actions:
        with pytest.raises(names.ImageError, match="image name"):
            action()
    assert sorted(os.listdir(tmp_path)) == ["root"] and not cfg.images_dir.exists()


def test_missing_images_take_no_lock(tmp_path: Path) -> None:
    cfg = Settings(root=tmp_path / "root")
    cfg.images_dir.mkdir(parents=True)
    actions: list[Callable[[], object]] = [
        lambda: commands.remove(cfg, "absent", no_uses),
        lambda: commands.login(cfg, "absent", ["true"], no_uses),
        lambda: commands.export(cfg, "absent", tmp_path / "x.tar")]
    for action in actions:
        with pytest.raises(names.ImageError, match="image 'absent' does not exist"):
            action()
    assert _image_dir_entries(cfg) == []


def test_a_mistyped_state_root_is_never_created(tmp_path: Path) -> None:
    cfg = Settings(root=tmp_path / "nspawn-runer", origins={"root": "/etc/x.toml"})
    with pytest.raises(SystemFailure, match=r"the state root .*/nspawn-runer \(root, from "
                       r"/etc/x.toml\) does not exist: create it \(mkdir -p .*\) or fix root"):
        store.lock(cfg, "bookworm", "test").__enter__()
    assert not cfg.root.exists()
