#!/usr/bin/env bash
# Compares the built-in guest's disk I/O with fio on the host: for randread and randwrite at
# depth 1 and 32, it runs the example VM with `--args "iobench=OP depth=N seconds=S"` on a
# raw image (cache=none, engine=io_uring) and fio on the same file with the same engine,
# depth, O_DIRECT, 4 KiB blocks and duration, alternating (VM, fio, VM, fio, ...), and prints
# each case's median IOPS and the ratio guest/fio as a markdown table.
set -euo pipefail
shopt -s inherit_errexit

usage() {
    cat <<'EOF'
usage: scripts/guest-io-bench.sh [options]

  --dir DIR         where the test image goes (default: a new directory under /var/tmp;
                    must support O_DIRECT, so not tmpfs)
  --size SIZE       image size, fully allocated: 1G (default), 512M, ... (suffix K, M or G)
  --seconds S       duration of one run, whole seconds (default 5)
  --rounds N        runs per tool and case; the median is reported (default 3)
  --keep            keep the image (reused by the next run with the same --dir and --size)
  -h, --help        print this help

Needs /dev/kvm and cargo; fio is installed with apt-get when missing and running as root,
otherwise its column is skipped. Progress goes to stderr, the table to stdout.
EOF
}

die() {
    echo "guest-io-bench: $*" >&2
    exit 1
}

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=""
size=1G
seconds=5
rounds=3
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir=${2:?--dir needs a value}; shift ;;
        --size) size=${2:?--size needs a value}; shift ;;
        --seconds) seconds=${2:?--seconds needs a value}; shift ;;
        --rounds) rounds=${2:?--rounds needs a value}; shift ;;
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done

[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer, not '$rounds'"
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] && [ "$seconds" -le 3600 ] ||
    die "--seconds must be a whole number of seconds from 1 to 3600, not '$seconds'"
[[ "$size" =~ ^([1-9][0-9]*)([KMG])$ ]] || die "--size must be like 1G or 512M, not '$size'"
case "${BASH_REMATCH[2]}" in
    K) bytes=$((BASH_REMATCH[1] << 10)) ;;
    M) bytes=$((BASH_REMATCH[1] << 20)) ;;
    G) bytes=$((BASH_REMATCH[1] << 30)) ;;
esac
[ $((bytes % 4096)) = 0 ] && [ "$bytes" -ge $((1 << 20)) ] ||
    die "--size must be a multiple of 4 KiB and at least 1M"

command -v cargo >/dev/null || die "cargo is not installed"
[ -r /dev/kvm ] && [ -w /dev/kvm ] || die "/dev/kvm is missing or not accessible: the VM cannot run"

use_fio=1
if ! command -v fio >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        echo "guest-io-bench: installing fio" >&2
        apt-get install -y fio >/dev/null 2>&1 ||
            { apt-get update >/dev/null 2>&1 && apt-get install -y fio >/dev/null 2>&1; } ||
            echo "guest-io-bench: could not install fio; the fio column is skipped" >&2
    else
        echo "guest-io-bench: fio is not installed and this is not root; the fio column is skipped" >&2
    fi
    command -v fio >/dev/null || use_fio=0
fi

