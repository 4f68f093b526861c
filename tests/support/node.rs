//! A real Kubernetes node for the bed: containerd 2.x, a kubelet and kube-proxy, built from the
//! pinned Go modules, so that Pods (and `helm install`ed Deployments) run.
//!
//! Isolation from the machine:
//! - the node's processes run in a network namespace the bed creates (`capl-node-<pid>`), joined
//!   to the host by a veth pair on a private /30 (host side = the apiserver's address in node
//!   mode, node side = the node's InternalIP). Pods get a /24 on a standalone CNI bridge inside
//!   that namespace (Debian's `bridge` + `host-local`, no masquerading). The host routes the pod
//!   CIDR to the node, so the apiserver reaches Pods; the namespace has **no default route**, so
//!   nothing in it reaches beyond the host's veth address;
//! - only the network namespace is entered (`setns`), not a mount namespace: the kubelet's volume
//!   mounts must be visible to runc;
//! - containerd's root, state, sockets, runc root, CNI config and IPAM state, the kubelet's root
//!   dir, pod logs and volume plugins all live under the node's dir; its cgroups under
//!   `/<cgroup root>` in every cgroup v1 hierarchy (cgroupfs driver, `failCgroupV1: false`);
//! - nothing is downloaded: the sandbox image is the bed's own pause program
//!   (`tests/tools/pause`), written as an OCI archive and imported with `ctr`.
//!
//! Teardown ([`Node::stop`], also on drop, and [`destroy`] for the shell face and for nodes of
//! test processes that died) kills every process in the node's cgroups and namespace, removes
//! the shims' sockets, unmounts everything under the node's dir, deletes the namespace (and with
//! it the veth pair and the host route) and the cgroups, and removes the dir.
//!
//! A few paths are hard-coded in the kubelet and containerd, whatever their configuration:
//! `/var/lib/kubelet/device-plugins/kubelet.sock` (the kubelet's device-plugin registration
//! socket: nodes running at once take turns owning it; no device plugin is used), shim sockets in
//! `/run/containerd/s`, CNI result caches in `/var/lib/cni/results`, container log links in
//! `/var/log/containers`. Teardown removes this node's entries there, and, once no other node
//! runs, the socket and those directories if empty.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::apiserver::ControlPlane;
use super::process::{Lifetime, Proc, pid_alive, poll, tail, terminate};
use super::tools::{Tools, require};

/// The Node object's name.
pub const NODE_NAME: &str = "capl-node";
/// The sandbox image containerd's CRI uses (imported at start; never pulled).
pub const PAUSE_IMAGE: &str = "capl.local/pause:v1";
/// Prefix of the node's network namespace and cgroup root: `capl-node-<owner pid>-<n>`.
const PREFIX: &str = "capl-node-";
/// Prefix of the host side of the veth pair: `cn-<owner pid>-<n>` (at most 15 characters).
const HOST_IF_PREFIX: &str = "cn-";
/// Interface name of the node side, inside the namespace.
const NODE_IF: &str = "eth0";
/// Debian's CNI plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Where the kubelet puts its (hard-coded) container log symlinks.
const CONTAINER_LOG_LINKS: &str = "/var/log/containers";

/// The node's network: a namespace, a veth pair to the host, and the addresses around it.
#[derive(Debug)]
pub struct Network {
    /// The network namespace (`ip netns`) the node's processes run in.
    pub netns: String,
    /// Host side of the veth pair.
    pub host_if: String,
    /// Host side address: the apiserver binds here in node mode.
    pub host_ip: Ipv4Addr,
    /// Node side address: the Node's InternalIP.
    pub node_ip: Ipv4Addr,
    /// The Pods' /24, routed from the host via `node_ip`.
    pub pod_cidr: String,
    /// Deleted on drop unless detached.
    owned: bool,
}

