//! The whole way: a workload cluster made by Cluster API with this provider, offline, on one
//! machine.
//!
//! The bed's management plane runs the real Cluster API core, kubeadm bootstrap and kubeadm
//! control-plane managers and this provider's `manager`; the cluster comes from
//! `deploy/cluster-template.yaml` through `clusterctl generate cluster`. The provider downloads
//! the node image (`support::node_image`, `tests/testbed node-image`: Debian 12, cloud-init,
//! containerd, kubeadm and every control-plane image pre-imported) over HTTP from the host, verifies its sha256 and
//! boots a VM on the bed's real libvirtd (TCG unless `CAPL_WORKLOAD_DOMAIN_TYPE=kvm`). The VM's
//! cloud-init runs `kubeadm init` from the KubeadmConfig's bootstrap data; the workload
//! apiserver answers through the cluster's kubeconfig Secret, the Node carries the
//! LibvirtMachine's providerID, Cluster API sets the Machine's nodeRef and the Cluster turns
//! Available. Then a worker joins (`CAPL_WORKLOAD_WORKERS`, default 1; 0 skips it), and
//! deleting the Cluster removes every VM and every machine volume.
//!
//! On a failed wait the test prints the guests' serial console tails (read through the
//! provider's own libvirt code) and the objects' conditions.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use capl::api::LibvirtMachine;
use support::capi_objects::{capi, condition, namespace};
use support::workload::{ENDPOINT_IP, FileServer, RoutedNetwork};

const NS: &str = "workload";
const CLUSTER: &str = "w1";
const POOL: &str = "capl-workload";
const NETWORK: &str = "capl-workload";

/// Under TCG everything is slow: generous deadlines, each printed when it is exceeded.
const BOOT: Duration = Duration::from_secs(25 * 60);
const SHORT: Duration = Duration::from_secs(5 * 60);

