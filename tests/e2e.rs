//! End to end: the real Cluster API core manager and the real kube-apiserver drive this
//! provider's controllers, which run on the real libvirt backend (`LibvirtBackend`).
//!
//! - On the test driver (`test:///default`) the controllers run in this process
//!   (`capl::controller::run`): the test driver's state lives in the process, so the assertions
//!   read it through the backend's own connections. Two hosts may both be `test:///default` under
//!   different names. Every test has its own namespace; domains and volumes are named
//!   `<namespace>_<machine>_…`, so each test counts only its own.
//! - On the bed's real libvirtd + QEMU, the `manager` binary runs the controllers and the
//!   assertions use an independent connection; one real guest boots from the disk image made by
//!   `tests/guest/disk.sh`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use capl::api::{LibvirtCluster, LibvirtMachine};
use capl::libvirt::backend::Backend;
use capl::libvirt::live::LibvirtBackend;
use support::capi_objects::*;

const WAIT: Duration = Duration::from_secs(90);
/// The test driver's built-in pool.
const TEST_POOL: &str = "default-pool";
const TEST_IMAGE: &str = "e2e-base.img";

// ---------------------------------------------------------------- objects

/// A LibvirtCluster with `hosts` (`[{name, uri, ...}]`), pool `pool` and network `network`.
fn libvirt_cluster_on(name: &str, hosts: Value, pool: &str, network: &str) -> LibvirtCluster {
    serde_json::from_value(json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtCluster",
        "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": name}},
        "spec": {"hosts": hosts, "storagePool": pool, "network": network},
    }))
    .unwrap()
}

/// Hosts `a` (control plane) and `b` (workers), both the test driver.
fn two_test_hosts() -> Value {
    json!([
        {"name": "a", "uri": "test:///default"},
        {"name": "b", "uri": "test:///default", "controlPlane": false},
    ])
}

fn machine_spec(pool: &str, image: &str) -> Value {
    json!({
        "vcpus": 1,
        "memoryMiB": 256,
        "image": {"volume": {"pool": pool, "name": image}},
        "rootVolume": {"sizeGiB": 1},
    })
}

fn libvirt_machine_on(cluster: &str, name: &str, pool: &str, image: &str) -> LibvirtMachine {
    serde_json::from_value(json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachine",
        "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": cluster}},
        "spec": machine_spec(pool, image),
    }))
    .unwrap()
}

fn cloud_config_secret(name: &str, user_data: &str) -> Secret {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "cluster.x-k8s.io/secret",
        "stringData": {"value": user_data, "format": "cloud-config"},
    }))
    .unwrap()
}

/// A LibvirtMachineTemplate `name` and a MachineDeployment `name` of `replicas` machines
/// reading bootstrap Secret `<name>-bootstrap`.
fn deployment(cluster: &str, name: &str, replicas: i64) -> (DynamicObject, DynamicObject) {
    let template = serde_json::from_value(json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachineTemplate",
        "metadata": {"name": name},
        "spec": {"template": {"spec": machine_spec(TEST_POOL, TEST_IMAGE)}},
    }))
    .unwrap();
    let md = serde_json::from_value(json!({
        "apiVersion": "cluster.x-k8s.io/v1beta2",
        "kind": "MachineDeployment",
        "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": cluster}},
        "spec": {
            "clusterName": cluster,
            "replicas": replicas,
            "selector": {"matchLabels": {"cluster.x-k8s.io/deployment-name": name}},
            "template": {
                "metadata": {"labels": {
                    "cluster.x-k8s.io/cluster-name": cluster,
                    "cluster.x-k8s.io/deployment-name": name,
                }},
                "spec": {
                    "clusterName": cluster,
                    "bootstrap": {"dataSecretName": format!("{name}-bootstrap")},
                    "infrastructureRef": {
                        "apiGroup": "infrastructure.cluster.x-k8s.io",
                        "kind": "LibvirtMachineTemplate",
                        "name": name,
                    },
                },
            },
        },
    }))
    .unwrap();
    (template, md)
}

fn infra(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let resource = kube::core::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
        "infrastructure.cluster.x-k8s.io",
        "v1alpha1",
        kind,
    ));
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// Waits until LibvirtMachine `name` is [`provisioned`]; shows it when it is not in time.
async fn wait_provisioned(machines: &Api<LibvirtMachine>, name: &str) -> LibvirtMachine {
    let wait = eventually("the LibvirtMachine to be provisioned", WAIT, || async {
        let m = machines.get(name).await.ok()?;
        provisioned(&m).then_some(m)
    });
    match tokio::time::timeout(WAIT - Duration::from_secs(1), wait).await {
        Ok(m) => m,
        Err(_) => {
            let m = machines.get(name).await.ok();
            panic!(
                "{name} was not provisioned: {}",
                serde_json::to_string_pretty(&m).unwrap_or_default()
            )
        }
    }
}

/// True once a LibvirtMachine is provisioned, Ready, with a providerID and an address.
fn provisioned(m: &LibvirtMachine) -> bool {
    let Some(status) = m.status.as_ref() else {
        return false;
    };
    status
        .initialization
        .as_ref()
        .is_some_and(|i| i.provisioned == Some(true))
        && status.addresses.as_ref().is_some_and(|a| !a.is_empty())
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
        && m.spec.provider_id.is_some()
}

