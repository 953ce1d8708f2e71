# Sourced by each stage of the shell driver: where the image is and what the job's machine is
# called. Settings come from the runner's environment (config.toml `environment` or the
# emulator's process env):
#   SHELL_DRIVER_ROOT     state root holding images/IMAGE (required)
#   SHELL_DRIVER_IMAGE    image name under ROOT/images (default bookworm)
#   SHELL_DRIVER_BACKEND  btrfs (nspawn -x: a snapshot) or overlay (--overlay, since -x copies
#                         the whole tree on other file systems); default btrfs
root=${SHELL_DRIVER_ROOT:-}
image=$root/images/${SHELL_DRIVER_IMAGE:-bookworm}
backend=${SHELL_DRIVER_BACKEND:-btrfs}
system_failure=${SYSTEM_FAILURE_EXIT_CODE:-2}
build_failure=${BUILD_FAILURE_EXIT_CODE:-1}

fail() {
    echo "shell-driver: $*" >&2
    exit "$system_failure"
}

[ -n "$root" ] || fail "SHELL_DRIVER_ROOT is not set: set it to the state root that holds images/"
# The blog series' driver names the machine after the job id. A production driver takes the id
# from $JOB_RESPONSE_FILE (job variables can be changed by the job's author) and adds a
# runner-unique part; here the id is checked to be a number, so it can only pick another job
# number's name.
job=${CUSTOM_ENV_CI_JOB_ID:-}
case $job in
    '' | *[!0-9]*) fail "CUSTOM_ENV_CI_JOB_ID is not a job id: '$job' (is this run by gitlab-runner?)" ;;
esac
name=sd-$job
unit=shell-driver-$name
# The overlay's upper directory; nspawn puts its work directory next to it, so both sit in one
# directory per job that cleanup removes.
layer=$root/shell-overlays/$name
