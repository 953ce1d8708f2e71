"""Images between hosts: the tarball formats systemd's importer reads, SHA256SUMS beside them,
detached gpg signatures (real gpg and gpgv), downloads hashed as they are written, and which
images chroot-sync takes."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nspawn_runner.images import build, commands, store, transport
from nspawn_runner.images.transport import TransportError
from nspawn_runner.settings import Settings


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("name", "fmt"), [("a.tar.xz", ".tar.xz"), ("a.tar.gz", ".tar.gz"),
                                           ("a.tar", ".tar")])
def test_formats_systemd_imports(name: str, fmt: str) -> None:
    assert transport.format_of(name) == fmt


@pytest.mark.parametrize("name", ["a.tar.zst", "a.tgz", ".tar.xz", "a"])
def test_other_formats_are_refused_naming_the_ones_there_are(name: str) -> None:
    with pytest.raises(TransportError, match=r"reads \.tar\.xz, \.tar\.gz, \.tar \(not zstd\)"):
        transport.format_of(name)


def test_listed_images() -> None:
    assert transport.image_of("bookworm.tar.xz") == "bookworm"
    assert transport.image_of("sid.tar") == "sid"
    assert transport.image_of("SHA256SUMS.gpg") is None
    assert transport.image_of("../x.tar.gz") is None and transport.image_of("a b.tar") is None


def test_beside_and_index() -> None:
    assert transport.beside("https://h/images/a.tar.xz", "SHA256SUMS") == \
        "https://h/images/SHA256SUMS"
    assert transport.beside("/srv/x/a.tar.xz", "SHA256SUMS") == "/srv/x/SHA256SUMS"
    assert transport.beside("file:///srv/x/a.tar", "SHA256SUMS") == "/srv/x/SHA256SUMS"
    assert transport.index_of("https://h/images") == "https://h/images/SHA256SUMS"
    assert transport.index_of("https://h/images/") == "https://h/images/SHA256SUMS"
    assert transport.index_of("https://h/images/SHA256SUMS") == "https://h/images/SHA256SUMS"


def test_sums_are_sha256sum_compatible(tmp_path: Path) -> None:
    (tmp_path / "b.tar.xz").write_bytes(b"bee")
    (tmp_path / "a.tar.gz").write_bytes(b"ay")
    transport.update_sums(tmp_path, "b.tar.xz", sha(b"bee"))
    transport.update_sums(tmp_path, "a.tar.gz", sha(b"old"))
    transport.update_sums(tmp_path, "a.tar.gz", sha(b"ay"))  # replaced, not added
    text = (tmp_path / "SHA256SUMS").read_text()
    assert text == f"{sha(b'ay')}  a.tar.gz\n{sha(b'bee')}  b.tar.xz\n"
    check = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert transport.parse_sums(f"{sha(b'x').upper()} *bin.tar\n\n".encode(), "s") == {
        "bin.tar": sha(b"x")}


@pytest.mark.parametrize("line", ["abc  x.tar", f"{sha(b'x')}  dir/x.tar", "nonsense"])
def test_bad_sums_lines(line: str) -> None:
    with pytest.raises(TransportError, match="line 1 is not `SHA256  FILE`"):
        transport.parse_sums(line.encode(), "idx")


def published(tmp_path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        transport.update_sums(tmp_path, name, sha(data))
    return tmp_path


def test_checksum_policy(tmp_path: Path) -> None:
    published(tmp_path, {"a.tar": b"aaa"})
    sums_file = str(tmp_path / "SHA256SUMS")
    keyring = tmp_path / "none.gpg"
    assert transport.checked_sums(sums_file, "auto", keyring) == {"a.tar": sha(b"aaa")}
    assert transport.checked_sums(sums_file, "checksum", keyring) == {"a.tar": sha(b"aaa")}
    assert transport.checked_sums(sums_file, "no", keyring) is None
    with pytest.raises(TransportError, match="there is no .*SHA256SUMS.gpg: sign the index"):
        transport.checked_sums(sums_file, "signature", keyring)
    with pytest.raises(TransportError, match="expected one of auto, signature, checksum, no"):
        transport.checked_sums(sums_file, "maybe", keyring)
    (tmp_path / "SHA256SUMS").unlink()
    with pytest.raises(TransportError, match="there is no .*SHA256SUMS: export the image with "
                       "`nspawn-runner chroot-export`.*or pass --verify=no"):
        transport.checked_sums(sums_file, "auto", keyring)


def test_a_published_signature_is_checked_even_in_auto(tmp_path: Path) -> None:
    published(tmp_path, {"a.tar": b"aaa"})
    (tmp_path / "SHA256SUMS.gpg").write_bytes(b"not a signature")
    with pytest.raises(TransportError, match="is signed, but there is no keyring .*"
                       r"gpg --export KEYID.*or pass --verify=checksum"):
        transport.checked_sums(str(tmp_path / "SHA256SUMS"), "auto", tmp_path / "absent.gpg")
    # --verify=checksum ignores it, for hosts without the key.
    assert transport.checked_sums(str(tmp_path / "SHA256SUMS"), "checksum", tmp_path / "x")


@pytest.fixture
def gpg_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    if not shutil.which("gpg") or not shutil.which("gpgv"):
        pytest.skip("needs gpg and gpgv")
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(home))
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
                    "nspawn-runner test <test@example.invalid>", "ed25519", "sign", "never"],
                   check=True, capture_output=True)
    yield home
    subprocess.run(["gpgconf", "--kill", "all"], capture_output=True, check=False)


def test_signatures_made_by_gpg_are_verified_by_gpgv(tmp_path: Path, gpg_home: Path) -> None:
    (tmp_path / "pub").mkdir()
    index = published(tmp_path / "pub", {"a.tar": b"aaa"})
    transport.sign(index)
    keyring = tmp_path / "import-pubring.gpg"
    keyring.write_bytes(subprocess.run(["gpg", "--export"], check=True,
                                       capture_output=True).stdout)
    sums_file = str(index / "SHA256SUMS")
    assert transport.checked_sums(sums_file, "signature", keyring) == {"a.tar": sha(b"aaa")}
    assert transport.checked_sums(sums_file, "auto", keyring) == {"a.tar": sha(b"aaa")}
    # Someone changes the list after it was signed: refused.
    transport.update_sums(index, "evil.tar", sha(b"evil"))
    with pytest.raises(TransportError, match="the signature SHA256SUMS.gpg does not verify"):
        transport.checked_sums(sums_file, "auto", keyring)
    # A key the host does not trust: refused.
    transport.sign(index)
    other = tmp_path / "other.gpg"
    other.write_bytes(b"")
    with pytest.raises(TransportError, match="does not verify with"):
        transport.checked_sums(sums_file, "signature", other)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    directory = tmp_path / "served"
    directory.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", directory
    httpd.shutdown()


def test_downloads_are_hashed_and_removed(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, directory = server
    published(directory, {"a.tar": b"x" * 3_000_000})
    work = tmp_path / "work"
    work.mkdir()
    with transport.fetched(url + "a.tar", work, "a") as (path, digest):
        assert digest == sha(b"x" * 3_000_000) and path.parent == work
        assert path.name.startswith(".tmp-a@download-")
    assert list(work.iterdir()) == []
    assert transport.checked_sums(url + "SHA256SUMS", "auto", tmp_path / "k") == {
        "a.tar": sha(b"x" * 3_000_000)}
    assert transport.fetch_small(url + "absent") is None
    with pytest.raises(TransportError, match="cannot download .*absent.tar"), \
            transport.fetched(url + "absent.tar", work, "a"):
        pass
    assert list(work.iterdir()) == []


def test_local_files_and_bad_schemes(tmp_path: Path) -> None:
    archive = tmp_path / "x.tar"
    archive.write_bytes(b"x")
    with transport.fetched(str(archive), tmp_path, "x") as (path, digest):
        assert path == archive and digest == sha(b"x")
    with transport.fetched(f"file://{archive}", tmp_path, "x") as (path, _):
        assert path == archive
    with pytest.raises(TransportError, match="does not exist"), \
            transport.fetched(str(tmp_path / "none"), tmp_path, "x"):
        pass
    with pytest.raises(TransportError, match="only http, https and file"), \
            transport.fetched("ftp://h/x.tar", tmp_path, "x"):
        pass


def test_a_mismatch_names_both_digests() -> None:
    with pytest.raises(TransportError, match=f"its SHA-256 {'0' * 64} is not the {'1' * 64} "
                       "that idx lists: the file is damaged or was replaced; nothing was "
                       "changed"):
        transport.check_digest("0" * 64, "1" * 64, "x.tar", "idx")


@pytest.mark.parametrize("fmt", transport.FORMATS)
@pytest.mark.parametrize("xz_installed", [True, False])
def test_archive_and_extract_keep_owners_modes_and_xattrs(tmp_path: Path, fmt: str,
                                                          xz_installed: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if xz_installed and not shutil.which("xz"):
        pytest.skip("xz-utils is not installed")
    if not xz_installed:
        real_which = shutil.which
        monkeypatch.setattr(shutil, "which", lambda p: None if p == "xz" else real_which(p))
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/f").write_text("content\n")
    (tree / "etc/f").chmod(0o640)
    (tree / "link").symlink_to("etc/f")
    if os.geteuid() == 0:
        os.chown(tree / "etc/f", 1234, 5678)
    try:
        os.setxattr(tree / "etc/f", "user.nr", b"kept")
        xattrs = True
    except OSError:
        xattrs = False
    tarball = tmp_path / f"img{fmt}"
    build.archive(tree, tarball, fmt)
    magic = tarball.read_bytes()[:6]
    assert {".tar.xz": magic.startswith(b"\xfd7zXZ"), ".tar.gz": magic.startswith(b"\x1f\x8b"),
            ".tar": not magic.startswith((b"\xfd7zXZ", b"\x1f\x8b"))}[fmt]
    out = tmp_path / "out"
    out.mkdir()
    build.extract(tarball, out)
    st = (out / "etc/f").stat()
    assert (out / "etc/f").read_text() == "content\n" and st.st_mode & 0o777 == 0o640
    assert os.readlink(out / "link") == "etc/f"
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1234, 5678)
    if xattrs:
        assert os.getxattr(out / "etc/f", "user.nr") == b"kept"


def test_a_truncated_tarball_is_refused(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(2_000_000))
    tarball = tmp_path / "img.tar.xz"
    build.archive(tree, tarball, ".tar.xz")
    cut = tmp_path / "cut.tar.xz"
    cut.write_bytes(tarball.read_bytes()[:500_000])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(build.ImageBuildError, match="is not a complete tarball"):
        build.extract(cut, out)


# Which images chroot-sync takes.

@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setattr("nspawn_runner.layout.RUNTIME_DIR", tmp_path / "run")
    monkeypatch.setattr("nspawn_runner.runtime.RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "root" / "images").mkdir(parents=True)
    return Settings(root=tmp_path / "root", images_config_dir=tmp_path / "images.d")


def test_sync_takes_what_changed(cfg: Settings, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "idx").mkdir()
    index = published(tmp_path / "idx", {"same.tar.xz": b"same", "new.tar.gz": b"new",
                                         "changed.tar": b"v2"})
    (index / "README").write_text("not an image")
    for name, digest in (("same", sha(b"same")), ("changed", sha(b"v1"))):
        path = cfg.images_dir / name
        path.mkdir()
        store.write_meta(path, imported_sha256=digest)
    calls: list[tuple[str, str, str | None]] = []

    def fake_import(settings: Settings, name: str, source: str, expected: str | None,
                    sums_source: str, spec: object, in_use: object) -> None:
        calls.append((name, source, expected))
        if name == "new":
            raise TransportError("download failed")

    monkeypatch.setattr(commands, "_import_locked", fake_import)
    outcomes = commands.sync(cfg, str(index), lambda: [])
    assert [(o.name, o.action, o.error) for o in outcomes] == [
        ("changed", "updated", ""), ("new", "", "download failed"), ("same", "up to date", "")]
    assert calls == [("changed", str(index / "changed.tar"), sha(b"v2")),
                     ("new", str(index / "new.tar.gz"), sha(b"new"))]
    assert commands.outcomes_json(outcomes)[1] == {
        "name": "new", "ok": False, "action": None, "error": "download failed", "seconds": 0.0}
    with pytest.raises(TransportError, match=r"lists no image 'absent' \(it lists: changed, "
                       r"new, same\)"):
        commands.sync(cfg, str(index), lambda: [], ["absent"])
    calls.clear()
    only = commands.sync(cfg, str(index), lambda: [], ["changed"])
    assert [o.name for o in only] == ["changed"] and len(calls) == 1


def test_url_credentials_go_into_a_header_never_into_messages(tmp_path: Path) -> None:
    """A GitLab deploy token in the URL, as for the generic package registry."""
    directory = tmp_path / "served"
    directory.mkdir()
    published(directory, {"a.tar": b"aaa"})
    seen: list[str | None] = []

    class Auth(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != "Basic ZGVwbG95OnMzY3JldA==":
                self.send_error(401)
                return
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Auth, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://deploy:s3cret@127.0.0.1:{httpd.server_address[1]}/"
        assert transport.public(base + "a.tar") == base.replace("deploy:s3cret@", "") + "a.tar"
        assert transport.checked_sums(base + "SHA256SUMS", "auto", tmp_path / "k") == {
            "a.tar": sha(b"aaa")}
        with transport.fetched(base + "a.tar", tmp_path, "a") as (_, digest):
            assert digest == sha(b"aaa")
        with pytest.raises(TransportError) as caught:
            transport.fetch_small(base.replace("s3cret", "wrong") + "SHA256SUMS")
        assert "HTTP 401" in str(caught.value) and "wrong" not in str(caught.value)
    finally:
        httpd.shutdown()
    assert seen[0] == "Basic ZGVwbG95OnMzY3JldA=="
