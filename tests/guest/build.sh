#!/usr/bin/env bash
# Builds the tiny test guest from Debian packages into the cache, once per kernel version:
#   <cache>/guest/<kernel package>/vmlinuz     Debian's kernel
#   <cache>/guest/<kernel package>/initrd.img  busybox-static + the virtio/AHCI/CD-ROM/ISO 9660
#                                              modules + tests/guest/init
# The guest mounts the NoCloud seed (label cidata), prints its user-data and meta-data to the
# serial console, and asks for a DHCP lease on eth0. Prints the output directory.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${CAPL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cluster-api-provider-libvirt}"
resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
kpkg="$(resolve)"
if [ -z "$kpkg" ]; then
	apt-get update -qq >&2
	kpkg="$(resolve)"
fi
[ -n "$kpkg" ] || { echo "cannot resolve linux-image-amd64 (run apt-get update)" >&2; exit 1; }
key="$(sha256sum "$here/init" "$here/build.sh" | sha256sum | cut -c1-12)"
out="$cache/guest/$kpkg-$key"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
	echo "$out"
	exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download -q "$kpkg" busybox-static >&2
dpkg-deb -x "$kpkg"_*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox
kver="${kpkg#linux-image-}"
moddir="kernel/lib/modules/$kver"
# The package ships no modules.dep (depmod makes it at install time): make it here.
depmod -b "$work/kernel" "$kver"
root="$work/root"
mkdir -p "$root"/{bin,proc,sys,dev,mnt,tmp,run,etc} "$root/lib/modules/$kver"
cp busybox/bin/busybox "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod +x "$root/init" "$root/bin/busybox"
# The wanted modules and everything they depend on (modules.dep), uncompressed.
wanted="virtio_pci virtio_net virtio_blk ahci sr_mod isofs qemu_fw_cfg"
declare -A seen=()
queue=()
for m in $wanted; do
	path="$(awk -F: -v m="/$m.ko" 'index($1, m) && substr($1, length($1) - length(m) + 1) == m {print $0; exit}' "$moddir/modules.dep" || true)"
	[ -n "$path" ] && queue+=("$path")
done
deps=()
while [ ${#queue[@]} -gt 0 ]; do
	line="${queue[0]}"; queue=("${queue[@]:1}")
	mod="${line%%:*}"
	[ -n "${seen[$mod]:-}" ] && continue
	seen[$mod]=1
	deps+=("$mod")
	for d in ${line#*:}; do
		queue+=("$(grep -m1 "^$d:" "$moddir/modules.dep")")
	done
done
for mod in "${deps[@]}"; do
	mkdir -p "$root/lib/modules/$kver/$(dirname "$mod")"
	case "$mod" in
	*.xz) xz -dc "$moddir/$mod" >"$root/lib/modules/$kver/${mod%.xz}" ;;
	*) cp "$moddir/$mod" "$root/lib/modules/$kver/$mod" ;;
	esac
done
sed 's/\.ko\.xz/.ko/g' "$moddir/modules.dep" >"$root/lib/modules/$kver/modules.dep"
mkdir -p "$out"
cp kernel/boot/vmlinuz-"$kver" "$out/vmlinuz.tmp"
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 >"$out/initrd.img.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "$out"
