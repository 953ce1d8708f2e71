#!/bin/bash
# The project's tests: plain bash, results in test-results.txt (kept as an artifact).
set -uo pipefail
cd "$(dirname "$0")/.."
failures=0
check() {  # check NAME EXPECTED ACTUAL
    if [ "$2" = "$3" ]; then echo "ok   $1"; else echo "FAIL $1: expected '$2', got '$3'"; failures=$((failures + 1)); fi
}
{
    check "most frequent word" "job 3" "$(src/wordcount.sh src/words.txt | head -1)"
    check "lower case" "a 2" "$(src/wordcount.sh src/words.txt | grep '^a ')"
    check "words only" "0" "$(src/wordcount.sh src/words.txt | grep -c '[^a-z0-9 ]')"
} | tee test-results.txt
failures=$(grep -c '^FAIL' test-results.txt)
exit $(( failures > 0 ? 1 : 0 ))
