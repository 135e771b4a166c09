#!/usr/bin/env bash
# Prepares a real Linux guest for the example VM from Debian's packages: the cloud kernel
# (vmlinuz and the vmlinux inside it), a small initramfs (busybox-static and the virtio
# modules) whose init mounts the virtio disk, writes and reads a file and ends the VM, and
# that disk. See scripts/README-debian-guest.md.
#
#   scripts/prepare-debian-guest.sh [OUTDIR]      (default: target/debian-guest)
#
# Runs as any user on a Debian-like host (apt-get download and dpkg -x need no root). As
# root it installs the few tools it lacks (lz4, e2fsprogs, ...) and refreshes empty package
# lists, as scripts/test.sh does; as another user it stops and names what is missing.
# Running it again reuses what is already in OUTDIR.
set -euo pipefail

root_dir=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root_dir/target/debian-guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
start=$SECONDS

log() { echo "prepare-debian-guest: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}
is_root() { [ "$(id -u)" = 0 ]; }

# need COMMAND PACKAGE: installs PACKAGE when COMMAND is missing and we are root, else stops.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if is_root && command -v apt-get >/dev/null 2>&1; then
        log "installing $2 (for $1)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null ||
            die "could not install $2"
    else
        die "$1 is missing: install the $2 package (as root: apt-get install $2)"
    fi
}

# ELF64 x86-64 whose program headers' file contents all lie inside the file: lz4 stops
# with an error at the bzImage's trailing bytes, so a complete ELF is the real success test.
is_complete_elf() {
    local f=$1 phoff phnum i base off size end max=0
    [ -s "$f" ] || return 1
    [ "$(od -An -t x1 -N 5 "$f" | tr -d ' \n')" = 7f454c4602 ] || return 1
    [ "$(od -An -t u2 -j 18 -N 2 "$f" | tr -d ' ')" = 62 ] || return 1 # EM_X86_64
    phoff=$(od -An -t u8 -j 32 -N 8 "$f" | tr -d ' ')
    phnum=$(od -An -t u2 -j 56 -N 2 "$f" | tr -d ' ')
    [ "$phnum" -gt 0 ] || return 1
    for ((i = 0; i < phnum; i++)); do
        base=$((phoff + i * 56))
        off=$(od -An -t u8 -j $((base + 8)) -N 8 "$f" | tr -d ' ')
        size=$(od -An -t u8 -j $((base + 32)) -N 8 "$f" | tr -d ' ')
        [ -n "$off" ] && [ -n "$size" ] || return 1
        end=$((off + size))
        [ "$end" -gt "$max" ] && max=$end
    done
    [ "$(stat -c %s "$f")" -ge "$max" ]
}

if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    die "needs a Debian-like host (apt-get, apt-cache, dpkg)"
fi

# --- 1. The kernel package --------------------------------------------------------------
# linux-image-cloud-amd64 is a metapackage: its dependency names the current kernel, whose
# package holds the bzImage, the modules and the config.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    is_root || die "apt knows no linux-image-cloud-amd64: run apt-get update as root first"
    log "package lists are empty: apt-get update"
    apt-get update -qq
