"""The config stage: the JSON gitlab-runner reads before every job (builds_dir, cache_dir,
driver). Exactly one JSON object on stdout and nothing else (protocol section 2).

The output depends only on the settings file, the environment's NSPAWN_RUNNER_* variables, the
driver's version and the host name. So it is kept in /run (runtime.config_cache) under a key
made of those (the settings file by device, inode, size and change times), and a call whose key
matches prints it without importing and validating the settings: about 10 ms instead of 35 ms
in the test bed. Any change of the file or the environment misses, and the full path then
reports a bad settings file as before."""

from __future__ import annotations

import os

from nspawn_runner import __version__, runtime

# Not typing.TYPE_CHECKING: importing typing alone costs this stage 2 ms (mypy treats any
# TYPE_CHECKING constant as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from nspawn_runner.settings import Settings


def config_output(cfg: Settings) -> dict[str, object]:
    import socket

    return {
        "builds_dir": cfg.builds_dir,
        "cache_dir": cfg.cache_dir,
        # Every job has its own machine, so its builds dir is never shared with another job.
        "builds_dir_is_shared": False,
        "hostname": socket.gethostname(),
        "driver": {"name": "nspawn-runner", "version": __version__},
    }


def config(cfg: Settings) -> str:
    """The config stage's stdout: exactly one JSON object and nothing else."""
    import json

    return json.dumps(config_output(cfg))


def _key() -> tuple[str, str]:
    """(cache file, key) for the settings in effect."""
    import zlib

    # The same path as settings.config_path() (tests/unit/test_main.py keeps them equal).
    path = os.environ.get("NSPAWN_RUNNER_CONFIG", runtime.DEFAULT_CONFIG)
    try:
        st = os.stat(path)
        file = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    except OSError:
        file = "absent"
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("NSPAWN_RUNNER_"))
    key = repr((__version__, path, file, os.uname().nodename, env))
    return f"{runtime.config_cache()}/{zlib.crc32(path.encode()):08x}", key


def cached() -> str | None:
    """The output kept for the settings in effect, if any."""
    cache, key = _key()
    try:
        with open(cache, encoding="utf-8") as f:
            kept_key, _, output = f.read().partition("\n")
    except OSError:
        return None
    return output if kept_key == key and output.startswith("{") else None


def remember(output: str) -> None:
    """Keep `output` for the next config call; where the runtime directory is not writable,
    every call takes the full path."""
    cache, key = _key()
    tmp = f"{cache}.{os.getpid()}"
    try:
        os.makedirs(runtime.config_cache(), mode=0o700, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{key}\n{output}")
        os.replace(tmp, cache)
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