#[tokio::test(flavor = "multi_thread")]
async fn a_kubeadm_control_plane_on_a_provider_made_vm_becomes_the_workload_clusters_node() {
    let started = Instant::now();
    let mut timings: Vec<(String, Duration)> = Vec::new();
    let mark = |what: &str, timings: &mut Vec<(String, Duration)>| {
        let at = started.elapsed();
        println!("[{:>7.1}s] {what}", at.as_secs_f64());
        timings.push((what.to_owned(), at));
    };

    let image = support::node_image::node_image().expect("the node image");
    mark("node image ready", &mut timings);

    let bed = support::shared();
    bed.capi_kubeadm();
    let (uri, pool_dir) = {
        let libvirtd = bed.libvirtd();
        let libvirtd = libvirtd.as_ref().expect("libvirtd");
        (libvirtd.uri.clone(), libvirtd.images().join(POOL))
    };
    let host = capl::libvirt::Host::open(&support::host_uri(&uri)).expect("an own connection");
    support::libvirtd::dir_pool(&host, POOL, &pool_dir);
    let _network = {
        let libvirtd = bed.libvirtd();
        RoutedNetwork::create(
            libvirtd.as_ref().expect("libvirtd"),
            &host,
            NETWORK,
            "cwlbr0",
        )
        .expect("the routed network")
    };
    let served = image.path.parent().expect("the image's dir");
    let server = FileServer::start(served, &bed.test_dir(NS).join("image-server.log"))
        .expect("the image server");
    let image_url = format!("{}/node.qcow2", server.url);
    mark(
        "management plane, libvirtd and image server up",
        &mut timings,
    );

    let client = bed.client().await;
    namespace(&client, NS).await;
    let (_manager, _) = bed.start_manager(
        NS,
        env!("CARGO_BIN_EXE_manager"),
        &[
            format!("--libvirt-uri={uri}"),
            "--webhook-port=0".into(),
            format!("--namespace={NS}"),
            "--sync-period=10s".into(),
            "--guest-shutdown-timeout=60s".into(),
        ],
    );
    let domain_type = std::env::var("CAPL_WORKLOAD_DOMAIN_TYPE").unwrap_or_else(|_| "qemu".into());
    let workers: i64 = std::env::var("CAPL_WORKLOAD_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let manifest = cluster_manifest(
        &bed.tools.clusterctl,
        &uri,
        &image_url,
        &image.sha256,
        &domain_type,
    );
    let applied = bed.kubectl_stdin(&["apply", "-n", NS, "-f", "-"], &manifest);
    assert!(
        applied.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    println!("{}", String::from_utf8_lossy(&applied.stdout));
    mark("cluster applied", &mut timings);

    let diagnose = Diagnostics {
        client: client.clone(),
        host: &host,
    };
    let machines: Api<LibvirtMachine> = Api::namespaced(client.clone(), NS);

    // The provider makes the VM and reports its address.
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
        .await;
    let provider_id = first.spec.provider_id.clone().expect("providerID");
    mark(
        &format!("VM {} up with an address ({provider_id})", first.name_any()),
        &mut timings,
    );

    // cloud-init runs kubeadm init: the kubeconfig Secret's apiserver answers.
    let kubeconfig = bed.test_dir(NS).join("workload.kubeconfig");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let workload = Workload {
        kubectl: bed.tools.kubectl.clone(),
        kubeconfig: kubeconfig.clone(),
    };
    diagnose
        .wait("the workload apiserver to answer", BOOT, || async {
            let secret = secrets.get(&format!("{CLUSTER}-kubeconfig")).await.ok()?;
            let value = secret.data?.get("value")?.0.clone();
            std::fs::write(&kubeconfig, value).ok()?;
            workload.get("/readyz").filter(|body| body.trim() == "ok")
        })
        .await;
    mark(
        "workload apiserver answers through the kubeconfig Secret",
        &mut timings,
    );

    // The Node registers with the LibvirtMachine's providerID and turns Ready.
    let node = diagnose
        .wait("the workload Node to be Ready", BOOT, || async {
            let nodes: Value = serde_json::from_str(&workload.get("/api/v1/nodes")?).ok()?;
            nodes["items"]
                .as_array()?
                .iter()
                .find(|n| {
                    n["spec"]["providerID"] == json!(provider_id)
                        && condition(&n["status"], "Ready").is_some_and(|c| c["status"] == "True")
                })
                .cloned()
        })
        .await;
    let node_name = node["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    mark(
        &format!("Node {node_name} Ready with spec.providerID {provider_id}"),
        &mut timings,
    );

    // Cluster API links the Machine to the Node and the Cluster turns Available.
    let cp_machine = diagnose
        .wait("the Machine's nodeRef", SHORT, || async {
            let list = capi(&client, NS, "Machine")
                .list(&Default::default())
                .await
                .ok()?;
            list.items
                .into_iter()
                .find(|m| m.data.pointer("/status/nodeRef/name") == Some(&json!(node_name)))
        })
        .await;
    assert_eq!(
        cp_machine.data.pointer("/spec/providerID"),
        Some(&json!(provider_id)),
        "the Machine carries the LibvirtMachine's providerID"
    );
    mark("Machine has its nodeRef", &mut timings);
    diagnose
        .wait("the Cluster to be Available", SHORT, || async {
            let cluster = capi(&client, NS, "Cluster").get(CLUSTER).await.ok()?;
            condition(cluster.data.get("status")?, "Available").filter(|c| c["status"] == "True")
        })
        .await;
    mark("Cluster Available", &mut timings);
    machines_ready(&diagnose, &client, 1).await;
    mark("Cluster API reports the Machine Ready", &mut timings);
    let describe = clusterctl(
        &bed.tools.clusterctl,
        &bed.kubeconfig,
        &[
            "describe",
            "cluster",
            CLUSTER,
            "-n",
            NS,
            "--show-conditions=all",
        ],
    );
    println!("clusterctl describe cluster:\n{describe}");
    assert!(describe.contains(CLUSTER), "{describe}");

    if workers > 0 {
        let md = Api::<DynamicObject>::namespaced_with(
            client.clone(),
            NS,
            &ApiResource::from_gvk(&GroupVersionKind::gvk(
                "cluster.x-k8s.io",
                "v1beta2",
                "MachineDeployment",
            )),
        );
        md.patch(
            &format!("{CLUSTER}-md-0"),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"replicas": workers}})),
        )
        .await
        .expect("scaling the MachineDeployment");
        diagnose
            .wait("the workers' Nodes to be Ready", BOOT, || async {
                let nodes: Value = serde_json::from_str(&workload.get("/api/v1/nodes")?).ok()?;
                let ready = nodes["items"]
                    .as_array()?
                    .iter()
                    .filter(|n| {
                        n["spec"]["providerID"]
                            .as_str()
                            .is_some_and(|p| p.starts_with("libvirt://"))
                            && condition(&n["status"], "Ready")
                                .is_some_and(|c| c["status"] == "True")
                    })
                    .count();
                (ready as i64 == 1 + workers).then_some(())
            })
            .await;
        mark(
            &format!("{workers} worker(s) joined and Ready"),
            &mut timings,
        );
        machines_ready(&diagnose, &client, 1 + workers as usize).await;
        mark(
            "Cluster API reports every Machine Ready with its nodeRef",
            &mut timings,
        );
    }
    println!(
        "workload nodes:\n{}",
        workload.kubectl(&["get", "nodes", "-o", "wide"])
    );

    // Delete removes every VM and every machine volume (the verified base image stays, shared by
    // future machines of any cluster in this pool).
    capi(&client, NS, "Cluster")
        .delete(CLUSTER, &DeleteParams::default())
        .await
        .expect("deleting the Cluster");
    diagnose
        .wait("the Cluster to be gone", SHORT * 2, || async {
            capi(&client, NS, "Cluster")
                .get_opt(CLUSTER)
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
    mark("Cluster deleted", &mut timings);
    let domains: Vec<String> = support::guest_host::domains(&host)
        .expect("domains")
        .into_iter()
        .filter(|d| d.starts_with(&format!("{NS}_")))
        .collect();
    assert_eq!(domains, Vec::<String>::new(), "no domain left");
    let left: Vec<String> = support::guest_host::volumes(&host, POOL)
        .expect("volumes")
        .into_iter()
        .filter(|v| !v.starts_with("capl-base-"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "no machine volume left");

    println!("timings:");
    for (what, at) in &timings {
        println!("  {:>7.1}s  {what}", at.as_secs_f64());
    }
}

/// Waits until Cluster API has `count` Machines, each with a nodeRef and `Ready` true (it reads
/// the Nodes through the workload cluster's kubeconfig on its own schedule, after the Node itself
/// turned Ready).
async fn machines_ready(diagnose: &Diagnostics<'_>, client: &Client, count: usize) {
    diagnose
        .wait(
            &format!("{count} Machine(s) Ready with a nodeRef"),
            SHORT,
            || async {
                let list = capi(client, NS, "Machine")
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
        .await;
}

/// `clusterctl generate cluster` from `deploy/cluster-template.yaml` (the variables a user
/// sets), then what a one-machine TCG bed needs on top (users on KVM need none of it but the
/// endpoint): the control-plane endpoint as a second address of the first control-plane machine
/// (users run a load balancer or kube-vip there), and patience, because emulated CPUs run the
/// control plane about ten times slower: longer kubeadm timeouts, longer leader-election leases
/// for the controller manager and scheduler (their renewals miss the 10 s default while another
/// VM boots, and each miss restarts them), and more failed probes before the kubelet restarts a
/// static Pod (kubeadm patches).
fn cluster_manifest(
    clusterctl: &Path,
    uri: &str,
    image_url: &str,
    sha256: &str,
    domain_type: &str,
) -> String {
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cluster-template.yaml");
    let home = tempfile::tempdir().expect("tempdir");
    let config = home.path().join("clusterctl.yaml");
    std::fs::write(&config, "providers: []\n").expect("clusterctl config");
    let endpoint = ENDPOINT_IP.to_string();
    let out = std::process::Command::new(clusterctl)
        .args(["generate", "cluster", CLUSTER, "--from"])
        .arg(&template)
        .arg("--config")
        .arg(&config)
        .args([
            "--target-namespace",
            NS,
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
        .env("LIBVIRT_URI", uri)
        .env("LIBVIRT_IMAGE_URL", image_url)
        .env("LIBVIRT_IMAGE_SHA256", sha256)
        .env("LIBVIRT_DOMAIN_TYPE", domain_type)
        .env("LIBVIRT_NETWORK", NETWORK)
        .env("LIBVIRT_STORAGE_POOL", POOL)
        .env("CONTROL_PLANE_MEMORY_MIB", "4096")
        .env("CONTROL_PLANE_ROOT_VOLUME_GIB", "20")
        // One emulated vCPU for a worker: the two cores of this machine go to the control plane
        // (kubeadm init wants two) while the worker boots.
        .env("WORKER_VCPUS", "1")
        .env("WORKER_MEMORY_MIB", "2048")
        .env("WORKER_ROOT_VOLUME_GIB", "20")
        .output()
        .expect("clusterctl");
    assert!(
        out.status.success(),
        "clusterctl generate cluster: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let timeouts = json!({
        "controlPlaneComponentHealthCheckSeconds": 1200,
        "kubeletHealthCheckSeconds": 600,
        "kubernetesAPICallSeconds": 600,
        "etcdAPICallSeconds": 600,
        "tlsBootstrapSeconds": 900,
        "discoverySeconds": 600,
    });
    let patches = json!({"directory": PATCHES});
    let leases = json!([
        {"name": "leader-elect-lease-duration", "value": "120s"},
        {"name": "leader-elect-renew-deadline", "value": "100s"},
        {"name": "leader-elect-retry-period", "value": "10s"},
    ]);
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut value: Value = serde::Deserialize::deserialize(doc).expect("YAML");
        if value["kind"] == "KubeadmControlPlane" {
            let spec = &mut value["spec"]["kubeadmConfigSpec"];
            spec["preKubeadmCommands"] = json!([format!("ip addr add {endpoint}/32 dev lo")]);
            spec["files"] = json!(
                ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]
                    .iter()
                    .map(|component| probe_patch(component))
                    .collect::<Vec<_>>()
            );
            // KubeadmControlPlane wants the same timeouts for init and join.
            for phase in ["initConfiguration", "joinConfiguration"] {
                spec[phase]["timeouts"] = timeouts.clone();
                spec[phase]["patches"] = patches.clone();
            }
            spec["clusterConfiguration"]["controllerManager"]["extraArgs"] = leases.clone();
            spec["clusterConfiguration"]["scheduler"]["extraArgs"] = leases.clone();
        } else if value["kind"] == "KubeadmConfigTemplate" {
            value["spec"]["template"]["spec"]["joinConfiguration"]["timeouts"] = timeouts.clone();
        }
        if !value.is_null() {
            docs.push(value);
        }
    }
    docs.iter()
        .map(|d| serde_yaml::to_string(d).expect("YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Where the control-plane machines' kubeadm patches go.
const PATCHES: &str = "/etc/kubernetes/patches";

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

/// The bed's Kubernetes version (the node image's kubeadm and kubelet).
const KUBERNETES_VERSION: &str = "v1.36.3";

fn clusterctl(clusterctl: &Path, kubeconfig: &Path, args: &[&str]) -> String {
    let home = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(clusterctl)
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .env("CLUSTERCTL_DISABLE_VERSIONCHECK", "true")
        .output()
        .expect("clusterctl");
    assert!(
        out.status.success(),
        "clusterctl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The workload cluster, through its kubeconfig Secret.
struct Workload {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Workload {
    /// `kubectl get --raw <path>`, or `None` while it fails.
    fn get(&self, path: &str) -> Option<String> {
        let out = std::process::Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--request-timeout=10s", "get", "--raw", path])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Waits, and on a timeout prints what tells why before failing.
struct Diagnostics<'a> {
    client: Client,
    host: &'a capl::libvirt::Host,
}

impl Diagnostics<'_> {
    async fn wait<T, F, Fut>(&self, what: &str, timeout: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = probe().await {
                return value;
            }
            if Instant::now() >= deadline {
                self.print().await;
                panic!("timed out after {timeout:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// The guests' console tails (as the provider reads them) and the objects' conditions.
    async fn print(&self) {
        let machines: Api<LibvirtMachine> = Api::namespaced(self.client.clone(), NS);
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
            let identity = capl::libvirt::identity::MachineIdentity::new(NS, &m.name_any(), uuid);
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
            let list = capi(&self.client, NS, kind).list(&Default::default()).await;
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