impl Network {
    /// Creates the namespace and the veth pair; addresses are derived from the owner's pid (the
    /// next free ones if those are taken). `Detached` (the shell face) uses the name suffix `dev`.
    pub fn create(lifetime: Lifetime) -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let suffix = match lifetime {
            Lifetime::TestProcess => format!(
                "{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            Lifetime::Detached => "dev".to_owned(),
        };
        let netns = format!("{PREFIX}{suffix}");
        let host_if = format!("{HOST_IF_PREFIX}{suffix}");
        // One creation at a time in this process; another process may still take the same
        // subnet between the check and the `ip` calls: then the next free one is tried.
        static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _creating = CREATING.lock().unwrap_or_else(|p| p.into_inner());
        let mut index = std::process::id() % SUBNETS;
        let mut last_error = None;
        for _ in 0..8 {
            let routes = ip_output(&["-4", "-o", "route", "show"])?;
            let addrs = ip_output(&["-4", "-o", "addr", "show"])?;
            let (found, (host_ip, node_ip, pod_cidr)) = (0..SUBNETS)
                .map(|i| ((index + i) % SUBNETS, subnets((index + i) % SUBNETS)))
                .find(|(_, (host, _, pods))| {
                    let veth_net = format!("{}/30", Ipv4Addr::from(u32::from(*host) - 1));
                    !addrs.contains(&format!(" {host}/"))
                        && !routes.contains(&veth_net)
                        && !routes.contains(pods.as_str())
                })
                .context("no free subnet for the node")?;
            let mut network = Self {
                netns: netns.clone(),
                host_if: host_if.clone(),
                host_ip,
                node_ip,
                pod_cidr,
                owned: true,
            };
            match network.configure() {
                Ok(()) => return Ok(network),
                Err(e) => {
                    network.delete();
                    last_error = Some(e);
                    index = (found + 1) % SUBNETS;
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("no subnet"))
            .context("creating the node's network"))
    }

    fn configure(&self) -> Result<()> {
        let (ns, host_if) = (self.netns.as_str(), self.host_if.as_str());
        ip(&["netns", "add", ns])?;
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", NODE_IF, "netns", ns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_ip),
            "dev",
            host_if,
        ])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", self.node_ip),
            "dev",
            NODE_IF,
        ])?;
        ip(&["-n", ns, "link", "set", NODE_IF, "up"])?;
        // Pods are reached from the host (the apiserver) through the node; the namespace itself
        // gets no default route: only the host's veth address is reachable from it.
        ip(&[
            "route",
            "add",
            &self.pod_cidr,
            "via",
            &self.node_ip.to_string(),
            "dev",
            host_if,
        ])?;
        // The node routes between its veth and the Pods' bridge (per-namespace sysctl); bridged
        // traffic goes through iptables so that Services work between Pods of the node.
        run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]))?;
        let _ = run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            "net.bridge.bridge-nf-call-iptables=1",
        ]));
        Ok(())
    }

    /// Deletes the host route, the namespace and (with it) the veth pair. Idempotent.
    pub fn delete(&mut self) {
        if !self.owned {
            return;
        }
        self.owned = false;
        delete_network(&self.netns, &self.host_if);
    }

    /// Leaves the network in place (the shell face's `down` deletes it).
    pub fn detach(&mut self) {
        self.owned = false;
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.delete();
    }
}

/// How many node subnets exist: pod CIDRs `10.144.0.0/24`..`10.207.255.0/24`, veth /30s in
/// `10.208.0.0/16`.
const SUBNETS: u32 = 16384;

/// (host ip, node ip, pod cidr) of subnet `index`.
fn subnets(index: u32) -> (Ipv4Addr, Ipv4Addr, String) {
    let base = u32::from(Ipv4Addr::new(10, 208, 0, 0)) + index * 4;
    let pods = Ipv4Addr::new(10, 144 + (index / 256) as u8, (index % 256) as u8, 0);
    (
        Ipv4Addr::from(base + 1),
        Ipv4Addr::from(base + 2),
        format!("{pods}/24"),
    )
}