fi
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n 1 || true)
[ -n "$kpkg" ] || die "apt has no linux-image-cloud-amd64 naming a linux-image-*-cloud-amd64 (not Debian?)"
kver=${kpkg#linux-image-}
log "kernel: $kpkg"

# download PACKAGE: fetches its .deb into OUTDIR/debs once and prints its path.
download() {
    local debs=("$out/debs/$1"_*.deb)
    if [ ! -f "${debs[0]}" ]; then
        log "downloading $1"
        mkdir -p "$out/debs"
        # As root, apt warns that its sandbox user cannot write here: harmless.
        (cd "$out/debs" && apt-get download -q "$1" 2>&1 |
            grep -v '^W: Download is performed unsandboxed' >&2) || true
        debs=("$out/debs/$1"_*.deb)
        [ -f "${debs[0]}" ] || die "apt-get download $1 failed"
    fi
    echo "${debs[0]}"
}

kdeb=$(download "$kpkg")
# A newer kernel replaces the old one: drop its package (26 MB) and its tree.
find "$out/debs" -name 'linux-image-*.deb' ! -name "${kpkg}_*" -delete
if [ ! -f "$out/kernel/boot/vmlinuz-$kver" ]; then
    rm -rf "$out/kernel" "$out/kernel.tmp" # another version, or a half-done extraction
    dpkg -x "$kdeb" "$out/kernel.tmp"
    mv "$out/kernel.tmp" "$out/kernel"
fi
kconfig=$out/kernel/boot/config-$kver
moddir=$out/kernel/lib/modules/$kver

# --- 2. vmlinuz and vmlinux ---------------------------------------------------------------
# The bzImage boots through its own decompressor; the ELF vmlinux inside it is what an ELF
# (or PVH) loader wants. Debian compresses it with LZ4 (CONFIG_KERNEL_LZ4): the payload
# starts at an LZ4 legacy-frame magic, 02 21 4c 18. The magic may also occur by chance, so
# try each occurrence until one decompresses to a complete ELF (as Linux's
# scripts/extract-vmlinux does).
cmp -s "$out/kernel/boot/vmlinuz-$kver" "$out/vmlinuz" 2>/dev/null ||
    cp "$out/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
if [ -f "$out/vmlinux" ] && [ "$out/vmlinux" -nt "$out/vmlinuz" ] && is_complete_elf "$out/vmlinux"; then
    log "vmlinux: reusing $out/vmlinux"
else
    need lz4 lz4
    rm -f "$out/vmlinux"
    while read -r off; do
        # lz4 exits non-zero at the bytes after the frame; the ELF check decides.
        tail -c +$((off + 1)) "$out/vmlinuz" | lz4 -dc >"$out/vmlinux.tmp" 2>/dev/null || true
        if is_complete_elf "$out/vmlinux.tmp"; then
            mv "$out/vmlinux.tmp" "$out/vmlinux"
            break
        fi
    done < <(LC_ALL=C grep -obUaF $'\x02!L\x18' "$out/vmlinuz" | cut -d: -f1)
    rm -f "$out/vmlinux.tmp"
    [ -f "$out/vmlinux" ] || die "no LZ4 payload in $out/vmlinuz decompresses to an x86-64 ELF"
fi
banner=$(LC_ALL=C grep -a -m 1 -o 'Linux version [[:print:]]*' "$out/vmlinux" | head -n 1 || true)
[ -n "$banner" ] || die "$out/vmlinux has no \"Linux version\" string"
log "vmlinux: $banner"

# --- 3. initramfs -------------------------------------------------------------------------
# busybox-static gives a shell and every tool init needs in one static binary.
bdeb=$(download busybox-static)
if [ ! -x "$out/busybox-pkg/bin/busybox" ]; then
    rm -rf "$out/busybox-pkg"
    dpkg -x "$bdeb" "$out/busybox-pkg"
fi
busybox=$out/busybox-pkg/bin/busybox

# Debian's package does not ship modules.dep (depmod runs when it is installed); each
# module names the modules it needs in its .modinfo "depends=" field, from which
# modules.dep is made. modules.order maps module names to files; the package may compress
# modules (CONFIG_MODULE_COMPRESS_*), and busybox insmod does not decompress.
module_file() { # NAME -> path of its .ko[.xz|.zst|.gz], or nothing
    local rel f
    rel=$(awk -v n="$1" '{ b = $0; sub(/.*\//, "", b); sub(/\.ko.*/, "", b); gsub(/-/, "_", b);
                           if (b == n) { print; exit } }' "$moddir/modules.order")
    [ -n "$rel" ] || return 0
    rel=${rel%.ko*}.ko
    for f in "$moddir/$rel" "$moddir/$rel.xz" "$moddir/$rel.zst" "$moddir/$rel.gz"; do
        if [ -f "$f" ]; then
            echo "$f"
            return 0
        fi
    done
}
module_cat() { # FILE -> the uncompressed module on stdout
    case $1 in
    *.xz) need xz xz-utils && xz -dc "$1" ;;
    *.zst) need zstd zstd && zstd -dcq "$1" ;;
    *.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
    esac
}
module_is_builtin() { grep -q "/$1\.ko\$" "$moddir/modules.builtin" 2>/dev/null; }

