"""The benchmark's reference driver (bench/shell-driver) keeps the custom-executor protocol, so
that measuring nspawn-runner against it (bench/run) compares like with like. No timings here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from gitlab_emulator import run_job
from variants import SHELL, Bench, Variant, leftovers


@pytest.fixture(params=["btrfs", "overlay"])
def shell(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Bench, Variant]]:
    assert not leftovers(), "leftovers before the test"
    yield Bench(tmp_path, pool_size=0), Variant(SHELL, str(request.param))
    assert not leftovers(), "the shell driver left something behind"


def test_job_runs_in_a_booted_machine(shell: tuple[Bench, Variant]) -> None:
    bench, v = shell
    script = 'echo "pid1=$(cat /proc/1/comm) virt=$(systemd-detect-virt)"'
    result = bench.run(v, bench.job([script]))
    assert "pid1=systemd virt=systemd-nspawn" in result.plain_log
    assert [c.exit_code for c in result.calls] == [0] * len(result.calls)


def test_script_exit_code_is_reported(shell: tuple[Bench, Variant]) -> None:
    bench, v = shell
    result = run_job(bench.runner_config(v), bench.job(["exit 42"]), timeout=300)
    assert result.status == "failed" and result.exit_code == 42, result.log
    build = result.calls_of("build_script")[0]
    assert build.exit_code == 1  # BUILD_FAILURE_EXIT_CODE, the code in BUILD_EXIT_CODE_FILE


def test_boot_failure_is_a_system_failure_and_cleanup_runs_after_each_attempt(
        shell: tuple[Bench, Variant]) -> None:
    bench, v = shell
    config = bench.runner_config(v)
    config = replace(config, retry_delay=0.1, extra_process_env={
        **config.extra_process_env, "SHELL_DRIVER_IMAGE": "no-such-image"})
    result = run_job(config, bench.job(), timeout=300)
    assert result.status == "system_failure", result.log
    assert [c.kind for c in result.calls] == ["config", "prepare", "cleanup"] * 3
    assert "image" in result.log and "does not exist" in result.log
