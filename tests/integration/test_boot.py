"""What the boot options do to a job (docs/performance.md): the masked units are masked
and nothing else is missing, an enabled service of the image still runs before the first step,
and --suppress-sync does what its setting says."""

from __future__ import annotations

from conftest import Driver


def test_masked_units_leave_a_running_system(driver: Driver) -> None:
    result = driver.run(driver.job([
        "systemctl is-system-running",
        "echo getty=$(systemctl show -p LoadState --value console-getty.service)",
        "echo apt=$(systemctl show -p LoadState --value apt-daily.timer)",
        "echo logind=$(systemctl is-active systemd-logind.service)",
        "journalctl -b --no-pager -n 1 >/dev/null && echo journal-ok",
    ]))
    assert result.status == "success", result.log
    log = result.plain_log
    assert "\nrunning" in log, "no unit failed, none is still starting"
    assert "getty=masked" in log and "apt=masked" in log
    assert "logind=active" in log and "journal-ok" in log
    driver.write_settings(boot_mask=[])
    unmasked = driver.run(driver.job(
        ["echo getty=$(systemctl show -p LoadState --value console-getty.service)"]))
    assert unmasked.status == "success", unmasked.log
    assert "getty=loaded" in unmasked.plain_log


def test_an_enabled_service_of_the_image_runs_before_the_first_step(driver: Driver) -> None:
    image = driver.make_image("withsvc")
    try:
        units = image / "etc" / "systemd" / "system"
        (units / "ci-db.service").write_text(
            "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            "ExecStart=/bin/sh -c 'sleep 0.5; echo up > /run/ci-db'\n"
            "[Install]\nWantedBy=multi-user.target\n")
        wants = units / "multi-user.target.wants"
        wants.mkdir(exist_ok=True)
        (wants / "ci-db.service").symlink_to("../ci-db.service")
        result = driver.run(driver.job(["systemctl is-active ci-db.service", "cat /run/ci-db"],
                                       image="withsvc"))
    finally:
        driver.remove_image("withsvc")
    assert result.status == "success", result.log
    assert "\nactive" in result.plain_log and "\nup" in result.plain_log


def test_suppress_sync(driver: Driver) -> None:
    script = ["dd if=/dev/zero of=/root/a bs=4k count=10 conv=fsync status=none && echo fsync-ok",
              "dd if=/dev/zero of=/root/b bs=4k count=10 oflag=dsync status=none "
              "&& echo dsync-ok || echo dsync-refused"]
    default = driver.run(driver.job(script))
    assert default.status == "success", default.log
    assert "fsync-ok" in default.plain_log and "dsync-ok" in default.plain_log
    driver.write_settings(suppress_sync=True)
    suppressed = driver.run(driver.job(script))
    assert suppressed.status == "success", suppressed.log
    assert "fsync-ok" in suppressed.plain_log and "dsync-refused" in suppressed.plain_log