/// What teardown needs to find everything of a node (also serialised by the shell face).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeHandle {
    /// The node's network namespace.
    pub netns: String,
    /// Host side of its veth pair.
    pub host_if: String,
    /// The node's dir (containerd, kubelet, CNI state, logs).
    pub dir: PathBuf,
    /// The kubelet's cgroup root, without the leading `/`.
    pub cgroup_root: String,
    /// (name, pid) of the node's own processes, in start order.
    pub processes: Vec<(String, u32)>,
}

/// How long start-up took, per phase (for the report of the bed's costs).
#[derive(Debug, Clone, Default)]
pub struct StartTimings {
    /// containerd started until it answered.
    pub containerd: Duration,
    /// The pause image written (first start only) and imported.
    pub pause_image: Duration,
    /// The kubelet and kube-proxy started until the Node was Ready.
    pub ready: Duration,
    /// All of [`Node::start`].
    pub total: Duration,
}

/// A running node: containerd, kubelet and kube-proxy in [`Network::netns`].
pub struct Node {
    /// The Node object's name.
    pub name: String,
    /// The namespace and addresses the node lives in.
    pub network: Network,
    /// Everything of the node lives under this dir.
    pub dir: PathBuf,
    /// containerd's gRPC socket (`ctr --address`).
    pub containerd_socket: PathBuf,
    /// The kubelet's cgroup root in every hierarchy, without the leading `/`.
    pub cgroup_root: String,
    /// How long start-up took.
    pub timings: StartTimings,
    ctr: PathBuf,
    kubectl: PathBuf,
    admin_kubeconfig: PathBuf,
    /// containerd, kubelet, kube-proxy (stopped in reverse order).
    procs: Vec<Proc>,
    /// Torn down on drop unless detached.
    owned: bool,
}

impl Node {
    /// Starts containerd (and imports the pause image), the kubelet and kube-proxy under `dir`,
    /// in `network`, registered with `plane` (which must run in node mode on
    /// `network.host_ip`); waits until the Node is Ready.
    pub fn start(
        tools: &Tools,
        plane: &ControlPlane,
        network: Network,
        dir: &Path,
        lifetime: Lifetime,
    ) -> Result<Self> {
        let started = Instant::now();
        if plane.address != network.host_ip {
            bail!(
                "the control plane listens on {}, not on the node's host address {}",
                plane.address,
                network.host_ip
            );
        }
        let containerd_dir = require(&tools.containerd_dir, "containerd")?.clone();
        let kubelet_bin = require(&tools.kubelet, "kubelet")?.clone();
        let kube_proxy_bin = require(&tools.kube_proxy, "kube-proxy")?.clone();
        let pause_bin = require(&tools.pause, "the pause program")?.clone();
        let cgroup_root = network.netns.clone();
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let mut node = Self {
            name: NODE_NAME.to_owned(),
            containerd_socket: dir.join("containerd.sock"),
            cgroup_root,
            timings: StartTimings::default(),
            ctr: containerd_dir.join("ctr"),
            kubectl: tools.kubectl.clone(),
            admin_kubeconfig: plane.kubeconfig.clone(),
            procs: Vec::new(),
            owned: true,
            dir,
            network,
        };
        // From here on, a failure tears down whatever was started (drop).
        node.write_configs(plane)?;
        create_cgroups(&node.cgroup_root)?;

        let phase = Instant::now();
        let mut containerd = Command::new(containerd_dir.join("containerd"));
        containerd
            .arg(format!(
                "--config={}",
                node.dir.join("containerd.toml").display()
            ))
            // The runc shim is found on PATH.
            .env(
                "PATH",
                format!("{}:{}", containerd_dir.display(), SYSTEM_PATH),
            );
        node.spawn("containerd", containerd, lifetime)?;
        node.wait_containerd()?;
        node.timings.containerd = phase.elapsed();

        let phase = Instant::now();
        // The archive is deterministic: written once beside the pause program in the tools
        // cache (its cache key names the source), then only imported.
        let archive = pause_bin.with_file_name(format!(
            "image-{}.tar",
            PAUSE_IMAGE.replace(['/', ':'], "_")
        ));
        if !archive.exists() {
            write_image_archive(&pause_bin, PAUSE_IMAGE, &archive)?;
        }
        node.import_image(&archive)?;
        node.timings.pause_image = phase.elapsed();

        let phase = Instant::now();
        let mut kubelet = Command::new(kubelet_bin);
        kubelet
            .arg(format!(
                "--config={}",
                node.dir.join("kubelet.yaml").display()
            ))
            .arg(format!(
                "--kubeconfig={}",
                node.dir.join("kubelet.kubeconfig").display()
            ))
            .arg(format!("--root-dir={}", node.dir.join("kubelet").display()))
            .arg(format!(
                "--cert-dir={}",
                node.dir.join("kubelet/pki").display()
            ))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={}", node.network.node_ip))
            .arg("--v=1")
            .env("PATH", SYSTEM_PATH);
        node.spawn("kubelet", kubelet, lifetime)?;
        let mut proxy = Command::new(kube_proxy_bin);
        proxy
            .arg(format!(
                "--config={}",
                node.dir.join("kube-proxy.yaml").display()
            ))
            .arg("--v=1")
            .env("PATH", SYSTEM_PATH);
        node.spawn("kube-proxy", proxy, lifetime)?;
        node.wait_ready(Duration::from_secs(120))?;
        node.timings.ready = phase.elapsed();
        node.timings.total = started.elapsed();
        Ok(node)
    }

