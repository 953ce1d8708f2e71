"""An example CI job through nspawn-runner's config, prepare, run and cleanup stages, called
the way gitlab-runner calls them (tests/gitlab_emulator.py), with the job log printed live.

Runs inside the test bed: `tests/run demo`. On a real runner host with images in place it runs
as is: `python3 tests/demo.py [--image NAME] [--backend auto|btrfs|overlay|volatile]`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gitlab_emulator import CacheSpec, Job, RunnerConfig, run_job, strip_ansi

FAKE_GITLAB_RUNNER = Path(__file__).resolve().parent / "fixtures" / "fake-gitlab-runner"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", default="bookworm")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--root", default="/var/lib/nspawn-runner")
    args = parser.parse_args(argv)

    settings = Path(tempfile.mkdtemp(prefix="nspawn-runner-demo-")) / "config.toml"
    settings.write_text(f'root = "{args.root}"\nbackend = "{args.backend}"\n'
                        f'gitlab_runner = "{FAKE_GITLAB_RUNNER}"\n')
    config = RunnerConfig(
        config_exec=["nspawn-runner", "config"],
        prepare_exec=["nspawn-runner", "prepare", "--default-image", args.image],
        run_exec=["nspawn-runner", "run"],
        cleanup_exec=["nspawn-runner", "cleanup"],
        graceful_kill_timeout=30,
        extra_process_env={"NSPAWN_RUNNER_CONFIG": str(settings)},
    )
    job = Job(
        name="demo",
        script=[
            "grep PRETTY_NAME /etc/os-release",
            "echo \"virtualization: $(systemd-detect-virt), hostname: $(hostname)\"",
            "systemd-run --quiet --unit=demo-web bash -c 'while true; do date > /run/tick; "
            "sleep 1; done'",
            "mkdir -p vendor && date > vendor/built-at",
        ],
        extra_steps={"check": ["systemctl is-active demo-web", "cat /run/tick",
                               "cat vendor/built-at"]},
        after_script=['echo "job status: $CI_JOB_STATUS"'],
        cache=[CacheSpec(paths=["vendor/"], key="demo")],
    )
    color = sys.stdout.isatty()

    def show(line: str) -> None:
        print(line if color else strip_ansi(line), flush=True)

    result = run_job(config, job, live_output=show)
    print(f"\ndemo: job {result.status} in {result.duration:.1f}s; stage calls:")
    for stage, code, seconds in result.call_summary():
        print(f"  {stage:<24} exit {code}  {seconds:6.2f}s")
    return 0 if result.status == "success" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
