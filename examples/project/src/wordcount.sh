#!/bin/bash
# Counts words of a file: one line per word, most frequent first.
set -euo pipefail
file=${1:?usage: wordcount.sh FILE}
tr -cs '[:alpha:]' '\n' < "$file" | tr '[:upper:]' '[:lower:]' | grep -v '^$' |
    sort | uniq -c | sort -k1,1nr -k2 | awk '{print $2, $1}'
