"""The warm pool on real systemd: a pooled job passes the scenarios an unpooled one does, is
indistinguishable from one, never gets a machine of an old image version, and gc collects a
pool whose runner is gone. Every test ends by checking that nothing is left (conftest), after
draining the pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import test_boot
import test_jobs
import test_operations
from conftest import Driver, sh
from gitlab_emulator import Job, JobResult, RunnerConfig

HERE = Path(__file__).resolve().parent


def nr(driver: Driver, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": str(driver.settings)}
    out = subprocess.run(["nspawn-runner", *args], capture_output=True, text=True, env=env)
    if check:
        assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}"
    return out


def pool(driver: Driver) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(nr(driver, "pool", "list", "--json").stdout)
    return rows


def wait_ready(driver: Driver, count: int = 1, timeout: float = 90) -> list[str]:
    """The pool machines of the current image versions that are up."""
    deadline = time.monotonic() + timeout
    while True:
        ready = [r["machine"] for r in pool(driver)
                 if r["state"] == "ready" and r["current_version"]]
        if len(ready) >= count:
            return ready
        assert time.monotonic() < deadline, f"the pool did not fill: {pool(driver)}"
        time.sleep(0.1)


def served_from_pool(result: JobResult) -> bool:
    return "from the warm pool" in result.log


@dataclass
class PooledDriver(Driver):
    """Runs every job when a pool machine is ready for it, and checks that a job run alone
    got one. Changing the settings replaces the pool (its machines were booted for the old
    ones)."""

    active: set[int] = field(default_factory=set)  # the jobs running now
    overlapped: set[int] = field(default_factory=set)  # jobs that ran next to another
    pooled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write_settings(self, **extra: object) -> None:
        super().write_settings(**extra)
        nr(self, "pool", "drain")
        nr(self, "pool", "fill")

    def run(self, job: Job, config: RunnerConfig | None = None, **kw: Any) -> JobResult:
        wait_ready(self)
        with self.lock:
            if self.active:
                self.overlapped |= self.active | {job.job_id}
            self.active.add(job.job_id)
        try:
            result = super().run(job, config, **kw)
        finally:
            with self.lock:
                self.active.discard(job.job_id)
        prepared = any(c.exit_code == 0 for c in result.calls_of("prepare"))
        if prepared and served_from_pool(result):
            self.pooled += 1
        elif prepared and job.job_id not in self.overlapped:
            # Alone, with a ready pool machine of the current version: it must have got it.
            raise AssertionError(f"job {job.job_id} was not served from the pool:\n{result.log}")
        return result


@pytest.fixture
def pooled(driver: Driver) -> Iterator[PooledDriver]:
    d = PooledDriver(driver.backend, driver.root, driver.settings, {"pool_size": 1})
    d.write_settings()
    yield d
    nr(d, "pool", "drain")


SCENARIOS: list[Callable[..., None]] = [
    test_jobs.test_success,
    test_jobs.test_script_exit_code_is_reported,
    test_jobs.test_after_script_sees_failure,
    test_jobs.test_registry_reference_maps_to_image,
    test_jobs.test_state_and_services_persist_between_stages,
    test_jobs.test_every_stage_name_is_accepted,
    test_jobs.test_writes_do_not_leak_into_the_image_or_the_next_job,
    test_jobs.test_four_concurrent_jobs_on_one_image,
    test_jobs.test_cancel_stops_the_step_inside_the_machine,
    test_jobs.test_abort_runs_only_cleanup,
    test_jobs.test_cache_survives_to_the_next_job_of_the_project,
    test_jobs.test_secrets_never_in_driver_output,
    test_operations.test_private_network_and_build_user,
    test_operations.test_persistent_builds_dir_per_project_and_slot,
    test_boot.test_masked_units_leave_a_running_system,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
def test_pooled_jobs_pass_the_same_scenarios(pooled: PooledDriver,
                                             scenario: Callable[[Driver], None]) -> None:
    scenario(pooled)
    assert pooled.pooled, "no job of the scenario was served from the pool"


def test_cleanup_is_idempotent_with_a_pool(pooled: PooledDriver, tmp_path: Path) -> None:
    wait_ready(pooled)
    # A retried prepare of a job that got a pool machine stops that machine first.
    test_jobs.test_cleanup_is_idempotent(pooled, tmp_path)


def status_dir(st: dict[str, Any]) -> Path:
    """The machine's /run/nspawn-runner (its step-status tmpfs), seen from the host."""
    pid = str(st.get("leader", "")).partition(":")[0]
    return Path(f"/proc/{pid or 0}/root/run/nspawn-runner")


