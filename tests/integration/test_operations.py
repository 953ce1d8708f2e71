"""Crash recovery (gc) and limits, on real systemd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import Driver, sh
from gitlab_emulator import JobResult

HERE = Path(__file__).resolve().parent


def machines_of(job_id: int) -> list[str]:
    return [line.split()[0] for line in sh("machinectl", "list", "--no-legend").splitlines()
            if line.startswith(f"nr-{job_id}-")]


def wait_for(predicate: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def gc(driver: Driver) -> str:
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": str(driver.settings)}
    out = subprocess.run(["nspawn-runner", "gc", "--grace", "0"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def test_gc_removes_what_a_killed_runner_left_and_spares_running_jobs(driver: Driver) -> None:
    # A separate "gitlab-runner" process with a job in a long step, killed with SIGKILL
    # together with the driver: cleanup never runs.
    victim = driver.job(["echo victim-up", "sleep 300"])
    runner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys; sys.path[:0] = [{str(HERE.parent)!r}, {str(HERE)!r}]
        from gitlab_emulator import Job, run_job
        from conftest import Driver
        from pathlib import Path
        d = Driver({driver.backend!r}, Path({str(driver.root)!r}), Path({str(driver.settings)!r}))
        run_job(d.config(), Job(script={victim.script!r}, job_id={victim.job_id}, image="bookworm"))
        """)], process_group=0)
    try:
        wait_for(lambda: machines_of(victim.job_id))
        # The victim's driver in its long step, noted before the survivor starts its drivers.
        victim_step = "nspawn-runner run .* build_script"
        wait_for(lambda: sh("pgrep", "-f", victim_step, check=False).split())
        victim_drivers = sh("pgrep", "-f", victim_step).split()
        survivor = driver.job(["echo survivor-up", "sleep 6", "echo survivor-done"])
        results: dict[str, JobResult] = {}
        thread = threading.Thread(target=lambda: results.update(r=driver.run(survivor)))
        thread.start()
        wait_for(lambda: machines_of(survivor.job_id))
        for pid in victim_drivers:
            os.kill(int(pid), signal.SIGKILL)
    finally:
        os.killpg(runner.pid, signal.SIGKILL)  # even if the test fails: never leave it running
        runner.wait()
    time.sleep(1)
    assert machines_of(victim.job_id), "the killed job's machine is left running"
    output = gc(driver)
    assert machines_of(victim.job_id) == []
    assert f"nr-{victim.job_id}-" in output
    assert machines_of(survivor.job_id), "gc must not touch a running job"
    thread.join()
    assert results["r"].status == "success", results["r"].log
    assert "survivor-done" in results["r"].log


def test_gc_removes_machine_of_a_prepare_whose_runner_died(driver: Driver, tmp_path: Path) -> None:
    job_id = driver.job([]).job_id
    (tmp_path / "r.json").write_text(f'{{"id": {job_id}}}')
    env = {**os.environ, "JOB_RESPONSE_FILE": str(tmp_path / "r.json"),
           "NSPAWN_RUNNER_CONFIG": str(driver.settings), "CUSTOM_ENV_CI_JOB_IMAGE": "bookworm"}
    # The "runner" is a short-lived python process: it is gone once prepare returns.
    subprocess.run([sys.executable, "-c", "import subprocess, sys; "
                    "sys.exit(subprocess.call(['nspawn-runner', 'prepare']))"], env=env,
                   check=True)
    (name,) = machines_of(job_id)
    if driver.backend == "btrfs":
        # And nspawn itself killed, so it could not delete its ephemeral snapshot: the unit's
        # stop still removes it with the state file (executor/reap.py), gc has nothing to do.
        sh("systemctl", "kill", "--signal=SIGKILL", f"nspawn-runner-{name}.service")
        wait_for(lambda: not machines_of(job_id))
        wait_for(lambda: not Path(f"/run/nspawn-runner/{name}.json").exists())
        wait_for(lambda: not list((driver.root / "images").glob(".#machine.*[!k]")))
    else:
        assert name in gc(driver)
    assert gc(driver).strip().endswith("removed 0 item(s)")