# Depth-first: a module's dependencies come before it, which is the order insmod needs.
load_order=()
declare -A visited=()
visit() { # NAME REQUIRED
    local name=$1 required=$2 file deps dep
    [ -z "${visited[$name]:-}" ] || return 0
    visited[$name]=1
    file=$(module_file "$name")
    if [ -z "$file" ]; then
        if module_is_builtin "$name"; then
            log "module $name: built into the kernel"
            return 0
        fi
        [ "$required" = required ] || return 0
        die "module $name is neither in $kpkg's modules nor built in"
    fi
    deps=$(module_cat "$file" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n 1)
    for dep in ${deps//,/ }; do
        visit "$dep" required
    done
    load_order+=("$name")
}
for m in virtio virtio_ring virtio_pci virtio_mmio virtio_blk; do
    visit "$m" required
done
for m in virtio_pci_modern_dev virtio_pci_legacy_dev; do
    visit "$m" optional # split out of virtio_pci in newer kernels, absent in older ones
done
log "modules, in load order: ${load_order[*]}"

rootfs=$out/initramfs-root
rm -rf "$rootfs"
mkdir -p "$rootfs"/{bin,dev,proc,sys,mnt,lib/modules}
cp "$busybox" "$rootfs/bin/busybox"
ln -s busybox "$rootfs/bin/sh" # for init's #!; init installs the other applets
for m in "${load_order[@]}"; do
    module_cat "$(module_file "$m")" >"$rootfs/lib/modules/$m.ko"
done
printf '%s\n' "${load_order[@]}" >"$rootfs/lib/modules/load-order"

# The init: each step prints a "vmkit-guest:" line so a test can follow it on the serial
# console, and any failure prints "vmkit-guest: FAILED: ..." and ends the VM rather than
# leaving the kernel to panic or wait.
cat >"$rootfs/init" <<'EOF'
#!/bin/sh
# vmkit's Debian test guest (made by scripts/prepare-debian-guest.sh).
/bin/busybox --install -s /bin
export PATH=/bin
# The archive has no /dev/console (making a device node needs root), so the kernel started
# init without a console: open it once devtmpfs is mounted.
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

say() { echo "vmkit-guest: $*"; }
# The example VM has no ACPI power-off: with reboot=k on the command line, reboot -f resets
# through the i8042 controller, which ends the VM with a reported reason. poweroff -f there
# would fall through to "Attempted to kill init" and a panic. vmkit.poweroff chooses it
# anyway, for VMMs with ACPI S5 (QEMU).
end_vm() {
    sync
    say "ending the VM"
    if grep -qw vmkit.poweroff /proc/cmdline; then poweroff -f; fi
    reboot -f
}
fail() {
    say "FAILED: $*"
    end_vm
}

say "init started: kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime) s"
while read -r m; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
    say "loaded $m"
done </lib/modules/load-order

i=0
while [ ! -b /dev/vda ]; do
    [ "$i" -ge 100 ] && fail "no /dev/vda after 10 s"
    usleep 100000
    i=$((i + 1))
done
say "found /dev/vda: $(cat /sys/block/vda/size) sectors of 512 bytes"

mount /dev/vda /mnt || fail "mount /dev/vda /mnt"
say "mounted /dev/vda on /mnt"
[ -f /mnt/hello.txt ] && say "previous /mnt/hello.txt: $(cat /mnt/hello.txt)"
line="hello from vmkit's Debian guest: kernel $(uname -r), $(date -u '+%Y-%m-%d %H:%M:%S UTC'), uptime $(cut -d' ' -f1 /proc/uptime) s"
echo "$line" >/mnt/hello.txt || fail "write /mnt/hello.txt"
sync
content=$(cat /mnt/hello.txt) || fail "read /mnt/hello.txt"
[ "$content" = "$line" ] || fail "read back \"$content\", wrote \"$line\""
say "wrote and read /mnt/hello.txt: $content"
umount /mnt || fail "umount /mnt"
say "unmounted /mnt"

if grep -qw vmkit.shell /proc/cmdline; then
    say "vmkit.shell: starting a shell; exit it to end the VM"
    setsid cttyhack sh
fi
say "done"
end_vm
EOF
chmod 755 "$rootfs/init"

# busybox's own cpio writes the newc archive the kernel unpacks, so the host needs no cpio;
# -R 0:0 makes the files root's whoever runs this script.
(cd "$rootfs" && find . -mindepth 1 | LC_ALL=C sort |
    "$busybox" cpio -o -H newc -R 0:0 --ignore-devno --renumber-inodes 2>/dev/null) |
    gzip -9 -n >"$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
log "initramfs: $out/initramfs.cpio.gz"

# --- 4. The disk ----------------------------------------------------------------------------
# A 64 MiB ext2 filesystem the guest mounts (Debian's kernel mounts ext2 with its ext4
# driver). mke2fs writes into a plain file, so no root and no loop device.
need mke2fs e2fsprogs
if [ -f "$out/disk.img" ] && dumpe2fs -h "$out/disk.img" >/dev/null 2>&1; then
    log "disk: reusing $out/disk.img"
else
    rm -f "$out/disk.img"
    mke2fs -q -F -t ext2 -L vmkit-guest "$out/disk.img" 64M >/dev/null
    log "disk: $out/disk.img (64 MiB, ext2)"
fi

# --- 5. How to boot it ----------------------------------------------------------------------
show=${out#"$root_dir"/} # relative to the repository, where cargo runs
[ "$show" != "$out" ] || show=$out
cmdline="console=ttyS0 reboot=k panic=1"
log "done in $((SECONDS - start)) s:"
ls -l "$out/vmlinuz" "$out/vmlinux" "$out/initramfs.cpio.gz" "$out/disk.img" >&2
echo
echo "Boot it (from $root_dir, on a host with hardware virtualization):"
echo
echo "  cargo run --release --example vm -- run --kernel $show/vmlinux --initrd $show/initramfs.cpio.gz --cmdline \"$cmdline virtio_mmio.device=4K@0xd0000000:5\" --disk path=$show/disk.img --memory 512M"
# virtio_mmio.device= exists only with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; without it the
# kernel cannot find a virtio-mmio disk (no device tree, no ACPI entry), but it scans PCI.
if ! grep -q '^CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y' "$kconfig"; then
    echo
    echo "This kernel ($kver) is built without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so it ignores"
    echo "virtio_mmio.device= and finds no virtio-mmio disk. Attach the disk over virtio-pci instead:"
    echo
    echo "  cargo run --release --example vm -- run --kernel $show/vmlinux --initrd $show/initramfs.cpio.gz --cmdline \"$cmdline\" --disk path=$show/disk.img --transport pci --memory 512M"
fi
echo
echo "The console shows \"vmkit-guest: wrote and read /mnt/hello.txt: ...\" and the VM ends with"
echo "the kernel's reset (add vmkit.shell to the command line for a shell first)."
