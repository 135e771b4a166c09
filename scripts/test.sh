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
    echo "test.sh: /dev/kvm is not usable here: tests that need KVM will print SKIPPED" >&2
fi

# The built-in guest is built by the root package's build script; nothing else is needed yet.
cargo test --workspace "$@"
