"""Hostile jobs on real systemd (docs/security.md): what a root job can try against the host,
and the mechanism that stops it, asserted on the machine's unit and namespaces as well, since
the test bed's own sandbox would deny some of it whatever the driver does. Every test ends with
the fixture's check that nothing is left."""

from __future__ import annotations

import os
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Driver, sh
from gitlab_emulator import JobResult, run_job
from test_operations import gc, machines_of, wait_for

UNIT_OF_STEP = "unit=$(sed -n 's|.*/\\(ci-[^/]*\\.service\\)$|\\1|p' /proc/self/cgroup | head -1)"


def during(driver: Driver, script: list[str], probe: Callable[[str], None],
           **kw: object) -> JobResult:
    """Run a job whose build_script says "probe-now" and then sleeps; call probe(machine)
    from the host while it sleeps."""
    job = driver.job([*script, "echo probe-now", "sleep 8"], **kw)
    results: dict[str, JobResult] = {}
    thread = threading.Thread(target=lambda: results.update(r=driver.run(job)))
    thread.start()
    try:
        wait_for(lambda: machines_of(job.job_id))
        (name,) = machines_of(job.job_id)
        wait_for(in_step)
        probe(name)
    finally:
        thread.join()
    return results["r"]


def unit_property(machine: str, prop: str) -> str:
    return sh("systemctl", "show", f"--property={prop}", "--value",
              f"nspawn-runner-{machine}.service").strip()


def leader(machine: str) -> int:
    return int(sh("machinectl", "show", "--property=Leader", "--value", machine))


def test_no_host_device_and_no_needless_capability(driver: Driver) -> None:
    seen: dict[str, str] = {}

    def probe(machine: str) -> None:
        seen["policy"] = unit_property(machine, "DevicePolicy")
        seen["allow"] = unit_property(machine, "DeviceAllow")
        seen["runtime"] = unit_property(machine, "RuntimeMaxUSec")
        with open(f"/proc/{leader(machine)}/status") as f:
            seen["capbnd"] = next(line for line in f if line.startswith("CapBnd:"))

    # The job's side: a node for the host's first disk, and an immutable file.
    result = during(driver, [
        "mknod /tmp/sda b 8 0 && (head -c1 /tmp/sda >/dev/null 2>&1 && echo DISK-\"READ\" "
        "|| echo disk-\"refused\")",
        "touch /tmp/f; chattr +i /tmp/f 2>&1 || echo immutable-\"refused\"",
    ], probe)
    assert result.status == "success", result.log
    assert "disk-refused" in result.log and "DISK-READ" not in result.log
    assert "immutable-refused" in result.log
    # The mechanism (the bed's outer sandbox denies device opens by itself, so the unit's
    # policy is what shows the driver closes them on a real host).
    assert seen["policy"] == "closed"
    assert "/dev/net/tun rwm" in seen["allow"] and "char-pts rw" in seen["allow"]
    assert "block-" not in seen["allow"] and "/dev/sd" not in seen["allow"]
    caps = int(seen["capbnd"].split()[1], 16)
    assert not caps & (1 << 9), "CAP_LINUX_IMMUTABLE is dropped"
    assert not caps & (1 << 30), "CAP_AUDIT_CONTROL is dropped"
    assert caps & (1 << 27), "CAP_MKNOD stays (image builds in jobs make device nodes)"
    # The job's own timeout (3600 s in the emulator) plus the margin is the unit's backstop.
    assert seen["runtime"] == "1h 15min"


@pytest.mark.parametrize("plant", [
    f"{UNIT_OF_STEP}; ln -s /dev/zero /run/nspawn-runner/$unit.status",
    f"{UNIT_OF_STEP}; ln -s /etc/nr-host-number /run/nspawn-runner/$unit.status",
    "umount /run/nspawn-runner && rmdir /run/nspawn-runner && ln -s /tmp /run/nspawn-runner",
    "mount -t tmpfs none /run/nspawn-runner",
], ids=["dev-zero", "host-file", "dir-link", "remount"])
def test_planted_status_files_are_not_followed(driver: Driver, plant: str) -> None:
    # A host file holding a number: read through the link, it would become the job's status.
    Path("/etc/nr-host-number").write_text("42\n")
    try:
        job = driver.job([plant, "exit 0"])
        start = time.monotonic()
        result = driver.run(job)
    finally:
        Path("/etc/nr-host-number").unlink()
    (build,) = result.calls_of("build_script")
    assert build.exit_code == 2, result.log  # a system failure: never 42, never "success"
    assert "ended without an exit status" in build.output.decode()
    assert time.monotonic() - start < 60
    assert build.duration < 10, "the host never blocks or reads without bound"