// ---------------------------------------------------------------- the test-driver environment

/// The controllers in this process on `LibvirtBackend` + `test:///default`, in namespace `ns`.
struct TestDriver {
    client: Client,
    ns: String,
    backend: Arc<LibvirtBackend>,
    running: Option<Running>,
    machines: Api<LibvirtMachine>,
    clusters: Api<LibvirtCluster>,
}

async fn test_driver(ns: &str) -> TestDriver {
    let bed = support::shared();
    bed.capi();
    bed.install_provider_crds();
    let client = bed.client().await;
    namespace(&client, ns).await;
    let backend = Arc::new(LibvirtBackend::new(4).expect("backend"));
    let image = capl::libvirt::xml::VolumePlan {
        name: TEST_IMAGE.into(),
        capacity_gib: 1,
        format: "raw".into(),
        backing: None,
    }
    .to_xml()
    .expect("xml");
    backend
        .hosts()
        .run(&support::host_uri("test:///default"), move |host| {
            host.ensure_volume(TEST_POOL, TEST_IMAGE, &image)
        })
        .await
        .expect("the base image volume");
    let running = Running::start(&client, backend.clone(), settings(ns));
    let (clusters, machines) = ours(&client, ns);
    TestDriver {
        client,
        ns: ns.to_owned(),
        backend,
        running: Some(running),
        machines,
        clusters,
    }
}

impl TestDriver {
    async fn cluster(&self, name: &str) {
        capi(&self.client, &self.ns, "Cluster")
            .create(&PostParams::default(), &cluster(name))
            .await
            .expect("creating the Cluster");
        self.clusters
            .create(
                &PostParams::default(),
                &libvirt_cluster_on(name, two_test_hosts(), TEST_POOL, "default"),
            )
            .await
            .expect("creating the LibvirtCluster");
    }

    async fn machine(&self, cluster: &str, name: &str) {
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .create(
                &PostParams::default(),
                &cloud_config_secret(&format!("{name}-bootstrap"), "#cloud-config\n"),
            )
            .await
            .expect("creating the bootstrap Secret");
        self.machines
            .create(
                &PostParams::default(),
                &libvirt_machine_on(cluster, name, TEST_POOL, TEST_IMAGE),
            )
            .await
            .expect("creating the LibvirtMachine");
        capi(&self.client, &self.ns, "Machine")
            .create(&PostParams::default(), &machine(cluster, name))
            .await
            .expect("creating the Machine");
    }

    async fn wait_provisioned(&self, name: &str) -> LibvirtMachine {
        wait_provisioned(&self.machines, name).await
    }

    /// This namespace's domains (with their recorded owner) and volumes, read through the
    /// backend's own connection.
    async fn inventory(&self) -> (Vec<String>, Vec<String>) {
        let prefix = format!("{}_", self.ns);
        self.backend
            .hosts()
            .run(&support::host_uri("test:///default"), move |host| {
                let domains = support::guest_host::domains(host).map_err(|e| e.to_string());
                let volumes =
                    support::guest_host::volumes(host, TEST_POOL).map_err(|e| e.to_string());
                Ok((domains, volumes))
            })
            .await
            .map(|(domains, volumes)| {
                let mine = |names: Vec<String>| -> Vec<String> {
                    names
                        .into_iter()
                        .filter(|n| n.starts_with(&prefix))
                        .collect()
                };
                (
                    mine(domains.expect("domains")),
                    mine(volumes.expect("volumes")),
                )
            })
            .expect("the test driver")
    }

