"""Image files: parsing, validation messages (file, key, value), defaults, writing."""

from pathlib import Path

import pytest

from nspawn_runner.images import spec as image_file
from nspawn_runner.images.spec import ImageFileError, ImageSpec
from nspawn_runner.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"


@pytest.fixture(autouse=True)
def mmdebstrap_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nspawn_runner.images.spec.shutil.which", lambda name: f"/usr/bin/{name}")


def settings(tmp_path: Path) -> Settings:
    return Settings(root=tmp_path / "root", images_config_dir=tmp_path / "images.d")


def parse(data: dict[str, object], name: str = "img") -> ImageSpec:
    return image_file.parse(name, data, Path(f"/etc/nspawn-runner/images/{name}.toml"))


def test_defaults() -> None:
    spec = parse({"suite": "bookworm"})
    assert spec.bootstrap == "mmdebstrap"
    assert (spec.variant, spec.components, spec.architecture) == ("minbase", ("main",), "")
    assert spec.debian and not spec.provisioned and spec.recreate_after == 0
    assert spec.all_packages() == ("systemd", "systemd-sysv", "dbus", "git", "ca-certificates")
    assert spec.personality == "" and spec.limit_overrides() == {}


def test_debootstrap_when_mmdebstrap_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nspawn_runner.images.spec.shutil.which", lambda name: None)
    assert parse({"suite": "bookworm"}).bootstrap == "debootstrap"


def test_full_file() -> None:
    spec = parse({
        "bootstrap": "debootstrap", "suite": "bookworm", "mirror": "http://mirror.example/debian",
        "architecture": "i386", "components": ["main", "contrib"], "variant": "buildd",
        "packages": ["less", "git", "libc6:i386"], "setup": "apt-get update",
        "playbook": "site.yml", "recreate_after": "7d", "hostname": "ci",
        "bootstrap_options": ["--no-check-gpg"], "limits": {"memory_max": "4G"},
    })
    assert spec.personality == "x86", "i386 gets the 32-bit personality by default"
    assert spec.setup == ("apt-get update",)
    assert spec.playbook == Path("/etc/nspawn-runner/images/site.yml"), "relative to the file"
    assert spec.recreate_after == 7 * 86400
    assert spec.all_packages() == ("systemd", "systemd-sysv", "dbus", "git", "ca-certificates",
                                   "python3", "less", "libc6:i386")
    assert spec.limit_overrides() == {"memory_max": "4G"}


@pytest.mark.parametrize(("value", "seconds"), [("7d", 604800), ("12h", 43200), ("2w", 1209600),
                                                ("30m", 1800), (90, 90), ("", 0), ("never", 0)])
def test_durations(value: object, seconds: int) -> None:
    assert parse({"suite": "sid", "recreate_after": value}).recreate_after == seconds


@pytest.mark.parametrize(("data", "message"), [
    ({"suite": 12}, "invalid value 12 for 'suite': expected a string"),
    ({"suite": "sid", "variant": "tiny"}, "invalid value 'tiny' for 'variant': mmdebstrap"),
    ({"suite": "sid", "bootstrap": "debootstrap", "variant": "standard"},
     "invalid value 'standard' for 'variant': debootstrap variants are"),
    ({"suite": "sid", "bootstrap": "yum"}, "invalid value 'yum' for 'bootstrap'"),
    ({"bootstrap": "mmdebstrap"}, "'suite' is required"),
    ({"suite": "sid", "packages": ["a,b"]}, "invalid value ['a,b'] for 'packages'"),
    ({"suite": "sid", "packages": ["--force"]}, "for 'packages'"),
    ({"suite": "sid", "mirror": "ftp.debian.org"}, "for 'mirror': expected a URL"),
    ({"suite": "sid", "recreate_after": "7 days"}, "invalid value '7 days' for 'recreate_after'"),
    ({"suite": "sid", "personality": "arm"}, "invalid value 'arm' for 'personality'"),
    ({"suite": "sid", "bootstrap_options": ["-x"]}, "for 'bootstrap_options'"),
    ({"bootstrap": "command"}, "needs command = [...]"),
    ({"command": ["debootstrap", "sid"]}, "must name the directory to fill as {target}"),
    ({"command": ["x", "{target}"], "import": "/x.tar"}, "either imported or made by a command"),
    ({"bootstrap": "mmdebstrap", "suite": "sid", "command": ["x", "{target}"]},
     "only used with bootstrap = \"command\""),
    ({"command": ["x", "{target}"], "bootstrap_options": ["--x"]}, "only used with mmdebstrap"),
    ({"suite": "sid", "limits": {"memory_max": "lots"}},
     "invalid value 'lots' for 'limits.memory_max'"),
    ({"suite": "sid", "limits": {"colour": "red"}}, "unknown key 'limits.colour'"),
    ({"suite": "sid", "limits": "4G"}, "for 'limits': expected a table"),
])
def test_errors_name_file_key_and_value(data: dict[str, object], message: str) -> None:
    with pytest.raises(ImageFileError) as e:
        parse(data)
    assert str(e.value).startswith("/etc/nspawn-runner/images/img.toml: ")
    assert message in str(e.value)


