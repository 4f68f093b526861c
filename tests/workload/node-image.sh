#!/usr/bin/env bash
# The Debian side of the Kubernetes node image (tests/support/node_image.rs drives it; run it
# through `tests/testbed node-image`, which builds every input first and caches the result).
#
#   node-image.sh rootfs DIR     a Debian 12 root filesystem (mmdebstrap, Debian's packages
#                                only): systemd, cloud-init, runc, conntrack, iptables, socat,
#                                Debian's generic kernel and CNI plugins; plus the Go-built kubeadm,
#                                kubelet, crictl and containerd 2.x named by the environment
#                                (CAPL_KUBEADM, CAPL_KUBELET, CAPL_CRICTL, CAPL_CONTAINERD_DIR)
#                                and their configuration (systemd units, containerd's CRI with
#                                the sandbox image CAPL_PAUSE_IMAGE, kernel modules, sysctls,
#                                cloud-init reading only NoCloud)
#   node-image.sh iptables DIR ROOTFS
#                                the iptables (nft) tools of ROOTFS and their shared libraries,
#                                laid out under DIR (what kube-proxy's image needs)
#   node-image.sh disk ROOTFS OUT.qcow2
#                                a bootable disk: an MBR with SYSLINUX on a FAT boot partition
#                                (ROOTFS's kernel and initrd) and the ext4 root (ROOTFS), which
#                                cloud-init grows to the machine's root volume at first boot
#
# Installs mmdebstrap, syslinux, mtools, dosfstools, fdisk and e2fsprogs when missing.
set -euo pipefail