def run_watched(driver: Driver, job: Job) -> tuple[JobResult, dict[str, str]]:
    """Run `job` (its script must start with `touch /run/nspawn-runner/step-started` and last a
    second or two) and note, while it runs, which machine serves it and what its unit and
    deadline timer say."""
    seen: dict[str, str] = {}

    def look() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for path in Path("/run/nspawn-runner").glob(f"nr-{job.job_id}-*.json"):
                st = json.loads(path.read_text())
                # Once the first step runs, prepare (boot or hand-out) is over.
                if not (status_dir(st) / "step-started").exists():
                    continue
                seen["job_machine"], seen["machine"] = path.stem, st["machine"]
                seen["props"] = sh("systemctl", "show", st["unit"], "-p",
                                   "CPUWeight,MemoryMax,TasksMax,RuntimeMaxUSec")
                seen["timer"] = sh("systemctl", "show", "-p", "ActiveState,PartOf",
                                   f"nspawn-runner-deadline-{st['machine']}.timer")
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=look)
    watcher.start()
    result = driver.run(job)
    watcher.join()
    assert result.status == "success", result.log
    return result, seen


def test_a_pooled_job_is_indistinguishable(driver: Driver) -> None:
    """Host name (also for an image that names none), a fresh machine-id, no earlier boot in
    its journal, the same limits on the machine's unit, max_job_duration from the hand-out."""
    image = driver.make_image("noname")
    (image / "etc" / "hostname").unlink()  # a hard link on ext4: unlinking leaves the original
    limits = {"cpu_weight": 50, "memory_max": "1G", "tasks_max": 500, "max_job_duration": 600}
    script = ["touch /run/nspawn-runner/step-started",
              'echo "host=$(hostname) id=$(cat /etc/machine-id)"',
              # One line per boot, each starting with its index (0, -1, ...), after a header.
              "echo boots=$(journalctl --list-boots --no-pager | grep -c '^ *-*[0-9]')",
              "sleep 2"]
    try:
        driver.write_settings(**limits)
        plain, plain_seen = run_watched(driver, driver.job(script, image="noname"))
        pooled = PooledDriver(driver.backend, driver.root, driver.settings,
                              {"pool_size": 1, **limits})
        pooled.write_settings()  # the settings' pool_size: one machine for each image
        wait_ready(pooled, count=2)
        result, seen = run_watched(pooled, pooled.job(script, image="noname"))
        nr(pooled, "pool", "drain")
    finally:
        driver.remove_image("noname")
    assert served_from_pool(result) and seen["machine"].startswith("nrp-")
    fields = {}
    for kind, log in (("plain", plain.plain_log), ("pooled", result.plain_log)):
        fields[kind] = dict(w.split("=", 1) for w in log.split() if w.startswith(
            ("host=", "id=", "boots=")))
    assert fields["plain"]["host"] == plain_seen["job_machine"]
    assert fields["pooled"]["host"] == seen["job_machine"], "the job's name, not the pool's"
    assert fields["plain"]["id"] != fields["pooled"]["id"]
    assert len(fields["pooled"]["id"]) == 32
    assert fields["plain"]["boots"] == fields["pooled"]["boots"] == "1"
    same = {"CPUWeight=50", "MemoryMax=1073741824", "TasksMax=500"}
    assert set(plain_seen["props"].split()) == same | {"RuntimeMaxUSec=10min"}
    # RuntimeMaxSec= cannot be set on a running unit: a timer stops the machine instead.
    assert set(seen["props"].split()) == same | {"RuntimeMaxUSec=infinity"}
    assert "ActiveState=active" in seen["timer"]
    assert f"PartOf=nspawn-runner-{seen['machine']}.service" in seen["timer"]


def test_an_idle_pool_machine_yields_the_cpu_until_it_is_handed_out(
        pooled: PooledDriver) -> None:
    """A pool machine boots and waits at the lowest CPU weight (a replacement booting beside a
    job must not slow it), and serves its job with the job's own: here systemd's default, as
    an unpooled job's unit has it."""
    (idle,) = wait_ready(pooled)
    assert sh("systemctl", "show", "-p", "CPUWeight", f"nspawn-runner-{idle}.service"
              ).split() == ["CPUWeight=1"]
    result, seen = run_watched(pooled, pooled.job(["touch /run/nspawn-runner/step-started",
                                                   "sleep 2"]))
    assert served_from_pool(result) and seen["machine"] == idle
    assert "CPUWeight=[not set]" in seen["props"].splitlines(), seen["props"]


