#!/usr/bin/env bash
# Builds a bootable raw disk image of the test guest (tests/guest/build.sh) into the cache, once
# per guest build:
#   <cache>/guest/<kernel package>-<key>/disk.img
# The image is a FAT "superfloppy" (a FAT file system over the whole disk, no partition table)
# with SYSLINUX in its boot sector: SeaBIOS boots it like any root disk, SYSLINUX loads the
# guest's kernel and initrd with `console=ttyS0`. Machines made by the controllers boot their root
# disk (the API has no direct kernel boot), so this is what they start from.
# Installs syslinux, mtools and dosfstools when missing. Prints the image's path.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
guest="$("$here/build.sh")"
key="$(sha256sum "$here/disk.sh" | cut -c1-12)"
img="$guest/disk-$key.img"
if [ -s "$img" ]; then
	echo "$img"
	exit 0
fi

missing=()
for p in syslinux mtools dosfstools; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	echo "[disk.sh] installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
		{ $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; }
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# 64 MiB: the kernel and initrd fit with room; the root disk made from it is larger anyway.
PATH="$PATH:/sbin:/usr/sbin" mkfs.vfat -n CAPLGUEST -C "$work/disk.img" 65536 >&2
syslinux --install "$work/disk.img"
cat >"$work/syslinux.cfg" <<'EOF'
DEFAULT guest
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL guest
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND console=ttyS0 panic=-1
EOF
export MTOOLS_SKIP_CHECK=1
mcopy -i "$work/disk.img" "$guest/vmlinuz" "$guest/initrd.img" "$work/syslinux.cfg" ::/
mv "$work/disk.img" "$img.tmp"
mv "$img.tmp" "$img"
echo "$img"