def test_unknown_key_is_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    parse({"suite": "sid", "packges": ["x"]})
    assert "unknown key 'packges' ignored (did you mean 'packages'?)" in capsys.readouterr().err


def test_command_and_import() -> None:
    spec = parse({"command": ["sh", "-c", "tar -C {target} -xf x.tar"]})
    assert spec.bootstrap == "command" and not spec.debian
    imported = parse({"import": "base.tar.zst"})
    assert imported.bootstrap == "import"
    assert imported.import_from == "/etc/nspawn-runner/images/base.tar.zst"
    assert parse({"import": "https://x/y.tar.zst"}).import_from == "https://x/y.tar.zst"


def test_recipe_changes_with_how_the_image_is_made_only() -> None:
    base = parse({"suite": "bookworm", "setup": ["a"]})
    assert base.recipe() == parse({"suite": "bookworm", "setup": ["b"],
                                   "recreate_after": "1d"}).recipe()
    assert base.recipe() != parse({"suite": "trixie", "setup": ["a"]}).recipe()
    assert base.recipe() != parse({"suite": "bookworm", "packages": ["less"]}).recipe()


def test_load_save_and_overrides(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    assert image_file.load(cfg, "tiny") is None
    over = image_file.overrides(cfg, "tiny", ["less"], suite="sid", mirror=None)
    assert over == {"suite": "sid", "packages": ["less"]}
    spec = image_file.load(cfg, "tiny", over)
    assert spec is not None and spec.suite == "sid" and spec.file is None
    path = image_file.path_of(cfg, "tiny")
    image_file.save(path, over)
    path.write_text(path.read_text() + "# my comment\nsetup = [\"true\"]\n")
    image_file.save(path, image_file.overrides(cfg, "tiny", ["git"], suite="trixie"))
    text = path.read_text()
    assert "# my comment" in text and 'suite = "trixie"' in text
    loaded = image_file.load(cfg, "tiny")
    assert loaded is not None and loaded.packages == ("less", "git") and loaded.file == path
    assert image_file.names(cfg) == ["tiny"]


def test_names_skip_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = settings(tmp_path)
    cfg.images_config_dir.mkdir()
    (cfg.images_config_dir / "bad_name.toml").write_text("")
    (cfg.images_config_dir / "good.toml").write_text("")
    assert image_file.names(cfg) == ["good"]
    assert "bad_name" in capsys.readouterr().err


def test_invalid_toml(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    cfg.images_config_dir.mkdir()
    image_file.path_of(cfg, "x").write_text("suite = \n")
    with pytest.raises(ImageFileError, match="x.toml is not valid TOML"):
        image_file.load(cfg, "x")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    spec = image_file.parse(path.stem, image_file.read(path), path)
    if spec.playbook:
        assert spec.playbook.is_file()
    if spec.architecture == "i386":
        assert spec.personality == "x86"


def test_examples_cover_the_issue() -> None:
    specs = {p.stem: image_file.parse(p.stem, image_file.read(p), p)
             for p in EXAMPLES.glob("*.toml")}
    assert specs["bookworm"].suite == "bookworm" and specs["sid"].suite == "sid"
    assert any("dist-upgrade" in c for c in specs["sid"].setup)
    assert specs["bookworm-i386"].architecture == "i386"
    assert specs["fedora"].bootstrap == "command"