def test_a_job_fills_only_its_own_status_tmpfs(driver: Driver) -> None:
    before = os.statvfs("/run").f_bavail
    result = driver.run(driver.job([
        "if dd if=/dev/zero of=/run/nspawn-runner/fill bs=64k count=100 2>/tmp/dd.err; "
        "then echo WROTE-ALL; else grep -q 'No space' /tmp/dd.err && echo tmpfs-\"full\"; fi",
        "rm /run/nspawn-runner/fill", "echo next-step-\"ran\""]))
    assert result.status == "success", result.log
    assert "tmpfs-full" in result.log and "next-step-ran" in result.log
    assert os.statvfs("/run").f_bavail >= before - 64, "the host's /run is not the job's"


def test_a_job_that_fills_its_writable_layer(driver: Driver) -> None:
    if driver.backend != "btrfs":
        pytest.skip("on overlay the layer is the test bed's real disk (the machine's): "
                    "filling it would fill the developer's disk")
    fill = ("fallocate -l $(df --output=avail -B1 / | tail -1) /fill 2>&1 || true; "
            "dd if=/dev/zero of=/fill2 bs=1M count=64 2>&1 | tail -1 || true; df -h / | tail -1")
    result = driver.run(driver.job([fill, "echo still-\"running\""]))
    assert result.status == "success", result.log
    assert "still-running" in result.log
    # cleanup freed it: the next job has the space again and runs (once btrfs's cleaner has
    # reclaimed the deleted snapshot, which it does in the background).
    sh("btrfs", "subvolume", "sync", str(driver.root))
    after = driver.run(driver.job(["test $(df --output=avail -B1 / | tail -1) -gt 1000000000",
                                   "echo space-\"back\""]))
    assert after.status == "success", after.log


def test_immutable_files_do_not_survive_cleanup(driver: Driver) -> None:
    # An admin gave the capability back (an image build needs it, say): cleanup still
    # removes what a job made immutable or append-only.
    driver.write_settings(nspawn_options=["--capability=CAP_LINUX_IMMUTABLE"])
    result = driver.run(driver.job([
        "mkdir -p /srv/x && touch /srv/x/f && chattr +i /srv/x/f && chattr +a /srv/x",
        "lsattr -d /srv/x /srv/x/f"]))
    assert result.status == "success", result.log
    assert "----i" in result.log


def test_cleanup_finishes_on_sigterm_and_gc_collects_a_killed_one(driver: Driver,
                                                                  tmp_path: Path) -> None:
    # A slow `systemctl stop` (a loaded host) keeps cleanup busy when gitlab-runner's SIGTERM
    # at cleanup_exec_timeout comes: cleanup, and the systemctl it runs, go on.
    real = sh("sh", "-c", "command -v systemctl").strip()
    stubs = stub(tmp_path, "systemctl", f"""\
        case "$*" in *stop*nspawn-runner-*) sleep 2 ;; esac
        exec {real} "$@"
        """)
    cfg = driver.config()
    cfg.extra_process_env = {**cfg.extra_process_env,
                             "PATH": f"{stubs}:{os.environ['PATH']}"}
    cfg.cleanup_exec_timeout = 0.5
    result = driver.run(driver.job(["true"]), cfg)
    (cleanup,) = result.calls_of("cleanup")
    assert "SIGTERM" in cleanup.signals_sent and cleanup.exit_code == 0, result.log
    # SIGKILL before the stop was asked for: the machine outlives its cleanup; gitlab-runner
    # removes the job's directory anyway, and gc then collects the machine although
    # gitlab-runner still runs.
    cfg.graceful_kill_timeout = 0.3
    job = driver.job(["true"])
    result = run_job(cfg, job, timeout=600)  # not driver.run: a killed call has no exit code
    (cleanup,) = result.calls_of("cleanup")
    assert "SIGKILL" in cleanup.signals_sent, result.log
    assert machines_of(job.job_id), "the killed cleanup never asked for the stop"
    out = gc(driver)
    assert f"nr-{job.job_id}-" in out
    wait_for(lambda: not machines_of(job.job_id))


def in_step(stage: str = "build_script") -> bool:
    return bool(sh("pgrep", "-f", f"nspawn-runner run .* {stage}", check=False).strip())


def test_a_prepare_wrapper_that_does_not_exec_is_not_the_owner(driver: Driver) -> None:
    cfg = driver.config()
    assert cfg.prepare_exec is not None
    # The wrapper is the process group's leader and exits right after prepare.
    cfg.prepare_exec = ["sh", "-c", '"$@"; rc=$?; exit $rc', "wrapper", *cfg.prepare_exec]
    job = driver.job(["echo up", "sleep 8", 'echo sur"vived"'])
    results: dict[str, JobResult] = {}
    thread = threading.Thread(target=lambda: results.update(r=driver.run(job, cfg)))
    thread.start()
    try:
        wait_for(in_step)
        gc_out = gc(driver)
    finally:
        thread.join()
    assert results["r"].status == "success", results["r"].log
    assert "survived" in results["r"].log and f"nr-{job.job_id}-" not in gc_out


def stub(tmp_path: Path, name: str, body: str) -> Path:
    d = tmp_path / "stubs"
    d.mkdir(exist_ok=True)
    f = d / name
    f.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    f.chmod(0o755)
    return d