def test_limits_apply_to_the_machine(driver: Driver) -> None:
    driver.write_settings(cpu_weight=50, memory_max="1G", tasks_max=500, max_job_duration=600)
    job = driver.job(["echo started", "sleep 4"])
    seen = {}

    def look() -> None:
        wait_for(lambda: machines_of(job.job_id))
        unit = f"nspawn-runner-{machines_of(job.job_id)[0]}.service"
        seen["props"] = sh("systemctl", "show", unit, "-p",
                           "CPUWeight,MemoryMax,TasksMax,RuntimeMaxUSec")

    thread = threading.Thread(target=look)
    thread.start()
    result = driver.run(job)
    thread.join()
    assert result.status == "success", result.log
    assert set(seen["props"].split()) == {"CPUWeight=50", "MemoryMax=1073741824",
                                          "TasksMax=500", "RuntimeMaxUSec=10min"}


def test_private_network_and_build_user(driver: Driver) -> None:
    script = ["ls /sys/class/net", "id -un", 'echo "home=$HOME"', "touch /builds/x",
              "timeout 3 bash -c 'echo > /dev/tcp/deb.debian.org/80' && echo NET || echo no-net"]
    host = driver.run(driver.job(script))
    assert host.status == "success", host.log
    assert "root" in host.plain_log.split("$ id -un")[1]
    driver.write_settings(network="private", user="builder")
    isolated = driver.run(driver.job(script))
    assert isolated.status == "success", isolated.log
    log = isolated.plain_log
    assert log.split("$ ls /sys/class/net")[1].split("$")[0].split() == ["lo"]
    assert "builder" in log.split("$ id -un")[1].split("$")[0]
    assert "home=/home/builder" in log and "no-net" in log


def test_private_users(driver: Driver) -> None:
    driver.write_settings(private_users=True)
    result = driver.run(driver.job(["cat /proc/self/uid_map", "echo x > /root/f", "id -u"]))
    if driver.backend != "btrfs":
        assert result.status == "system_failure"
        assert "private_users needs the btrfs backend" in result.log
        return
    assert result.status == "success", result.log
    uid_map = result.plain_log.split("$ cat /proc/self/uid_map")[1].split("$")[0].split()
    assert uid_map[0] == "0" and uid_map[1] != "0"  # root inside is not root outside


@pytest.mark.parametrize("bind", ["/:/host", "/var/run/docker.sock:/d.sock", "{parent}:/x"])
def test_binds_that_break_isolation_are_refused(driver: Driver, bind: str) -> None:
    bind = bind.format(parent=driver.root.parent)  # a parent of the state root
    driver.write_settings(binds=[bind])
    result = driver.run(driver.job(["true"]))
    assert result.status == "system_failure"
    assert "bind" in result.log and bind in result.log


def test_extra_binds(driver: Driver, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_text("from-host\n")
    driver.write_settings(binds=[f"{tmp_path / 'data'}:/data:ro"])
    result = driver.run(driver.job(["cat /data/f", "touch /data/g && echo WRITABLE || true"]))
    assert result.status == "success", result.log
    assert "from-host" in result.log and "WRITABLE" not in result.plain_log.replace(
        "&& echo WRITABLE", "")


def test_persistent_builds_dir_per_project_and_slot(driver: Driver) -> None:
    driver.write_settings(persistent_builds=True)
    first = driver.run(driver.job(["echo kept > marker"], concurrent_id=3))
    assert first.status == "success", first.log
    again = driver.run(driver.job(["cat marker"], concurrent_id=3))
    assert again.status == "success", again.log
    assert "kept" in again.plain_log.split("$ cat marker")[1]
    # The slot is the driver's choice (the lowest one no running job holds), never the job's:
    # CI_CONCURRENT_ID does not move it (test_hostile_jobs.py: a concurrent job gets another).
    other_id = driver.run(driver.job(["cat marker"], concurrent_id=4))
    assert other_id.status == "success", other_id.log
    other_project = driver.run(driver.job(["test ! -e marker"], concurrent_id=3,
                                          project_path="group/other"))
    assert other_project.status == "success", other_project.log