def test_a_pool_machine_of_an_old_version_is_never_handed_out(pooled: PooledDriver) -> None:
    images = pooled.root / "images"
    (old,) = wait_ready(pooled)
    # A new version swapped in by hand (no image command, so nothing recycles the pool).
    code = textwrap.dedent(f"""
        from pathlib import Path
        from nspawn_runner import settings
        from nspawn_runner.images import store
        cfg = settings.load(Path({str(pooled.settings)!r}))
        new = store.new_copy(cfg, "bookworm")
        (new / "etc" / "pool-version").write_text("v2\\n")
        store.swap_in(cfg, "bookworm", new)
        """)
    restore = textwrap.dedent(f"""
        from pathlib import Path
        from nspawn_runner import settings
        from nspawn_runner.images import store
        cfg = settings.load(Path({str(pooled.settings)!r}))
        new = store.new_copy(cfg, "bookworm")
        (new / "etc" / "pool-version").unlink()
        store.swap_in(cfg, "bookworm", new)
        """)
    subprocess.run(["/opt/nspawn-runner/bin/python", "-c", code], check=True)
    try:
        # Not PooledDriver.run: the one ready machine is of the old version.
        result = Driver.run(pooled, pooled.job(["cat /etc/pool-version"]))
        assert result.status == "success", result.log
        assert "v2" in result.plain_log and old not in result.log
        assert not served_from_pool(result)
        wait_gone(old)
        # An image command replaces the pool at once, for the runner it was kept for.
        (fresh,) = wait_ready(pooled)
        nr(pooled, "chroot-login", "bookworm", "--", "sh", "-c", "echo v3 > /etc/pool-version")
        assert [r for r in pool(pooled) if r["machine"] != fresh], "a replacement is booting"
        again = pooled.run(pooled.job(["cat /etc/pool-version"]))
        assert served_from_pool(again) and fresh not in again.log
        assert "v3" in again.plain_log
        wait_gone(fresh)
    finally:
        nr(pooled, "pool", "drain")
        subprocess.run(["/opt/nspawn-runner/bin/python", "-c", restore], check=True)
        (images / ".lock-bookworm").unlink(missing_ok=True)
        deadline = time.monotonic() + 60
        while [p for p in images.iterdir() if p.name.startswith(".old-")]:
            assert time.monotonic() < deadline, "old versions are not pruned"
            subprocess.run(["nspawn-runner", "gc", "--grace", "0"], capture_output=True,
                           env={**os.environ, "NSPAWN_RUNNER_CONFIG": str(pooled.settings)})
            time.sleep(0.5)


def wait_gone(machine: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while machine in sh("machinectl", "list", "--no-legend"):
        assert time.monotonic() < deadline, f"{machine} is still running"
        time.sleep(0.1)


def test_gc_collects_a_pool_whose_runner_is_gone(pooled: PooledDriver) -> None:
    # A separate "gitlab-runner" runs one pooled job; its prepare boots the replacement, which
    # is kept for that runner. Then the runner exits.
    (kept_for_us,) = wait_ready(pooled)
    job = pooled.job(["echo from-the-other-runner"])
    runner = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys; sys.path[:0] = [{str(HERE.parent)!r}, {str(HERE)!r}]
        from gitlab_emulator import Job, run_job
        from conftest import Driver
        from pathlib import Path
        d = Driver({pooled.backend!r}, Path({str(pooled.root)!r}), Path({str(pooled.settings)!r}))
        r = run_job(d.config(), Job(script={job.script!r}, job_id={job.job_id}, image="bookworm"))
        print(r.status, "from the warm pool" in r.log)
        """)], capture_output=True, text=True, check=True)
    assert runner.stdout.split() == ["success", "True"], runner.stdout + runner.stderr
    (theirs,) = wait_ready(pooled)
    assert theirs != kept_for_us
    assert [r["runner_alive"] for r in pool(pooled)] == [False]
    collected = nr(pooled, "gc", "--grace", "0")
    assert f"pool machine {theirs}" in collected.stderr, collected.stdout + collected.stderr
    wait_gone(theirs)
    assert not pool(pooled)
    # A pool kept for a live runner (this test process) stays.
    nr(pooled, "pool", "fill")
    (ours,) = wait_ready(pooled)
    gc_out = nr(pooled, "gc", "--grace", "0")
    assert ours in [r["machine"] for r in pool(pooled)], gc_out.stdout + gc_out.stderr


def test_a_booting_pool_machine_is_stopped_at_once(pooled: PooledDriver) -> None:
    """A guest in its first moments of boot never sees nspawn's request to power off: stopping
    one must not wait for the stop timeout (and kill nspawn, leaving its snapshot)."""
    nr(pooled, "pool", "drain")
    for _ in range(3):
        nr(pooled, "pool", "fill")
        start = time.monotonic()
        nr(pooled, "pool", "drain")
        assert time.monotonic() - start < 10
        assert not pool(pooled)


def test_a_runner_without_pool_leaves_another_runners_pool_alone(pooled: PooledDriver,
                                                                tmp_path: Path) -> None:
    """Two settings files whose machines boot the same way: jobs of the one with pool_size 0
    neither take nor stop the other's pool machines (its pool_size is its own)."""
    (idle,) = wait_ready(pooled)
    other = Driver(pooled.backend, pooled.root, tmp_path / "other.toml")
    other.write_settings()
    for _ in range(2):
        result = other.run(other.job(["true"]))
        assert result.status == "success", result.log
        assert not served_from_pool(result)
    assert wait_ready(pooled) == [idle]
    result = pooled.run(pooled.job(["true"]))
    assert served_from_pool(result) and idle in result.log


def test_lowering_pool_size_to_0_stops_the_pool_with_the_next_job(pooled: PooledDriver) -> None:
    (idle,) = wait_ready(pooled)
    pooled.base_settings["pool_size"] = 0
    Driver.write_settings(pooled)  # no drain: the next job is what notices
    result = Driver.run(pooled, pooled.job(["true"]))
    assert result.status == "success", result.log
    assert not served_from_pool(result)
    wait_gone(idle)
    assert not pool(pooled)