def test_a_hanging_systemd_run_is_a_system_failure(driver: Driver, tmp_path: Path) -> None:
    real = sh("sh", "-c", "command -v systemd-run").strip()
    stubs = stub(tmp_path, "systemd-run", f"""\
        case "$*" in *--pipe*) exec sleep 1000 ;; esac
        exec {real} "$@"
        """)
    driver.write_settings(step_start_timeout=3)
    cfg = driver.config()
    cfg.extra_process_env = {**cfg.extra_process_env,
                             "PATH": f"{stubs}:{os.environ['PATH']}"}
    result = driver.run(driver.job(["echo never"]), cfg)
    (prep,) = result.calls_of("prepare_script")
    assert prep.exit_code == 2 and prep.duration < 15, result.log
    message = prep.output.decode()
    assert "did not start" in message and "hangs" in message and "step_start_timeout" in message
    assert not sh("pgrep", "-f", "sleep 1000", check=False).strip()


def test_cancel_stops_the_step_when_the_bus_hangs(driver: Driver, tmp_path: Path) -> None:
    real = sh("sh", "-c", "command -v systemctl").strip()
    stubs = stub(tmp_path, "systemctl", f"""\
        case "$*" in *--machine=*) exec sleep 1000 ;; esac
        exec {real} "$@"
        """)
    cfg = driver.config()
    cfg.extra_process_env = {**cfg.extra_process_env,
                             "PATH": f"{stubs}:{os.environ['PATH']}"}
    job = driver.job(["echo step-started", "sleep 300"],
                     after_script=["pgrep -x sleep >/dev/null && echo SLEEP-LEFT "
                                   "|| echo no-sleep-\"left\""])
    result = driver.run(job, cfg, cancel_at=("build_script", 2.0))
    (build,) = result.calls_of("build_script")
    assert build.duration < 2.0 + 20, result.log
    assert "killed" in build.output.decode() and "from the host" in build.output.decode()
    assert "no-sleep-left" in result.log
    sh("pkill", "-f", "sleep 1000", check=False)


def test_job_variables_do_not_choose_another_jobs_machine_or_checkout(driver: Driver) -> None:
    driver.write_settings(persistent_builds=True)
    first = driver.job(["touch $CI_PROJECT_DIR/../marker-$CI_JOB_ID", "echo probe-now",
                        "sleep 8"])
    results: dict[str, JobResult] = {}
    thread = threading.Thread(target=lambda: results.update(a=driver.run(first)))
    thread.start()
    try:
        wait_for(lambda: machines_of(first.job_id))
        time.sleep(2)
        # A job that claims to be the first one, in its slot.
        second = driver.job(["ls $CI_PROJECT_DIR/.. ; echo id=$CI_JOB_ID"],
                            variables={"CI_JOB_ID": str(first.job_id), "CI_CONCURRENT_ID": "0",
                                       "CI_RUNNER_ID": "999"})
        results["b"] = driver.run(second)
    finally:
        thread.join()
    assert results["a"].status == "success", results["a"].log
    b = results["b"]
    assert b.status == "success", b.log
    assert f"marker-{first.job_id}" not in b.log, "the second job got the first one's checkout"
    assert any(f"nr-{second.job_id}-" in line for line in b.log.splitlines()), b.log
    # No response file: no job.
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": str(driver.settings),
           "CUSTOM_ENV_CI_JOB_ID": "77"}
    env.pop("JOB_RESPONSE_FILE", None)
    out = subprocess.run(["nspawn-runner", "prepare"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "JOB_RESPONSE_FILE is not set" in out.stderr


def test_state_root_and_caches_are_private(driver: Driver) -> None:
    result = driver.run(driver.job(["true"]))
    assert result.status == "success", result.log
    for path in (driver.root, driver.root / "cache", driver.root / "overlays"):
        if path.exists():
            assert os.stat(path).st_mode & 0o007 == 0, f"{path} is open to local users"


def test_gc_expires_old_caches_and_says_so_first_with_dry_run(driver: Driver) -> None:
    key = driver.root / "cache" / "gitlab.example.com" / "expiry-test" / "p" / "old-key"
    key.mkdir(parents=True)
    (key / "cache.zip").write_text("old")
    fresh = key.parent / "fresh-key"
    fresh.mkdir()
    (fresh / "cache.zip").write_text("new")
    month_ago = time.time() - 31 * 86400
    os.utime(key / "cache.zip", (month_ago, month_ago))
    os.utime(key, (month_ago, month_ago))
    try:
        env = {**os.environ, "NSPAWN_RUNNER_CONFIG": str(driver.settings)}
        dry = subprocess.run(["nspawn-runner", "gc", "--grace", "0", "--dry-run"],
                             capture_output=True, text=True, env=env)
        assert dry.returncode == 0 and f"would remove cache {key}" in dry.stdout, dry
        assert key.exists()
        out = subprocess.run(["nspawn-runner", "gc", "--grace", "0", "--json"],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert str(key) in out.stdout and not key.exists() and fresh.exists()
    finally:
        sh("rm", "-rf", str(key.parent.parent))
