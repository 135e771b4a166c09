#!/usr/bin/env bash
# Compares vmkit's block backend with QEMU's: runs examples/blkbench and `qemu-img bench`
# with the same flags on the same file, alternating (ours, QEMU, ours, QEMU, ...), and
# prints each case's median requests/s and the ratio ours/QEMU as a markdown table. For
# cache=none cases it also runs fio (io_uring, O_DIRECT, same depth) as the device's limit.
# With --formats raw,qcow2 the same cases also run on a fully allocated qcow2 copy of the
# file, and a qcow2/raw column compares ours on qcow2 with ours on raw.
#
# Each tool gets its own request count, calibrated so that one run lasts about --seconds:
# the tools differ by up to 50x in some cases, and a count that suits one would make the
# other's run far too short or too long to measure.
set -euo pipefail
shopt -s inherit_errexit

usage() {
    cat <<'EOF'
usage: scripts/blkbench-compare.sh [options]

  --dir DIR         where the 1 GiB test file goes (default: a new directory under
                    /var/tmp; must support O_DIRECT, so not tmpfs)
  --keep            keep the test file (reused by the next run with the same --dir)
  --rounds N        runs per tool and case; the median is reported (default 3)
  --seconds S       target duration of one run (default 1.5)
  --ops LIST        read,write                  (default both)
  --depths LIST     1,32                        (default both)
  --caches LIST     none,writeback              (default both)
  --engines LIST    io_uring,threads            (default both)
  --formats LIST    raw,qcow2                   (default raw; qcow2 cases run on a
                    fully allocated qcow2 copy of the file)
  --quick           1 round, depth 32, io_uring only (unless given explicitly)
  --no-fio          skip the fio reference runs
  -h, --help        print this help

The lists may also come from the environment: BLKBENCH_DIR, BLKBENCH_ROUNDS,
BLKBENCH_SECONDS, BLKBENCH_OPS, BLKBENCH_DEPTHS, BLKBENCH_CACHES, BLKBENCH_ENGINES,
BLKBENCH_FORMATS.
Progress goes to stderr, the table to stdout.
EOF
}

die() {
    echo "blkbench-compare: $*" >&2
    exit 1
}

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${BLKBENCH_DIR:-}
rounds=${BLKBENCH_ROUNDS:-}
seconds=${BLKBENCH_SECONDS:-1.5}
ops=${BLKBENCH_OPS:-}
depths=${BLKBENCH_DEPTHS:-}
caches=${BLKBENCH_CACHES:-}
engines=${BLKBENCH_ENGINES:-}
formats=${BLKBENCH_FORMATS:-raw}
keep=0
quick=0
use_fio=1
file_mib=1024
block_size=4096
pattern=0xa5

while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir=${2:?--dir needs a value}; shift ;;
        --keep) keep=1 ;;
        --rounds) rounds=${2:?--rounds needs a value}; shift ;;
        --seconds) seconds=${2:?--seconds needs a value}; shift ;;
        --ops) ops=${2:?--ops needs a value}; shift ;;
        --depths) depths=${2:?--depths needs a value}; shift ;;
        --caches) caches=${2:?--caches needs a value}; shift ;;
        --engines) engines=${2:?--engines needs a value}; shift ;;
        --formats) formats=${2:?--formats needs a value}; shift ;;
        --quick) quick=1 ;;
        --no-fio) use_fio=0 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done

if [ "$quick" = 1 ]; then
    rounds=${rounds:-1}
    depths=${depths:-32}
    engines=${engines:-io_uring}
fi
rounds=${rounds:-3}
ops=${ops:-read,write}
depths=${depths:-1,32}
caches=${caches:-none,writeback}
engines=${engines:-io_uring,threads}