    fn write_configs(&self, plane: &ControlPlane) -> Result<()> {
        let dir = &self.dir;
        for sub in [
            "containerd/root",
            "containerd/state",
            "runc",
            "cni/net.d",
            "cni/ipam",
            "kubelet",
            "pod-logs",
            "volume-plugins",
            "images",
        ] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let path = |sub: &str| dir.join(sub).display().to_string();
        std::fs::write(
            dir.join("containerd.toml"),
            format!(
                r#"version = 3
root = "{root}"
state = "{state}"
# Nothing from the machine's /etc/containerd (containerd 2.x imports conf.d by default).
imports = []

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  netns_mounts_under_state_dir = true
  # These machines withhold CAP_SYS_RESOURCE, so no process may lower its oom_score_adj (the
  # kubelet asks -998 for sandboxes): clamp to containerd's own instead of failing every Pod.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{cni_conf}"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.nri.v1.nri"]
  disable = true
"#,
                root = path("containerd/root"),
                state = path("containerd/state"),
                sock = self.containerd_socket.display(),
                runc = path("runc"),
                cni_conf = path("cni/net.d"),
            ),
        )?;
        std::fs::write(
            dir.join("cni/net.d/10-capl.conflist"),
            serde_json::to_string_pretty(&serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "capl-pods",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "capl0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.network.pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": path("cni/ipam"),
                    },
                }],
            }))?,
        )?;
        // No DNS server exists in the bed (and nothing may be asked outside it).
        std::fs::write(dir.join("resolv.conf"), "# the test bed has no DNS\n")?;

        let kubelet_kubeconfig = plane.write_kubeconfig(
            &format!("system:node:{NODE_NAME}"),
            &["system:nodes"],
            "kubelet",
        )?;
        std::fs::copy(&kubelet_kubeconfig, dir.join("kubelet.kubeconfig"))?;
        std::fs::write(
            dir.join("kubelet.yaml"),
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {node_ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: {ca}
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix://{sock}
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup_root}
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
enforceNodeAllocatable: ["pods"]
podLogsDir: {pod_logs}
volumePluginDir: {volume_plugins}
resolvConf: {resolv}
clusterDomain: cluster.local
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
evictionPressureTransitionPeriod: 0s
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 50
rotateCertificates: false
serverTLSBootstrap: false
"#,
                node_ip = self.network.node_ip,
                ca = plane.ca_file.display(),
                sock = self.containerd_socket.display(),
                cgroup_root = self.cgroup_root,
                pod_logs = path("pod-logs"),
                volume_plugins = path("volume-plugins"),
                resolv = path("resolv.conf"),
            ),
        )?;

        let proxy_kubeconfig = plane.write_kubeconfig("system:kube-proxy", &[], "kube-proxy")?;
        std::fs::write(
            dir.join("kube-proxy.yaml"),
            format!(
                r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
mode: iptables
clusterCIDR: {pod_cidr}
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
nodePortAddresses: ["primary"]
iptables:
  localhostNodePorts: false
"#,
                kubeconfig = proxy_kubeconfig.display(),
                pod_cidr = self.network.pod_cidr,
            ),
        )?;
        Ok(())
    }

    /// Spawns `cmd` inside the node's network namespace (only that namespace: the mount
    /// namespace stays the host's).
    fn spawn(&mut self, name: &str, mut cmd: Command, lifetime: Lifetime) -> Result<()> {
        let netns = std::fs::File::open(format!("/var/run/netns/{}", self.network.netns))
            .with_context(|| format!("opening network namespace {}", self.network.netns))?;
        // SAFETY: setns(2) is async-signal-safe; the fd stays open until exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let log = self.dir.join(format!("{name}.log"));
        self.procs.push(Proc::spawn(name, cmd, &log, lifetime)?);
        Ok(())
    }

    fn wait_containerd(&mut self) -> Result<()> {
        let ctr = self.ctr.clone();
        let socket = self.containerd_socket.clone();
        let result = poll(
            "containerd to answer",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                self.check_running()?;
                let out = Command::new(&ctr)
                    .arg(format!("--address={}", socket.display()))
                    .arg("version")
                    .output()?;
                Ok(out.status.success().then_some(()))
            },
        );
        result.map_err(|e| e.context(self.diagnostics()))
    }

    /// Fails with the log tail of the first of the node's processes that exited.
    pub fn check_running(&mut self) -> Result<()> {
        for proc in &mut self.procs {
            proc.check_running()?;
        }
        Ok(())
    }

    /// Waits until the Node object reports `Ready=True`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let (kubectl, kubeconfig) = (self.kubectl.clone(), self.admin_kubeconfig.clone());
        let result = poll(
            "the node to become Ready",
            timeout,
            Duration::from_millis(250),
            || {
                self.check_running()?;
                let out = super::apiserver::kubectl(
                    &kubectl,
                    &kubeconfig,
                    &[
                        "get",
                        "node",
                        NODE_NAME,
                        "-o",
                        r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
                    ],
                    None,
                )?;
                Ok((out.status.success() && out.stdout == b"True").then_some(()))
            },
        );
        result.map_err(|e| e.context(self.diagnostics()))
    }

    /// Imports an OCI image archive into containerd's `k8s.io` namespace (where the CRI, and so
    /// the kubelet, sees it), unpacked for the overlayfs snapshotter.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let out = Command::new(&self.ctr)
            .arg(format!("--address={}", self.containerd_socket.display()))
            .args(["--namespace=k8s.io", "images", "import"])
            .arg("--no-unpack=false")
            .arg(archive)
            .output()
            .context("running ctr images import")?;
        if !out.status.success() {
            bail!(
                "ctr images import {}: {}{}",
                archive.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs `ctr` against the node's containerd (e.g. `["-n", "k8s.io", "images", "ls", "-q"]`).
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.ctr)
            .arg(format!("--address={}", self.containerd_socket.display()))
            .args(args)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The last lines of every node log (kubelet, containerd, kube-proxy), for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut text = String::new();
        for name in ["kubelet", "containerd", "kube-proxy"] {
            let log = self.dir.join(format!("{name}.log"));
            text.push_str(&format!(
                "\n--- last lines of {}:\n{}\n",
                log.display(),
                tail(&log, 25)
            ));
        }
        text
    }

    /// What teardown needs, for the shell face's state.
    pub fn handle(&self) -> NodeHandle {
        NodeHandle {
            netns: self.network.netns.clone(),
            host_if: self.network.host_if.clone(),
            dir: self.dir.clone(),
            cgroup_root: self.cgroup_root.clone(),
            processes: self
                .procs
                .iter()
                .map(|p| (p.name().to_owned(), p.pid()))
                .collect(),
        }
    }

    /// Leaves everything running (the shell face); returns what `tests/testbed down` needs.
    pub fn detach(mut self) -> NodeHandle {
        let handle = self.handle();
        for proc in std::mem::take(&mut self.procs) {
            proc.detach();
        }
        self.network.detach();
        self.owned = false;
        handle
    }

    /// Stops the kubelet and kube-proxy only (Pods and containerd keep running): their
    /// connections to the apiserver close while the network is still there, so an apiserver
    /// stopped next exits at once instead of waiting out its grace period. Idempotent.
    pub fn stop_agents(&mut self) {
        let mut kept = Vec::new();
        for mut proc in std::mem::take(&mut self.procs).into_iter().rev() {
            if AGENTS.contains(&proc.name()) {
                proc.stop(Duration::from_secs(10));
            } else {
                kept.push(proc);
            }
        }
        kept.reverse();
        self.procs = kept;
    }

    /// Stops everything and removes every trace (see the module docs). Idempotent.
    pub fn stop(&mut self) {
        if !self.owned {
            return;
        }
        self.owned = false;
        let handle = self.handle();
        // kube-proxy and the kubelet first, so nothing restarts what goes next.
        while let Some(mut proc) = self.procs.pop() {
            if proc.name() == "containerd" {
                self.procs.push(proc);
                break;
            }
            proc.stop(Duration::from_secs(10));
        }
        kill_cgroup_tree(&handle.cgroup_root);
        while let Some(mut proc) = self.procs.pop() {
            proc.stop(Duration::from_secs(10));
        }
        self.network.detach();
        destroy(&handle);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The node's processes that talk to the apiserver.
const AGENTS: [&str; 2] = ["kube-proxy", "kubelet"];

/// [`Node::stop_agents`] for a detached node (the shell face's `down`).
pub fn stop_agents(handle: &NodeHandle) {
    for (name, pid) in handle.processes.iter().rev() {
        if AGENTS.contains(&name.as_str()) && libc::pid_t::try_from(*pid).is_ok_and(pid_alive) {
            terminate(*pid, Duration::from_secs(10));
        }
    }
}

const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Removes every trace of a node: its processes (by pid, by cgroup, by network namespace),
/// shim sockets, mounts, the namespace with the veth pair and route, cgroups, container log
/// links and the node's dir. Safe to call on a node that is half gone.
pub fn destroy(handle: &NodeHandle) {
    for (_, pid) in handle.processes.iter().rev() {
        if libc::pid_t::try_from(*pid).is_ok_and(pid_alive) {
            terminate(*pid, Duration::from_secs(10));
        }
    }
    kill_cgroup_tree(&handle.cgroup_root);
    kill_namespace(&handle.netns);
    remove_shim_sockets(&handle.dir.join("containerd/state"));
    remove_cni_cache(&handle.dir);
    unmount_under(&handle.dir);
    delete_network(&handle.netns, &handle.host_if);
    remove_cgroups(&handle.cgroup_root);
    remove_log_links(&handle.dir);
    let _ = std::fs::remove_dir_all(&handle.dir);
    remove_fixed_host_paths(&handle.netns);
}

/// Tears down nodes of test processes that died without cleaning up (SIGKILL): their
/// namespaces are `capl-node-<pid>-<n>` and their dirs live in the bed's `capl-bed-<pid>-*` temp
/// dirs.
pub fn sweep_stale() {
    let Ok(list) = ip_output(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(suffix) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(owner) = suffix
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let host_if = format!("{HOST_IF_PREFIX}{suffix}");
        if pid_alive(owner) {
            continue;
        }
        let prefix = std::env::temp_dir().join(format!("capl-bed-{owner}-"));
        let dirs: Vec<PathBuf> = std::fs::read_dir(std::env::temp_dir())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().starts_with(&*prefix.to_string_lossy()))
                    .map(|p| p.join("node"))
                    .collect()
            })
            .unwrap_or_default();
        for dir in dirs {
            destroy(&NodeHandle {
                netns: name.to_owned(),
                host_if: host_if.clone(),
                dir,
                cgroup_root: name.to_owned(),
                processes: Vec::new(),
            });
        }
        // No dir found: the namespace and cgroups still go.
        kill_cgroup_tree(name);
        kill_namespace(name);
        delete_network(name, &host_if);
        remove_cgroups(name);
    }
}

