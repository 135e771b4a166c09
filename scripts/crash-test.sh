#!/usr/bin/env bash
# Crash consistency of the whole VM: kills the example VM with SIGKILL at random moments
# while the built-in guest's `crashload` workload writes and flushes disk 0, and after each
# kill checks the image with examples/crash-check.rs (every write the guest saw completed
# is there, as far as the cache mode promises) and, for qcow2, with `qemu-img check` (leaked
# clusters are allowed, corruption is not). Every format (raw, qcow2) and cache mode, ITERATIONS
# kills each (default 10). Prints a table of the counts; exits non-zero on any failure.
#
#   scripts/crash-test.sh [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")/.."

iterations=${1:-10}
[[ "$iterations" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [ITERATIONS]" >&2; exit 2; }
command -v qemu-img >/dev/null || { echo "crash-test: qemu-img is needed (qemu-utils)" >&2; exit 1; }

echo "crash-test: building" >&2
cargo build --release --quiet --example vm --example crash-check
target=${CARGO_TARGET_DIR:-target}
vm=$target/release/examples/vm
check=$target/release/examples/crash-check
work=$(mktemp -d /var/tmp/vmkit-crash.XXXXXX)
trap 'rm -rf "$work"' EXIT

failures=0
printf '| format | cache | kills | acknowledged writes | flushes seen | image checks failed | qemu-img check failed |\n'
printf '|---|---|---:|---:|---:|---:|---:|\n'
for format in raw qcow2; do
    for cache in writeback writethrough none directsync unsafe; do
        image=$work/disk.$format
        acked=0 flushed=0 bad=0 bad_qemu=0
        for ((i = 0; i < iterations; i++)); do
            rm -f "$image"
            qemu-img create -q -f "$format" "$image" 4M
            log=$work/console.log
            "$vm" run --disk "path=$image,format=$format,cache=$cache" --args crashload \
                >"$log" 2>"$work/vm.err" &
            pid=$!
            # Let the workload start, then kill it at a random moment 0.1-1.1 s later.
            for _ in $(seq 100); do grep -q '^W ' "$log" 2>/dev/null && break; sleep 0.05; done
            sleep "0.$((RANDOM % 10))$((RANDOM % 10))"
            sleep "0.$((RANDOM % 10))"
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            if ! out=$("$check" "$log" "$image" "$format" "$cache"); then
                bad=$((bad + 1))
                echo "crash-test: $format/$cache kill $i:" >&2
                echo "$out" | grep FAIL | head -5 >&2
            fi
            acked=$((acked + $(grep -c '^W ' "$log" || true)))
            flushed=$((flushed + $(grep -c '^F ' "$log" || true)))
            if [ "$format" = qcow2 ]; then
                # 0: clean, 3: leaked clusters only; anything else is corruption or an error.
                # -U: the killed VM's io_uring ring may still hold the image (and its lock)
                # for a moment while the kernel tears the ring down.
                code=0
                qemu-img check -U -q -f qcow2 "$image" >"$work/check.out" 2>&1 || code=$?
                if [ "$code" != 0 ] && [ "$code" != 3 ]; then
                    bad_qemu=$((bad_qemu + 1))
                    echo "crash-test: $format/$cache kill $i: qemu-img check exited $code:" >&2
                    head -5 "$work/check.out" >&2
                fi
            fi
        done
        failures=$((failures + bad + bad_qemu))
        printf '| %s | %s | %d | %d | %d | %d | %s |\n' "$format" "$cache" "$iterations" \
            "$acked" "$flushed" "$bad" "$([ "$format" = qcow2 ] && echo "$bad_qemu" || echo -)"
    done
done
if [ "$failures" -ne 0 ]; then
    echo "crash-test: $failures failed checks" >&2
    exit 1
fi
echo "crash-test: no acknowledged write lost, no corruption" >&2