[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer, not '$rounds'"
[[ "$seconds" =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v s="$seconds" 'BEGIN { exit !(s >= 0.5) }' ||
    die "--seconds must be a number of at least 0.5 (qemu-img prints milliseconds), not '$seconds'"
for op in ${ops//,/ }; do
    [[ "$op" =~ ^(read|write)$ ]] || die "unknown op '$op' (read, write)"
done
for depth in ${depths//,/ }; do
    [[ "$depth" =~ ^[1-9][0-9]*$ ]] || die "depths must be positive integers, not '$depth'"
done
for cache in ${caches//,/ }; do
    [[ "$cache" =~ ^(none|writeback|writethrough|directsync|unsafe)$ ]] || die "unknown cache mode '$cache'"
done
for engine in ${engines//,/ }; do
    [[ "$engine" =~ ^(io_uring|threads)$ ]] || die "unknown engine '$engine' (io_uring, threads)"
done
for format in ${formats//,/ }; do
    [[ "$format" =~ ^(raw|qcow2)$ ]] || die "unknown format '$format' (raw, qcow2)"
done
# Only raw: the table keeps its original columns.
multi_format=0
[ "$formats" = raw ] || multi_format=1

command -v qemu-img >/dev/null || die "qemu-img is not installed (apt-get install qemu-utils)"
command -v cargo >/dev/null || die "cargo is not installed"

if [ "$use_fio" = 1 ] && ! command -v fio >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        echo "blkbench-compare: installing fio for the device-limit reference" >&2
        apt-get install -y fio >/dev/null 2>&1 ||
            { apt-get update >/dev/null 2>&1 && apt-get install -y fio >/dev/null 2>&1; } ||
            echo "blkbench-compare: could not install fio; fio columns are skipped" >&2
    else
        echo "blkbench-compare: fio is not installed and this is not root; fio columns are skipped" >&2
    fi
    command -v fio >/dev/null || use_fio=0
fi

echo "blkbench-compare: building blkbench" >&2
(cd "$repo" && cargo build --quiet --release --example blkbench) || die "building blkbench failed"
target_dir=${CARGO_TARGET_DIR:-$repo/target}
case "$target_dir" in /*) ;; *) target_dir=$repo/$target_dir ;; esac
blkbench=$target_dir/release/examples/blkbench
[ -x "$blkbench" ] || die "built blkbench not found at $blkbench"

# The test file: fully written (no holes), on a filesystem that supports O_DIRECT.
created_dir=0
if [ -z "$dir" ]; then
    dir=$(mktemp -d /var/tmp/vmkit-blkbench.XXXXXX)
    created_dir=1
else
    mkdir -p "$dir" || die "cannot create $dir"
fi
fstype=$(findmnt -no FSTYPE -T "$dir" 2>/dev/null || stat -f -c %T "$dir")
[ "$fstype" != tmpfs ] || die "$dir is on tmpfs: O_DIRECT there measures memory, not a disk; choose another --dir"
file=$dir/blkbench-${file_mib}m.img
qcow2_file=$dir/blkbench-${file_mib}m.qcow2
cleanup() {
    if [ "$keep" = 0 ]; then
        rm -f "$file" "$qcow2_file"
        if [ "$created_dir" = 1 ]; then rmdir "$dir" 2>/dev/null || true; fi
    fi
}
trap cleanup EXIT
bytes=$((file_mib << 20))
if [ -f "$file" ] && [ "$(stat -c %s "$file")" = "$bytes" ] &&
    [ $(($(stat -c %b "$file") * $(stat -c %B "$file"))) -ge "$bytes" ]; then
    echo "blkbench-compare: reusing $file" >&2
else
    echo "blkbench-compare: writing a ${file_mib} MiB test file in $dir ($fstype)" >&2
    dd if=/dev/urandom of="$file" bs=1M count="$file_mib" conv=fsync status=none ||
        die "cannot write $file"
    rm -f "$qcow2_file"
fi
if [[ ",$formats," == *,qcow2,* ]]; then
    if [ -f "$qcow2_file" ] && [ "$qcow2_file" -nt "$file" ] &&
        qemu-img compare -q -f raw -F qcow2 "$file" "$qcow2_file" 2>/dev/null; then
        echo "blkbench-compare: reusing $qcow2_file" >&2
    else
        # Every cluster allocated (the data is random: nothing reads as zeroes), 64 KiB
        # clusters, QEMU's defaults otherwise.
        echo "blkbench-compare: converting the test file to qcow2" >&2
        rm -f "$qcow2_file"
        qemu-img convert -f raw -O qcow2 "$file" "$qcow2_file" || die "cannot write $qcow2_file"
        sync "$qcow2_file"
    fi
fi
# The image the current case runs on, and its format.
image=$file
image_format=raw

# One run of our tool; prints "COUNT SECONDS 0" (the count it ran and the time it measured).
ours_run() { # COUNT FLAGS...
    local count=$1 out engine secs
    shift
    if ! out=$("$blkbench" --json -f "$image_format" -c "$count" "$@" "$image" 2>&1); then
        die "blkbench -c $count $* failed:"$'\n'"$out"
    fi
    engine=$(sed -n 's/.*"engine":"\([^"]*\)".*/\1/p' <<<"$out")
    if [[ " $* " == *" -i io_uring "* ]] && [ "$engine" != io_uring ]; then
        die "blkbench fell back from io_uring to $engine: $out"
    fi
    secs=$(sed -n 's/.*"seconds":\([0-9.eE+-]*\).*/\1/p' <<<"$out")
    [ -n "$secs" ] || die "blkbench printed no run time: $out"
    echo "$count $secs 0"
}

# One run of qemu-img bench; prints "COUNT SECONDS CRASHES". qemu-img 10.0 can overflow its
# stack when io_uring requests complete inline (page-cache hits at depth 1: defer_call_end
# recurses once per request) and dies with SIGSEGV; such a run is retried with half the count.
qemu_run() { # COUNT FLAGS...
    local count=$1 out rc crashes=0 secs
    shift
    while :; do
        rc=0
        out=$(qemu-img bench -f "$image_format" -c "$count" "$@" "$image" 2>&1) || rc=$?
        if [ "$rc" = 139 ] && [ "$crashes" -lt 4 ] && [ "$count" -ge 2000 ]; then
            crashes=$((crashes + 1))
            echo "blkbench-compare: qemu-img bench -c $count $* crashed (SIGSEGV);" \
                "retrying with -c $((count / 2))" >&2
            count=$((count / 2))
            continue
        fi
        [ "$rc" = 0 ] || die "qemu-img bench -c $count $* failed (exit $rc):"$'\n'"$out"
        break
    done
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' <<<"$out")
    [ -n "$secs" ] || die "qemu-img bench printed no run time: $out"
    echo "$count $secs $crashes"
}

# The request count that makes one run of TOOL last about $seconds: short runs first, each
# about 8x longer, until one lasts 0.2 s, then scaled up from that run's rate.
calibrate() { # TOOL FLAGS...
    local tool=$1 count=1000 secs result
    shift
    while :; do
        result=$("${tool}_run" "$count" "$@")
        read -r count secs _ <<<"$result"
        if awk -v s="$secs" 'BEGIN { exit !(s >= 0.2) }' || [ "$count" -ge 100000000 ]; then
            break
        fi
        # qemu-img prints milliseconds: a run under 1 ms reads as 0.000.
        count=$(awk -v c="$count" -v s="$secs" 'BEGIN {
            if (s < 0.001) s = 0.001; n = int(c * 0.25 / s); m = c * 8
            printf "%d", (n > m ? m : (n < c * 2 ? c * 2 : n)) }')
    done
    awk -v c="$count" -v s="$secs" -v t="$seconds" 'BEGIN {
        n = int(c * t / s); if (n < 1000) n = 1000; if (n > 2147483647) n = 2147483647
        printf "%d", n }'
}

# Requests per second of one run: "COUNT SECONDS ..." in, the rate out.
rate() {
    awk '{ if ($2 <= 0) exit 1; printf "%.0f", $1 / $2 }' <<<"$1" ||
        die "a run reported $1 (count, seconds): too short to measure"
}

median() {
    tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 }
        END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# fio's IOPS for OP at DEPTH with O_DIRECT on io_uring: what the device gives. Batched
# like the other two tools (which reap every ready completion and submit the follow-ups in
# one io_uring_enter): unbatched, fio submits one request per call, the block layer merges
# none of its sequential requests, and it reaches about half the rate.
fio_rate() { # OP DEPTH
    local out field=8
    [ "$1" = write ] && field=49
    local batch=(--iodepth_batch_submit="$2" --iodepth_batch_complete_min=$(($2 / 4 > 1 ? $2 / 4 : 1)))
    # fio truncates fractional seconds: give milliseconds.
    local runtime
    runtime=$(awk -v s="$seconds" 'BEGIN { printf "%dms", s * 1000 }')
    if ! out=$(fio --name=ref --filename="$file" --ioengine=io_uring --direct=1 --rw="$1" \
        --bs="$block_size" --iodepth="$2" "${batch[@]}" --runtime="$runtime" --time_based \
        --output-format=terse --terse-version=3 2>&1); then
        die "fio --rw=$1 --iodepth=$2 failed:"$'\n'"$out"
    fi
    awk -F';' -v f="$field" '$1 == "3" { printf "%.0f", $f }' <<<"$out"
}

# Page-cache state: writeback reads start from a cached file, writes from a clean one.
prepare() { # OP CACHE
    if [ "$1" = write ]; then
        sync "$image"
    elif [ "$2" != none ] && [ "$2" != directsync ]; then
        dd if="$image" of=/dev/null bs=1M status=none
    fi
}


declare -A fio_cache=()
declare -A raw_rate=()
rows=()
crash_note=0
total=0
for format in ${formats//,/ }; do
    for op in ${ops//,/ }; do for depth in ${depths//,/ }; do for cache in ${caches//,/ }; do
        for engine in ${engines//,/ }; do total=$((total + 1)); done
    done; done; done
done
n=0
for format in ${formats//,/ }; do
if [ "$format" = qcow2 ]; then image=$qcow2_file; else image=$file; fi
image_format=$format
for op in ${ops//,/ }; do
    for depth in ${depths//,/ }; do
        for cache in ${caches//,/ }; do
            for engine in ${engines//,/ }; do
                n=$((n + 1))
                flags=(-t "$cache" -i "$engine" -d "$depth" -s "$block_size")
                [ "$op" = write ] && flags+=(-w --pattern "$pattern")
                prepare "$op" "$cache"
                ours_count=$(calibrate ours "${flags[@]}")
                qemu_count=$(calibrate qemu "${flags[@]}")
                ours=""
                qemu=""
                mark=""
                for _ in $(seq "$rounds"); do
                    prepare "$op" "$cache"
                    ours+=" $(rate "$(ours_run "$ours_count" "${flags[@]}")")"
                    prepare "$op" "$cache"
                    result=$(qemu_run "$qemu_count" "${flags[@]}")
                    qemu+=" $(rate "$result")"
                    read -r _ _ crashes <<<"$result"
                    if [ "$crashes" != 0 ]; then
                        mark=" (crashed, rerun shorter)"
                        crash_note=1
                    fi
                done
                ours_med=$(median <<<"$ours")
                qemu_med=$(median <<<"$qemu")
                ratio=$(awk -v a="$ours_med" -v b="$qemu_med" 'BEGIN { printf "%.2f", a / b }')
                fio_col="-"
                fio_ratio="-"
                if [ "$use_fio" = 1 ] && [ "$cache" = none ]; then
                    key=$op/$depth
                    if [ -z "${fio_cache[$key]:-}" ]; then
                        runs=""
                        for _ in $(seq "$rounds"); do runs+=" $(fio_rate "$op" "$depth")"; done
                        fio_cache[$key]=$(median <<<"$runs")
                    fi
                    fio_col=$(printf '%.0f' "${fio_cache[$key]}")
                    fio_ratio=$(awk -v a="$ours_med" -v b="$fio_col" 'BEGIN { printf "%.2f", a / b }')
                fi
                printf '[%d/%d] %s %s d%s %s %s: ours%s (-c %s) | QEMU%s (-c %s) | fio %s\n' \
                    "$n" "$total" "$format" "$op" "$depth" "$cache" "$engine" "$ours" \
                    "$ours_count" "$qemu" "$qemu_count" "$fio_col" >&2
                if [ "$multi_format" = 0 ]; then
                    rows+=("| $op | $depth | $cache | $engine | $ours_med | $qemu_med$mark | $ratio | $fio_col | $fio_ratio |")
                else
                    key=$op/$depth/$cache/$engine
                    vs_raw="-"
                    if [ "$format" = raw ]; then
                        raw_rate[$key]=$ours_med
                    elif [ -n "${raw_rate[$key]:-}" ]; then
                        vs_raw=$(awk -v a="$ours_med" -v b="${raw_rate[$key]}" 'BEGIN { printf "%.2f", a / b }')
                    fi
                    rows+=("| $format | $op | $depth | $cache | $engine | $ours_med | $qemu_med$mark | $ratio | $vs_raw | $fio_col | $fio_ratio |")
                fi
            done
        done
    done
done
done

echo
echo "blkbench vs qemu-img bench: ${block_size}-byte requests on a ${file_mib} MiB file ($fstype)," \
    "median of $rounds, ~${seconds} s per run; $(qemu-img --version | head -1); kernel $(uname -r)"
if [ "$use_fio" = 0 ]; then
    echo "(no fio reference: --no-fio given or fio not installed)"
fi
if [ "$crash_note" = 1 ]; then
    echo "(crashed: qemu-img died with SIGSEGV in some runs, which were rerun with half the count)"
fi
echo
if [ "$multi_format" = 0 ]; then
    echo "| op | depth | cache | engine | ours req/s | QEMU req/s | ours/QEMU | fio req/s | ours/fio |"
    echo "|---|---:|---|---|---:|---:|---:|---:|---:|"
else
    echo "(qcow2: a fully allocated copy of the file, 64 KiB clusters; qcow2/raw is ours on qcow2 over ours on raw, same case)"
    echo
    echo "| format | op | depth | cache | engine | ours req/s | QEMU req/s | ours/QEMU | qcow2/raw | fio req/s | ours/fio |"
    echo "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"
fi
printf '%s\n' "${rows[@]}"