    async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

// ---------------------------------------------------------------- test driver

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_reaches_provisioned_with_provider_id_and_addresses() {
    let env = test_driver("e2e-provisioned").await;
    env.cluster("c1").await;
    env.machine("c1", "m1").await;
    let lm = env.wait_provisioned("m1").await;
    let uuid = lm.spec.domain_uuid.clone().expect("domainUUID");
    let provider_id = format!("libvirt://{uuid}");
    assert_eq!(lm.spec.provider_id.as_deref(), Some(provider_id.as_str()));
    // Cluster API's Machine: phase Provisioned (no Node in a bed), the providerID and the
    // addresses mirrored from the LibvirtMachine.
    let addresses = lm.status.as_ref().and_then(|s| s.addresses.clone());
    let machine = eventually("the Machine to be Provisioned", WAIT, || async {
        let m = capi(&env.client, &env.ns, "Machine").get("m1").await.ok()?;
        (m.data.pointer("/status/phase") == Some(&json!("Provisioned"))
            && m.data.pointer("/status/addresses").is_some())
        .then_some(m)
    })
    .await;
    assert_eq!(
        machine.data.pointer("/spec/providerID"),
        Some(&json!(provider_id))
    );
    assert_eq!(
        machine.data.pointer("/status/addresses"),
        Some(&serde_json::to_value(addresses).unwrap())
    );
    // The domain exists under the providerID's UUID, owned by this LibvirtMachine.
    let host = capl::controller::cluster::host_ref(
        &env.clusters.get("c1").await.unwrap().spec.hosts[0],
        capl::libvirt::uri::UriPolicy {
            allow_test_driver: true,
        },
    )
    .unwrap();
    let owned: Vec<_> = env
        .backend
        .list_machines(&host)
        .await
        .expect("listing")
        .into_iter()
        .filter(|d| d.namespace == env.ns)
        .map(|d| (d.uuid.to_string(), d.name, d.cluster))
        .collect();
    assert_eq!(owned, vec![(uuid, "m1".to_owned(), "c1".to_owned())]);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_deployment_of_three_spreads_over_two_hosts_and_scales_down_to_one() {
    let env = test_driver("e2e-md").await;
    env.cluster("c1").await;
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .create(
            &PostParams::default(),
            &cloud_config_secret("md-bootstrap", "#cloud-config\n"),
        )
        .await
        .unwrap();
    let (template, md) = deployment("c1", "md", 3);
    infra(&env.client, &env.ns, "LibvirtMachineTemplate")
        .create(&PostParams::default(), &template)
        .await
        .expect("creating the template");
    let mds = capi(&env.client, &env.ns, "MachineDeployment");
    mds.create(&PostParams::default(), &md)
        .await
        .expect("creating the MachineDeployment");
    let three = eventually("three provisioned machines", WAIT, || async {
        let list = env.machines.list(&Default::default()).await.ok()?;
        (list.items.len() == 3 && list.items.iter().all(provisioned)).then_some(list.items)
    })
    .await;
    let mut hosts: Vec<String> = three
        .iter()
        .map(|m| m.spec.host.clone().unwrap_or_default())
        .collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts, vec!["a", "b"], "spread over both hosts");
    assert_eq!(env.inventory().await.0.len(), 3, "three domains");

    mds.patch(
        "md",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await
    .expect("scaling to 1");
    let survivor = eventually("one machine left", WAIT, || async {
        let list = env.machines.list(&Default::default()).await.ok()?;
        (list.items.len() == 1).then(|| list.items.into_iter().next())?
    })
    .await;
    let uuid = survivor.spec.domain_uuid.clone().expect("domainUUID");
    let prefix = format!(
        "{}_{}_{}",
        env.ns,
        survivor.name_any(),
        &uuid.replace('-', "")[..8]
    );
    let (domains, volumes) = eventually("the other VMs to be gone", WAIT, || async {
        let (domains, volumes) = env.inventory().await;
        (domains.len() == 1 && volumes.iter().all(|v| v.starts_with(&prefix)))
            .then_some((domains, volumes))
    })
    .await;
    assert_eq!(domains, vec![prefix.clone()]);
    assert!(
        volumes.contains(&format!("{prefix}-root.qcow2")),
        "the survivor keeps its root disk: {volumes:?}"
    );
    env.stop().await;
}

/// The examples of `deploy/examples/` (host URI pointed at the test driver) come up: one
/// control-plane machine and two workers; deleting the Cluster then removes every domain and
/// every volume.
#[tokio::test(flavor = "multi_thread")]
async fn the_examples_come_up_and_deleting_the_cluster_leaves_no_domain_and_no_volume() {
    let ns = "e2e-examples";
    let env = test_driver(ns).await;
    // The examples' pool and network, on the backend's own connection.
    env.backend
        .hosts()
        .run(&support::host_uri("test:///default"), |host| {
            let xml = |name: &str| {
                capl::libvirt::xml::VolumePlan {
                    name: name.into(),
                    capacity_gib: 1,
                    format: "raw".into(),
                    backing: None,
                }
                .to_xml()
                .expect("xml")
            };
            let conn = host.connection();
            if conn.lookup_storage_pool_by_name("capl").is_err() {
                let pool = conn
                    .define_storage_pool_xml(
                        "<pool type='dir'><name>capl</name><target><path>/capl</path></target></pool>",
                        0,
                    )
                    .expect("pool");
                pool.create(0).expect("start pool");
            }
            if conn.lookup_network_by_name("capl").is_err() {
                let net = conn
                    .define_network_xml(
                        "<network><name>capl</name><bridge name='capl0'/>\
                         <ip address='10.213.9.1' netmask='255.255.255.0'/></network>",
                    )
                    .expect("network");
                net.create().expect("start network");
            }
            host.ensure_volume(
                "capl",
                support::guest_host::GUEST_VOLUME,
                &xml(support::guest_host::GUEST_VOLUME),
            )
        })
        .await
        .expect("pool, network and image");
    let out = support::shared().kubectl_stdin(
        &["apply", "-n", ns, "-f", "-"],
        &examples("test:///default"),
    );
    assert!(
        out.status.success(),
        "applying the examples: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = eventually("three provisioned machines", WAIT, || async {
        let list = env.machines.list(&Default::default()).await.ok()?;
        (list.items.len() == 3 && list.items.iter().all(provisioned)).then_some(list.items)
    })
    .await;
    assert!(
        all.iter()
            .any(|m| m.name_any() == "example-control-plane-0")
    );
    let in_pool = |volumes: Vec<String>| volumes.len();
    let (domains, _) = env.inventory().await;
    assert_eq!(domains.len(), 3);
    let examples_volumes = env
        .backend
        .hosts()
        .run(&support::host_uri("test:///default"), |host| {
            Ok(support::guest_host::volumes(host, "capl").map_err(|e| e.to_string()))
        })
        .await
        .unwrap()
        .unwrap();
    assert!(
        in_pool(
            examples_volumes
                .into_iter()
                .filter(|v| v.starts_with(ns))
                .collect()
        ) >= 3,
        "every machine has its disks in the pool"
    );

    capi(&env.client, ns, "Cluster")
        .delete("example", &DeleteParams::default())
        .await
        .expect("deleting the Cluster");
    eventually("the Cluster to be gone", WAIT, || async {
        capi(&env.client, ns, "Cluster")
            .get_opt("example")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let (domains, _) = env.inventory().await;
    let left = env
        .backend
        .hosts()
        .run(&support::host_uri("test:///default"), |host| {
            Ok(support::guest_host::volumes(host, "capl").map_err(|e| e.to_string()))
        })
        .await
        .unwrap()
        .unwrap();
    let left: Vec<_> = left.into_iter().filter(|v| v.starts_with(ns)).collect();
    assert!(domains.is_empty(), "no domain left: {domains:?}");
    assert!(left.is_empty(), "no volume left: {left:?}");
    assert!(
        env.machines
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
            && env
                .clusters
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .is_empty(),
        "no LibvirtMachine or LibvirtCluster left (no stuck finalizer)"
    );
    env.stop().await;
}

/// The examples as one YAML stream, with the host URI replaced by `uri`.
fn examples(uri: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    ["cluster.yaml", "control-plane.yaml", "workers.yaml"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).expect("an example"))
        .collect::<Vec<_>>()
        .join("\n---\n")
        .replace("uri: qemu:///system", &format!("uri: \"{uri}\""))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_status_is_rebuilt_identically() {
    let env = test_driver("e2e-rebuild").await;
    env.cluster("c1").await;
    env.machine("c1", "m1").await;
    let before = env.wait_provisioned("m1").await;
    env.machines
        .patch_status(
            "m1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": null})),
        )
        .await
        .expect("deleting the status");
    let after = eventually("the status to be rebuilt", WAIT, || async {
        let m = env.machines.get("m1").await.ok()?;
        (provisioned(&m)
            && m.status.as_ref()?.observed_generation
                == before.status.as_ref()?.observed_generation)
            .then_some(m)
    })
    .await;
    assert_eq!(
        comparable_status(&after.status),
        comparable_status(&before.status)
    );
    assert_eq!(env.inventory().await.0.len(), 1, "no second VM");
    env.stop().await;
}

