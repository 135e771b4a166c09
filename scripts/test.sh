#!/usr/bin/env bash
# Runs every test of the workspace, as CI does. Installs what the tests need first, so a
# newcomer's run on a fresh machine is the same run as CI's.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo is not installed; install Rust with rustup first" >&2
    exit 1
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "test.sh: /dev/kvm is not usable here: tests that need KVM print SKIPPED and pass" >&2
fi

# QEMU's tools are the reference the block-backend tests compare against (open flags, image
# locks). Install them where we can; elsewhere those tests print SKIPPED.
if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing qemu-utils" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
    else
        echo "test.sh: qemu-utils is missing and cannot be installed here: QEMU interop tests print SKIPPED" >&2
    fi
fi

# The built-in guest is built by the root package's build script.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?

# One closing line for the whole run: the sum of every test binary's result line.
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed/) passed += $i
            if ($(i + 1) ~ /^failed/) failed += $i
            if ($(i + 1) ~ /^ignored/) ignored += $i
        }
     }
     END { printf "vmkit: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$log"
exit "$status"
