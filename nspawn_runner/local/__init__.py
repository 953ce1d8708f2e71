"""Developer commands: `exec` (a .gitlab-ci.yml job through the real stages, locally) and
`shell` (a command in a build image as the calling user). ci_* modules resolve a
.gitlab-ci.yml the way GitLab does; sources.py says what the local repository provides."""
