"""Images shared between runner hosts, in the layout systemd's importer reads
(`machinectl pull-tar`, `importctl pull-tar`): a tarball of the root file system, NAME.tar,
NAME.tar.gz or NAME.tar.xz (not zstd: the importer has no zstd), with a `SHA256SUMS` file
beside it listing its SHA-256 and, optionally, `SHA256SUMS.gpg`, a detached gpg signature of
that file. A directory of such tarballs, served by any web server (or GitLab's generic package
registry), is an image index: its SHA256SUMS lists every image, which is what `chroot-sync`
follows.

Checksums and signatures are checked before anything is unpacked: the download is hashed as
it is written, and a mismatch stops the import with nothing changed."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nspawn_runner import proc, schema
from nspawn_runner.errors import CommandError, SystemFailure
from nspawn_runner.progress import Step

FORMATS = (".tar.xz", ".tar.gz", ".tar")
DEFAULT_FORMAT = ".tar.xz"
SUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.gpg"
DEFAULT_KEYRING = Path("/etc/nspawn-runner/import-pubring.gpg")
# auto: SHA256SUMS must be there, and SHA256SUMS.gpg is checked when it is there.
VERIFY = ("auto", "signature", "checksum", "no")
_MAX_SUMS = 1 << 20
_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_TIMEOUT = 60


class TransportError(SystemFailure):
    pass


def format_of(filename: str) -> str:
    """The format a file name asks for, or TransportError saying which ones there are."""
    for suffix in FORMATS:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return suffix
    raise TransportError(f"{filename}: systemd's importer reads {', '.join(FORMATS)} (not zstd): "
                         f"name the file NAME{DEFAULT_FORMAT}, NAME.tar.gz or NAME.tar, or give "
                         "a directory")


def image_of(filename: str) -> str | None:
    """The image a listed tarball holds (`bookworm.tar.xz` -> bookworm), None for other files."""
    for suffix in FORMATS:
        stem = filename.removesuffix(suffix)
        if stem != filename:
            return stem if schema.IMAGE_NAME.match(stem) else None
    return None


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def public(source: str) -> str:
    """`source` without credentials (`https://user:token@host/...` -> `https://host/...`): what
    messages show and what is recorded in the image, which every job can read."""
    parsed = urllib.parse.urlparse(source)
    if not _is_url(source) or "@" not in parsed.netloc:
        return source
    return urllib.parse.urlunparse(parsed._replace(netloc=parsed.netloc.rpartition("@")[2]))


def _open(url: str) -> Any:
    """urlopen, with the credentials of `https://user:token@host/` sent as HTTP basic auth (a
    GitLab deploy token for the package registry)."""
    parsed = urllib.parse.urlparse(url)
    request = urllib.request.Request(public(url))
    if parsed.username is not None:
        pair = f"{urllib.parse.unquote(parsed.username)}:" \
               f"{urllib.parse.unquote(parsed.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    return urllib.request.urlopen(request, timeout=_TIMEOUT)


def beside(source: str, name: str) -> str:
    """The URL or path of the file `name` in the directory of `source`."""
    if _is_url(source):
        return urllib.parse.urljoin(source, urllib.parse.quote(name))
    parsed = urllib.parse.urlparse(source)
    path = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else source
    return os.fspath(Path(path).parent / name)


def index_of(url: str) -> str:
    """The SHA256SUMS of an image directory given as `url` (or `url` itself if it names it)."""
    if url.rstrip("/").endswith("/" + SUMS) or url == SUMS:
        return url
    return url.rstrip("/") + "/" + SUMS


def _local(source: str) -> Path:
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme not in ("",):
        raise TransportError(f"{public(source)}: only http, https and file URLs and paths can "
                             "be imported")
    return Path(source)


def fetch_small(source: str) -> bytes | None:
    """A small file (SHA256SUMS, its signature) from a URL or path; None if it is not there."""
    try:
        if _is_url(source):
            with _open(source) as response:
                data: bytes = response.read(_MAX_SUMS + 1)
        else:
            with open(_local(source), "rb") as f:
                data = f.read(_MAX_SUMS + 1)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            return None
        raise TransportError(f"cannot download {public(source)}: HTTP {e.code} {e.reason}") \
            from None
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TransportError(f"cannot read {public(source)}: {e}") from None
    if len(data) > _MAX_SUMS:
        raise TransportError(f"{public(source)} is larger than {_MAX_SUMS} bytes: not a {SUMS} "
                             "file")
    return data


def parse_sums(data: bytes, where: str) -> dict[str, str]:
    """`HEX  NAME` lines (as sha256sum writes them) -> {NAME: hex}."""
    entries: dict[str, str] = {}
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.match(line)
        if not match or "/" in match[2]:
            raise TransportError(f"{where}: line {number} is not `SHA256  FILE` as sha256sum "
                                 f"writes it: {line[:80]!r}")
        entries[match[2]] = match[1].lower()
    return entries


def render_sums(entries: Mapping[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(entries.items()))


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_sums(directory: Path, filename: str, digest: str) -> Path:
    """Set `filename`'s line in the SHA256SUMS of `directory`, keeping the other images' lines;
    replaced atomically, so a host syncing meanwhile reads the old or the new list."""
    path = directory / SUMS
    entries = parse_sums(path.read_bytes(), str(path)) if path.exists() else {}
    entries[filename] = digest
    _write_atomic(path, render_sums(entries).encode())
    return path


def sign(directory: Path, key: str = "") -> Path:
    """SHA256SUMS.gpg: a detached binary signature of SHA256SUMS by gpg's default key, or by
    `key` (what importd and `chroot-import --verify=signature` check)."""
    sums = directory / SUMS
    out = directory / SIGNATURE
    tmp = directory / f".{SIGNATURE}.tmp"
    try:
        proc.run(["gpg", "--batch", "--yes", *(["--local-user", key] if key else []),
                  "--output", tmp, "--detach-sign", sums])
        os.replace(tmp, out)
    except CommandError as e:
        raise TransportError(f"cannot sign {sums} with gpg: {e.stderr.strip() or e}; check "
                             f"that gpg has the secret key{f' {key}' if key else ''} "
                             "(gpg --list-secret-keys)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def verify_signature(sums: bytes, signature: bytes, keyring: Path, where: str) -> None:
    """gpgv, with only the keys in `keyring` trusted."""
    if not keyring.is_file():
        raise TransportError(f"{where} is signed, but there is no keyring {keyring} to check it "
                             "with: put the signer's public key there (gpg --export KEYID > "
                             f"{keyring}), or pass --verify=checksum")
    if not shutil.which("gpgv"):
        raise TransportError(f"{where} is signed, but gpgv is not installed: apt-get install "
                             "gpgv, or pass --verify=checksum")
    with tempfile.TemporaryDirectory(prefix="nspawn-runner-verify-") as tmp:
        sums_file, sig_file = Path(tmp) / SUMS, Path(tmp) / SIGNATURE
        sums_file.write_bytes(sums)
        sig_file.write_bytes(signature)
        result = proc.run(["gpgv", "--keyring", keyring.absolute(), sig_file, sums_file],
                          check=False)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise TransportError(f"{where}: the signature {SIGNATURE} does not verify with "
                             f"{keyring} ({lines[-1] if lines else 'gpgv failed'}); nothing was "
                             "imported")


def checked_sums(sums_source: str, verify: str, keyring: Path) -> dict[str, str] | None:
    """The entries of the SHA256SUMS at `sums_source`, checked as `verify` says; None with
    verify="no"."""
    if verify not in VERIFY:
        raise TransportError(f"--verify={verify}: expected one of {', '.join(VERIFY)}")
    if verify == "no":
        return None
    data = fetch_small(sums_source)
    if data is None:
        raise TransportError(f"there is no {public(sums_source)}: export the image with "
                             "`nspawn-runner chroot-export` (it writes SHA256SUMS beside the "
                             "tarball), or pass --verify=no for a tarball made elsewhere")
    if verify != "checksum":
        signature = fetch_small(beside(sums_source, SIGNATURE))
        if signature is None and verify == "signature":
            raise TransportError(f"there is no {public(beside(sums_source, SIGNATURE))}: sign "
                                 "the index (chroot-export --sign), or pass --verify=checksum")
        if signature is not None:
            verify_signature(data, signature, keyring, public(sums_source))
    return parse_sums(data, sums_source)


def expected_digest(sums: Mapping[str, str], source: str, sums_source: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlparse(source).path).rsplit("/", 1)[-1] \
        if _is_url(source) else Path(_local(source)).name
    try:
        return sums[name]
    except KeyError:
        raise TransportError(f"{public(sums_source)} lists no {name}: export it again, or "
                             "import a file it lists") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def fetched(source: str, workdir: Path, name: str) -> Iterator[tuple[Path, str]]:
    """A local path of the tarball `source` (a path or URL) and its SHA-256. A download goes
    next to the images (a leftover of image `name` if we are killed) and is removed after."""
    if not _is_url(source):
        path = _local(source)
        if not path.is_file():
            raise TransportError(f"{public(source)} does not exist or is not a file")
        yield path, sha256_file(path)
        return
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=f".tmp-{name}@download-", suffix=".tar")
    digest = hashlib.sha256()
    try:
        with Step(f"download {public(source)}"), os.fdopen(fd, "wb") as out:
            try:
                with _open(source) as response:
                    while block := response.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            except OSError as e:
                raise TransportError(f"cannot download {public(source)}: {e}") from None
        yield Path(tmp), digest.hexdigest()
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_digest(actual: str, expected: str, source: str, sums_source: str) -> None:
    if actual != expected:
        raise TransportError(f"{public(source)}: its SHA-256 {actual} is not the {expected} "
                             f"that {public(sums_source)} lists: the file is damaged or was "
                             "replaced; nothing was changed")