echo "guest-io-bench: building the example VM" >&2
(cd "$repo" && cargo build --quiet --release --example vm) || die "building the example VM failed"
target_dir=${CARGO_TARGET_DIR:-$repo/target}
case "$target_dir" in /*) ;; *) target_dir=$repo/$target_dir ;; esac
vm=$target_dir/release/examples/vm
[ -x "$vm" ] || die "built VM not found at $vm"

# The image: fully written (no holes, so reads hit the disk, not the filesystem's zero
# fill), on a filesystem that supports O_DIRECT.
created_dir=0
if [ -z "$dir" ]; then
    dir=$(mktemp -d /var/tmp/vmkit-guest-io-bench.XXXXXX)
    created_dir=1
else
    mkdir -p "$dir" || die "cannot create $dir"
fi
fstype=$(findmnt -no FSTYPE -T "$dir" 2>/dev/null || stat -f -c %T "$dir")
[ "$fstype" != tmpfs ] || die "$dir is on tmpfs, which has no O_DIRECT; choose another --dir"
file=$dir/guest-io-bench-$size.img
cleanup() {
    if [ "$keep" = 0 ]; then
        rm -f "$file"
        if [ "$created_dir" = 1 ]; then rmdir "$dir" 2>/dev/null || true; fi
    fi
}
trap cleanup EXIT
if [ -f "$file" ] && [ "$(stat -c %s "$file")" = "$bytes" ] &&
    [ $(($(stat -c %b "$file") * $(stat -c %B "$file"))) -ge "$bytes" ]; then
    echo "guest-io-bench: reusing $file" >&2
else
    echo "guest-io-bench: writing a $size image in $dir ($fstype)" >&2
    rm -f "$file"
    dd if=/dev/urandom of="$file" bs=1M count=$((bytes >> 20)) conv=fsync status=none ||
        die "cannot write $file"
    if [ $((bytes % (1 << 20))) != 0 ]; then
        dd if=/dev/urandom of="$file" bs=4096 seek=$(((bytes >> 20) << 8)) \
            count=$(((bytes % (1 << 20)) / 4096)) conv=fsync,notrunc status=none ||
            die "cannot write $file"
    fi
fi

# The guest's IOPS for OP at DEPTH (the VM's output must end in `all tests passed`).
guest_iops() { # OP DEPTH
    local out rc=0 iops
    out=$("$vm" run --disk "path=$file,cache=none,engine=io_uring" \
        --args "iobench=$1 depth=$2 seconds=$seconds" 2>&1) || rc=$?
    [ "$rc" = 0 ] || die "the VM (iobench=$1 depth=$2) failed with exit status $rc:"$'\n'"$out"
    iops=$(sed -n "s/^iobench: $1 depth $2: [0-9]* requests in [0-9.]* s = \([0-9]*\) IOPS\$/\1/p" <<<"$out")
    [ -n "$iops" ] || die "the VM printed no IOPS line for iobench=$1 depth=$2:"$'\n'"$out"
    echo "$iops"
}

# fio's IOPS for OP at DEPTH: io_uring, O_DIRECT, 4 KiB, time-based. Batched like the guest
# (which resubmits every completion it finds in one refill): fio submits up to DEPTH
# requests per io_uring_enter and reaps at least a quarter of them per wait.
fio_iops() { # OP DEPTH
    local out field=8
    [ "$1" = randwrite ] && field=49
    local batch=(--iodepth_batch_submit="$2" --iodepth_batch_complete_min=$(($2 / 4 > 1 ? $2 / 4 : 1)))
    if ! out=$(fio --name=ref --filename="$file" --ioengine=io_uring --direct=1 --rw="$1" \
        --bs=4k --iodepth="$2" "${batch[@]}" --runtime="${seconds}s" --time_based \
        --randrepeat=1 --norandommap --output-format=terse --terse-version=3 2>&1); then
        die "fio --rw=$1 --iodepth=$2 failed:"$'\n'"$out"
    fi
    out=$(awk -F';' -v f="$field" '$1 == "3" { printf "%.0f", $f }' <<<"$out")
    [ -n "$out" ] || die "fio --rw=$1 --iodepth=$2 printed no IOPS"
    echo "$out"
}

median() {
    tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 }
        END { if (NR % 2) printf "%.0f\n", v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

rows=()
for op in randread randwrite; do
    for depth in 1 32; do
        guest=""
        host=""
        for round in $(seq "$rounds"); do
            g=$(guest_iops "$op" "$depth")
            guest+=" $g"
            f=-
            if [ "$use_fio" = 1 ]; then
                f=$(fio_iops "$op" "$depth")
                host+=" $f"
            fi
            echo "guest-io-bench: $op depth $depth round $round: guest $g IOPS, fio $f IOPS" >&2
        done
        guest_med=$(median <<<"$guest")
        if [ "$use_fio" = 1 ]; then
            host_med=$(median <<<"$host")
            ratio=$(awk -v a="$guest_med" -v b="$host_med" 'BEGIN { printf "%.2f", a / b }')
        else
            host_med=-
            ratio=-
        fi
        rows+=("| $op depth $depth | $guest_med | $host_med | $ratio |")
    done
done

echo
echo "Built-in guest (iobench, cache=none, engine=io_uring) vs fio on the host (io_uring," \
    "direct=1): 4 KiB random requests on a $size raw image ($fstype), ${seconds} s per run," \
    "median of $rounds; $(fio --version 2>/dev/null || echo 'no fio'); kernel $(uname -r)"
echo
echo "| case | guest IOPS | host fio IOPS | guest/fio |"
echo "|---|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
