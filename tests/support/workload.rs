//! What a workload cluster on the bed's real libvirtd needs beyond the bed itself:
//!
//! - a **routed** libvirt network (`<forward mode='route'>`, no NAT) whose guests the management
//!   side reaches: a veth pair joins the host to libvirtd's network namespace, the host routes
//!   the guests' subnet over it, and the namespace has no route anywhere else, so the guests
//!   reach the host's veth address and each other, nothing beyond;
//! - an HTTP server for the Kubernetes node image ([`super::node_image`]) on the host's veth
//!   address (an address the provider's download rules accept, unlike loopback), so machines
//!   take the provider's normal download-verify-upload path;
//! - the cluster itself ([`cluster_manifest`]: `deploy/cluster-template.yaml` through
//!   `clusterctl generate cluster`, plus what emulated CPUs need) and the way up, milestone by
//!   milestone ([`bring_up`]), shared by `tests/workload.rs` and `tests/testbed run --workload`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use capl::api::LibvirtMachine;

use super::capi_objects::{capi, condition};
use super::libvirtd::Libvirtd;
use super::process::{Lifetime, Proc, poll};

/// The host side of the veth pair (10.213.40.1/30); the namespace side is .2.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 40, 1);
const NS_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 40, 2);
/// The guests' subnet; the bridge (the guests' gateway and DNS) is .1, DHCP hands out .10-.200.
pub const SUBNET: &str = "10.213.41.0/24";
const BRIDGE_IP: &str = "10.213.41.1";
/// An address of the guests' subnet outside the DHCP range: the workload cluster's
/// control-plane endpoint, which the first control-plane machine takes as a second address.
pub const ENDPOINT_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 41, 250);
/// The host side's name: this prefix and the owner's pid.
const HOST_IF_PREFIX: &str = "cwl-";
/// The interface name inside libvirtd's namespace.
const NS_IF: &str = "cwl0";

/// A routed libvirt network reachable from the host; removed on drop (the libvirt network goes
/// with libvirtd's namespace).
pub struct RoutedNetwork {
    /// The libvirt network's name.
    pub name: String,
    host_if: String,
}