log() { printf '[node-image] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

SUITE=bookworm
MIRRORS=(
	"deb http://deb.debian.org/debian $SUITE main"
	"deb http://deb.debian.org/debian $SUITE-updates main"
	"deb http://deb.debian.org/debian-security $SUITE-security main"
)
# Everything a kubeadm node needs from Debian. containerd is not among them: Debian 12's is 1.6,
# and a 1.36 kubelet needs 2.x (the bed's own build goes in instead). The generic kernel, not the
# cloud one: the cloud kernel has no AHCI driver, so it never sees the NoCloud seed, which
# libvirt attaches as a SATA CD-ROM.
PACKAGES=(
	systemd systemd-sysv systemd-resolved udev dbus
	linux-image-amd64 initramfs-tools
	cloud-init cloud-guest-utils e2fsprogs
	runc conntrack iptables socat ethtool iproute2 kmod
	containernetworking-plugins ca-certificates procps util-linux netbase
)
# The file system label the kernel command line and fstab name the root by.
ROOT_LABEL=capl-root

need_packages() {
	local missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return
	log "installing ${missing[*]}"
	local sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	export DEBIAN_FRONTEND=noninteractive
	$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
		{ $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; }
}

# write FILE MODE: stdin into FILE (parents made).
write() {
	mkdir -p "$(dirname "$1")"
	cat >"$1"
	chmod "$2" "$1"
}

rootfs() {
	local dir="$1"
	: "${CAPL_KUBEADM:?}" "${CAPL_KUBELET:?}" "${CAPL_CRICTL:?}" "${CAPL_CONTAINERD_DIR:?}" "${CAPL_PAUSE_IMAGE:?}"
	[ "$(id -u)" -eq 0 ] || die "building the root file system needs root (mmdebstrap --mode=root)"
	need_packages mmdebstrap
	rm -rf "$dir"
	local packages
	packages="$(IFS=,; echo "${PACKAGES[*]}")"
	log "mmdebstrap $SUITE ($packages)"
	mmdebstrap --quiet --variant=minbase --mode=root --format=directory \
		--include="$packages" "$SUITE" "$dir" "${MIRRORS[@]}" >&2

	install -m 0755 "$CAPL_KUBEADM" "$dir/usr/bin/kubeadm"
	install -m 0755 "$CAPL_KUBELET" "$dir/usr/bin/kubelet"
	install -m 0755 "$CAPL_CRICTL" "$dir/usr/bin/crictl"
	for b in containerd containerd-shim-runc-v2 ctr; do
		install -m 0755 "$CAPL_CONTAINERD_DIR/$b" "$dir/usr/local/bin/$b"
	done

	# containerd 2.x's CRI: systemd cgroups (the guest is cgroup v2 under systemd, kubeadm's
	# kubelet default), Debian's runc and CNI plugins, the pre-imported sandbox image. The pods'
	# network is a bridge on the node's podCIDR: containerd writes the CNI config from the
	# template once the kubelet reports the podCIDR the controller manager allocated.
	write "$dir/etc/containerd/config.toml" 0644 <<TOML
version = 3

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$CAPL_PAUSE_IMAGE"

[plugins."io.containerd.cri.v1.runtime"]
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "/etc/cni/net.d"
    conf_template = "/etc/containerd/cni.conflist.template"
TOML
	write "$dir/etc/containerd/cni.conflist.template" 0644 <<'JSON'
{
  "cniVersion": "1.0.0",
  "name": "pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [{{range $i, $range := .PodCIDRRanges}}{{if $i}}, {{end}}[{"subnet": "{{$range}}"}]{{end}}],
        "routes": [{{range $i, $route := .Routes}}{{if $i}}, {{end}}{"dst": "{{$route}}"}{{end}}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
JSON
	write "$dir/etc/systemd/system/containerd.service" 0644 <<'UNIT'
[Unit]
Description=containerd container runtime
After=network.target local-fs.target

[Service]
ExecStartPre=-/sbin/modprobe overlay
ExecStart=/usr/local/bin/containerd
Type=notify
Delegate=yes
KillMode=process
Restart=always
RestartSec=5
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
OOMScoreAdjust=-999

[Install]
WantedBy=multi-user.target
UNIT
	# The kubelet as kubeadm drives it: kubeadm writes /var/lib/kubelet/config.yaml and
	# kubeadm-flags.env, then (re)starts the unit.
	write "$dir/etc/systemd/system/kubelet.service" 0644 <<'UNIT'
[Unit]
Description=kubelet: The Kubernetes Node Agent
Wants=network-online.target containerd.service
After=network-online.target containerd.service

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
StartLimitInterval=0
RestartSec=10

[Install]
WantedBy=multi-user.target
UNIT
	write "$dir/etc/systemd/system/kubelet.service.d/10-kubeadm.conf" 0644 <<'UNIT'
[Service]
Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf"
Environment="KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml"
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
EnvironmentFile=-/etc/default/kubelet
ExecStart=
ExecStart=/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
UNIT
	write "$dir/etc/crictl.yaml" 0644 <<'YAML'
runtime-endpoint: unix:///run/containerd/containerd.sock
image-endpoint: unix:///run/containerd/containerd.sock
YAML
	write "$dir/etc/modules-load.d/kubernetes.conf" 0644 <<'EOT'
overlay
br_netfilter
EOT
	write "$dir/etc/sysctl.d/90-kubernetes.conf" 0644 <<'EOT'
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
EOT
	# NoCloud is the provider's datasource: probing the others costs minutes of timeouts. No
	# locale to generate (the image has C.UTF-8 only) and no SSH host keys (no SSH server).
	write "$dir/etc/cloud/cloud.cfg.d/90-capl.cfg" 0644 <<'YAML'
datasource_list: [NoCloud, None]
manage_etc_hosts: true
locale: C.UTF-8
ssh_genkeytypes: []
YAML
	write "$dir/etc/fstab" 0644 <<EOT
LABEL=$ROOT_LABEL / ext4 defaults,discard 0 1
EOT
	# Every machine gets its own identity at first boot.
	: >"$dir/etc/machine-id"
	rm -f "$dir/var/lib/dbus/machine-id" "$dir/etc/hostname"
	printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$dir/etc/hosts"
	chroot "$dir" systemctl enable --quiet containerd.service kubelet.service \
		systemd-networkd.service systemd-resolved.service >&2
	# Nothing a node needs that costs boot time under emulation.
	chroot "$dir" systemctl mask --quiet e2scrub_reap.service apt-daily.timer \
		apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer >&2 || true
	rm -rf "$dir/var/cache/apt/"* "$dir/var/lib/apt/lists/"*
	log "root file system: $(du -sh "$dir" | cut -f1)"
}

# The nft iptables tools of a root file system, with their extensions and shared libraries.
iptables_tree() {
	local out="$1" root="$2"
	rm -rf "$out"
	mkdir -p "$out/usr/sbin"
	cp -a "$root/usr/sbin/xtables-nft-multi" "$out/usr/sbin/"
	for tool in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
		ln -s xtables-nft-multi "$out/usr/sbin/$tool"
	done
	local ext
	ext="$(cd "$root" && echo usr/lib/*-linux-gnu/xtables)"
	mkdir -p "$out/$ext"
	cp -a "$root/$ext/." "$out/$ext/"
	# The shared libraries of the tool and its extensions, as the root's loader resolves them.
	local libs
	libs="$(chroot "$root" sh -c "ldd /usr/sbin/xtables-nft-multi /$ext/*.so" |
		awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}' | sort -u)"
	for lib in $libs; do
		local real
		real="$(chroot "$root" readlink -f "$lib")"
		mkdir -p "$out$(dirname "$lib")" "$out$(dirname "$real")"
		cp -a "$root$real" "$out$real"
		[ "$lib" = "$real" ] || ln -sf "$real" "$out$lib"
	done
	# Merged /usr: the loader's path (/lib64) and the libraries' (/lib) are links into /usr.
	for link in lib lib64; do
		[ -L "$root/$link" ] && cp -a "$root/$link" "$out/$link"
	done
	mkdir -p "$out/etc" "$out/run"
	true
}

disk() {
	local root="$1" out="$2"
	need_packages syslinux syslinux-common mtools dosfstools fdisk e2fsprogs
	local kernel initrd
	kernel="$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n 1)"
	initrd="$(ls "$root"/boot/initrd.img-* | sort -V | tail -n 1)"
	local work
	work="$(mktemp -d "$(dirname "$out")/disk.XXXXXX")"
	trap 'rm -rf "$work"' RETURN
	local mib=$((1024 * 1024)) boot_mib=128
	# The root: what the tree holds plus a third, at least 1 GiB free (cloud-init grows it to the
	# machine's root volume at first boot).
	local used_mib root_mib
	used_mib="$(du -sm "$root" | cut -f1)"
	root_mib=$((used_mib + used_mib / 3))
	[ $((root_mib - used_mib)) -ge 1024 ] || root_mib=$((used_mib + 1024))
	root_mib=$(((root_mib + 255) / 256 * 256))
	log "disk: boot ${boot_mib} MiB, root ${root_mib} MiB (${used_mib} MiB used)"

	# Boot partition: FAT with SYSLINUX, the kernel and initrd. Hidden sectors = its start, so
	# SYSLINUX finds itself on the partitioned disk.
	PATH="$PATH:/sbin:/usr/sbin" mkfs.vfat -n CAPLBOOT -h 2048 -C "$work/boot.img" $((boot_mib * 1024)) >/dev/null
	cat >"$work/syslinux.cfg" <<CFG
DEFAULT node
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL node
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND root=LABEL=$ROOT_LABEL rw console=tty0 console=ttyS0,115200 panic=30
CFG
	export MTOOLS_SKIP_CHECK=1
	cp "$kernel" "$work/vmlinuz"
	cp "$initrd" "$work/initrd.img"
	mcopy -i "$work/boot.img" "$work/vmlinuz" "$work/initrd.img" "$work/syslinux.cfg" ::/
	syslinux --install "$work/boot.img"

	# Root partition: ext4 made from the tree directly (no mount).
	PATH="$PATH:/sbin:/usr/sbin" mkfs.ext4 -q -L "$ROOT_LABEL" -d "$root" "$work/root.img" "${root_mib}M" >/dev/null

	local total=$((1 + boot_mib + root_mib))
	truncate -s $((total * mib)) "$work/disk.raw"
	PATH="$PATH:/sbin:/usr/sbin" sfdisk --quiet "$work/disk.raw" >&2 <<PT
label: dos
label-id: 0xca91ba5e
start=2048, size=$((boot_mib * 2048)), type=c, bootable
start=$(((1 + boot_mib) * 2048)), size=$((root_mib * 2048)), type=83
PT
	dd if=/usr/lib/syslinux/mbr/mbr.bin of="$work/disk.raw" bs=440 count=1 conv=notrunc status=none
	dd if="$work/boot.img" of="$work/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
	dd if="$work/root.img" of="$work/disk.raw" bs=1M seek=$((1 + boot_mib)) conv=notrunc,sparse status=none
	qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$out.tmp"
	mv "$out.tmp" "$out"
	log "disk: $(du -h "$out" | cut -f1) qcow2 ($total MiB virtual)"
}

case "${1:-}" in
rootfs) rootfs "${2:?rootfs DIR}" ;;
iptables) iptables_tree "${2:?iptables DIR ROOTFS}" "${3:?iptables DIR ROOTFS}" ;;
disk) disk "${2:?disk ROOTFS OUT}" "${3:?disk ROOTFS OUT}" ;;
*) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