// ---------------------------------------------------------------- the real libvirtd + QEMU

/// Sum of every `capl_libvirt_call_duration_seconds_count` series on the manager's /metrics.
fn libvirt_calls(port: u16) -> f64 {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
        .lines()
        .filter(|l| l.starts_with("capl_libvirt_call_duration_seconds_count{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn condition_status(m: &LibvirtMachine, kind: &str) -> Option<String> {
    m.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

/// The `manager` binary on the bed's real libvirtd: a real QEMU guest boots the test guest's
/// disk, reads its cloud-config Secret from the NoCloud seed and takes a DHCP lease, which
/// becomes the Machine's address; pausing the Cluster stops every libvirt call (counted on the
/// manager's /metrics); deleting the Cluster leaves no domain and no volume (an independent
/// connection checks).
#[tokio::test(flavor = "multi_thread")]
async fn a_real_guest_boots_from_its_cloud_config_and_its_lease_becomes_the_machine_address() {
    let ns = "e2e-qemu";
    let bed = support::shared();
    bed.capi();
    let (uri, pool_dir) = {
        let libvirtd = bed.libvirtd();
        let libvirtd = libvirtd.as_ref().expect("libvirtd");
        (libvirtd.uri.clone(), libvirtd.images().join("capl-e2e"))
    };
    let host = capl::libvirt::Host::open(&support::host_uri(&uri)).expect("an own connection");
    let prepared = support::guest_host::prepare(&host, "capl-e2e", &pool_dir, "caple2e0", 11)
        .expect("pool, network and guest image");
    let client = bed.client().await;
    namespace(&client, ns).await;
    let metrics = support::apiserver::free_port().expect("a port");
    let (_manager, _) = bed.start_manager(
        ns,
        env!("CARGO_BIN_EXE_manager"),
        &[
            format!("--libvirt-uri={uri}"),
            "--webhook-port=0".into(),
            format!("--namespace={ns}"),
            "--sync-period=2s".into(),
            // The busybox guest ignores ACPI: delete powers it off after this.
            "--guest-shutdown-timeout=3s".into(),
            format!("--metrics-bind-address=127.0.0.1:{metrics}"),
        ],
    );
    let (clusters, machines) = ours(&client, ns);
    capi(&client, ns, "Cluster")
        .create(&PostParams::default(), &cluster("real"))
        .await
        .expect("creating the Cluster");
    clusters
        .create(
            &PostParams::default(),
            &libvirt_cluster_on(
                "real",
                json!([{"name": "hv1", "uri": uri, "domainType": "qemu"}]),
                &prepared.pool,
                &prepared.network,
            ),
        )
        .await
        .expect("creating the LibvirtCluster");
    let marker = "capl-e2e-cloud-config-marker";
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &cloud_config_secret(
                "guest-bootstrap",
                &format!("#cloud-config\nruncmd:\n  - echo {marker}\n"),
            ),
        )
        .await
        .expect("creating the bootstrap Secret");
    machines
        .create(
            &PostParams::default(),
            &libvirt_machine_on(
                "real",
                "guest",
                &prepared.pool,
                support::guest_host::GUEST_VOLUME,
            ),
        )
        .await
        .expect("creating the LibvirtMachine");
    capi(&client, ns, "Machine")
        .create(&PostParams::default(), &machine("real", "guest"))
        .await
        .expect("creating the Machine");

    let started = std::time::Instant::now();
    let guest = eventually(
        "the guest's lease as its address",
        Duration::from_secs(240),
        || async {
            let m = machines.get("guest").await.ok()?;
            provisioned(&m).then_some(m)
        },
    )
    .await;
    println!("provisioned with a lease after {:?}", started.elapsed());
    let uuid = guest.spec.domain_uuid.clone().expect("domainUUID");
    let identity =
        capl::libvirt::identity::MachineIdentity::new(ns, "guest", uuid.parse().expect("a UUID"));
    let addresses = guest
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .expect("addresses");
    let leases: Vec<String> = host
        .addresses(&identity)
        .expect("the host's view")
        .into_iter()
        .filter(|a| a.source == capl::libvirt::machine::AddressSource::Lease)
        .map(|a| a.address.to_string())
        .collect();
    assert!(
        !leases.is_empty() && leases[0].starts_with(&prepared.subnet),
        "{leases:?}"
    );
    assert!(
        addresses.iter().any(|a| a.address == leases[0]),
        "the lease {leases:?} is the machine's address: {addresses:?}"
    );
    let console = host.console_tail(&identity, 64 * 1024).expect("console");
    assert!(
        console.contains("capl-guest: seed found") && console.contains(marker),
        "the guest booted its disk and read its cloud-config:\n{console}"
    );
    // Cluster API's Machine carries the address too.
    eventually("the Machine's address", WAIT, || async {
        let m = capi(&client, ns, "Machine").get("guest").await.ok()?;
        let found = m.data.pointer("/status/addresses")?.as_array()?.clone();
        found
            .iter()
            .any(|a| a["address"] == json!(leases[0]))
            .then_some(())
    })
    .await;
    assert_eq!(domains_in(&host, ns), vec![identity.domain_name()]);

    // Pause: once both objects say Paused, no libvirt call is made across several resyncs.
    capi(&client, ns, "Cluster")
        .patch(
            "real",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .expect("pausing");
    eventually("Paused conditions", WAIT, || async {
        let m = machines.get("guest").await.ok()?;
        let c = clusters.get("real").await.ok()?;
        let cluster_paused = c
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Paused" && c.status == "True");
        (condition_status(&m, "Paused").as_deref() == Some("True") && cluster_paused).then_some(())
    })
    .await;
    // A reconcile in flight when the pause landed may still finish its call.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = libvirt_calls(metrics);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let during = libvirt_calls(metrics);
    assert_eq!(
        before, during,
        "no libvirt call while paused (3 sync periods)"
    );
    capi(&client, ns, "Cluster")
        .patch(
            "real",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .expect("unpausing");
    eventually("libvirt calls after the pause", WAIT, || async {
        (libvirt_calls(metrics) > during).then_some(())
    })
    .await;
    println!("libvirt calls: {before} before the pause window, {during} after it");

    // Deleting the Cluster deletes everything it made on the host.
    capi(&client, ns, "Cluster")
        .delete("real", &DeleteParams::default())
        .await
        .expect("deleting the Cluster");
    eventually("the Cluster to be gone", WAIT, || async {
        let gone = capi(&client, ns, "Cluster")
            .get_opt("real")
            .await
            .ok()?
            .is_none();
        let machines_gone = machines
            .list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty();
        (gone && machines_gone).then_some(())
    })
    .await;
    assert_eq!(
        domains_in(&host, ns),
        Vec::<String>::new(),
        "no domain left"
    );
    assert_eq!(
        support::guest_host::volumes(&host, &prepared.pool).unwrap(),
        vec![support::guest_host::GUEST_VOLUME.to_owned()],
        "no volume left but the guest image"
    );
}

/// A real guest on a network without DHCP never reports an address: after
/// `--guest-address-timeout` its `AddressesKnown` condition and a Warning Event show the tail of
/// its serial console (what it printed, read back through libvirt), with the bootstrap data
/// redacted. The machine stays provisioned.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_without_an_address_shows_its_console_tail_redacted() {
    let ns = "e2e-quiet";
    let bed = support::shared();
    bed.capi();
    let (uri, pool_dir) = {
        let libvirtd = bed.libvirtd();
        let libvirtd = libvirtd.as_ref().expect("libvirtd");
        (libvirtd.uri.clone(), libvirtd.images().join("capl-quiet"))
    };
    let host = capl::libvirt::Host::open(&support::host_uri(&uri)).expect("an own connection");
    let prepared = support::guest_host::prepare(&host, "capl-quiet", &pool_dir, "caplq0", 12)
        .expect("pool and guest image");
    // An isolated network without DHCP: the guest asks, nobody answers.
    let conn = host.connection();
    let silent = "capl-silent";
    let network = match conn.lookup_network_by_name(silent) {
        Ok(network) => network,
        Err(_) => conn
            .define_network_xml(&format!(
                "<network><name>{silent}</name><bridge name='caplsil0'/>\
                 <ip address='10.213.13.1' netmask='255.255.255.0'/></network>"
            ))
            .expect("defining the network"),
    };
    if !network.is_active().unwrap_or(false) {
        network.create().expect("starting the network");
    }
    let client = bed.client().await;
    namespace(&client, ns).await;
    let (_manager, _) = bed.start_manager(
        ns,
        env!("CARGO_BIN_EXE_manager"),
        &[
            format!("--libvirt-uri={uri}"),
            "--webhook-port=0".into(),
            format!("--namespace={ns}"),
            "--sync-period=2s".into(),
            "--guest-shutdown-timeout=3s".into(),
            "--guest-address-timeout=10s".into(),
        ],
    );
    let (clusters, machines) = ours(&client, ns);
    capi(&client, ns, "Cluster")
        .create(&PostParams::default(), &cluster("quiet"))
        .await
        .expect("creating the Cluster");
    clusters
        .create(
            &PostParams::default(),
            &libvirt_cluster_on(
                "quiet",
                json!([{"name": "hv1", "uri": uri, "domainType": "qemu"}]),
                &prepared.pool,
                silent,
            ),
        )
        .await
        .expect("creating the LibvirtCluster");
    let marker = "capl-e2e-secret-marker-0f3a9c";
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &cloud_config_secret(
                "guest-bootstrap",
                &format!("#cloud-config\nruncmd:\n  - echo {marker}\n"),
            ),
        )
        .await
        .expect("creating the bootstrap Secret");
    machines
        .create(
            &PostParams::default(),
            &libvirt_machine_on(
                "quiet",
                "guest",
                &prepared.pool,
                support::guest_host::GUEST_VOLUME,
            ),
        )
        .await
        .expect("creating the LibvirtMachine");
    capi(&client, ns, "Machine")
        .create(&PostParams::default(), &machine("quiet", "guest"))
        .await
        .expect("creating the Machine");

    let message = eventually(
        "NoAddressTimeout with the console tail",
        Duration::from_secs(240),
        || async {
            let m = machines.get("guest").await.ok()?;
            let c = m
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "AddressesKnown")?
                .clone();
            (c.status == "False"
                && c.reason == "NoAddressTimeout"
                && c.message.contains("serial console tail:")
                && (c.message.contains("udhcpc") || c.message.contains("capl-guest")))
            .then_some(c.message)
        },
    )
    .await;
    assert!(!message.contains(marker), "{message}");
    assert!(message.chars().count() <= 600, "bounded: {message}");
    let m = machines.get("guest").await.expect("the machine");
    assert!(provisioned_only(&m), "still provisioned: {:?}", m.status);
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), ns);
    let warned = eventually("a Warning Event", WAIT, || async {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("NoAddressTimeout"))
    })
    .await;
    assert_eq!(warned.type_.as_deref(), Some("Warning"));
    let note = warned.message.unwrap_or_default();
    assert!(
        note.contains("serial console tail:") && !note.contains(marker),
        "{note}"
    );

    capi(&client, ns, "Cluster")
        .delete("quiet", &DeleteParams::default())
        .await
        .expect("deleting the Cluster");
    eventually("the machines to be gone", WAIT, || async {
        machines
            .list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    assert_eq!(domains_in(&host, ns), Vec::<String>::new());
}

/// The domains of namespace `ns` on `host` (other tests' guests share the bed's libvirtd).
fn domains_in(host: &capl::libvirt::Host, ns: &str) -> Vec<String> {
    support::guest_host::domains(host)
        .unwrap()
        .into_iter()
        .filter(|d| d.starts_with(&format!("{ns}_")))
        .collect()
}

/// Provisioned (with a providerID), whatever its addresses.
fn provisioned_only(m: &LibvirtMachine) -> bool {
    m.spec.provider_id.is_some()
        && m.status
            .as_ref()
            .and_then(|s| s.initialization.as_ref())
            .and_then(|i| i.provisioned)
            == Some(true)
}

// ---------------------------------------------------------------- clusterctl move

/// `(name, uuid, id)` of this namespace's domains on the test driver: a re-created or restarted
/// domain gets another id.
async fn domain_ids(env: &TestDriver) -> Vec<(String, String, u32)> {
    let prefix = format!("{}_", env.ns);
    env.backend
        .hosts()
        .run(&support::host_uri("test:///default"), move |host| {
            let mut found = Vec::new();
            for d in host.connection().list_all_domains(0).unwrap_or_default() {
                let name = d.name().unwrap_or_default();
                if name.starts_with(&prefix) {
                    found.push((
                        name,
                        d.uuid_string().unwrap_or_default(),
                        d.id().unwrap_or(0),
                    ));
                }
            }
            found.sort();
            Ok(found)
        })
        .await
        .expect("the test driver")
}

/// `clusterctl move` from the shared bed's apiserver to a second one, each with the real CAPI
/// core and these controllers (on one backend: the same hypervisor). The bed's apiserver also
/// plays the workload cluster, so that the Machine gets the nodeRef `clusterctl move` waits for.
#[tokio::test(flavor = "multi_thread")]
async fn clusterctl_move_keeps_the_vm_rebuilds_the_status_and_delete_cleans_up_after() {
    let ns = "e2e-move";
    let env = test_driver(ns).await;
    let bed = support::shared();
    // The target management cluster: etcd + kube-apiserver + CAPI core + our CRDs.
    let dir = bed.test_dir("move");
    let tools = support::tools::Tools::locate().expect("tools");
    let (target, target_capi) = tokio::task::spawn_blocking(move || {
        let plane = support::apiserver::ControlPlane::start(
            &tools,
            &dir.join("target"),
            support::process::Lifetime::TestProcess,
        )
        .expect("the target apiserver");
        let capi = support::capi::CapiCore::start(
            &tools,
            &plane,
            &dir.join("target-capi"),
            support::process::Lifetime::TestProcess,
        )
        .expect("the target's CAPI core");
        let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        plane
            .kubectl_ok(&["apply", "--server-side", "-f", &crds.to_string_lossy()])
            .expect("our CRDs on the target");
        plane
            .kubectl_ok(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd",
                "-l",
                "cluster.x-k8s.io/provider=infrastructure-libvirt",
            ])
            .expect("our CRDs established");
        (plane, capi)
    })
    .await
    .expect("starting the target");

    // The source: a cluster with one control-plane machine, its bootstrap Secret and the
    // workload cluster's kubeconfig (both named `<cluster>-…`, so clusterctl moves them).
    env.cluster("mv").await;
    let kubeconfig = std::fs::read_to_string(&bed.kubeconfig).expect("kubeconfig");
    let secrets = Api::<Secret>::namespaced(env.client.clone(), ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "mv-kubeconfig", "labels": {"cluster.x-k8s.io/cluster-name": "mv"}},
                "type": "cluster.x-k8s.io/secret",
                "stringData": {"value": kubeconfig},
            }))
            .unwrap(),
        )
        .await
        .expect("the workload kubeconfig");
    // A hand-written bootstrap Secret moves only with an owner (a bootstrap provider's Secret is
    // owned by its config object): the Cluster here.
    let cluster_uid = capi(&env.client, ns, "Cluster")
        .get("mv")
        .await
        .unwrap()
        .uid()
        .unwrap();
    let mut bootstrap = cloud_config_secret("mv-cp-bootstrap", "#cloud-config\n");
    bootstrap.metadata.owner_references = Some(vec![
        serde_json::from_value(json!({
            "apiVersion": "cluster.x-k8s.io/v1beta2",
            "kind": "Cluster",
            "name": "mv",
            "uid": cluster_uid,
        }))
        .unwrap(),
    ]);
    secrets
        .create(&PostParams::default(), &bootstrap)
        .await
        .unwrap();
    env.machines
        .create(
            &PostParams::default(),
            &libvirt_machine_on("mv", "mv-cp", TEST_POOL, TEST_IMAGE),
        )
        .await
        .unwrap();
    let mut cp = machine("mv", "mv-cp");
    cp.metadata
        .labels
        .get_or_insert_default()
        .insert("cluster.x-k8s.io/control-plane".into(), String::new());
    capi(&env.client, ns, "Machine")
        .create(&PostParams::default(), &cp)
        .await
        .unwrap();
    let before = env.wait_provisioned("mv-cp").await;
    let provider_id = before.spec.provider_id.clone().expect("providerID");
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "e2e-move-mv-cp"},
                "spec": {"providerID": provider_id},
            }))
            .unwrap(),
        )
        .await
        .expect("the Node");
    eventually(
        "the nodeRef and an initialized control plane",
        WAIT,
        || async {
            let m = capi(&env.client, ns, "Machine").get("mv-cp").await.ok()?;
            let c = capi(&env.client, ns, "Cluster").get("mv").await.ok()?;
            let initialized = c
                .data
                .pointer("/status/conditions")?
                .as_array()?
                .iter()
                .any(|c| c["type"] == "ControlPlaneInitialized" && c["status"] == "True");
            (m.data.pointer("/status/nodeRef").is_some() && initialized).then_some(())
        },
    )
    .await;
    // clusterctl discovers the kinds to move by this label (`clusterctl init` would set it).
    let out = bed.kubectl(&[
        "label",
        "crd",
        "--all",
        "clusterctl.cluster.x-k8s.io=",
        "--overwrite",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vms_before = domain_ids(&env).await;
    assert_eq!(vms_before.len(), 1);

    // Our controllers on the target, on the same hypervisor.
    let target_client = {
        let kubeconfig = kube::config::Kubeconfig::read_from(&target.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        Client::try_from(config).unwrap()
    };
    let target_running = Running::start(&target_client, env.backend.clone(), settings(ns));

    let (clusterctl, source, to, home) = (
        bed.tools.clusterctl.clone(),
        bed.kubeconfig.clone(),
        target.kubeconfig.clone(),
        bed.test_dir("move-home"),
    );
    let moved = tokio::task::spawn_blocking(move || {
        std::process::Command::new(clusterctl)
            .arg("move")
            .arg(format!("--kubeconfig={}", source.display()))
            .arg(format!("--to-kubeconfig={}", to.display()))
            .arg(format!("--namespace={ns}"))
            .env("CLUSTERCTL_DISABLE_VERSIONCHECK", "true")
            .env("HOME", home)
            .output()
            .expect("clusterctl")
    })
    .await
    .unwrap();
    assert!(
        moved.status.success(),
        "clusterctl move: {}{}",
        String::from_utf8_lossy(&moved.stdout),
        String::from_utf8_lossy(&moved.stderr)
    );

    // On the target: a new object (new UID, status rebuilt) that found the same VM.
    let (_, target_machines) = ours(&target_client, ns);
    let after = wait_provisioned(&target_machines, "mv-cp").await;
    assert_ne!(after.uid(), before.uid(), "a new object");
    assert_eq!(after.spec.provider_id, before.spec.provider_id);
    assert_eq!(after.spec.domain_uuid, before.spec.domain_uuid);
    let summary = |m: &LibvirtMachine| {
        let s = m.status.clone().unwrap_or_default();
        (
            s.host,
            s.failure_domain,
            s.domain_uuid,
            s.addresses,
            s.state,
        )
    };
    assert_eq!(summary(&after), summary(&before), "status rebuilt");
    assert_eq!(
        domain_ids(&env).await,
        vms_before,
        "no VM created, deleted or restarted by the move"
    );
    assert!(
        env.machines
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "the source no longer has the machine"
    );

    // Delete after the move: the target's controllers clean up.
    capi(&target_client, ns, "Cluster")
        .delete("mv", &DeleteParams::default())
        .await
        .expect("deleting the moved Cluster");
    eventually("the moved Cluster to be gone", WAIT, || async {
        capi(&target_client, ns, "Cluster")
            .get_opt("mv")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let (domains, volumes) = env.inventory().await;
    assert!(domains.is_empty(), "no domain left: {domains:?}");
    assert!(volumes.is_empty(), "no volume left: {volumes:?}");
    let _ = nodes
        .delete("e2e-move-mv-cp", &DeleteParams::default())
        .await;
    target_running.stop().await;
    env.stop().await;
    drop(target_capi);
    drop(target);
}

// ---------------------------------------------------------------- the examples under our webhooks

/// Every object of ours in `deploy/examples/` is allowed by the validating webhook, as written
/// and with the host URI pointed at the bed (the test driver needs `--allow-test-driver`), and
/// defaulting changes nothing that validation would then refuse.
#[test]
fn the_examples_are_admitted_by_the_webhooks() {
    use capl::webhook::admission::{AdmissionPolicy, Endpoint, Kind, review};
    use kube::core::admission::{AdmissionRequest, AdmissionReview};
    let policy = AdmissionPolicy {
        uri: capl::libvirt::uri::UriPolicy {
            allow_test_driver: true,
        },
    };
    let mut checked = Vec::new();
    for uri in [
        "qemu:///system",
        "qemu:///system?socket=/tmp/capl-bed/sock/libvirt-sock",
        "test:///default",
    ] {
        for doc in serde_yaml::Deserializer::from_str(&examples(uri)) {
            let object: Value = serde::Deserialize::deserialize(doc).expect("YAML");
            let kind = match object["kind"].as_str().unwrap_or_default() {
                "LibvirtCluster" => Kind::LibvirtCluster,
                "LibvirtMachine" => Kind::LibvirtMachine,
                "LibvirtMachineTemplate" => Kind::LibvirtMachineTemplate,
                _ => continue,
            };
            let name = object["metadata"]["name"].as_str().unwrap().to_owned();
            for endpoint in [Endpoint::Mutate, Endpoint::Validate] {
                let review_json = json!({
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "request": {
                        "uid": "e2e",
                        "kind": {"group": "infrastructure.cluster.x-k8s.io", "version": "v1alpha1", "kind": object["kind"]},
                        "resource": {"group": "infrastructure.cluster.x-k8s.io", "version": "v1alpha1", "resource": "x"},
                        "name": name,
                        "namespace": "default",
                        "operation": "CREATE",
                        "userInfo": {},
                        "object": object,
                        "dryRun": false,
                    },
                });
                let review_in: AdmissionReview<DynamicObject> =
                    serde_json::from_value(review_json).expect("a review");
                let request: AdmissionRequest<DynamicObject> =
                    review_in.try_into().expect("a request");
                let response = review(kind, endpoint, &request, &policy);
                let answer = serde_json::to_value(response.into_review()).unwrap();
                assert_eq!(
                    answer["response"]["allowed"],
                    json!(true),
                    "{name} ({uri}): {answer}"
                );
                // Expected warnings: the examples are sized for the tiny test guest on TCG, not
                // for a Kubernetes node, and the webhooks say so.
                let expected = [
                    "software emulation",
                    "need at least 2 vCPUs",
                    "a Kubernetes node needs in practice",
                    "root disk usually needs",
                    "the test driver keeps virtual machines in memory only",
                ];
                let unexpected: Vec<&Value> = answer["response"]["warnings"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|w| {
                        let w = w.as_str().unwrap_or_default();
                        !expected.iter().any(|e| w.contains(e))
                    })
                    .collect();
                assert!(
                    unexpected.is_empty(),
                    "{name} ({uri}) has warnings: {unexpected:?}"
                );
            }
            checked.push(name);
        }
    }
    checked.sort();
    checked.dedup();
    assert_eq!(
        checked,
        vec!["example", "example-control-plane-0", "example-workers"]
    );
}
