#!/usr/bin/env bash
# Installs everything the test bed needs, idempotently:
#   - Debian packages (libvirt, QEMU, dnsmasq, iptables, iproute2, pkg-config, ...);
#   - the real Kubernetes (apiserver, and for the bed's node: kubelet, kube-proxy, controller
#     manager, scheduler), containerd 2.x (daemon, runc shim, ctr), etcd, Helm and Cluster API
#     binaries, and the bed's pause program, built from the Go modules pinned in versions.env
#     (and tests/tools/pause) into a cache outside the clone, keyed by version. A second run is a
#     no-op.
# With `--workload`, also what the workload node image needs (tests/workload/node-image.sh):
# kubeadm, crictl and CoreDNS from pinned Go modules, and the Debian tools that build the image.
# Prints `export CAPL_TOOLS_DIR=...` last, so `eval "$(tests/tools/install.sh)"` works;
# progress goes to stderr.
set -euo pipefail
workload=""
for arg in "$@"; do
	case "$arg" in
	--workload) workload=1 ;;
	*) printf 'usage: %s [--workload]\n' "$0" >&2; exit 2 ;;
	esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${CAPL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cluster-api-provider-libvirt}"
tools="$cache/tools"
mkdir -p "$tools"

log() { printf '[install] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- Debian packages
apt_packages=(
	libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
	qemu-system-x86 qemu-utils dnsmasq-base iptables iproute2 pkg-config
	openssl ca-certificates cpio xz-utils kmod
	runc containernetworking-plugins conntrack
)
# The node image (--workload): a Debian root file system, a FAT boot partition with SYSLINUX, ext4.
workload_packages=(mmdebstrap syslinux syslinux-common mtools dosfstools fdisk e2fsprogs)

install_apt() {
	local missing=() wanted=("${apt_packages[@]}")
	[ -z "$workload" ] || wanted+=("${workload_packages[@]}")
	for p in "${wanted[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	if [ ${#missing[@]} -eq 0 ]; then
		log "Debian packages: all present"
		return
	fi
	log "Debian packages: installing ${missing[*]}"
	local sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	export DEBIAN_FRONTEND=noninteractive
	$sudo apt-get update -qq >&2
	if ! $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
		# A newer qemu-utils (backports) conflicts with bookworm's qemu-system-common:
		# pin qemu-utils to the version of qemu-system-x86 that apt would install.
		local qv
		qv="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')"
		log "retrying with qemu-utils=$qv"
		$sudo apt-get install -y -qq --no-install-recommends --allow-downgrades \
			"${missing[@]/#qemu-utils/qemu-utils=$qv}" >&2
	fi
}

# libvirtd's QEMU driver refuses to initialise unless its build-time user exists (Debian's
# libvirt-daemon-system would create it; the bed runs libvirtd by hand without that package).
ensure_libvirt_user() {
	local sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	getent group libvirt-qemu >/dev/null || $sudo groupadd --system libvirt-qemu
	getent passwd libvirt-qemu >/dev/null ||
		$sudo useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
}

# ---------------------------------------------------------------- Go-built tools
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0

# go_build <name> <version-key> <module-dir> <package> [ldflags] [build tags]
go_build() {
	local name="$1" key="$2" moddir="$3" pkg="$4" ldflags="${5:-}" tags="${6:-}"
	local out="$tools/$key/$name"
	if [ -x "$out" ]; then
		log "$name: cached ($key)"
		return
	fi
	log "$name: building $pkg ($key)"
	local start=$SECONDS
	mkdir -p "$tools/$key"
	(cd "$here/$moddir" && go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg")
	mv "$out.tmp" "$out"
	log "$name: built in $((SECONDS - start))s"
}

# The pause program is ours: its cache key is a hash of its source.
pause_key() {
	echo "pause-$(cat "$here/pause/go.mod" "$here/pause/main.go" | sha256sum | cut -c1-16)"
}

# The version Kubernetes binaries report (`kubelet --version`, kubeadm's own checks).
kubernetes_ldflags() {
	local kmaj kmin kv=k8s.io/component-base/version
	kmaj="${KUBERNETES_VERSION#v}"; kmaj="${kmaj%%.*}"
	kmin="$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
	echo "-X $kv.gitVersion=$KUBERNETES_VERSION -X $kv.gitMajor=$kmaj -X $kv.gitMinor=$kmin -X $kv.gitTreeState=clean"
}

install_go_tools() {
	command -v go >/dev/null || { log "go is required to build the test-bed tools"; exit 1; }
	local kld kk="kubernetes-$KUBERNETES_VERSION"
	kld="$(kubernetes_ldflags)"
	go_build kube-apiserver "$kk" kubernetes k8s.io/kubernetes/cmd/kube-apiserver "$kld"
	# The bed's node (tests/support/node.rs): a kubelet and kube-proxy, plus the controller
	# manager and scheduler so that Deployments get Pods and Pods get the node.
	go_build kubelet "$kk" kubernetes k8s.io/kubernetes/cmd/kubelet "$kld"
	go_build kube-proxy "$kk" kubernetes k8s.io/kubernetes/cmd/kube-proxy "$kld"
	go_build kube-controller-manager "$kk" kubernetes k8s.io/kubernetes/cmd/kube-controller-manager "$kld"
	go_build kube-scheduler "$kk" kubernetes k8s.io/kubernetes/cmd/kube-scheduler "$kld"
	# containerd 2.x (a 1.36 kubelet refuses 1.x): pure Go, without the btrfs/devmapper/zfs
	# snapshotters (overlayfs and native remain).
	local cdv=github.com/containerd/containerd/v2/version
	local cdld="-X $cdv.Version=$CONTAINERD_VERSION -X $cdv.Revision=capl-pinned"
	local cdtags="no_btrfs no_devmapper no_zfs"
	local cdk="containerd-$CONTAINERD_VERSION"
	go_build containerd "$cdk" containerd github.com/containerd/containerd/v2/cmd/containerd "$cdld" "$cdtags"
	go_build containerd-shim-runc-v2 "$cdk" containerd github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 "$cdld" "$cdtags"
	go_build ctr "$cdk" containerd github.com/containerd/containerd/v2/cmd/ctr "$cdld" "$cdtags"
	# The node's sandbox (pause) image and probe: keyed by the source's hash, so an edit rebuilds.
	go_build pause "$(pause_key)" pause .
	go_build etcd "etcd-$ETCD_VERSION" etcd go.etcd.io/etcd/server/v3
	local cv=sigs.k8s.io/cluster-api/version
	local cmaj cmin
	cmaj="${CLUSTER_API_VERSION#v}"; cmaj="${cmaj%%.*}"
	cmin="$(echo "$CLUSTER_API_VERSION" | cut -d. -f2)"
	local capi_ld="-X $cv.gitVersion=$CLUSTER_API_VERSION -X $cv.gitMajor=$cmaj -X $cv.gitMinor=$cmin -X $cv.gitTreeState=clean"
	local ck="cluster-api-$CLUSTER_API_VERSION"
	go_build capi-manager "$ck" cluster-api sigs.k8s.io/cluster-api/core "$capi_ld"
	go_build clusterctl "$ck" cluster-api sigs.k8s.io/cluster-api/cmd/clusterctl "$capi_ld"
	go_build capi-kubeadm-bootstrap-manager "$ck" cluster-api sigs.k8s.io/cluster-api/bootstrap/kubeadm "$capi_ld"
	go_build capi-kubeadm-control-plane-manager "$ck" cluster-api sigs.k8s.io/cluster-api/controlplane/kubeadm "$capi_ld"
	# Helm's go.mod has no replace directives: `go install` at the pinned version is enough.
	local hk="helm-$HELM_VERSION" hout="$tools/helm-$HELM_VERSION/helm"
	if [ -x "$hout" ]; then
		log "helm: cached ($hk)"
	else
		log "helm: building helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
		local start=$SECONDS
		mkdir -p "$tools/$hk"
		GOBIN="$tools/$hk" go install -trimpath \
			-ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
			"helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
		log "helm: built in $((SECONDS - start))s"
	fi
	# Helm v3 too: the chart must work with both majors (v3's version variable is in internal/version).
	local h3k="helm-$HELM3_VERSION" h3out="$tools/helm-$HELM3_VERSION/helm"
	if [ -x "$h3out" ]; then
		log "helm v3: cached ($h3k)"
	else
		log "helm v3: building helm.sh/helm/v3/cmd/helm@$HELM3_VERSION"
		local start=$SECONDS
		mkdir -p "$tools/$h3k"
		GOBIN="$tools/$h3k" go install -trimpath \
			-ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM3_VERSION" \
			"helm.sh/helm/v3/cmd/helm@$HELM3_VERSION"
		log "helm v3: built in $((SECONDS - start))s"
	fi
	# The CAPI CRDs come straight from the module cache (no copies in the repo).
	(cd "$here/cluster-api" && go mod download sigs.k8s.io/cluster-api)
}

# go_install <name> <version-key> <package@version> [ldflags]: modules without replace
# directives build straight from the proxy.
go_install() {
	local name="$1" key="$2" pkg="$3" ldflags="${4:-}"
	local out="$tools/$key/$name"
	if [ -x "$out" ]; then
		log "$name: cached ($key)"
		return
	fi
	log "$name: building $pkg"
	local start=$SECONDS
	mkdir -p "$tools/$key"
	GOBIN="$tools/$key" go install -trimpath -ldflags "-s -w $ldflags" "$pkg"
	log "$name: built in $((SECONDS - start))s"
}

# The workload node image's own tools: kubeadm (beside the bed's kubelet and control-plane
# binaries, which the image reuses), crictl and CoreDNS (the versions kubeadm deploys).
install_workload_tools() {
	go_build kubeadm "kubernetes-$KUBERNETES_VERSION" kubernetes k8s.io/kubernetes/cmd/kubeadm "$(kubernetes_ldflags)"
	go_install crictl "cri-tools-$CRI_TOOLS_VERSION" "sigs.k8s.io/cri-tools/cmd/crictl@$CRI_TOOLS_VERSION" \
		"-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION"
	go_install coredns "coredns-$COREDNS_VERSION" "github.com/coredns/coredns@$COREDNS_VERSION"
}

if [ "${CAPL_SKIP_APT:-}" != 1 ]; then
	install_apt
	ensure_libvirt_user
fi
install_go_tools
[ -z "$workload" ] || install_workload_tools

capi_src="$(cd "$here/cluster-api" && go list -m -f '{{.Dir}}' sigs.k8s.io/cluster-api)"
echo "export CAPL_CACHE_DIR='$cache'"
echo "export CAPL_TOOLS_DIR='$tools'"
echo "export CAPL_KUBE_APISERVER='$tools/kubernetes-$KUBERNETES_VERSION/kube-apiserver'"
echo "export CAPL_ETCD='$tools/etcd-$ETCD_VERSION/etcd'"
echo "export CAPL_HELM='$tools/helm-$HELM_VERSION/helm'"
echo "export CAPL_HELM3='$tools/helm-$HELM3_VERSION/helm'"
echo "export CAPL_CAPI_DIR='$tools/cluster-api-$CLUSTER_API_VERSION'"
echo "export CAPL_CAPI_SRC='$capi_src'"
kdir="$tools/kubernetes-$KUBERNETES_VERSION"
echo "export CAPL_KUBELET='$kdir/kubelet'"
echo "export CAPL_KUBE_PROXY='$kdir/kube-proxy'"
echo "export CAPL_KUBE_CONTROLLER_MANAGER='$kdir/kube-controller-manager'"
echo "export CAPL_KUBE_SCHEDULER='$kdir/kube-scheduler'"
echo "export CAPL_CONTAINERD_DIR='$tools/containerd-$CONTAINERD_VERSION'"
echo "export CAPL_PAUSE='$tools/$(pause_key)/pause'"
if [ -n "$workload" ]; then
	echo "export CAPL_KUBEADM='$kdir/kubeadm'"
	echo "export CAPL_CRICTL='$tools/cri-tools-$CRI_TOOLS_VERSION/crictl'"
	echo "export CAPL_COREDNS='$tools/coredns-$COREDNS_VERSION/coredns'"
fi
