#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ and runs each for SECONDS (default 60) on a copy
# of its committed seed corpus. Fails on any crash, timeout or out-of-memory; prints each
# target's executions and coverage (libFuzzer's final "#N DONE cov: X ft: Y ..." line).
#
#   scripts/fuzz.sh [SECONDS]
#
# Work corpora and crash artifacts go to target/fuzz/<target>/ (not committed); a crash
# input found there belongs in the crate's tests/fuzz_regressions.rs.
set -euo pipefail

seconds="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

targets=$(cargo +nightly fuzz list)
for target in $targets; do
    cargo +nightly fuzz build "$target"
done

work="$root/target/fuzz"
failed=()
summary=()
for target in $targets; do
    corpus="$work/$target/corpus"
    artifacts="$work/$target/artifacts/"
    log="$work/$target/fuzz.log"
    mkdir -p "$corpus" "$artifacts"
    cp -n "$root/fuzz/corpus/$target/"* "$corpus/" 2>/dev/null || true
    echo "=== $target: ${seconds}s ==="
    status=0
    # -error_exitcode / -timeout_exitcode: any crash, timeout or OOM ends the run non-zero.
    cargo +nightly fuzz run "$target" "$corpus" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="$artifacts" -print_final_stats=1 >"$log" 2>&1 || status=$?
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
    execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)
    if [ "$status" -ne 0 ] || [ -z "$done_line" ]; then
        failed+=("$target")
        summary+=("$target: FAILED (exit $status), see $log and $artifacts")
        grep -E 'ERROR: libFuzzer|SUMMARY|panicked|Test unit written' "$log" | head -n 10 || true
    else
        summary+=("$target: ${execs:-?} executions; $done_line")
    fi
done

echo
echo "=== summary (${seconds}s per target) ==="
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "failing targets: ${failed[*]}" >&2
    exit 1
fi