// ---------------------------------------------------------------- network helpers

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn delete_network(netns: &str, host_if: &str) {
    // The route goes with the veth, and the veth with the namespace; both explicitly too, in
    // case the namespace is already gone but the host side is not.
    let _ = ip(&["link", "del", host_if]);
    let _ = ip(&["netns", "del", netns]);
}

/// Pids of every process in a network namespace.
pub fn namespace_pids(netns: &str) -> Vec<u32> {
    ip_output(&["netns", "pids", netns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn kill_namespace(netns: &str) {
    for _ in 0..3 {
        let pids = namespace_pids(netns);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            terminate(pid, Duration::from_secs(2));
        }
    }
}

// ---------------------------------------------------------------- cgroups

/// Every mounted cgroup v1 hierarchy (`/sys/fs/cgroup/<name>`).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    mount_points_of_type("cgroup")
}

/// Mount points of filesystems of type `fs_type` (`/proc/self/mounts`).
fn mount_points_of_type(fs_type: &str) -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() > 2 && fields[2] == fs_type).then(|| PathBuf::from(fields[1]))
        })
        .collect()
}

/// Creates `/<root>` in every hierarchy (the kubelet refuses a cgroup root that does not exist);
/// cpuset needs its CPUs and memory nodes copied from the parent before anything can join.
fn create_cgroups(root: &str) -> Result<()> {
    for hierarchy in cgroup_hierarchies() {
        let dir = hierarchy.join(root);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(hierarchy.join(file)) {
                std::fs::write(dir.join(file), value.trim())
                    .with_context(|| format!("writing {}", dir.join(file).display()))?;
            }
        }
    }
    Ok(())
}

