"""nspawn-runner: a GitLab Runner custom-executor driver for systemd-nspawn machines."""

__version__ = "0.1.0"