impl RoutedNetwork {
    /// Creates the veth pair into `libvirtd`'s namespace, the host route to [`SUBNET`] and the
    /// libvirt network `name` (bridge `bridge`) on `host`. Idempotent per libvirtd.
    pub fn create(
        libvirtd: &Libvirtd,
        host: &capl::libvirt::Host,
        name: &str,
        bridge: &str,
    ) -> Result<Self> {
        let host_if = format!("{HOST_IF_PREFIX}{}", std::process::id());
        let ns = libvirtd.netns.as_str();
        sweep_stale_links(&host_if);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", NS_IF, "netns", ns,
        ])?;
        let network = Self {
            name: name.to_owned(),
            host_if: host_if.clone(),
        };
        ip(&["addr", "add", &format!("{HOST_IP}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        in_ns(&["addr", "add", &format!("{NS_IP}/30"), "dev", NS_IF])?;
        in_ns(&["link", "set", NS_IF, "up"])?;
        ip(&["route", "replace", SUBNET, "via", &NS_IP.to_string()])?;

        let conn = host.connection();
        let defined = match conn.lookup_network_by_name(name) {
            Ok(defined) => defined,
            Err(_) => conn
                .define_network_xml(&format!(
                    "<network><name>{name}</name><forward mode='route' dev='{NS_IF}'/>\
                     <bridge name='{bridge}'/>\
                     <ip address='{BRIDGE_IP}' netmask='255.255.255.0'>\
                     <dhcp><range start='10.213.41.10' end='10.213.41.200'/></dhcp></ip>\
                     </network>"
                ))
                .context("defining the routed network")?,
        };
        if !defined.is_active().unwrap_or(false) {
            defined.create().context("starting the routed network")?;
        }
        Ok(network)
    }
}

impl Drop for RoutedNetwork {
    fn drop(&mut self) {
        // The route goes with the interface.
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// Deletes `own` (left by an earlier bed of this process) and the pairs of beds whose process
/// died (their namespace may outlive them until the next bed's sweep): they hold the addresses
/// and the route.
fn sweep_stale_links(own: &str) {
    let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        let stale = name == own
            || name
                .strip_prefix(HOST_IF_PREFIX)
                .and_then(|pid| pid.parse::<libc::pid_t>().ok())
                .is_some_and(|pid| !super::process::pid_alive(pid));
        if stale {
            let _ = ip(&["link", "del", name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An HTTP server for one directory (Python's `http.server`), listening on [`HOST_IP`].
pub struct FileServer {
    /// `http://<host ip>:<port>`.
    pub url: String,
    _proc: Proc,
}

impl FileServer {
    /// Serves `dir` on [`HOST_IP`]; logs go to `log`.
    pub fn start(dir: &Path, log: &Path) -> Result<Self> {
        let port = super::apiserver::free_port()?;
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "http.server", "--bind", &HOST_IP.to_string()])
            .arg("--directory")
            .arg(dir)
            .arg(port.to_string());
        let mut proc = Proc::spawn("image-server", cmd, log, Lifetime::TestProcess)?;
        poll(
            "the image server to listen",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || {
                proc.check_running()?;
                Ok(std::net::TcpStream::connect((HOST_IP, port))
                    .is_ok()
                    .then_some(()))
            },
        )?;
        Ok(Self {
            url: format!("http://{HOST_IP}:{port}"),
            _proc: proc,
        })
    }
}

/// The pool and the routed network workload machines use on the bed's libvirtd.
pub const POOL: &str = "capl-workload";
pub const NETWORK: &str = "capl-workload";
/// The routed network's bridge.
const BRIDGE: &str = "cwlbr0";

/// Everything a workload cluster needs around the bed's management plane: the Cluster API
/// kubeadm providers, libvirtd with the pool and the routed network, the node image served over
/// HTTP, and this provider's manager watching `namespace`. Stops with the bed (and on drop).
pub struct Stage {
    /// The bed's libvirtd URI (what the LibvirtCluster names).
    pub uri: String,
    /// An own connection to it (domains, volumes, console tails).
    pub host: capl::libvirt::Host,
    pub image: super::node_image::NodeImage,
    pub server: FileServer,
    pub manager: Proc,
    _network: RoutedNetwork,
}

impl Stage {
    /// Builds (or finds) the node image, then starts everything; `manager` is the binary.
    pub fn start(bed: &super::TestBed, namespace: &str, manager: &str) -> Result<Self> {
        let image = super::node_image::node_image()?;
        bed.capi_kubeadm();
        let (uri, pool_dir) = {
            let libvirtd = bed.libvirtd();
            let libvirtd = libvirtd.as_ref().context("libvirtd is not running")?;
            (libvirtd.uri.clone(), libvirtd.images().join(POOL))
        };
        let host = capl::libvirt::Host::open(&super::host_uri(&uri))?;
        super::libvirtd::dir_pool(&host, POOL, &pool_dir);
        let network = {
            let libvirtd = bed.libvirtd();
            let libvirtd = libvirtd.as_ref().context("libvirtd is not running")?;
            RoutedNetwork::create(libvirtd, &host, NETWORK, BRIDGE)?
        };
        let served = image.path.parent().context("the image has no directory")?;
        let server = FileServer::start(served, &bed.test_dir(namespace).join("image-server.log"))?;
        let (manager, _) = bed.start_manager(
            namespace,
            manager,
            &[
                format!("--libvirt-uri={uri}"),
                "--webhook-port=0".into(),
                format!("--namespace={namespace}"),
                "--sync-period=10s".into(),
                "--guest-shutdown-timeout=60s".into(),
            ],
        );
        Ok(Self {
            uri,
            host,
            image,
            server,
            manager,
            _network: network,
        })
    }

    /// The cluster `name` in `namespace` on this stage (`domain_type` `qemu` for TCG).
    pub fn cluster(&self, namespace: &str, name: &str, domain_type: &str) -> ClusterSpec {
        ClusterSpec {
            namespace: namespace.into(),
            name: name.into(),
            uri: self.uri.clone(),
            image_url: format!("{}/node.qcow2", self.server.url),
            image_sha256: self.image.sha256.clone(),
            domain_type: domain_type.into(),
            network: NETWORK.into(),
            pool: POOL.into(),
        }
    }
}

/// The bed's Kubernetes version (the node image's kubeadm and kubelet).
pub const KUBERNETES_VERSION: &str = "v1.36.3";

/// Under TCG everything is slow: generous deadlines, each printed when it is exceeded.
pub const BOOT: Duration = Duration::from_secs(25 * 60);
pub const SHORT: Duration = Duration::from_secs(5 * 60);

/// A workload cluster on the bed: where it lives and what it runs on.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub namespace: String,
    pub name: String,
    /// The libvirt host's URI (the bed's libvirtd).
    pub uri: String,
    pub image_url: String,
    pub image_sha256: String,
    /// `qemu` (TCG) here; `kvm` where a guest can boot under KVM.
    pub domain_type: String,
    pub network: String,
    pub pool: String,
}

/// Where the control-plane machines' kubeadm patches go.
const PATCHES: &str = "/etc/kubernetes/patches";

/// `clusterctl generate cluster` from `deploy/cluster-template.yaml` (the variables a user
/// sets; no workers yet, [`bring_up`] scales them in once the control plane stands), then what a
/// one-machine TCG bed needs on top (users on KVM need none of it but the endpoint): the
/// control-plane endpoint as a second address of the first control-plane machine (users run a
/// load balancer or kube-vip there), and patience, because emulated CPUs run the control plane
/// about ten times slower: longer kubeadm timeouts, longer leader-election leases for the
/// controller manager and scheduler (their renewals miss the 10 s default while another VM
/// boots, and each miss restarts them), and more failed probes before the kubelet restarts a
/// static Pod (kubeadm patches).
pub fn cluster_manifest(clusterctl: &Path, spec: &ClusterSpec) -> Result<String> {
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cluster-template.yaml");
    let home = tempfile::tempdir()?;
    let config = home.path().join("clusterctl.yaml");
    std::fs::write(&config, "providers: []\n")?;
    let endpoint = ENDPOINT_IP.to_string();
    let out = Command::new(clusterctl)
        .args(["generate", "cluster", &spec.name, "--from"])
        .arg(&template)
        .arg("--config")
        .arg(&config)
        .args([
            "--target-namespace",
            &spec.namespace,
            "--kubernetes-version",
            KUBERNETES_VERSION,
            "--control-plane-machine-count",
            "1",
            "--worker-machine-count",
            "0",
        ])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .env("CLUSTERCTL_DISABLE_VERSIONCHECK", "true")
        .env("CONTROL_PLANE_ENDPOINT_IP", &endpoint)
        .env("LIBVIRT_URI", &spec.uri)
        .env("LIBVIRT_IMAGE_URL", &spec.image_url)
        .env("LIBVIRT_IMAGE_SHA256", &spec.image_sha256)
        .env("LIBVIRT_DOMAIN_TYPE", &spec.domain_type)
        .env("LIBVIRT_NETWORK", &spec.network)
        .env("LIBVIRT_STORAGE_POOL", &spec.pool)
        .env("CONTROL_PLANE_MEMORY_MIB", "4096")
        .env("CONTROL_PLANE_ROOT_VOLUME_GIB", "20")
        // One emulated vCPU for a worker: the two cores of this machine go to the control plane
        // (kubeadm init wants two) while the worker boots.
        .env("WORKER_VCPUS", "1")
        .env("WORKER_MEMORY_MIB", "2048")
        .env("WORKER_ROOT_VOLUME_GIB", "20")
        .output()
        .context("running clusterctl generate cluster")?;
    if !out.status.success() {
        bail!(
            "clusterctl generate cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let timeouts = json!({
        "controlPlaneComponentHealthCheckSeconds": 1200,
        "kubeletHealthCheckSeconds": 600,
        "kubernetesAPICallSeconds": 600,
        "etcdAPICallSeconds": 600,
        "tlsBootstrapSeconds": 900,
        "discoverySeconds": 600,
    });
    let leases = json!([
        {"name": "leader-elect-lease-duration", "value": "120s"},
        {"name": "leader-elect-renew-deadline", "value": "100s"},
        {"name": "leader-elect-retry-period", "value": "10s"},
    ]);
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut value: Value = serde::Deserialize::deserialize(doc)?;
        if value["kind"] == "KubeadmControlPlane" {
            let kubeadm = &mut value["spec"]["kubeadmConfigSpec"];
            kubeadm["preKubeadmCommands"] = json!([format!("ip addr add {endpoint}/32 dev lo")]);
            kubeadm["files"] = json!(
                [
                    "etcd",
                    "kube-apiserver",
                    "kube-controller-manager",
                    "kube-scheduler"
                ]
                .map(probe_patch)
            );
            // KubeadmControlPlane wants the same timeouts for init and join.
            for phase in ["initConfiguration", "joinConfiguration"] {
                kubeadm[phase]["timeouts"] = timeouts.clone();
                kubeadm[phase]["patches"] = json!({"directory": PATCHES});
            }
            kubeadm["clusterConfiguration"]["controllerManager"]["extraArgs"] = leases.clone();
            kubeadm["clusterConfiguration"]["scheduler"]["extraArgs"] = leases.clone();
        } else if value["kind"] == "KubeadmConfigTemplate" {
            value["spec"]["template"]["spec"]["joinConfiguration"]["timeouts"] = timeouts.clone();
        }
        if !value.is_null() {
            docs.push(serde_yaml::to_string(&value)?);
        }
    }
    Ok(docs.join("---\n"))
}

/// A kubeadm strategic-merge patch for `component`'s static Pod: ten times the failed probes
/// kubeadm allows before a restart (its defaults: liveness 8, startup 24, 10 s apart).
fn probe_patch(component: &str) -> Value {
    let patch = json!({"spec": {"containers": [{
        "name": component,
        "livenessProbe": {"failureThreshold": 80},
        "startupProbe": {"failureThreshold": 240},
    }]}});
    json!({
        "path": format!("{PATCHES}/{component}+strategic.json"),
        "content": patch.to_string(),
        "permissions": "0600",
    })
}

/// `clusterctl <args> --kubeconfig <kubeconfig>` with a throwaway config dir.
pub fn clusterctl(clusterctl: &Path, kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let home = tempfile::tempdir()?;
    let out = Command::new(clusterctl)
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .env("CLUSTERCTL_DISABLE_VERSIONCHECK", "true")
        .output()
        .context("running clusterctl")?;
    if !out.status.success() {
        bail!(
            "clusterctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workload cluster, through its kubeconfig Secret.
pub struct Workload {
    pub kubectl: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Workload {
    /// `kubectl get --raw <path>`, or `None` while it fails.
    pub fn get(&self, path: &str) -> Option<String> {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--request-timeout=10s", "get", "--raw", path])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl <args>`' standard output, whatever its exit status.
    pub fn kubectl(&self, args: &[&str]) -> String {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_else(|e| format!("kubectl: {e}"))
    }

    /// The Nodes whose `spec.providerID` is one of ours (`libvirt://`) and that are Ready.
    fn ready_nodes(&self) -> Option<Vec<Value>> {
        let nodes: Value = serde_json::from_str(&self.get("/api/v1/nodes")?).ok()?;
        Some(
            nodes["items"]
                .as_array()?
                .iter()
                .filter(|n| {
                    n["spec"]["providerID"]
                        .as_str()
                        .is_some_and(|p| p.starts_with("libvirt://"))
                        && condition(&n["status"], "Ready").is_some_and(|c| c["status"] == "True")
                })
                .cloned()
                .collect(),
        )
    }
}

/// The volumes in [`POOL`] that belong to machines: all but the verified base images, which
/// stay to be shared by future machines of any cluster in the pool.
pub fn machine_volumes(host: &capl::libvirt::Host) -> Result<Vec<String>> {
    Ok(super::guest_host::volumes(host, POOL)?
        .into_iter()
        .filter(|v| !v.starts_with("capl-base-"))
        .collect())
}

/// Waits, and on a timeout prints what tells why (the guests' console tails as the provider
/// reads them, the objects' conditions) before failing.
pub struct Diagnostics<'a> {
    pub client: Client,
    pub host: &'a capl::libvirt::Host,
    pub namespace: String,
}

impl Diagnostics<'_> {
    pub async fn wait<T, F, Fut>(&self, what: &str, timeout: Duration, mut probe: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = probe().await {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                self.print().await;
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Deletes the Cluster `name` the way users do and waits until it is gone: Cluster API
    /// drains and deletes its Machines, the provider removes each VM and its volumes.
    pub async fn delete_cluster(&self, name: &str) -> Result<()> {
        let clusters = capi(&self.client, &self.namespace, "Cluster");
        clusters
            .delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting Cluster {name}"))?;
        self.wait("the Cluster to be gone", SHORT * 2, || async {
            clusters.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await
    }

    /// The guests' console tails (as the provider reads them) and the objects' conditions.
    pub async fn print(&self) {
        let ns = self.namespace.as_str();
        let machines: Api<LibvirtMachine> = Api::namespaced(self.client.clone(), ns);
        for m in machines
            .list(&Default::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            println!(
                "--- LibvirtMachine {}: {}",
                m.name_any(),
                serde_json::to_string_pretty(&m.status).unwrap_or_default()
            );
            let Some(uuid) = m.spec.domain_uuid.as_deref().and_then(|u| u.parse().ok()) else {
                continue;
            };
            let identity = capl::libvirt::identity::MachineIdentity::new(ns, &m.name_any(), uuid);
            match self.host.console_tail(&identity, 16 * 1024) {
                Ok(tail) => {
                    // Redacted as the provider redacts what it shows (kubeadm tokens).
                    let lines: Vec<String> = tail
                        .lines()
                        .map(|line| capl::controller::machine::console::summary(line, &[]))
                        .collect();
                    println!(
                        "--- serial console tail of {}:\n{}",
                        m.name_any(),
                        lines.join("\n")
                    );
                }
                Err(e) => println!("--- no console tail of {}: {e}", m.name_any()),
            }
        }
        for kind in ["Cluster", "Machine"] {
            let list = capi(&self.client, ns, kind).list(&Default::default()).await;
            for o in list.map(|l| l.items).unwrap_or_default() {
                println!(
                    "--- {kind} {}: {}",
                    o.name_any(),
                    serde_json::to_string_pretty(
                        o.data.pointer("/status/conditions").unwrap_or(&Value::Null)
                    )
                    .unwrap_or_default()
                );
            }
        }
    }
}

/// What [`bring_up`] saw on the way.
#[derive(Debug)]
pub struct Up {
    /// The first control-plane machine's providerID (its LibvirtMachine's, its Node's and its
    /// Machine's: the waits check all three agree).
    pub provider_id: String,
    /// That machine's Node.
    pub node_name: String,
}

/// Waits for each milestone of the workload cluster `spec` (applied by the caller), reporting
/// each through `mark` as it is reached: the provider's VM with an address → the workload
/// apiserver answering through the kubeconfig Secret (written to `workload.kubeconfig`) → a
/// Ready Node with the LibvirtMachine's providerID → the Machine's nodeRef and providerID → the
/// Cluster Available and the Machine Ready in Cluster API → then `workers` workers scaled in,
/// their Nodes Ready, every Machine Ready with a nodeRef.
pub async fn bring_up(
    diagnose: &Diagnostics<'_>,
    spec: &ClusterSpec,
    workload: &Workload,
    workers: i64,
    mut mark: impl FnMut(&str),
) -> Result<Up> {
    let client = &diagnose.client;
    let ns = spec.namespace.as_str();
    // The provider makes the VM and reports its address.
    let machines: Api<LibvirtMachine> = Api::namespaced(client.clone(), ns);
    let first = diagnose
        .wait(
            "a control-plane LibvirtMachine with an address",
            SHORT * 2,
            || async {
                let list = machines.list(&Default::default()).await.ok()?;
                list.items.into_iter().find(|m| {
                    m.spec.provider_id.is_some()
                        && m.status
                            .as_ref()
                            .and_then(|s| s.addresses.as_ref())
                            .is_some_and(|a| !a.is_empty())
                })
            },
        )
        .await?;
    let provider_id = first.spec.provider_id.clone().unwrap_or_default();
    mark(&format!(
        "VM {} up with an address ({provider_id})",
        first.name_any()
    ));

    // cloud-init runs kubeadm init: the kubeconfig Secret's apiserver answers.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    diagnose
        .wait("the workload apiserver to answer", BOOT, || async {
            let secret = secrets
                .get(&format!("{}-kubeconfig", spec.name))
                .await
                .ok()?;
            let value = secret.data?.get("value")?.0.clone();
            std::fs::write(&workload.kubeconfig, value).ok()?;
            workload.get("/readyz").filter(|body| body.trim() == "ok")
        })
        .await?;
    mark("workload apiserver answers through the kubeconfig Secret");

    // The Node registers with the LibvirtMachine's providerID and turns Ready.
    let node = diagnose
        .wait("the workload Node to be Ready", BOOT, || async {
            workload
                .ready_nodes()?
                .into_iter()
                .find(|n| n["spec"]["providerID"] == json!(provider_id))
        })
        .await?;
    let node_name = node["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    mark(&format!(
        "Node {node_name} Ready with spec.providerID {provider_id}"
    ));

    // Cluster API links the Machine to the Node, with the same providerID.
    diagnose
        .wait("the Machine's nodeRef and providerID", SHORT, || async {
            let list = capi(client, ns, "Machine")
                .list(&Default::default())
                .await
                .ok()?;
            list.items.into_iter().find(|m| {
                m.data.pointer("/status/nodeRef/name") == Some(&json!(node_name))
                    && m.data.pointer("/spec/providerID") == Some(&json!(provider_id))
            })
        })
        .await?;
    mark("Machine has its nodeRef");
    diagnose
        .wait("the Cluster to be Available", SHORT, || async {
            let cluster = capi(client, ns, "Cluster").get(&spec.name).await.ok()?;
            condition(cluster.data.get("status")?, "Available").filter(|c| c["status"] == "True")
        })
        .await?;
    mark("Cluster Available");
    machines_ready(diagnose, ns, 1).await?;
    mark("Cluster API reports the Machine Ready");

    if workers > 0 {
        let md = Api::<DynamicObject>::namespaced_with(
            client.clone(),
            ns,
            &ApiResource::from_gvk(&GroupVersionKind::gvk(
                "cluster.x-k8s.io",
                "v1beta2",
                "MachineDeployment",
            )),
        );
        md.patch(
            &format!("{}-md-0", spec.name),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": workers}})),
        )
        .await
        .context("scaling the MachineDeployment")?;
        mark(&format!("MachineDeployment scaled to {workers}"));
        let want = usize::try_from(1 + workers)?;
        diagnose
            .wait("the workers' Nodes to be Ready", BOOT, || async {
                (workload.ready_nodes()?.len() == want).then_some(())
            })
            .await?;
        mark(&format!("{workers} worker(s) joined and Ready"));
        machines_ready(diagnose, ns, want).await?;
        mark("Cluster API reports every Machine Ready with its nodeRef");
    }
    Ok(Up {
        provider_id,
        node_name,
    })
}

/// Waits until Cluster API has `count` Machines, each with a nodeRef and `Ready` true (it reads
/// the Nodes through the workload cluster's kubeconfig on its own schedule, after the Node itself
/// turned Ready).
async fn machines_ready(diagnose: &Diagnostics<'_>, ns: &str, count: usize) -> Result<()> {
    diagnose
        .wait(
            &format!("{count} Machine(s) Ready with a nodeRef"),
            SHORT * 2,
            || async {
                let list = capi(&diagnose.client, ns, "Machine")
                    .list(&Default::default())
                    .await
                    .ok()?;
                let ready = list
                    .items
                    .iter()
                    .filter(|m| {
                        m.data.pointer("/status/nodeRef/name").is_some()
                            && m.data
                                .get("status")
                                .and_then(|s| condition(s, "Ready"))
                                .is_some_and(|c| c["status"] == "True")
                    })
                    .count();
                (ready == count && list.items.len() == count).then_some(())
            },
        )
        .await
}