/// Pids in `/<root>` and below, in any hierarchy.
pub fn cgroup_pids(root: &str) -> Vec<u32> {
    fn walk(dir: &Path, out: &mut Vec<u32>) {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|p| p.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), out);
                }
            }
        }
    }
    let mut pids = Vec::new();
    for hierarchy in cgroup_hierarchies() {
        walk(&hierarchy.join(root), &mut pids);
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILLs every process in the node's cgroups (containers and sandboxes), until none is left.
fn kill_cgroup_tree(root: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = cgroup_pids(root);
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) on a process of the node's own cgroups.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes `/<root>` and everything below it in every hierarchy, deepest first.
fn remove_cgroups(root: &str) {
    fn remove(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&entry.path());
                }
            }
        }
        // A cgroup dir goes with rmdir(2) although it lists (virtual) files.
        let _ = std::fs::remove_dir(dir);
    }
    // The kubelet and runc also make `<root>/kubepods/...` on the cgroup2 (unified) mount.
    for hierarchy in cgroup_hierarchies()
        .into_iter()
        .chain(mount_points_of_type("cgroup2"))
    {
        let dir = hierarchy.join(root);
        if dir.exists() {
            remove(&dir);
        }
    }
}

// ---------------------------------------------------------------- mounts and files

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mount_path(point)))
        .filter(|point| point.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    mounts
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("0");
            out.push(u8::from_str_radix(octal, 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything at or below `dir`, deepest first, until nothing is left.
fn unmount_under(dir: &Path) {
    for _ in 0..10 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for mount in mounts {
            let Ok(path) = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: umount2(2) with a valid C string.
            unsafe {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// Each shim writes its socket's address (under `/run/containerd/s`, not configurable) into its
/// task's bundle; a killed shim leaves the socket behind.
fn remove_shim_sockets(state: &Path) {
    let tasks = state.join("io.containerd.runtime.v2.task");
    let Ok(namespaces) = std::fs::read_dir(&tasks) else {
        return;
    };
    for namespace in namespaces.flatten() {
        let Ok(bundles) = std::fs::read_dir(namespace.path()) else {
            continue;
        };
        for bundle in bundles.flatten() {
            if let Ok(address) = std::fs::read_to_string(bundle.path().join("address")) {
                let socket = address.trim().trim_start_matches("unix://");
                if socket.starts_with("/run/containerd/s/") {
                    let _ = std::fs::remove_file(socket);
                }
            }
        }
    }
}

/// containerd's CNI library caches each sandbox's result in `/var/lib/cni/results` (not
/// configurable); a sandbox killed at teardown never gets its CNI DEL. This node's entries name
/// its Pods' network namespaces, which live under its dir.
fn remove_cni_cache(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(CNI_CACHE) else {
        return;
    };
    let needle = format!("\"{}/", dir.display());
    for entry in entries.flatten() {
        if std::fs::read_to_string(entry.path()).is_ok_and(|text| text.contains(&needle)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// libcni's cache dir, hard-coded in containerd's CRI.
const CNI_CACHE: &str = "/var/lib/cni/results";
/// The kubelet's device-plugin registration socket, hard-coded (`DevicePluginPath`).
const DEVICE_PLUGIN_SOCKET: &str = "/var/lib/kubelet/device-plugins/kubelet.sock";

/// The paths every kubelet and containerd use whatever their configuration: once the last node
/// of the machine is gone (no other `capl-node-*` namespace), the kubelet's device-plugin socket
/// goes, and the directories they created go if empty.
fn remove_fixed_host_paths(this_netns: &str) {
    let others = ip_output(&["netns", "list"])
        .map(|list| {
            list.lines()
                .filter_map(|l| l.split_whitespace().next())
                .any(|name| name.starts_with(PREFIX) && name != this_netns)
        })
        .unwrap_or(true);
    if others {
        return;
    }
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(DEVICE_PLUGIN_SOCKET).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(DEVICE_PLUGIN_SOCKET);
    }
    // remove_dir fails on a non-empty dir: nothing of anyone else's goes.
    for dir in [
        "/var/lib/kubelet/device-plugins",
        "/var/lib/kubelet",
        CNI_CACHE,
        "/var/lib/cni",
        "/run/containerd/s",
        "/run/containerd",
    ] {
        let _ = std::fs::remove_dir(dir);
    }
}

/// The kubelet links every container's log into `/var/log/containers`: remove those that point
/// into the node's dir.
fn remove_log_links(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(CONTAINER_LOG_LINKS) else {
        return;
    };
    for entry in entries.flatten() {
        if std::fs::read_link(entry.path()).is_ok_and(|target| target.starts_with(dir)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

// ---------------------------------------------------------------- images

/// Writes an OCI image archive (deterministic, see [`super::oci`]) holding `binary` as
/// `/<file name>`, its entrypoint, tagged `reference`; returns the manifest digest.
pub fn write_image_archive(binary: &Path, reference: &str, out: &Path) -> Result<String> {
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", binary.display()))?;
    let mut layer = super::oci::LayerBuilder::new(&format!("COPY {name} /{name}"))?;
    layer.add_file_from(name, binary, 0o755, 0, 0)?;
    let config = super::oci::ImageConfig {
        entrypoint: vec![format!("/{name}")],
        stop_signal: Some("SIGTERM".into()),
        ..Default::default()
    };
    super::oci::write_archive(&[layer.build()?], &config, reference, out)
}
